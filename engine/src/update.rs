//! Server-side update functions (MISSION.md P4): the rule that folds a worker's push into
//! the stored weights runs on the server, where the data lives.
//!
//! - [`UpdateFn`]: the trait a rule implements; it works on whole slices so that the
//!   built-ins vectorise and a dense range costs one call.
//! - Built-ins: [`Assign`] (`w = g`), [`Sum`] (`w += g`), [`Sgd`] (`w -= lr * g`).
//! - [`UpdateSpec`]: a built-in as configuration (`"assign"`, `"sum"`, `"sgd"`,
//!   `"sgd:0.1"`), serialisable, for the command line and the cluster table.
//! - [`UpdateRegistry`]: the function id carried in a message header mapped to a rule.
//!
//! Optimizer state (AdaGrad's accumulator, FTRL's z and n) lives beside the weights in the
//! store; a rule says how many state elements it keeps per weight element with
//! [`UpdateFn::state_len`], and state element `j` of weight `i` is `state[i * state_len + j]`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::value::Value;

/// A server-side update rule (MISSION.md P4). Runs where the data lives.
///
/// The store calls [`apply`](Self::apply) with the weights of one key, or of a whole dense
/// run of keys, at a time, under the lock of the shard that holds them; it must not block.
pub trait UpdateFn<T: Value>: Send + Sync + 'static {
    /// A short name, for logs and error messages.
    fn name(&self) -> &str;

    /// Extra state elements kept per value element (0 for sum/assign/sgd; AdaGrad will use
    /// 1, FTRL 2).
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

/// The learning rate of `"sgd"` when the text names none.
pub const DEFAULT_SGD_LR: f64 = 0.1;

/// A built-in update rule as configuration: what the servers' default update is set to on
/// the command line and carried in the cluster table.
///
/// Text forms ([`FromStr`] and [`Display`](fmt::Display) round-trip): `assign`, `sum`,
/// `sgd` (learning rate [`DEFAULT_SGD_LR`]) and `sgd:LR`, for example `sgd:0.05`.
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
}

impl UpdateSpec {
    /// Make the rule.
    pub fn build<T: Value>(&self) -> Arc<dyn UpdateFn<T>> {
        match *self {
            UpdateSpec::Assign => Arc::new(Assign),
            UpdateSpec::Sum => Arc::new(Sum),
            UpdateSpec::Sgd { lr } => Arc::new(Sgd { lr }),
        }
    }
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
        }
    }
}

/// A text that names no built-in update rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown update rule {text:?}: expected assign, sum, sgd or sgd:LEARNING_RATE (a finite positive number)")]
pub struct ParseUpdateSpecError {
    /// The text given.
    pub text: String,
}

impl FromStr for UpdateSpec {
    type Err = ParseUpdateSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseUpdateSpecError { text: s.to_owned() };
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "assign" => return Ok(UpdateSpec::Assign),
            "sum" => return Ok(UpdateSpec::Sum),
            "sgd" => return Ok(UpdateSpec::Sgd { lr: DEFAULT_SGD_LR }),
            _ => {}
        }
        let (head, lr) = t.split_once(':').ok_or_else(err)?;
        if !head.trim().eq_ignore_ascii_case("sgd") {
            return Err(err());
        }
        let lr: f64 = lr.trim().parse().map_err(|_| err())?;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(err());
        }
        Ok(UpdateSpec::Sgd { lr })
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
/// The first id [`UpdateRegistry::register`] hands out; ids below are reserved.
pub const ID_FIRST_USER: u16 = 16;

/// The update rules a server knows, by the `u16` function id that messages carry.
///
/// Ids `0..16` are reserved: [`ID_DEFAULT`] (the rule given at construction),
/// [`ID_ASSIGN`], [`ID_SUM`], [`ID_SGD`]. User rules get ids from [`ID_FIRST_USER`] up, in
/// registration order, so servers that register the same rules in the same order agree on
/// the ids.
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
    /// A registry with the built-ins and `default` as id 0.
    pub fn new(default: Arc<dyn UpdateFn<T>>) -> Self {
        let lr = match default.spec() {
            Some(UpdateSpec::Sgd { lr }) => lr,
            _ => DEFAULT_SGD_LR,
        };
        let mut fns: Vec<Option<Arc<dyn UpdateFn<T>>>> = vec![None; ID_FIRST_USER as usize];
        fns[ID_DEFAULT as usize] = Some(default);
        fns[ID_ASSIGN as usize] = Some(Arc::new(Assign));
        fns[ID_SUM as usize] = Some(Arc::new(Sum));
        fns[ID_SGD as usize] = Some(Arc::new(Sgd { lr }));
        let names = [
            ("default", ID_DEFAULT),
            ("assign", ID_ASSIGN),
            ("sum", ID_SUM),
            ("sgd", ID_SGD),
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
    /// If `name` is a built-in's (`default`, `assign`, `sum`, `sgd`), or all `u16` ids are
    /// taken: both caller bugs.
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

    fn check<T: Value>(f: &dyn UpdateFn<T>, w: &[f64], g: &[f64], want: &[f64]) {
        let mut wt: Vec<T> = w.iter().map(|&x| T::from_f64(x)).collect();
        let gt: Vec<T> = g.iter().map(|&x| T::from_f64(x)).collect();
        let mut state: Vec<T> = vec![T::default(); w.len() * f.state_len()];
        f.apply(&mut wt, &mut state, &gt);
        for (i, (&got, &want)) in wt.iter().zip(want).enumerate() {
            let got = got.to_f64();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{} element {i}: got {got}, want {want}",
                f.name()
            );
        }
    }

    fn builtins<T: Value>() {
        // Long enough to go through the vectorised body and the scalar tail.
        let w: Vec<f64> = (0..37).map(|i| i as f64 * 0.5 - 3.0).collect();
        let g: Vec<f64> = (0..37).map(|i| (i as f64 * 1.25).sin()).collect();
        check::<T>(&Assign, &w, &g, &g);
        let sum: Vec<f64> = w.iter().zip(&g).map(|(a, b)| a + b).collect();
        check::<T>(&Sum, &w, &g, &sum);
        let sgd: Vec<f64> = w.iter().zip(&g).map(|(a, b)| a - 0.25 * b).collect();
        check::<T>(&Sgd { lr: 0.25 }, &w, &g, &sgd);
        check::<T>(&Sum, &[], &[], &[]);
        check::<T>(&Sum, &[1.0], &[2.0], &[3.0]);
    }

    #[test]
    fn builtins_match_direct_computation() {
        builtins::<f32>();
        builtins::<f64>();
    }

    #[test]
    fn spec_parses_prints_and_builds() {
        let cases = [
            ("assign", UpdateSpec::Assign),
            ("sum", UpdateSpec::Sum),
            ("SUM", UpdateSpec::Sum),
            ("sgd", UpdateSpec::Sgd { lr: DEFAULT_SGD_LR }),
            ("sgd:0.05", UpdateSpec::Sgd { lr: 0.05 }),
            (" sgd : 1e-3 ", UpdateSpec::Sgd { lr: 1e-3 }),
        ];
        for (text, want) in cases {
            let got: UpdateSpec = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<UpdateSpec>().unwrap(), want);
            assert_eq!(got.build::<f32>().spec(), Some(want));
            assert_eq!(got.build::<f64>().spec(), Some(want));
        }
        for bad in [
            "", "sgdx", "sum:1", "sgd:", "sgd:abc", "sgd:-1", "sgd:0", "sgd:inf", "adagrad",
        ] {
            let err = bad.parse::<UpdateSpec>().unwrap_err();
            assert_eq!(err.text, bad);
            assert!(err.to_string().contains("expected assign"));
        }
        let json = serde_json::to_string(&UpdateSpec::Sgd { lr: 0.5 }).unwrap();
        assert_eq!(
            serde_json::from_str::<UpdateSpec>(&json).unwrap(),
            UpdateSpec::Sgd { lr: 0.5 }
        );
    }

    struct Double;
    impl UpdateFn<f32> for Double {
        fn name(&self) -> &str {
            "double"
        }
        fn apply(&self, weights: &mut [f32], _state: &mut [f32], grads: &[f32]) {
            for (w, g) in weights.iter_mut().zip(grads) {
                *w += 2.0 * g;
            }
        }
    }

    #[test]
    fn registry_lookups() {
        let mut r = UpdateRegistry::<f32>::new(UpdateSpec::Sgd { lr: 0.5 }.build());
        assert_eq!(
            r.get(ID_DEFAULT).unwrap().spec(),
            Some(UpdateSpec::Sgd { lr: 0.5 })
        );
        assert_eq!(r.default_fn().name(), "sgd");
        assert_eq!(r.get(ID_ASSIGN).unwrap().name(), "assign");
        assert_eq!(r.get(ID_SUM).unwrap().name(), "sum");
        // The SGD id follows the configured learning rate.
        assert_eq!(
            r.get(ID_SGD).unwrap().spec(),
            Some(UpdateSpec::Sgd { lr: 0.5 })
        );
        assert_eq!(r.id_of("sum"), Some(ID_SUM));
        assert_eq!(r.id_of("default"), Some(ID_DEFAULT));
        for unknown in [4, 15, 16, 17, u16::MAX] {
            assert!(r.get(unknown).is_none(), "id {unknown}");
        }
        assert_eq!(r.id_of("double"), None);

        let id = r.register("double", Arc::new(Double));
        assert_eq!(id, ID_FIRST_USER);
        assert_eq!(r.id_of("double"), Some(id));
        let f = r.get(id).unwrap();
        assert_eq!(f.name(), "double");
        assert!(f.spec().is_none());
        let mut w = [1.0f32];
        f.apply(&mut w, &mut [], &[3.0]);
        assert_eq!(w, [7.0]);
        assert_eq!(r.register("triple", Arc::new(Sum)), ID_FIRST_USER + 1);
        // Registering again keeps the id.
        assert_eq!(r.register("double", Arc::new(Assign)), ID_FIRST_USER);
        assert_eq!(r.get(ID_FIRST_USER).unwrap().name(), "assign");
        assert!(r.get(ID_FIRST_USER + 2).is_none());

        let plain = UpdateRegistry::<f64>::new(Arc::new(Sum));
        assert_eq!(
            plain.get(ID_SGD).unwrap().spec(),
            Some(UpdateSpec::Sgd { lr: DEFAULT_SGD_LR })
        );
    }

    #[test]
    #[should_panic(expected = "reserved")]
    fn registering_a_builtin_name_panics() {
        let mut r = UpdateRegistry::<f32>::new(Arc::new(Sum));
        r.register("sum", Arc::new(Assign));
    }
}
