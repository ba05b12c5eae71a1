//! The one-sided data path for dense key ranges.
//!
//! A server exposes **windows**: one per dense key range a worker asks for, inside the
//! ranges it heads (disjoint, created on the first request, their registered bytes
//! bounded by [`REGISTERED_MAX_BYTES`]). A window mirrors the store's values of its range
//! in a registered region laid out in versioned blocks
//! ([`pserv_transport::onesided::seqlock`]); the store stays the one copy that is
//! updated, replicated and dumped, and every write to a window's keys reaches the window
//! before it is acknowledged. Workers attach windows ([`crate::Worker::open_window`])
//! over their TCP connection (descriptors and connection endpoints travel as control
//! messages), and from then on:
//!
//! - **pull** of a range inside windows ([`crate::Worker::pull_range_into`]) is a
//!   one-sided read of the server's blocks straight into the caller's buffer, validated
//!   block by block (a block caught mid-update is read again). The server's CPU is not
//!   involved. A clocked pull (sequential or bounded delay) first waits, one-sidedly, for
//!   the clock word the server publishes in the window's meta region. After the read the
//!   worker checks the window's retired word: a server that no longer heads the range
//!   (after a table change) sets it, and the worker reads over TCP instead.
//! - **push** of a range inside a window ([`crate::Worker::push_range_now`]) is a
//!   one-sided write of the values into a landing area the server registered for that
//!   worker, plus a notification (verbs: `WRITE_WITH_IMM`). The push is a piece of a
//!   worker task: the landing header carries its request timestamp and routing epoch.
//!   The server's notice thread routes it as a TCP request, applies the update function
//!   to the store and the window, queues it for chain replication, and stores the push's
//!   sequence number in the landing area's `done` word once every replica holds it
//!   (which the worker polls). Clocked pushes keep the two-sided path (the server's
//!   clock gate orders them).
//! - Sparse key lists, and TCP requests for keys in a window, keep the two-sided path
//!   and are served from the store; writes among them refresh the window.
//!
//! The backends are chosen at run time ([`TransportKind`]): `rdma` when both ends have an
//! RDMA device (feature `rdma`), `shm` when both ends run on the same host (same boot
//! id), TCP otherwise. On a machine without RDMA devices, `rdma` fails with a clear
//! message and `auto` falls back to shm or TCP, saying why in the log.
//!
//! What is not verified here: the verbs arm compiles with `--features rdma` and its logic
//! is shared with shm, but no RDMA device was available to run it (see
//! `scripts/rdma-check`).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pserv_transport::onesided::seqlock::{BlockLayout, Seqlock};
use pserv_transport::onesided::shm::{ShmBackend, ShmPeer, ShmPending, ShmRemote};
use pserv_transport::onesided::{BackendKind, Memory, OneSided, OneSidedError, PeerId, RegionDesc};

use crate::base::error::EngineError;
use crate::base::keys::{Key, KeyRange};
use crate::proto::WindowGrant;

/// Payload bytes per versioned block of a window.
pub const BLOCK_PAYLOAD: usize = 16 << 10;
/// Bytes before a landing area's payload (its header).
pub const LANDING_HEADER: usize = 4096;
/// Largest window, in bytes of values.
pub const WINDOW_MAX_BYTES: usize = 1 << 30;
/// The most bytes a server registers for all its windows and landing areas together
/// (a window request past it is refused and stays on TCP).
pub const REGISTERED_MAX_BYTES: usize = 8 << 30;
/// A one-sided push is written and notified in chunks of about this many bytes, so the
/// server applies one chunk while the worker writes the next.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Keys per push chunk for `vl` values of `elem` bytes per key.
fn chunk_keys(vl: usize, elem: usize) -> u64 {
    (CHUNK_BYTES / (vl * elem).max(1)).max(1) as u64
}

/// Wait until `done()` holds or `timeout` passes (`Ok(false)`): spin for a few
/// microseconds (the answer usually comes from another core that fast), then yield (a
/// thread on this core may be the one that answers), then sleep in short steps.
fn spin_wait(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, EngineError>,
) -> Result<bool, EngineError> {
    let start = Instant::now();
    let mut i = 0u32;
    loop {
        if done()? {
            return Ok(true);
        }
        i = i.wrapping_add(1);
        if !i.is_multiple_of(32) {
            std::hint::spin_loop();
            continue;
        }
        let waited = start.elapsed();
        if waited > timeout {
            return Ok(false);
        }
        if waited > Duration::from_millis(2) {
            std::thread::sleep(Duration::from_micros(20));
        } else if waited > Duration::from_micros(5) {
            std::thread::yield_now();
        }
    }
}

// Landing header words (byte offsets).
const L_SEQ: usize = 0;
const L_BEGIN: usize = 8;
const L_END: usize = 16;
const L_FUNC: usize = 24;
const L_BYTES: usize = 32;
/// The push's request timestamp (its identity for exactly-once) and routing epoch.
const L_TS: usize = 40;
const L_EPOCH: usize = 48;
/// The server's answer lives on its own cache line.
const L_DONE: usize = 64;
const L_STATUS: usize = 72;
const L_MSG_LEN: usize = 80;
const L_MSG: usize = 128;
const L_MSG_MAX: usize = 1024;
// Meta region words.
const M_CLOCK: usize = 0;
/// Non-zero once the server stopped heading the window's range.
const M_RETIRED: usize = 8;
const META_LEN: usize = 4096;

/// Which transport carries dense ranges (`--transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// rdma when both ends have a device, shm on one host, TCP otherwise.
    #[default]
    Auto,
    /// Two-sided TCP only.
    Tcp,
    /// One-sided shared memory (same host only).
    Shm,
    /// One-sided RDMA verbs (needs a device and the `rdma` feature).
    Rdma,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Shm => "shm",
            TransportKind::Rdma => "rdma",
        })
    }
}

impl FromStr for TransportKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportKind::Auto),
            "tcp" => Ok(TransportKind::Tcp),
            "shm" => Ok(TransportKind::Shm),
            "rdma" => Ok(TransportKind::Rdma),
            other => Err(EngineError::Config(format!(
                "unknown transport {other:?}: expected auto, tcp, shm or rdma"
            ))),
        }
    }
}

/// This host's identity for "same host" decisions: the kernel's boot id (two processes
/// on one host see the same), else the host name.
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()))
        .unwrap_or_default()
}

/// Whether an RDMA device can be used here; `Err` says why not.
pub fn rdma_available() -> Result<Vec<String>, String> {
    #[cfg(feature = "rdma")]
    {
        pserv_transport::onesided::rdma::probe().map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err("this build has no RDMA support (build with --features rdma)".to_owned())
    }
}

/// The usable RDMA devices in words (name and firmware, and whether it is the software
/// device of `sys/softrdma`); `Err` says why there are none.
pub fn rdma_devices_described() -> Result<Vec<String>, String> {
    #[cfg(feature = "rdma")]
    {
        pserv_transport::onesided::rdma::describe_devices().map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err("this build has no RDMA support (build with --features rdma)".to_owned())
    }
}

/// Whether `--transport rdma` would run on the software device of `sys/softrdma`
/// (figures measured there are the emulation's, not hardware's).
pub fn rdma_is_software_device() -> bool {
    #[cfg(feature = "rdma")]
    {
        pserv_transport::onesided::rdma::software_device()
    }
    #[cfg(not(feature = "rdma"))]
    {
        false
    }
}

fn os_err(what: &str, e: OneSidedError) -> EngineError {
    EngineError::OneSided(format!("{what}: {e}"))
}

/// A one-sided backend this process runs.
pub(crate) enum Backend {
    Shm(ShmBackend),
    #[cfg(feature = "rdma")]
    Rdma(pserv_transport::onesided::rdma::RdmaBackend),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Backend({})", self.kind())
    }
}

/// Registered local memory of either backend.
type Region = Arc<dyn Memory + Send + Sync>;

/// A connection's pending half.
pub(crate) enum Pending {
    Shm(ShmPending),
    #[cfg(feature = "rdma")]
    Rdma(pserv_transport::onesided::rdma::RdmaPending),
}

/// A connection to one peer.
pub(crate) enum Peer {
    Shm(ShmPeer),
    #[cfg(feature = "rdma")]
    Rdma(pserv_transport::onesided::rdma::RdmaPeer),
}

/// A peer's region, attached.
pub(crate) enum Remote {
    Shm(ShmRemote),
    #[cfg(feature = "rdma")]
    Rdma(pserv_transport::onesided::rdma::RdmaRemote),
}

impl Backend {
    /// Open the backend of `kind`.
    pub(crate) fn open(kind: BackendKind) -> Result<Backend, EngineError> {
        match kind {
            BackendKind::Shm => Ok(Backend::Shm(
                ShmBackend::new().map_err(|e| os_err("opening the shm backend", e))?,
            )),
            BackendKind::Rdma => {
                #[cfg(feature = "rdma")]
                {
                    use pserv_transport::onesided::rdma::{RdmaBackend, RdmaConfig};
                    Ok(Backend::Rdma(
                        RdmaBackend::new(RdmaConfig::default())
                            .map_err(|e| os_err("opening the rdma backend", e))?,
                    ))
                }
                #[cfg(not(feature = "rdma"))]
                {
                    Err(EngineError::Config(
                        "--transport rdma: this build has no RDMA support (build with --features rdma)"
                            .into(),
                    ))
                }
            }
        }
    }

    /// The backend `kind` asks for: none for tcp; for auto, rdma where a device is found,
    /// else shm (both ends then settle on what they share, see `ServerOneSided::grant`);
    /// `rdma` without a device is a configuration error.
    pub(crate) fn for_transport(kind: TransportKind) -> Result<Option<Backend>, EngineError> {
        let b = match kind {
            TransportKind::Tcp => return Ok(None),
            TransportKind::Shm => Backend::open(BackendKind::Shm)?,
            TransportKind::Rdma => match rdma_available() {
                Ok(_) => Backend::open(BackendKind::Rdma)?,
                Err(why) => {
                    return Err(EngineError::Config(format!(
                        "--transport rdma: {why}; use --transport auto, shm or tcp"
                    )))
                }
            },
            TransportKind::Auto => match rdma_available() {
                Ok(devs) => {
                    tracing::info!(?devs, "transport auto: RDMA devices found, offering rdma");
                    Backend::open(BackendKind::Rdma)?
                }
                Err(why) => {
                    tracing::info!(%why, "transport auto: no rdma; shm on this host, tcp to other hosts");
                    Backend::open(BackendKind::Shm)?
                }
            },
        };
        Ok(Some(b))
    }

    pub(crate) fn kind(&self) -> BackendKind {
        match self {
            Backend::Shm(_) => BackendKind::Shm,
            #[cfg(feature = "rdma")]
            Backend::Rdma(_) => BackendKind::Rdma,
        }
    }

    fn register(&self, len: usize) -> Result<(Region, RegionDesc), EngineError> {
        let reg = |e| os_err("registering a region", e);
        match self {
            Backend::Shm(b) => {
                let l = b.register(len).map_err(reg)?;
                let d = b.describe(&l);
                Ok((Arc::new(l), d))
            }
            #[cfg(feature = "rdma")]
            Backend::Rdma(b) => {
                let l = b.register(len).map_err(reg)?;
                let d = b.describe(&l);
                Ok((Arc::new(l), d))
            }
        }
    }

    pub(crate) fn prepare(&self) -> Result<(Pending, Vec<u8>), EngineError> {
        let e = |e| os_err("preparing a connection", e);
        match self {
            Backend::Shm(b) => b.prepare().map(|(p, ep)| (Pending::Shm(p), ep)).map_err(e),
            #[cfg(feature = "rdma")]
            Backend::Rdma(b) => b.prepare().map(|(p, ep)| (Pending::Rdma(p), ep)).map_err(e),
        }
    }

    pub(crate) fn connect(&self, pending: Pending, ep: &[u8]) -> Result<Peer, EngineError> {
        let e = |e| os_err("connecting to the peer", e);
        match (self, pending) {
            (Backend::Shm(b), Pending::Shm(p)) => b.connect(p, ep).map(Peer::Shm).map_err(e),
            #[cfg(feature = "rdma")]
            (Backend::Rdma(b), Pending::Rdma(p)) => b.connect(p, ep).map(Peer::Rdma).map_err(e),
            #[allow(unreachable_patterns)]
            _ => unreachable!("a pending half is finished by the backend that made it"),
        }
    }

    fn peer_id(&self, peer: &Peer) -> PeerId {
        match (self, peer) {
            (Backend::Shm(b), Peer::Shm(p)) => b.peer_id(p),
            #[cfg(feature = "rdma")]
            (Backend::Rdma(b), Peer::Rdma(p)) => b.peer_id(p),
            #[allow(unreachable_patterns)]
            _ => unreachable!("peers belong to their backend"),
        }
    }

    fn attach(&self, peer: &Peer, desc: &RegionDesc) -> Result<Remote, EngineError> {
        let e = |e| os_err("attaching a server region", e);
        match (self, peer) {
            (Backend::Shm(b), Peer::Shm(p)) => b.attach(p, desc).map(Remote::Shm).map_err(e),
            #[cfg(feature = "rdma")]
            (Backend::Rdma(b), Peer::Rdma(p)) => b.attach(p, desc).map(Remote::Rdma).map_err(e),
            #[allow(unreachable_patterns)]
            _ => unreachable!("peers belong to their backend"),
        }
    }

    fn notify(&self, remote: &Remote, imm: u32) -> Result<(), EngineError> {
        let e = |e| os_err("notifying the server", e);
        match (self, remote) {
            (Backend::Shm(b), Remote::Shm(r)) => b.notify(r, imm).map_err(e),
            #[cfg(feature = "rdma")]
            (Backend::Rdma(b), Remote::Rdma(r)) => b.notify(r, imm).map_err(e),
            #[allow(unreachable_patterns)]
            _ => unreachable!("remotes belong to their backend"),
        }
    }

    fn wait_notice(
        &self,
        timeout: Duration,
    ) -> Result<Option<pserv_transport::onesided::Notice>, OneSidedError> {
        match self {
            Backend::Shm(b) => b.wait_notice(timeout),
            #[cfg(feature = "rdma")]
            Backend::Rdma(b) => b.wait_notice(timeout),
        }
    }

    fn poll_notice(&self) -> Result<Option<pserv_transport::onesided::Notice>, OneSidedError> {
        match self {
            Backend::Shm(b) => b.poll_notice(),
            #[cfg(feature = "rdma")]
            Backend::Rdma(b) => b.poll_notice(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------

/// A worker's landing area on the server, for one window.
struct Landing {
    worker: u32,
    mem: Region,
    window: Arc<Window>,
    /// Whether the push in flight is applied whole at its last chunk (decided at its
    /// first chunk: always where the table replicates, so a batch never carries part of
    /// a push) rather than chunk by chunk as the chunks land.
    whole: AtomicBool,
    /// Whether the push in flight was refused at its first chunk (then every later chunk
    /// of it is refused too, and nothing of it is applied).
    refused: AtomicBool,
}

/// A window: the values of a dense key range this server heads, mirrored from the store
/// into a registered region laid out in versioned blocks. The store stays the one copy
/// that is updated, replicated and dumped; every write to keys of the window updates
/// the store and then the mirror, under the window's writer lock, before it is
/// acknowledged.
pub(crate) struct Window {
    pub(crate) range: KeyRange,
    vl: usize,
    elem: usize,
    layout: BlockLayout,
    data: Seqlock<Region>,
    meta: Region,
    data_desc: RegionDesc,
    meta_desc: RegionDesc,
    /// Held from a store update of the window's keys until the mirror shows it, so the
    /// mirror's updates come in the store's order.
    writer: Mutex<()>,
    /// Set when the server stopped heading the range (also in the meta region, for
    /// readers): the mirror is no longer updated.
    retired: AtomicBool,
}

impl Window {
    fn logical_off(&self, key: Key) -> usize {
        (key - self.range.begin) as usize * self.vl * self.elem
    }

    /// Set the window's values (at creation, from the store).
    pub(crate) fn init(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.layout.logical_len());
        let _ = self.data.write(0, &bytes[..n]);
    }

    /// Take the writer lock (store update, then [`refresh`](Self::refresh)).
    pub(crate) fn lock_writes(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.writer.lock()
    }

    /// Try the writer lock (see [`lock_writes`](Self::lock_writes)).
    pub(crate) fn try_lock_writes(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        self.writer.try_lock()
    }

    /// Publish the values `bytes` of keys `r` (inside the window), read from the store
    /// after an update, block by block at new versions. The caller holds the writer lock.
    pub(crate) fn refresh(&self, r: KeyRange, bytes: &[u8]) {
        debug_assert!(self.covers(&r));
        debug_assert_eq!(bytes.len(), r.len() as usize * self.vl * self.elem);
        let _ = self.data.write(self.logical_off(r.begin), bytes);
    }

    /// Whether `r` lies inside the window.
    pub(crate) fn covers(&self, r: &KeyRange) -> bool {
        self.range.covers(r)
    }

    /// Whether the server stopped heading the window's range.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Stop using the window: readers that see the retired word go over TCP, landed
    /// pushes are sent there. (Without the writer lock: a writer that holds it may still
    /// refresh the mirror, which nobody reads any more.)
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.meta.atomic_u64(M_RETIRED).store(1, Ordering::Release);
    }

    /// Publish the smallest worker clock (for clocked one-sided pulls).
    pub(crate) fn publish_clock(&self, clock: u64) {
        let w = self.meta.atomic_u64(M_CLOCK);
        if clock > w.load(Ordering::Relaxed) {
            w.store(clock, Ordering::Release);
        }
    }

    /// Bytes of values.
    fn bytes(&self) -> usize {
        self.range.len() as usize * self.vl * self.elem
    }
}

/// A push that landed (one chunk of it), for the server to apply.
pub(crate) struct LandedPush<'a> {
    /// Rank of the worker that wrote it.
    pub(crate) worker: u32,
    pub(crate) window: &'a Arc<Window>,
    pub(crate) func: u16,
    /// The whole push's range.
    pub(crate) range: KeyRange,
    /// Chunk index and count.
    pub(crate) chunk: u64,
    pub(crate) chunks: u64,
    /// The keys of this chunk, and the byte offset of their values in `mem`.
    pub(crate) part: KeyRange,
    pub(crate) part_off: usize,
    /// The request timestamp the worker gave the push (its identity for exactly-once) and
    /// the routing epoch it was split with.
    pub(crate) timestamp: u64,
    pub(crate) epoch: u64,
    pub(crate) mem: &'a (dyn Memory + Send + Sync),
    landing: &'a Arc<Landing>,
    seq: u64,
}

impl LandedPush<'_> {
    /// Whether this push is applied whole at its last chunk (see [`Landing`]).
    pub(crate) fn whole(&self) -> bool {
        self.landing.whole.load(Ordering::Relaxed)
    }

    /// Decide, at the first chunk, whether the push is applied whole at its last chunk.
    pub(crate) fn set_whole(&self, whole: bool) {
        self.landing.whole.store(whole, Ordering::Relaxed)
    }

    /// Whether the first chunk of this push was refused (see [`Landing`]).
    pub(crate) fn refused(&self) -> bool {
        self.landing.refused.load(Ordering::Relaxed)
    }

    /// Say, at the first chunk, whether the push is refused as a whole.
    pub(crate) fn set_refused(&self, refused: bool) {
        self.landing.refused.store(refused, Ordering::Relaxed)
    }

    /// Bytes of values per key.
    pub(crate) fn value_bytes(&self) -> usize {
        self.window.vl * self.window.elem
    }

    /// Byte offset in `mem` of the whole push's values.
    pub(crate) fn values_off(&self) -> usize {
        LANDING_HEADER
    }

    /// The handle that acknowledges the push (the worker polls its done word).
    pub(crate) fn done(&self) -> DoneWord {
        DoneWord {
            landing: self.landing.clone(),
            seq: self.seq,
        }
    }
}

/// Acknowledges one landed push: [`finish`](Self::finish) stores its sequence number in
/// the landing area's done word. Dropping it writes nothing.
pub(crate) struct DoneWord {
    landing: Arc<Landing>,
    seq: u64,
}

impl DoneWord {
    /// The push was applied (and, with replication, every replica holds it).
    pub(crate) fn finish(self) {
        let mem = &self.landing.mem;
        mem.atomic_u64(L_STATUS).store(0, Ordering::Relaxed);
        mem.atomic_u64(L_DONE).store(self.seq, Ordering::Release);
    }
}

/// Why a landed push was not applied: `code` is [`REFUSED_ERROR`] (an error for the
/// caller) or [`REFUSED_ELSEWHERE`] (send it over TCP); nothing of it was applied.
pub(crate) struct Refused {
    pub(crate) code: u64,
    pub(crate) msg: String,
}

/// Landing status: refused with an error, nothing applied.
pub(crate) const REFUSED_ERROR: u64 = 1;
/// Landing status: not served one-sidedly here (the window retired, another table, a
/// range not handed over yet), nothing applied: send it over TCP.
pub(crate) const REFUSED_ELSEWHERE: u64 = 2;

/// A server's one-sided side: its backend, its windows (one per dense range asked for),
/// the workers' landing areas.
pub(crate) struct ServerOneSided {
    backend: Backend,
    host: String,
    vl: usize,
    elem: usize,
    /// Live windows, disjoint, sorted by range.
    windows: parking_lot::RwLock<Vec<Arc<Window>>>,
    /// The most bytes all windows and landing areas may register together.
    registered_max: usize,
    setup: Mutex<Setup>,
    stop: AtomicBool,
}

#[derive(Default)]
struct Setup {
    landings: HashMap<PeerId, Arc<Landing>>,
    /// Keeps the connections alive.
    peers: Vec<Peer>,
    /// Bytes registered for windows and landing areas (retired ones included: workers
    /// may still map them).
    registered: usize,
}

impl ServerOneSided {
    /// The server's one-sided side for `kind`: `None` for tcp; for auto, rdma where a
    /// device is found, else shm.
    pub(crate) fn new(
        kind: TransportKind,
        vl: usize,
        elem: usize,
    ) -> Result<Option<ServerOneSided>, EngineError> {
        let Some(backend) = Backend::for_transport(kind)? else {
            return Ok(None);
        };
        Ok(Some(ServerOneSided {
            backend,
            host: host_id(),
            vl,
            elem,
            windows: parking_lot::RwLock::new(Vec::new()),
            registered_max: REGISTERED_MAX_BYTES,
            setup: Mutex::new(Setup::default()),
            stop: AtomicBool::new(false),
        }))
    }

    /// The live windows that share keys with `r`, in key order.
    pub(crate) fn windows_touching(&self, r: KeyRange) -> Vec<Arc<Window>> {
        let ws = self.windows.read();
        if ws.is_empty() {
            return Vec::new();
        }
        let first = ws.partition_point(|w| w.range.end <= r.begin);
        ws[first..]
            .iter()
            .take_while(|w| w.range.begin < r.end)
            .filter(|w| w.range.intersect(&r).is_some())
            .cloned()
            .collect()
    }

    /// Every live window.
    pub(crate) fn windows(&self) -> Vec<Arc<Window>> {
        self.windows.read().clone()
    }

    /// Retire the windows whose range `heads` says this server no longer heads (after a
    /// table change): readers see it and go over TCP, landed pushes are refused to TCP.
    pub(crate) fn retire_unheaded(&self, heads: impl Fn(KeyRange) -> bool) {
        let mut ws = self.windows.write();
        ws.retain(|w| {
            if heads(w.range) {
                return true;
            }
            w.retire();
            tracing::info!(range = %w.range, "one-sided window retired: this server no longer heads its range");
            false
        });
    }

    /// Retire window `w` now (it could not be kept equal to the store).
    pub(crate) fn retire_now(&self, w: &Arc<Window>) {
        w.retire();
        self.windows.write().retain(|o| !Arc::ptr_eq(o, w));
        tracing::warn!(range = %w.range, "one-sided window retired: a replica batch touched it while it was being written; its keys go over TCP");
    }

    /// A worker asks for a window on `range` (which this server heads: the caller checked)
    /// with its endpoints (by backend) and host id. Creates the window on the first
    /// request for the range (filled by `init`); a range that overlaps another window
    /// without being it is refused, and so is one that would take the registered bytes
    /// past the bound.
    pub(crate) fn grant(
        &self,
        worker: u32,
        range: KeyRange,
        host: &str,
        offers: &[(u8, Vec<u8>)],
        init: impl FnOnce(&Window),
    ) -> Result<WindowGrant, String> {
        let mine = self.backend.kind();
        let offer = offers.iter().find(|(k, _)| *k == mine as u8);
        let Some((_, worker_ep)) = offer else {
            return Err(format!(
                "this server offers {mine}, the worker offered {:?}",
                offers
                    .iter()
                    .filter_map(|(k, _)| BackendKind::from_u8(*k).map(|k| k.name()))
                    .collect::<Vec<_>>()
            ));
        };
        let reason = match mine {
            BackendKind::Shm if host != self.host => {
                return Err("the worker runs on another host; shm needs one host".into())
            }
            BackendKind::Shm => "same host (boot id matches)".to_owned(),
            BackendKind::Rdma => "both ends have an RDMA device".to_owned(),
        };
        if range.is_empty() {
            return Err(format!("window {range} is empty"));
        }
        let bytes = (range.len() as u128) * (self.vl * self.elem) as u128;
        if bytes > WINDOW_MAX_BYTES as u128 {
            return Err(format!(
                "window {range} holds {bytes} bytes, more than the {WINDOW_MAX_BYTES} allowed per window"
            ));
        }
        let bytes = bytes as usize;
        let mut setup = self.setup.lock();
        let existing = {
            let ws = self.windows.read();
            let overlap = ws.iter().find(|w| w.range.intersect(&range).is_some());
            match overlap {
                Some(w) if w.range == range => Some(w.clone()),
                Some(w) => {
                    return Err(format!(
                        "window {range} overlaps this server's window {} (windows are disjoint: ask for that one, or for the ranges of the routing table)",
                        w.range
                    ))
                }
                None => None,
            }
        };
        let layout = BlockLayout::for_len(bytes, BLOCK_PAYLOAD);
        let new_bytes = LANDING_HEADER
            + bytes
            + if existing.is_none() {
                layout.physical_len() + META_LEN
            } else {
                0
            };
        if setup.registered + new_bytes > self.registered_max {
            return Err(format!(
                "window {range} would take this server's registered windows and landing areas to {} bytes, more than the {} allowed",
                setup.registered + new_bytes,
                self.registered_max
            ));
        }
        let window = match existing {
            Some(w) => w,
            None => {
                let (data, data_desc) = self
                    .backend
                    .register(layout.physical_len())
                    .map_err(|e| e.to_string())?;
                let (meta, meta_desc) =
                    self.backend.register(META_LEN).map_err(|e| e.to_string())?;
                let data = Seqlock::new(layout, data).map_err(|e| e.to_string())?;
                let w = Arc::new(Window {
                    range,
                    vl: self.vl,
                    elem: self.elem,
                    layout,
                    data,
                    meta,
                    data_desc,
                    meta_desc,
                    writer: Mutex::new(()),
                    retired: AtomicBool::new(false),
                });
                {
                    // Filled under the writer lock and listed before it is released:
                    // a write to its keys meanwhile waits, then refreshes it.
                    let _w = w.writer.lock();
                    let mut ws = self.windows.write();
                    init(&w);
                    let at = ws.partition_point(|o| o.range.begin < range.begin);
                    ws.insert(at, w.clone());
                }
                tracing::info!(%range, bytes = w.bytes(), backend = %mine, "one-sided window registered");
                w
            }
        };
        let (pending, endpoint) = self.backend.prepare().map_err(|e| e.to_string())?;
        let peer = self
            .backend
            .connect(pending, worker_ep)
            .map_err(|e| e.to_string())?;
        let id = self.backend.peer_id(&peer);
        let (landing, landing_desc) = self
            .backend
            .register(LANDING_HEADER + bytes)
            .map_err(|e| e.to_string())?;
        setup.registered += new_bytes;
        setup.landings.insert(
            id,
            Arc::new(Landing {
                worker,
                mem: landing,
                window: window.clone(),
                whole: AtomicBool::new(false),
                refused: AtomicBool::new(false),
            }),
        );
        setup.peers.push(peer);
        Ok(WindowGrant {
            range,
            value_len: self.vl as u32,
            elem: self.elem as u32,
            block_payload: BLOCK_PAYLOAD as u64,
            backend: mine as u8,
            endpoint,
            data: window.data_desc.encode(),
            meta: window.meta_desc.encode(),
            landing: landing_desc.encode(),
            reason,
        })
    }

    /// Serve pushes that land: wait for notices and hand each chunk, checked against its
    /// landing area's window, to `apply`. `Ok(())` for the last chunk means `apply` took
    /// over acknowledging it ([`LandedPush::done`], now or once replicated); a refusal
    /// (for any chunk) is written to the landing area and ends the push. Runs until
    /// [`stop`](Self::stop).
    pub(crate) fn serve_notices(
        &self,
        mut apply: impl FnMut(&LandedPush<'_>) -> Result<(), Refused>,
    ) {
        let spin = Duration::from_micros(100);
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let notice = if idle_since.elapsed() < spin {
                self.backend.poll_notice()
            } else {
                self.backend.wait_notice(Duration::from_millis(50))
            };
            let n = match notice {
                Ok(Some(n)) => n,
                Ok(None) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "one-sided notice failed; going on");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            idle_since = Instant::now();
            let Some(landing) = self.setup.lock().landings.get(&n.peer).cloned() else {
                tracing::warn!(peer = ?n.peer, "notice from an unknown peer; ignored");
                continue;
            };
            let mem = &landing.mem;
            let word = |off| mem.atomic_u64(off).load(Ordering::Acquire);
            let seq = word(L_SEQ);
            if word(L_DONE) == seq {
                // The rest of a push already refused at its first chunk.
                continue;
            }
            let chunk = u64::from(n.imm & 0xffff);
            let refuse = |msg: String| Refused {
                code: REFUSED_ERROR,
                msg,
            };
            let result = (|| -> Result<(), Refused> {
                if n.imm >> 16 != (seq & 0xffff) as u32 {
                    return Err(refuse(format!(
                        "notice {:#x} does not match the landed push {seq}",
                        n.imm
                    )));
                }
                let (b, e) = (word(L_BEGIN), word(L_END));
                if b >= e {
                    return Err(refuse(format!("empty or backwards range [{b}, {e})")));
                }
                let r = KeyRange::new(b, e);
                let w = &landing.window;
                if !w.covers(&r) {
                    return Err(refuse(format!(
                        "range {r} is outside the window {}",
                        w.range
                    )));
                }
                let bytes = word(L_BYTES) as usize;
                let want = r.len() as usize * self.vl * self.elem;
                if bytes != want || LANDING_HEADER + bytes > mem.len() {
                    return Err(refuse(format!(
                        "{bytes} bytes landed for {want} bytes of values"
                    )));
                }
                let per = chunk_keys(self.vl, self.elem);
                let chunks = r.len().div_ceil(per);
                if chunk >= chunks {
                    return Err(refuse(format!(
                        "chunk {chunk} of a push of {chunks} chunks"
                    )));
                }
                let cb = r.begin + chunk * per;
                let part = KeyRange::new(cb, (cb + per).min(r.end));
                let push = LandedPush {
                    worker: landing.worker,
                    window: w,
                    func: word(L_FUNC) as u16,
                    range: r,
                    chunk,
                    chunks,
                    part,
                    part_off: LANDING_HEADER + (chunk * per) as usize * self.vl * self.elem,
                    timestamp: word(L_TS),
                    epoch: word(L_EPOCH),
                    mem: &**mem,
                    landing: &landing,
                    seq,
                };
                // A bug in an update rule must not stop the thread that serves every
                // worker's pushes: it becomes this push's error.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(&push)))
                    .unwrap_or_else(|_| Err(refuse("the update rule panicked".into())))
            })();
            if let Err(Refused { code, msg }) = result {
                tracing::debug!(worker = landing.worker, %msg, code, "one-sided push refused");
                let m = &msg.as_bytes()[..msg.len().min(L_MSG_MAX)];
                mem.copy_in(L_MSG, m);
                mem.atomic_u64(L_MSG_LEN)
                    .store(m.len() as u64, Ordering::Relaxed);
                mem.atomic_u64(L_STATUS).store(code, Ordering::Relaxed);
                mem.atomic_u64(L_DONE).store(seq, Ordering::Release);
            }
        }
    }

    /// Make [`serve_notices`](Self::serve_notices) return.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Worker side
// ---------------------------------------------------------------------------------------

/// A window attached by a worker.
pub(crate) struct ClientWindow {
    pub(crate) range: KeyRange,
    vl: usize,
    elem: usize,
    layout: BlockLayout,
    data: Remote,
    meta: Remote,
    landing: Remote,
    /// The last push's sequence number; its lock serialises pushes into the landing area.
    seq: Mutex<u64>,
    _peer: Peer,
    /// A registered buffer verbs read into and write from.
    #[cfg(feature = "rdma")]
    staging: verbs::Staging,
}

/// A worker's one-sided side: its backend and the windows it attached, by server (a
/// server may have several, disjoint).
pub(crate) struct ClientOneSided {
    pub(crate) backend: Backend,
    pub(crate) windows: Mutex<HashMap<u32, Vec<Arc<ClientWindow>>>>,
}

impl ClientOneSided {
    /// The worker's backends for `kind` (what it offers servers), or none for tcp.
    pub(crate) fn new(kind: TransportKind) -> Result<Option<ClientOneSided>, EngineError> {
        let Some(backend) = Backend::for_transport(kind)? else {
            return Ok(None);
        };
        Ok(Some(ClientOneSided {
            backend,
            windows: Mutex::new(HashMap::new()),
        }))
    }

    /// Attach a granted window of `server`.
    pub(crate) fn attach(
        &self,
        server: u32,
        pending: Pending,
        g: &WindowGrant,
    ) -> Result<(), EngineError> {
        let peer = self.backend.connect(pending, &g.endpoint)?;
        let desc =
            |b: &[u8]| RegionDesc::decode(b).map_err(|e| os_err("decoding a window descriptor", e));
        let data = self.backend.attach(&peer, &desc(&g.data)?)?;
        let meta = self.backend.attach(&peer, &desc(&g.meta)?)?;
        let landing = self.backend.attach(&peer, &desc(&g.landing)?)?;
        // Sizes a server sent: checked, never trusted to fit.
        let layout = usize::try_from(g.range.len())
            .ok()
            .and_then(|n| n.checked_mul(g.value_len as usize))
            .and_then(|n| n.checked_mul(g.elem as usize))
            .and_then(|bytes| BlockLayout::checked_for_len(bytes, g.block_payload as usize))
            .ok_or_else(|| {
                EngineError::Config(format!(
                    "server {server} granted a window whose sizes do not fit (range {}, \
                     {} values of {} bytes per key, blocks of {} bytes)",
                    g.range, g.value_len, g.elem, g.block_payload
                ))
            })?;
        let w = ClientWindow {
            range: g.range,
            vl: g.value_len as usize,
            elem: g.elem as usize,
            layout,
            data,
            meta,
            landing,
            seq: Mutex::new(0),
            _peer: peer,
            #[cfg(feature = "rdma")]
            staging: verbs::Staging::default(),
        };
        let mut all = self.windows.lock();
        let list = all.entry(server).or_default();
        list.retain(|o| o.range.intersect(&g.range).is_none());
        let at = list.partition_point(|o| o.range.begin < g.range.begin);
        list.insert(at, Arc::new(w));
        Ok(())
    }

    /// Whether any window is attached.
    pub(crate) fn any_window(&self) -> bool {
        self.windows.lock().values().any(|l| !l.is_empty())
    }

    /// The window of `server` covering `r`, if attached.
    pub(crate) fn window_for(&self, server: u32, r: &KeyRange) -> Option<Arc<ClientWindow>> {
        self.windows
            .lock()
            .get(&server)?
            .iter()
            .find(|w| w.range.covers(r))
            .cloned()
    }

    /// The windows of `server` that together cover `r` (in key order), if they do.
    pub(crate) fn windows_covering(
        &self,
        server: u32,
        r: &KeyRange,
    ) -> Option<Vec<Arc<ClientWindow>>> {
        let all = self.windows.lock();
        let list = all.get(&server)?;
        let mut out = Vec::new();
        let mut at = r.begin;
        for w in list {
            if at >= r.end {
                break;
            }
            if w.range.end <= at {
                continue;
            }
            if w.range.begin > at {
                return None;
            }
            out.push(w.clone());
            at = w.range.end;
        }
        (at >= r.end && !out.is_empty()).then_some(out)
    }

    /// Stop using `server`'s window on `range` (its server retired it).
    pub(crate) fn detach_window(&self, server: u32, range: KeyRange) {
        if let Some(list) = self.windows.lock().get_mut(&server) {
            list.retain(|w| w.range != range);
        }
    }

    /// Whether the server retired window `w` (it no longer heads the range: what the
    /// window shows may be stale, go over TCP).
    pub(crate) fn retired(&self, w: &ClientWindow) -> Result<bool, EngineError> {
        Ok(self.word(w, &w.meta, M_RETIRED)? != 0)
    }

    #[cfg(feature = "rdma")]
    fn rdma(&self) -> &pserv_transport::onesided::rdma::RdmaBackend {
        match &self.backend {
            Backend::Rdma(b) => b,
            Backend::Shm(_) => unreachable!("rdma remotes belong to the rdma backend"),
        }
    }

    fn word(&self, w: &ClientWindow, remote: &Remote, off: usize) -> Result<u64, EngineError> {
        #[cfg(feature = "rdma")]
        let staging = &w.staging;
        #[cfg(not(feature = "rdma"))]
        let _ = w;
        match remote {
            Remote::Shm(r) => Ok(r.atomic_u64(off).load(Ordering::Acquire)),
            #[cfg(feature = "rdma")]
            Remote::Rdma(r) => {
                let mut b8 = [0u8; 8];
                verbs::read_bytes(self.rdma(), staging, r, off, &mut b8)
                    .map_err(|e| os_err("reading a remote word", e))?;
                Ok(u64::from_le_bytes(b8))
            }
        }
    }

    /// Wait (polling the server's published clock, one-sidedly) until every worker has
    /// reached `min_clock` on this window.
    pub(crate) fn wait_clock(
        &self,
        w: &ClientWindow,
        min_clock: u64,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        if min_clock == 0 {
            return Ok(());
        }
        if spin_wait(timeout, || Ok(self.word(w, &w.meta, M_CLOCK)? >= min_clock))? {
            Ok(())
        } else {
            Err(EngineError::Timeout(format!(
                "waiting for the servers' clock to reach {min_clock}"
            )))
        }
    }

    /// One-sided read of `r` (inside `w`) into `out`.
    pub(crate) fn read(
        &self,
        w: &ClientWindow,
        r: KeyRange,
        out: &mut [u8],
    ) -> Result<(), EngineError> {
        let off = (r.begin - w.range.begin) as usize * w.vl * w.elem;
        match &w.data {
            Remote::Shm(remote) => {
                let lock =
                    Seqlock::new(w.layout, remote).map_err(|e| os_err("the window's blocks", e))?;
                lock.read(off, out)
                    .map(|_| ())
                    .map_err(|e| os_err("one-sided read", e))
            }
            #[cfg(feature = "rdma")]
            Remote::Rdma(remote) => {
                verbs::read_versioned(self.rdma(), &w.staging, remote, &w.layout, off, out)
                    .map_err(|e| os_err("one-sided read", e))
            }
        }
    }

    /// Stop using the windows of `server` (its one-sided path failed, or it is gone): its
    /// keys go over TCP from now on.
    pub(crate) fn detach(&self, server: u32) {
        self.windows.lock().remove(&server);
    }

    /// One-sided push of `values` (bytes) for `r` (inside `w`) with update function
    /// `func`, identified by request timestamp `timestamp` and routed with table `epoch`:
    /// write into the landing area, notify, wait until the server acknowledged it (applied,
    /// and replicated where the table replicates). `alive` says whether the server's
    /// connection is still up (a dead server's landing area is never answered).
    pub(crate) fn push(
        &self,
        w: &ClientWindow,
        r: KeyRange,
        (func, timestamp, epoch): (u16, u64, u64),
        values: &[u8],
        timeout: Duration,
        alive: &dyn Fn() -> bool,
    ) -> Result<(), PushFailure> {
        let mut notified = false;
        self.push_inner(
            w,
            r,
            (func, timestamp, epoch),
            values,
            (timeout, alive),
            &mut notified,
        )
        .map_err(|(error, elsewhere)| PushFailure {
            error,
            notified,
            elsewhere,
        })
    }

    fn push_inner(
        &self,
        w: &ClientWindow,
        r: KeyRange,
        (func, timestamp, epoch): (u16, u64, u64),
        values: &[u8],
        (timeout, alive): (Duration, &dyn Fn() -> bool),
        notified: &mut bool,
    ) -> Result<(), (EngineError, bool)> {
        let mut seq = w.seq.lock();
        let next = *seq + 1;
        let header = [
            (L_SEQ, next),
            (L_BEGIN, r.begin),
            (L_END, r.end),
            (L_FUNC, u64::from(func)),
            (L_BYTES, values.len() as u64),
            (L_TS, timestamp),
            (L_EPOCH, epoch),
        ];
        let plain = |e: EngineError| (e, false);
        // The header first, then the values chunk by chunk, each followed by its notice
        // (the server applies chunk i while this thread writes chunk i + 1).
        match &w.landing {
            Remote::Shm(l) => {
                for (off, v) in header {
                    l.atomic_u64(off).store(v, Ordering::Relaxed);
                }
            }
            #[cfg(feature = "rdma")]
            Remote::Rdma(l) => {
                let mut h = [0u8; 64];
                for (off, v) in header {
                    h[off..off + 8].copy_from_slice(&v.to_le_bytes());
                }
                verbs::write_bytes(self.rdma(), &w.staging, l, 0, &h)
                    .map_err(|e| plain(os_err("one-sided write", e)))?;
            }
        }
        let per = chunk_keys(w.vl, w.elem) as usize * w.vl * w.elem;
        let tag = ((next & 0xffff) as u32) << 16;
        for (i, part) in values.chunks(per).enumerate() {
            let at = LANDING_HEADER + i * per;
            match &w.landing {
                Remote::Shm(l) => l.copy_in(at, part),
                #[cfg(feature = "rdma")]
                Remote::Rdma(l) => verbs::write_bytes(self.rdma(), &w.staging, l, at, part)
                    .map_err(|e| plain(os_err("one-sided write", e)))?,
            }
            // From the first notice on, the server may apply part of this push.
            *notified = true;
            self.backend
                .notify(&w.landing, tag | i as u32)
                .map_err(plain)?;
        }
        *seq = next;
        let mut gone = false;
        let answered = spin_wait(timeout, || {
            if self.word(w, &w.landing, L_DONE)? == next {
                return Ok(true);
            }
            gone = !alive();
            Ok(gone)
        })
        .map_err(plain)?;
        if gone || !answered {
            // The landing area stays busy until the server finishes with it: this window
            // is not used again (the caller detaches it).
            return Err(plain(EngineError::OneSided(if gone {
                format!(
                    "the server's connection closed before it acknowledged one-sided push {next}"
                )
            } else {
                format!("one-sided push {next} not acknowledged by the server within {timeout:?}")
            })));
        }
        let status = self.word(w, &w.landing, L_STATUS).map_err(plain)?;
        if status != 0 {
            let len = (self.word(w, &w.landing, L_MSG_LEN).map_err(plain)? as usize).min(L_MSG_MAX);
            let mut msg = vec![0u8; len];
            match &w.landing {
                Remote::Shm(l) => l.copy_out(L_MSG, &mut msg),
                #[cfg(feature = "rdma")]
                Remote::Rdma(l) => {
                    verbs::read_bytes(self.rdma(), &w.staging, l, L_MSG, &mut msg)
                        .map_err(|e| plain(os_err("reading the refusal", e)))?;
                }
            }
            let msg = String::from_utf8_lossy(&msg);
            if status == REFUSED_ELSEWHERE {
                return Err((
                    EngineError::OneSided(format!("not served one-sidedly: {msg}")),
                    true,
                ));
            }
            return Err(plain(EngineError::InvalidRequest(format!(
                "server refused the one-sided push: {msg}"
            ))));
        }
        Ok(())
    }
}

/// A one-sided push that failed, and whether the server may have applied part of it
/// (`notified`: a notice for one of its chunks was handed to the transport). Without a
/// notice nothing of it reached the server's update function, and it can be sent again
/// another way.
#[derive(Debug)]
pub(crate) struct PushFailure {
    pub(crate) error: EngineError,
    pub(crate) notified: bool,
    /// The server answered that it applied nothing and the push goes over TCP.
    pub(crate) elsewhere: bool,
}

/// Byte-level helpers over the verbs backend: reads and writes go through a registered
/// staging buffer (verbs move bytes between registered regions only).
#[cfg(feature = "rdma")]
mod verbs {
    use super::*;
    use pserv_transport::onesided::rdma::{RdmaBackend, RdmaLocal, RdmaRemote};

    /// A lazily registered buffer, grown to the largest transfer.
    #[derive(Default)]
    pub(super) struct Staging(Mutex<Option<RdmaLocal>>);

    fn with_local<R>(
        b: &RdmaBackend,
        st: &Staging,
        len: usize,
        f: impl FnOnce(&mut RdmaLocal) -> Result<R, OneSidedError>,
    ) -> Result<R, OneSidedError> {
        let mut g = st.0.lock();
        if g.as_ref().is_none_or(|l| l.len() < len) {
            *g = Some(b.register(len.next_power_of_two().max(4096))?);
        }
        f(g.as_mut().expect("registered above"))
    }

    pub(super) fn read_bytes(
        b: &RdmaBackend,
        st: &Staging,
        r: &RdmaRemote,
        off: usize,
        dst: &mut [u8],
    ) -> Result<(), OneSidedError> {
        with_local(b, st, dst.len(), |l| {
            b.read(r, off, l, 0, dst.len())?;
            l.copy_out(0, dst);
            Ok(())
        })
    }

    pub(super) fn write_bytes(
        b: &RdmaBackend,
        st: &Staging,
        r: &RdmaRemote,
        off: usize,
        src: &[u8],
    ) -> Result<(), OneSidedError> {
        with_local(b, st, src.len(), |l| {
            l.copy_in(0, src);
            b.write(r, off, l, 0, src.len())
        })
    }

    /// Read the blocks covering logical `[off, off + out.len())` in one READ, validate
    /// every block's versions on the copy, retry torn copies.
    pub(super) fn read_versioned(
        b: &RdmaBackend,
        st: &Staging,
        r: &RdmaRemote,
        layout: &BlockLayout,
        off: usize,
        out: &mut [u8],
    ) -> Result<(), OneSidedError> {
        let span = layout.physical_span(off, out.len())?;
        let first = layout.block_of(off);
        let mut copy = vec![0u8; span.len()];
        let mut last = None;
        for _ in 0..1000 {
            read_bytes(b, st, r, span.start, &mut copy)?;
            match layout.validate_copied(first, &copy) {
                Ok(_) => {
                    layout.extract(first, &copy, off, out);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("the loop ran"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_kinds_parse() {
        for k in ["auto", "tcp", "shm", "rdma"] {
            assert_eq!(k.parse::<TransportKind>().unwrap().to_string(), k);
        }
        let e = "udp".parse::<TransportKind>().unwrap_err().to_string();
        assert!(e.contains("auto, tcp, shm or rdma"), "{e}");
    }

    #[cfg(not(feature = "rdma"))]
    #[test]
    fn rdma_is_refused_clearly_without_the_feature() {
        let e = ServerOneSided::new(TransportKind::Rdma, 1, 4)
            .err()
            .expect("no rdma here")
            .to_string();
        assert!(e.contains("rdma"), "{e}");
    }

    #[test]
    fn auto_falls_back_to_shm_without_rdma() {
        if rdma_available().is_ok() {
            return; // a machine with a device offers rdma instead
        }
        let s = ServerOneSided::new(TransportKind::Auto, 1, 4)
            .unwrap()
            .expect("auto offers a one-sided backend");
        assert_eq!(s.backend.kind(), BackendKind::Shm);
        assert!(ServerOneSided::new(TransportKind::Tcp, 1, 4)
            .unwrap()
            .is_none());
    }

    /// A window over shm in one process: granted, read, an overlapping one refused, the
    /// bound on registered bytes, and retirement seen by the reader.
    #[test]
    fn windows_are_disjoint_bounded_and_retire_for_their_readers() {
        let Ok(Some(mut server)) = ServerOneSided::new(TransportKind::Shm, 1, 4) else {
            return; // no shared memory here
        };
        let client = ClientOneSided::new(TransportKind::Shm).unwrap().unwrap();
        let offer = |c: &ClientOneSided| {
            let (pending, ep) = c.backend.prepare().unwrap();
            (pending, vec![(BackendKind::Shm as u8, ep)])
        };
        let host = host_id();
        let r = KeyRange::new(100, 5100);
        let (pending, offers) = offer(&client);
        let grant = server
            .grant(0, r, &host, &offers, |w| {
                w.init(bytemuck::cast_slice(&vec![1.5f32; 5000]))
            })
            .unwrap();
        client.attach(3, pending, &grant).unwrap();
        let w = client.window_for(3, &r).unwrap();
        let mut out = vec![0f32; 5000];
        client
            .read(&w, r, bytemuck::cast_slice_mut(&mut out))
            .unwrap();
        assert!(out.iter().all(|&v| v == 1.5));
        assert!(!client.retired(&w).unwrap());

        let (_, offers) = offer(&client);
        let e = server
            .grant(0, KeyRange::new(200, 300), &host, &offers, |_| {})
            .unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        server.registered_max = 100_000;
        let (_, offers) = offer(&client);
        let e = server
            .grant(0, KeyRange::new(10_000, 40_000), &host, &offers, |_| {})
            .unwrap_err();
        assert!(e.contains("more than the 100000 allowed"), "{e}");
        server.registered_max = REGISTERED_MAX_BYTES;

        let other = KeyRange::new(6000, 7000);
        let (pending, offers) = offer(&client);
        let g = server.grant(0, other, &host, &offers, |_| {}).unwrap();
        client.attach(3, pending, &g).unwrap();
        assert_eq!(server.windows().len(), 2);
        assert_eq!(server.windows_touching(KeyRange::new(5000, 6001)).len(), 2);
        assert!(client
            .windows_covering(3, &KeyRange::new(100, 5100))
            .is_some());
        assert!(client
            .windows_covering(3, &KeyRange::new(100, 7000))
            .is_none());

        // The table moved `r` away: its readers see it retired; the other stays.
        server.retire_unheaded(|x| x != r);
        assert!(client.retired(&w).unwrap());
        let o = client.window_for(3, &other).unwrap();
        assert!(!client.retired(&o).unwrap());
        assert_eq!(server.windows().len(), 1);
    }
}
