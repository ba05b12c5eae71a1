//! Versioned blocks: a registered range laid out so that one-sided readers never return
//! a torn value silently (a seqlock per block, as FaRM protects objects for RDMA reads).
//!
//! # Layout
//!
//! The logical bytes (for example a server's dense parameter values) are cut into blocks
//! of `payload_len` bytes (a multiple of 64, say 4 KiB to 64 KiB). Block `i` occupies
//! `stride = payload_len + 128` physical bytes at `i * stride`:
//!
//! ```text
//!  +0                  head version (u64), rest of the 64-byte line unused
//!  +64                 payload: logical bytes [i * payload_len, (i + 1) * payload_len)
//!  +64 + payload_len   tail version (u64), rest of the 64-byte line unused
//! ```
//!
//! so logical offset `o` lives at physical `(o / P) * stride + 64 + o % P`
//! ([`BlockLayout::physical_of`]). Payloads start on a cache line, so values of any
//! primitive type keep their alignment. A zeroed region is a valid layout (every block at
//! version 0, payload zero).
//!
//! # Protocol
//!
//! Versions are even when the block is stable and odd while a writer is in it.
//! Writer (one at a time per block; a second one spins): `head: v -> v+1` (CAS), `tail :=
//! v+1`, release fence, payload stores, `tail := v+2`, `head := v+2` (release). A copy of
//! a block is **consistent when head == tail and both are even**. Readers check that on
//! the live memory ([`Seqlock::read`]: load head (acquire), copy the payload, acquire
//! fence, load tail) or on a copy of the whole physical block made by someone else
//! ([`BlockLayout::validate_copied`]: an RDMA READ into a local buffer).
//!
//! Why it holds: suppose the head was read before every payload byte and the tail
//! after. Head = 2k means write k's last store was visible, so all of its payload was;
//! tail = 2k means write k+1's first tail store (made before any of its payload) was not,
//! so none of its payload was. The payload copy is therefore exactly state k. The same
//! argument with head and tail swapped covers a reader that reads the tail first and the
//! head last: both ends are bumped on entry and on exit.
//!
//! # Ordering assumption for RDMA (and for bulk copies)
//!
//! [`BlockLayout::validate_copied`] needs one version word of each block to be read
//! before all of its payload and the other after. A CPU reader guarantees this: the
//! live reader loads the versions around the copy, and a bulk copy
//! (`SharedRegion::copy_out`, a vector load loop) loads in ascending address order, which
//! x86-TSO keeps (loads are not reordered with older loads). For an RDMA READ of a span it assumes the NIC reads each block's first and
//! last cache line no later / no earlier than its payload lines — true of NICs that DMA a
//! READ in increasing address order (common practice), **not promised by the verbs
//! specification**. FaRM avoids the assumption with a version in every cache line (it
//! only needs each 64-byte line to be read atomically), at the price of 1/8 of the space
//! and payloads cut into 56-byte pieces that an update loop cannot treat as one slice.
//! We chose head/tail versions so the engine keeps dense values contiguous (SIMD update
//! loops, one copy out per block) for 128 bytes per block; a NIC that reorders READ
//! lines would make `validate_copied` accept torn copies, so `scripts/rdma-check` should
//! run the stress test on real hardware.
//!
//! Consistency is per block: a read spanning blocks returns, block by block, states that
//! existed, not one snapshot of all of them.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::{check_range, Memory, OneSidedError, Result};

/// Bytes of a block's head and of its tail (one cache line each).
pub const VERSION_LINE: usize = 64;

/// Default bound on read attempts per block before [`OneSidedError::Torn`].
pub const DEFAULT_MAX_RETRIES: u32 = 100_000;

/// Where logical bytes live in a versioned range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    payload_len: usize,
    blocks: usize,
}

impl BlockLayout {
    /// `blocks` blocks of `payload_len` logical bytes each.
    ///
    /// Panics unless `payload_len` is a non-zero multiple of 64 and the physical length
    /// fits in `usize` (configuration, not peer input).
    pub fn new(payload_len: usize, blocks: usize) -> Self {
        assert!(
            payload_len > 0 && payload_len.is_multiple_of(VERSION_LINE),
            "block payload of {payload_len} bytes is not a non-zero multiple of 64"
        );
        let layout = Self {
            payload_len,
            blocks,
        };
        assert!(
            (payload_len + 2 * VERSION_LINE)
                .checked_mul(blocks)
                .is_some(),
            "{blocks} blocks of {payload_len} bytes overflow"
        );
        layout
    }

    /// [`for_len`](Self::for_len) for sizes a peer sent: `None` unless `payload_len` is
    /// a non-zero multiple of 64 and the physical length fits in `usize`.
    pub fn checked_for_len(logical_len: usize, payload_len: usize) -> Option<Self> {
        if payload_len == 0 || !payload_len.is_multiple_of(VERSION_LINE) {
            return None;
        }
        let blocks = logical_len.div_ceil(payload_len).max(1);
        (payload_len + 2 * VERSION_LINE).checked_mul(blocks)?;
        Some(Self {
            payload_len,
            blocks,
        })
    }

    /// Enough blocks of `payload_len` bytes for `logical_len` logical bytes (at least
    /// one block).
    pub fn for_len(logical_len: usize, payload_len: usize) -> Self {
        assert!(payload_len > 0, "zero block payload");
        Self::new(payload_len, logical_len.div_ceil(payload_len).max(1))
    }

    /// Logical bytes per block.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Physical bytes per block (payload plus head and tail lines).
    pub fn stride(&self) -> usize {
        self.payload_len + 2 * VERSION_LINE
    }

    /// Logical bytes in all blocks.
    pub fn logical_len(&self) -> usize {
        self.payload_len * self.blocks
    }

    /// Physical bytes the layout needs in the registered region.
    pub fn physical_len(&self) -> usize {
        self.stride() * self.blocks
    }

    /// The block that holds logical byte `logical_off`.
    pub fn block_of(&self, logical_off: usize) -> usize {
        logical_off / self.payload_len
    }

    /// Physical offset of logical byte `logical_off`.
    pub fn physical_of(&self, logical_off: usize) -> usize {
        self.block_of(logical_off) * self.stride() + VERSION_LINE + logical_off % self.payload_len
    }

    /// Physical offset of block `i`'s head word (its tail word is at
    /// `head + 64 + payload_len`).
    pub fn block_start(&self, i: usize) -> usize {
        i * self.stride()
    }

    /// The blocks that hold logical bytes `[logical_off, logical_off + len)`; refuses a
    /// range outside the layout.
    pub fn blocks_covering(&self, logical_off: usize, len: usize) -> Result<Range<usize>> {
        check_range("logical", logical_off, len, self.logical_len())?;
        if len == 0 {
            let b = self.block_of(logical_off).min(self.blocks);
            return Ok(b..b);
        }
        Ok(self.block_of(logical_off)..self.block_of(logical_off + len - 1) + 1)
    }

    /// The physical bytes to fetch (whole blocks, versions included) to read logical
    /// bytes `[logical_off, logical_off + len)` with one one-sided read.
    pub fn physical_span(&self, logical_off: usize, len: usize) -> Result<Range<usize>> {
        let b = self.blocks_covering(logical_off, len)?;
        Ok(self.block_start(b.start)..self.block_start(b.end))
    }

    /// Check a copy of whole blocks, starting with block `first_block`, made by a reader
    /// that cannot check versions while it copies (an RDMA READ of
    /// [`physical_span`](Self::physical_span)). Returns each block's version, or
    /// [`OneSidedError::Torn`] naming the first block that was mid-update (re-read it).
    ///
    /// Never panics: a buffer that is not a whole number of blocks, or that runs past
    /// the layout, is an [`OneSidedError::OutOfRange`].
    pub fn validate_copied(&self, first_block: usize, physical: &[u8]) -> Result<Vec<u64>> {
        let stride = self.stride();
        let n = physical.len() / stride;
        if !physical.len().is_multiple_of(stride)
            || first_block
                .checked_add(n)
                .is_none_or(|end| end > self.blocks)
        {
            return Err(OneSidedError::OutOfRange {
                side: "copied blocks",
                off: first_block.saturating_mul(stride) as u64,
                len: physical.len() as u64,
                region_len: self.physical_len() as u64,
            });
        }
        let word = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&physical[o..o + 8]);
            u64::from_le_bytes(w)
        };
        (0..n)
            .map(|j| {
                let head = word(j * stride);
                let tail = word(j * stride + VERSION_LINE + self.payload_len);
                if head == tail && head % 2 == 0 {
                    Ok(head)
                } else {
                    Err(OneSidedError::Torn {
                        block: first_block + j,
                        retries: 1,
                    })
                }
            })
            .collect()
    }

    /// Copy logical bytes `[logical_off, logical_off + dst.len())` out of a copy of whole
    /// blocks that starts with block `first_block` (validate it first).
    ///
    /// Panics if the copy does not hold those bytes (a caller's bug: it fetched
    /// [`physical_span`](Self::physical_span) of this very range).
    pub fn extract(&self, first_block: usize, physical: &[u8], logical_off: usize, dst: &mut [u8]) {
        let base = self.block_start(first_block);
        self.for_each_piece(logical_off, dst.len(), |phys, range| {
            let at = phys - base;
            dst[range.clone()].copy_from_slice(&physical[at..at + range.len()]);
        });
    }

    /// Calls `f(physical offset, range in the caller's buffer)` for each block's piece
    /// of logical bytes `[logical_off, logical_off + len)`.
    fn for_each_piece(
        &self,
        logical_off: usize,
        len: usize,
        mut f: impl FnMut(usize, Range<usize>),
    ) {
        let mut done = 0;
        while done < len {
            let o = logical_off + done;
            let n = (self.payload_len - o % self.payload_len).min(len - done);
            f(self.physical_of(o), done..done + n);
            done += n;
        }
    }
}

/// What a [`Seqlock::read`] went through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Attempts that found a block mid-update (odd or changed) and tried again, summed
    /// over the blocks read.
    pub retries: u64,
}

/// A versioned range over some [`Memory`]: the writer side (`write`, `update_block`,
/// `begin`) for the owner that publishes, and the reader side (`read`) for anyone who
/// maps the memory (the owner itself, or a shm peer).
///
/// Writers to the same block exclude each other (the head version doubles as a spin
/// lock), so concurrent publishers of different blocks need no outer lock. A writer that
/// panics mid-block leaves it odd for good: readers then fail with
/// [`OneSidedError::Torn`] rather than see half an update.
#[derive(Debug)]
pub struct Seqlock<M> {
    layout: BlockLayout,
    mem: M,
    max_retries: u32,
}

impl<M: Memory> Seqlock<M> {
    /// Lay `layout` over `mem` starting at its offset 0. Refuses memory shorter than
    /// `layout.physical_len()`.
    pub fn new(layout: BlockLayout, mem: M) -> Result<Self> {
        check_range("local", 0, layout.physical_len(), mem.len())?;
        Ok(Self {
            layout,
            mem,
            max_retries: DEFAULT_MAX_RETRIES,
        })
    }

    /// Bound read attempts per block (at least 1) before [`OneSidedError::Torn`].
    pub fn with_max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries.max(1);
        self
    }

    /// The layout.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// The memory underneath.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    fn head(&self, i: usize) -> &AtomicU64 {
        self.mem.atomic_u64(self.layout.block_start(i))
    }

    fn tail(&self, i: usize) -> &AtomicU64 {
        self.mem
            .atomic_u64(self.layout.block_start(i) + VERSION_LINE + self.layout.payload_len)
    }

    /// Block `i`'s current head version (odd: a writer is in it).
    pub fn version(&self, i: usize) -> u64 {
        self.head(i).load(Ordering::Acquire)
    }

    /// Enter block `i` as its writer (spins while another writer is in it). Readers see
    /// the block as mid-update until the returned guard drops.
    pub fn begin(&self, i: usize) -> BlockWrite<'_, M> {
        assert!(
            i < self.layout.blocks,
            "block {i} of {}",
            self.layout.blocks
        );
        let head = self.head(i);
        let mut v = head.load(Ordering::Relaxed);
        loop {
            if v % 2 == 1 {
                std::hint::spin_loop();
                v = head.load(Ordering::Relaxed);
                continue;
            }
            match head.compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => v = now,
            }
        }
        self.tail(i).store(v + 1, Ordering::Relaxed);
        // Both odd marks are ordered before every payload store that follows.
        fence(Ordering::Release);
        BlockWrite {
            lock: self,
            block: i,
            entered_at: v,
        }
    }

    /// Publish `src` at logical offset `logical_off`, block by block (each block's piece
    /// becomes visible atomically; the range as a whole does not).
    pub fn write(&self, logical_off: usize, src: &[u8]) -> Result<()> {
        self.layout.blocks_covering(logical_off, src.len())?;
        self.layout
            .for_each_piece(logical_off, src.len(), |phys, range| {
                let _w = self.begin(self.layout.block_of(logical_off + range.start));
                self.mem.copy_in(phys, &src[range]);
            });
        Ok(())
    }

    /// Update block `i` in place: `f` gets the block's current payload (a private copy)
    /// and whatever it leaves there is published as the next version.
    pub fn update_block<R>(&self, i: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let w = self.begin(i);
        SCRATCH.with(|s| {
            // Take the buffer out so a nested update_block (another lock) cannot alias it.
            let mut buf = std::mem::take(&mut *s.borrow_mut());
            buf.resize(self.layout.payload_len, 0);
            w.copy_out(0, &mut buf);
            let r = f(&mut buf);
            w.copy_in(0, &buf);
            *s.borrow_mut() = buf;
            r
        })
    }

    /// Read logical bytes `[logical_off, logical_off + dst.len())` from the live memory,
    /// each block's piece from one consistent version. Retries a block that is
    /// mid-update at most `max_retries` times, then fails with
    /// [`OneSidedError::Torn`] (`dst` then holds unspecified bytes).
    pub fn read(&self, logical_off: usize, dst: &mut [u8]) -> Result<ReadStats> {
        self.layout.blocks_covering(logical_off, dst.len())?;
        let mut stats = ReadStats::default();
        let mut failed = None;
        self.layout
            .for_each_piece(logical_off, dst.len(), |phys, range| {
                if failed.is_some() {
                    return;
                }
                let block = self.layout.block_of(logical_off + range.start);
                match self.read_piece(block, phys, &mut dst[range]) {
                    Ok(r) => stats.retries += u64::from(r),
                    Err(e) => failed = Some(e),
                }
            });
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    fn read_piece(&self, block: usize, phys: usize, dst: &mut [u8]) -> Result<u32> {
        let (head, tail) = (self.head(block), self.tail(block));
        for attempt in 0..self.max_retries {
            let h = head.load(Ordering::Acquire);
            if h % 2 == 0 {
                self.mem.copy_out(phys, dst);
                // Orders the payload loads before the tail load (see module docs).
                fence(Ordering::Acquire);
                if tail.load(Ordering::Relaxed) == h {
                    return Ok(attempt);
                }
            }
            if attempt % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Err(OneSidedError::Torn {
            block,
            retries: self.max_retries,
        })
    }
}

/// A writer inside one block (from [`Seqlock::begin`]); the block becomes readable at
/// its next version when this drops.
#[derive(Debug)]
pub struct BlockWrite<'a, M: Memory> {
    lock: &'a Seqlock<M>,
    block: usize,
    entered_at: u64,
}

impl<M: Memory> BlockWrite<'_, M> {
    /// Index of the block.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The version readers will see once this write ends.
    pub fn next_version(&self) -> u64 {
        self.entered_at + 2
    }

    fn payload(&self, off: usize, len: usize) -> usize {
        let p = self.lock.layout.payload_len;
        assert!(
            off.checked_add(len).is_some_and(|e| e <= p),
            "[{off}, {off}+{len}) outside a {p}-byte block payload"
        );
        self.lock.layout.block_start(self.block) + VERSION_LINE + off
    }

    /// Copy `src` into the payload at `off` (bytes from the payload's start).
    pub fn copy_in(&self, off: usize, src: &[u8]) {
        self.lock.mem.copy_in(self.payload(off, src.len()), src);
    }

    /// Copy payload bytes at `off` into `dst` (the writer's own bytes: stable).
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        self.lock.mem.copy_out(self.payload(off, dst.len()), dst);
    }
}

impl<M: Memory> Drop for BlockWrite<'_, M> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Half an update must never look consistent: leave the block odd.
            return;
        }
        let v = self.entered_at + 2;
        self.lock.tail(self.block).store(v, Ordering::Release);
        self.lock.head(self.block).store(v, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Sizes a peer sent never panic: a zero, unaligned or overflowing block size is
    /// `None`, a good one the layout `for_len` gives.
    #[test]
    fn checked_layouts_refuse_what_a_peer_should_not_send() {
        assert_eq!(BlockLayout::checked_for_len(4096, 0), None);
        assert_eq!(BlockLayout::checked_for_len(4096, 100), None);
        assert_eq!(BlockLayout::checked_for_len(usize::MAX, 64), None);
        assert_eq!(
            BlockLayout::checked_for_len(10_000, 4096),
            Some(BlockLayout::for_len(10_000, 4096))
        );
    }

    /// Plain process memory as a `Memory` (tests only).
    struct Words(Vec<AtomicU64>);

    impl Words {
        fn new(bytes: usize) -> Self {
            Self((0..bytes.div_ceil(8)).map(|_| AtomicU64::new(0)).collect())
        }
    }

    impl Memory for Words {
        fn len(&self) -> usize {
            self.0.len() * 8
        }
        fn atomic_u64(&self, off: usize) -> &AtomicU64 {
            assert!(off.is_multiple_of(8));
            &self.0[off / 8]
        }
        fn copy_out(&self, off: usize, dst: &mut [u8]) {
            for (i, b) in dst.iter_mut().enumerate() {
                let o = off + i;
                *b = self.0[o / 8].load(Ordering::Relaxed).to_le_bytes()[o % 8];
            }
        }
        fn copy_in(&self, off: usize, src: &[u8]) {
            for (i, &b) in src.iter().enumerate() {
                let o = off + i;
                let w = &self.0[o / 8];
                let mut bytes = w.load(Ordering::Relaxed).to_le_bytes();
                bytes[o % 8] = b;
                w.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn layout_math() {
        let l = BlockLayout::for_len(10_000, 4096);
        assert_eq!(l.blocks(), 3);
        assert_eq!(l.stride(), 4096 + 128);
        assert_eq!(l.physical_len(), 3 * (4096 + 128));
        assert_eq!(l.physical_of(0), 64);
        assert_eq!(l.physical_of(4095), 64 + 4095);
        assert_eq!(l.physical_of(4096), 4224 + 64);
        assert_eq!(l.blocks_covering(4000, 200).unwrap(), 0..2);
        assert_eq!(l.blocks_covering(4096, 4096).unwrap(), 1..2);
        assert_eq!(l.physical_span(4096, 1).unwrap(), 4224..2 * 4224);
        assert!(matches!(
            l.blocks_covering(3 * 4096 - 1, 2),
            Err(OneSidedError::OutOfRange { .. })
        ));
        assert_eq!(BlockLayout::for_len(0, 64).blocks(), 1);
    }

    #[test]
    fn write_then_read_and_copied_validation() {
        let l = BlockLayout::new(128, 4);
        let s = Seqlock::new(l, Words::new(l.physical_len())).unwrap();
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        s.write(100, &data).unwrap();
        let mut out = vec![0u8; 300];
        assert_eq!(s.read(100, &mut out).unwrap().retries, 0);
        assert_eq!(out, data);
        assert_eq!(s.version(0), 2);
        assert_eq!(s.version(3), 2);

        // The verbs way: copy the physical span, validate, extract.
        let span = l.physical_span(100, 300).unwrap();
        let mut phys = vec![0u8; span.len()];
        s.memory().copy_out(span.start, &mut phys);
        let first = l.block_of(100);
        assert_eq!(l.validate_copied(first, &phys).unwrap(), vec![2, 2, 2, 2]);
        let mut out2 = vec![0u8; 300];
        l.extract(first, &phys, 100, &mut out2);
        assert_eq!(out2, data);

        // A block mid-update fails validation and the live read.
        let w = s.begin(2);
        s.memory().copy_out(span.start, &mut phys);
        assert!(matches!(
            l.validate_copied(first, &phys),
            Err(OneSidedError::Torn { block: 2, .. })
        ));
        let s2 = Seqlock::new(l, s.memory()).unwrap().with_max_retries(10);
        assert!(matches!(
            s2.read(0, &mut out),
            Err(OneSidedError::Torn {
                block: 2,
                retries: 10
            })
        ));
        drop(w);
        assert_eq!(s.version(2), 4);
        assert!(s2.read(0, &mut out).is_ok());
    }

    #[test]
    fn validate_copied_never_panics_on_bad_spans() {
        let l = BlockLayout::new(64, 2);
        assert!(l.validate_copied(0, &[0u8; 100]).is_err());
        assert!(l.validate_copied(1, &vec![0u8; 2 * l.stride()]).is_err());
        assert!(l
            .validate_copied(usize::MAX, &vec![0u8; l.stride()])
            .is_err());
        assert_eq!(
            l.validate_copied(1, &vec![0u8; l.stride()]).unwrap(),
            vec![0]
        );
        let mut torn = vec![0u8; l.stride()];
        torn[0] = 1;
        torn[64 + 64] = 1;
        assert!(l.validate_copied(0, &torn).is_err());
    }

    #[test]
    fn update_block_publishes_and_a_panicking_writer_poisons() {
        let l = BlockLayout::new(64, 2);
        let s = Seqlock::new(l, Words::new(l.physical_len())).unwrap();
        s.update_block(1, |p| p.fill(7));
        let r = s.update_block(1, |p| {
            p[0] += 1;
            p[0]
        });
        assert_eq!(r, 8);
        let mut out = [0u8; 2];
        s.read(64, &mut out).unwrap();
        assert_eq!(out, [8, 7]);
        assert_eq!(s.version(1), 4);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.update_block(0, |_| panic!("update failed"))
        }));
        assert!(caught.is_err());
        assert_eq!(s.version(0) % 2, 1);
        let s = s.with_max_retries(5);
        assert!(matches!(
            s.read(0, &mut out),
            Err(OneSidedError::Torn { .. })
        ));
    }

    #[test]
    fn short_memory_and_out_of_range_writes_are_refused() {
        let l = BlockLayout::new(64, 2);
        assert!(Seqlock::new(l, Words::new(l.physical_len() - 8)).is_err());
        let s = Seqlock::new(l, Words::new(l.physical_len())).unwrap();
        assert!(s.write(100, &[0u8; 29]).is_err());
        assert!(s.write(100, &[0u8; 28]).is_ok());
    }

    #[test]
    fn concurrent_writers_of_one_block_exclude_each_other() {
        let l = BlockLayout::new(64, 1);
        let s = Seqlock::new(l, Words::new(l.physical_len())).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    for _ in 0..2000 {
                        s.update_block(0, |p| {
                            let v = u64::from_le_bytes(p[..8].try_into().unwrap());
                            p[..8].copy_from_slice(&(v + 1).to_le_bytes());
                        });
                    }
                });
            }
        });
        let mut out = [0u8; 8];
        s.read(0, &mut out).unwrap();
        assert_eq!(u64::from_le_bytes(out), 4000);
        assert_eq!(s.version(0), 8000);
    }
}
