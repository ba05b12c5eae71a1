//! Each filter against a direct computation.

use proptest::prelude::*;

use super::*;

fn e(keys: &[Key], values: &[f64], value_len: usize) -> Entries<f64> {
    Entries::new(keys.to_vec(), values.to_vec(), value_len)
}

#[test]
fn significant_sends_only_large_changes_and_keeps_the_rest() {
    let mut f = Significant::<f64>::new(Threshold::Absolute(1.0));
    // Key 1 changes by 0.5 (held), key 2 by 2 (sent), key 3 by -1.5 (sent).
    let out = f.push(e(&[1, 2, 3], &[0.5, 2.0, -1.5], 1));
    assert_eq!(out, e(&[2, 3], &[2.0, -1.5], 1));
    assert_eq!(f.residual(1), Some(&[0.5][..]));
    assert_eq!(f.residual(2), None);
    // Key 1 again: 0.5 + 0.75 = 1.25 > 1: sent whole, residual cleared.
    let out = f.push(e(&[1], &[0.75], 1));
    assert_eq!(out, e(&[1], &[1.25], 1));
    assert_eq!(f.residual(1), None);
    assert_eq!(
        f.stats(),
        FilterStats {
            offered: 4,
            sent: 3
        }
    );
}

#[test]
fn significant_relative_uses_the_pulled_weights() {
    let mut f = Significant::<f64>::new(Threshold::Relative(0.1));
    f.pulled(&e(&[1, 2], &[10.0, 100.0], 1));
    // 0.5 of 10 is 5% (held); 20 of 100 is 20% (sent); key 3 was never pulled (sent).
    let out = f.push(e(&[1, 2, 3], &[0.5, 20.0, 0.001], 1));
    assert_eq!(out, e(&[2, 3], &[20.0, 0.001], 1));
    // 0.5 + 0.6 = 1.1 of 10: 11%, sent.
    assert_eq!(f.push(e(&[1], &[0.6], 1)).keys, vec![1]);
}

#[test]
fn significant_judges_a_key_by_any_of_its_values() {
    let mut f = Significant::<f64>::new(Threshold::Absolute(1.0));
    let out = f.push(e(&[7, 8], &[0.1, -3.0, 0.2, 0.3], 2));
    assert_eq!(out, e(&[7], &[0.1, -3.0], 2));
    assert_eq!(f.residual(8), Some(&[0.2, 0.3][..]));
    assert_eq!(f.drain(2), e(&[8], &[0.2, 0.3], 2));
    assert_eq!(f.drain(2), Entries::empty(2));
}

proptest! {
    /// What was sent plus what is held equals what was pushed, exactly (values are
    /// multiples of 1/8 of small size, so every sum is exact in f64).
    #[test]
    fn significant_loses_nothing(
        pushes in proptest::collection::vec(
            proptest::collection::btree_map(0u64..20, -64i32..64, 0..10), 1..30),
        t in 0u32..40,
    ) {
        let mut f = Significant::<f64>::new(Threshold::Absolute(f64::from(t) / 8.0));
        let mut pushed: BTreeMap<Key, f64> = BTreeMap::new();
        let mut sent: BTreeMap<Key, f64> = BTreeMap::new();
        for p in &pushes {
            let keys: Vec<Key> = p.keys().copied().collect();
            let vals: Vec<f64> = p.values().map(|&v| f64::from(v) / 8.0).collect();
            for (k, v) in keys.iter().zip(&vals) {
                *pushed.entry(*k).or_default() += v;
            }
            let out = f.push(Entries::new(keys, vals, 1));
            prop_assert!(out.is_valid());
            for (k, v) in out.iter() {
                prop_assert!(v[0].abs() > f64::from(t) / 8.0);
                *sent.entry(k).or_default() += v[0];
            }
        }
        for (k, v) in f.drain(1).iter() {
            *sent.entry(k).or_default() += v[0];
        }
        for (k, v) in &pushed {
            prop_assert_eq!(sent.get(k).copied().unwrap_or(0.0), *v, "key {}", k);
        }
        for (k, v) in &sent {
            prop_assert_eq!(pushed.get(k).copied().unwrap_or(0.0), *v, "key {}", k);
        }
    }
}

#[test]
fn kkt_skips_small_gradients_of_zero_weights_only() {
    let mut f = Kkt::<f64>::new(0.5);
    f.pulled(&e(&[1, 2, 3], &[0.0, 0.3, 0.0], 1));
    // Key 1: weight 0, |g| 0.4 <= 0.5: skipped. Key 2: weight not 0: sent. Key 3: weight
    // 0 but |g| 0.7 > 0.5: sent. Key 4: never pulled: sent.
    let out = f.push(e(&[1, 2, 3, 4], &[0.4, 0.1, -0.7, 0.01], 1));
    assert_eq!(out, e(&[2, 3, 4], &[0.1, -0.7, 0.01], 1));
    assert_eq!(
        f.stats(),
        FilterStats {
            offered: 4,
            sent: 3
        }
    );
    assert!((f.stats().skipped_fraction() - 0.25).abs() < 1e-12);
    assert_eq!(f.residual(1), Some(&[0.4][..]));
    // The weight of key 1 moved away from 0: its gradient goes again, with what was held.
    f.pulled(&e(&[1], &[0.2], 1));
    assert_eq!(f.push(e(&[1], &[0.4], 1)), e(&[1], &[0.8], 1));
    assert_eq!(f.residual(1), None);
}

#[test]
fn kkt_sends_small_gradients_once_they_add_up() {
    let mut f = Kkt::<f64>::with_share(1.0, 0.5);
    f.pulled(&e(&[3], &[0.0], 1));
    // Held while the sum stays within 0.5 (this worker's half of the strength).
    assert!(f.push(e(&[3], &[0.25], 1)).is_empty());
    assert!(f.push(e(&[3], &[0.25], 1)).is_empty());
    assert_eq!(f.push(e(&[3], &[0.125], 1)), e(&[3], &[0.625], 1));
    // Opposite signs cancel and stay held; the end of training sends them.
    assert!(f.push(e(&[3], &[0.25], 1)).is_empty());
    assert!(f.push(e(&[3], &[-0.125], 1)).is_empty());
    assert_eq!(f.drain(1), e(&[3], &[0.125], 1));
}

/// The filter against the proximal step itself: a skipped gradient is one whose L1
/// proximal SGD update leaves the weight at 0.
#[test]
fn kkt_skips_exactly_what_the_proximal_step_would_leave_at_zero() {
    let (lambda, lr) = (0.25, 1.0);
    let prox = |w: f64, g: f64| {
        let z = w - lr * g;
        z.signum() * (z.abs() - lr * lambda).max(0.0)
    };
    let mut f = Kkt::<f64>::new(lambda);
    let keys: Vec<Key> = (0..41).collect();
    // One step from weights at 0 (nothing held back yet).
    f.pulled(&Entries::new(keys.clone(), vec![0.0; 41], 1));
    let grads: Vec<f64> = (0..41).map(|i| (f64::from(i) - 20.0) / 40.0).collect();
    let out = f.push(Entries::new(keys.clone(), grads.clone(), 1));
    for (k, g) in keys.iter().zip(&grads) {
        let sent = out.keys.contains(k);
        assert_eq!(sent, prox(0.0, *g) != 0.0, "key {k} gradient {g}");
    }
}

#[test]
fn random_skip_is_seeded_and_unbiased() {
    let keys: Vec<Key> = (0..20_000).collect();
    let vals = vec![1.0f64; 20_000];
    let mut a = RandomSkip::<f64>::new(0.25, 7);
    let mut b = RandomSkip::<f64>::new(0.25, 7);
    let oa = a.push(Entries::new(keys.clone(), vals.clone(), 1));
    let ob = b.push(Entries::new(keys, vals, 1));
    assert_eq!(oa, ob, "one seed, one choice");
    assert!(oa.is_valid());
    // Every sent value is scaled by 4; the total is close to the pushed 20,000.
    assert!(oa.values.iter().all(|&v| v == 4.0));
    let total: f64 = oa.values.iter().sum();
    assert!((total - 20_000.0).abs() < 1_000.0, "{total}");
}

/// A user's filter, written outside the engine's filters: send only even keys.
struct EvenKeys {
    stats: FilterStats,
}

impl Filter<f64> for EvenKeys {
    fn name(&self) -> &str {
        "even-keys"
    }
    fn push(&mut self, entries: Entries<f64>) -> Entries<f64> {
        let mut out = Entries::empty(entries.value_len);
        for (k, v) in entries.iter() {
            self.stats.offered += 1;
            if k % 2 == 0 {
                self.stats.sent += 1;
                out.keys.push(k);
                out.values.extend_from_slice(v);
            }
        }
        out
    }
    fn stats(&self) -> FilterStats {
        self.stats
    }
}

#[test]
fn a_chain_runs_its_filters_in_order_and_drains_every_residual() {
    let mut chain = FilterChain::new()
        .with(EvenKeys {
            stats: FilterStats::default(),
        })
        .with(Significant::new(Threshold::Absolute(1.0)));
    let out = chain.apply(e(&[1, 2, 4, 6], &[5.0, 0.5, 2.0, -0.25], 1));
    // Key 1 dropped by the first filter; keys 2 and 6 held by the second.
    assert_eq!(out, e(&[4], &[2.0], 1));
    assert_eq!(chain.drain(1), e(&[2, 6], &[0.5, -0.25], 1));
    let stats = chain.stats();
    assert_eq!(stats[0].0, "even-keys");
    assert_eq!(
        stats[0].1,
        FilterStats {
            offered: 4,
            sent: 3
        }
    );
    assert_eq!(stats[1].0, "significant");
    assert_eq!(format!("{chain:?}"), "[\"even-keys\", \"significant\"]");
}

#[test]
fn bad_settings_are_refused() {
    assert!(
        std::panic::catch_unwind(|| Significant::<f64>::new(Threshold::Absolute(-1.0))).is_err()
    );
    assert!(std::panic::catch_unwind(|| Kkt::<f64>::new(f64::NAN)).is_err());
    assert!(std::panic::catch_unwind(|| RandomSkip::<f64>::new(0.0, 1)).is_err());
    assert!(std::panic::catch_unwind(|| Entries::<f64>::new(vec![1, 2], vec![1.0], 1)).is_err());
}

#[test]
fn answer_filters_match_a_direct_computation() {
    use super::{round_bf16, AnswerFilter, AnswerFilters, AnswerKeys, Bf16Round, ZeroBelow};
    // bf16: 8 significant bits, round to nearest even.
    assert_eq!(round_bf16(1.0), 1.0);
    assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0, "a tie rounds to even");
    assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    assert_eq!(round_bf16(-3.0), -3.0);
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    for x in [0.1f32, -7.77, 1e-20, 123_456.79] {
        let r = round_bf16(x);
        assert_eq!(r.to_bits() & 0xffff, 0);
        assert!(((r - x) / x).abs() <= 1.0 / 256.0, "{x} -> {r}");
    }
    let keys = AnswerKeys::List(&[1, 2]);
    let mut v = vec![0.1f64, -2.5, 1e-7, 3.0];
    Bf16Round.apply(keys, 2, &mut v);
    assert_eq!(v[1], -2.5);
    assert_eq!(v[0], f64::from(round_bf16(0.1)));
    let mut v = vec![0.1f32, -2e-7, 1e-7, -3.0];
    ZeroBelow(1e-6).apply(keys, 2, &mut v);
    assert_eq!(v, vec![0.1, 0.0, 0.0, -3.0]);
    // Ids: 0 changes nothing; unknown ids are refused with the reason.
    let reg = AnswerFilters::<f32>::default();
    let mut v = vec![0.1f32, 5e-7];
    reg.apply(0, keys, 1, &mut v).unwrap();
    assert_eq!(v, vec![0.1, 5e-7]);
    reg.apply(super::ANSWER_ZERO_SMALL, keys, 1, &mut v)
        .unwrap();
    assert_eq!(v, vec![0.1, 0.0]);
    let e = reg.apply(3, keys, 1, &mut v).unwrap_err();
    assert!(e.contains("no answer filter with id 3"), "{e}");
}

#[test]
fn quantize_sends_grid_values_and_keeps_the_rounding_error() {
    use super::Quantize;
    // 3 bits: 3 steps per sign; the push's largest magnitude is 3.0, so the step is 1.
    let mut q = Quantize::<f64>::new(3);
    let out = q.push(e(&[1, 2, 3, 4], &[3.0, 1.4, -0.4, 0.6], 1));
    // 0.6 -> 1 (residual -0.4), 1.4 -> 1 (0.4), -0.4 -> 0: held whole.
    assert_eq!(out, e(&[1, 2, 4], &[3.0, 1.0, 1.0], 1));
    assert!((q.residual(2).unwrap()[0] - 0.4).abs() < 1e-12);
    assert_eq!(q.residual(3), Some(&[-0.4][..]));
    assert!(q.residual(1).is_none(), "3.0 is on the grid: nothing held");
    // The next push adds what was held: key 3 now -0.4 - 0.4 = -0.8, this push's largest
    // magnitude, so it is on its grid and sent whole.
    let out = q.push(e(&[3], &[-0.4], 1));
    assert_eq!(out.keys, vec![3]);
    assert!((out.values[0] + 0.8).abs() < 1e-12);
    assert!(q.residual(3).is_none_or(|r| r[0].abs() < 1e-12));
    // Sent plus held equals pushed, key by key (up to the rounding of the sums).
    let mut sent = std::collections::BTreeMap::<u64, f64>::new();
    let mut pushed = std::collections::BTreeMap::<u64, f64>::new();
    let mut q = Quantize::<f64>::new(4);
    let mut rng = crate::lr::rng::SplitMix64::new(3);
    for _ in 0..200 {
        let keys: Vec<u64> = (0..20).filter(|_| rng.next_f64() < 0.5).collect();
        let vals: Vec<f64> = keys.iter().map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        for (k, v) in keys.iter().zip(&vals) {
            *pushed.entry(*k).or_default() += v;
        }
        let out = q.push(Entries::new(keys, vals, 1));
        for (k, v) in out.iter() {
            *sent.entry(k).or_default() += v[0];
        }
    }
    for (k, v) in q.drain(1).iter() {
        *sent.entry(k).or_default() += v[0];
    }
    for (k, p) in &pushed {
        assert!(
            (sent[k] - p).abs() < 1e-9,
            "key {k}: sent {} pushed {p}",
            sent[k]
        );
    }
    assert!(q.stats().sent < q.stats().offered);
}
