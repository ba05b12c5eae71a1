//! Dense blocks: the values of a whole key range, contiguous.
//!
//! A block's weights are one [`PinnedRegion`], key `range.begin + i` at elements
//! `i * vl .. (i + 1) * vl`, so a later one-sided RDMA read of a range is one read of one
//! region. Optimizer state, if any, is a second region laid out the same way with `sl`
//! elements per key, so it never sits between weights.

use std::marker::PhantomData;

use pserv_sys::{PinnedRegion, RegionError};

use super::Rule;
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::update::UpdateFn;

/// The values of one key range of one shard.
pub(super) struct Block<T> {
    range: KeyRange,
    weights: PinnedRegion,
    /// `None` when the store keeps no state.
    state: Option<PinnedRegion>,
    /// Weights per key.
    vl: usize,
    /// State elements per key.
    sl: usize,
    _values: PhantomData<fn() -> T>,
}

impl<T: Value> Block<T> {
    /// Bytes a block over `keys` keys takes (weights and state).
    pub(super) fn bytes_for(keys: u64, vl: usize, sl: usize) -> u128 {
        u128::from(keys) * (vl + sl) as u128 * std::mem::size_of::<T>() as u128
    }

    /// A zeroed block over `range` (not empty).
    pub(super) fn new(range: KeyRange, vl: usize, sl: usize) -> Result<Self, RegionError> {
        assert!(!range.is_empty(), "a dense block covers at least one key");
        debug_assert!(vl > 0, "a dense block holds at least one weight per key");
        let keys = usize::try_from(range.len()).expect("block size checked against the limit");
        let elem = std::mem::size_of::<T>();
        let weights = PinnedRegion::new(keys * vl * elem)?;
        let state = if sl > 0 {
            Some(PinnedRegion::new(keys * sl * elem)?)
        } else {
            None
        };
        Ok(Block {
            range,
            weights,
            state,
            vl,
            sl,
            _values: PhantomData,
        })
    }

    /// The keys it holds.
    pub(super) fn range(&self) -> KeyRange {
        self.range
    }

    fn keys(&self) -> usize {
        self.range.len() as usize
    }

    /// Pinned bytes held.
    pub(super) fn bytes(&self) -> u64 {
        (self.weights.len() + self.state.as_ref().map_or(0, |s| s.len())) as u64
    }

    /// All weights, `range.len() * vl` elements.
    pub(super) fn weights(&self) -> &[T] {
        &self.weights.as_slice::<T>()[..self.keys() * self.vl]
    }

    /// Append the weights and the state of the ascending `keys` (all inside the block) to
    /// `w` (`vl` elements a key) and `s` (`sl` a key).
    pub(super) fn read_entries(&self, keys: &[u64], w: &mut Vec<T>, s: &mut Vec<T>) {
        self.debug_check_keys(keys);
        let (vl, sl, begin, n) = (self.vl, self.sl, self.range.begin, self.keys());
        let weights = self.weights();
        let state = match &self.state {
            Some(st) => &st.as_slice::<T>()[..n * sl],
            None => &[][..],
        };
        for &k in keys {
            let i = (k - begin) as usize;
            w.extend_from_slice(&weights[i * vl..(i + 1) * vl]);
            s.extend_from_slice(&state[i * sl..(i + 1) * sl]);
        }
    }

    /// Weights and state, mutably.
    fn parts_mut(&mut self) -> (&mut [T], &mut [T]) {
        let n = self.keys();
        let w = &mut self.weights.as_mut_slice::<T>()[..n * self.vl];
        let s = match &mut self.state {
            Some(s) => &mut s.as_mut_slice::<T>()[..n * self.sl],
            None => &mut [][..],
        };
        (w, s)
    }

    /// Debug-build check that ascending `keys` lie in the block (the first and the last
    /// tell).
    fn debug_check_keys(&self, keys: &[u64]) {
        if let (Some(&first), Some(&last)) = (keys.first(), keys.last()) {
            debug_assert!(
                self.range.contains(first),
                "key {first} outside block {}",
                self.range
            );
            debug_assert!(
                self.range.contains(last),
                "key {last} outside block {}",
                self.range
            );
        }
    }

    /// Take over `key` from the sparse table: `vals` is its weights then its state.
    pub(super) fn adopt(&mut self, key: u64, vals: &[T]) {
        debug_assert!(
            self.range.contains(key),
            "key {key} adopted by block {}",
            self.range
        );
        debug_assert_eq!(
            vals.len(),
            self.vl + self.sl,
            "adopted values are not one key's weights and state"
        );
        let i = (key - self.range.begin) as usize;
        let (vl, sl) = (self.vl, self.sl);
        let (w, s) = self.parts_mut();
        w[i * vl..(i + 1) * vl].copy_from_slice(&vals[..vl]);
        s[i * sl..(i + 1) * sl].copy_from_slice(&vals[vl..]);
    }

    /// Apply `grads` to the ascending `keys` (all inside the block); with `OUT` copy the
    /// new weights into `out`. Runs of consecutive keys take one call of the rule.
    pub(super) fn push_keys<F: UpdateFn<T> + ?Sized, const OUT: bool>(
        &mut self,
        keys: &[u64],
        grads: &[T],
        rule: &Rule<'_, F>,
        out: &mut [T],
    ) {
        let (vl, sl, begin) = (self.vl, self.sl, self.range.begin);
        self.debug_check_keys(keys);
        debug_assert_eq!(
            grads.len(),
            keys.len() * vl,
            "gradients do not match the keys"
        );
        debug_assert_eq!(
            out.len(),
            if OUT { grads.len() } else { 0 },
            "output buffer does not match the keys"
        );
        let (w, s) = self.parts_mut();
        let mut i = 0;
        while i < keys.len() {
            let j = run_end(keys, i);
            let lo = (keys[i] - begin) as usize;
            let hi = lo + (j - i);
            let wr = &mut w[lo * vl..hi * vl];
            rule.apply(wr, &mut s[lo * sl..hi * sl], &grads[i * vl..j * vl]);
            if OUT {
                out[i * vl..j * vl].copy_from_slice(wr);
            }
            i = j;
        }
    }

    /// Copy the weights of the ascending `keys` (all inside the block) into `out`.
    pub(super) fn pull_keys(&self, keys: &[u64], out: &mut [T]) {
        let (vl, begin) = (self.vl, self.range.begin);
        self.debug_check_keys(keys);
        debug_assert_eq!(
            out.len(),
            keys.len() * vl,
            "output buffer does not match the keys"
        );
        let w = self.weights();
        let mut i = 0;
        while i < keys.len() {
            let j = run_end(keys, i);
            let lo = (keys[i] - begin) as usize;
            let hi = lo + (j - i);
            out[i * vl..j * vl].copy_from_slice(&w[lo * vl..hi * vl]);
            i = j;
        }
    }

    /// Apply `grads` to the keys of `part` (inside the block) in one call of the rule;
    /// then copy the new weights into `out` if given.
    pub(super) fn push_range<F: UpdateFn<T> + ?Sized>(
        &mut self,
        part: KeyRange,
        grads: &[T],
        rule: &Rule<'_, F>,
        out: Option<&mut [T]>,
    ) {
        assert!(
            self.range.covers(&part),
            "{part} is not inside block {}",
            self.range
        );
        let (vl, sl) = (self.vl, self.sl);
        debug_assert_eq!(
            grads.len(),
            part.len() as usize * vl,
            "gradients do not match range {part}"
        );
        let lo = (part.begin - self.range.begin) as usize;
        let hi = (part.end - self.range.begin) as usize;
        let (w, s) = self.parts_mut();
        let wr = &mut w[lo * vl..hi * vl];
        rule.apply(wr, &mut s[lo * sl..hi * sl], grads);
        if let Some(out) = out {
            out.copy_from_slice(wr);
        }
    }

    /// Copy the weights of `part` (inside the block) into `out`.
    pub(super) fn pull_range(&self, part: KeyRange, out: &mut [T]) {
        assert!(
            self.range.covers(&part),
            "{part} is not inside block {}",
            self.range
        );
        debug_assert_eq!(
            out.len(),
            part.len() as usize * self.vl,
            "output buffer does not match range {part}"
        );
        let lo = (part.begin - self.range.begin) as usize;
        let hi = (part.end - self.range.begin) as usize;
        out.copy_from_slice(&self.weights()[lo * self.vl..hi * self.vl]);
    }

    /// Keys with a non-zero weight element.
    pub(super) fn nonzero(&self) -> u64 {
        self.weights()
            .chunks_exact(self.vl)
            .filter(|w| w.iter().any(|&x| x != T::default()))
            .count() as u64
    }
}

/// The end of the run of consecutive keys starting at `keys[i]`.
#[inline]
fn run_end(keys: &[u64], i: usize) -> usize {
    let first = keys[i];
    let mut j = i + 1;
    while j < keys.len() && keys[j] == first + (j - i) as u64 {
        j += 1;
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{Sum, UpdateFn};

    #[test]
    fn keys_and_ranges_address_the_same_elements() {
        let f: &dyn UpdateFn<f32> = &Sum;
        let rule = Rule::new(f, 1);
        let mut b = Block::<f32>::new(KeyRange::new(100, 110), 2, 2).unwrap();
        // Keys 101, 102 (a run) and 105.
        let grads = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0.0; 6];
        b.push_keys::<_, true>(&[101, 102, 105], &grads, &rule, &mut out);
        assert_eq!(out, grads);
        let mut all = [9.0f32; 20];
        b.pull_range(KeyRange::new(100, 110), &mut all);
        assert_eq!(
            all,
            [
                0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0,
                0.0, 0.0, 0.0, 0.0
            ]
        );
        let mut part = [0.0f32; 4];
        b.push_range(KeyRange::new(102, 104), &[1.0; 4], &rule, Some(&mut part));
        assert_eq!(part, [4.0, 5.0, 1.0, 1.0]);
        let mut got = [0.0f32; 4];
        b.pull_keys(&[102, 103], &mut got);
        assert_eq!(got, part);
        assert_eq!(b.nonzero(), 4);
        b.adopt(109, &[7.0, 8.0, 0.5, 0.5]);
        let mut last = [0.0f32; 2];
        b.pull_keys(&[109], &mut last);
        assert_eq!(last, [7.0, 8.0]);
        assert!(b.bytes() >= 2 * 10 * 2 * 4);
    }
}
