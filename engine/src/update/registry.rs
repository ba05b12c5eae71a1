//! [`UpdateRegistry`]: the function ids messages carry, mapped to rules.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::base::value::Value;

use super::{from_fn, Adagrad, Assign, Ftrl, Sgd, Sum, UpdateFn, UpdateSpec, DEFAULT_SGD_LR};

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
}
