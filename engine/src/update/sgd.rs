//! [`Sgd`]: `w -= lr * g`.

use crate::base::value::Value;

use super::{UpdateFn, UpdateSpec};

/// Plain stochastic gradient descent: `w -= lr * g`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::check::{check_both, W0};

    #[test]
    fn sgd_steps_against_the_gradient() {
        check_both(Sgd { lr: 0.3 }, W0, &|w, _, g| w - 0.3 * g);
    }
}
