//! [`Sum`]: `w += g`.

use crate::base::value::Value;

use super::{UpdateFn, UpdateSpec};

/// `w += g`: add the pushed values (aggregate gradients, counters, sketches).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sum;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::check::{check_both, W0};

    #[test]
    fn sum_adds() {
        check_both(Sum, W0, &|w, _, g| w + g);
    }
}
