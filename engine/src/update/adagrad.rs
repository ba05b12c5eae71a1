//! [`Adagrad`]: per-coordinate learning rates from the squared-gradient sum.

use crate::base::value::Value;

use super::{UpdateFn, UpdateSpec, DEFAULT_ADAGRAD_EPS, DEFAULT_ADAGRAD_LR};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::check::{check_both, W0};

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
}
