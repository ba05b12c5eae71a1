//! User-defined filters: what a worker sends of a push (the paper's way of
//! synchronising only part of the parameters).
//!
//! A [`Filter`] sees an outgoing push as [`Entries`] (sorted keys, `value_len` values
//! each) and returns what to send: it may drop entries, change values, or keep a part
//! back for later (a residual). Filters keep whatever per-key state they need (the
//! value last sent, a residual, the weights last pulled). A [`FilterChain`] runs several
//! in order; [`Worker::push_filtered`](crate::worker::Worker::push_filtered) runs a
//! chain before sending, and [`Worker::wait_pull_filtered`](crate::worker::Worker::wait_pull_filtered)
//! shows every filter of a chain the weights a pull brought (the KKT filter needs them).
//!
//! Built in:
//! - [`Significant`]: send an entry only when what accumulated since it was last sent
//!   is larger than a threshold (absolute, or relative to the weight last pulled); the
//!   rest stays as a residual and is sent later, so nothing is lost for good (error
//!   feedback). [`Filter::drain`] sends every residual at the end of training.
//! - [`Kkt`]: for L1-regularised models, skip the gradient of a feature whose weight is
//!   0 and whose gradient is not larger than the L1 strength: the proximal step would
//!   leave it at 0. Counts what it skipped.
//! - [`RandomSkip`]: send each entry with probability `p`, scaled by `1/p` (an unbiased
//!   estimate of the push), from a seeded generator.
//! - [`Quantize`]: values on a `bits`-bit grid with one scale per push, the rounding
//!   error kept per key (error feedback); entries that round to 0 are held.
//!
//! Users write their own by implementing [`Filter`]; nothing in the engine changes.
//!
//! On the servers, [`AnswerFilter`]s change what a pull's answer carries (a pull names
//! one by id: [`ANSWER_BF16`], [`ANSWER_ZERO_SMALL`], or one the server added); see
//! the `answer` part of this module.
//!
//! Invariant: a filter's output is valid push input (keys sorted and distinct, a subset
//! of the input's keys plus keys it held back earlier, `value_len` values per key);
//! [`FilterChain::apply`] checks it in debug builds.

use std::collections::BTreeMap;

use crate::base::keys::Key;
use crate::base::value::Value;

mod answer;
mod quantize;
mod residuals;
mod spec;
pub use answer::{
    round_bf16, AnswerFilter, AnswerFilterSet, AnswerFilters, AnswerKeys, Bf16Round, ZeroBelow,
    ANSWER_BF16, ANSWER_FIRST_USER, ANSWER_NONE, ANSWER_ZERO_SMALL, ZERO_SMALL_BELOW,
};
pub use quantize::Quantize;
use residuals::{KeyMap, Residuals};
pub use spec::FilterSpec;

/// A push as filters see it: sorted, distinct keys and `value_len` values per key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entries<T> {
    /// The keys, sorted and distinct.
    pub keys: Vec<Key>,
    /// `keys.len() * value_len` values, key by key.
    pub values: Vec<T>,
    /// Values per key.
    pub value_len: usize,
}

impl<T: Value> Entries<T> {
    /// Entries of `keys` and `values` (`value_len` per key).
    ///
    /// # Panics
    /// When the lengths do not match or `value_len` is 0.
    pub fn new(keys: Vec<Key>, values: Vec<T>, value_len: usize) -> Self {
        assert!(value_len > 0, "value_len must be at least 1");
        assert_eq!(
            keys.len() * value_len,
            values.len(),
            "{} keys of {value_len} values each, {} values",
            keys.len(),
            values.len()
        );
        Entries {
            keys,
            values,
            value_len,
        }
    }

    /// No entries.
    pub fn empty(value_len: usize) -> Self {
        Entries {
            keys: Vec::new(),
            values: Vec::new(),
            value_len,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The values of the `i`-th key.
    pub fn values_of(&self, i: usize) -> &[T] {
        &self.values[i * self.value_len..(i + 1) * self.value_len]
    }

    /// Iterate over `(key, values)`.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &[T])> {
        self.keys
            .iter()
            .copied()
            .zip(self.values.chunks_exact(self.value_len.max(1)))
    }

    /// Whether the keys are sorted and distinct and the lengths agree.
    pub fn is_valid(&self) -> bool {
        self.value_len > 0
            && self.keys.len() * self.value_len == self.values.len()
            && self.keys.windows(2).all(|w| w[0] < w[1])
    }

    /// These entries plus `other`'s, summed where a key is in both.
    ///
    /// # Panics
    /// When their `value_len`s differ.
    pub fn merge_sum(&self, other: &Entries<T>) -> Entries<T> {
        assert_eq!(
            self.value_len, other.value_len,
            "merging entries of different widths"
        );
        let mut map: BTreeMap<Key, Vec<T>> = BTreeMap::new();
        for (k, v) in self.iter().chain(other.iter()) {
            let slot = map
                .entry(k)
                .or_insert_with(|| vec![T::default(); self.value_len]);
            for (s, x) in slot.iter_mut().zip(v) {
                *s += *x;
            }
        }
        Entries::from_map(map, self.value_len)
    }

    /// Build from `(key, values)` pairs in any order (later pairs of a key replace earlier
    /// ones).
    fn from_map(map: BTreeMap<Key, Vec<T>>, value_len: usize) -> Self {
        let mut e = Entries::empty(value_len);
        for (k, v) in map {
            e.keys.push(k);
            e.values.extend_from_slice(&v);
        }
        e
    }
}

/// What a filter has done so far, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterStats {
    /// Entries (keys) offered to the filter.
    pub offered: u64,
    /// Entries it passed on.
    pub sent: u64,
}

impl FilterStats {
    /// The share of offered entries not sent (0 when nothing was offered).
    pub fn skipped_fraction(&self) -> f64 {
        if self.offered == 0 {
            0.0
        } else {
            1.0 - self.sent as f64 / self.offered as f64
        }
    }
}

/// Decides what of an outgoing push is sent.
pub trait Filter<T: Value>: Send {
    /// A short name for reports (`significant`, `kkt`, ...).
    fn name(&self) -> &str;

    /// The push about to be sent; returns what to send instead. The result must be valid
    /// push input (see [`Entries::is_valid`]); it may be empty.
    fn push(&mut self, entries: Entries<T>) -> Entries<T>;

    /// The weights a pull returned (sorted keys, `value_len` values each); filters that
    /// decide by the current weights keep what they need. The default ignores them.
    fn pulled(&mut self, _entries: &Entries<T>) {}

    /// Everything held back (at the end of training): sent as one last push. The default
    /// holds nothing back.
    fn drain(&mut self, value_len: usize) -> Entries<T> {
        Entries::empty(value_len)
    }

    /// What it has done so far.
    fn stats(&self) -> FilterStats;
}

/// Filters run one after the other on a push (the first sees the push, each next one what
/// the previous passed on); pulled weights go to each.
#[derive(Default)]
pub struct FilterChain<T: Value> {
    filters: Vec<Box<dyn Filter<T>>>,
}

impl<T: Value> std::fmt::Debug for FilterChain<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.filters.iter().map(|x| x.name()))
            .finish()
    }
}

impl<T: Value> FilterChain<T> {
    /// An empty chain (sends everything).
    pub fn new() -> Self {
        FilterChain {
            filters: Vec::new(),
        }
    }

    /// Add `f` at the end.
    pub fn with(mut self, f: impl Filter<T> + 'static) -> Self {
        self.filters.push(Box::new(f));
        self
    }

    /// Add `f` at the end.
    pub fn push_filter(&mut self, f: Box<dyn Filter<T>>) {
        self.filters.push(f);
    }

    /// Whether the chain has no filter.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Run the chain on a push.
    ///
    /// # Panics
    /// In debug builds, when a filter returns invalid entries.
    pub fn apply(&mut self, mut entries: Entries<T>) -> Entries<T> {
        debug_assert!(entries.is_valid(), "a push offered to filters is invalid");
        for f in &mut self.filters {
            let value_len = entries.value_len;
            entries = f.push(entries);
            debug_assert!(
                entries.is_valid() && entries.value_len == value_len,
                "filter {} returned invalid entries",
                f.name()
            );
        }
        entries
    }

    /// Show every filter the weights a pull returned.
    pub fn pulled(&mut self, entries: &Entries<T>) {
        for f in &mut self.filters {
            f.pulled(entries);
        }
    }

    /// Everything the filters hold back, summed per key, as one push (sent as it is: a
    /// residual is what was pushed and not sent, so no filter judges it again).
    pub fn drain(&mut self, value_len: usize) -> Entries<T> {
        let mut out = Entries::empty(value_len);
        for f in &mut self.filters {
            out = out.merge_sum(&f.drain(value_len));
        }
        out
    }

    /// Each filter's name and counters.
    pub fn stats(&self) -> Vec<(String, FilterStats)> {
        self.filters
            .iter()
            .map(|f| (f.name().to_string(), f.stats()))
            .collect()
    }
}

/// When [`Significant`] sends an entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// When some value's accumulated change is larger than this.
    Absolute(f64),
    /// When some value's accumulated change is larger than this share of the weight last
    /// pulled for it (a key never pulled counts as weight 0: any change is sent).
    Relative(f64),
}

/// The significantly-modified filter with error feedback: every push adds to a per-key
/// residual; a key's residual is sent (and cleared) once one of its values exceeds the
/// threshold. What is sent plus what is held equals what was pushed, exactly in exact
/// arithmetic (floating-point sums round as any sum does).
pub struct Significant<T: Value> {
    threshold: Threshold,
    residual: Residuals<T>,
    weights: KeyMap<Vec<T>>,
    stats: FilterStats,
}

impl<T: Value> Significant<T> {
    /// A filter with `threshold`.
    ///
    /// # Panics
    /// When the threshold is negative or not finite.
    pub fn new(threshold: Threshold) -> Self {
        let t = match threshold {
            Threshold::Absolute(t) | Threshold::Relative(t) => t,
        };
        assert!(
            t.is_finite() && t >= 0.0,
            "a threshold is finite and not negative"
        );
        Significant {
            threshold,
            residual: Residuals::new(),
            weights: KeyMap::default(),
            stats: FilterStats::default(),
        }
    }

    /// The residual held back for `key`, if any.
    pub fn residual(&self, key: Key) -> Option<&[T]> {
        self.residual.get(key)
    }

    fn significant(&self, key: Key, r: &[T]) -> bool {
        significant(self.threshold, &self.weights, key, r)
    }
}

/// Whether `r` (the accumulated change of `key`) exceeds `threshold`.
fn significant<T: Value>(
    threshold: Threshold,
    weights: &KeyMap<Vec<T>>,
    key: Key,
    r: &[T],
) -> bool {
    match threshold {
        Threshold::Absolute(t) => r.iter().any(|x| x.to_f64().abs() > t),
        Threshold::Relative(t) => {
            let w = weights.get(&key);
            r.iter().enumerate().any(|(i, x)| {
                let base = w.and_then(|w| w.get(i)).map_or(0.0, |v| v.to_f64().abs());
                x.to_f64().abs() > t * base
            })
        }
    }
}

impl<T: Value> Filter<T> for Significant<T> {
    fn name(&self) -> &str {
        "significant"
    }

    fn push(&mut self, entries: Entries<T>) -> Entries<T> {
        let value_len = entries.value_len;
        let mut out = Entries::empty(value_len);
        for (k, v) in entries.iter() {
            self.stats.offered += 1;
            // One map lookup for a key that stays held, two for one that goes.
            let send = if let Some(r) = self.residual.get_mut(k) {
                for (a, b) in r.iter_mut().zip(v) {
                    *a += *b;
                }
                if significant(self.threshold, &self.weights, k, r) {
                    self.residual.take_into(k, &mut out.values);
                    true
                } else {
                    false
                }
            } else if self.significant(k, v) {
                out.values.extend_from_slice(v);
                true
            } else {
                self.residual.insert(k, v);
                false
            };
            if send {
                out.keys.push(k);
                self.stats.sent += 1;
            }
        }
        out
    }

    fn pulled(&mut self, entries: &Entries<T>) {
        if matches!(self.threshold, Threshold::Relative(_)) {
            for (k, v) in entries.iter() {
                self.weights.insert(k, v.to_vec());
            }
        }
    }

    fn drain(&mut self, value_len: usize) -> Entries<T> {
        Entries::from_map(self.residual.drain(value_len), value_len)
    }

    fn stats(&self) -> FilterStats {
        self.stats
    }
}

/// The KKT filter for L1-regularised models (the paper's sparse logistic regression with
/// a proximal L1 step): the gradient of a feature whose weight is 0 and whose magnitude
/// is at most the L1 strength `lambda` is not sent, because the proximal update would
/// leave the weight at 0. Weights come from the pulls the filter is shown; a feature
/// never pulled is always sent.
///
/// With stochastic gradients and an optimizer that accumulates them (FTRL's `z`), many
/// small gradients of one sign do move a weight off 0, so a skipped gradient is not
/// dropped: it is kept as the key's residual and judged with the next one (the residual
/// plus the gradient against `lambda`), sent with the first gradient that goes, and
/// returned by [`drain`](Filter::drain). With several workers each pushing its share, a
/// worker should use its share of the strength ([`Kkt::with_share`]), so that what all
/// of them hold back together stays within `lambda`.
pub struct Kkt<T: Value> {
    lambda: f64,
    zero: KeyMap<bool>,
    residual: Residuals<T>,
    stats: FilterStats,
}

impl<T: Value> Kkt<T> {
    /// A filter for L1 strength `lambda`.
    ///
    /// # Panics
    /// When `lambda` is negative or not finite.
    pub fn new(lambda: f64) -> Self {
        assert!(
            lambda.is_finite() && lambda >= 0.0,
            "the L1 strength is finite and not negative"
        );
        Kkt {
            lambda,
            zero: KeyMap::default(),
            residual: Residuals::new(),
            stats: FilterStats::default(),
        }
    }

    /// A filter for one of several workers: it holds back at most `share` of `lambda`
    /// per key (`share` = 1 / workers).
    ///
    /// # Panics
    /// When `share` is not in `(0, 1]`, or as [`new`](Self::new).
    pub fn with_share(lambda: f64, share: f64) -> Self {
        assert!(share > 0.0 && share <= 1.0, "a share is in (0, 1]");
        Kkt::new(lambda * share)
    }

    /// The gradient held back for `key`, if any.
    pub fn residual(&self, key: Key) -> Option<&[T]> {
        self.residual.get(key)
    }
}

impl<T: Value> Filter<T> for Kkt<T> {
    fn name(&self) -> &str {
        "kkt"
    }

    fn push(&mut self, entries: Entries<T>) -> Entries<T> {
        let value_len = entries.value_len;
        let mut out = Entries::empty(value_len);
        let lambda = self.lambda;
        let small = |g: &[T]| g.iter().all(|x| x.to_f64().abs() <= lambda);
        for (k, v) in entries.iter() {
            self.stats.offered += 1;
            let at_zero = self.zero.get(&k).copied().unwrap_or(false);
            // The gradient plus what is held for the key, summed in place.
            let send = match self.residual.get_mut(k) {
                Some(r) => {
                    for (a, b) in r.iter_mut().zip(v) {
                        *a += *b;
                    }
                    if at_zero && small(r) {
                        false
                    } else {
                        out.keys.push(k);
                        self.residual.take_into(k, &mut out.values);
                        true
                    }
                }
                None if at_zero && small(v) => {
                    self.residual.insert(k, v);
                    false
                }
                None => {
                    out.keys.push(k);
                    out.values.extend_from_slice(v);
                    true
                }
            };
            if send {
                self.stats.sent += 1;
            }
        }
        out
    }

    fn pulled(&mut self, entries: &Entries<T>) {
        for (k, v) in entries.iter() {
            self.zero.insert(k, v.iter().all(|w| w.to_f64() == 0.0));
        }
    }

    fn drain(&mut self, value_len: usize) -> Entries<T> {
        Entries::from_map(self.residual.drain(value_len), value_len)
    }

    fn stats(&self) -> FilterStats {
        self.stats
    }
}

/// Send each entry with probability `p`, its values scaled by `1 / p` (so the expected
/// push is the push itself); the choices come from a seeded generator (splitmix64).
pub struct RandomSkip<T: Value> {
    p: f64,
    state: u64,
    stats: FilterStats,
    _t: std::marker::PhantomData<T>,
}

impl<T: Value> RandomSkip<T> {
    /// Keep each entry with probability `p` (in `(0, 1]`), drawing from `seed`.
    ///
    /// # Panics
    /// When `p` is not in `(0, 1]`.
    pub fn new(p: f64, seed: u64) -> Self {
        assert!(p > 0.0 && p <= 1.0, "a keep probability is in (0, 1]");
        RandomSkip {
            p,
            state: seed,
            stats: FilterStats::default(),
            _t: std::marker::PhantomData,
        }
    }

    fn next(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let x = crate::placement::ring::splitmix64(self.state);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl<T: Value> Filter<T> for RandomSkip<T> {
    fn name(&self) -> &str {
        "random-skip"
    }

    fn push(&mut self, entries: Entries<T>) -> Entries<T> {
        let value_len = entries.value_len;
        let mut out = Entries::empty(value_len);
        let scale = T::from_f64(1.0 / self.p);
        for (k, v) in entries.iter() {
            self.stats.offered += 1;
            if self.next() >= self.p {
                continue;
            }
            out.keys.push(k);
            out.values.extend(v.iter().map(|&x| x * scale));
            self.stats.sent += 1;
        }
        out
    }

    fn stats(&self) -> FilterStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
