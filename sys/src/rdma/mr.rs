//! Memory regions: pinned memory registered with the NIC.

use std::fmt;
use std::ops::{BitOr, Range};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rdma_sys as ffi;

use super::{last_errno, ProtectionDomain, RdmaError, RemoteRegion, Result};
use crate::PinnedRegion;

/// Access rights of a memory region (a subset of `IBV_ACCESS_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u32);

impl Access {
    /// The local NIC may write into the region (needed to receive, or to land RDMA READs).
    pub const LOCAL_WRITE: Access = Access(ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// Peers may write into the region with RDMA WRITE (implies [`Access::LOCAL_WRITE`],
    /// which registration adds, as the verbs require).
    pub const REMOTE_WRITE: Access = Access(ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// Peers may read the region with RDMA READ.
    pub const REMOTE_READ: Access = Access(ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    /// All three.
    pub const ALL: Access =
        Access(Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_READ.0);

    /// No rights beyond the local NIC reading the region (enough to send from it).
    pub const fn empty() -> Access {
        Access(0)
    }

    /// Whether every right of `other` is in `self`.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw `IBV_ACCESS_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.contains(Access::LOCAL_WRITE) {
            names.push("LOCAL_WRITE");
        }
        if self.contains(Access::REMOTE_WRITE) {
            names.push("REMOTE_WRITE");
        }
        if self.contains(Access::REMOTE_READ) {
            names.push("REMOTE_READ");
        }
        write!(f, "Access({})", names.join("|"))
    }
}

/// The verbs registration; deregistered on drop, before the memory it covers is unmapped.
struct Registration {
    mr: NonNull<ffi::ibv_mr>,
    pd: ProtectionDomain,
}

// SAFETY: the MR pointer is only read (keys) and passed to `ibv_dereg_mr` once; the verbs
// are thread safe.
unsafe impl Send for Registration {}
// SAFETY: as for `Send`; no method mutates through it.
unsafe impl Sync for Registration {}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: the MR was registered by `MemoryRegion::register` and is deregistered
        // exactly once. No work request can still use it: queue pairs keep an `Arc` of
        // every `MemoryRegion` they posted from until its completion is polled or the
        // queue pair is destroyed, so the last `Arc` (and this drop) comes after that.
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            tracing::error!(device = %self.pd.context().name(), rc, "ibv_dereg_mr failed");
        }
    }
}

/// A [`PinnedRegion`] registered with a protection domain.
///
/// The region owns the memory (so it cannot be unmapped while registered) and holds its
/// protection domain (so the PD outlives it). Queue pairs take it as
/// `&Arc<MemoryRegion>` and keep a clone until the work request completes.
///
/// The bytes are shared with the NIC and, with remote access rights, with peers, exactly
/// like a shared-memory mapping: they may change at any moment. So no Rust reference to
/// them is ever handed out; local code copies in and out ([`read_at`](Self::read_at),
/// [`write_at`](Self::write_at)) or uses atomics ([`atomic_u64`](Self::atomic_u64)).
/// Whether a copy sees a consistent state is the protocol's business (pserv uses
/// version words, like FaRM's).
pub struct MemoryRegion {
    // Field order matters: the registration is dropped (deregistered) before the region
    // is unmapped.
    reg: Registration,
    region: PinnedRegion,
    base: NonNull<u8>,
    len: usize,
    lkey: u32,
    rkey: u32,
    access: Access,
}

// SAFETY: `base` points into `region`, which this value owns; all access through it is
// by raw copies or atomics (see the type's docs), so moving the owner to another thread
// changes nothing.
unsafe impl Send for MemoryRegion {}
// SAFETY: shared access only copies through raw pointers or uses atomics; no `&`/`&mut`
// to the bytes exists, so concurrent callers cannot violate Rust's aliasing rules. What
// concurrent writers mean for the data is the caller's protocol, as with shared memory
// written by other processes or by the NIC itself.
unsafe impl Sync for MemoryRegion {}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .field("access", &self.access)
            .finish()
    }
}

impl ProtectionDomain {
    /// Register `region` with `access` rights, taking ownership of it. `REMOTE_WRITE`
    /// implies `LOCAL_WRITE` (the verbs refuse the former without the latter).
    pub fn register(&self, mut region: PinnedRegion, access: Access) -> Result<MemoryRegion> {
        let access = if access.contains(Access::REMOTE_WRITE) {
            access | Access::LOCAL_WRITE
        } else {
            access
        };
        let bytes = region.as_bytes_mut();
        let len = bytes.len();
        let base = NonNull::new(bytes.as_mut_ptr()).expect("a mapping is never at address 0");
        let access_c = libc::c_int::try_from(access.bits()).expect("access bits fit an int");
        // SAFETY: `base..base+len` is the live mapping owned by `region`, which the
        // returned `MemoryRegion` keeps until after deregistration; the PD is live (we
        // hold it) and the registration keeps a clone of it.
        let mr = unsafe { ffi::ibv_reg_mr(self.raw(), base.as_ptr().cast(), len, access_c) };
        let Some(mr) = NonNull::new(mr) else {
            return Err(last_errno("ibv_reg_mr", self.context().name()));
        };
        // SAFETY: `ibv_reg_mr` returned a valid, initialised `ibv_mr`; its keys never
        // change after registration.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(MemoryRegion {
            reg: Registration {
                mr,
                pd: self.clone(),
            },
            region,
            base,
            len,
            lkey,
            rkey,
            access,
        })
    }
}

impl MemoryRegion {
    /// Local key (for this side's work requests).
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// Remote key (for peers' RDMA READ / WRITE).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Virtual address of the first byte (what peers put in their work requests).
    pub fn addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: regions have at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rights it was registered with.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The protection domain it belongs to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.reg.pd
    }

    /// What a peer needs to read or write this region.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr(),
            len: self.len as u64,
            rkey: self.rkey,
        }
    }

    /// Whether the (unpinned) memory is locked in RAM, see [`PinnedRegion::is_locked`].
    /// Registration pins the pages in the NIC's translation either way.
    pub fn is_locked(&self) -> bool {
        self.region.is_locked()
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RdmaError::OutOfBounds {
                what: "local",
                offset: offset as u64,
                len: len as u64,
                region_len: self.len as u64,
            }),
        }
    }

    /// Copy `dst.len()` bytes starting at `offset` out of the region.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: the range is inside the live mapping (checked above); `dst` is a
        // distinct Rust buffer, so the ranges do not overlap. The bytes are plain
        // integers, valid in any state a concurrent writer leaves them in.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Copy `src` into the region starting at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: the range is inside the live, writable mapping (checked above); no Rust
        // reference to the region's bytes exists (see the type's docs), and `src` is a
        // distinct buffer, so the copy aliases nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// The 8 bytes at `offset` (a multiple of 8) as an atomic, for version words and
    /// flags shared with peers. An RDMA write of an aligned 8-byte word is seen whole by
    /// the CPU on the platforms RDMA NICs ship for, but the verbs do not promise it: use
    /// it for words only one side writes.
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64> {
        self.check(offset, 8)?;
        if offset & 7 != 0 {
            return Err(RdmaError::Config(format!(
                "atomic word offset {offset} is not a multiple of 8"
            )));
        }
        // SAFETY: in bounds (checked), 8-byte aligned (the base is page-aligned and the
        // offset a multiple of 8), `AtomicU64` has the layout of `u64`, and the mapping
        // lives as long as `&self`. Every other local access to these bytes is a raw copy
        // or another atomic, never a Rust reference.
        Ok(unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() })
    }

    /// Deregister and give the memory back. Fails (returning the region unchanged) while
    /// any other `Arc` holds it, for example a queue pair with a work request in flight.
    pub fn into_region(
        this: Arc<MemoryRegion>,
    ) -> std::result::Result<PinnedRegion, Arc<MemoryRegion>> {
        let mr = Arc::try_unwrap(this)?;
        let MemoryRegion { reg, region, .. } = mr;
        drop(reg);
        Ok(region)
    }

    /// The byte range `range` of this region, for posting.
    pub fn slice(self: &Arc<Self>, range: Range<usize>) -> LocalRange<'_> {
        LocalRange { mr: self, range }
    }
}

/// A byte range of a local [`MemoryRegion`] a work request reads from or lands in.
/// Bounds are checked when it is posted.
#[derive(Debug, Clone)]
pub struct LocalRange<'a> {
    /// The region.
    pub mr: &'a Arc<MemoryRegion>,
    /// Byte offsets within it.
    pub range: Range<usize>,
}

impl LocalRange<'_> {
    /// The length in bytes (0 for an inverted range, which posting refuses).
    pub fn len(&self) -> usize {
        self.range.end.saturating_sub(self.range.start)
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Check the range against the region; return (address, length, lkey).
    pub(super) fn sge(&self) -> Result<(u64, u32, u32)> {
        let Range { start, end } = self.range;
        if end < start {
            return Err(RdmaError::OutOfBounds {
                what: "local",
                offset: start as u64,
                len: 0,
                region_len: self.mr.len as u64,
            });
        }
        self.mr.check(start, end - start)?;
        let len = u32::try_from(end - start).map_err(|_| RdmaError::MessageTooLarge {
            len: (end - start) as u64,
            max: u32::MAX.into(),
        })?;
        Ok((self.mr.addr() + start as u64, len, self.mr.lkey))
    }
}

/// Memory of the caller registered for as long as it is borrowed: a NIC may land RDMA
/// READs in it (with [`Access::LOCAL_WRITE`]) while no Rust code can touch it.
///
/// Made by [`ProtectionDomain::register_borrowed`] from a `&mut [u8]`, which it holds
/// exclusively until it is dropped; dropping it deregisters the memory first, and once
/// `ibv_dereg_mr` returned the device touches it no more (a request still in flight then
/// completes in error instead). So the borrow may end at any time, also while a READ
/// that timed out is still posted. Registration pins the pages and costs a system call
/// per use: keep it for transfers large enough to pay for it, and for owned buffers that
/// are used again register a [`MemoryRegion`] once.
pub struct BorrowedRegion<'a> {
    reg: Registration,
    base: NonNull<u8>,
    len: usize,
    lkey: u32,
    access: Access,
    _buf: std::marker::PhantomData<&'a mut [u8]>,
}

// SAFETY: the region is an exclusive borrow of plain bytes; nothing is accessed through
// `base` by this type (only the NIC writes there, until deregistration on drop).
unsafe impl Send for BorrowedRegion<'_> {}

impl fmt::Debug for BorrowedRegion<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BorrowedRegion")
            .field("addr", &format_args!("{:#x}", self.base.as_ptr() as u64))
            .field("len", &self.len)
            .field("lkey", &self.lkey)
            .field("access", &self.access)
            .finish()
    }
}

impl ProtectionDomain {
    /// Register `buf` (not empty) with `access` for as long as the returned value lives
    /// (see [`BorrowedRegion`]). `REMOTE_WRITE` implies `LOCAL_WRITE`.
    pub fn register_borrowed<'a>(
        &self,
        buf: &'a mut [u8],
        access: Access,
    ) -> Result<BorrowedRegion<'a>> {
        let access = if access.contains(Access::REMOTE_WRITE) {
            access | Access::LOCAL_WRITE
        } else {
            access
        };
        if buf.is_empty() {
            return Err(RdmaError::Config("registering an empty buffer".into()));
        }
        let len = buf.len();
        let base = NonNull::new(buf.as_mut_ptr()).expect("a slice is never at address 0");
        let access_c = libc::c_int::try_from(access.bits()).expect("access bits fit an int");
        // SAFETY: `base..base+len` is the live buffer `buf` borrows mutably for `'a`,
        // which the returned value holds (so nothing else reads or writes it meanwhile)
        // and deregisters on drop, before the borrow ends; the PD is live and the
        // registration keeps a clone of it.
        let mr = unsafe { ffi::ibv_reg_mr(self.raw(), base.as_ptr().cast(), len, access_c) };
        let Some(mr) = NonNull::new(mr) else {
            return Err(last_errno("ibv_reg_mr", self.context().name()));
        };
        // SAFETY: `ibv_reg_mr` returned a valid, initialised `ibv_mr`.
        let lkey = unsafe { (*mr.as_ptr()).lkey };
        Ok(BorrowedRegion {
            reg: Registration {
                mr,
                pd: self.clone(),
            },
            base,
            len,
            lkey,
            access,
            _buf: std::marker::PhantomData,
        })
    }
}

impl BorrowedRegion<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: an empty buffer is not registered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The protection domain it belongs to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.reg.pd
    }

    /// The rights it was registered with.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Check `range` against the buffer; return (address, length, lkey).
    pub(super) fn sge(&self, range: Range<usize>) -> Result<(u64, u32, u32)> {
        let Range { start, end } = range;
        match end.checked_sub(start) {
            Some(n) if end <= self.len && n > 0 => {
                let len = u32::try_from(n).map_err(|_| RdmaError::MessageTooLarge {
                    len: n as u64,
                    max: u32::MAX.into(),
                })?;
                Ok((self.base.as_ptr() as u64 + start as u64, len, self.lkey))
            }
            _ => Err(RdmaError::OutOfBounds {
                what: "local",
                offset: start as u64,
                len: end.saturating_sub(start) as u64,
                region_len: self.len as u64,
            }),
        }
    }
}
