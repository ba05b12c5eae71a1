//! A deterministic generator of sparse classification data with a hidden linear model.
//!
//! Each example draws a number of feature ids from a power law (Zipf-like: the few
//! frequent ids appear in many rows, most ids are rare), hashes them to keys with
//! [`feature_key`], gives them the value `1/sqrt(n)` (unit-norm rows)
//! and adds a bias feature (id 0, value 1). Its label is Bernoulli(sigmoid(x . w*)) where
//! the true weight `w*_j` is a function of the feature id and the seed, so it is never
//! stored.
//!
//! Generation uses only the module's own RNG and exact float operations, so a seed gives
//! bit-identical data on every machine. Each row has its own random stream, derived from
//! the seed and the row number: a smaller `train_examples` gives a prefix of the same
//! training set, and the test rows do not depend on `train_examples`.

use serde::{Deserialize, Serialize};

use super::data::Dataset;
use super::rng::{approx_normal, det_exp, det_sigmoid, feature_key, mix64, SplitMix64};

/// The feature id of the bias feature present (with value 1) in every synthetic row.
pub const BIAS_FEATURE_ID: u64 = 0;

/// Parameters of [`Dataset::synthetic`]. The default is the main job's data set: 10^5
/// training and 2*10^4 test examples over about 1.47*10^6 distinct training keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    /// Fixes the data and the hidden model.
    pub seed: u64,
    /// Number of training examples.
    pub train_examples: usize,
    /// Number of held-out examples (drawn from the same distribution).
    pub test_examples: usize,
    /// Feature ids are drawn from `1..=features`.
    pub features: u64,
    /// Power-law exponent `s` of the id frequencies: the frequency of id `j` falls off like
    /// `j^-s` (in steps: ids in `[2^l, 2^(l+1))` are equally frequent).
    pub zipf_exponent: f64,
    /// Fewest feature draws per example (repeated draws of an id count once).
    pub nnz_min: u32,
    /// Most feature draws per example.
    pub nnz_max: u32,
    /// Standard deviation of the true weights of the most frequent ids.
    pub weight_scale: f64,
    /// Factor by which the standard deviation of the true weights shrinks from one
    /// frequency level `[2^l, 2^(l+1))` to the next, rarer one (1 = all ids alike).
    pub weight_decay: f64,
    /// True weight of the bias feature (negative: fewer positives).
    pub bias: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            seed: 1,
            train_examples: 100_000,
            test_examples: 20_000,
            features: 1 << 27,
            zipf_exponent: 1.0,
            nnz_min: 20,
            nnz_max: 60,
            weight_scale: 8.0,
            weight_decay: 0.9,
            bias: -0.5,
        }
    }
}

impl SyntheticSpec {
    /// A small configuration for tests: 5000 training and 1000 test examples over 20 000
    /// feature ids, otherwise the defaults.
    pub fn small(seed: u64) -> Self {
        SyntheticSpec {
            seed,
            train_examples: 5_000,
            test_examples: 1_000,
            features: 20_000,
            ..SyntheticSpec::default()
        }
    }

    /// The true weight of feature id `id` (the bias weight for [`BIAS_FEATURE_ID`]).
    pub fn true_weight(&self, id: u64) -> f64 {
        if id == BIAS_FEATURE_ID {
            return self.bias;
        }
        let level = 63 - id.leading_zeros();
        if level == 0 {
            // Id 1, the most frequent, alone on its level: no pair to balance it.
            return 0.0;
        }
        let mut sd = self.weight_scale;
        for _ in 0..level {
            sd *= self.weight_decay;
        }
        // Ids 2k and 2k + 1 (same level, same frequency) get opposite weights, so the
        // features' contributions to the margin average out and the class balance is set
        // by the bias alone.
        let magnitude = sd * approx_normal(mix64((id & !1) ^ mix64(self.seed ^ 0x7765_6967_6874))); // "weight"
        if id & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }
}

impl Dataset {
    /// Generates `(train, test)` as described by `spec` (see the [module](self) docs).
    ///
    /// # Panics
    /// If `spec.features == 0`, `spec.nnz_min > spec.nnz_max` or `zipf_exponent` is not
    /// finite.
    pub fn synthetic(spec: &SyntheticSpec) -> (Dataset, Dataset) {
        let generator = Generator::new(spec);
        let train = generator.rows(spec.train_examples, TRAIN_STREAM, None);
        let test = generator.rows(spec.test_examples, TEST_STREAM, None);
        (train, test)
    }

    /// The test set of `spec` with the true margin `x . w*` of each row: what the hidden
    /// model itself scores (the best any linear model can do), for diagnostics.
    pub fn synthetic_test_with_margins(spec: &SyntheticSpec) -> (Dataset, Vec<f64>) {
        let mut margins = Vec::with_capacity(spec.test_examples);
        let test = Generator::new(spec).rows(spec.test_examples, TEST_STREAM, Some(&mut margins));
        (test, margins)
    }
}

/// Salts of the row streams of the training and the test set.
const TRAIN_STREAM: u64 = 0x74_7261_696E; // "train"
const TEST_STREAM: u64 = 0x7465_7374; // "test"

/// The precomputed sampling tables of one spec.
struct Generator<'a> {
    spec: &'a SyntheticSpec,
    /// `thresholds[l]`: a uniform u64 below it (and not below `thresholds[l - 1]`) picks
    /// frequency level `l`; the last is `u64::MAX`.
    thresholds: Vec<u64>,
    /// `(first id, number of ids)` of each level.
    levels: Vec<(u64, u64)>,
}

impl<'a> Generator<'a> {
    fn new(spec: &'a SyntheticSpec) -> Self {
        assert!(
            spec.features >= 1,
            "synthetic data needs at least one feature id"
        );
        assert!(spec.nnz_min <= spec.nnz_max, "nnz_min > nnz_max");
        assert!(
            spec.zipf_exponent.is_finite(),
            "zipf_exponent must be finite"
        );
        let levels: Vec<(u64, u64)> = (0..=(63 - spec.features.leading_zeros()))
            .map(|l| {
                let first = 1u64 << l;
                let last = (first.saturating_mul(2) - 1).min(spec.features);
                (first, last - first + 1)
            })
            .collect();
        // Per-id frequency 2^(-s l) on level l, so the level's mass is size * ratio^l.
        let ratio = det_exp(-spec.zipf_exponent * std::f64::consts::LN_2);
        let mut mass = Vec::with_capacity(levels.len());
        let mut per_id = 1.0;
        for &(_, size) in &levels {
            mass.push(size as f64 * per_id);
            per_id *= ratio;
        }
        let total: f64 = mass.iter().sum();
        let mut cum = 0.0;
        let mut thresholds: Vec<u64> = mass
            .iter()
            .map(|m| {
                cum += m;
                // `as` saturates, so a sum that rounds above 1 still gives u64::MAX.
                (cum / total * 18_446_744_073_709_551_616.0) as u64
            })
            .collect();
        *thresholds.last_mut().expect("at least one level") = u64::MAX;
        Generator {
            spec,
            thresholds,
            levels,
        }
    }

    /// One feature id.
    #[inline]
    fn draw_id(&self, rng: &mut SplitMix64) -> u64 {
        let u = rng.next_u64();
        let level = self
            .thresholds
            .partition_point(|&t| t <= u)
            .min(self.levels.len() - 1);
        let (first, size) = self.levels[level];
        first + rng.below(size)
    }

    /// `count` rows, row `i` drawn from the stream `mix64(mix64(seed ^ salt) ^ i)`; the
    /// true margins go to `margins` if given.
    fn rows(&self, count: usize, salt: u64, mut margins: Option<&mut Vec<f64>>) -> Dataset {
        let spec = self.spec;
        let stream = mix64(spec.seed ^ salt);
        let mean_nnz = (spec.nnz_min as usize + spec.nnz_max as usize) / 2 + 1;
        let mut data = Dataset::with_capacity(count, count * mean_nnz);
        let mut ids: Vec<u64> = Vec::with_capacity(spec.nnz_max as usize + 1);
        let mut pairs: Vec<(u64, f32)> = Vec::with_capacity(spec.nnz_max as usize + 1);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for i in 0..count {
            let mut rng = SplitMix64::new(mix64(stream ^ i as u64));
            let draws = spec.nnz_min + rng.below(u64::from(spec.nnz_max - spec.nnz_min) + 1) as u32;
            ids.clear();
            ids.extend((0..draws).map(|_| self.draw_id(&mut rng)));
            ids.sort_unstable();
            ids.dedup();
            let value = if ids.is_empty() {
                0.0
            } else {
                (1.0 / (ids.len() as f64).sqrt()) as f32
            };
            let mut margin = spec.bias;
            pairs.clear();
            pairs.push((feature_key(BIAS_FEATURE_ID), 1.0));
            for &id in &ids {
                margin += spec.true_weight(id) * f64::from(value);
                pairs.push((feature_key(id), value));
            }
            if let Some(out) = margins.as_deref_mut() {
                out.push(margin);
            }
            let label = if rng.next_f64() < det_sigmoid(margin) {
                1.0
            } else {
                0.0
            };
            pairs.sort_unstable_by_key(|p| p.0);
            keys.clear();
            values.clear();
            keys.extend(pairs.iter().map(|p| p.0));
            values.extend(pairs.iter().map(|p| p.1));
            data.push_sorted_row(label, &keys, &values);
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fingerprint of every bit of a dataset.
    fn fingerprint(d: &Dataset) -> u64 {
        let mut h = 0u64;
        let mut eat = |x: u64| h = mix64(h ^ x).wrapping_add(x);
        for r in d.rows() {
            eat(u64::from(r.label.to_bits()));
            eat(r.keys.len() as u64);
            for (k, v) in r.keys.iter().zip(r.values) {
                eat(*k);
                eat(u64::from(v.to_bits()));
            }
        }
        h
    }

    fn tiny(seed: u64) -> SyntheticSpec {
        SyntheticSpec {
            train_examples: 300,
            test_examples: 100,
            features: 5_000,
            ..SyntheticSpec::small(seed)
        }
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let (a_train, a_test) = Dataset::synthetic(&tiny(3));
        let (b_train, b_test) = Dataset::synthetic(&tiny(3));
        assert_eq!(a_train, b_train);
        assert_eq!(a_test, b_test);
        let (c_train, c_test) = Dataset::synthetic(&tiny(4));
        assert_ne!(a_train, c_train);
        assert_ne!(a_test, c_test);
        assert_ne!(fingerprint(&a_train), fingerprint(&c_train));
    }

    #[test]
    fn data_is_pinned_across_machines() {
        // Only exact float operations and our own RNG go into the data, so this holds on
        // every platform. If the generator is changed on purpose, update the constant.
        let (train, test) = Dataset::synthetic(&tiny(1));
        assert_eq!(
            (fingerprint(&train), fingerprint(&test)),
            (6_150_155_769_977_373_982, 14_175_464_480_350_826_722),
            "the synthetic generator changed"
        );
    }

    #[test]
    fn prefix_property() {
        let (big, test_big) = Dataset::synthetic(&tiny(9));
        let spec = SyntheticSpec {
            train_examples: 120,
            ..tiny(9)
        };
        let (small, test_small) = Dataset::synthetic(&spec);
        assert_eq!(small, big.slice(0..120));
        assert_eq!(test_small, test_big);
    }

    #[test]
    fn rows_are_well_formed() {
        let spec = tiny(5);
        let (train, test) = Dataset::synthetic(&spec);
        assert_eq!((train.len(), test.len()), (300, 100));
        let bias_key = feature_key(BIAS_FEATURE_ID);
        for row in train.rows().chain(test.rows()) {
            assert!(row.keys.len() <= spec.nnz_max as usize + 1);
            assert!(row.keys.contains(&bias_key));
            let norm: f32 = row.values.iter().map(|v| v * v).sum();
            assert!((norm - 2.0).abs() < 1e-4, "{norm}");
        }
    }

    /// The scaled-down promises: many distinct keys, a power-law key frequency, a class
    /// balance that is not degenerate.
    #[test]
    fn small_spec_keeps_its_promises() {
        let spec = SyntheticSpec::small(11);
        let (train, test) = Dataset::synthetic(&spec);
        check_promises(&spec, &train, &test, 5_000);
    }

    /// The default spec: 10^5 examples, at least 10^6 distinct keys (about 1 s in the test
    /// profile).
    #[test]
    fn default_spec_keeps_its_promises() {
        let spec = SyntheticSpec::default();
        let (train, test) = Dataset::synthetic(&spec);
        check_promises(&spec, &train, &test, 1_000_000);
    }

    fn check_promises(spec: &SyntheticSpec, train: &Dataset, test: &Dataset, min_keys: usize) {
        assert_eq!(train.len(), spec.train_examples);
        assert_eq!(test.len(), spec.test_examples);
        let distinct = train.distinct_keys();
        assert!(distinct >= min_keys, "{distinct} distinct keys");
        for d in [train, test] {
            let majority = d.majority_rate();
            assert!((0.5..0.8).contains(&majority), "majority rate {majority}");
        }
        // Power law: the bias key is in every row, a few keys are in many rows and carry
        // much of the mass, many keys are in one row only.
        let mut keys = train.keys().to_vec();
        keys.sort_unstable();
        let mut counts: Vec<usize> = keys.chunk_by(|a, b| a == b).map(<[u64]>::len).collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(counts[0], train.len());
        assert!(counts[1] > train.len() / 2, "{}", counts[1]);
        let top: usize = counts[1..=counts.len() / 100].iter().sum();
        let rest: usize = counts[1..].iter().sum();
        assert!(
            top * 10 > rest * 4,
            "top 1% of keys hold {top} of {rest} nonzeros"
        );
        let singletons = counts.iter().filter(|&&c| c == 1).count();
        assert!(
            singletons * 5 > counts.len(),
            "{singletons} of {}",
            counts.len()
        );
    }
}
