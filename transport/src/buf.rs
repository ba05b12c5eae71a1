//! Buffers that frames are sent from and received into.
//!
//! - [`Payload`]: the bytes of an outgoing frame's keys or values, borrowed from the
//!   caller's own buffer (shared through an `Arc`, or owned) so that large values are
//!   written to the socket straight from where the application keeps them.
//! - [`BufPool`] / [`PoolBuf`]: 8-byte-aligned receive buffers that are reused, so their
//!   pages stay populated (a fresh mapping is written an order of magnitude slower).
//!   Buffers of at least [`MAPPED_MIN_BYTES`] are their own mappings, populated up front
//!   on huge pages where the kernel gives them, so the first large frame a connection
//!   receives does not fault its buffer in 4 KiB page by page.
//! - [`OutFrame`], [`RecvFrame`], [`OwnedFrame`]: a frame on its way out or in.

use std::collections::VecDeque;
use std::sync::Arc;

use bytemuck::Pod;
use parking_lot::{Mutex, MutexGuard};
use pserv_sys::PinnedRegion;

use crate::tcp::lock_order::{Rank, Ranked};
use crate::wire::{pad8, Frame, Header, Layout, HEADER_LEN};

/// Anything that can lend its contents as bytes for sending.
pub trait AsBytes: Send + Sync + 'static {
    /// The bytes.
    fn as_bytes(&self) -> &[u8];
}

impl<T: Pod + Send + Sync> AsBytes for Vec<T> {
    fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

impl<T: Pod + Send + Sync> AsBytes for Box<[T]> {
    fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

impl AsBytes for PoolBuf {
    fn as_bytes(&self) -> &[u8] {
        self.bytes()
    }
}

enum PayloadData {
    Empty,
    Owned(Box<dyn AsBytes>),
    Shared(Arc<dyn AsBytes>),
}

/// The keys or values of an outgoing frame: a byte range of a buffer the frame owns or
/// shares. Dropping the payload (when the bytes have reached the socket) releases it.
pub struct Payload {
    data: PayloadData,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

impl Payload {
    /// No bytes.
    pub fn empty() -> Self {
        Payload {
            data: PayloadData::Empty,
            start: 0,
            end: 0,
        }
    }

    /// All bytes of a buffer the payload takes ownership of.
    pub fn owned(data: impl AsBytes) -> Self {
        let end = data.as_bytes().len();
        Payload {
            data: PayloadData::Owned(Box::new(data)),
            start: 0,
            end,
        }
    }

    /// A byte range of a shared buffer (no copy).
    ///
    /// # Panics
    /// If the range is not within the buffer (a caller bug).
    pub fn shared(data: Arc<dyn AsBytes>, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end,
            "payload range {range:?} runs backwards"
        );
        assert!(
            range.end <= data.as_bytes().len(),
            "payload range {range:?} outside a buffer of {} bytes",
            data.as_bytes().len()
        );
        Payload {
            data: PayloadData::Shared(data),
            start: range.start,
            end: range.end,
        }
    }

    /// Copy `bytes` into a new owned payload (small control messages).
    pub fn copy_from(bytes: &[u8]) -> Self {
        Payload::owned(bytes.to_vec())
    }

    /// The payload's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            PayloadData::Empty => &[],
            PayloadData::Owned(b) => &b.as_bytes()[self.start..self.end],
            PayloadData::Shared(b) => &b.as_bytes()[self.start..self.end],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A frame to send: header, key bytes, value bytes. The header's `key_count` and
/// `value_bytes` are set from the payloads.
#[derive(Debug)]
pub struct OutFrame {
    header: Header,
    keys: Payload,
    values: Payload,
}

impl OutFrame {
    /// Assemble a frame.
    ///
    /// # Panics
    /// If the key payload is not a whole number of u64 keys (a caller bug).
    pub fn new(mut header: Header, keys: Payload, values: Payload) -> Self {
        assert!(
            keys.len().is_multiple_of(8),
            "key payload must hold whole u64 keys"
        );
        header.key_count = (keys.len() / 8) as u64;
        header.value_bytes = values.len() as u64;
        OutFrame {
            header,
            keys,
            values,
        }
    }

    /// The header as it goes on the wire.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Total bytes on the wire, padding included.
    pub fn wire_len(&self) -> usize {
        pad8(HEADER_LEN + self.keys.len() + self.values.len())
    }

    /// The frame as it goes on the wire, in one buffer (a copy: for tests and the
    /// simulation, which carry frames as bytes; the loops write the parts as they are).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        for p in self.parts() {
            out.extend_from_slice(p);
        }
        debug_assert_eq!(out.len(), self.wire_len());
        out
    }

    /// The value bytes.
    pub(crate) fn values(&self) -> &Payload {
        &self.values
    }

    /// The key bytes.
    pub(crate) fn keys(&self) -> &Payload {
        &self.keys
    }

    /// Header, keys and values, to rebuild the frame (with compressed values).
    pub(crate) fn into_parts(self) -> (Header, Payload, Payload) {
        (self.header, self.keys, self.values)
    }

    /// The frame's parts in wire order: header, keys, values, padding.
    pub(crate) fn parts(&self) -> [&[u8]; 4] {
        let pad = self.wire_len() - HEADER_LEN - self.keys.len() - self.values.len();
        [
            self.header.as_bytes(),
            self.keys.bytes(),
            self.values.bytes(),
            &crate::wire::PADDING[..pad],
        ]
    }
}

/// Pooled buffers of at least this many bytes are anonymous mappings of a whole number
/// of these (the huge-page size), populated when made ([`PinnedRegion::populated`]),
/// rather than heap vectors the first writes fault in page by page.
pub const MAPPED_MIN_BYTES: usize = 2 << 20;

/// The words of a pooled buffer: a heap vector (small buffers) or its own populated
/// mapping (large ones). Both are zeroed when made.
enum Words {
    Heap(Vec<u64>),
    Mapped(PinnedRegion),
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Words::Heap(v) => write!(f, "Heap({} words)", v.len()),
            Words::Mapped(r) => write!(f, "Mapped({} bytes)", r.len()),
        }
    }
}

impl Default for Words {
    fn default() -> Self {
        Words::Heap(Vec::new())
    }
}

impl Words {
    /// Room for at least `words` words: a heap vector below [`MAPPED_MIN_BYTES`], else a
    /// populated mapping of whole huge pages. A mapping the system refuses falls back to
    /// the heap (the frame is within the configured bound, so the heap is as good a try).
    fn with_room(words: usize) -> Words {
        let bytes = words.saturating_mul(8);
        if bytes >= MAPPED_MIN_BYTES {
            let len = bytes.div_ceil(MAPPED_MIN_BYTES) * MAPPED_MIN_BYTES;
            match PinnedRegion::populated(len) {
                Ok(r) => return Words::Mapped(r),
                Err(err) => {
                    tracing::debug!(error = %err, bytes = len, "mapping a receive buffer failed; using the heap");
                }
            }
        }
        Words::Heap(vec![0u64; words])
    }

    /// Capacity in words.
    fn len(&self) -> usize {
        match self {
            Words::Heap(v) => v.len(),
            Words::Mapped(r) => r.len() / 8,
        }
    }

    fn as_slice(&self) -> &[u64] {
        match self {
            Words::Heap(v) => v,
            Words::Mapped(r) => r.as_slice(),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u64] {
        match self {
            Words::Heap(v) => v,
            Words::Mapped(r) => r.as_mut_slice(),
        }
    }
}

/// A pool of reusable 8-byte-aligned buffers, bounded in count.
#[derive(Debug)]
pub struct BufPool {
    free: Mutex<VecDeque<Words>>,
    max_free: usize,
}

impl BufPool {
    /// A pool that keeps at most `max_free` idle buffers.
    pub fn new(max_free: usize) -> Arc<Self> {
        Arc::new(BufPool {
            free: Mutex::new(VecDeque::new()),
            max_free,
        })
    }

    /// A buffer of `len` bytes (contents unspecified: whatever the last user left).
    /// Reuses the smallest idle buffer that is large enough, else replaces the largest
    /// with one large enough (a heap vector grown in place below [`MAPPED_MIN_BYTES`],
    /// else a fresh populated mapping: its old contents need not be kept).
    pub fn take(self: &Arc<Self>, len: usize) -> PoolBuf {
        let words = len.div_ceil(8);
        let mut v = {
            let mut free = self.lock_free();
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= words)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            let largest = || {
                free.iter()
                    .enumerate()
                    .max_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i)
            };
            match best.or_else(largest) {
                Some(i) => free.swap_remove_back(i).unwrap_or_default(),
                None => Words::default(),
            }
        };
        if v.len() < words {
            match &mut v {
                Words::Heap(h) if words * 8 < MAPPED_MIN_BYTES => h.resize(words, 0),
                _ => v = Words::with_room(words),
            }
        }
        debug_assert!(
            v.len() * 8 >= len,
            "pooled buffer of {} bytes handed out for {len} bytes",
            v.len() * 8
        );
        PoolBuf {
            words: v,
            len,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, v: Words) {
        let mut free = self.lock_free();
        if free.len() < self.max_free {
            free.push_back(v);
        }
        debug_assert!(
            free.len() <= self.max_free,
            "pool keeps {} idle buffers, more than its bound of {}",
            free.len(),
            self.max_free
        );
    }

    /// Number of idle buffers (tests).
    pub fn idle(&self) -> usize {
        self.lock_free().len()
    }

    /// The free list, locked: a leaf lock, last in the transport's lock order (see
    /// [`tcp`](crate::tcp)).
    fn lock_free(&self) -> Ranked<MutexGuard<'_, VecDeque<Words>>> {
        Ranked::lock(Rank::Pool, || self.free.lock())
    }
}

/// A buffer from a [`BufPool`]; returns to it when dropped.
pub struct PoolBuf {
    words: Words,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolBuf({} bytes)", self.len)
    }
}

impl PoolBuf {
    /// The buffer's bytes (8-byte aligned).
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(self.words.as_slice())[..self.len]
    }

    /// The buffer's bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(self.words.as_mut_slice())[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shorten the buffer to its first `len` bytes (it keeps its capacity, and returns
    /// to the pool whole).
    ///
    /// # Panics
    /// If `len` is above the current length (a caller bug).
    pub(crate) fn truncate(&mut self, len: usize) {
        assert!(
            len <= self.len,
            "truncating a buffer of {} bytes to {len}",
            self.len
        );
        self.len = len;
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.words));
        }
    }
}

/// A received frame that owns its bytes (a pooled buffer holding the frame's body).
/// Handing one to another thread costs no copy.
#[derive(Debug)]
pub struct OwnedFrame {
    header: Header,
    layout: Layout,
    body: PoolBuf,
}

impl OwnedFrame {
    /// Wrap a body already checked against `header` (receivers only).
    pub(crate) fn from_checked(header: Header, layout: Layout, body: PoolBuf) -> Self {
        layout.debug_check_against(&header);
        debug_assert!(
            body.len() >= layout.body_len,
            "owned frame body of {} bytes for a layout of {}",
            body.len(),
            layout.body_len
        );
        OwnedFrame {
            header,
            layout,
            body,
        }
    }

    /// The frame view.
    pub fn frame(&self) -> Frame<'_> {
        Frame::from_body(self.header, &self.layout, self.body.bytes())
            .expect("an owned frame was checked when it was received")
    }

    /// The frame view, with the checks that need the keys (ranges) done again.
    pub(crate) fn frame_checked(&self) -> Result<Frame<'_>, crate::wire::WireError> {
        Frame::from_body(self.header, &self.layout, self.body.bytes())
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// A frame of `header` (its `key_count` and `value_bytes` set from the slices) with
    /// `keys` and `values` copied into a buffer from `pool`, checked like a received
    /// frame: how a receiver rebuilds a frame it expanded (cached keys resolved).
    pub fn assemble(
        pool: &Arc<BufPool>,
        header: Header,
        keys: &[u64],
        values: &[u8],
        max_frame: usize,
    ) -> Result<OwnedFrame, crate::wire::WireError> {
        let mut h = header;
        h.key_count = keys.len() as u64;
        h.value_bytes = values.len() as u64;
        let layout = h.layout(max_frame)?;
        let mut body = pool.take(layout.body_len);
        {
            let bytes = body.bytes_mut();
            let (k, rest) = bytes.split_at_mut(layout.keys_len);
            k.copy_from_slice(bytemuck::cast_slice(keys));
            rest[..values.len()].copy_from_slice(values);
            rest[values.len()..].fill(0);
        }
        let frame = OwnedFrame {
            header: h,
            layout,
            body,
        };
        frame.frame_checked()?;
        Ok(frame)
    }
}

/// A frame handed to a [`Handler`](crate::tcp::Handler): either a view into the
/// connection's receive buffer (small frames, valid during the call) or a frame that owns
/// its buffer (large frames). [`into_owned`](Self::into_owned) keeps it beyond the call,
/// copying only when it was a view.
#[derive(Debug)]
pub enum RecvFrame<'a> {
    /// A view into the connection's receive buffer.
    Borrowed {
        /// The frame.
        frame: Frame<'a>,
        /// The pool to copy into if the handler keeps it.
        pool: &'a Arc<BufPool>,
    },
    /// A frame in its own buffer.
    Owned(OwnedFrame),
}

impl RecvFrame<'_> {
    /// The frame view.
    pub fn frame(&self) -> Frame<'_> {
        match self {
            RecvFrame::Borrowed { frame, .. } => *frame,
            RecvFrame::Owned(o) => o.frame(),
        }
    }

    /// Keep the frame beyond the handler call.
    pub fn into_owned(self) -> OwnedFrame {
        match self {
            RecvFrame::Owned(o) => o,
            RecvFrame::Borrowed { frame, pool } => {
                let header = *frame.header();
                let layout = header
                    .layout(usize::MAX)
                    .expect("a received frame was checked");
                let mut body = pool.take(layout.body_len);
                let (k, v) = body.bytes_mut()[..layout.keys_len + layout.values_len]
                    .split_at_mut(layout.keys_len);
                k.copy_from_slice(bytemuck::cast_slice(frame.keys()));
                v.copy_from_slice(frame.values());
                OwnedFrame::from_checked(header, layout, body)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_buffers_best_fit() {
        let pool = BufPool::new(4);
        let a = pool.take(1000);
        let b = pool.take(100_000);
        assert_eq!(a.len(), 1000);
        let (pa, pb) = (a.bytes().as_ptr(), b.bytes().as_ptr());
        drop(a);
        drop(b);
        assert_eq!(pool.idle(), 2);
        // The small request gets the small buffer back, the large one the large one.
        assert_eq!(pool.take(500).bytes().as_ptr(), pa);
        assert_eq!(pool.take(90_000).bytes().as_ptr(), pb);
        assert_eq!(pool.take(8).bytes().as_ptr() as usize % 8, 0);
    }

    #[test]
    fn large_buffers_are_mapped_zeroed_and_reused() {
        let pool = BufPool::new(4);
        let mut a = pool.take(3 << 20);
        assert_eq!(a.len(), 3 << 20);
        assert!(matches!(a.words, Words::Mapped(_)));
        // Whole huge pages: room for up to 4 MiB.
        assert_eq!(a.words.len() * 8, 4 << 20);
        assert!(a.bytes().iter().all(|&b| b == 0));
        a.bytes_mut()[(3 << 20) - 1] = 9;
        let p = a.bytes().as_ptr();
        drop(a);
        // A smaller large request reuses it (contents as left); a larger one replaces it.
        let b = pool.take(4 << 20);
        assert_eq!(b.bytes().as_ptr(), p);
        assert_eq!(b.bytes()[(3 << 20) - 1], 9);
        drop(b);
        let c = pool.take((4 << 20) + 1);
        assert_eq!(c.words.len() * 8, 6 << 20);
        assert_eq!(c.bytes().as_ptr() as usize % 8, 0);
        drop(c);
        assert_eq!(pool.idle(), 1);
        // Small requests stay on the heap.
        let mut small = BufPool::new(1).take(1000);
        assert!(matches!(small.words, Words::Heap(_)));
        small.bytes_mut()[999] = 1;
    }

    #[test]
    fn pool_is_bounded() {
        let pool = BufPool::new(2);
        let bufs: Vec<_> = (0..5).map(|_| pool.take(64)).collect();
        drop(bufs);
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    fn payload_views_a_shared_range() {
        let data: Arc<dyn AsBytes> = Arc::new(vec![1u32, 2, 3, 4]);
        let p = Payload::shared(data.clone(), 4..12);
        assert_eq!(p.bytes(), bytemuck::cast_slice::<u32, u8>(&[2, 3]));
        let f = OutFrame::new(
            Header::new(crate::wire::MessageKind::Push, 1, 2),
            Payload::owned(vec![7u64]),
            p,
        );
        assert_eq!(f.header().key_count, 1);
        assert_eq!(f.header().value_bytes, 8);
        assert_eq!(f.wire_len(), 56 + 8 + 8);
        let total: usize = f.parts().iter().map(|p| p.len()).sum();
        assert_eq!(total, f.wire_len());
    }
}
