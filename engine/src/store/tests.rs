//! Store tests: a `BTreeMap` model under random operation sequences, growth, refused
//! requests leaving the store unchanged, and concurrent pushes.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::update::{Assign, Sgd, Sum, UpdateFn};

/// A rule with state, to check that state sits beside its weights and moves with them:
/// `s += g; w += s`.
struct Accum;

impl<T: Value> UpdateFn<T> for Accum {
    fn name(&self) -> &str {
        "accum"
    }
    fn state_len(&self) -> usize {
        1
    }
    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]) {
        for ((w, s), &g) in weights.iter_mut().zip(state.iter_mut()).zip(grads) {
            *s += g;
            *w += *s;
        }
    }
}

fn rule<T: Value>(which: u8) -> Box<dyn UpdateFn<T>> {
    match which % 4 {
        0 => Box::new(Sum),
        1 => Box::new(Sgd { lr: 0.5 }),
        2 => Box::new(Assign),
        _ => Box::new(Accum),
    }
}

/// What the store should hold: weights and state per stored key, and the dense blocks.
struct Model<T> {
    vl: usize,
    state_len: usize,
    bounds: Vec<u64>,
    dense_max_bytes: u64,
    keys: BTreeMap<u64, (Vec<T>, Vec<T>)>,
    blocks: Vec<KeyRange>,
}

impl<T: Value> Model<T> {
    fn new(store: &Store<T>, dense_max_bytes: u64) -> Self {
        Model {
            vl: store.value_len(),
            state_len: store.state_len(),
            bounds: store.bounds.to_vec(),
            dense_max_bytes,
            keys: BTreeMap::new(),
            blocks: Vec::new(),
        }
    }

    fn entry(&mut self, key: u64) -> &mut (Vec<T>, Vec<T>) {
        let (vl, sl) = (self.vl, self.vl * self.state_len);
        self.keys
            .entry(key)
            .or_insert_with(|| (vec![T::default(); vl], vec![T::default(); sl]))
    }

    fn apply(&mut self, key: u64, g: &[T], f: &dyn UpdateFn<T>) {
        let (needs, has) = (f.state_len(), self.state_len);
        let (w, s) = self.entry(key);
        // Element by element, the state of element e at s[e * has..][..needs].
        for e in 0..w.len() {
            f.apply(
                &mut w[e..e + 1],
                &mut s[e * has..e * has + needs],
                &g[e..e + 1],
            );
        }
    }

    fn read(&self, key: u64, out: &mut Vec<T>) {
        match self.keys.get(&key) {
            Some((w, _)) => out.extend_from_slice(w),
            None => out.extend(std::iter::repeat_n(T::default(), self.vl)),
        }
    }

    fn push(&mut self, keys: &[u64], grads: &[T], f: &dyn UpdateFn<T>, out: Option<&mut Vec<T>>) {
        for (&k, g) in keys.iter().zip(grads.chunks_exact(self.vl)) {
            self.apply(k, g, f);
        }
        if let Some(out) = out {
            self.pull(keys, out);
        }
    }

    fn pull(&self, keys: &[u64], out: &mut Vec<T>) {
        for &k in keys {
            self.read(k, out);
        }
    }

    /// The new blocks a range push needs, or the error size check that refuses it.
    fn gaps(&self, range: KeyRange) -> Result<Vec<KeyRange>, ()> {
        let mut gaps = Vec::new();
        for w in self.bounds.windows(2) {
            let Some(sub) = KeyRange::new(w[0], w[1]).intersect(&range) else {
                continue;
            };
            let mut pos = sub.begin;
            for b in &self.blocks {
                if let Some(part) = b.intersect(&sub) {
                    if part.begin > pos {
                        gaps.push(KeyRange::new(pos, part.begin));
                    }
                    pos = part.end;
                }
            }
            if pos < sub.end {
                gaps.push(KeyRange::new(pos, sub.end));
            }
        }
        let elem = std::mem::size_of::<T>() as u64;
        let per_key = (self.vl + self.vl * self.state_len) as u64 * elem;
        if gaps
            .iter()
            .any(|g| g.len() * per_key > self.dense_max_bytes)
        {
            return Err(());
        }
        Ok(gaps)
    }

    fn push_range(
        &mut self,
        range: KeyRange,
        grads: &[T],
        f: &dyn UpdateFn<T>,
        out: Option<&mut Vec<T>>,
    ) -> Result<(), ()> {
        let gaps = self.gaps(range)?;
        for gap in gaps {
            for k in gap.begin..gap.end {
                self.entry(k);
            }
            self.blocks.push(gap);
        }
        self.blocks.sort();
        let keys: Vec<u64> = (range.begin..range.end).collect();
        self.push(&keys, grads, f, out);
        Ok(())
    }

    /// Compare everything observable.
    fn check(&self, store: &Store<T>) {
        store.check_invariants();
        let mut dumped = Vec::new();
        store.for_each(|k, w| dumped.push((k, w.to_vec())));
        let want: Vec<(u64, Vec<T>)> = self
            .keys
            .iter()
            .map(|(&k, (w, _))| (k, w.clone()))
            .collect();
        assert_eq!(dumped.len(), want.len(), "stored key count");
        for (got, want) in dumped.iter().zip(&want) {
            assert_eq!(got, want);
        }
        assert_eq!(store.key_count(), want.len() as u64);
        let nonzero = want
            .iter()
            .filter(|(_, w)| w.iter().any(|&x| x != T::default()))
            .count();
        assert_eq!(store.nonzero_count(), nonzero as u64);
        assert_eq!(store.dense_ranges(), self.blocks);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Push(Vec<u64>, u8),
    Pull(Vec<u64>),
    PushPull(Vec<u64>, u8),
    PushRange(u64, u64, u8),
    PullRange(u64, u64),
    PushPullRange(u64, u64, u8),
}

/// Key selectors: small values pick "special" keys (range and shard edges), the rest map
/// into the range.
fn selectors() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(any::<u64>(), 0..60)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (selectors(), any::<u8>()).prop_map(|(k, f)| Op::Push(k, f)),
        2 => selectors().prop_map(Op::Pull),
        1 => (selectors(), any::<u8>()).prop_map(|(k, f)| Op::PushPull(k, f)),
        1 => (any::<u64>(), any::<u64>(), any::<u8>()).prop_map(|(a, b, f)| Op::PushRange(a, b, f)),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Op::PullRange(a, b)),
        1 => (any::<u64>(), any::<u64>(), any::<u8>())
            .prop_map(|(a, b, f)| Op::PushPullRange(a, b, f)),
    ]
}

struct Keys {
    range: KeyRange,
    special: Vec<u64>,
}

impl Keys {
    fn new(store: &Store<impl Value>) -> Self {
        let r = store.range();
        let mut special = vec![r.begin, r.end - 1];
        for &b in &store.bounds[1..store.bounds.len() - 1] {
            special.extend([b - 1, b, b + 1]);
        }
        special.retain(|&k| r.contains(k));
        Keys { range: r, special }
    }

    fn key(&self, sel: u64) -> u64 {
        if sel & 3 == 0 {
            self.special[(sel / 4) as usize % self.special.len()]
        } else {
            self.range.begin + (sel >> 8) % self.range.len()
        }
    }

    fn list(&self, sels: &[u64]) -> Vec<u64> {
        let mut keys: Vec<u64> = sels.iter().map(|&s| self.key(s)).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// A range of at most 300 keys, around a selected key.
    fn range(&self, a: u64, b: u64) -> KeyRange {
        let start = self.key(a);
        let len = b % 300;
        let begin = start.saturating_sub(len / 2).max(self.range.begin);
        KeyRange::new(begin, begin.saturating_add(len).min(self.range.end))
    }
}

/// Integer-valued gradients so every rule is exact in f32 and f64.
fn grads<T: Value>(n: usize, seed: u64) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f64(((seed.wrapping_add(i as u64 * 7919) % 17) as f64) - 8.0))
        .collect()
}

fn run_ops<T: Value>(begin: u64, span: u64, cfg: StoreConfig, ops: &[Op]) {
    let range = KeyRange::new(begin, begin + span);
    let store = Store::<T>::new(range, cfg.clone()).unwrap();
    let mut model = Model::new(&store, cfg.dense_max_bytes);
    let keys = Keys::new(&store);
    let vl = cfg.value_len;
    for (step, op) in ops.iter().enumerate() {
        let seed = step as u64 * 31;
        let (mut got, mut want) = (Vec::<T>::new(), Vec::<T>::new());
        match op {
            Op::Push(sels, f) | Op::PushPull(sels, f) => {
                let k = keys.list(sels);
                let g = grads::<T>(k.len() * vl, seed);
                let f = rule::<T>(*f);
                let pulled = matches!(op, Op::PushPull(..));
                let res = if pulled {
                    got = vec![T::default(); g.len()];
                    store.push_pull(&k, &g, f.as_ref(), &mut got)
                } else {
                    store.push(&k, &g, f.as_ref())
                };
                if f.state_len() > cfg.state_len {
                    assert!(
                        matches!(res, Err(StoreError::StateTooSmall { .. })),
                        "{res:?}"
                    );
                    got.clear();
                } else {
                    res.unwrap();
                    model.push(&k, &g, f.as_ref(), pulled.then_some(&mut want));
                }
            }
            Op::Pull(sels) => {
                let k = keys.list(sels);
                got = vec![T::default(); k.len() * vl];
                store.pull(&k, &mut got).unwrap();
                model.pull(&k, &mut want);
                // What replication reads: weights and state, nothing inserted.
                let (w, st) = store.read_entries(&k).unwrap();
                let (mut mw, mut ms) = (Vec::new(), Vec::new());
                for key in &k {
                    match model.keys.get(key) {
                        Some((a, b)) => {
                            mw.extend_from_slice(a);
                            ms.extend_from_slice(b);
                        }
                        None => {
                            mw.extend(std::iter::repeat_n(T::default(), vl));
                            ms.extend(std::iter::repeat_n(T::default(), vl * model.state_len));
                        }
                    }
                }
                assert_eq!(w, mw, "read_entries weights");
                assert_eq!(st, ms, "read_entries state");
            }
            Op::PushRange(a, b, f) | Op::PushPullRange(a, b, f) => {
                let r = keys.range(*a, *b);
                let n = r.len() as usize * vl;
                let g = grads::<T>(n, seed);
                let f = rule::<T>(*f);
                let pulled = matches!(op, Op::PushPullRange(..));
                let res = if pulled {
                    got = vec![T::default(); n];
                    store.push_pull_range(r, &g, f.as_ref(), &mut got)
                } else {
                    store.push_range(r, &g, f.as_ref())
                };
                if f.state_len() > cfg.state_len {
                    assert!(
                        matches!(res, Err(StoreError::StateTooSmall { .. })),
                        "{res:?}"
                    );
                    got.clear();
                } else {
                    match model.push_range(r, &g, f.as_ref(), pulled.then_some(&mut want)) {
                        Ok(()) => res.unwrap(),
                        Err(()) => {
                            assert!(
                                matches!(res, Err(StoreError::DenseTooLarge { .. })),
                                "{res:?}"
                            );
                            got.clear();
                        }
                    }
                }
            }
            Op::PullRange(a, b) => {
                let r = keys.range(*a, *b);
                got = vec![T::default(); r.len() as usize * vl];
                store.pull_range(r, &mut got).unwrap();
                let k: Vec<u64> = (r.begin..r.end).collect();
                model.pull(&k, &mut want);
            }
        }
        assert_eq!(got, want, "step {step}: {op:?}");
        if step % 8 == 7 {
            model.check(&store);
        }
    }
    model.check(&store);
}

fn config() -> impl Strategy<Value = (u64, u64, StoreConfig)> {
    (
        prop_oneof![Just(0u64), Just(1000), Just(u64::MAX - 3000)],
        prop_oneof![Just(3000u64), Just(5), Just(64)],
        1usize..6,
        prop_oneof![Just(1usize), Just(2), Just(3)],
        0usize..3,
        prop_oneof![Just(0usize), Just(4), Just(100)],
        prop_oneof![Just(8 << 30), Just(400u64)],
    )
        .prop_map(
            |(begin, span, shards, value_len, state_len, initial, max)| {
                (
                    begin,
                    span,
                    StoreConfig {
                        shards,
                        value_len,
                        state_len,
                        sparse_initial_keys: initial,
                        dense_max_bytes: max,
                    },
                )
            },
        )
}

proptest! {
    // Failures print their shrunk input; nothing is persisted beside the sources.
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn matches_the_model_f32((begin, span, cfg) in config(), ops in prop::collection::vec(op(), 1..40)) {
        run_ops::<f32>(begin, span, cfg, &ops);
    }

    #[test]
    fn matches_the_model_f64((begin, span, cfg) in config(), ops in prop::collection::vec(op(), 1..40)) {
        run_ops::<f64>(begin, span, cfg, &ops);
    }
}

#[test]
fn shards_split_the_range_evenly_and_tiny_ranges_get_fewer() {
    let s = Store::<f32>::new(KeyRange::new(10, 110), StoreConfig::default()).unwrap();
    assert_eq!(s.shard_count(), 16);
    assert_eq!(s.bounds.first(), Some(&10));
    assert_eq!(s.bounds.last(), Some(&110));
    for k in 10..110 {
        let sh = s.shard_of(k);
        assert!(s.bounds[sh] <= k && k < s.bounds[sh + 1]);
    }
    let tiny = Store::<f32>::new(KeyRange::new(5, 8), StoreConfig::default()).unwrap();
    assert_eq!(tiny.shard_count(), 3);
    let empty = Store::<f32>::new(KeyRange::new(5, 5), StoreConfig::default()).unwrap();
    assert_eq!(empty.shard_count(), 1);
    empty.push(&[], &[], &Sum).unwrap();
    empty.push_range(KeyRange::new(5, 5), &[], &Sum).unwrap();
    assert!(matches!(
        empty.push(&[5], &[1.0], &Sum),
        Err(StoreError::KeyOutOfRange { key: 5, .. })
    ));
    let full = Store::<f32>::new(KeyRange::FULL, StoreConfig::default()).unwrap();
    full.push(&[0, 1 << 40, u64::MAX - 1], &[1.0, 2.0, 3.0], &Sum)
        .unwrap();
    let mut out = [0.0; 3];
    full.pull(&[0, 1 << 40, u64::MAX - 1], &mut out).unwrap();
    assert_eq!(out, [1.0, 2.0, 3.0]);
    for bad in [
        StoreConfig {
            shards: 0,
            ..StoreConfig::default()
        },
        StoreConfig {
            value_len: 0,
            ..StoreConfig::default()
        },
        StoreConfig {
            value_len: usize::MAX,
            ..StoreConfig::default()
        },
        StoreConfig {
            state_len: usize::MAX,
            ..StoreConfig::default()
        },
        StoreConfig {
            sparse_initial_keys: usize::MAX,
            ..StoreConfig::default()
        },
    ] {
        assert!(matches!(
            Store::<f32>::new(KeyRange::FULL, bad),
            Err(StoreError::Config(_))
        ));
    }
}

#[test]
fn grows_across_many_inserts() {
    let cfg = StoreConfig {
        shards: 2,
        value_len: 2,
        state_len: 1,
        sparse_initial_keys: 0,
        ..StoreConfig::default()
    };
    let store = Store::<f32>::new(KeyRange::new(0, 1 << 40), cfg).unwrap();
    let bytes0 = store.bytes();
    let mut all = Vec::new();
    for batch in 0..50u64 {
        let keys: Vec<u64> = (0..4000u64).map(|i| (i * 50 + batch) * 104_729).collect();
        let grads: Vec<f32> = keys.iter().flat_map(|&k| [(k % 7) as f32, 1.0]).collect();
        store.push(&keys, &grads, &Accum).unwrap();
        all.extend(keys);
    }
    all.sort_unstable();
    assert_eq!(store.key_count(), all.len() as u64);
    assert!(store.bytes() > bytes0 * 16);
    store.check_invariants();
    let mut out = vec![0f32; all.len() * 2];
    store.pull(&all, &mut out).unwrap();
    for (k, w) in all.iter().zip(out.chunks_exact(2)) {
        assert_eq!(w, [(k % 7) as f32, 1.0]);
    }
}

/// Everything observable, for before/after comparisons.
type Snapshot<T> = (Vec<(u64, Vec<T>)>, u64, Vec<KeyRange>, u64);

fn snapshot<T: Value>(s: &Store<T>) -> Snapshot<T> {
    let mut v = Vec::new();
    s.for_each(|k, w| v.push((k, w.to_vec())));
    (v, s.key_count(), s.dense_ranges(), s.bytes())
}

#[test]
fn refused_requests_leave_the_store_unchanged() {
    let cfg = StoreConfig {
        shards: 4,
        value_len: 2,
        state_len: 0,
        dense_max_bytes: 80 * 8,
        ..StoreConfig::default()
    };
    let range = KeyRange::new(100, 500);
    let s = Store::<f32>::new(range, cfg).unwrap();
    s.push(&[100, 150, 250, 499], &[1.0; 8], &Sum).unwrap();
    s.push_range(KeyRange::new(140, 160), &[2.0; 40], &Sum)
        .unwrap();
    let before = snapshot(&s);
    let mut out = vec![0f32; 8];
    let errors: Vec<(&str, StoreError)> = vec![
        (
            "duplicate",
            s.push(&[100, 120, 120, 130], &[1.0; 8], &Sum).unwrap_err(),
        ),
        (
            "descending",
            s.push(&[130, 120], &[1.0; 4], &Sum).unwrap_err(),
        ),
        ("below", s.push(&[99, 100], &[1.0; 4], &Sum).unwrap_err()),
        ("at end", s.push(&[150, 500], &[1.0; 4], &Sum).unwrap_err()),
        (
            "short grads",
            s.push(&[101, 102], &[1.0; 3], &Sum).unwrap_err(),
        ),
        ("long grads", s.push(&[101], &[1.0; 3], &Sum).unwrap_err()),
        ("state", s.push(&[101, 102], &[1.0; 4], &Accum).unwrap_err()),
        (
            "pp out",
            s.push_pull(&[101, 102], &[1.0; 4], &Sum, &mut out)
                .unwrap_err(),
        ),
        (
            "pp unsorted",
            s.push_pull(&[102, 101, 103, 104], &[1.0; 8], &Sum, &mut out)
                .unwrap_err(),
        ),
        (
            "range out",
            s.push_range(KeyRange::new(490, 510), &[1.0; 40], &Sum)
                .unwrap_err(),
        ),
        (
            "range grads",
            s.push_range(KeyRange::new(200, 204), &[1.0; 7], &Sum)
                .unwrap_err(),
        ),
        (
            "range state",
            s.push_range(KeyRange::new(200, 204), &[1.0; 8], &Accum)
                .unwrap_err(),
        ),
        // [200, 300) is 100 uncovered keys of 8 bytes, over the 640-byte limit; the smaller
        // gap [160, 200) must not get a block and [140, 160) must not change either.
        (
            "too large",
            s.push_range(KeyRange::new(140, 400), &[1.0; 520], &Sum)
                .unwrap_err(),
        ),
        (
            "ppr out",
            s.push_pull_range(KeyRange::new(200, 204), &[1.0; 8], &Sum, &mut out[..7])
                .unwrap_err(),
        ),
    ];
    for (what, err) in &errors {
        assert_eq!(snapshot(&s), before, "{what} changed the store");
        assert!(!err.to_string().is_empty());
    }
    let kinds: Vec<&str> = errors
        .iter()
        .map(|(_, e)| match e {
            StoreError::KeysNotSorted { .. } => "sorted",
            StoreError::KeyOutOfRange { .. } => "key",
            StoreError::ValueLength { .. } => "values",
            StoreError::OutputLength { .. } => "out",
            StoreError::StateTooSmall { .. } => "state",
            StoreError::RangeOutOfRange { .. } => "range",
            StoreError::DenseTooLarge { .. } => "dense",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "sorted", "sorted", "key", "key", "values", "values", "state", "out", "sorted",
            "range", "values", "state", "dense", "out"
        ]
    );
    assert!(matches!(
        errors[0].1,
        StoreError::KeysNotSorted { index: 2 }
    ));
    assert!(matches!(
        errors[3].1,
        StoreError::KeyOutOfRange { key: 500, .. }
    ));
    // Pulls refuse bad requests too.
    assert!(s.pull(&[101, 101], &mut out[..4]).is_err());
    assert!(s.pull(&[101], &mut out[..3]).is_err());
    assert!(s.pull_range(KeyRange::new(0, 2), &mut out[..4]).is_err());
    assert!(s
        .pull_range(KeyRange::new(100, 102), &mut out[..3])
        .is_err());
    assert_eq!(snapshot(&s), before);
    // And a request within the limit still works afterwards.
    s.push_range(KeyRange::new(140, 200), &[1.0; 120], &Sum)
        .unwrap();
    s.check_invariants();
}

#[test]
fn dense_blocks_take_over_sparse_keys_and_serve_key_lists() {
    let cfg = StoreConfig {
        shards: 2,
        value_len: 1,
        state_len: 1,
        ..StoreConfig::default()
    };
    // Shards [0, 50) and [50, 100).
    let s = Store::<f64>::new(KeyRange::new(0, 100), cfg).unwrap();
    s.push(&[10, 45, 55, 60, 90], &[1.0, 2.0, 3.0, 4.0, 5.0], &Accum)
        .unwrap();
    // A range across the shard edge: one block per shard, taking 45, 55 and 60.
    s.push_range(KeyRange::new(40, 70), &[1.0; 30], &Accum)
        .unwrap();
    assert_eq!(
        s.dense_ranges(),
        [KeyRange::new(40, 50), KeyRange::new(50, 70)]
    );
    assert_eq!(s.key_count(), 2 + 30);
    // Accum moved its state with the key: 45 had s=2, w=2; now s=3, w=5.
    let mut out = [0.0; 4];
    s.pull(&[10, 45, 46, 90], &mut out).unwrap();
    assert_eq!(out, [1.0, 5.0, 1.0, 5.0]);
    // Key lists mixing sparse and dense keys, and a range mixing blocks and gaps.
    s.push(&[10, 44, 45, 46, 69, 70], &[1.0; 6], &Accum)
        .unwrap();
    let mut out = vec![0.0; 8];
    s.pull_range(KeyRange::new(66, 74), &mut out).unwrap();
    assert_eq!(out, [1.0, 1.0, 1.0, 3.0, 1.0, 0.0, 0.0, 0.0]);
    // A second range push only fills the gaps.
    s.push_range(KeyRange::new(30, 80), &[0.0; 50], &Sum)
        .unwrap();
    assert_eq!(
        s.dense_ranges(),
        [
            KeyRange::new(30, 40),
            KeyRange::new(40, 50),
            KeyRange::new(50, 70),
            KeyRange::new(70, 80)
        ]
    );
    s.check_invariants();
    let mut keys = Vec::new();
    s.for_each(|k, _| keys.push(k));
    let want: Vec<u64> = std::iter::once(10).chain(30..80).chain([90]).collect();
    assert_eq!(keys, want);
}

#[test]
fn one_key_gaps_between_blocks_get_their_own_block() {
    let cfg = StoreConfig {
        shards: 1,
        ..StoreConfig::default()
    };
    let s = Store::<f32>::new(KeyRange::new(0, 100), cfg).unwrap();
    s.push(&[20, 31], &[5.0, 6.0], &Sum).unwrap();
    s.push_range(KeyRange::new(10, 20), &[1.0; 10], &Sum)
        .unwrap();
    s.push_range(KeyRange::new(21, 30), &[1.0; 9], &Sum)
        .unwrap();
    s.push_range(KeyRange::new(5, 35), &[1.0; 30], &Sum)
        .unwrap();
    assert_eq!(
        s.dense_ranges(),
        [
            KeyRange::new(5, 10),
            KeyRange::new(10, 20),
            KeyRange::new(20, 21),
            KeyRange::new(21, 30),
            KeyRange::new(30, 35)
        ]
    );
    let mut out = [0.0f32; 32];
    s.pull_range(KeyRange::new(4, 36), &mut out).unwrap();
    let mut want = [1.0f32; 32];
    want[0] = 0.0;
    want[31] = 0.0;
    for k in (10..20).chain(21..30) {
        want[k - 4] = 2.0;
    }
    want[20 - 4] = 6.0;
    want[31 - 4] = 7.0;
    assert_eq!(out, want);
    s.check_invariants();
}

#[test]
fn concurrent_sums_are_exact() {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 40;
    let cfg = StoreConfig {
        shards: 8,
        value_len: 2,
        sparse_initial_keys: 0,
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::<f32>::new(KeyRange::new(0, 1 << 20), cfg).unwrap());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    // Overlapping key lists: every thread pushes the multiples of 3 (and its
                    // own residue class), some as ranges that turn parts dense mid-run.
                    let keys: Vec<u64> = (0..20_000u64)
                        .map(|i| i * 40)
                        .filter(|k| k % 3 == 0 || k % THREADS == t)
                        .collect();
                    let grads: Vec<f32> = keys.iter().flat_map(|_| [1.0, 2.0]).collect();
                    store.push(&keys, &grads, &Sum).unwrap();
                    if round % 10 == t {
                        let r = KeyRange::new(round * 5000, round * 5000 + 3000);
                        store.push_range(r, &vec![1.0; 6000], &Sum).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    store.check_invariants();
    let mut want: BTreeMap<u64, f32> = BTreeMap::new();
    for t in 0..THREADS {
        for round in 0..ROUNDS {
            for k in (0..20_000u64).map(|i| i * 40) {
                if k % 3 == 0 || k % THREADS == t {
                    *want.entry(k).or_default() += 1.0;
                }
            }
            if round % 10 == t {
                for k in round * 5000..round * 5000 + 3000 {
                    *want.entry(k).or_default() += 1.0;
                }
            }
        }
    }
    let mut checked = 0;
    store.for_each(|k, w| {
        let n = want.get(&k).copied().unwrap_or(0.0);
        let pushed_as_list = k % 40 == 0 && k < 800_000;
        let list_sum = if pushed_as_list {
            (0..THREADS)
                .filter(|t| k % 3 == 0 || k % THREADS == *t)
                .count() as f32
                * ROUNDS as f32
        } else {
            0.0
        };
        assert_eq!(w[0], n, "key {k}");
        assert_eq!(w[1], n + list_sum, "key {k}");
        checked += 1;
    });
    assert_eq!(checked as usize, want.len());
}

#[test]
fn with_dense_range_lends_the_blocks_or_says_none() {
    let range = KeyRange::new(0, 1 << 20);
    let store: Store<f32> = Store::new(
        range,
        StoreConfig {
            shards: 4,
            value_len: 2,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    // Nothing dense yet: None, and `f` is not called.
    let r = KeyRange::new(100, 300_000);
    assert!(store
        .with_dense_range(r, |_| panic!("not dense"))
        .unwrap()
        .is_none());
    // A dense range across shard boundaries: the parts concatenate to what pull_range reads.
    let grads: Vec<f32> = (0..r.len() * 2).map(|i| i as f32).collect();
    store.push_range(r, &grads, &Assign).unwrap();
    let lent = store
        .with_dense_range(r, |parts| {
            assert!(parts.len() > 1, "the range spans shards");
            parts.concat()
        })
        .unwrap()
        .unwrap();
    assert_eq!(lent, grads);
    // A sub-range, and a range sticking out of the dense part.
    let sub = KeyRange::new(200, 400);
    let lent = store
        .with_dense_range(sub, |p| p.concat())
        .unwrap()
        .unwrap();
    assert_eq!(lent, grads[200..600]);
    assert!(store
        .with_dense_range(KeyRange::new(50, 400), |_| ())
        .unwrap()
        .is_none());
    // Outside the store's range: an error.
    assert!(store
        .with_dense_range(KeyRange::new(1 << 20, (1 << 20) + 1), |_| ())
        .is_err());
}

/// The capacity a table grown for `n` keys gets: the smallest power of two whose load
/// limit (3/5) holds them (as `table::Geom::cap_for`).
fn cap_for(n: usize) -> usize {
    ((n * 5).div_ceil(3) + 1).next_power_of_two()
}

/// `(keys, capacity, times grown)` of each shard's sparse table.
fn tables<T: Value>(s: &Store<T>) -> Vec<(usize, usize, u32)> {
    s.shards
        .iter()
        .map(|c| {
            let shard = c.0.lock();
            (
                shard.table.len(),
                shard.table.capacity(),
                shard.table.grown(),
            )
        })
        .collect()
}

/// Push `keys` into a fresh store of `cfg` and check each value against the model, the
/// store's invariants, and that every table grew at most once, to the exact size.
fn check_first_insert<T: Value>(cfg: StoreConfig, range: KeyRange, keys: &[u64]) {
    let store = Store::<T>::new(range, cfg.clone()).unwrap();
    let initial: Vec<usize> = tables(&store).iter().map(|t| t.1).collect();
    let vl = cfg.value_len;
    let g: Vec<T> = grads(keys.len() * vl, 3);
    let mut model = Model::new(&store, cfg.dense_max_bytes);
    let f = Accum;
    let f: &dyn UpdateFn<T> = if cfg.state_len >= 1 { &f } else { &Sum };
    store.push(keys, &g, f).unwrap();
    model.push(keys, &g, f, None);
    model.check(&store);
    store.check_invariants();
    for ((n, cap, grown), cap0) in tables(&store).into_iter().zip(initial) {
        if n * 5 <= cap0 * 3 {
            assert_eq!((cap, grown), (cap0, 0), "a table that held its keys grew");
        } else {
            assert_eq!(grown, 1, "a table of {n} new keys grew more than once");
            assert_eq!(cap, cap_for(n), "a table of {n} new keys sized wrong");
        }
    }
    // The same keys again: nothing new, nothing grows.
    let before = tables(&store);
    store.push(keys, &g, f).unwrap();
    model.push(keys, &g, f, None);
    model.check(&store);
    assert_eq!(tables(&store), before);
}

#[test]
fn a_batch_of_new_keys_sizes_each_table_once() {
    let range = KeyRange::new(1 << 20, 1 << 40);
    // Spread over the shards, and all in one shard (sequential keys).
    let spread: Vec<u64> = (0..30_000u64).map(|i| (1 << 20) + i * 36_599_989).collect();
    let packed: Vec<u64> = (0..30_000u64).map(|i| (1 << 20) + i).collect();
    for keys in [&spread, &packed] {
        for (vl, sl) in [(1, 0), (1, 1), (2, 0), (3, 2)] {
            let cfg = StoreConfig {
                shards: 4,
                value_len: vl,
                state_len: sl,
                sparse_initial_keys: 0,
                ..StoreConfig::default()
            };
            check_first_insert::<f32>(cfg.clone(), range, keys);
            check_first_insert::<f64>(cfg, range, keys);
        }
    }
}

#[test]
fn a_mix_of_held_and_new_keys_grows_once_for_the_new_ones() {
    let cfg = StoreConfig {
        shards: 1,
        value_len: 1,
        state_len: 1,
        sparse_initial_keys: 0,
        ..StoreConfig::default()
    };
    let store = Store::<f32>::new(KeyRange::new(0, 1 << 40), cfg.clone()).unwrap();
    let mut model = Model::new(&store, cfg.dense_max_bytes);
    // Fill the table to just below its load limit with even keys.
    let (_, cap0, _) = tables(&store)[0];
    let held: Vec<u64> = (0..(cap0 * 3 / 5) as u64 - 1).map(|i| i * 2).collect();
    let g: Vec<f32> = grads(held.len(), 1);
    store.push(&held, &g, &Accum).unwrap();
    model.push(&held, &g, &Accum, None);
    assert_eq!(tables(&store)[0], (held.len(), cap0, 0));
    // Every held key again, interleaved with 5000 new odd keys: the insert stops at the
    // first new key past the load limit and grows once, for exactly the new keys of the
    // request.
    let end = (held.len() as u64 * 2).max(10_000);
    let mixed: Vec<u64> = (0..end)
        .filter(|k| (k % 2 == 0 && *k < held.len() as u64 * 2) || k % 2 == 1)
        .collect();
    let new = mixed.len() - held.len();
    assert_eq!(new, 5000);
    let g: Vec<f32> = grads(mixed.len(), 2);
    let mut out = Vec::new();
    let mut got = vec![0f32; mixed.len()];
    store.push_pull(&mixed, &g, &Accum, &mut got).unwrap();
    model.push(&mixed, &g, &Accum, Some(&mut out));
    assert_eq!(got, out);
    model.check(&store);
    store.check_invariants();
    let (n, cap, grown) = tables(&store)[0];
    assert_eq!(n, held.len() + new);
    assert_eq!(grown, 1);
    assert_eq!(cap, cap_for(n).max(cap0 * 2));
}

#[test]
fn a_bulk_of_new_keys_into_a_full_table_grows_once_for_all_of_them() {
    let cfg = StoreConfig {
        shards: 1,
        value_len: 1,
        state_len: 1,
        sparse_initial_keys: 0,
        ..StoreConfig::default()
    };
    let store = Store::<f32>::new(KeyRange::new(0, 1 << 40), cfg.clone()).unwrap();
    let mut model = Model::new(&store, cfg.dense_max_bytes);
    // Fill the table to just below its load limit with keys 0, 20, 40, ...
    let (_, cap0, _) = tables(&store)[0];
    let held: Vec<u64> = (0..(cap0 * 3 / 5) as u64 - 1).map(|i| i * 20).collect();
    let g: Vec<f32> = grads(held.len(), 1);
    store.push(&held, &g, &Accum).unwrap();
    model.push(&held, &g, &Accum, None);
    // Every held key again and ten new ones after each: the keys left when the insert
    // stops outnumber the held ones more than eightfold, so the table grows once for all
    // of them (held ones included: at most an eighth too many), without counting.
    let bulk: Vec<u64> = held
        .iter()
        .flat_map(|&k| (0..11).map(move |i| k + i))
        .collect();
    let g: Vec<f32> = grads(bulk.len(), 2);
    store.push(&bulk, &g, &Accum).unwrap();
    model.push(&bulk, &g, &Accum, None);
    model.check(&store);
    store.check_invariants();
    let (n, cap, grown) = tables(&store)[0];
    assert_eq!(n, bulk.len());
    assert_eq!(grown, 1);
    assert!(cap >= cap_for(n), "a table of {n} keys has {cap} buckets");
    assert!(
        cap <= cap_for(n + n / 8),
        "a table of {n} keys has {cap} buckets"
    );
}

#[test]
fn a_batch_with_a_duplicate_key_is_refused_before_anything_is_allocated() {
    let cfg = StoreConfig {
        shards: 2,
        sparse_initial_keys: 0,
        ..StoreConfig::default()
    };
    let store = Store::<f32>::new(KeyRange::new(0, 1 << 30), cfg).unwrap();
    let mut keys: Vec<u64> = (0..20_000u64).map(|i| i * 3).collect();
    keys[10_000] = keys[9_999];
    let before = (snapshot(&store), tables(&store));
    let err = store.push(&keys, &vec![1.0; keys.len()], &Sum).unwrap_err();
    assert!(matches!(err, StoreError::KeysNotSorted { index: 10_000 }));
    assert_eq!((snapshot(&store), tables(&store)), before);
}

#[test]
fn two_threads_inserting_new_keys_at_once_lose_nothing() {
    const ROUNDS: u64 = 20;
    let cfg = StoreConfig {
        shards: 4,
        value_len: 1,
        sparse_initial_keys: 0,
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::<f32>::new(KeyRange::new(0, 1 << 40), cfg).unwrap());
    // Each round, both threads push a batch of keys never seen before: the multiples of
    // 3 of the round's window (pushed by both, so one of them inserts each) and the
    // thread's own residue class mod 3 of it (new to the store).
    let batch = |t: u64, round: u64| -> Vec<u64> {
        let base = round * 1_000_000;
        (base..base + 60_000)
            .filter(|k| k % 3 == 0 || k % 3 == t + 1)
            .map(|k| k * 7)
            .collect()
    };
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    let keys = batch(t, round);
                    barrier.wait();
                    store.push(&keys, &vec![1.0; keys.len()], &Sum).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    store.check_invariants();
    let mut want: BTreeMap<u64, f32> = BTreeMap::new();
    for t in 0..2 {
        for round in 0..ROUNDS {
            for k in batch(t, round) {
                *want.entry(k).or_default() += 1.0;
            }
        }
    }
    assert_eq!(store.key_count(), want.len() as u64);
    let keys: Vec<u64> = want.keys().copied().collect();
    let mut out = vec![0f32; keys.len()];
    store.pull(&keys, &mut out).unwrap();
    for (k, w) in keys.iter().zip(&out) {
        assert_eq!(*w, want[k], "key {k}");
    }
}
