//! Test helpers: drive a rule beside a reference written out per element in f64.

use crate::base::value::Value;

use super::UpdateFn;

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
pub(super) type Reference<'a> = dyn Fn(f64, &mut [f64], f64) -> f64 + 'a;

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
pub(super) fn check_both<R>(rule: R, w0: [f64; 4], reference: &Reference<'_>)
where
    R: UpdateFn<f32> + UpdateFn<f64>,
{
    check::<f32>(&rule, w0, reference, 1e-5);
    check::<f64>(&rule, w0, reference, 1e-12);
}

pub(super) const W0: [f64; 4] = [1.0, -2.0, 0.5, 0.0];
