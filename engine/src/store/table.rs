//! The sparse part of one shard: an open-addressing hash table with linear probing whose
//! buckets live in one [`PinnedRegion`].
//!
//! A bucket is `[key: u64][value_len T weights][value_len * state_len T state]`, padded to
//! whole `u64` words, so a key, its weights and its state share one cache miss (for small
//! values). The key word holds the key's complement ([`word`]), so an empty bucket (the
//! key [`EMPTY`], `u64::MAX`, never a valid key) is all zero words: key word, weights and
//! state. That invariant is what lets an insert just write the key word, and a table
//! start from a freshly mapped region (zeroed by the kernel) with nothing written.
//! Keys are hashed multiplicatively (Fibonacci hashing: the top bits of `key * 2^64/phi`).
//! The table doubles (rehashing into a fresh region) when an insert would take the load
//! above 0.6. Deletion (only when a dense block takes keys over) shifts later entries of
//! the probe run back, so there are no tombstones.
//!
//! The per-key loops are software-pipelined: while key `i` is probed, the home bucket of
//! key `i + PREFETCH_AHEAD` is prefetched, so the cache misses of a request overlap.

use std::marker::PhantomData;

use pserv_sys::{prefetch_read, PinnedRegion, RegionError};

use super::Rule;
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::update::UpdateFn;

/// The key of an empty bucket. Never a valid key (key ranges end at `u64::MAX`).
pub(super) const EMPTY: u64 = u64::MAX;

/// The key word of an empty bucket: [`word`]`(EMPTY)`, zero, so that a freshly mapped
/// region (zeroed by the kernel) is a table of empty buckets without a pass writing them.
const EMPTY_WORD: u64 = 0;

/// The word a key is stored as in its bucket: its complement, so that [`EMPTY`] is the
/// zero word ([`EMPTY_WORD`]). [`key_of`] undoes it.
#[inline(always)]
const fn word(key: u64) -> u64 {
    !key
}

/// The key a bucket's key word holds (the inverse of [`word`]).
#[inline(always)]
const fn key_of(word: u64) -> u64 {
    !word
}

/// 2^64 / golden ratio, odd: the multiplier of Fibonacci hashing.
const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

/// How many keys ahead the per-key loops prefetch a home bucket.
pub(super) const PREFETCH_AHEAD: usize = 32;

/// A table at its load limit grows for all the keys of a request left to insert, without
/// counting which of them it holds, when they are at least this many times the keys it
/// holds (so at most `1 / BULK_RATIO` of them can be held already).
const BULK_RATIO: usize = 8;

/// Load factor limit: grow when `len` would pass `cap * LOAD_NUM / LOAD_DEN`.
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 5;

/// The first bucket at or after `home` (linear probing order) whose key word is `w` (a
/// key's [`word`]) or that is empty, in a pair-shaped table (`pairs.len()` a power of two).
#[inline(always)]
fn probe_pair(pairs: &[[u64; 2]], home: usize, w: u64) -> usize {
    let mask = pairs.len() - 1;
    let mut b = home & mask;
    loop {
        let k = pairs[b][0];
        if k == w || k == EMPTY_WORD {
            return b;
        }
        b = (b + 1) & mask;
    }
}

/// A pair-shaped table of `cap` buckets in `region`, as `[key, value word]` pairs.
fn pairs_mut(region: &mut PinnedRegion, cap: usize) -> &mut [[u64; 2]] {
    let words: &mut [u64] = region.as_mut_slice();
    bytemuck::cast_slice_mut(&mut words[..cap * 2])
}

/// The shape of a table: everything the per-key loops need, copied into registers.
#[derive(Clone, Copy, Debug)]
struct Geom {
    /// `u64` words per bucket (the key word included).
    stride: usize,
    /// Weights per key.
    vl: usize,
    /// State elements per key (`vl * state_len`).
    sl: usize,
    /// Number of buckets, a power of two.
    cap: usize,
    mask: usize,
    /// `64 - log2(cap)`.
    shift: u32,
    /// Largest `len` reached by inserting without growing first.
    grow_at: usize,
}

impl Geom {
    fn new<T>(vl: usize, sl: usize, cap: usize) -> Geom {
        assert!(
            cap.is_power_of_two(),
            "table capacity {cap} is not a power of two"
        );
        assert!(cap >= 2, "table capacity {cap} below 2");
        let value_bytes = (vl + sl) * std::mem::size_of::<T>();
        Geom {
            stride: 1 + value_bytes.div_ceil(8),
            vl,
            sl,
            cap,
            mask: cap - 1,
            shift: 64 - cap.trailing_zeros(),
            grow_at: (cap * LOAD_NUM / LOAD_DEN).max(1),
        }
    }

    /// The home bucket of `key`.
    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(FIB) >> self.shift) as usize
    }

    /// Whether buckets are two words holding one weight (the fast path).
    fn is_pair(&self) -> bool {
        self.stride == 2 && self.vl == 1
    }

    /// The smallest capacity that holds `keys` keys within the load limit, at least `min`.
    fn cap_for(keys: usize, min: usize) -> usize {
        (keys.saturating_mul(LOAD_DEN).div_ceil(LOAD_NUM) + 1)
            .next_power_of_two()
            .max(min)
            .max(2)
    }
}

/// The sparse hash table of one shard. See the module doc for the layout.
pub(super) struct Table<T> {
    region: PinnedRegion,
    g: Geom,
    /// Occupied buckets.
    len: usize,
    /// Times the table has grown (rehashed into a larger region) since it was created.
    grown: u32,
    _values: PhantomData<fn() -> T>,
}

impl<T: Value> Table<T> {
    /// A table for `vl` weights and `sl` state elements per key, sized to hold
    /// `initial_keys` keys without growing (and at least one page of buckets).
    pub(super) fn new(vl: usize, sl: usize, initial_keys: usize) -> Result<Self, RegionError> {
        assert!(vl > 0, "value_len must be positive");
        let stride_bytes = Geom::new::<T>(vl, sl, 2).stride * 8;
        let page_fit = pserv_sys::page_size() / stride_bytes;
        let min = if page_fit >= 2 {
            // Largest power of two not above page_fit.
            1usize << (usize::BITS - 1 - page_fit.leading_zeros())
        } else {
            2
        };
        Self::with_capacity(vl, sl, Geom::cap_for(initial_keys, min))
    }

    fn with_capacity(vl: usize, sl: usize, cap: usize) -> Result<Self, RegionError> {
        let g = Geom::new::<T>(vl, sl, cap);
        // Zeroed by the kernel: every bucket already holds EMPTY_WORD and zero values.
        let region = PinnedRegion::new(cap * g.stride * 8)?;
        debug_assert!(
            region.as_slice::<u64>()[..cap * g.stride]
                .iter()
                .all(|&w| w == 0),
            "a fresh region is not zeroed"
        );
        Ok(Table {
            region,
            g,
            len: 0,
            grown: 0,
            _values: PhantomData,
        })
    }

    /// Keys stored.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Number of buckets.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.g.cap
    }

    /// Times the table has grown since it was created.
    #[cfg(test)]
    pub(super) fn grown(&self) -> u32 {
        self.grown
    }

    /// Pinned bytes held.
    pub(super) fn bytes(&self) -> u64 {
        self.region.len() as u64
    }

    /// Grow to the smallest capacity above the current one that holds `keys` keys.
    fn grow_for(&mut self, keys: usize) -> Result<(), RegionError> {
        let cap = Geom::cap_for(keys, self.g.cap * 2);
        let mut next = Table::<T>::with_capacity(self.g.vl, self.g.sl, cap)?;
        {
            let g = next.g;
            debug_assert_eq!(
                g.stride, self.g.stride,
                "a grown table has another bucket size"
            );
            let old: &[u64] = self.region.as_slice();
            let new: &mut [u64] = next.region.as_mut_slice();
            let mut moved = 0;
            for bucket in old[..self.g.cap * g.stride].chunks_exact(g.stride) {
                if bucket[0] == EMPTY_WORD {
                    continue;
                }
                let mut b = g.home(key_of(bucket[0]));
                while new[b * g.stride] != EMPTY_WORD {
                    b = (b + 1) & g.mask;
                }
                new[b * g.stride..(b + 1) * g.stride].copy_from_slice(bucket);
                moved += 1;
            }
            debug_assert_eq!(
                moved, self.len,
                "rehashing moved another number of keys than stored"
            );
        }
        next.len = self.len;
        next.grown = self.grown + 1;
        *self = next;
        debug_assert!(
            self.len < self.g.grow_at,
            "a table grown for {keys} keys is at its load limit with {}",
            self.len
        );
        Ok(())
    }

    /// Apply `grads` (`keys.len() * vl` elements) to `keys` with `rule`, inserting keys not
    /// present with zero weights and state first; with `OUT`, copy the new weights into
    /// `out` (same length as `grads`).
    ///
    /// On `Err` (the table could not grow and is full) the keys before the failing one are
    /// applied: only an allocation failure of the operating system gets there.
    pub(super) fn push<F: UpdateFn<T> + ?Sized, const OUT: bool>(
        &mut self,
        keys: &[u64],
        grads: &[T],
        rule: &Rule<'_, F>,
        out: &mut [T],
    ) -> Result<(), RegionError> {
        debug_assert_eq!(
            grads.len(),
            keys.len() * self.g.vl,
            "gradients do not match the keys"
        );
        debug_assert_eq!(
            out.len(),
            if OUT { grads.len() } else { 0 },
            "output buffer does not match the keys"
        );
        let mut done = 0;
        let mut may_grow = true;
        if self.len == 0 && keys.len() > self.g.grow_at {
            // Every key is new (they are distinct): size the table for all of them at
            // once rather than growing (and rehashing) on the way. On failure the loop
            // below grows step by step as usual.
            if let Err(err) = self.grow_for(keys.len()) {
                tracing::debug!(error = %err, keys = keys.len(),
                    "could not size a sparse table for a batch of new keys");
            }
        }
        loop {
            done = if self.g.is_pair() {
                self.push_run_pair::<F, OUT>(done, keys, grads, rule, out, may_grow)
            } else {
                self.push_run::<F, OUT>(done, keys, grads, rule, out, may_grow)
            };
            // An empty bucket is left, so every probe ends.
            debug_assert!(
                self.len < self.g.cap,
                "a sparse table of {} buckets holds {} keys",
                self.g.cap,
                self.len
            );
            if done == keys.len() {
                return Ok(());
            }
            // keys[done] is new and the table is at its load limit: grow once, for
            // the keys of the request it does not hold yet.
            let want = self.len + self.new_at_most(&keys[done..]);
            match self.grow_for(want) {
                Ok(()) => may_grow = true,
                Err(err) if !may_grow || self.len + 1 >= self.g.cap => return Err(err),
                Err(err) => {
                    // Keep serving above the load limit; a later request tries again.
                    tracing::warn!(error = %err, len = self.len, cap = self.g.cap,
                        "could not grow a sparse table; continuing above its load limit");
                    may_grow = false;
                }
            }
        }
    }

    /// How many of `keys` (distinct, the first of them new) the table may have to take:
    /// exactly the ones it does not hold ([`count_new`](Self::count_new)), or all of
    /// them when they are at least [`BULK_RATIO`] times the keys it holds. At least
    /// `keys.len() - len` of them are new then, so all of them is at most `1 /
    /// BULK_RATIO` too many, and a bulk insert into a table at its load limit skips a
    /// probe per key.
    fn new_at_most(&self, keys: &[u64]) -> usize {
        if keys.len() >= self.len.saturating_mul(BULK_RATIO) {
            return keys.len();
        }
        let new = self.count_new(keys);
        debug_assert!(new >= 1, "the key that stopped the insert loop is new");
        new
    }

    /// How many of `keys` (distinct) the table does not hold: a probe of each, pipelined
    /// like the push loops (it runs only before the table grows, which rehashes every key
    /// it holds anyway).
    fn count_new(&self, keys: &[u64]) -> usize {
        let g = self.g;
        let words: &[u64] = self.region.as_slice();
        let mut new = 0;
        for (i, &key) in keys.iter().enumerate() {
            if let Some(&ahead) = keys.get(i + PREFETCH_AHEAD) {
                prefetch_read(&words[g.home(ahead) * g.stride]);
            }
            let w = word(key);
            let mut b = g.home(key);
            loop {
                let k = words[b * g.stride];
                if k == w {
                    break;
                }
                if k == EMPTY_WORD {
                    new += 1;
                    break;
                }
                b = (b + 1) & g.mask;
            }
        }
        new
    }

    /// The pipelined loop of [`push`](Self::push) from key `start`. Returns where it
    /// stopped: `keys.len()`, or the index of a new key that needs the table to grow first.
    #[inline(always)]
    fn push_run<F: UpdateFn<T> + ?Sized, const OUT: bool>(
        &mut self,
        start: usize,
        keys: &[u64],
        grads: &[T],
        rule: &Rule<'_, F>,
        out: &mut [T],
        may_grow: bool,
    ) -> usize {
        let g = self.g;
        let vl = g.vl;
        let limit = if may_grow { g.grow_at } else { g.cap - 1 };
        let words: &mut [u64] = self.region.as_mut_slice();
        let mut len = self.len;
        for i in start..keys.len() {
            if let Some(&ahead) = keys.get(i + PREFETCH_AHEAD) {
                prefetch_read(&words[g.home(ahead) * g.stride]);
            }
            let key = keys[i];
            debug_assert_ne!(key, EMPTY, "the empty-bucket key pushed");
            let w = word(key);
            let mut b = g.home(key);
            loop {
                let k = words[b * g.stride];
                if k == w {
                    break;
                }
                if k == EMPTY_WORD {
                    if len >= limit {
                        self.len = len;
                        return i;
                    }
                    words[b * g.stride] = w;
                    len += 1;
                    break;
                }
                b = (b + 1) & g.mask;
            }
            let base = b * g.stride;
            let vals: &mut [T] = bytemuck::cast_slice_mut(&mut words[base + 1..base + g.stride]);
            let (w, rest) = vals.split_at_mut(vl);
            rule.apply(w, &mut rest[..g.sl], &grads[i * vl..(i + 1) * vl]);
            if OUT {
                out[i * vl..(i + 1) * vl].copy_from_slice(w);
            }
        }
        self.len = len;
        keys.len()
    }

    /// [`push_run`](Self::push_run) for the commonest shape, one weight and a bucket of
    /// two words (f32 or f64 weights, f32 with one state element): the buckets viewed as
    /// `[u64; 2]` pairs, so the compiler sees the accesses in bounds and keeps the loop
    /// short (about twice as fast as the general loop on cache-resident tables).
    #[inline(always)]
    fn push_run_pair<F: UpdateFn<T> + ?Sized, const OUT: bool>(
        &mut self,
        start: usize,
        keys: &[u64],
        grads: &[T],
        rule: &Rule<'_, F>,
        out: &mut [T],
        may_grow: bool,
    ) -> usize {
        let g = self.g;
        debug_assert!(g.is_pair(), "pair loop on a table of another shape");
        let limit = if may_grow { g.grow_at } else { g.cap - 1 };
        let n = keys.len();
        let grads = &grads[..n];
        let out = &mut out[..if OUT { n } else { 0 }];
        // Sliced to `mask + 1` so that indexing with `& mask` needs no bounds check.
        let pairs = &mut pairs_mut(&mut self.region, g.cap)[..=g.mask];
        let mut len = self.len;
        // One key: probe, insert if new, apply. A macro rather than a closure so the two
        // loops below keep everything in registers.
        macro_rules! step {
            ($i:expr) => {{
                let i = $i;
                let key = keys[i];
                debug_assert_ne!(key, EMPTY, "the empty-bucket key pushed");
                let w = word(key);
                let b = probe_pair(pairs, g.home(key), w);
                let bucket = &mut pairs[b];
                if bucket[0] != w {
                    if len >= limit {
                        self.len = len;
                        return i;
                    }
                    bucket[0] = w;
                    len += 1;
                }
                let vals: &mut [T] = bytemuck::cast_slice_mut(&mut bucket[1..]);
                let (w, s) = vals.split_at_mut(1);
                rule.apply(w, &mut s[..g.sl], std::slice::from_ref(&grads[i]));
                if OUT {
                    out[i] = w[0];
                }
            }};
        }
        // Keys with a key PREFETCH_AHEAD positions later prefetch its home bucket; the
        // last ones have nothing left to prefetch.
        let split = n.saturating_sub(PREFETCH_AHEAD).max(start);
        let mut i = start;
        while i < split {
            prefetch_read(&pairs[g.home(keys[i + PREFETCH_AHEAD]) & g.mask]);
            step!(i);
            i += 1;
        }
        while i < n {
            step!(i);
            i += 1;
        }
        self.len = len;
        n
    }

    /// The buckets as `[key, value word]` pairs (pair shape only).
    fn pairs(&self) -> &[[u64; 2]] {
        debug_assert!(self.g.is_pair(), "pair view of a table of another shape");
        let words: &[u64] = self.region.as_slice();
        bytemuck::cast_slice(&words[..self.g.cap * 2])
    }

    /// Copy the weights of the `n` keys `key_at(0..n)` (ascending) into `out`
    /// (`n * vl` elements); keys not present read as zero.
    pub(super) fn pull(&self, n: usize, key_at: impl Fn(usize) -> u64, out: &mut [T]) {
        debug_assert_eq!(
            out.len(),
            n * self.g.vl,
            "output buffer does not match the keys"
        );
        if self.len == 0 {
            out.fill(T::default());
        } else if self.g.is_pair() {
            self.pull_run_pair(n, key_at, out);
        } else {
            self.pull_run(n, key_at, out);
        }
    }

    /// Copy the weights of every key of `range` into `out` (`range.len() * vl`); keys not
    /// present read as zero. Probes each key, or scans the table when that is shorter.
    pub(super) fn pull_range(&self, range: KeyRange, out: &mut [T]) {
        let n = range.len() as usize;
        if self.len == 0 || n <= self.g.cap {
            return self.pull(n, |i| range.begin + i as u64, out);
        }
        debug_assert_eq!(
            out.len(),
            n * self.g.vl,
            "output buffer does not match the range"
        );
        out.fill(T::default());
        let vl = self.g.vl;
        for (k, b) in self.occupied() {
            if range.contains(k) {
                let i = (k - range.begin) as usize;
                out[i * vl..(i + 1) * vl].copy_from_slice(self.weights_at(b));
            }
        }
    }

    #[inline(always)]
    fn pull_run(&self, n: usize, key_at: impl Fn(usize) -> u64, out: &mut [T]) {
        let g = self.g;
        let vl = g.vl;
        let words: &[u64] = self.region.as_slice();
        for (i, o) in out.chunks_exact_mut(vl).enumerate().take(n) {
            if i + PREFETCH_AHEAD < n {
                prefetch_read(&words[g.home(key_at(i + PREFETCH_AHEAD)) * g.stride]);
            }
            let key = key_at(i);
            let w = word(key);
            let mut b = g.home(key);
            loop {
                let k = words[b * g.stride];
                if k == w {
                    let base = b * g.stride;
                    let vals: &[T] = bytemuck::cast_slice(&words[base + 1..base + g.stride]);
                    o.copy_from_slice(&vals[..vl]);
                    break;
                }
                if k == EMPTY_WORD {
                    o.fill(T::default());
                    break;
                }
                b = (b + 1) & g.mask;
            }
        }
    }

    /// [`pull_run`](Self::pull_run) for two-word buckets with one weight.
    #[inline(always)]
    fn pull_run_pair(&self, n: usize, key_at: impl Fn(usize) -> u64, out: &mut [T]) {
        let g = self.g;
        if n == 0 {
            return;
        }
        let out = &mut out[..n];
        let pairs = &self.pairs()[..=g.mask];
        let step = |i: usize| {
            let key = key_at(i);
            let w = word(key);
            let b = probe_pair(pairs, g.home(key), w);
            let bucket = &pairs[b];
            let vals: &[T] = bytemuck::cast_slice(&bucket[1..]);
            if bucket[0] == w {
                vals[0]
            } else {
                T::default()
            }
        };
        let split = n.saturating_sub(PREFETCH_AHEAD);
        let (head, tail) = out.split_at_mut(split);
        for (i, o) in head.iter_mut().enumerate() {
            prefetch_read(&pairs[g.home(key_at(i + PREFETCH_AHEAD)) & g.mask]);
            *o = step(i);
        }
        for (i, o) in tail.iter_mut().enumerate() {
            *o = step(split + i);
        }
    }

    /// Append the weights and the state of the ascending `keys` to `w` (`vl` elements a
    /// key) and `s` (`sl` a key); keys not present read as zero (and are not inserted).
    /// Pipelined like the push and pull loops.
    pub(super) fn read_entries(&self, keys: &[u64], w: &mut Vec<T>, s: &mut Vec<T>) {
        let g = self.g;
        if self.len == 0 {
            w.resize(w.len() + keys.len() * g.vl, T::default());
            s.resize(s.len() + keys.len() * g.sl, T::default());
            return;
        }
        let words: &[u64] = self.region.as_slice();
        for (i, &key) in keys.iter().enumerate() {
            if let Some(&ahead) = keys.get(i + PREFETCH_AHEAD) {
                prefetch_read(&words[g.home(ahead) * g.stride]);
            }
            match self.find(key) {
                Some(b) => {
                    let v = self.values_at(b);
                    w.extend_from_slice(&v[..g.vl]);
                    s.extend_from_slice(&v[g.vl..]);
                }
                None => {
                    w.resize(w.len() + g.vl, T::default());
                    s.resize(s.len() + g.sl, T::default());
                }
            }
        }
    }

    /// The bucket holding `key`, if present.
    fn find(&self, key: u64) -> Option<usize> {
        let g = self.g;
        let words: &[u64] = self.region.as_slice();
        let w = word(key);
        let mut b = g.home(key);
        loop {
            match words[b * g.stride] {
                k if k == w => return Some(b),
                EMPTY_WORD => return None,
                _ => b = (b + 1) & g.mask,
            }
        }
    }

    /// The weights and state of bucket `b`, `vl + sl` elements.
    fn values_at(&self, b: usize) -> &[T] {
        let g = self.g;
        // The region is rounded up to pages: a bucket past `cap` would read as one.
        debug_assert!(b < g.cap, "bucket {b} of a table of {}", g.cap);
        let words: &[u64] = self.region.as_slice();
        let vals: &[T] = bytemuck::cast_slice(&words[b * g.stride + 1..(b + 1) * g.stride]);
        &vals[..g.vl + g.sl]
    }

    /// Remove every key in `range`, handing each to `sink` with its weights and state
    /// (`vl + sl` elements), in no particular order.
    pub(super) fn take_range(&mut self, range: KeyRange, mut sink: impl FnMut(u64, &[T])) {
        if self.len == 0 || range.is_empty() {
            return;
        }
        let found: Vec<(u64, usize)> = if range.len() <= (self.g.cap / 8) as u64 {
            // Short range: probe each key.
            (range.begin..range.end)
                .filter_map(|k| self.find(k).map(|b| (k, b)))
                .collect()
        } else {
            self.occupied()
                .filter(|&(k, _)| range.contains(k))
                .collect()
        };
        for (key, _) in found {
            // Look up again: removing an earlier key may have shifted this one.
            let b = self
                .find(key)
                .expect("a key found in this table is still there");
            sink(key, self.values_at(b));
            self.remove_at(b);
        }
    }

    /// Remove the entry in bucket `hole` (backward-shift deletion: move later members of
    /// the probe run into the hole while that keeps each reachable from its home bucket).
    fn remove_at(&mut self, mut hole: usize) {
        let g = self.g;
        debug_assert!(hole < g.cap, "bucket {hole} of a table of {}", g.cap);
        let words: &mut [u64] = self.region.as_mut_slice();
        debug_assert_ne!(
            words[hole * g.stride],
            EMPTY_WORD,
            "removing an empty bucket"
        );
        let mut j = hole;
        loop {
            j = (j + 1) & g.mask;
            let k = words[j * g.stride];
            if k == EMPTY_WORD {
                break;
            }
            let h = g.home(key_of(k));
            // The entry at j must stay if its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                words.copy_within(j * g.stride..(j + 1) * g.stride, hole * g.stride);
                hole = j;
            }
        }
        let bucket = &mut words[hole * g.stride..(hole + 1) * g.stride];
        bucket.fill(0);
        debug_assert_eq!(bucket[0], EMPTY_WORD, "an empty bucket's key word is zero");
        self.len -= 1;
    }

    /// `(key, bucket)` of every occupied bucket, in bucket order.
    fn occupied(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        let g = self.g;
        let words: &[u64] = self.region.as_slice();
        words[..g.cap * g.stride]
            .chunks_exact(g.stride)
            .enumerate()
            .filter(|(_, bucket)| bucket[0] != EMPTY_WORD)
            .map(|(b, bucket)| (key_of(bucket[0]), b))
    }

    /// `(key, bucket)` of every key, ascending by key.
    pub(super) fn sorted_entries(&self) -> Vec<(u64, usize)> {
        let mut v: Vec<(u64, usize)> = self.occupied().collect();
        v.sort_unstable_by_key(|&(k, _)| k);
        v
    }

    /// The weights in bucket `b`.
    pub(super) fn weights_at(&self, b: usize) -> &[T] {
        &self.values_at(b)[..self.g.vl]
    }

    /// Keys with a non-zero weight element.
    pub(super) fn nonzero(&self) -> u64 {
        self.occupied()
            .filter(|&(_, b)| self.weights_at(b).iter().any(|&x| x != T::default()))
            .count() as u64
    }

    /// Check the table's invariants (tests): every key reachable from its home bucket
    /// without crossing an empty bucket, empty buckets zeroed, `len` right.
    #[cfg(test)]
    pub(super) fn check(&self) {
        let g = self.g;
        let words: &[u64] = self.region.as_slice();
        let mut n = 0;
        for b in 0..g.cap {
            let bucket = &words[b * g.stride..(b + 1) * g.stride];
            if bucket[0] == EMPTY_WORD {
                assert!(
                    bucket[1..].iter().all(|&w| w == 0),
                    "dirty empty bucket {b}"
                );
                continue;
            }
            n += 1;
            let key = key_of(bucket[0]);
            assert_ne!(key, EMPTY, "bucket {b} holds the empty-bucket key");
            assert_eq!(self.find(key), Some(b), "key {key} unreachable");
        }
        assert_eq!(n, self.len);
        assert!(self.len < g.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{Sum, UpdateFn};

    fn rule(f: &dyn UpdateFn<f32>) -> Rule<'_, dyn UpdateFn<f32>> {
        Rule::new(f, 0)
    }

    #[test]
    fn grows_and_keeps_every_key() {
        let mut t = Table::<f32>::new(1, 0, 0).unwrap();
        let cap0 = t.capacity();
        let keys: Vec<u64> = (0..20_000u64).map(|i| i * 7919).collect();
        for chunk in keys.chunks(999) {
            let grads: Vec<f32> = chunk.iter().map(|&k| (k % 13) as f32).collect();
            t.push::<_, false>(chunk, &grads, &rule(&Sum), &mut [])
                .unwrap();
        }
        t.check();
        assert_eq!(t.len(), keys.len());
        assert!(t.capacity() > cap0);
        assert!(t.len() * LOAD_DEN <= t.capacity() * LOAD_NUM);
        let mut out = vec![0f32; keys.len()];
        t.pull(keys.len(), |i| keys[i], &mut out);
        for (k, v) in keys.iter().zip(&out) {
            assert_eq!(*v, (k % 13) as f32);
        }
    }

    #[test]
    fn take_range_removes_and_shifts_back() {
        for vl in [1, 3] {
            let mut t = Table::<f64>::new(vl, vl, 8).unwrap();
            // Dense-ish keys so probe runs cross the removed keys.
            let keys: Vec<u64> = (0..3000u64).collect();
            let grads: Vec<f64> = (0..keys.len() * vl).map(|i| i as f64).collect();
            let f: &dyn UpdateFn<f64> = &Sum;
            t.push::<_, false>(&keys, &grads, &Rule::new(f, 1), &mut [])
                .unwrap();
            let mut taken = Vec::new();
            // One short range (probed) and one long one (scanned).
            for r in [KeyRange::new(100, 110), KeyRange::new(1000, 2500)] {
                t.take_range(r, |k, vals| {
                    assert_eq!(vals.len(), 2 * vl);
                    assert_eq!(vals[0], (k as usize * vl) as f64);
                    taken.push(k);
                });
                t.check();
            }
            taken.sort_unstable();
            let want: Vec<u64> = (100..110).chain(1000..2500).collect();
            assert_eq!(taken, want);
            assert_eq!(t.len(), 3000 - want.len());
            let mut out = vec![0f64; keys.len() * vl];
            t.pull(keys.len(), |i| keys[i], &mut out);
            for (k, o) in keys.iter().zip(out.chunks_exact(vl)) {
                let gone = want.binary_search(k).is_ok();
                let expect = if gone { 0.0 } else { (*k as usize * vl) as f64 };
                assert_eq!(o[0], expect, "key {k}");
            }
        }
    }
}
