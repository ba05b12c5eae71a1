//! One-sided access to registered memory: the interface both the shared-memory and the
//! RDMA-verbs backends implement.
//!
//! A process **registers** a region (memory that peers may read and write without its
//! CPU), **describes** it as a [`RegionDesc`] (backend, region id, base address, length,
//! access key, locator), and sends the encoded descriptor to a peer over the TCP control
//! connection. The peer **attaches** the descriptor through a connected [`OneSided::Peer`]
//! and then **reads** remote ranges into its own registered buffers, **writes** its
//! buffers into remote ranges, and **notifies** the owner with a 32-bit immediate (like
//! verbs' `WRITE_WITH_IMM`). The owner picks notifications up with
//! [`OneSided::poll_notice`] (non-blocking, for a busy-polling event loop) or
//! [`OneSided::wait_notice`] (blocking with a timeout).
//!
//! # Connecting two processes
//!
//! Both ends call [`OneSided::prepare`], exchange the returned endpoint bytes over their
//! control connection, and call [`OneSided::connect`] with the pending half and the other
//! end's bytes (verbs: a reliable-connected queue pair goes INIT -> RTR -> RTS; shm: the
//! peer's notification socket and token are recorded). Everything one-sided to that peer
//! then goes through the returned `Peer`.
//!
//! # Intended use by the engine
//!
//! - The **server** registers its dense range store, laid out in versioned blocks
//!   ([`seqlock`]), plus one landing area per worker; it sends each worker the store's
//!   descriptor and that worker's landing-area descriptor.
//! - A worker **pulls** a dense key range with one one-sided read of the blocks that
//!   cover it, validated block by block ([`seqlock::BlockLayout::validate_copied`] after a
//!   verbs READ; [`seqlock::Seqlock::read`] straight from a shm mapping).
//! - A worker **pushes** with a one-sided write of its values into its landing area and a
//!   notification ([`OneSided::write_notify`]: one `WRITE_WITH_IMM` on verbs) whose
//!   immediate says what landed (for example a sequence number or a slot).
//! - The server, on the notice, applies the update function to its store and
//!   **publishes** the touched blocks with a new version ([`seqlock::Seqlock::write`]).
//!
//! The server's CPU is on no pull's data path and on a push's only for the apply.
//!
//! # Safety of shared bytes
//!
//! Registered memory can change under the process at any time (a peer's write, a NIC's
//! DMA), so it is never handed out as `&[u8]`/`&mut [u8]`: [`Memory`] offers copies and
//! atomic words only. Whether bytes copied out form a consistent state is decided by a
//! version protocol ([`seqlock`]), never by the copy.

use std::fmt;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[cfg(feature = "rdma")]
pub mod rdma;
pub mod seqlock;
pub mod shm;

/// Errors of one-sided operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OneSidedError {
    /// The descriptor's access key does not match the region's.
    #[error("region {region}: access key does not match (descriptor key {key:#x})")]
    WrongKey {
        /// Region id from the descriptor.
        region: u64,
        /// The key the descriptor carried.
        key: u64,
    },
    /// An offset/length pair does not fit in a region.
    #[error("{side} range [{off}, {off}+{len}) does not fit in a region of {region_len} bytes")]
    OutOfRange {
        /// Which region: "remote" or "local".
        side: &'static str,
        /// Offset of the range in bytes.
        off: u64,
        /// Length of the range in bytes.
        len: u64,
        /// Length of the region in bytes.
        region_len: u64,
    },
    /// A descriptor's length does not match the registered region.
    #[error("region {region}: descriptor says {desc_len} bytes, the region has {actual_len}")]
    LengthMismatch {
        /// Region id from the descriptor.
        region: u64,
        /// Length the descriptor carried.
        desc_len: u64,
        /// Length of the region found at the locator.
        actual_len: u64,
    },
    /// No such region (gone, never registered, or the locator names something else).
    #[error("unknown region {region}: {reason}")]
    UnknownRegion {
        /// Region id from the descriptor.
        region: u64,
        /// What was found instead.
        reason: String,
    },
    /// A descriptor or endpoint for another backend was handed to this one.
    #[error("descriptor is for the {found} backend, this is the {expected} backend")]
    WrongBackend {
        /// This backend.
        expected: BackendKind,
        /// The descriptor's backend.
        found: BackendKind,
    },
    /// Bytes that should be an encoded descriptor or endpoint are not one.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// "descriptor" or "endpoint".
        what: &'static str,
        /// What is wrong with the bytes.
        reason: &'static str,
    },
    /// The backend cannot run here (for example "no RDMA device found").
    #[error("{backend} backend unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: BackendKind,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The remote side or the device failed an operation (verbs: a work completion
    /// with an error status).
    #[error("{op} failed: {detail}")]
    Failed {
        /// The operation ("read", "write", "notify", ...).
        op: &'static str,
        /// The status, in words.
        detail: String,
    },
    /// A versioned block kept changing (or stayed odd: a writer mid-update) for
    /// `retries` attempts; the read returned nothing.
    #[error("block {block} was being written during {retries} read attempts")]
    Torn {
        /// Index of the block.
        block: usize,
        /// Attempts made.
        retries: u32,
    },
    /// A blocking wait ran out of time.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// An operating-system call failed.
    #[error("{op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of one-sided operations.
pub type Result<T, E = OneSidedError> = std::result::Result<T, E>;

/// Which backend made a descriptor or endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BackendKind {
    /// Shared memory between processes of one host.
    Shm = 1,
    /// RDMA verbs (reliable-connected queue pairs).
    Rdma = 2,
}

impl BackendKind {
    /// The kind for its byte in an encoding, if it names one.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Shm),
            2 => Some(Self::Rdma),
            _ => None,
        }
    }

    /// Lower-case name ("shm", "rdma").
    pub fn name(self) -> &'static str {
        match self {
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a peer needs to reach a registered region.
///
/// - `addr`: the base address in the owner's addressing for this backend: rdma, the
///   region's virtual address (remote ops target `addr + off`); shm, the byte offset of
///   the region's first byte inside the mapping named by `locator`.
/// - `key`: rdma, the memory region's `rkey` (zero-extended); shm, a random 64-bit key
///   that the region's header must match (catches stale or mixed-up descriptors; it is
///   not a capability against a hostile process of the same user).
/// - `locator`: shm, the path to open (UTF-8); rdma, empty (queue-pair details travel in
///   the endpoint bytes of [`OneSided::prepare`]).
///
/// Encoding (little-endian), [`RegionDesc::encode`] / [`RegionDesc::decode`]:
///
/// ```text
///  offset size field
///   0     4   magic "PSRD"
///   4     1   version (1)
///   5     1   backend kind (1 shm, 2 rdma)
///   6     2   locator length L (at most LOCATOR_MAX)
///   8     8   region id
///  16     8   addr
///  24     8   len
///  32     8   key
///  40     L   locator
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Backend that registered the region.
    pub kind: BackendKind,
    /// Owner-chosen id, unique within the owner process.
    pub region_id: u64,
    /// Base address (see the type's docs).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Access key (see the type's docs).
    pub key: u64,
    /// Backend-specific bytes (see the type's docs).
    pub locator: Vec<u8>,
}

impl RegionDesc {
    /// "PSRD" read as a little-endian u32.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"PSRD");
    /// Encoding version.
    pub const VERSION: u8 = 1;
    /// Fixed part of the encoding in bytes.
    pub const FIXED_LEN: usize = 40;
    /// Longest locator accepted.
    pub const LOCATOR_MAX: usize = 1024;

    /// Length of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        Self::FIXED_LEN + self.locator.len()
    }

    /// The descriptor as bytes.
    ///
    /// Panics if the locator is longer than [`LOCATOR_MAX`](Self::LOCATOR_MAX) (backends
    /// never make one).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.locator.len() <= Self::LOCATOR_MAX, "locator too long");
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&Self::MAGIC.to_le_bytes());
        out.push(Self::VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&(self.locator.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.region_id.to_le_bytes());
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.locator);
        debug_assert_eq!(
            out.len(),
            self.encoded_len(),
            "a descriptor encodes to another length than it announces"
        );
        out
    }

    /// Parse bytes from a peer. Never panics; the whole input must be one descriptor.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |reason| OneSidedError::Malformed {
            what: "descriptor",
            reason,
        };
        if bytes.len() < Self::FIXED_LEN {
            return Err(bad("shorter than the fixed part"));
        }
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(w)
        };
        if bytes[0..4] != Self::MAGIC.to_le_bytes() {
            return Err(bad("bad magic"));
        }
        if bytes[4] != Self::VERSION {
            return Err(bad("unknown version"));
        }
        let kind = BackendKind::from_u8(bytes[5]).ok_or(bad("unknown backend kind"))?;
        let loc_len = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
        if loc_len > Self::LOCATOR_MAX {
            return Err(bad("locator too long"));
        }
        if bytes.len() != Self::FIXED_LEN + loc_len {
            return Err(bad("length does not match the locator length"));
        }
        let len = u64_at(24);
        let addr = u64_at(16);
        if addr.checked_add(len).is_none() {
            return Err(bad("addr + len overflows"));
        }
        Ok(Self {
            kind,
            region_id: u64_at(8),
            addr,
            len,
            key: u64_at(32),
            locator: bytes[Self::FIXED_LEN..].to_vec(),
        })
    }
}

/// Identifies a connected peer in [`Notice`]s; assigned by [`OneSided::connect`] on
/// this side, unique within one backend instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// A notification received by a region's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The peer that sent it.
    pub peer: PeerId,
    /// The 32-bit immediate it carried.
    pub imm: u32,
}

/// Memory that other processes (or a NIC) may read and write while this process uses
/// it: copies and atomic words, never references to the bytes.
///
/// Offsets are bytes from the region's start. Out-of-range offsets are a broken
/// invariant of the caller and panic; callers check ranges that come from peers first
/// (see [`check_range`]).
pub trait Memory {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The 8-byte-aligned word at `off` as an atomic. Panics if `off` is not a multiple
    /// of 8 or the word is out of range.
    fn atomic_u64(&self, off: usize) -> &AtomicU64;

    /// Copy `dst.len()` bytes starting at `off` into `dst`. The bytes may change while
    /// they are copied (a racing writer); the result is then some mix of old and new
    /// bytes, to be checked by a version protocol.
    fn copy_out(&self, off: usize, dst: &mut [u8]);

    /// Copy `src` into the region starting at `off`.
    fn copy_in(&self, off: usize, src: &[u8]);
}

impl<M: Memory + ?Sized> Memory for &M {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        (**self).atomic_u64(off)
    }
    fn copy_out(&self, off: usize, dst: &mut [u8]) {
        (**self).copy_out(off, dst)
    }
    fn copy_in(&self, off: usize, src: &[u8]) {
        (**self).copy_in(off, src)
    }
}

impl<M: Memory + ?Sized> Memory for std::sync::Arc<M> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        (**self).atomic_u64(off)
    }
    fn copy_out(&self, off: usize, dst: &mut [u8]) {
        (**self).copy_out(off, dst)
    }
    fn copy_in(&self, off: usize, src: &[u8]) {
        (**self).copy_in(off, src)
    }
}

/// `Ok` when `[off, off + len)` fits in `region_len` bytes, else
/// [`OneSidedError::OutOfRange`] naming `side` and the numbers.
pub fn check_range(side: &'static str, off: usize, len: usize, region_len: usize) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(OneSidedError::OutOfRange {
            side,
            off: off as u64,
            len: len as u64,
            region_len: region_len as u64,
        }),
    }
}

/// One-sided access: the interface of the shm and rdma backends.
///
/// Operations are synchronous: `read`, `write` and `write_notify` return once the data
/// is in place at the target (verbs: the work completion was polled). A `Local` is kept
/// by `&mut` during a read into it, so the engine cannot look at it half-filled.
///
/// Offsets and lengths from descriptors are checked: a range outside the remote region
/// is refused with [`OneSidedError::OutOfRange`] before anything moves.
pub trait OneSided {
    /// A region registered by this process (a shm mapping; a verbs memory region).
    type Local: Memory;
    /// The half of a connection made by [`prepare`](Self::prepare) (verbs: a queue pair
    /// in INIT).
    type Pending;
    /// A connection to one peer process (verbs: a connected queue pair).
    type Peer;
    /// A peer's region attached through a `Peer`; remembers that peer.
    type Remote;

    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Register `len` bytes (zeroed, populated) that peers may read and write.
    fn register(&self, len: usize) -> Result<Self::Local>;

    /// The descriptor a peer needs to reach `local`.
    fn describe(&self, local: &Self::Local) -> RegionDesc;

    /// Start a connection: the pending half and the endpoint bytes to send to the peer.
    fn prepare(&self) -> Result<(Self::Pending, Vec<u8>)>;

    /// Finish a connection with the peer's endpoint bytes (from its `prepare`).
    fn connect(&self, pending: Self::Pending, remote_endpoint: &[u8]) -> Result<Self::Peer>;

    /// The id notices from `peer` carry.
    fn peer_id(&self, peer: &Self::Peer) -> PeerId;

    /// Attach a peer's region from its descriptor. Refuses a descriptor for another
    /// backend, a wrong key, a length that does not match, or a region that is gone.
    fn attach(&self, peer: &Self::Peer, desc: &RegionDesc) -> Result<Self::Remote>;

    /// Length in bytes of an attached region.
    fn remote_len(&self, remote: &Self::Remote) -> usize;

    /// Copy `len` bytes of the remote region at `remote_off` into `local` at `local_off`.
    fn read(
        &self,
        remote: &Self::Remote,
        remote_off: usize,
        local: &mut Self::Local,
        local_off: usize,
        len: usize,
    ) -> Result<()>;

    /// Copy `len` bytes of `local` at `local_off` into the remote region at `remote_off`.
    fn write(
        &self,
        remote: &Self::Remote,
        remote_off: usize,
        local: &Self::Local,
        local_off: usize,
        len: usize,
    ) -> Result<()>;

    /// Notify the owner of `remote` with an immediate. Notices from one peer arrive in
    /// the order they were sent, after the data of every write that returned before.
    fn notify(&self, remote: &Self::Remote, imm: u32) -> Result<()>;

    /// [`write`](Self::write), then [`notify`](Self::notify) with `imm` (verbs: one
    /// `WRITE_WITH_IMM`).
    #[allow(clippy::too_many_arguments)]
    fn write_notify(
        &self,
        remote: &Self::Remote,
        remote_off: usize,
        local: &Self::Local,
        local_off: usize,
        len: usize,
        imm: u32,
    ) -> Result<()> {
        self.write(remote, remote_off, local, local_off, len)?;
        self.notify(remote, imm)
    }

    /// The next notice for this process, if one is waiting (never blocks).
    fn poll_notice(&self) -> Result<Option<Notice>>;

    /// The next notice, waiting at most `timeout`; `Ok(None)` when none came.
    fn wait_notice(&self, timeout: Duration) -> Result<Option<Notice>>;
}

/// A conformance check every backend's tests run: a peer reads the owner's region into
/// its own registered buffer, writes a buffer back with a notice, and the owner sees the
/// bytes after the notice. Returns the owner's region, the attached remote and the
/// peer's buffer for further checks.
#[cfg(test)]
pub(crate) fn check_read_write_notify<B: OneSided>(
    owner: &B,
    peer: &B,
    peer_to_owner: &B::Peer,
) -> (B::Local, B::Remote, B::Local) {
    let store = owner.register(10_000).unwrap();
    store.copy_in(9_000, b"weights");
    let desc = RegionDesc::decode(&owner.describe(&store).encode()).unwrap();
    let remote = peer.attach(peer_to_owner, &desc).unwrap();
    assert_eq!(peer.remote_len(&remote), 10_000);
    let mut buf = peer.register(4096).unwrap();
    peer.read(&remote, 9_000, &mut buf, 100, 7).unwrap();
    let mut out = [0u8; 7];
    buf.copy_out(100, &mut out);
    assert_eq!(&out, b"weights");

    buf.copy_in(0, b"gradient");
    peer.write_notify(&remote, 0, &buf, 0, 8, 77).unwrap();
    let n = owner.wait_notice(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(n.imm, 77);
    let mut got = [0u8; 8];
    store.copy_out(0, &mut got);
    assert_eq!(&got, b"gradient");
    (store, remote, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn desc() -> RegionDesc {
        RegionDesc {
            kind: BackendKind::Shm,
            region_id: 7,
            addr: 4096,
            len: 1 << 20,
            key: 0xdead_beef_0123_4567,
            locator: b"/proc/1/fd/3".to_vec(),
        }
    }

    #[test]
    fn decode_refuses_what_encode_never_makes() {
        let good = desc().encode();
        assert_eq!(RegionDesc::decode(&good).unwrap(), desc());
        let check = |bytes: &[u8], reason: &str| match RegionDesc::decode(bytes) {
            Err(OneSidedError::Malformed { reason: r, .. }) => assert_eq!(r, reason),
            other => panic!("expected {reason:?}, got {other:?}"),
        };
        check(&good[..39], "shorter than the fixed part");
        let mut b = good.clone();
        b[0] ^= 1;
        check(&b, "bad magic");
        let mut b = good.clone();
        b[4] = 9;
        check(&b, "unknown version");
        let mut b = good.clone();
        b[5] = 0;
        check(&b, "unknown backend kind");
        let mut b = good.clone();
        b.push(0);
        check(&b, "length does not match the locator length");
        let mut b = good.clone();
        b[6..8].copy_from_slice(&2000u16.to_le_bytes());
        check(&b, "locator too long");
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&b, "addr + len overflows");
    }

    #[test]
    fn check_range_reports_the_numbers() {
        assert!(check_range("remote", 0, 10, 10).is_ok());
        assert!(check_range("remote", 10, 0, 10).is_ok());
        let e = check_range("remote", 8, 4, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "remote range [8, 8+4) does not fit in a region of 10 bytes"
        );
        assert!(check_range("local", usize::MAX, 2, 10).is_err());
    }

    proptest! {
        #[test]
        fn descriptors_round_trip(
            rdma in any::<bool>(),
            region_id in any::<u64>(),
            addr in any::<u64>(),
            len in any::<u64>(),
            key in any::<u64>(),
            locator in proptest::collection::vec(any::<u8>(), 0..RegionDesc::LOCATOR_MAX),
        ) {
            let len = len.min(u64::MAX - addr);
            let d = RegionDesc {
                kind: if rdma { BackendKind::Rdma } else { BackendKind::Shm },
                region_id, addr, len, key, locator,
            };
            let bytes = d.encode();
            prop_assert_eq!(bytes.len(), d.encoded_len());
            prop_assert_eq!(RegionDesc::decode(&bytes).unwrap(), d);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RegionDesc::decode(&bytes);
        }

        #[test]
        fn corrupted_descriptors_never_panic(idx in 0usize..60, byte in any::<u8>(), cut in 0usize..60) {
            let mut b = desc().encode();
            let i = idx % b.len();
            b[i] = byte;
            b.truncate(cut.max(1).min(b.len()));
            let _ = RegionDesc::decode(&b);
        }
    }
}
