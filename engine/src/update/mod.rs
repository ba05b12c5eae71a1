//! Server-side update functions: the rule that folds a worker's push into
//! the stored weights runs on the server, where the data lives.
//!
//! - [`UpdateFn`]: the trait a rule implements; it works on whole slices so that the
//!   built-ins vectorise and a dense range costs one call. Every built-in works element by
//!   element, so the store may hand it any run of keys.
//! - Built-ins: [`Assign`] (`w = g`), [`Sum`] (`w += g`), [`Sgd`] (`w -= lr * g`),
//!   [`Adagrad`] (per-coordinate learning rates, one state element per weight) and
//!   [`Ftrl`] (FTRL-proximal with L1 and L2, two state elements per weight; L1 drives
//!   weights to exactly zero).
//! - User rules: implement [`UpdateFn`], or wrap a closure with [`from_fn`] /
//!   [`UpdateRegistry::register_fn`].
//! - [`UpdateSpec`]: a built-in as configuration (`"sum"`, `"sgd:0.1"`, `"adagrad:0.05"`,
//!   `"ftrl:0.1:1:1:0"`, ...), serialisable, for the command line and the cluster table.
//! - [`UpdateRegistry`]: the function id carried in a message header mapped to a rule.
//!
//! Optimizer state (AdaGrad's accumulator, FTRL's z and n) lives beside the weights in the
//! store; a rule says how many state elements it keeps per weight element with
//! [`UpdateFn::state_len`], and state element `j` of weight `i` is `state[i * state_len + j]`.
//! A server sizes its store's state from its default rule with [`UpdateSpec::state_len`].

mod adagrad;
mod assign;
#[cfg(test)]
mod check;
mod closure;
mod ftrl;
mod registry;
mod sgd;
mod spec;
mod sum;

pub use adagrad::Adagrad;
pub use assign::Assign;
pub use closure::from_fn;
pub use ftrl::Ftrl;
pub use registry::{
    UpdateRegistry, ID_ADAGRAD, ID_ASSIGN, ID_DEFAULT, ID_FIRST_USER, ID_FTRL, ID_SGD, ID_SUM,
};
pub use sgd::Sgd;
pub use spec::{
    ParseUpdateSpecError, UpdateSpec, DEFAULT_ADAGRAD_EPS, DEFAULT_ADAGRAD_LR, DEFAULT_FTRL_ALPHA,
    DEFAULT_FTRL_BETA, DEFAULT_FTRL_L1, DEFAULT_FTRL_L2, DEFAULT_SGD_LR,
};
pub use sum::Sum;

use crate::base::value::Value;

/// A server-side update rule. Runs where the data lives.
///
/// The store calls [`apply`](Self::apply) with the weights of one key, or of a whole dense
/// run of keys, at a time, under the lock of the shard that holds them; it must not block.
/// When the store keeps more state per weight than the rule needs, it calls the rule one
/// weight element at a time, so a rule's result for an element may depend only on that
/// element's weight, state and gradient (every built-in's does).
pub trait UpdateFn<T: Value>: Send + Sync + 'static {
    /// A short name, for logs and error messages.
    fn name(&self) -> &str;

    /// Extra state elements kept per value element (0 for sum/assign/sgd, 1 for AdaGrad,
    /// 2 for FTRL).
    fn state_len(&self) -> usize {
        0
    }

    /// Apply `grads` to `weights` (equal length). `state.len() == weights.len() *
    /// state_len()`, state element `j` of weight `i` at `state[i * state_len() + j]`;
    /// state starts at zero for a key the store has not seen.
    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]);

    /// The built-in this rule is, if it is one. The store uses it to inline the built-ins
    /// into its per-key loops instead of calling through the trait object once per key.
    /// User rules keep the default `None`; returning `Some` for a rule that does not
    /// compute exactly what that built-in computes would make the store compute the
    /// built-in instead.
    fn spec(&self) -> Option<UpdateSpec> {
        None
    }
}
