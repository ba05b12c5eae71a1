//! Minibatches, the logistic-loss gradient, evaluation and the single-process SGD
//! reference.
//!
//! The objective of a minibatch `B` with touched keys `K` is
//! `F(w) = mean over i in B of logloss(y_i, x_i . w) + (l2 / 2) * sum over k in K of w_k^2`,
//! the usual sparse L2 (only the keys a batch touches are regularised, by that batch).
//! Weights start at zero, as on the servers.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::base::keys::Key;

use super::data::Dataset;

/// Hyper-parameters of minibatch SGD (`w -= lr * g` on the keys of each batch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f32,
    /// L2 regularisation strength on the keys a batch touches.
    pub l2: f32,
    /// Rows per minibatch (the last batch of a pass may be smaller).
    pub batch_size: usize,
    /// Passes over the training data.
    pub epochs: usize,
}

impl Default for SgdParams {
    /// The recommended settings for the default synthetic data set.
    fn default() -> Self {
        SgdParams {
            lr: 4.0,
            l2: 1e-5,
            batch_size: 100,
            epochs: 3,
        }
    }
}

/// Pairs with fewer elements than this are sorted by comparison in [`sort_spread`].
const SPREAD_MIN: usize = 64;

/// `pairs` sorted by key (the order of equal keys unspecified).
///
/// A minibatch's keys are hashed feature ids, spread over the key space: one pass puts
/// each pair in the bucket of its key's position between the smallest and the largest
/// key (at least as many buckets as pairs, so a bucket holds about one), and each bucket
/// is then sorted on its own (by insertion when small, by comparison otherwise, so
/// clustered keys cost what a comparison sort costs). About 3x faster than a comparison
/// sort of the pairs for the main job's minibatches, where building them was a tenth of
/// a worker's time.
fn sort_spread(mut pairs: Vec<(Key, u32)>) -> Vec<(Key, u32)> {
    let n = pairs.len();
    if n < SPREAD_MIN {
        pairs.sort_unstable_by_key(|p| p.0);
        return pairs;
    }
    let (lo, hi) = pairs.iter().fold((Key::MAX, Key::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let span = hi - lo;
    let bits = n.next_power_of_two().trailing_zeros();
    // (k - lo) <= span < 2^(64 - lz): shifted by `shift`, below 2^bits buckets.
    let shift = (Key::BITS - span.leading_zeros()).saturating_sub(bits);
    let bucket = |k: Key| ((k - lo) >> shift) as usize;
    let mut starts = vec![0u32; (1usize << bits) + 1];
    for p in &pairs {
        starts[bucket(p.0) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    let mut at = starts.clone();
    let mut out = vec![(0, 0); n];
    for &p in &pairs {
        let slot = &mut at[bucket(p.0)];
        out[*slot as usize] = p;
        *slot += 1;
    }
    for w in starts.windows(2) {
        let run = &mut out[w[0] as usize..w[1] as usize];
        match run.len() {
            0 | 1 => {}
            2..=16 => {
                for i in 1..run.len() {
                    let mut j = i;
                    while j > 0 && run[j - 1].0 > run[j].0 {
                        run.swap(j - 1, j);
                        j -= 1;
                    }
                }
            }
            _ => run.sort_unstable_by_key(|p| p.0),
        }
    }
    out
}

/// A run of consecutive rows of a dataset with its key set: the unit of one pull, one
/// gradient and one push.
#[derive(Clone, Debug)]
pub struct Minibatch<'a> {
    data: &'a Dataset,
    rows: Range<usize>,
    unique_keys: Vec<Key>,
    /// For each nonzero of the rows, in storage order, its index in `unique_keys`.
    key_index: Vec<u32>,
}

impl<'a> Minibatch<'a> {
    /// The minibatch of rows `rows` of `data`.
    ///
    /// # Panics
    /// If the range is out of bounds or the batch has 2^32 or more nonzeros.
    pub fn new(data: &'a Dataset, rows: Range<usize>) -> Self {
        assert!(rows.start <= rows.end && rows.end <= data.len());
        let offsets = data.offsets();
        let (lo, hi) = (offsets[rows.start], offsets[rows.end]);
        let keys = &data.keys()[lo..hi];
        assert!(keys.len() < u32::MAX as usize, "minibatch too large");
        // Sort (key, position) pairs; equal keys become runs, each run one unique key.
        let order = sort_spread(keys.iter().zip(0u32..).map(|(&k, i)| (k, i)).collect());
        let mut unique_keys = Vec::with_capacity(keys.len() / 2 + 1);
        let mut key_index = vec![0u32; keys.len()];
        for (key, pos) in order {
            if unique_keys.last() != Some(&key) {
                unique_keys.push(key);
            }
            key_index[pos as usize] = (unique_keys.len() - 1) as u32;
        }
        Minibatch {
            data,
            rows,
            unique_keys,
            key_index,
        }
    }

    /// The dataset the rows come from.
    pub fn dataset(&self) -> &'a Dataset {
        self.data
    }

    /// The rows of the dataset in this batch.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the batch has no row.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Number of nonzeros in the batch's rows.
    pub fn nnz(&self) -> usize {
        self.key_index.len()
    }

    /// The distinct keys of the batch, sorted ascending: the keys to pull and push. The
    /// weights passed to [`gradient`] and the gradient it writes are aligned with them.
    pub fn unique_keys(&self) -> &[Key] {
        &self.unique_keys
    }

    /// For each nonzero of the batch (row by row, in storage order) its index in
    /// [`unique_keys`](Self::unique_keys).
    pub fn key_index(&self) -> &[u32] {
        &self.key_index
    }

    /// The margins `x_i . w` of the batch's rows, with `weights` aligned with
    /// [`unique_keys`](Self::unique_keys).
    fn margins(&self, weights: &[f32]) -> Vec<(f32, f32)> {
        assert_eq!(weights.len(), self.unique_keys.len(), "weights not aligned");
        let offsets = self.data.offsets();
        let values = self.data.values();
        let base = offsets[self.rows.start];
        self.rows
            .clone()
            .map(|r| {
                let (lo, hi) = (offsets[r], offsets[r + 1]);
                let idx = &self.key_index[lo - base..hi - base];
                let m = idx
                    .iter()
                    .zip(&values[lo..hi])
                    .map(|(&j, &v)| weights[j as usize] * v)
                    .sum::<f32>();
                (self.data.labels()[r], m)
            })
            .collect()
    }
}

/// The minibatches of a dataset: rows `[0, b)`, `[b, 2b)`, ... in order, the last one
/// possibly shorter. Every pass (and every process) sees the same batches.
#[derive(Clone, Debug)]
pub struct Minibatches<'a> {
    data: &'a Dataset,
    batch_size: usize,
    next: usize,
}

impl<'a> Minibatches<'a> {
    /// The minibatches of `data` with `batch_size` rows each.
    ///
    /// # Panics
    /// If `batch_size == 0`.
    pub fn new(data: &'a Dataset, batch_size: usize) -> Self {
        assert!(batch_size > 0, "batch size 0");
        Minibatches {
            data,
            batch_size,
            next: 0,
        }
    }
}

impl<'a> Iterator for Minibatches<'a> {
    type Item = Minibatch<'a>;

    fn next(&mut self) -> Option<Minibatch<'a>> {
        if self.next >= self.data.len() {
            return None;
        }
        let end = (self.next + self.batch_size).min(self.data.len());
        let batch = Minibatch::new(self.data, self.next..end);
        self.next = end;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.data.len() - self.next).div_ceil(self.batch_size);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Minibatches<'_> {}

impl Dataset {
    /// The dataset's minibatches of `batch_size` rows, in order.
    pub fn minibatches(&self, batch_size: usize) -> Minibatches<'_> {
        Minibatches::new(self, batch_size)
    }
}

/// `1 / (1 + e^-m)` without overflow.
#[inline]
fn sigmoid(m: f32) -> f32 {
    if m >= 0.0 {
        1.0 / (1.0 + (-m).exp())
    } else {
        let e = m.exp();
        e / (1.0 + e)
    }
}

/// `-log P(y | m)` for margin `m`: `log(1 + e^-m)` if `y = 1`, `log(1 + e^m)` if `y = 0`,
/// computed as a stable softplus.
#[inline]
fn logloss(y: f32, m: f32) -> f64 {
    let z = f64::from(if y == 1.0 { -m } else { m });
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// Writes into `out` the gradient of the batch objective (mean log loss over the batch's
/// rows plus `l2 * w_k` for each key `k` of the batch), aligned with
/// [`Minibatch::unique_keys`], and returns the mean log loss of the batch at `weights`
/// (without the L2 term).
///
/// # Panics
/// If `weights` or `out` is not as long as the batch's unique keys.
pub fn gradient(batch: &Minibatch<'_>, weights: &[f32], l2: f32, out: &mut [f32]) -> f64 {
    assert_eq!(
        weights.len(),
        batch.unique_keys.len(),
        "weights not aligned"
    );
    assert_eq!(out.len(), batch.unique_keys.len(), "gradient not aligned");
    out.fill(0.0);
    if batch.is_empty() {
        return 0.0;
    }
    let offsets = batch.data.offsets();
    let values = batch.data.values();
    let labels = batch.data.labels();
    let base = offsets[batch.rows.start];
    let inv_len = 1.0 / batch.len() as f32;
    let mut loss = 0.0;
    for r in batch.rows.clone() {
        let (lo, hi) = (offsets[r], offsets[r + 1]);
        let idx = &batch.key_index[lo - base..hi - base];
        let vals = &values[lo..hi];
        let m: f32 = idx
            .iter()
            .zip(vals)
            .map(|(&j, &v)| weights[j as usize] * v)
            .sum();
        let y = labels[r];
        loss += logloss(y, m);
        let g = (sigmoid(m) - y) * inv_len;
        for (&j, &v) in idx.iter().zip(vals) {
            out[j as usize] += g * v;
        }
    }
    for (o, &w) in out.iter_mut().zip(weights) {
        *o += l2 * w;
    }
    loss / batch.len() as f64
}

/// The batch objective whose gradient [`gradient`] computes: mean log loss plus
/// `(l2 / 2) * sum of w_k^2` over the batch's keys, in `f64`.
pub fn objective(batch: &Minibatch<'_>, weights: &[f32], l2: f32) -> f64 {
    let n = batch.len().max(1) as f64;
    let data_loss: f64 = batch
        .margins(weights)
        .iter()
        .map(|&(y, m)| logloss(y, m))
        .sum::<f64>()
        / n;
    let reg: f64 = weights.iter().map(|&w| f64::from(w) * f64::from(w)).sum();
    data_loss + 0.5 * f64::from(l2) * reg
}

/// Quality of a model on a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Number of examples evaluated.
    pub examples: usize,
    /// Mean log loss (natural log).
    pub logloss: f64,
    /// Fraction of examples classified right, predicting 1 when the margin is positive.
    pub accuracy: f64,
    /// Area under the ROC curve (ties count half); `None` unless both classes occur.
    pub auc: Option<f64>,
}

impl Eval {
    /// The evaluation of `(label, margin)` pairs.
    pub fn from_margins(pairs: impl IntoIterator<Item = (f32, f32)>) -> Eval {
        let mut pairs: Vec<(f32, f32)> = pairs.into_iter().collect();
        let n = pairs.len();
        if n == 0 {
            return Eval {
                examples: 0,
                logloss: 0.0,
                accuracy: 0.0,
                auc: None,
            };
        }
        let mut loss = 0.0;
        let mut right = 0usize;
        for &(y, m) in &pairs {
            loss += logloss(y, m);
            right += usize::from((m > 0.0) == (y == 1.0));
        }
        // AUC by the rank-sum (Mann-Whitney) statistic, tied margins sharing their ranks.
        pairs.sort_unstable_by(|a, b| a.1.total_cmp(&b.1));
        let positives = pairs.iter().filter(|p| p.0 == 1.0).count();
        let negatives = n - positives;
        let auc = (positives > 0 && negatives > 0).then(|| {
            let mut rank_sum = 0.0;
            let mut start = 0;
            for run in pairs.chunk_by(|a, b| a.1 == b.1) {
                let mean_rank = start as f64 + (run.len() as f64 + 1.0) / 2.0;
                let pos = run.iter().filter(|p| p.0 == 1.0).count();
                rank_sum += mean_rank * pos as f64;
                start += run.len();
            }
            let p = positives as f64;
            (rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64)
        });
        Eval {
            examples: n,
            logloss: loss / n as f64,
            accuracy: right as f64 / n as f64,
            auc,
        }
    }
}

/// Evaluates on `data` the model whose weight of key `k` is `lookup(k)`.
pub fn evaluate(data: &Dataset, lookup: impl Fn(Key) -> f32) -> Eval {
    Eval::from_margins(data.rows().map(|row| {
        let m: f32 = row
            .keys
            .iter()
            .zip(row.values)
            .map(|(&k, &v)| lookup(k) * v)
            .sum();
        (row.label, m)
    }))
}

/// Evaluates the rows of `batch` with `weights` aligned with its unique keys: the fast way
/// to evaluate pulled weights (make the whole test set one batch, pull its unique keys).
pub fn evaluate_batch(batch: &Minibatch<'_>, weights: &[f32]) -> Eval {
    Eval::from_margins(batch.margins(weights))
}

/// A full model: sorted keys and their weights. Keys absent from it have weight 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SparseModel {
    keys: Vec<Key>,
    weights: Vec<f32>,
}

impl SparseModel {
    /// The model with weight `weights[i]` for `keys[i]`.
    ///
    /// # Panics
    /// If the lengths differ or the keys are not strictly increasing.
    pub fn new(keys: Vec<Key>, weights: Vec<f32>) -> Self {
        assert_eq!(
            keys.len(),
            weights.len(),
            "keys and weights differ in length"
        );
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "model keys not strictly increasing"
        );
        SparseModel { keys, weights }
    }

    /// The keys, strictly increasing.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The weights, aligned with [`keys`](Self::keys).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the model has no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys and the weights.
    pub fn into_parts(self) -> (Vec<Key>, Vec<f32>) {
        (self.keys, self.weights)
    }

    /// The weight of `key` (0 when absent), by binary search.
    pub fn weight(&self, key: Key) -> f32 {
        match self.keys.binary_search(&key) {
            Ok(i) => self.weights[i],
            Err(_) => 0.0,
        }
    }

    /// The weights of `keys` (sorted ascending), 0 for keys absent from the model: what
    /// a pull of `keys` returns. A galloping merge of the two sorted lists, linear in the
    /// shorter one times the log of the gap between hits.
    ///
    /// # Panics
    /// If `keys` is not sorted.
    pub fn gather(&self, keys: &[Key]) -> Vec<f32> {
        let mut out = Vec::with_capacity(keys.len());
        let mut from = 0;
        let mut previous = 0;
        for &k in keys {
            assert!(k >= previous, "keys to gather are not sorted");
            previous = k;
            from = gallop(&self.keys, from, k);
            out.push(match self.keys.get(from) {
                Some(&x) if x == k => self.weights[from],
                _ => 0.0,
            });
        }
        out
    }

    /// Evaluates the model on `data`: the whole set as one [`Minibatch`], its keys'
    /// weights [`gather`](Self::gather)ed, then [`evaluate_batch`].
    pub fn evaluate(&self, data: &Dataset) -> Eval {
        let batch = Minibatch::new(data, 0..data.len());
        evaluate_batch(&batch, &self.gather(batch.unique_keys()))
    }
}

/// The first index `i >= from` with `sorted[i] >= key` (or `sorted.len()`), found by
/// galloping forward from `from` and then binary search in the last step: cheap when
/// successive keys land close together.
fn gallop(sorted: &[Key], from: usize, key: Key) -> usize {
    let n = sorted.len();
    let mut lo = from;
    let mut step = 1;
    while lo + step < n && sorted[lo + step] < key {
        lo += step;
        step *= 2;
    }
    let hi = (lo + step + 1).min(n);
    lo + sorted[lo..hi].partition_point(|&x| x < key)
}

/// What one epoch of the reference did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1 for the first pass.
    pub epoch: usize,
    /// Mean over the epoch's batches of the batch log loss before its update (progressive
    /// validation loss on the training data).
    pub train_logloss: f64,
    /// The model after the epoch on the held-out set, when one was given.
    pub heldout: Option<Eval>,
}

/// The single-process SGD reference, one epoch at a time: the same minibatches in the
/// same order as a worker, "pull" = read the current weights of the batch's keys, the
/// same [`gradient`], "push" = `w -= lr * g` on those keys. Deterministic.
#[derive(Debug)]
pub struct ReferenceSgd<'a> {
    params: SgdParams,
    model: SparseModel,
    /// Each batch with, for each of its unique keys, the index of that key in the model.
    batches: Vec<(Minibatch<'a>, Vec<u32>)>,
    epochs_done: usize,
}

impl<'a> ReferenceSgd<'a> {
    /// A zero model over the keys of `train`, its minibatches prepared once.
    ///
    /// # Panics
    /// If `params.batch_size == 0` or `train` has 2^32 or more nonzeros.
    pub fn new(train: &'a Dataset, params: &SgdParams) -> Self {
        // The whole set as one batch: its unique keys are the model's keys, and its key
        // index gives each nonzero's model position.
        let all = Minibatch::new(train, 0..train.len());
        let batches = train
            .minibatches(params.batch_size)
            .map(|batch| {
                let base = train.offsets()[batch.rows.start];
                let mut global = vec![0u32; batch.unique_keys.len()];
                for (pos, &local) in batch.key_index.iter().enumerate() {
                    global[local as usize] = all.key_index[base + pos];
                }
                (batch, global)
            })
            .collect();
        let keys = all.unique_keys;
        let weights = vec![0.0; keys.len()];
        ReferenceSgd {
            params: params.clone(),
            model: SparseModel { keys, weights },
            batches,
            epochs_done: 0,
        }
    }

    /// Runs one pass over the training data; returns the mean batch loss before each
    /// update.
    pub fn epoch(&mut self) -> f64 {
        let SgdParams { lr, l2, .. } = self.params;
        let mut pulled = Vec::new();
        let mut grad = Vec::new();
        let mut loss = 0.0;
        let model = &mut self.model.weights;
        for (batch, global) in &self.batches {
            pulled.clear();
            pulled.extend(global.iter().map(|&g| model[g as usize]));
            grad.resize(pulled.len(), 0.0);
            loss += gradient(batch, &pulled, l2, &mut grad);
            for (&g, &d) in global.iter().zip(&grad) {
                model[g as usize] -= lr * d;
            }
        }
        self.epochs_done += 1;
        loss / self.batches.len().max(1) as f64
    }

    /// Number of epochs run so far.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// The current model.
    pub fn model(&self) -> &SparseModel {
        &self.model
    }

    /// The final model.
    pub fn into_model(self) -> SparseModel {
        self.model
    }
}

/// Trains on `train` with `params` in one process (see [`ReferenceSgd`]), evaluating on
/// `heldout` (if given) after each epoch. Returns the model and one [`EpochStats`] per
/// epoch.
pub fn train_single_process(
    train: &Dataset,
    params: &SgdParams,
    heldout: Option<&Dataset>,
) -> (SparseModel, Vec<EpochStats>) {
    let mut sgd = ReferenceSgd::new(train, params);
    let history = (1..=params.epochs)
        .map(|epoch| {
            let train_logloss = sgd.epoch();
            let heldout = heldout.map(|test| sgd.model().evaluate(test));
            EpochStats {
                epoch,
                train_logloss,
                heldout,
            }
        })
        .collect();
    (sgd.into_model(), history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lr::SyntheticSpec;

    fn tiny() -> Dataset {
        let mut d = Dataset::new();
        d.push_row(1.0, [(10, 1.0), (20, 0.5)]);
        d.push_row(0.0, [(20, 1.0), (30, -2.0)]);
        d.push_row(1.0, [(5, 0.3), (30, 1.0), (40, 0.7)]);
        d.push_row(0.0, []);
        d.push_row(0.0, [(10, 2.0), (40, -1.0)]);
        d
    }

    #[test]
    fn sort_spread_sorts_spread_clustered_and_repeated_keys() {
        let mut rng = crate::lr::rng::SplitMix64::new(7);
        let cases: Vec<Vec<Key>> = vec![
            (0..5000).map(|_| rng.next_u64()).collect(),
            (0..3000).map(|_| rng.next_u64() % 40).collect(),
            (0..2000)
                .map(|i| if i % 2 == 0 { 0 } else { Key::MAX - 1 })
                .collect(),
            (0..1000).map(|i| i * 3).rev().collect(),
            (0..700).map(|_| 5).collect(),
            // Clustered with outliers: most keys in a narrow band, a few far away.
            (0..4000)
                .map(|i| {
                    if i % 100 == 0 {
                        rng.next_u64()
                    } else {
                        1 << 40 | (rng.next_u64() % 512)
                    }
                })
                .collect(),
            vec![9, 3, 3, 1],
        ];
        for keys in cases {
            let pairs: Vec<(Key, u32)> = keys.iter().zip(0u32..).map(|(&k, i)| (k, i)).collect();
            let got = sort_spread(pairs.clone());
            let mut want = pairs;
            want.sort_unstable();
            let mut got_sorted = got.clone();
            assert!(
                got.windows(2).all(|w| w[0].0 <= w[1].0),
                "not sorted by key"
            );
            got_sorted.sort_unstable();
            assert_eq!(got_sorted, want, "not a permutation of the pairs");
        }
    }

    #[test]
    fn minibatch_keys_and_index() {
        let d = tiny();
        let batches: Vec<Minibatch<'_>> = d.minibatches(2).collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(d.minibatches(2).len(), 3);
        assert_eq!(batches[0].unique_keys(), &[10, 20, 30]);
        assert_eq!(batches[0].key_index(), &[0, 1, 1, 2]);
        assert_eq!(batches[1].unique_keys(), &[5, 30, 40]);
        assert_eq!(batches[1].len(), 2);
        assert_eq!(batches[2].rows(), 4..5);
        let all = Minibatch::new(&d, 0..d.len());
        assert_eq!(all.unique_keys(), d.unique_keys().as_slice());
        for (pos, &j) in all.key_index().iter().enumerate() {
            assert_eq!(all.unique_keys()[j as usize], d.keys()[pos]);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let d = tiny();
        let batch = Minibatch::new(&d, 0..d.len());
        let weights = [0.3f32, -0.7, 1.1, 0.2, -0.4];
        let l2 = 0.05;
        let mut g = vec![0.0; weights.len()];
        let loss = gradient(&batch, &weights, l2, &mut g);
        let reg: f64 = weights.iter().map(|&w| f64::from(w * w)).sum::<f64>() * 0.5 * 0.05;
        assert!((objective(&batch, &weights, l2) - (loss + reg)).abs() < 1e-6);
        let h = 1e-2f32;
        for j in 0..weights.len() {
            let (mut up, mut down) = (weights, weights);
            up[j] += h;
            down[j] -= h;
            let numeric =
                (objective(&batch, &up, l2) - objective(&batch, &down, l2)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(g[j])).abs() < 1e-4,
                "key {j}: numeric {numeric} analytic {}",
                g[j]
            );
        }
    }

    #[test]
    fn loss_is_stable_at_large_margins() {
        assert_eq!(logloss(1.0, 1e4), 0.0);
        assert!((logloss(0.0, 1e4) - 1e4).abs() < 1e-3);
        assert!((logloss(1.0, -100.0) - 100.0).abs() < 1e-9);
        assert!((logloss(1.0, 0.0) - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(sigmoid(-1e4), 0.0);
        assert_eq!(sigmoid(1e4), 1.0);
    }

    #[test]
    fn eval_counts() {
        let e = Eval::from_margins([(1.0, 2.0), (0.0, -1.0), (1.0, -0.5), (0.0, 0.0)]);
        assert_eq!(e.examples, 4);
        assert!((e.accuracy - 0.75).abs() < 1e-12);
        // Positives at margins 2 and -0.5, negatives at -1 and 0: 3 of 4 pairs ordered.
        assert!((e.auc.unwrap() - 0.75).abs() < 1e-12);
        let tied = Eval::from_margins([(1.0, 0.0), (0.0, 0.0)]);
        assert_eq!(tied.auc, Some(0.5));
        assert!((tied.logloss - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(Eval::from_margins([(1.0, 1.0)]).auc, None);
    }

    #[test]
    fn gallop_finds_lower_bounds() {
        let keys: Vec<Key> = (0..200).map(|i| i * 3).collect();
        for from in [0, 1, 7, 100, 199, 200] {
            for key in 0..700 {
                let want = from + keys[from..].partition_point(|&x| x < key);
                assert_eq!(gallop(&keys, from, key), want, "from {from} key {key}");
            }
        }
        let model = SparseModel::new(keys, (0..200).map(|i| i as f32).collect());
        assert_eq!(
            model.gather(&[0, 1, 3, 597, 598, 1000]),
            [0.0, 0.0, 1.0, 199.0, 0.0, 0.0]
        );
    }

    #[test]
    fn evaluations_agree() {
        let d = tiny();
        let model = SparseModel::new(vec![5, 10, 30, 99], vec![0.5, -1.0, 2.0, 3.0]);
        let a = model.evaluate(&d);
        let b = evaluate(&d, |k| model.weight(k));
        let batch = Minibatch::new(&d, 0..d.len());
        let pulled: Vec<f32> = batch
            .unique_keys()
            .iter()
            .map(|&k| model.weight(k))
            .collect();
        let c = evaluate_batch(&batch, &pulled);
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn reference_is_deterministic_and_matches_a_manual_loop() {
        let (train, _) = Dataset::synthetic(&SyntheticSpec {
            train_examples: 500,
            test_examples: 0,
            features: 2_000,
            ..SyntheticSpec::small(2)
        });
        let params = SgdParams {
            epochs: 2,
            batch_size: 64,
            ..SgdParams::default()
        };
        let (m1, h1) = train_single_process(&train, &params, None);
        let (m2, h2) = train_single_process(&train, &params, None);
        assert_eq!(m1, m2);
        assert_eq!(h1, h2);
        // The loop a distributed worker runs, against a "server" map.
        let mut server = std::collections::BTreeMap::<Key, f32>::new();
        for _ in 0..params.epochs {
            for batch in train.minibatches(params.batch_size) {
                let keys = batch.unique_keys();
                let w: Vec<f32> = keys
                    .iter()
                    .map(|k| *server.get(k).unwrap_or(&0.0))
                    .collect();
                let mut g = vec![0.0; keys.len()];
                gradient(&batch, &w, params.l2, &mut g);
                for (k, d) in keys.iter().zip(&g) {
                    *server.entry(*k).or_insert(0.0) -= params.lr * d;
                }
            }
        }
        let (keys, weights): (Vec<Key>, Vec<f32>) = server.into_iter().unzip();
        assert_eq!(SparseModel::new(keys, weights), m1);
    }

    #[test]
    fn reference_learns_small_synthetic_set() {
        let (train, test) = Dataset::synthetic(&SyntheticSpec::small(7));
        let params = SgdParams {
            epochs: 4,
            ..SgdParams::default()
        };
        let (_, history) = train_single_process(&train, &params, Some(&test));
        let base_acc = test.majority_rate();
        let base_loss = test.prior_logloss(train.positive_rate());
        for h in &history {
            let e = h.heldout.as_ref().unwrap();
            eprintln!(
                "epoch {}: train {:.4} heldout logloss {:.4} acc {:.4} auc {:.4} (majority {:.4}, prior loss {:.4})",
                h.epoch, h.train_logloss, e.logloss, e.accuracy, e.auc.unwrap(), base_acc, base_loss
            );
        }
        for w in history.windows(2) {
            assert!(w[1].train_logloss < w[0].train_logloss);
        }
        let last = history.last().unwrap().heldout.clone().unwrap();
        assert!(last.accuracy > base_acc + 0.08, "{last:?} vs {base_acc}");
        assert!(last.logloss < base_loss - 0.05, "{last:?} vs {base_loss}");
    }
}

/// Measurements on the default data set, in release:
/// `cargo test --release -p pserv-engine lr -- --ignored --nocapture`.
#[cfg(test)]
mod measure {
    use super::*;
    use crate::lr::SyntheticSpec;
    use std::time::Instant;

    #[test]
    #[ignore = "measures the default data set; run in release"]
    fn default_spec_figures() {
        let spec = SyntheticSpec::default();
        let params = SgdParams {
            epochs: 5,
            ..SgdParams::default()
        };
        let t = Instant::now();
        let (train, test) = Dataset::synthetic(&spec);
        let generate_s = t.elapsed().as_secs_f64();
        let (_, margins) = Dataset::synthetic_test_with_margins(&spec);
        let hidden = Eval::from_margins(
            test.labels()
                .iter()
                .zip(&margins)
                .map(|(&y, &m)| (y, m as f32)),
        );
        eprintln!("spec {spec:?}\nparams {params:?}");
        eprintln!(
            "generation {generate_s:.3} s: train {} rows, {} nonzeros, {} distinct keys, \
             positive rate {:.4}; test {} rows, {} distinct keys, majority rate {:.4}, \
             prior logloss {:.4}; the hidden model on test: logloss {:.4} accuracy {:.4}",
            train.len(),
            train.nnz(),
            train.distinct_keys(),
            train.positive_rate(),
            test.len(),
            test.distinct_keys(),
            test.majority_rate(),
            test.prior_logloss(train.positive_rate()),
            hidden.logloss,
            hidden.accuracy,
        );
        let t = Instant::now();
        let batches = train.minibatches(params.batch_size);
        let (count, unique): (usize, usize) =
            batches.fold((0, 0), |(c, u), b| (c + 1, u + b.unique_keys().len()));
        eprintln!(
            "minibatches: {count} of {} rows, {:.0} unique keys each on average, built in {:.3} s",
            params.batch_size,
            unique as f64 / count as f64,
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let k = train.unique_keys();
        eprintln!(
            "unique keys {} in {:.3} s",
            k.len(),
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let mut sgd = ReferenceSgd::new(&train, &params);
        eprintln!(
            "reference set-up (model keys, batches) {:.3} s",
            t.elapsed().as_secs_f64()
        );
        for epoch in 1..=params.epochs {
            let t = Instant::now();
            let train_logloss = sgd.epoch();
            let epoch_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let e = sgd.model().evaluate(&test);
            eprintln!(
                "epoch {epoch}: {epoch_s:.3} s, train logloss {train_logloss:.4}; held-out \
                 logloss {:.4} accuracy {:.4} auc {:.4} (evaluated in {:.3} s)",
                e.logloss,
                e.accuracy,
                e.auc.unwrap_or(f64::NAN),
                t.elapsed().as_secs_f64()
            );
        }
    }
}
