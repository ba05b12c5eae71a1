//! [`Assign`]: `w = g`.

use crate::base::value::Value;

use super::{UpdateFn, UpdateSpec};

/// `w = g`: overwrite the weights with the pushed values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Assign;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::check::{check_both, W0};

    #[test]
    fn assign_overwrites() {
        check_both(Assign, W0, &|_, _, g| g);
        assert_eq!(UpdateFn::<f32>::state_len(&Assign), 0);
    }
}
