//! [`Ftrl`]: FTRL-proximal with L1 and L2.

use crate::base::value::Value;

use super::{
    UpdateFn, UpdateSpec, DEFAULT_FTRL_ALPHA, DEFAULT_FTRL_BETA, DEFAULT_FTRL_L1, DEFAULT_FTRL_L2,
};

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
/// weights are exactly `0.0` (sparse models, and the KKT filter's zeros).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::check::check_both;

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
}
