//! The parameter store of one server.
//!
//! A server owns one [`KeyRange`]; its [`Store`] holds, for every key it has seen,
//! `value_len` weights of a [`Value`] type and `value_len * state_len` optimizer-state
//! elements, all in pinned memory ([`PinnedRegion`](pserv_sys::PinnedRegion)).
//!
//! # Layout
//! - The range is split into `shards` contiguous sub-ranges, each behind its own
//!   `parking_lot::Mutex`; there is no global lock. A sorted key list is cut into per-shard
//!   chunks with one binary search per shard, and each chunk runs under its shard's lock.
//! - **Sparse keys** live in a per-shard open-addressing hash table (linear probing,
//!   Fibonacci hashing, load at most 0.6, doubling) whose buckets hold the key, its weights
//!   and its state side by side: one cache miss per key. The per-key loops prefetch the
//!   home bucket of the key 32 positions ahead so misses overlap. Empty buckets are zero
//!   words (keys are stored complemented), so a new table is a fresh zeroed mapping with
//!   nothing written; a request that brings more new keys than a table has room for grows
//!   it once, to the size for exactly those keys (all of them when the table is empty,
//!   or when they outnumber the keys it holds eightfold: then at most an eighth too many,
//!   and no probe counts them), rather than doubling on the way.
//! - **Dense blocks** hold whole ranges contiguously (weights in one region, state in
//!   another). `push_range` / `push_pull_range` serve a range piecewise: the parts covered
//!   by existing blocks use them; each uncovered part (per shard) gets a new zeroed block
//!   of exactly that part, which first takes over the sparse keys inside it. Key-list
//!   operations on keys inside a block use the block. Blocks are never merged or dropped.
//!
//! # Semantics
//! - A key never pushed reads as zero. `pull` and `pull_range` never insert anything and
//!   never create blocks: a pulled range that no block covers is read from the sparse
//!   table (zero where absent).
//! - Every request is validated whole (key order, range, lengths, the rule's state) before
//!   anything changes, so a refused request leaves the store as it was. The one exception
//!   is an [`StoreError::Alloc`] from a key-list push that needed a sparse table to grow
//!   while the operating system refused memory and the table was full even above its load
//!   limit: the shards before the failing one (and the keys before the failing key) are
//!   then applied. Range operations allocate all their blocks before changing anything.
//! - A key-list request is atomic per shard, not across shards. A range push takes the
//!   locks of all shards it touches (in shard order) before changing any, and releases
//!   each once its part is applied.
//! - Locks are always taken in ascending shard order, so operations never deadlock.

mod dense;
mod table;
#[cfg(test)]
mod tests;

use std::ops::Range;

use parking_lot::Mutex;

use self::dense::Block;
use self::table::Table;
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::update::{Adagrad, Assign, Ftrl, Sgd, Sum, UpdateFn, UpdateSpec};

/// The largest [`StoreConfig::sparse_initial_keys`] accepted (per shard).
pub const MAX_INITIAL_KEYS: usize = 1 << 36;

/// How a [`Store`] is shaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Number of shards (locks) the range is split into; fewer if the range has fewer keys.
    pub shards: usize,
    /// Weights per key.
    pub value_len: usize,
    /// Optimizer-state elements kept per weight element (the largest
    /// [`UpdateFn::state_len`] the store will serve).
    pub state_len: usize,
    /// Keys each shard's sparse table holds before it first grows (at most
    /// [`MAX_INITIAL_KEYS`]).
    pub sparse_initial_keys: usize,
    /// The largest dense block, in bytes (weights and state), a range push may create.
    pub dense_max_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            shards: 16,
            value_len: 1,
            state_len: 0,
            sparse_initial_keys: 1024,
            dense_max_bytes: 8 << 30,
        }
    }
}

/// A refused store operation. The messages go back to workers, so they say what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A key of the request is not in the server's range.
    #[error("key {key:#x} is not in this server's key range {range}")]
    KeyOutOfRange {
        /// The first offending key.
        key: u64,
        /// The server's range.
        range: KeyRange,
    },
    /// A range request is not inside the server's range.
    #[error("key range {range} is not inside this server's key range {store}")]
    RangeOutOfRange {
        /// The requested range.
        range: KeyRange,
        /// The server's range.
        store: KeyRange,
    },
    /// Keys must be strictly increasing.
    #[error("keys are not strictly increasing: key {index} is not above key {}", index - 1)]
    KeysNotSorted {
        /// Index of the first key not above its predecessor.
        index: usize,
    },
    /// The pushed values do not match the keys.
    #[error("expected {expected} values ({keys} keys x {value_len} per key), got {got}")]
    ValueLength {
        /// Keys in the request.
        keys: u64,
        /// Values per key the store holds.
        value_len: usize,
        /// Values expected.
        expected: u128,
        /// Values given.
        got: usize,
    },
    /// The output buffer does not match the keys.
    #[error("output buffer holds {got} values, {expected} needed")]
    OutputLength {
        /// Values needed.
        expected: u128,
        /// Values the buffer holds.
        got: usize,
    },
    /// The update rule keeps more state per weight than this store was configured for.
    #[error(
        "update rule {function:?} keeps {needs} state values per weight, this store keeps {has}"
    )]
    StateTooSmall {
        /// The rule's name.
        function: String,
        /// State elements per weight the rule needs.
        needs: usize,
        /// State elements per weight the store keeps.
        has: usize,
    },
    /// A range push would create a dense block above the configured limit.
    #[error("a dense block for {range} would take {bytes} bytes, more than the limit of {max}")]
    DenseTooLarge {
        /// The uncovered part that needed a block.
        range: KeyRange,
        /// Bytes the block would take.
        bytes: u128,
        /// The limit (`StoreConfig::dense_max_bytes`).
        max: u64,
    },
    /// The configuration is unusable.
    #[error("bad store configuration: {0}")]
    Config(String),
    /// The operating system refused pinned memory.
    #[error("allocating pinned memory for the store failed")]
    Alloc(#[source] pserv_sys::RegionError),
}

/// An update rule with the store's state layout: applies it to one key's (or one dense
/// run's) weights with the right slice of state.
pub(crate) struct Rule<'a, F: ?Sized> {
    f: &'a F,
    /// State elements per weight the rule uses.
    needs: usize,
    /// State elements per weight the store keeps (`needs <= has`).
    has: usize,
}

impl<'a, F: ?Sized> Rule<'a, F> {
    fn new<T: Value>(f: &'a F, has: usize) -> Self
    where
        F: UpdateFn<T>,
    {
        let needs = f.state_len();
        assert!(
            needs <= has,
            "rule keeps {needs} state values per weight, the store {has}: checked before use"
        );
        Rule { f, needs, has }
    }

    /// Apply to `w` with `s` (`w.len() * has` elements) and `g`.
    #[inline(always)]
    fn apply<T: Value>(&self, w: &mut [T], s: &mut [T], g: &[T])
    where
        F: UpdateFn<T>,
    {
        debug_assert_eq!(
            s.len(),
            w.len() * self.has,
            "state does not match the weights"
        );
        debug_assert_eq!(g.len(), w.len(), "gradients do not match the weights");
        if self.needs == self.has {
            self.f.apply(w, s, g);
        } else if self.needs == 0 {
            self.f.apply(w, &mut [], g);
        } else {
            // The store keeps more state than the rule uses: hand it each weight's first
            // `needs` state elements.
            let (needs, has) = (self.needs, self.has);
            for (e, (w, g)) in w.iter_mut().zip(g).enumerate() {
                let s = &mut s[e * has..e * has + needs];
                self.f
                    .apply(std::slice::from_mut(w), s, std::slice::from_ref(g));
            }
        }
    }
}

/// Run `$body` with `$g` bound to the rule `$f` as a concrete type when it is a built-in,
/// so generic per-key loops inline it; otherwise to the trait object.
macro_rules! with_inlined {
    ($f:expr, $g:ident => $body:expr) => {{
        let f = $f;
        match f.spec() {
            Some(UpdateSpec::Sum) => {
                let $g = &Sum;
                $body
            }
            Some(UpdateSpec::Assign) => {
                let $g = &Assign;
                $body
            }
            Some(UpdateSpec::Sgd { lr }) => {
                let $g = &Sgd { lr };
                $body
            }
            Some(UpdateSpec::Adagrad { lr, eps }) => {
                let $g = &Adagrad { lr, eps };
                $body
            }
            Some(UpdateSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            }) => {
                let $g = &Ftrl {
                    alpha,
                    beta,
                    l1,
                    l2,
                };
                $body
            }
            None => {
                let $g = f;
                $body
            }
        }
    }};
}

/// One shard: a contiguous sub-range, its sparse table and its dense blocks.
struct Shard<T> {
    range: KeyRange,
    table: Table<T>,
    /// Sorted by range, disjoint, inside `range`; no key of `table` lies in any of them.
    blocks: Vec<Block<T>>,
    vl: usize,
}

/// A shard behind its lock, on its own cache lines.
#[repr(align(128))]
struct ShardCell<T>(Mutex<Shard<T>>);

/// The parameter store of one server. See the [module doc](self) for layout and
/// semantics.
///
/// `Send + Sync`: shared by the server's event-loop threads, each operation locking only
/// the shards it touches.
pub struct Store<T: Value> {
    range: KeyRange,
    value_len: usize,
    state_len: usize,
    dense_max_bytes: u64,
    /// `bounds[i]..bounds[i + 1]` is shard `i`'s range.
    bounds: Box<[u64]>,
    shards: Box<[ShardCell<T>]>,
}

impl<T: Value> std::fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("range", &self.range)
            .field("value_len", &self.value_len)
            .field("state_len", &self.state_len)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<T: Value> Store<T> {
    /// An empty store for `range`.
    pub fn new(range: KeyRange, cfg: StoreConfig) -> Result<Self, StoreError> {
        if cfg.shards == 0 {
            return Err(StoreError::Config("shards must be at least 1".into()));
        }
        if cfg.value_len == 0 {
            return Err(StoreError::Config("value_len must be at least 1".into()));
        }
        if cfg.sparse_initial_keys > MAX_INITIAL_KEYS {
            return Err(StoreError::Config(format!(
                "sparse_initial_keys {} is above {MAX_INITIAL_KEYS}",
                cfg.sparse_initial_keys
            )));
        }
        let per_key = cfg
            .state_len
            .checked_add(1)
            .and_then(|n| n.checked_mul(cfg.value_len))
            .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
            .filter(|&n| n <= 1 << 30)
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "value_len {} with state_len {} makes one key too large",
                    cfg.value_len, cfg.state_len
                ))
            })?;
        debug_assert!(per_key > 0);
        let n = (cfg.shards as u64).min(range.len().max(1)) as usize;
        let bounds: Box<[u64]> = (0..=n)
            .map(|i| range.begin + (u128::from(range.len()) * i as u128 / n as u128) as u64)
            .collect();
        let shards = bounds
            .windows(2)
            .map(|b| {
                let table = Table::new(
                    cfg.value_len,
                    cfg.value_len * cfg.state_len,
                    cfg.sparse_initial_keys,
                )
                .map_err(StoreError::Alloc)?;
                Ok(ShardCell(Mutex::new(Shard {
                    range: KeyRange::new(b[0], b[1]),
                    table,
                    blocks: Vec::new(),
                    vl: cfg.value_len,
                })))
            })
            .collect::<Result<_, StoreError>>()?;
        let store = Store {
            range,
            value_len: cfg.value_len,
            state_len: cfg.state_len,
            dense_max_bytes: cfg.dense_max_bytes,
            bounds,
            shards,
        };
        assert_eq!(store.bounds[0], range.begin, "shards start below the range");
        assert_eq!(store.bounds[n], range.end, "shards end short of the range");
        debug_assert_eq!(store.shards.len(), n, "a shard for every pair of bounds");
        if cfg!(debug_assertions) && !range.is_empty() {
            for b in store.bounds.windows(2) {
                debug_assert!(b[0] < b[1], "an empty shard [{}, {})", b[0], b[1]);
            }
        }
        Ok(store)
    }

    /// The server's key range.
    pub fn range(&self) -> KeyRange {
        self.range
    }

    /// Weights per key.
    pub fn value_len(&self) -> usize {
        self.value_len
    }

    /// Optimizer-state elements kept per weight element.
    pub fn state_len(&self) -> usize {
        self.state_len
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Apply `grads` (`keys.len() * value_len` values) to `keys` (strictly increasing, all
    /// in range) with `f`. Keys never seen are created with weight 0 and state 0 first.
    pub fn push(&self, keys: &[u64], grads: &[T], f: &dyn UpdateFn<T>) -> Result<(), StoreError> {
        self.check_keys(keys)?;
        self.check_values(keys.len() as u64, grads.len())?;
        self.check_rule(f)?;
        with_inlined!(f, g => self.push_keys::<_, false>(keys, grads, g, &mut []))
    }

    /// Push, then read the new weights of the same keys into `out`, atomically per shard.
    pub fn push_pull(
        &self,
        keys: &[u64],
        grads: &[T],
        f: &dyn UpdateFn<T>,
        out: &mut [T],
    ) -> Result<(), StoreError> {
        self.check_keys(keys)?;
        self.check_values(keys.len() as u64, grads.len())?;
        self.check_out(keys.len() as u64, out.len())?;
        self.check_rule(f)?;
        with_inlined!(f, g => self.push_keys::<_, true>(keys, grads, g, out))
    }

    /// Read the weights of `keys` (strictly increasing, all in range) into `out`
    /// (`keys.len() * value_len`). Keys never seen read as 0 and are not inserted.
    pub fn pull(&self, keys: &[u64], out: &mut [T]) -> Result<(), StoreError> {
        self.check_keys(keys)?;
        self.check_out(keys.len() as u64, out.len())?;
        let vl = self.value_len;
        for (s, r) in self.chunks(keys) {
            let shard = self.shards[s].0.lock();
            shard.pull_keys(&keys[r.clone()], &mut out[r.start * vl..r.end * vl]);
        }
        Ok(())
    }

    /// The weights (`value_len` a key) and the update-rule state (`value_len *
    /// state_len` a key) of `keys` (strictly increasing, all in range), in key order, read
    /// under each shard's lock: what a replication batch carries. Keys never seen read as
    /// 0 and are not inserted.
    pub fn read_entries(&self, keys: &[u64]) -> Result<(Vec<T>, Vec<T>), StoreError> {
        self.check_keys(keys)?;
        let mut w = Vec::with_capacity(keys.len() * self.value_len);
        let mut s = Vec::with_capacity(keys.len() * self.value_len * self.state_len);
        for (sh, r) in self.chunks(keys) {
            let shard = self.shards[sh].0.lock();
            shard.read_entries(&keys[r], &mut w, &mut s);
        }
        Ok((w, s))
    }

    /// Apply `grads` (`range.len() * value_len` values, key order) to every key of `range`
    /// with `f`, storing the range in dense blocks (see the module doc).
    pub fn push_range(
        &self,
        range: KeyRange,
        grads: &[T],
        f: &dyn UpdateFn<T>,
    ) -> Result<(), StoreError> {
        self.check_range(range)?;
        self.check_values(range.len(), grads.len())?;
        self.check_rule(f)?;
        self.update_range(range, grads, f, None)
    }

    /// [`push_range`](Self::push_range), then read the new weights of `range` into `out`,
    /// atomically per shard.
    pub fn push_pull_range(
        &self,
        range: KeyRange,
        grads: &[T],
        f: &dyn UpdateFn<T>,
        out: &mut [T],
    ) -> Result<(), StoreError> {
        self.check_range(range)?;
        self.check_values(range.len(), grads.len())?;
        self.check_out(range.len(), out.len())?;
        self.check_rule(f)?;
        self.update_range(range, grads, f, Some(out))
    }

    /// Read the weights of every key of `range` into `out` (`range.len() * value_len`).
    /// Keys never seen read as 0; nothing is inserted and no block is created.
    pub fn pull_range(&self, range: KeyRange, out: &mut [T]) -> Result<(), StoreError> {
        self.check_range(range)?;
        self.check_out(range.len(), out.len())?;
        if range.is_empty() {
            return Ok(());
        }
        let vl = self.value_len;
        let mut next = 0;
        for s in self.shard_of(range.begin)..=self.shard_of(range.end - 1) {
            let shard = self.shards[s].0.lock();
            let sub = shard
                .range
                .intersect(&range)
                .expect("shard overlaps the range");
            let lo = ((sub.begin - range.begin) as usize) * vl;
            let hi = ((sub.end - range.begin) as usize) * vl;
            debug_assert_eq!(lo, next, "shard parts of {range} are not contiguous");
            next = hi;
            shard.pull_range(sub, &mut out[lo..hi]);
        }
        debug_assert_eq!(next, out.len(), "shard parts do not cover {range}");
        Ok(())
    }

    /// Call `f` with the weights of `range` where they lie, in the store's dense blocks,
    /// while the shards that hold them stay locked: `f` sees one consistent state (pushes
    /// to those shards wait) and can send the bytes without copying them first.
    ///
    /// Returns `Ok(None)` without calling `f` when part of the range is not in a dense
    /// block (never pushed as a range, or held by the sparse table); use
    /// [`pull_range`](Self::pull_range) then.
    pub fn with_dense_range<R>(
        &self,
        range: KeyRange,
        f: impl FnOnce(&[&[T]]) -> R,
    ) -> Result<Option<R>, StoreError> {
        self.check_range(range)?;
        if range.is_empty() {
            return Ok(Some(f(&[])));
        }
        let vl = self.value_len;
        // Ascending lock order, as range pushes take them: no deadlock.
        let guards: Vec<_> = (self.shard_of(range.begin)..=self.shard_of(range.end - 1))
            .map(|s| self.shards[s].0.lock())
            .collect();
        let mut parts: Vec<&[T]> = Vec::new();
        let mut pos = range.begin;
        for shard in &guards {
            let sub = shard
                .range
                .intersect(&range)
                .expect("shard overlaps the range");
            let first = shard.blocks.partition_point(|b| b.range().end <= sub.begin);
            for block in &shard.blocks[first..] {
                let Some(part) = block.range().intersect(&sub) else {
                    break;
                };
                if part.begin != pos {
                    return Ok(None);
                }
                let from = ((part.begin - block.range().begin) as usize) * vl;
                parts.push(&block.weights()[from..from + (part.len() as usize) * vl]);
                pos = part.end;
            }
            if pos != sub.end {
                return Ok(None);
            }
        }
        debug_assert_eq!(pos, range.end, "dense parts do not cover {range}");
        debug_assert_eq!(
            parts.iter().map(|p| p.len()).sum::<usize>(),
            range.len() as usize * vl,
            "dense parts of {range} hold another number of weights"
        );
        Ok(Some(f(&parts)))
    }

    /// Keys stored: sparse entries plus every key of every dense block.
    pub fn key_count(&self) -> u64 {
        self.fold_shards(|s| {
            s.table.len() as u64 + s.blocks.iter().map(|b| b.range().len()).sum::<u64>()
        })
    }

    /// Stored keys with a non-zero weight element.
    pub fn nonzero_count(&self) -> u64 {
        self.fold_shards(|s| s.table.nonzero() + s.blocks.iter().map(Block::nonzero).sum::<u64>())
    }

    /// Pinned bytes held (tables and blocks).
    pub fn bytes(&self) -> u64 {
        self.fold_shards(|s| s.table.bytes() + s.blocks.iter().map(Block::bytes).sum::<u64>())
    }

    /// The ranges of all dense blocks, ascending.
    pub fn dense_ranges(&self) -> Vec<KeyRange> {
        let mut v = Vec::new();
        for cell in self.shards.iter() {
            v.extend(cell.0.lock().blocks.iter().map(Block::range));
        }
        v
    }

    /// Call `f` with every stored key and its weights, in ascending key order (for dumping
    /// and comparing models; slow). Each shard stays locked while `f` runs over its keys,
    /// so `f` must not call back into the store.
    pub fn for_each(&self, mut f: impl FnMut(u64, &[T])) {
        for cell in self.shards.iter() {
            let shard = cell.0.lock();
            let entries = shard.table.sorted_entries();
            let mut sparse = entries.iter().peekable();
            for block in &shard.blocks {
                let r = block.range();
                while let Some(&&(k, b)) = sparse.peek() {
                    if k >= r.begin {
                        break;
                    }
                    f(k, shard.table.weights_at(b));
                    sparse.next();
                }
                for (key, w) in (r.begin..r.end).zip(block.weights().chunks_exact(shard.vl)) {
                    f(key, w);
                }
            }
            for &(k, b) in sparse {
                f(k, shard.table.weights_at(b));
            }
        }
    }

    fn fold_shards(&self, f: impl Fn(&Shard<T>) -> u64) -> u64 {
        self.shards.iter().map(|cell| f(&cell.0.lock())).sum()
    }

    /// The shard holding `key` (in range).
    fn shard_of(&self, key: u64) -> usize {
        debug_assert!(
            self.range.contains(key),
            "key {key} outside the store's range"
        );
        let n = self.shards.len();
        let s = self.bounds[1..n].partition_point(|&b| b <= key);
        debug_assert!(self.bounds[s] <= key, "key {key} below its shard {s}");
        debug_assert!(key < self.bounds[s + 1], "key {key} above its shard {s}");
        s
    }

    /// Cut sorted, in-range keys into per-shard index ranges, in shard order.
    fn chunks<'a>(&'a self, keys: &'a [u64]) -> impl Iterator<Item = (usize, Range<usize>)> + 'a {
        let mut start = 0;
        std::iter::from_fn(move || {
            let first = *keys.get(start)?;
            let s = self.shard_of(first);
            let end_key = self.bounds[s + 1];
            let end = start + keys[start..].partition_point(|&k| k < end_key);
            debug_assert!(end > start, "an empty chunk for shard {s}");
            let r = start..end;
            start = end;
            Some((s, r))
        })
    }

    fn push_keys<F: UpdateFn<T> + ?Sized, const OUT: bool>(
        &self,
        keys: &[u64],
        grads: &[T],
        f: &F,
        out: &mut [T],
    ) -> Result<(), StoreError> {
        let rule = Rule::new(f, self.state_len);
        let vl = self.value_len;
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
        for (s, r) in self.chunks(keys) {
            let mut shard = self.shards[s].0.lock();
            let o: &mut [T] = if OUT {
                &mut out[r.start * vl..r.end * vl]
            } else {
                &mut []
            };
            shard
                .push_keys::<F, OUT>(&keys[r.clone()], &grads[r.start * vl..r.end * vl], &rule, o)
                .map_err(StoreError::Alloc)?;
        }
        Ok(())
    }

    /// Push (and with `out`, pull) a validated, non-empty-or-empty range.
    fn update_range(
        &self,
        range: KeyRange,
        grads: &[T],
        f: &dyn UpdateFn<T>,
        mut out: Option<&mut [T]>,
    ) -> Result<(), StoreError> {
        if range.is_empty() {
            return Ok(());
        }
        let (vl, sl) = (self.value_len, self.value_len * self.state_len);
        let touched = self.shard_of(range.begin)..=self.shard_of(range.end - 1);
        let mut guards: Vec<_> = touched.map(|s| self.shards[s].0.lock()).collect();
        // Plan the new blocks and check them against the limit, then allocate them all,
        // before changing anything.
        let mut fresh = Vec::new();
        for (i, shard) in guards.iter().enumerate() {
            let sub = shard
                .range
                .intersect(&range)
                .expect("shard overlaps the range");
            for gap in shard.gaps(sub) {
                debug_assert!(!gap.is_empty(), "an empty gap in {sub}");
                debug_assert!(sub.covers(&gap), "gap {gap} outside {sub}");
                let bytes = Block::<T>::bytes_for(gap.len(), vl, sl);
                if bytes > u128::from(self.dense_max_bytes) {
                    return Err(StoreError::DenseTooLarge {
                        range: gap,
                        bytes,
                        max: self.dense_max_bytes,
                    });
                }
                fresh.push((i, gap));
            }
        }
        let fresh: Vec<(usize, Block<T>)> = fresh
            .into_iter()
            .map(|(i, gap)| Block::new(gap, vl, sl).map(|b| (i, b)))
            .collect::<Result<_, _>>()
            .map_err(StoreError::Alloc)?;
        for (i, block) in fresh {
            guards[i].install(block);
        }
        let rule = Rule::new(f, self.state_len);
        let mut next = 0;
        for mut shard in guards {
            let sub = shard
                .range
                .intersect(&range)
                .expect("shard overlaps the range");
            let lo = ((sub.begin - range.begin) as usize) * vl;
            let hi = ((sub.end - range.begin) as usize) * vl;
            // Each gradient goes to exactly one shard.
            debug_assert_eq!(lo, next, "shard parts of {range} are not contiguous");
            next = hi;
            let o = out.as_mut().map(|o| &mut o[lo..hi]);
            shard.push_range(sub, &grads[lo..hi], &rule, o);
            // The guard drops here: this shard is released while later ones are applied.
        }
        debug_assert_eq!(next, grads.len(), "shard parts do not cover {range}");
        Ok(())
    }

    fn check_keys(&self, keys: &[u64]) -> Result<(), StoreError> {
        if let Some(index) = first_unsorted(keys) {
            return Err(StoreError::KeysNotSorted { index });
        }
        for &key in [keys.first(), keys.last()].into_iter().flatten() {
            if !self.range.contains(key) {
                return Err(StoreError::KeyOutOfRange {
                    key,
                    range: self.range,
                });
            }
        }
        Ok(())
    }

    fn check_range(&self, range: KeyRange) -> Result<(), StoreError> {
        if self.range.covers(&range) {
            Ok(())
        } else {
            Err(StoreError::RangeOutOfRange {
                range,
                store: self.range,
            })
        }
    }

    fn check_values(&self, keys: u64, got: usize) -> Result<(), StoreError> {
        let expected = u128::from(keys) * self.value_len as u128;
        if expected == got as u128 {
            Ok(())
        } else {
            Err(StoreError::ValueLength {
                keys,
                value_len: self.value_len,
                expected,
                got,
            })
        }
    }

    fn check_out(&self, keys: u64, got: usize) -> Result<(), StoreError> {
        let expected = u128::from(keys) * self.value_len as u128;
        if expected == got as u128 {
            Ok(())
        } else {
            Err(StoreError::OutputLength { expected, got })
        }
    }

    fn check_rule(&self, f: &dyn UpdateFn<T>) -> Result<(), StoreError> {
        let needs = f.state_len();
        if needs <= self.state_len {
            Ok(())
        } else {
            Err(StoreError::StateTooSmall {
                function: f.name().to_owned(),
                needs,
                has: self.state_len,
            })
        }
    }

    /// Check every structural invariant (tests).
    #[cfg(test)]
    fn check_invariants(&self) {
        for (i, cell) in self.shards.iter().enumerate() {
            let shard = cell.0.lock();
            assert_eq!(
                shard.range,
                KeyRange::new(self.bounds[i], self.bounds[i + 1])
            );
            shard.table.check();
            for w in shard.blocks.windows(2) {
                assert!(w[0].range().end <= w[1].range().begin, "blocks overlap");
            }
            for b in &shard.blocks {
                assert!(shard.range.covers(&b.range()));
            }
            for (k, _) in shard.table.sorted_entries() {
                assert!(shard.range.contains(k), "key {k} in the wrong shard");
                assert!(
                    !shard.blocks.iter().any(|b| b.range().contains(k)),
                    "sparse key {k} inside a block"
                );
            }
        }
    }
}

impl<T: Value> Shard<T> {
    /// Debug-build check that a key chunk belongs to this shard (keys are sorted: the
    /// first and the last tell).
    fn debug_check_keys(&self, keys: &[u64]) {
        if let (Some(&first), Some(&last)) = (keys.first(), keys.last()) {
            debug_assert!(
                self.range.contains(first),
                "key {first} outside shard {}",
                self.range
            );
            debug_assert!(
                self.range.contains(last),
                "key {last} outside shard {}",
                self.range
            );
        }
    }

    fn push_keys<F: UpdateFn<T> + ?Sized, const OUT: bool>(
        &mut self,
        keys: &[u64],
        grads: &[T],
        rule: &Rule<'_, F>,
        out: &mut [T],
    ) -> Result<(), pserv_sys::RegionError> {
        self.debug_check_keys(keys);
        debug_assert_eq!(
            grads.len(),
            keys.len() * self.vl,
            "gradients do not match the keys"
        );
        if self.blocks.is_empty() {
            return self.table.push::<F, OUT>(keys, grads, rule, out);
        }
        let vl = self.vl;
        let mut segs = Segments::default();
        while let Some((block, r)) = segs.next(keys, &self.blocks) {
            let g = &grads[r.start * vl..r.end * vl];
            let o: &mut [T] = if OUT {
                &mut out[r.start * vl..r.end * vl]
            } else {
                &mut []
            };
            match block {
                None => self.table.push::<F, OUT>(&keys[r], g, rule, o)?,
                Some(b) => self.blocks[b].push_keys::<F, OUT>(&keys[r], g, rule, o),
            }
        }
        Ok(())
    }

    fn read_entries(&self, keys: &[u64], w: &mut Vec<T>, s: &mut Vec<T>) {
        self.debug_check_keys(keys);
        if self.blocks.is_empty() {
            return self.table.read_entries(keys, w, s);
        }
        let mut segs = Segments::default();
        while let Some((block, r)) = segs.next(keys, &self.blocks) {
            match block {
                None => self.table.read_entries(&keys[r], w, s),
                Some(b) => self.blocks[b].read_entries(&keys[r], w, s),
            }
        }
    }

    fn pull_keys(&self, keys: &[u64], out: &mut [T]) {
        self.debug_check_keys(keys);
        debug_assert_eq!(
            out.len(),
            keys.len() * self.vl,
            "output buffer does not match the keys"
        );
        if self.blocks.is_empty() {
            return self.table.pull(keys.len(), |i| keys[i], out);
        }
        let vl = self.vl;
        let mut segs = Segments::default();
        while let Some((block, r)) = segs.next(keys, &self.blocks) {
            let o = &mut out[r.start * vl..r.end * vl];
            let keys = &keys[r];
            match block {
                None => self.table.pull(keys.len(), |i| keys[i], o),
                Some(b) => self.blocks[b].pull_keys(keys, o),
            }
        }
    }

    /// The parts of `sub` no block covers, ascending.
    fn gaps(&self, sub: KeyRange) -> Vec<KeyRange> {
        let mut gaps = Vec::new();
        let mut pos = sub.begin;
        let first = self.blocks.partition_point(|b| b.range().end <= sub.begin);
        for b in &self.blocks[first..] {
            let r = b.range();
            if r.begin >= sub.end {
                break;
            }
            if r.begin > pos {
                gaps.push(KeyRange::new(pos, r.begin));
            }
            pos = r.end;
        }
        if pos < sub.end {
            gaps.push(KeyRange::new(pos, sub.end));
        }
        gaps
    }

    /// Add a fresh block over a gap, moving the sparse keys inside it into it.
    fn install(&mut self, mut block: Block<T>) {
        let r = block.range();
        assert!(
            self.range.covers(&r),
            "block {r} outside shard {}",
            self.range
        );
        self.table.take_range(r, |key, vals| block.adopt(key, vals));
        let at = self.blocks.partition_point(|b| b.range().begin < r.begin);
        if let Some(before) = at.checked_sub(1).map(|i| self.blocks[i].range()) {
            assert!(before.end <= r.begin, "block {r} overlaps block {before}");
        }
        if let Some(after) = self.blocks.get(at).map(Block::range) {
            assert!(r.end <= after.begin, "block {r} overlaps block {after}");
        }
        self.blocks.insert(at, block);
    }

    /// Push a range that blocks cover entirely.
    fn push_range<F: UpdateFn<T> + ?Sized>(
        &mut self,
        sub: KeyRange,
        grads: &[T],
        rule: &Rule<'_, F>,
        mut out: Option<&mut [T]>,
    ) {
        let vl = self.vl;
        debug_assert!(
            self.range.covers(&sub),
            "range {sub} outside shard {}",
            self.range
        );
        debug_assert_eq!(
            grads.len(),
            sub.len() as usize * vl,
            "gradients do not match range {sub}"
        );
        let mut pos = sub.begin;
        let first = self.blocks.partition_point(|b| b.range().end <= sub.begin);
        for block in &mut self.blocks[first..] {
            let Some(part) = block.range().intersect(&sub) else {
                break;
            };
            assert_eq!(part.begin, pos, "range {sub} not covered by blocks");
            let lo = ((part.begin - sub.begin) as usize) * vl;
            let hi = ((part.end - sub.begin) as usize) * vl;
            block.push_range(
                part,
                &grads[lo..hi],
                rule,
                out.as_mut().map(|o| &mut o[lo..hi]),
            );
            pos = part.end;
        }
        assert_eq!(pos, sub.end, "range {sub} not covered by blocks");
    }

    /// Pull a range: blocks where they cover it, the sparse table elsewhere.
    fn pull_range(&self, sub: KeyRange, out: &mut [T]) {
        let vl = self.vl;
        debug_assert!(
            self.range.covers(&sub),
            "range {sub} outside shard {}",
            self.range
        );
        debug_assert_eq!(
            out.len(),
            sub.len() as usize * vl,
            "output buffer does not match range {sub}"
        );
        let slot = |r: KeyRange| {
            ((r.begin - sub.begin) as usize) * vl..((r.end - sub.begin) as usize) * vl
        };
        let mut pos = sub.begin;
        let first = self.blocks.partition_point(|b| b.range().end <= sub.begin);
        for block in &self.blocks[first..] {
            let Some(part) = block.range().intersect(&sub) else {
                break;
            };
            if part.begin > pos {
                let gap = KeyRange::new(pos, part.begin);
                self.pull_sparse_range(gap, &mut out[slot(gap)]);
            }
            block.pull_range(part, &mut out[slot(part)]);
            pos = part.end;
        }
        if pos < sub.end {
            let gap = KeyRange::new(pos, sub.end);
            self.pull_sparse_range(gap, &mut out[slot(gap)]);
        }
    }

    fn pull_sparse_range(&self, gap: KeyRange, out: &mut [T]) {
        self.table.pull_range(gap, out);
    }
}

/// Walks sorted keys against sorted blocks: yields index ranges of keys that fall in one
/// block (`Some(block)`) or between blocks (`None`, for the sparse table), in key order.
#[derive(Default)]
struct Segments {
    pos: usize,
    block: usize,
}

impl Segments {
    fn next<T: Value>(
        &mut self,
        keys: &[u64],
        blocks: &[Block<T>],
    ) -> Option<(Option<usize>, Range<usize>)> {
        let key = *keys.get(self.pos)?;
        self.block += blocks[self.block..].partition_point(|b| b.range().end <= key);
        let start = self.pos;
        let Some(b) = blocks.get(self.block).map(Block::range) else {
            self.pos = keys.len();
            return Some((None, start..keys.len()));
        };
        if key < b.begin {
            self.pos += keys[start..].partition_point(|&k| k < b.begin);
            debug_assert!(self.pos > start, "an empty sparse segment");
            debug_assert!(
                keys[self.pos - 1] < b.begin,
                "a sparse segment runs into block {b}"
            );
            return Some((None, start..self.pos));
        }
        self.pos += keys[start..].partition_point(|&k| k < b.end);
        debug_assert!(self.pos > start, "an empty segment of block {b}");
        debug_assert!(b.contains(key), "key {key} outside its block {b}");
        debug_assert!(
            b.contains(keys[self.pos - 1]),
            "key {} outside its block {b}",
            keys[self.pos - 1]
        );
        self.block += 1;
        Some((Some(self.block - 1), start..self.pos))
    }
}

/// Index of the first key not above its predecessor, if any. One vectorisable pass in
/// chunks; the exact index is searched only on failure.
fn first_unsorted(keys: &[u64]) -> Option<usize> {
    const CHUNK: usize = 1024;
    if keys.len() < 2 {
        return None;
    }
    let (a, b) = (&keys[..keys.len() - 1], &keys[1..]);
    for (c, (ca, cb)) in a.chunks(CHUNK).zip(b.chunks(CHUNK)).enumerate() {
        let sorted = ca.iter().zip(cb).fold(true, |ok, (x, y)| ok & (x < y));
        if !sorted {
            let i = ca.iter().zip(cb).position(|(x, y)| x >= y)?;
            return Some(c * CHUNK + i + 1);
        }
    }
    None
}
