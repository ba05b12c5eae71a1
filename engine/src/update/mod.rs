//! Server-side update functions (MISSION.md P4): the rule that folds a worker's push into
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

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::base::value::Value;

/// A server-side update rule (MISSION.md P4). Runs where the data lives.
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

/// `w = g`: overwrite the weights with the pushed values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Assign;

/// `w += g`: add the pushed values (aggregate gradients, counters, sketches).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sum;

/// Plain stochastic gradient descent: `w -= lr * g`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
}

/// AdaGrad (Duchi, Hazan and Singer 2011), per coordinate: with `n` the sum of the squared
/// gradients this weight has seen,
///
/// ```text
/// n += g * g
/// w -= lr * g / (sqrt(n) + eps)
/// ```
///
/// State: one element per weight, `n` ([`state_len`](UpdateFn::state_len) 1). `eps` keeps
/// the step finite while `n` is zero; it must be positive and representable in the value
/// type (for `f32`, above about `1e-38`), or a zero gradient on a fresh key gives NaN.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adagrad {
    /// Learning rate (positive).
    pub lr: f64,
    /// Added to `sqrt(n)` in the denominator (positive).
    pub eps: f64,
}

impl Default for Adagrad {
    /// Learning rate [`DEFAULT_ADAGRAD_LR`], epsilon [`DEFAULT_ADAGRAD_EPS`].
    fn default() -> Self {
        Adagrad {
            lr: DEFAULT_ADAGRAD_LR,
            eps: DEFAULT_ADAGRAD_EPS,
        }
    }
}

/// FTRL-proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the Trenches",
/// Algorithm 1): the per-coordinate rule the paper's L1-regularised logistic regression
/// uses. With gradient `g` and current weight `w`, per element:
///
/// ```text
/// sigma = (sqrt(n + g^2) - sqrt(n)) / alpha
/// z += g - sigma * w
/// n += g^2
/// w = 0                                                    if |z| <= l1
/// w = -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)  otherwise
/// ```
///
/// State: two elements per weight, `z` then `n` ([`state_len`](UpdateFn::state_len) 2).
/// The stored weight is `w` itself, so pulls read the model directly; with a large `l1`
/// weights are exactly `0.0` (sparse models, and the KKT filter's zeros, MISSION.md P7).
///
/// Parameters: `alpha > 0`, `beta >= 0`, `l1 >= 0`, `l2 >= 0`, and `beta` or `l2`
/// positive, so the denominator is never zero ([`UpdateSpec`]'s parser enforces this).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ftrl {
    /// Learning-rate scale (positive): per-coordinate rate `alpha / (beta + sqrt(n))`.
    pub alpha: f64,
    /// Smoothing of the per-coordinate rate while `n` is small (non-negative).
    pub beta: f64,
    /// L1 strength (non-negative): `|z| <= l1` makes the weight exactly zero.
    pub l1: f64,
    /// L2 strength (non-negative).
    pub l2: f64,
}

impl Default for Ftrl {
    /// [`DEFAULT_FTRL_ALPHA`], [`DEFAULT_FTRL_BETA`], [`DEFAULT_FTRL_L1`],
    /// [`DEFAULT_FTRL_L2`].
    fn default() -> Self {
        Ftrl {
            alpha: DEFAULT_FTRL_ALPHA,
            beta: DEFAULT_FTRL_BETA,
            l1: DEFAULT_FTRL_L1,
            l2: DEFAULT_FTRL_L2,
        }
    }
}

impl<T: Value> UpdateFn<T> for Assign {
    fn name(&self) -> &str {
        "assign"
    }

    #[inline]
    fn apply(&self, weights: &mut [T], _state: &mut [T], grads: &[T]) {
        debug_assert_eq!(weights.len(), grads.len());
        weights.copy_from_slice(grads);
    }

    fn spec(&self) -> Option<UpdateSpec> {
        Some(UpdateSpec::Assign)
    }
}

impl<T: Value> UpdateFn<T> for Sum {
    fn name(&self) -> &str {
        "sum"
    }

    #[inline]
    fn apply(&self, weights: &mut [T], _state: &mut [T], grads: &[T]) {
        debug_assert_eq!(weights.len(), grads.len());
        for (w, &g) in weights.iter_mut().zip(grads) {
            *w += g;
        }
    }

    fn spec(&self) -> Option<UpdateSpec> {
        Some(UpdateSpec::Sum)
    }
}

impl<T: Value> UpdateFn<T> for Sgd {
    fn name(&self) -> &str {
        "sgd"
    }

    #[inline]
    fn apply(&self, weights: &mut [T], _state: &mut [T], grads: &[T]) {
        debug_assert_eq!(weights.len(), grads.len());
        let lr = T::from_f64(self.lr);
        for (w, &g) in weights.iter_mut().zip(grads) {
            *w -= lr * g;
        }
    }

    fn spec(&self) -> Option<UpdateSpec> {
        Some(UpdateSpec::Sgd { lr: self.lr })
    }
}

impl<T: Value> UpdateFn<T> for Adagrad {
    fn name(&self) -> &str {
        "adagrad"
    }

    fn state_len(&self) -> usize {
        1
    }

    #[inline]
    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]) {
        debug_assert_eq!(weights.len(), grads.len());
        debug_assert_eq!(state.len(), weights.len());
        let (lr, eps) = (T::from_f64(self.lr), T::from_f64(self.eps));
        for ((w, n), &g) in weights.iter_mut().zip(state.iter_mut()).zip(grads) {
            *n += g * g;
            *w -= lr * g / (n.sqrt() + eps);
        }
    }

    fn spec(&self) -> Option<UpdateSpec> {
        Some(UpdateSpec::Adagrad {
            lr: self.lr,
            eps: self.eps,
        })
    }
}

impl<T: Value> UpdateFn<T> for Ftrl {
    fn name(&self) -> &str {
        "ftrl"
    }

    fn state_len(&self) -> usize {
        2
    }

    #[inline]
    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]) {
        debug_assert_eq!(weights.len(), grads.len());
        debug_assert_eq!(state.len(), weights.len() * 2);
        let alpha = T::from_f64(self.alpha);
        let beta = T::from_f64(self.beta);
        let l1 = T::from_f64(self.l1);
        let l2 = T::from_f64(self.l2);
        for ((w, zn), &g) in weights.iter_mut().zip(state.chunks_exact_mut(2)).zip(grads) {
            let (z, n) = (zn[0], zn[1]);
            let n_new = n + g * g;
            let sqrt_new = n_new.sqrt();
            let sigma = (sqrt_new - n.sqrt()) / alpha;
            let z = z + (g - sigma * *w);
            zn[0] = z;
            zn[1] = n_new;
            *w = if z.abs() <= l1 {
                T::default()
            } else {
                (z.signum0() * l1 - z) / ((beta + sqrt_new) / alpha + l2)
            };
        }
    }

    fn spec(&self) -> Option<UpdateSpec> {
        Some(UpdateSpec::Ftrl {
            alpha: self.alpha,
            beta: self.beta,
            l1: self.l1,
            l2: self.l2,
        })
    }
}

/// A user rule made from a closure by [`from_fn`].
struct FnRule<F> {
    name: String,
    state_len: usize,
    f: F,
}

impl<T, F> UpdateFn<T> for FnRule<F>
where
    T: Value,
    F: Fn(&mut [T], &mut [T], &[T]) + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn state_len(&self) -> usize {
        self.state_len
    }

    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]) {
        debug_assert_eq!(weights.len(), grads.len());
        debug_assert_eq!(state.len(), weights.len() * self.state_len);
        (self.f)(weights, state, grads)
    }
}

/// A user update rule from a closure, without writing a type: `f(weights, state, grads)`
/// has the contract of [`UpdateFn::apply`], with `state_len` state elements per weight
/// element (state element `j` of weight `i` at `state[i * state_len + j]`, zero for a key
/// the store has not seen). The store may call `f` on any run of keys, or one weight
/// element at a time, so `f` must treat elements independently.
///
/// ```
/// use pserv_engine::update::{from_fn, UpdateFn};
///
/// // Keep the largest value ever pushed; the state counts the pushes.
/// let max = from_fn::<f32, _>("max", 1, |w, s, g| {
///     for ((w, s), &g) in w.iter_mut().zip(s.iter_mut()).zip(g) {
///         *w = w.max(g);
///         *s += 1.0;
///     }
/// });
/// let (mut w, mut s) = ([1.0f32, 5.0], [0.0f32; 2]);
/// max.apply(&mut w, &mut s, &[3.0, 2.0]);
/// assert_eq!((w, s), ([3.0, 5.0], [1.0, 1.0]));
/// assert_eq!((max.name(), max.state_len()), ("max", 1));
/// ```
pub fn from_fn<T, F>(name: &str, state_len: usize, f: F) -> Arc<dyn UpdateFn<T>>
where
    T: Value,
    F: Fn(&mut [T], &mut [T], &[T]) + Send + Sync + 'static,
{
    Arc::new(FnRule {
        name: name.to_owned(),
        state_len,
        f,
    })
}

/// The learning rate of `"sgd"` when the text names none.
pub const DEFAULT_SGD_LR: f64 = 0.1;
/// The learning rate of `"adagrad"` when the text names none.
pub const DEFAULT_ADAGRAD_LR: f64 = 0.1;
/// The epsilon of `"adagrad"` and `"adagrad:LR"`.
pub const DEFAULT_ADAGRAD_EPS: f64 = 1e-8;
/// FTRL's alpha for plain `"ftrl"`.
pub const DEFAULT_FTRL_ALPHA: f64 = 0.1;
/// FTRL's beta for plain `"ftrl"`.
pub const DEFAULT_FTRL_BETA: f64 = 1.0;
/// FTRL's L1 strength for plain `"ftrl"`.
pub const DEFAULT_FTRL_L1: f64 = 0.0;
/// FTRL's L2 strength for plain `"ftrl"`.
pub const DEFAULT_FTRL_L2: f64 = 0.0;

/// A built-in update rule as configuration: what the servers' default update is set to on
/// the command line and carried in the cluster table.
///
/// Text forms ([`FromStr`] and [`Display`](fmt::Display) round-trip; names are
/// case-insensitive, spaces around the parts are ignored):
///
/// | text | rule |
/// |---|---|
/// | `assign` | [`Assign`] |
/// | `sum` | [`Sum`] |
/// | `sgd`, `sgd:LR` | [`Sgd`]; LR defaults to [`DEFAULT_SGD_LR`] |
/// | `adagrad`, `adagrad:LR`, `adagrad:LR:EPS` | [`Adagrad`]; defaults [`DEFAULT_ADAGRAD_LR`], [`DEFAULT_ADAGRAD_EPS`] |
/// | `ftrl`, `ftrl:ALPHA:BETA:L1:L2` | [`Ftrl`]; defaults alpha 0.1, beta 1, l1 0, l2 0 |
///
/// LR, EPS and ALPHA must be finite and positive; BETA, L1 and L2 finite and not
/// negative, with BETA or L2 positive. For example `sgd:0.05`, `adagrad:0.1:1e-6`,
/// `ftrl:0.1:1:2:0.5`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UpdateSpec {
    /// [`Assign`].
    Assign,
    /// [`Sum`].
    Sum,
    /// [`Sgd`] with this learning rate.
    Sgd {
        /// Learning rate.
        lr: f64,
    },
    /// [`Adagrad`] with these parameters.
    Adagrad {
        /// Learning rate.
        lr: f64,
        /// Added to the root of the squared-gradient sum.
        eps: f64,
    },
    /// [`Ftrl`] with these parameters.
    Ftrl {
        /// Learning-rate scale.
        alpha: f64,
        /// Learning-rate smoothing.
        beta: f64,
        /// L1 strength.
        l1: f64,
        /// L2 strength.
        l2: f64,
    },
}

impl UpdateSpec {
    /// Make the rule.
    pub fn build<T: Value>(&self) -> Arc<dyn UpdateFn<T>> {
        match *self {
            UpdateSpec::Assign => Arc::new(Assign),
            UpdateSpec::Sum => Arc::new(Sum),
            UpdateSpec::Sgd { lr } => Arc::new(Sgd { lr }),
            UpdateSpec::Adagrad { lr, eps } => Arc::new(Adagrad { lr, eps }),
            UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => Arc::new(Ftrl {
                alpha,
                beta,
                l1,
                l2,
            }),
        }
    }

    /// State elements per weight element the rule keeps ([`UpdateFn::state_len`]): what a
    /// server's store must keep at least to serve this rule (`StoreConfig::state_len`).
    pub fn state_len(&self) -> usize {
        match self {
            UpdateSpec::Assign | UpdateSpec::Sum | UpdateSpec::Sgd { .. } => 0,
            UpdateSpec::Adagrad { .. } => 1,
            UpdateSpec::Ftrl { .. } => 2,
        }
    }

    /// The rule's name, as the text form starts.
    pub fn name(&self) -> &'static str {
        match self {
            UpdateSpec::Assign => "assign",
            UpdateSpec::Sum => "sum",
            UpdateSpec::Sgd { .. } => "sgd",
            UpdateSpec::Adagrad { .. } => "adagrad",
            UpdateSpec::Ftrl { .. } => "ftrl",
        }
    }

    /// Why these parameters are unusable, if they are (the same checks the parser makes;
    /// for specs built in code or deserialised).
    pub fn problem(&self) -> Option<String> {
        let mut params: Vec<(&str, f64, Bound)> = Vec::new();
        match *self {
            UpdateSpec::Assign | UpdateSpec::Sum => {}
            UpdateSpec::Sgd { lr } => params.push(("learning rate", lr, Bound::Positive)),
            UpdateSpec::Adagrad { lr, eps } => {
                params.push(("learning rate", lr, Bound::Positive));
                params.push(("epsilon", eps, Bound::Positive));
            }
            UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                params.push(("alpha", alpha, Bound::Positive));
                params.push(("beta", beta, Bound::NonNegative));
                params.push(("l1", l1, Bound::NonNegative));
                params.push(("l2", l2, Bound::NonNegative));
            }
        }
        for (what, x, bound) in params {
            let ok = x.is_finite()
                && match bound {
                    Bound::Positive => x > 0.0,
                    Bound::NonNegative => x >= 0.0,
                };
            if !ok {
                let must = match bound {
                    Bound::Positive => "a finite number above 0",
                    Bound::NonNegative => "a finite number, not negative",
                };
                return Some(format!("{} {what} {x} must be {must}", self.name()));
            }
        }
        if let UpdateSpec::Ftrl { beta, l2, .. } = *self {
            if beta == 0.0 && l2 == 0.0 {
                return Some("ftrl needs beta or l2 above 0 (both are 0)".to_owned());
            }
        }
        None
    }
}

/// How a parameter is bounded.
#[derive(Clone, Copy)]
enum Bound {
    Positive,
    NonNegative,
}

impl Default for UpdateSpec {
    /// [`Sum`]: the servers aggregate what workers push.
    fn default() -> Self {
        UpdateSpec::Sum
    }
}

impl fmt::Display for UpdateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateSpec::Assign => f.write_str("assign"),
            UpdateSpec::Sum => f.write_str("sum"),
            UpdateSpec::Sgd { lr } => write!(f, "sgd:{lr}"),
            UpdateSpec::Adagrad { lr, eps } => write!(f, "adagrad:{lr}:{eps}"),
            UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => write!(f, "ftrl:{alpha}:{beta}:{l1}:{l2}"),
        }
    }
}

/// A text that names no usable built-in update rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad update rule {text:?}: {reason}; expected assign, sum, sgd[:LR], \
     adagrad[:LR[:EPS]] or ftrl[:ALPHA:BETA:L1:L2]"
)]
pub struct ParseUpdateSpecError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for UpdateSpec {
    type Err = ParseUpdateSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseUpdateSpecError {
            text: s.to_owned(),
            reason,
        };
        let mut parts = s.split(':').map(str::trim);
        let head = parts.next().unwrap_or_default().to_ascii_lowercase();
        let args: Vec<&str> = parts.collect();
        // The parameters, in order; trailing ones may be left out for their defaults,
        // except that ftrl takes all or none.
        let names: &[&str] = match head.as_str() {
            "assign" | "sum" => &[],
            "sgd" => &["learning rate"],
            "adagrad" => &["learning rate", "epsilon"],
            "ftrl" => &["alpha", "beta", "l1", "l2"],
            "" => return Err(err("no rule named".to_owned())),
            other => return Err(err(format!("unknown rule {other:?}"))),
        };
        if args.len() > names.len() {
            return Err(err(format!(
                "{head} takes {} parameter{}, got {}",
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                args.len()
            )));
        }
        if head == "ftrl" && !args.is_empty() && args.len() < names.len() {
            return Err(err(format!(
                "ftrl takes all four of ALPHA:BETA:L1:L2 or none; {} missing",
                names[args.len()..].join(", ")
            )));
        }
        let mut vals = Vec::with_capacity(args.len());
        for (&what, &arg) in names.iter().zip(&args) {
            let x: f64 = arg
                .parse()
                .map_err(|_| err(format!("{head} {what} {arg:?} is not a number")))?;
            vals.push(x);
        }
        let val = |i: usize, default: f64| vals.get(i).copied().unwrap_or(default);
        let spec = match head.as_str() {
            "assign" => UpdateSpec::Assign,
            "sum" => UpdateSpec::Sum,
            "sgd" => UpdateSpec::Sgd {
                lr: val(0, DEFAULT_SGD_LR),
            },
            "adagrad" => UpdateSpec::Adagrad {
                lr: val(0, DEFAULT_ADAGRAD_LR),
                eps: val(1, DEFAULT_ADAGRAD_EPS),
            },
            "ftrl" => UpdateSpec::Ftrl {
                alpha: val(0, DEFAULT_FTRL_ALPHA),
                beta: val(1, DEFAULT_FTRL_BETA),
                l1: val(2, DEFAULT_FTRL_L1),
                l2: val(3, DEFAULT_FTRL_L2),
            },
            _ => unreachable!("rule names matched above"),
        };
        match spec.problem() {
            Some(reason) => Err(err(reason)),
            None => Ok(spec),
        }
    }
}

/// Function id: the server's default update rule.
pub const ID_DEFAULT: u16 = 0;
/// Function id: [`Assign`].
pub const ID_ASSIGN: u16 = 1;
/// Function id: [`Sum`].
pub const ID_SUM: u16 = 2;
/// Function id: [`Sgd`], with the default rule's learning rate when the default is SGD,
/// [`DEFAULT_SGD_LR`] otherwise.
pub const ID_SGD: u16 = 3;
/// Function id: [`Adagrad`], with the default rule's parameters when the default is
/// AdaGrad, [`Adagrad::default`] otherwise.
pub const ID_ADAGRAD: u16 = 4;
/// Function id: [`Ftrl`], with the default rule's parameters when the default is FTRL,
/// [`Ftrl::default`] otherwise.
pub const ID_FTRL: u16 = 5;
/// The first id [`UpdateRegistry::register`] hands out; ids below are reserved.
pub const ID_FIRST_USER: u16 = 16;

/// The update rules a server knows, by the `u16` function id that messages carry.
///
/// Ids `0..16` are reserved: [`ID_DEFAULT`] (the rule given at construction),
/// [`ID_ASSIGN`], [`ID_SUM`], [`ID_SGD`], [`ID_ADAGRAD`], [`ID_FTRL`]. User rules get ids
/// from [`ID_FIRST_USER`] up, in registration order, so servers that register the same
/// rules in the same order agree on the ids.
///
/// A rule's state must fit the store: a push with a rule whose
/// [`state_len`](UpdateFn::state_len) is above the store's is refused, so a server that
/// serves AdaGrad or FTRL (as its default or by id) needs a store with state for it.
///
/// ```
/// use pserv_engine::update::{UpdateRegistry, UpdateSpec, ID_FIRST_USER};
///
/// let mut reg = UpdateRegistry::<f64>::new(UpdateSpec::Sum.build());
/// // Momentum SGD as a closure: state v, v = 0.9 v + g, w -= 0.1 v.
/// let id = reg.register_fn("momentum", 1, |w: &mut [f64], v: &mut [f64], g: &[f64]| {
///     for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
///         *v = 0.9 * *v + g;
///         *w -= 0.1 * *v;
///     }
/// });
/// assert_eq!(id, ID_FIRST_USER);
/// assert_eq!(reg.id_of("momentum"), Some(id));
///
/// let rule = reg.get(id).unwrap();
/// let (mut w, mut v) = ([1.0], [0.0]);
/// rule.apply(&mut w, &mut v, &[10.0]);
/// rule.apply(&mut w, &mut v, &[10.0]);
/// assert_eq!(v, [19.0]);
/// assert!((w[0] - (1.0 - 1.0 - 1.9)).abs() < 1e-12);
/// ```
pub struct UpdateRegistry<T: Value> {
    /// Indexed by id; `None` for unused reserved ids.
    fns: Vec<Option<Arc<dyn UpdateFn<T>>>>,
    names: HashMap<String, u16>,
}

impl<T: Value> fmt::Debug for UpdateRegistry<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.names.iter().collect();
        names.sort_by_key(|(_, &id)| id);
        f.debug_struct("UpdateRegistry")
            .field(
                "default",
                &self.fns[ID_DEFAULT as usize].as_ref().map(|x| x.name()),
            )
            .field("names", &names)
            .finish()
    }
}

impl<T: Value> UpdateRegistry<T> {
    /// A registry with the built-ins and `default` as id 0. The parameterised built-ins
    /// take the default's parameters when the default is of their kind.
    pub fn new(default: Arc<dyn UpdateFn<T>>) -> Self {
        let spec = default.spec();
        let sgd = match spec {
            Some(UpdateSpec::Sgd { lr }) => Sgd { lr },
            _ => Sgd { lr: DEFAULT_SGD_LR },
        };
        let adagrad = match spec {
            Some(UpdateSpec::Adagrad { lr, eps }) => Adagrad { lr, eps },
            _ => Adagrad::default(),
        };
        let ftrl = match spec {
            Some(UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            }) => Ftrl {
                alpha,
                beta,
                l1,
                l2,
            },
            _ => Ftrl::default(),
        };
        let mut fns: Vec<Option<Arc<dyn UpdateFn<T>>>> = vec![None; ID_FIRST_USER as usize];
        fns[ID_DEFAULT as usize] = Some(default);
        fns[ID_ASSIGN as usize] = Some(Arc::new(Assign));
        fns[ID_SUM as usize] = Some(Arc::new(Sum));
        fns[ID_SGD as usize] = Some(Arc::new(sgd));
        fns[ID_ADAGRAD as usize] = Some(Arc::new(adagrad));
        fns[ID_FTRL as usize] = Some(Arc::new(ftrl));
        let names = [
            ("default", ID_DEFAULT),
            ("assign", ID_ASSIGN),
            ("sum", ID_SUM),
            ("sgd", ID_SGD),
            ("adagrad", ID_ADAGRAD),
            ("ftrl", ID_FTRL),
        ]
        .into_iter()
        .map(|(n, id)| (n.to_owned(), id))
        .collect();
        UpdateRegistry { fns, names }
    }

    /// Register a user rule under `name` and return its id (from [`ID_FIRST_USER`] up).
    /// Registering a name again replaces the rule and keeps the id.
    ///
    /// # Panics
    /// If `name` is a built-in's (`default`, `assign`, `sum`, `sgd`, `adagrad`, `ftrl`), or
    /// all `u16` ids are taken: both caller bugs.
    pub fn register(&mut self, name: &str, f: Arc<dyn UpdateFn<T>>) -> u16 {
        if let Some(&id) = self.names.get(name) {
            assert!(
                id >= ID_FIRST_USER,
                "update rule name {name:?} is reserved for a built-in"
            );
            self.fns[id as usize] = Some(f);
            return id;
        }
        let id = u16::try_from(self.fns.len()).expect("all u16 update function ids are taken");
        self.fns.push(Some(f));
        self.names.insert(name.to_owned(), id);
        id
    }

    /// Register the closure `f` as a rule named `name` keeping `state_len` state elements
    /// per weight element ([`from_fn`]), and return its id, as
    /// [`register`](Self::register) does (same panics). See the [type doc](Self) for an
    /// example.
    pub fn register_fn<F>(&mut self, name: &str, state_len: usize, f: F) -> u16
    where
        F: Fn(&mut [T], &mut [T], &[T]) + Send + Sync + 'static,
    {
        self.register(name, from_fn(name, state_len, f))
    }

    /// The rule with function id `id`; id 0 is the default. `None` for an unknown id.
    pub fn get(&self, id: u16) -> Option<Arc<dyn UpdateFn<T>>> {
        self.fns.get(id as usize)?.clone()
    }

    /// The id registered under `name` (`"default"` is 0).
    pub fn id_of(&self, name: &str) -> Option<u16> {
        self.names.get(name).copied()
    }

    /// The default rule (id 0).
    pub fn default_fn(&self) -> Arc<dyn UpdateFn<T>> {
        self.fns[ID_DEFAULT as usize]
            .clone()
            .expect("the default update rule is set at construction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Gradient sequences over four weights: signs change, one coordinate sees zeros, one
    /// large values, so every branch of every rule runs.
    const GRADS: [[f64; 4]; 6] = [
        [0.5, -1.0, 0.0, 3.0],
        [0.25, -0.5, 0.0, -2.0],
        [-0.75, 2.0, 0.0, 4.0],
        [0.5, 0.125, 0.0, 1.5],
        [1.0, -3.0, 0.0, -0.5],
        [-0.25, 0.5, 0.0, 2.5],
    ];

    /// A reference rule, written out per element in f64: `(w, state, g) -> w'`, updating
    /// the element's state in place.
    type Reference<'a> = dyn Fn(f64, &mut [f64], f64) -> f64 + 'a;

    /// Drive `rule` over [`GRADS`] in `T` from `w0`, and the reference in f64 beside it;
    /// after every step the weights and the state agree to `tol` (relative, with an
    /// absolute floor of `tol` for values near zero).
    fn check<T: Value>(rule: &dyn UpdateFn<T>, w0: [f64; 4], reference: &Reference<'_>, tol: f64) {
        let sl = rule.state_len();
        let mut w: Vec<T> = w0.iter().map(|&x| T::from_f64(x)).collect();
        let mut s = vec![T::default(); 4 * sl];
        let mut rw = w0.to_vec();
        let mut rs = vec![0.0f64; 4 * sl];
        let close = |got: f64, want: f64| (got - want).abs() <= tol * want.abs().max(1.0);
        for (step, g) in GRADS.iter().enumerate() {
            let gt: Vec<T> = g.iter().map(|&x| T::from_f64(x)).collect();
            rule.apply(&mut w, &mut s, &gt);
            for i in 0..4 {
                rw[i] = reference(rw[i], &mut rs[i * sl..(i + 1) * sl], g[i]);
            }
            for i in 0..4 {
                assert!(
                    close(w[i].to_f64(), rw[i]),
                    "{} step {step} weight {i}: got {:?}, want {}",
                    rule.name(),
                    w[i],
                    rw[i]
                );
            }
            for (j, (&got, &want)) in s.iter().zip(&rs).enumerate() {
                assert!(
                    close(got.to_f64(), want),
                    "{} step {step} state {j}: got {got:?}, want {want}",
                    rule.name()
                );
            }
        }
    }

    /// Run `check` for f32 and f64.
    fn check_both<R>(rule: R, w0: [f64; 4], reference: &Reference<'_>)
    where
        R: UpdateFn<f32> + UpdateFn<f64>,
    {
        check::<f32>(&rule, w0, reference, 1e-5);
        check::<f64>(&rule, w0, reference, 1e-12);
    }

    const W0: [f64; 4] = [1.0, -2.0, 0.5, 0.0];

    #[test]
    fn assign_overwrites() {
        check_both(Assign, W0, &|_, _, g| g);
        assert_eq!(UpdateFn::<f32>::state_len(&Assign), 0);
    }

    #[test]
    fn sum_adds() {
        check_both(Sum, W0, &|w, _, g| w + g);
    }

    #[test]
    fn sgd_steps_against_the_gradient() {
        check_both(Sgd { lr: 0.3 }, W0, &|w, _, g| w - 0.3 * g);
    }

    #[test]
    fn adagrad_scales_by_the_root_of_the_squared_gradient_sum() {
        let (lr, eps) = (0.2, 1e-3);
        // n_t = sum of g^2 so far; w_t = w_{t-1} - lr g_t / (sqrt(n_t) + eps).
        check_both(Adagrad { lr, eps }, W0, &|w, s, g| {
            s[0] += g * g;
            w - lr * g / (s[0].sqrt() + eps)
        });
        // By hand, one coordinate: grads 3 then 4 from w = 0, eps tiny.
        let a = Adagrad {
            lr: 1.0,
            eps: 1e-12,
        };
        let (mut w, mut n) = ([0.0f64], [0.0f64]);
        a.apply(&mut w, &mut n, &[3.0]);
        assert!((w[0] + 1.0).abs() < 1e-9 && n[0] == 9.0, "{w:?} {n:?}");
        a.apply(&mut w, &mut n, &[4.0]);
        assert!((w[0] + 1.8).abs() < 1e-9 && n[0] == 25.0, "{w:?} {n:?}");
        // A zero gradient on a fresh key leaves it finite (eps > 0).
        let (mut w, mut n) = ([0.0f32], [0.0f32]);
        Adagrad::default().apply(&mut w, &mut n, &[0.0]);
        assert_eq!((w, n), ([0.0], [0.0]));
    }

    /// FTRL-proximal as McMahan et al. 2013 (Algorithm 1) write it: the weight is
    /// recomputed from (z, n) before each gradient; here the rule stores it after.
    fn ftrl_reference(
        alpha: f64,
        beta: f64,
        l1: f64,
        l2: f64,
    ) -> impl Fn(f64, &mut [f64], f64) -> f64 {
        move |_w, s, g| {
            let weight = |z: f64, n: f64| {
                if z.abs() <= l1 {
                    0.0
                } else {
                    -(z - z.signum() * l1) / ((beta + n.sqrt()) / alpha + l2)
                }
            };
            let (z, n) = (s[0], s[1]);
            let w = weight(z, n);
            let sigma = ((n + g * g).sqrt() - n.sqrt()) / alpha;
            s[0] = z + g - sigma * w;
            s[1] = n + g * g;
            weight(s[0], s[1])
        }
    }

    #[test]
    fn ftrl_matches_the_papers_algorithm() {
        for (alpha, beta, l1, l2) in [
            (0.1, 1.0, 0.0, 0.0),
            (0.5, 1.0, 0.3, 0.1),
            (1.0, 0.0, 1.0, 2.0),
            (0.2, 0.5, 2.5, 0.0),
        ] {
            let rule = Ftrl {
                alpha,
                beta,
                l1,
                l2,
            };
            // The store starts a weight at 0 with zero state, as the reference assumes.
            check_both(rule, [0.0; 4], &ftrl_reference(alpha, beta, l1, l2));
        }
        // By hand: alpha 1, beta 1, l1 0.5, l2 0; g = 2 from zero state. sigma = 2,
        // z = 2, n = 4; w = -(2 - 0.5) / ((1 + 2) / 1) = -0.5.
        let f = Ftrl {
            alpha: 1.0,
            beta: 1.0,
            l1: 0.5,
            l2: 0.0,
        };
        let (mut w, mut s) = ([0.0f64], [0.0f64; 2]);
        f.apply(&mut w, &mut s, &[2.0]);
        assert_eq!((w, s), ([-0.5], [2.0, 4.0]));
    }

    #[test]
    fn ftrl_with_large_l1_gives_exact_zeros_and_keeps_strong_weights() {
        fn run<T: Value>() {
            let f = Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 5.0,
                l2: 0.0,
            };
            // Weights 0..8 see small gradients of changing sign; weight 8 a strong,
            // consistent one.
            let n = 9;
            let mut w = vec![T::from_f64(0.0); n];
            let mut s = vec![T::default(); 2 * n];
            for step in 0..50 {
                let g: Vec<T> = (0..n)
                    .map(|i| {
                        if i == n - 1 {
                            T::from_f64(1.0)
                        } else {
                            let sign = if (step + i) % 2 == 0 { 1.0 } else { -1.0 };
                            T::from_f64(sign * 0.05 * (1 + i) as f64)
                        }
                    })
                    .collect();
                f.apply(&mut w, &mut s, &g);
            }
            for (i, x) in w[..n - 1].iter().enumerate() {
                // Exactly +0.0: not tiny, not -0.0.
                assert_eq!(
                    bytemuck::bytes_of(x),
                    bytemuck::bytes_of(&T::default()),
                    "weight {i} is {x:?}, not exactly zero"
                );
            }
            let strong = w[n - 1].to_f64();
            assert!(
                strong < -0.1,
                "strong weight {strong} should be clearly negative"
            );
            // Its z went past l1, the others' did not.
            assert!(s[2 * (n - 1)].to_f64() > 5.0);
            assert!(s[..2 * (n - 1)]
                .chunks(2)
                .all(|zn| zn[0].to_f64().abs() <= 5.0));
        }
        run::<f32>();
        run::<f64>();
    }

    #[test]
    fn specs_build_their_rule() {
        let specs = [
            UpdateSpec::Assign,
            UpdateSpec::Sum,
            UpdateSpec::Sgd { lr: 0.25 },
            UpdateSpec::Adagrad { lr: 0.5, eps: 1e-6 },
            UpdateSpec::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 2.0,
                l2: 0.5,
            },
        ];
        for spec in specs {
            let f32_rule = spec.build::<f32>();
            let f64_rule = spec.build::<f64>();
            assert_eq!(f32_rule.spec(), Some(spec));
            assert_eq!(f64_rule.spec(), Some(spec));
            assert_eq!(f32_rule.name(), spec.name());
            assert_eq!(f32_rule.state_len(), spec.state_len());
            assert_eq!(f64_rule.state_len(), spec.state_len());
        }
        assert_eq!(UpdateSpec::default(), UpdateSpec::Sum);
    }

    #[test]
    fn spec_text_round_trips() {
        let specs = [
            UpdateSpec::Assign,
            UpdateSpec::Sum,
            UpdateSpec::Sgd { lr: 0.05 },
            UpdateSpec::Sgd { lr: 4.0 },
            UpdateSpec::Adagrad { lr: 0.1, eps: 1e-6 },
            UpdateSpec::Adagrad {
                lr: 1.0 / 3.0,
                eps: 1e-8,
            },
            UpdateSpec::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 2.0,
                l2: 0.5,
            },
            UpdateSpec::Ftrl {
                alpha: 0.7,
                beta: 0.0,
                l1: 0.0,
                l2: 1e-5,
            },
        ];
        for spec in specs {
            let text = spec.to_string();
            assert_eq!(text.parse::<UpdateSpec>(), Ok(spec), "{text}");
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<UpdateSpec>(&json).unwrap(), spec);
            assert_eq!(spec.problem(), None);
        }
        // Defaults, case and spaces.
        let cases = [
            ("SUM", UpdateSpec::Sum),
            (" assign ", UpdateSpec::Assign),
            ("sgd", UpdateSpec::Sgd { lr: DEFAULT_SGD_LR }),
            ("Sgd : 0.5", UpdateSpec::Sgd { lr: 0.5 }),
            (
                "adagrad",
                UpdateSpec::Adagrad {
                    lr: DEFAULT_ADAGRAD_LR,
                    eps: DEFAULT_ADAGRAD_EPS,
                },
            ),
            (
                "adagrad:0.3",
                UpdateSpec::Adagrad {
                    lr: 0.3,
                    eps: DEFAULT_ADAGRAD_EPS,
                },
            ),
            (
                "ftrl",
                UpdateSpec::Ftrl {
                    alpha: DEFAULT_FTRL_ALPHA,
                    beta: DEFAULT_FTRL_BETA,
                    l1: DEFAULT_FTRL_L1,
                    l2: DEFAULT_FTRL_L2,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<UpdateSpec>(), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let cases = [
            ("", "no rule named"),
            ("momentum", "unknown rule \"momentum\""),
            ("sgd:abc", "learning rate \"abc\" is not a number"),
            ("sgd:-1", "learning rate -1 must be a finite number above 0"),
            ("sgd:0", "must be a finite number above 0"),
            ("sgd:inf", "must be a finite number above 0"),
            ("sgd:NaN", "must be a finite number above 0"),
            ("sgd:0.1:2", "sgd takes 1 parameter, got 2"),
            ("sum:1", "sum takes 0 parameters, got 1"),
            ("adagrad:0.1:0", "epsilon 0 must be a finite number above 0"),
            ("adagrad:0.1:1e-8:3", "adagrad takes 2 parameters, got 3"),
            ("ftrl:0.1:1", "ftrl takes all four"),
            (
                "ftrl:0.1:1:-2:0",
                "l1 -2 must be a finite number, not negative",
            ),
            ("ftrl:0:1:0:0", "alpha 0 must be a finite number above 0"),
            ("ftrl:0.1:0:1:0", "ftrl needs beta or l2 above 0"),
        ];
        for (text, want) in cases {
            let e = text.parse::<UpdateSpec>().unwrap_err();
            assert_eq!(e.text, text);
            let msg = e.to_string();
            assert!(msg.contains(want), "{text:?}: {msg}");
            // The message names the text and lists what would have been accepted.
            assert!(msg.contains(&format!("{text:?}")), "{msg}");
            assert!(msg.contains("expected assign, sum, sgd"), "{msg}");
        }
        // Specs built in code get the same checks.
        assert!(UpdateSpec::Sgd { lr: -0.5 }
            .problem()
            .is_some_and(|p| p.contains("learning rate")));
        assert!(UpdateSpec::Ftrl {
            alpha: 0.1,
            beta: 0.0,
            l1: 0.0,
            l2: 0.0
        }
        .problem()
        .is_some());
    }

    #[test]
    fn registry_ids() {
        let mut reg = UpdateRegistry::<f32>::new(UpdateSpec::Sgd { lr: 0.5 }.build());
        // Built-ins at their ids; the parameterised ones take the default's parameters
        // when it is of their kind, their own defaults otherwise.
        assert_eq!(
            reg.get(ID_DEFAULT).unwrap().spec(),
            Some(UpdateSpec::Sgd { lr: 0.5 })
        );
        assert_eq!(reg.get(ID_ASSIGN).unwrap().spec(), Some(UpdateSpec::Assign));
        assert_eq!(reg.get(ID_SUM).unwrap().spec(), Some(UpdateSpec::Sum));
        assert_eq!(
            reg.get(ID_SGD).unwrap().spec(),
            Some(UpdateSpec::Sgd { lr: 0.5 })
        );
        assert_eq!(
            reg.get(ID_ADAGRAD).unwrap().spec(),
            UpdateFn::<f32>::spec(&Adagrad::default())
        );
        assert_eq!(
            reg.get(ID_FTRL).unwrap().spec(),
            UpdateFn::<f32>::spec(&Ftrl::default())
        );
        for (name, id) in [
            ("default", ID_DEFAULT),
            ("assign", ID_ASSIGN),
            ("sum", ID_SUM),
            ("sgd", ID_SGD),
            ("adagrad", ID_ADAGRAD),
            ("ftrl", ID_FTRL),
        ] {
            assert_eq!(reg.id_of(name), Some(id));
        }
        // Unknown ids: unused reserved ones, the first user id before any registration,
        // and far beyond.
        for id in [6, 15, ID_FIRST_USER, 999, u16::MAX] {
            assert!(reg.get(id).is_none(), "id {id}");
        }
        assert_eq!(reg.id_of("momentum"), None);
        // User rules from ID_FIRST_USER up, in registration order.
        let a = reg.register(
            "double",
            from_fn("double", 0, |w: &mut [f32], _: &mut [f32], g: &[f32]| {
                for (w, &g) in w.iter_mut().zip(g) {
                    *w += 2.0 * g;
                }
            }),
        );
        let b = reg.register_fn("neg", 0, |w: &mut [f32], _: &mut [f32], g: &[f32]| {
            for (w, &g) in w.iter_mut().zip(g) {
                *w = -g;
            }
        });
        assert_eq!((a, b), (ID_FIRST_USER, ID_FIRST_USER + 1));
        assert_eq!(reg.id_of("neg"), Some(b));
        let mut w = [1.0f32];
        reg.get(a).unwrap().apply(&mut w, &mut [], &[3.0]);
        assert_eq!(w, [7.0]);
        // Registering a name again replaces the rule and keeps its id.
        let a2 = reg.register_fn("double", 0, |w: &mut [f32], _: &mut [f32], g: &[f32]| {
            for (w, &g) in w.iter_mut().zip(g) {
                *w *= g;
            }
        });
        assert_eq!(a2, a);
        reg.get(a).unwrap().apply(&mut w, &mut [], &[3.0]);
        assert_eq!(w, [21.0]);
        assert_eq!(
            reg.register_fn("third", 0, |_: &mut [f32], _: &mut [f32], _: &[f32]| {}),
            ID_FIRST_USER + 2
        );
        let dbg = format!("{reg:?}");
        assert!(
            dbg.contains("\"double\"") && dbg.contains("\"sgd\""),
            "{dbg}"
        );
    }

    #[test]
    #[should_panic(expected = "reserved for a built-in")]
    fn registering_a_built_in_name_panics() {
        let mut reg = UpdateRegistry::<f64>::new(Arc::new(Sum));
        reg.register_fn("sum", 0, |_: &mut [f64], _: &mut [f64], _: &[f64]| {});
    }

    #[test]
    fn closures_capture_and_keep_state() {
        // A rule that counts its calls (captured) and keeps a per-weight push count
        // (state), keeping the largest value pushed.
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let rule = from_fn::<f64, _>("max-count", 1, move |w, s, g| {
            seen.fetch_add(1, Ordering::Relaxed);
            for ((w, s), &g) in w.iter_mut().zip(s.iter_mut()).zip(g) {
                *w = w.max(g);
                *s += 1.0;
            }
        });
        assert_eq!(
            (rule.name(), rule.state_len(), rule.spec()),
            ("max-count", 1, None)
        );
        let (mut w, mut s) = ([0.0f64, 10.0], [0.0f64; 2]);
        for g in [[1.0, 2.0], [-1.0, 12.0], [5.0, 3.0]] {
            rule.apply(&mut w, &mut s, &g);
        }
        assert_eq!((w, s), ([5.0, 12.0], [3.0, 3.0]));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        // As a registry's default rule it is served at id 0; no built-in takes its
        // parameters from it.
        let reg = UpdateRegistry::new(rule);
        assert_eq!(reg.default_fn().name(), "max-count");
        assert_eq!(
            reg.get(ID_SGD).unwrap().spec(),
            Some(UpdateSpec::Sgd { lr: DEFAULT_SGD_LR })
        );
    }
}
