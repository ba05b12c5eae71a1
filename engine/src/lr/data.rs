//! The training data: labelled sparse rows in compressed sparse row (CSR) form.

use std::ops::Range;

use crate::base::keys::{Key, KEY_END};

use super::rng::SplitMix64;
use super::LrError;

/// A set of labelled sparse examples, stored row by row (CSR).
///
/// Invariants (checked when rows are added):
/// - every label is `0.0` or `1.0`;
/// - the keys of each row are strictly increasing (sorted, no duplicates) and below
///   `u64::MAX`;
/// - every value is finite.
///
/// Rows may be empty. The order of rows is the order of training.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    labels: Vec<f32>,
    /// `offsets[i]..offsets[i + 1]` are the nonzeros of row `i`; `offsets[0] == 0`.
    offsets: Vec<usize>,
    keys: Vec<Key>,
    values: Vec<f32>,
}

/// One example: its label and its sorted nonzero features.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row<'a> {
    /// `0.0` or `1.0`.
    pub label: f32,
    /// Feature keys, strictly increasing.
    pub keys: &'a [Key],
    /// Feature values, aligned with `keys`.
    pub values: &'a [f32],
}

impl Default for Dataset {
    fn default() -> Self {
        Dataset::new()
    }
}

impl Dataset {
    /// An empty dataset.
    pub fn new() -> Self {
        Dataset::with_capacity(0, 0)
    }

    /// An empty dataset with room for `rows` rows and `nnz` nonzeros.
    pub fn with_capacity(rows: usize, nnz: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Dataset {
            labels: Vec::with_capacity(rows),
            offsets,
            keys: Vec::with_capacity(nnz),
            values: Vec::with_capacity(nnz),
        }
    }

    /// A dataset from raw CSR arrays: `offsets` has `labels.len() + 1` entries, starts at 0,
    /// never decreases and ends at `keys.len() == values.len()`.
    pub fn from_csr(
        labels: Vec<f32>,
        offsets: Vec<usize>,
        keys: Vec<Key>,
        values: Vec<f32>,
    ) -> Result<Self, LrError> {
        let bad = |msg: String| Err(LrError::InvalidDataset(msg));
        if offsets.len() != labels.len() + 1 || offsets[0] != 0 {
            return bad(format!(
                "{} offsets for {} rows (need rows + 1, starting at 0)",
                offsets.len(),
                labels.len()
            ));
        }
        if keys.len() != values.len() || offsets[labels.len()] != keys.len() {
            return bad(format!(
                "{} keys, {} values, last offset {}",
                keys.len(),
                values.len(),
                offsets[labels.len()]
            ));
        }
        for (i, label) in labels.iter().enumerate() {
            if *label != 0.0 && *label != 1.0 {
                return bad(format!("row {i}: label {label} is not 0 or 1"));
            }
            let (lo, hi) = (offsets[i], offsets[i + 1]);
            if lo > hi || hi > keys.len() {
                return bad(format!(
                    "row {i}: offsets {lo}..{hi} out of order or bounds"
                ));
            }
            if let Err(msg) = check_row(&keys[lo..hi], &values[lo..hi]) {
                return bad(format!("row {i}: {msg}"));
            }
        }
        Ok(Dataset {
            labels,
            offsets,
            keys,
            values,
        })
    }

    /// Appends a row whose keys are already strictly increasing.
    ///
    /// # Panics
    /// If the label is not 0 or 1, the lengths differ, the keys are not strictly increasing
    /// or include `u64::MAX`, or a value is not finite (caller bugs).
    pub fn push_sorted_row(&mut self, label: f32, keys: &[Key], values: &[f32]) {
        assert!(label == 0.0 || label == 1.0, "label {label} is not 0 or 1");
        if let Err(msg) = check_row(keys, values) {
            panic!("push_sorted_row: {msg}");
        }
        self.labels.push(label);
        self.keys.extend_from_slice(keys);
        self.values.extend_from_slice(values);
        self.offsets.push(self.keys.len());
    }

    /// Appends a row given as `(key, value)` pairs in any order; values of repeated keys
    /// are added up.
    ///
    /// # Panics
    /// As [`push_sorted_row`](Self::push_sorted_row), except that order and repeats are
    /// allowed.
    pub fn push_row(&mut self, label: f32, features: impl IntoIterator<Item = (Key, f32)>) {
        let mut pairs: Vec<(Key, f32)> = features.into_iter().collect();
        pairs.sort_unstable_by_key(|p| p.0);
        let mut keys = Vec::with_capacity(pairs.len());
        let mut values: Vec<f32> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            if keys.last() == Some(&key) {
                *values.last_mut().expect("values follow keys") += value;
            } else {
                keys.push(key);
                values.push(value);
            }
        }
        self.push_sorted_row(label, &keys, &values);
    }

    /// Number of rows (examples).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of stored nonzeros over all rows.
    pub fn nnz(&self) -> usize {
        self.keys.len()
    }

    /// Row `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn row(&self, i: usize) -> Row<'_> {
        let (lo, hi) = (self.offsets[i], self.offsets[i + 1]);
        Row {
            label: self.labels[i],
            keys: &self.keys[lo..hi],
            values: &self.values[lo..hi],
        }
    }

    /// All rows, in order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = Row<'_>> + '_ {
        (0..self.len()).map(move |i| self.row(i))
    }

    /// The labels, one per row.
    pub fn labels(&self) -> &[f32] {
        &self.labels
    }

    /// The CSR row offsets (`len() + 1` entries).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The keys of all nonzeros, row after row.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The values of all nonzeros, aligned with [`keys`](Self::keys).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The distinct keys occurring in the dataset, sorted: the key set of a full model.
    pub fn unique_keys(&self) -> Vec<Key> {
        let mut keys = self.keys.clone();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Number of distinct keys occurring in the dataset.
    pub fn distinct_keys(&self) -> usize {
        self.unique_keys().len()
    }

    /// Fraction of rows labelled 1 (0 for an empty dataset).
    pub fn positive_rate(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        let positives = self.labels.iter().filter(|&&y| y == 1.0).count();
        positives as f64 / self.len() as f64
    }

    /// Fraction of rows in the more frequent class: the accuracy of always predicting it
    /// (1 for an empty dataset).
    pub fn majority_rate(&self) -> f64 {
        if self.is_empty() {
            return 1.0;
        }
        let p = self.positive_rate();
        p.max(1.0 - p)
    }

    /// Mean log loss on this dataset of the constant prediction `P(y = 1) = p` (clamped to
    /// `[1e-7, 1 - 1e-7]`). With `p` the training set's positive rate this is the baseline a
    /// model must beat.
    pub fn prior_logloss(&self, p: f64) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        let p = p.clamp(1e-7, 1.0 - 1e-7);
        let q = self.positive_rate();
        -(q * p.ln() + (1.0 - q) * (1.0 - p).ln())
    }

    /// A copy of rows `range`.
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Dataset {
        assert!(range.start <= range.end && range.end <= self.len());
        let (lo, hi) = (self.offsets[range.start], self.offsets[range.end]);
        Dataset {
            labels: self.labels[range.clone()].to_vec(),
            offsets: self.offsets[range.start..=range.end]
                .iter()
                .map(|o| o - lo)
                .collect(),
            keys: self.keys[lo..hi].to_vec(),
            values: self.values[lo..hi].to_vec(),
        }
    }

    /// The rows of shard `i` out of `n`: contiguous, balanced (sizes differ by at most one),
    /// together covering the dataset in order.
    ///
    /// # Panics
    /// If `n == 0` or `i >= n`.
    pub fn shard(&self, i: usize, n: usize) -> Dataset {
        self.slice(Self::shard_range(self.len(), i, n))
    }

    /// The rows `[len * i / n, len * (i + 1) / n)` of shard `i` out of `n` over `len` rows.
    ///
    /// # Panics
    /// If `n == 0` or `i >= n`.
    pub fn shard_range(len: usize, i: usize, n: usize) -> Range<usize> {
        assert!(n > 0 && i < n, "shard {i} of {n}");
        let at = |j: usize| (len as u128 * j as u128 / n as u128) as usize;
        at(i)..at(i + 1)
    }

    /// Splits off `round(frac * len)` rows, chosen by a fixed pseudo-random permutation (the
    /// same on every run and machine), as a hold-out set: `(train, test)`, each keeping the
    /// original row order.
    ///
    /// # Panics
    /// If `frac` is not in `[0, 1]`.
    pub fn split_holdout(&self, frac: f64) -> (Dataset, Dataset) {
        assert!((0.0..=1.0).contains(&frac), "hold-out fraction {frac}");
        let n = self.len();
        let test_len = ((n as f64) * frac).round() as usize;
        let order = permutation(n, 0x68_6F6C_646F_7574); // "holdout"
        let mut is_test = vec![false; n];
        for &i in &order[..test_len] {
            is_test[i] = true;
        }
        let mut train = Dataset::with_capacity(n - test_len, 0);
        let mut test = Dataset::with_capacity(test_len, 0);
        for (i, row) in self.rows().enumerate() {
            let dst = if is_test[i] { &mut test } else { &mut train };
            dst.push_unchecked(row);
        }
        (train, test)
    }

    /// The rows in a pseudo-random order fixed by `seed` (for files sorted by label, which
    /// plain in-order SGD would handle badly).
    pub fn shuffled(&self, seed: u64) -> Dataset {
        let mut out = Dataset::with_capacity(self.len(), self.nnz());
        for i in permutation(self.len(), seed) {
            out.push_unchecked(self.row(i));
        }
        out
    }

    /// Appends a row taken from a valid dataset.
    fn push_unchecked(&mut self, row: Row<'_>) {
        self.labels.push(row.label);
        self.keys.extend_from_slice(row.keys);
        self.values.extend_from_slice(row.values);
        self.offsets.push(self.keys.len());
    }
}

/// Checks the per-row invariants.
fn check_row(keys: &[Key], values: &[f32]) -> Result<(), String> {
    if keys.len() != values.len() {
        return Err(format!("{} keys but {} values", keys.len(), values.len()));
    }
    if let Some(w) = keys.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!(
            "keys not strictly increasing ({:#x} then {:#x})",
            w[0], w[1]
        ));
    }
    if keys.last() == Some(&KEY_END) {
        return Err("key u64::MAX is not a valid key".into());
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(format!("value {v} is not finite"));
    }
    Ok(())
}

/// A permutation of `0..n` fixed by `seed` (Fisher-Yates with SplitMix64).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let mut d = Dataset::new();
        for i in 0..10u64 {
            d.push_row(
                (i % 3 == 0) as u8 as f32,
                [(i + 5, 1.0), (2, 0.5), (i + 5, 1.0)],
            );
        }
        d
    }

    #[test]
    fn push_row_sorts_and_merges() {
        let d = tiny();
        assert_eq!(d.len(), 10);
        assert_eq!(d.nnz(), 20);
        let r = d.row(3);
        assert_eq!(r.keys, &[2, 8]);
        assert_eq!(r.values, &[0.5, 2.0]);
        assert_eq!(r.label, 1.0);
        assert_eq!(d.distinct_keys(), 11);
        assert!((d.positive_rate() - 0.4).abs() < 1e-12);
        assert!((d.majority_rate() - 0.6).abs() < 1e-12);
    }

    #[test]
    fn shards_cover_in_order() {
        let d = tiny();
        for n in 1..=12 {
            let shards: Vec<Dataset> = (0..n).map(|i| d.shard(i, n)).collect();
            let sizes: Vec<usize> = shards.iter().map(Dataset::len).collect();
            assert_eq!(sizes.iter().sum::<usize>(), d.len());
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            let rows: Vec<Row<'_>> = shards.iter().flat_map(|s| s.rows()).collect();
            assert!(rows.iter().zip(d.rows()).all(|(a, b)| *a == b));
        }
    }

    #[test]
    fn holdout_is_deterministic_and_exact() {
        let d = tiny();
        let (a, b) = d.split_holdout(0.3);
        assert_eq!((a.len(), b.len()), (7, 3));
        assert_eq!(d.split_holdout(0.3), (a.clone(), b.clone()));
        assert_eq!(a.nnz() + b.nnz(), d.nnz());
        assert_eq!(d.split_holdout(0.0).1.len(), 0);
        assert_eq!(d.split_holdout(1.0).0.len(), 0);
        let s = d.shuffled(1);
        assert_eq!(s.len(), d.len());
        assert_eq!(s.unique_keys(), d.unique_keys());
    }

    #[test]
    fn from_csr_rejects_bad_arrays() {
        let ok = Dataset::from_csr(vec![1.0], vec![0, 2], vec![1, 2], vec![1.0, 1.0]);
        assert!(ok.is_ok());
        for (labels, offsets, keys, values) in [
            (vec![0.5], vec![0, 1], vec![1], vec![1.0]),
            (vec![1.0], vec![0, 2], vec![2, 1], vec![1.0, 1.0]),
            (vec![1.0], vec![0, 2], vec![2, 2], vec![1.0, 1.0]),
            (vec![1.0], vec![0, 1], vec![u64::MAX], vec![1.0]),
            (vec![1.0], vec![0, 1], vec![1], vec![f32::NAN]),
            (vec![1.0], vec![0, 1], vec![1, 2], vec![1.0, 1.0]),
            (vec![1.0], vec![1, 1], vec![1], vec![1.0]),
            (vec![1.0, 0.0], vec![0, 2, 1], vec![1, 2], vec![1.0, 1.0]),
            (vec![1.0, 0.0], vec![0, 5, 2], vec![1, 2], vec![1.0, 1.0]),
        ] {
            assert!(Dataset::from_csr(labels, offsets, keys, values).is_err());
        }
    }
}
