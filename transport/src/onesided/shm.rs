//! The shared-memory backend of [`OneSided`]: for peers on the same host.
//!
//! A registered region is a [`SharedRegion`] (a sealed memfd) whose first page is a
//! header and the rest the payload:
//!
//! ```text
//!  offset  field (u64, little-endian)
//!   0      magic "PSRVSHM1"
//!   8      access key (random)
//!  16      region id
//!  24      payload length in bytes
//!  32      owner pid
//!  4096    payload (the region's bytes as peers address them)
//! ```
//!
//! The descriptor's locator is the memfd's `/proc/<pid>/fd/<n>` and its `addr` is the
//! payload's offset (4096). [`ShmBackend::attach`] maps the region and refuses it unless
//! the header's magic, region id, length and key match the descriptor: a stale
//! descriptor (pid and fd reused) or a wrong key gets a clear error. The key is not a
//! capability against a hostile process of the same user (it can read the header); it
//! stops mix-ups, as an rkey does.
//!
//! Reads and writes are plain copies made by the requesting process between its mapping
//! of the peer's region and its own registered region: the owner's CPU is not on the
//! data path. Every mapping is populated when made. Attached regions also implement
//! [`Memory`], so a shm peer can run [`Seqlock::read`](super::seqlock::Seqlock::read)
//! straight on the owner's blocks (one copy, validated block by block).
//!
//! # Notices
//!
//! Every connection has a **notice ring** in shared memory, created by the receiving
//! side in [`OneSided::prepare`] (its locator and key travel in the endpoint bytes) and
//! mapped by the sending side in [`OneSided::connect`]:
//!
//! ```text
//!  offset  field (u64)
//!   0      magic "PSRVRING"       8  key (random)
//!   64     tail: notices published by the sender (its own cache line)
//!   128    head: notices consumed by the receiver
//!   192    sleeping: non-zero while the receiver blocks in wait_notice
//!   4096   RING_SLOTS slots, one immediate each
//! ```
//!
//! A sender writes slot `tail % RING_SLOTS`, then publishes `tail + 1` (release): the
//! data it wrote before is visible to a receiver that sees the new tail. A full ring
//! makes the sender wait, bounded by [`ShmConfig::notify_timeout`]. A busy-polling
//! receiver ([`OneSided::poll_notice`]) checks one word per peer and never makes a system
//! call, so a write-and-notify round trip costs cache-line transfers, not wake-ups.
//! Only a receiver that sleeps ([`OneSided::wait_notice`]) is woken, by a datagram on its
//! Unix socket (abstract namespace: nothing to clean up after a crash); the `sleeping`
//! word and SeqCst fences on both sides (Dekker) make sure no notice is missed.
//!
//! A ring whose tail runs more than `RING_SLOTS` ahead (a peer gone mad) is dropped
//! with one log line; the other peers are served on. Everything in a mapping may be
//! written by the peer at any time, so nothing read from one is asserted on: asserts here
//! are about this process's own state (the lengths of its regions and mappings).
//!
//! # Locks
//!
//! `wake` (the wake-up socket), `rx` (the rings this side consumes) and each peer's `tx`
//! (the ring it writes notices into) are never held together: each is taken alone and
//! released before another is taken (dropping the last handle of a peer takes `rx`, and
//! no peer handle is dropped while a lock is held).

use std::io::{self, Read};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pserv_sys::{page_size, SharedRegion, ShmError};

use super::{
    check_range, BackendKind, Memory, Notice, OneSided, OneSidedError, PeerId, RegionDesc, Result,
};

/// Bytes before the payload of every region (one page on x86-64 Linux).
pub const HEADER_LEN: usize = 4096;
/// "PSRVSHM1" as a little-endian u64.
const REGION_MAGIC: u64 = u64::from_le_bytes(*b"PSRVSHM1");
/// "PSRVRING" as a little-endian u64.
const RING_MAGIC: u64 = u64::from_le_bytes(*b"PSRVRING");
/// Notices a ring holds.
pub const RING_SLOTS: usize = 512;
const RING_TAIL: usize = 64;
const RING_HEAD: usize = 128;
const RING_SLEEPING: usize = 192;
const RING_SLOTS_AT: usize = 4096;
const RING_LEN: usize = RING_SLOTS_AT + 8 * RING_SLOTS;
/// "PSEP": endpoint bytes.
const ENDPOINT_MAGIC: u32 = u32::from_le_bytes(*b"PSEP");
const ENDPOINT_VERSION: u8 = 2;
const ENDPOINT_FIXED: usize = 24;
const NAME_MAX: usize = 100;
const LOCATOR_MAX: usize = 64;

/// Configuration of a [`ShmBackend`].
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// How long [`OneSided::notify`] may block while the receiver's queue is full.
    pub notify_timeout: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        Self {
            notify_timeout: Duration::from_secs(2),
        }
    }
}

/// The shared-memory backend: one per process (or per engine instance).
#[derive(Debug)]
pub struct ShmBackend {
    cfg: ShmConfig,
    /// Bound to `name` in the abstract namespace; receives wake-ups only.
    wake: Mutex<WakeSocket>,
    /// Unbound; sends wake-ups.
    send: UnixDatagram,
    name: Vec<u8>,
    /// Rings of connected peers, polled round robin.
    rx: Arc<Mutex<RxRings>>,
    next_region: AtomicU64,
    next_peer: AtomicU64,
}

#[derive(Debug)]
struct WakeSocket {
    sock: UnixDatagram,
    nonblocking: bool,
}

#[derive(Debug, Default)]
struct RxRings {
    rings: Vec<RxRing>,
    /// Where the next poll starts (fairness between peers).
    next: usize,
}

/// A ring this side consumes.
#[derive(Debug)]
struct RxRing {
    peer: PeerId,
    ring: SharedRegion,
    /// Our copy of the head (we are its only writer).
    head: u64,
}

/// A region this process registered.
#[derive(Debug)]
pub struct ShmLocal {
    region: SharedRegion,
    id: u64,
    key: u64,
    len: usize,
}

/// The pending half of a connection: the notice ring the peer will write into.
#[derive(Debug)]
pub struct ShmPending {
    ring: SharedRegion,
}

/// A connected peer. Cloning is cheap; when the last handle drops, this side stops
/// polling the peer's notices (its ring is unmapped).
#[derive(Clone, Debug)]
pub struct ShmPeer(Arc<PeerInner>);

#[derive(Debug)]
struct PeerInner {
    id: PeerId,
    /// The peer's ring, mapped: we write notices into it. The lock orders notices of
    /// this process's threads to that peer.
    tx: Mutex<SharedRegion>,
    /// The peer's wake-up socket.
    addr: SocketAddr,
    remote_pid: u32,
    /// Our backend's rings, to forget ours when the last handle goes.
    rx: Weak<Mutex<RxRings>>,
}

impl Drop for PeerInner {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.upgrade() {
            rx.lock().rings.retain(|r| r.peer != self.id);
        }
    }
}

/// A peer's region, mapped into this process.
#[derive(Debug)]
pub struct ShmRemote {
    region: SharedRegion,
    region_id: u64,
    len: usize,
    peer: ShmPeer,
}

impl ShmPeer {
    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.0.remote_pid
    }

    /// This side's id for the peer.
    pub fn id(&self) -> PeerId {
        self.0.id
    }
}

impl ShmRemote {
    /// The owner's id for the region.
    pub fn region_id(&self) -> u64 {
        self.region_id
    }

    /// The peer the region was attached through.
    pub fn peer(&self) -> &ShmPeer {
        &self.peer
    }
}

impl ShmLocal {
    /// The region's id (unique within this backend).
    pub fn id(&self) -> u64 {
        self.id
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> OneSidedError {
    move |source| OneSidedError::Io { op, source }
}

/// 64 random bits from the kernel.
fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(u64::from_le_bytes(b))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

/// Bounds check of the payload views (payload offset 0 is region offset `HEADER_LEN`).
fn payload_memory_check(len: usize, off: usize, n: usize, op: &str) {
    assert!(
        off.checked_add(n).is_some_and(|e| e <= len),
        "{op}({off}, {n}) outside a {len}-byte region"
    );
}

macro_rules! payload_memory {
    ($t:ty) => {
        impl Memory for $t {
            fn len(&self) -> usize {
                self.len
            }
            fn atomic_u64(&self, off: usize) -> &AtomicU64 {
                payload_memory_check(self.len, off, 8, "atomic_u64");
                self.region.atomic_u64(HEADER_LEN + off)
            }
            fn copy_out(&self, off: usize, dst: &mut [u8]) {
                payload_memory_check(self.len, off, dst.len(), "copy_out");
                self.region.copy_out(HEADER_LEN + off, dst)
            }
            fn copy_in(&self, off: usize, src: &[u8]) {
                payload_memory_check(self.len, off, src.len(), "copy_in");
                self.region.copy_in(HEADER_LEN + off, src)
            }
        }
    };
}
payload_memory!(ShmLocal);
payload_memory!(ShmRemote);

/// Check a peer's endpoint bytes (what [`OneSided::prepare`] sends, and `connect` reads
/// back from the other side) with the decoder `connect` runs. Never panics (the fuzz
/// target `onesided` holds it to that); endpoint bytes of another backend give
/// [`OneSidedError::WrongBackend`].
pub fn check_endpoint(bytes: &[u8]) -> Result<()> {
    Endpoint::decode(bytes).map(|_| ())
}

/// Valid endpoint bytes, as the encoder writes them (seeds for the fuzz corpus).
pub fn sample_endpoints() -> Vec<Vec<u8>> {
    [
        (1u32, 7u64, &b"pserv-shm-1"[..], &b"/proc/1/fd/3"[..]),
        (
            4242,
            u64::MAX,
            &[b'n'; NAME_MAX][..],
            &[b'r'; LOCATOR_MAX][..],
        ),
    ]
    .into_iter()
    .map(|(pid, ring_key, name, ring)| {
        Endpoint {
            pid,
            ring_key,
            name,
            ring,
        }
        .encode()
    })
    .collect()
}

/// Endpoint bytes: what a peer needs to send us notices.
///
/// ```text
///  0  4  magic "PSEP"     4  1  version (2)   5  1  backend kind (1)
///  6  1  socket name length N                 7  1  ring locator length L
///  8  4  pid             12  4  zero         16  8  ring key
/// 24  N  abstract socket name, then L bytes of ring locator
/// ```
struct Endpoint<'a> {
    pid: u32,
    ring_key: u64,
    name: &'a [u8],
    ring: &'a [u8],
}

impl<'a> Endpoint<'a> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENDPOINT_FIXED + self.name.len() + self.ring.len());
        out.extend_from_slice(&ENDPOINT_MAGIC.to_le_bytes());
        out.push(ENDPOINT_VERSION);
        out.push(BackendKind::Shm as u8);
        out.push(self.name.len() as u8);
        out.push(self.ring.len() as u8);
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.ring_key.to_le_bytes());
        out.extend_from_slice(self.name);
        out.extend_from_slice(self.ring);
        out
    }

    fn decode(b: &'a [u8]) -> Result<Self> {
        let bad = |reason| OneSidedError::Malformed {
            what: "endpoint",
            reason,
        };
        if b.len() < ENDPOINT_FIXED {
            return Err(bad("shorter than the fixed part"));
        }
        if b[0..4] != ENDPOINT_MAGIC.to_le_bytes() {
            return Err(bad("bad magic"));
        }
        if b[4] != ENDPOINT_VERSION {
            return Err(bad("unknown version"));
        }
        match BackendKind::from_u8(b[5]) {
            Some(BackendKind::Shm) => {}
            Some(found) => {
                return Err(OneSidedError::WrongBackend {
                    expected: BackendKind::Shm,
                    found,
                })
            }
            None => return Err(bad("unknown backend kind")),
        }
        let (n, l) = (b[6] as usize, b[7] as usize);
        if n == 0 || n > NAME_MAX || l == 0 || l > LOCATOR_MAX {
            return Err(bad("bad socket name or ring locator length"));
        }
        if b.len() != ENDPOINT_FIXED + n + l {
            return Err(bad("length does not match the name and locator lengths"));
        }
        Ok(Self {
            pid: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            ring_key: u64_at(b, 16),
            name: &b[ENDPOINT_FIXED..ENDPOINT_FIXED + n],
            ring: &b[ENDPOINT_FIXED + n..],
        })
    }
}

impl ShmBackend {
    /// A backend with the default configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(ShmConfig::default())
    }

    /// A backend: binds its notification socket (abstract namespace, a unique
    /// unguessable name).
    pub fn with_config(cfg: ShmConfig) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "pserv-{}-{}-{:016x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_u64()?
        )
        .into_bytes();
        let addr = SocketAddr::from_abstract_name(&name).map_err(io_err("socket name"))?;
        let sock = UnixDatagram::bind_addr(&addr).map_err(io_err("binding the wake-up socket"))?;
        sock.set_nonblocking(true)
            .map_err(io_err("wake-up socket mode"))?;
        let send = UnixDatagram::unbound().map_err(io_err("wake-up send socket"))?;
        send.set_nonblocking(true)
            .map_err(io_err("wake-up send socket"))?;
        Ok(Self {
            cfg,
            wake: Mutex::new(WakeSocket {
                sock,
                nonblocking: true,
            }),
            send,
            name,
            rx: Arc::new(Mutex::new(RxRings::default())),
            next_region: AtomicU64::new(1),
            next_peer: AtomicU64::new(1),
        })
    }

    /// Map a shm error on `desc`'s region into the interface's words.
    fn open_error(desc: &RegionDesc, e: ShmError) -> OneSidedError {
        let region = desc.region_id;
        match e {
            ShmError::SizeMismatch { actual, .. } => OneSidedError::LengthMismatch {
                region,
                desc_len: desc.len,
                actual_len: actual.saturating_sub(HEADER_LEN as u64),
            },
            ShmError::BadLocator { .. } => OneSidedError::Malformed {
                what: "descriptor",
                reason: "shm locator is not /proc/<pid>/fd/<n>",
            },
            ShmError::Open { locator, source } if source.kind() == io::ErrorKind::NotFound => {
                OneSidedError::UnknownRegion {
                    region,
                    reason: format!("{locator} is gone (its owner exited or dropped it)"),
                }
            }
            ShmError::NotSealed { locator } => OneSidedError::UnknownRegion {
                region,
                reason: format!("{locator} is not a pserv region"),
            },
            other => OneSidedError::Io {
                op: "mapping a peer's region",
                source: io::Error::other(other),
            },
        }
    }

    /// Take the next notice from any peer's ring (round robin), without blocking.
    fn take_notice(&self) -> Option<Notice> {
        let mut rx = self.rx.lock();
        let n = rx.rings.len();
        let start = rx.next;
        for k in 0..n {
            let i = (start + k) % n;
            let r = &mut rx.rings[i];
            let tail = r.ring.atomic_u64(RING_TAIL).load(Ordering::Acquire);
            if tail == r.head {
                continue;
            }
            if tail.wrapping_sub(r.head) > RING_SLOTS as u64 {
                tracing::warn!(
                    peer = r.peer.0,
                    tail,
                    head = r.head,
                    "notice ring corrupted by its peer; no more notices from it"
                );
                rx.rings.swap_remove(i);
                return None;
            }
            let slot = RING_SLOTS_AT + 8 * (r.head % RING_SLOTS as u64) as usize;
            let imm = r.ring.atomic_u64(slot).load(Ordering::Relaxed) as u32;
            r.head += 1;
            r.ring
                .atomic_u64(RING_HEAD)
                .store(r.head, Ordering::Release);
            let peer = r.peer;
            rx.next = (i + 1) % n;
            return Some(Notice { peer, imm });
        }
        None
    }

    /// Mark (or unmark) this side as sleeping in every ring, so senders wake it.
    fn set_sleeping(&self, sleeping: bool) {
        for r in &self.rx.lock().rings {
            r.ring
                .atomic_u64(RING_SLEEPING)
                .store(u64::from(sleeping), Ordering::Relaxed);
        }
        // Dekker with `notify`: our flag store is ordered before our next ring check.
        fence(Ordering::SeqCst);
    }

    /// Block on the wake-up socket for at most `timeout`, then drain it.
    fn sleep(&self, timeout: Duration) -> Result<()> {
        let mut w = self.wake.lock();
        let mut buf = [0u8; 16];
        if w.nonblocking {
            w.sock
                .set_nonblocking(false)
                .map_err(io_err("wake-up socket mode"))?;
            w.nonblocking = false;
        }
        w.sock
            .set_read_timeout(Some(timeout.max(Duration::from_micros(1))))
            .map_err(io_err("wake-up socket timeout"))?;
        match w.sock.recv(&mut buf) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io_err("waiting for a wake-up")(e)),
        }
        w.sock
            .set_nonblocking(true)
            .map_err(io_err("wake-up socket mode"))?;
        w.nonblocking = true;
        // Wake-ups carry nothing: drop any that piled up.
        while w.sock.recv(&mut buf).is_ok() {}
        Ok(())
    }
}

impl OneSided for ShmBackend {
    type Local = ShmLocal;
    type Pending = ShmPending;
    type Peer = ShmPeer;
    type Remote = ShmRemote;

    fn kind(&self) -> BackendKind {
        BackendKind::Shm
    }

    fn register(&self, len: usize) -> Result<ShmLocal> {
        let total = HEADER_LEN
            .checked_add(len.max(1).div_ceil(page_size()) * page_size())
            .ok_or(OneSidedError::OutOfRange {
                side: "local",
                off: 0,
                len: len as u64,
                region_len: usize::MAX as u64,
            })?;
        let region = SharedRegion::create(total).map_err(|e| OneSidedError::Io {
            op: "creating a shared region",
            source: io::Error::other(e),
        })?;
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let key = random_u64()?;
        region.atomic_u64(8).store(key, Ordering::Relaxed);
        region.atomic_u64(16).store(id, Ordering::Relaxed);
        region.atomic_u64(24).store(len as u64, Ordering::Relaxed);
        region
            .atomic_u64(32)
            .store(u64::from(std::process::id()), Ordering::Relaxed);
        region.atomic_u64(0).store(REGION_MAGIC, Ordering::Release);
        debug_assert!(
            region.len() >= HEADER_LEN + len,
            "a region of {} bytes holds no header and {len} payload bytes",
            region.len()
        );
        Ok(ShmLocal {
            region,
            id,
            key,
            len,
        })
    }

    fn describe(&self, local: &ShmLocal) -> RegionDesc {
        RegionDesc {
            kind: BackendKind::Shm,
            region_id: local.id,
            addr: HEADER_LEN as u64,
            len: local.len as u64,
            key: local.key,
            locator: local.region.locator().as_bytes().to_vec(),
        }
    }

    fn prepare(&self) -> Result<(ShmPending, Vec<u8>)> {
        let ring = SharedRegion::create(RING_LEN).map_err(|e| OneSidedError::Io {
            op: "creating a notice ring",
            source: io::Error::other(e),
        })?;
        let ring_key = random_u64()?;
        ring.atomic_u64(8).store(ring_key, Ordering::Relaxed);
        ring.atomic_u64(0).store(RING_MAGIC, Ordering::Release);
        let bytes = Endpoint {
            pid: std::process::id(),
            ring_key,
            name: &self.name,
            ring: ring.locator().as_bytes(),
        }
        .encode();
        Ok((ShmPending { ring }, bytes))
    }

    fn connect(&self, pending: ShmPending, remote_endpoint: &[u8]) -> Result<ShmPeer> {
        let ep = Endpoint::decode(remote_endpoint)?;
        let addr = SocketAddr::from_abstract_name(ep.name).map_err(io_err("socket name"))?;
        let bad = |reason| OneSidedError::Malformed {
            what: "endpoint",
            reason,
        };
        let locator = std::str::from_utf8(ep.ring).map_err(|_| bad("ring locator not UTF-8"))?;
        let tx = SharedRegion::open(locator, RING_LEN).map_err(|e| match e {
            ShmError::BadLocator { .. } => bad("ring locator is not /proc/<pid>/fd/<n>"),
            other => OneSidedError::Io {
                op: "mapping the peer's notice ring",
                source: io::Error::other(other),
            },
        })?;
        if tx.atomic_u64(0).load(Ordering::Acquire) != RING_MAGIC
            || tx.atomic_u64(8).load(Ordering::Relaxed) != ep.ring_key
        {
            return Err(bad(
                "the ring locator names something else (stale endpoint?)",
            ));
        }
        let id = PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed));
        self.rx.lock().rings.push(RxRing {
            peer: id,
            ring: pending.ring,
            head: 0,
        });
        Ok(ShmPeer(Arc::new(PeerInner {
            id,
            tx: Mutex::new(tx),
            addr,
            remote_pid: ep.pid,
            rx: Arc::downgrade(&self.rx),
        })))
    }

    fn peer_id(&self, peer: &ShmPeer) -> PeerId {
        peer.0.id
    }

    fn attach(&self, peer: &ShmPeer, desc: &RegionDesc) -> Result<ShmRemote> {
        if desc.kind != BackendKind::Shm {
            return Err(OneSidedError::WrongBackend {
                expected: BackendKind::Shm,
                found: desc.kind,
            });
        }
        let bad = |reason| OneSidedError::Malformed {
            what: "descriptor",
            reason,
        };
        if desc.addr != HEADER_LEN as u64 {
            return Err(bad("shm regions start at offset 4096"));
        }
        let locator = std::str::from_utf8(&desc.locator).map_err(|_| bad("locator not UTF-8"))?;
        let len = usize::try_from(desc.len).map_err(|_| bad("length beyond the address space"))?;
        let total = len
            .max(1)
            .checked_next_multiple_of(page_size())
            .and_then(|p| p.checked_add(HEADER_LEN))
            .ok_or(bad("length beyond the address space"))?;
        let region = SharedRegion::open(locator, total).map_err(|e| Self::open_error(desc, e))?;
        let word = |o| region.atomic_u64(o).load(Ordering::Acquire);
        let unknown = |reason: String| OneSidedError::UnknownRegion {
            region: desc.region_id,
            reason,
        };
        if word(0) != REGION_MAGIC {
            return Err(unknown(format!("{locator} is not a pserv region")));
        }
        if word(16) != desc.region_id {
            return Err(unknown(format!("{locator} holds region {}", word(16))));
        }
        if word(24) != desc.len {
            return Err(OneSidedError::LengthMismatch {
                region: desc.region_id,
                desc_len: desc.len,
                actual_len: word(24),
            });
        }
        if word(8) != desc.key {
            return Err(OneSidedError::WrongKey {
                region: desc.region_id,
                key: desc.key,
            });
        }
        // Ranges checked against `len` then lie inside the mapping.
        debug_assert!(
            region.len() >= HEADER_LEN + len,
            "a mapping of {} bytes holds no header and {len} payload bytes",
            region.len()
        );
        Ok(ShmRemote {
            region,
            region_id: desc.region_id,
            len,
            peer: peer.clone(),
        })
    }

    fn remote_len(&self, remote: &ShmRemote) -> usize {
        remote.len
    }

    fn read(
        &self,
        remote: &ShmRemote,
        remote_off: usize,
        local: &mut ShmLocal,
        local_off: usize,
        len: usize,
    ) -> Result<()> {
        check_range("remote", remote_off, len, remote.len)?;
        check_range("local", local_off, len, local.len)?;
        remote.region.copy_to(
            HEADER_LEN + remote_off,
            &local.region,
            HEADER_LEN + local_off,
            len,
        );
        Ok(())
    }

    fn write(
        &self,
        remote: &ShmRemote,
        remote_off: usize,
        local: &ShmLocal,
        local_off: usize,
        len: usize,
    ) -> Result<()> {
        check_range("remote", remote_off, len, remote.len)?;
        check_range("local", local_off, len, local.len)?;
        local.region.copy_to(
            HEADER_LEN + local_off,
            &remote.region,
            HEADER_LEN + remote_off,
            len,
        );
        Ok(())
    }

    fn notify(&self, remote: &ShmRemote, imm: u32) -> Result<()> {
        let p = &remote.peer.0;
        let ring = p.tx.lock();
        let tail_word = ring.atomic_u64(RING_TAIL);
        let tail = tail_word.load(Ordering::Relaxed);
        let mut deadline = None;
        while tail.wrapping_sub(ring.atomic_u64(RING_HEAD).load(Ordering::Acquire))
            >= RING_SLOTS as u64
        {
            // Full: the receiver is behind. Wait for it, bounded.
            let d = *deadline.get_or_insert_with(|| Instant::now() + self.cfg.notify_timeout);
            if Instant::now() >= d {
                return Err(OneSidedError::Timeout {
                    op: "notify (the receiver's notice ring stayed full)",
                    after: self.cfg.notify_timeout,
                });
            }
            std::thread::yield_now();
        }
        let slot = RING_SLOTS_AT + 8 * (tail % RING_SLOTS as u64) as usize;
        ring.atomic_u64(slot)
            .store(u64::from(imm), Ordering::Relaxed);
        // Publishes the slot and every write of ours before this notice.
        tail_word.store(tail + 1, Ordering::Release);
        // Dekker with `set_sleeping`: either the receiver sees the tail, or we see it
        // sleeping and wake it.
        fence(Ordering::SeqCst);
        if ring.atomic_u64(RING_SLEEPING).load(Ordering::Relaxed) != 0 {
            match self.send.send_to_addr(&[1], &p.addr) {
                // A full wake-up queue already holds a wake-up.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err("waking the receiver")(e)),
            }
        }
        Ok(())
    }

    fn poll_notice(&self) -> Result<Option<Notice>> {
        let n = self.take_notice();
        if n.is_some() {
            // The sender's writes before the notice are visible to our reads after it.
            fence(Ordering::Acquire);
        }
        Ok(n)
    }

    fn wait_notice(&self, timeout: Duration) -> Result<Option<Notice>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(n) = self.poll_notice()? {
                return Ok(Some(n));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.set_sleeping(true);
            let n = self.poll_notice();
            if !matches!(n, Ok(None)) {
                self.set_sleeping(false);
                return n;
            }
            let slept = self.sleep(left);
            self.set_sleeping(false);
            slept?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onesided::seqlock::{BlockLayout, Seqlock};

    /// Two backends connected both ways, as two processes would be.
    fn pair() -> (ShmBackend, ShmBackend, ShmPeer, ShmPeer) {
        let (a, b) = (ShmBackend::new().unwrap(), ShmBackend::new().unwrap());
        let (pa, ea) = a.prepare().unwrap();
        let (pb, eb) = b.prepare().unwrap();
        let a_to_b = a.connect(pa, &eb).unwrap();
        let b_to_a = b.connect(pb, &ea).unwrap();
        (a, b, a_to_b, b_to_a)
    }

    #[test]
    fn read_write_notify_between_two_backends() {
        let (owner, peer, _o2p, p2o) = pair();
        let (_store, _remote, _buf) = super::super::check_read_write_notify(&owner, &peer, &p2o);
        assert_eq!(owner.poll_notice().unwrap(), None);
        assert_eq!(owner.wait_notice(Duration::from_millis(20)).unwrap(), None);
    }

    #[test]
    fn wrong_key_length_backend_and_ranges_are_refused() {
        let (owner, peer, _o2p, p2o) = pair();
        let store = owner.register(8192).unwrap();
        let desc = owner.describe(&store);

        let mut d = desc.clone();
        d.key ^= 1;
        let e = peer.attach(&p2o, &d).unwrap_err();
        assert!(matches!(e, OneSidedError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains("access key does not match"));

        let mut d = desc.clone();
        d.len = 4096;
        assert!(matches!(
            peer.attach(&p2o, &d),
            Err(OneSidedError::LengthMismatch { .. })
        ));
        let mut d = desc.clone();
        d.len = 1 << 20;
        assert!(matches!(
            peer.attach(&p2o, &d),
            Err(OneSidedError::LengthMismatch { .. })
        ));
        let mut d = desc.clone();
        d.region_id += 1;
        assert!(matches!(
            peer.attach(&p2o, &d),
            Err(OneSidedError::UnknownRegion { .. })
        ));
        let mut d = desc.clone();
        d.kind = BackendKind::Rdma;
        assert!(matches!(
            peer.attach(&p2o, &d),
            Err(OneSidedError::WrongBackend { .. })
        ));
        let mut d = desc.clone();
        d.locator = b"/etc/passwd".to_vec();
        assert!(matches!(
            peer.attach(&p2o, &d),
            Err(OneSidedError::Malformed { .. })
        ));

        let remote = peer.attach(&p2o, &desc).unwrap();
        let mut buf = peer.register(4096).unwrap();
        let e = peer.read(&remote, 8190, &mut buf, 0, 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "remote range [8190, 8190+4) does not fit in a region of 8192 bytes"
        );
        assert!(peer.read(&remote, usize::MAX, &mut buf, 0, 4).is_err());
        assert!(matches!(
            peer.write(&remote, 0, &buf, 4000, 200),
            Err(OneSidedError::OutOfRange { side: "local", .. })
        ));

        // A dropped region cannot be attached any more.
        drop(store);
        assert!(matches!(
            peer.attach(&p2o, &desc),
            Err(OneSidedError::UnknownRegion { .. })
        ));
        // The mapped one stays readable.
        peer.read(&remote, 0, &mut buf, 0, 4096).unwrap();
    }

    #[test]
    fn endpoints_refuse_garbage() {
        let b = ShmBackend::new().unwrap();
        let (_, good) = b.prepare().unwrap();
        for cut in 0..good.len() {
            let (p, _) = b.prepare().unwrap();
            assert!(b.connect(p, &good[..cut]).is_err());
        }
        let mut wrong = good.clone();
        wrong[5] = BackendKind::Rdma as u8;
        let (p, _) = b.prepare().unwrap();
        assert!(matches!(
            b.connect(p, &wrong),
            Err(OneSidedError::WrongBackend { .. })
        ));
    }

    #[test]
    fn forged_wake_ups_and_a_mad_ring_harm_no_one() {
        let (owner, peer, _o2p, p2o) = pair();
        let store = owner.register(64).unwrap();
        let remote = peer.attach(&p2o, &owner.describe(&store)).unwrap();
        // Datagrams straight to the owner's socket only wake it: no notice appears.
        let s = UnixDatagram::unbound().unwrap();
        let addr = SocketAddr::from_abstract_name(&owner.name).unwrap();
        s.send_to_addr(&[0u8; 12], &addr).unwrap();
        assert_eq!(owner.wait_notice(Duration::from_millis(20)).unwrap(), None);
        peer.notify(&remote, 5).unwrap();
        let n = owner.wait_notice(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(n.imm, 5);

        // A third backend whose ring gets a tail far ahead is dropped; the first peer
        // keeps being served.
        let third = ShmBackend::new().unwrap();
        let (po, eo) = owner.prepare().unwrap();
        let (pt, et) = third.prepare().unwrap();
        let _o2t = owner.connect(po, &et).unwrap();
        let t2o = third.connect(pt, &eo).unwrap();
        t2o.0
            .tx
            .lock()
            .atomic_u64(RING_TAIL)
            .store(1 << 40, Ordering::Release);
        assert_eq!(owner.poll_notice().unwrap(), None);
        assert_eq!(owner.rx.lock().rings.len(), 1);
        peer.notify(&remote, 6).unwrap();
        assert_eq!(owner.poll_notice().unwrap().unwrap().imm, 6);
    }

    #[test]
    fn a_full_ring_blocks_the_sender_until_the_timeout() {
        let owner = ShmBackend::new().unwrap();
        let peer = ShmBackend::with_config(ShmConfig {
            notify_timeout: Duration::from_millis(30),
        })
        .unwrap();
        let (po, eo) = owner.prepare().unwrap();
        let (pp, ep) = peer.prepare().unwrap();
        let _o2p = owner.connect(po, &ep).unwrap();
        let p2o = peer.connect(pp, &eo).unwrap();
        let store = owner.register(64).unwrap();
        let remote = peer.attach(&p2o, &owner.describe(&store)).unwrap();
        for i in 0..RING_SLOTS as u32 {
            peer.notify(&remote, i).unwrap();
        }
        assert!(matches!(
            peer.notify(&remote, 0),
            Err(OneSidedError::Timeout { .. })
        ));
        assert_eq!(owner.poll_notice().unwrap().unwrap().imm, 0);
        peer.notify(&remote, 9).unwrap();
    }

    #[test]
    fn dropped_peers_leave_the_poll_list() {
        let (owner, _peer, o2p, _p2o) = pair();
        assert_eq!(owner.rx.lock().rings.len(), 1);
        drop(o2p);
        assert_eq!(owner.rx.lock().rings.len(), 0);
    }

    #[test]
    fn a_sleeping_receiver_is_woken() {
        let (owner, peer, _o2p, p2o) = pair();
        let store = owner.register(64).unwrap();
        let remote = peer.attach(&p2o, &owner.describe(&store)).unwrap();
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let t0 = Instant::now();
                let n = owner.wait_notice(Duration::from_secs(10)).unwrap();
                (n, t0.elapsed())
            });
            std::thread::sleep(Duration::from_millis(50));
            peer.notify(&remote, 3).unwrap();
            let (n, waited) = t.join().unwrap();
            assert_eq!(n.unwrap().imm, 3);
            assert!(waited < Duration::from_secs(5), "woken late: {waited:?}");
        });
    }

    #[test]
    fn seqlock_over_a_remote_mapping() {
        let (owner, peer, _o2p, p2o) = pair();
        let layout = BlockLayout::new(4096, 3);
        let store = owner.register(layout.physical_len()).unwrap();
        let w = Seqlock::new(layout, &store).unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        w.write(0, &data).unwrap();
        let remote = peer.attach(&p2o, &owner.describe(&store)).unwrap();
        let r = Seqlock::new(layout, &remote).unwrap();
        let mut out = vec![0u8; data.len()];
        r.read(0, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
