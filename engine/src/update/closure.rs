//! User rules from closures: [`from_fn`].

use std::sync::Arc;

use crate::base::value::Value;

use super::UpdateFn;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{UpdateRegistry, UpdateSpec, DEFAULT_SGD_LR, ID_SGD};
    use std::sync::atomic::{AtomicUsize, Ordering};

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
