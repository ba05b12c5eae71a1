//! The RDMA-verbs backend of [`OneSided`] (cargo feature `rdma`), over the safe verbs of
//! [`pserv_sys::rdma`].
//!
//! - **Register**: a [`PinnedRegion`] registered with LOCAL_WRITE, REMOTE_READ and
//!   REMOTE_WRITE in the backend's one protection domain. The descriptor carries the
//!   region's virtual address, its length and its rkey; the locator is empty.
//! - **Connect**: one reliable-connected queue pair per peer, with its own completion
//!   queue. The endpoint bytes are `[magic "PSEP", version 1, kind 2, 0, 0]` followed by
//!   the 32-byte [`QpEndpoint`] encoding (QPN, PSN, LID, GID, MTU); both sides
//!   [`prepare`](OneSided::prepare), swap the bytes over the TCP control connection, and
//!   [`connect`](OneSided::connect) (INIT -> RTR -> RTS). Each queue pair keeps
//!   [`QpConfig::max_recv_wr`] buffer-less receives posted for notices.
//! - **Read / write**: one RDMA READ / WRITE, signaled, and the call returns when its
//!   completion is polled. Ranges are checked against the descriptor's length before
//!   anything is posted. A completion with a remote access error (wrong rkey, or a
//!   region its owner dropped) is reported as [`OneSidedError::WrongKey`].
//! - **Notify**: `WRITE_WITH_IMM` (with no data for [`notify`](OneSided::notify), with the
//!   data for [`write_notify`](OneSided::write_notify)); the owner's receive completion
//!   carries the immediate, after the data is in its memory, in posting order.
//!
//! # Waiting
//!
//! Each queue pair has two completion queues: one for its sends (READ, WRITE, notices it
//! sends), on a channel of its own, and one for its receives (notices from the peer), on
//! a completion channel the backend's queue pairs share. An operation busy-polls for
//! [`RdmaConfig::spin`] (the common case for small transfers: a few microseconds), then
//! blocks on its send queue's channel in slices of at most 10 ms until
//! [`RdmaConfig::op_timeout`]. [`OneSided::wait_notice`] busy-polls every peer for `spin`,
//! then arms every peer's receive queue and sleeps on the shared channel, so one thread
//! serves the notices of any number of peers without spinning while they are idle.
//!
//! Operations on one peer are serialized (its queue pair is behind a mutex) and each has
//! at most one work request in flight; pipelining several per peer is future work.
//!
//! An operation that fails on the device (error completion) or times out marks its
//! connection broken: later operations on it fail at once with the first error (a queue
//! pair in the error state flushes everything anyway). Reconnect with a fresh
//! `prepare`/`connect`.
//!
//! # Locks
//!
//! A peer's `state` (its queue pair) is taken before the backend's `notices` (receive
//! completions found while polling a queue pair are queued under it), never after.
//! `peers` is a leaf: it is held only to push a new peer or to clone the list, and
//! released before any peer's `state` is taken.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pserv_sys::rdma::{
    devices, Access, Completion, CompletionChannel, CompletionError, Context, MemoryRegion, Opcode,
    PreparedQueuePair, ProtectionDomain, QpConfig, QpEndpoint, QueuePair, RdmaError, RemoteRegion,
};
use pserv_sys::PinnedRegion;

use super::{
    check_range, BackendKind, Memory, Notice, OneSided, OneSidedError, PeerId, RegionDesc, Result,
};

/// "PSEP": endpoint bytes (the same header as the shm backend's, kind 2).
const ENDPOINT_MAGIC: [u8; 4] = *b"PSEP";
const ENDPOINT_VERSION: u8 = 1;
const ENDPOINT_HEADER: usize = 8;
/// Length of this backend's endpoint bytes.
pub const ENDPOINT_LEN: usize = ENDPOINT_HEADER + QpEndpoint::ENCODED_LEN;
/// Longest single blocking wait on a completion channel.
const WAIT_SLICE: Duration = Duration::from_millis(10);
/// Completions fetched per poll.
const POLL_BATCH: usize = 16;

/// What a user without RDMA hardware can do about it.
const NO_DEVICE_HINT: &str = "no RDMA device found (ibv_get_device_list lists none); \
     use --transport shm or tcp, or create a Soft-RoCE device with \
     `rdma link add rxe0 type rxe netdev IFACE`";

/// Configuration of an [`RdmaBackend`].
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Device name (`mlx5_0`, `rxe0`); `None` takes the first device.
    pub device: Option<String>,
    /// Queue-pair settings (port, GID index, MTU, queue sizes, timeouts).
    pub qp: QpConfig,
    /// How long an operation or a notice wait busy-polls before it blocks.
    pub spin: Duration,
    /// How long an operation may wait for its completion before it fails.
    pub op_timeout: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            device: None,
            qp: QpConfig {
                // Operations are synchronous: one send in flight per peer, plus room.
                max_send_wr: 16,
                max_recv_wr: 64,
                ..QpConfig::default()
            },
            spin: Duration::from_micros(50),
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// The usable devices (those with an ACTIVE port) in words, for logs and reports:
/// `soft0 (firmware softrdma 1.0: the software device)`, `mlx5_0 (firmware 20.31.1014)`.
pub fn describe_devices() -> Result<Vec<String>> {
    let devs = devices().map_err(|e| unavailable(&e))?;
    Ok(devs
        .iter()
        .filter(|d| d.ports.iter().any(|p| p.active))
        .map(|d| {
            if pserv_sys::rdma::is_software_firmware(&d.firmware) {
                format!(
                    "{} (firmware {}: the software device of sys/softrdma, not RDMA hardware)",
                    d.name, d.firmware
                )
            } else {
                format!("{} (firmware {})", d.name, d.firmware)
            }
        })
        .collect())
}

/// Whether the first usable device (the one `--transport rdma` opens by default) is the
/// software device of `sys/softrdma`.
pub fn software_device() -> bool {
    devices().is_ok_and(|devs| {
        devs.iter()
            .find(|d| d.ports.iter().any(|p| p.active))
            .is_some_and(|d| pserv_sys::rdma::is_software_firmware(&d.firmware))
    })
}

/// The devices usable for `--transport rdma`: names of devices with an ACTIVE port.
///
/// On a machine without any, [`OneSidedError::Unavailable`] says so in words a user can
/// act on; `auto` selection treats that as "fall back".
pub fn probe() -> Result<Vec<String>> {
    let devs = devices().map_err(|e| unavailable(&e))?;
    if devs.is_empty() {
        return Err(OneSidedError::Unavailable {
            backend: BackendKind::Rdma,
            reason: NO_DEVICE_HINT.into(),
        });
    }
    let active: Vec<String> = devs
        .iter()
        .filter(|d| d.ports.iter().any(|p| p.active))
        .map(|d| d.name.clone())
        .collect();
    if active.is_empty() {
        let names: Vec<&str> = devs.iter().map(|d| d.name.as_str()).collect();
        return Err(OneSidedError::Unavailable {
            backend: BackendKind::Rdma,
            reason: format!("RDMA devices {names:?} have no ACTIVE port"),
        });
    }
    Ok(active)
}

fn unavailable(e: &RdmaError) -> OneSidedError {
    OneSidedError::Unavailable {
        backend: BackendKind::Rdma,
        reason: match e {
            RdmaError::NoDevice => NO_DEVICE_HINT.into(),
            other => other.to_string(),
        },
    }
}

/// A verbs error in the interface's words.
fn map_err(op: &'static str, e: RdmaError) -> OneSidedError {
    match e {
        RdmaError::OutOfBounds {
            what,
            offset,
            len,
            region_len,
        } => OneSidedError::OutOfRange {
            side: what,
            off: offset,
            len,
            region_len,
        },
        RdmaError::Verb { op, source, .. } => OneSidedError::Io { op, source },
        e @ (RdmaError::NoDevice
        | RdmaError::DeviceNotFound { .. }
        | RdmaError::DeviceList(_)
        | RdmaError::PortNotActive { .. }) => unavailable(&e),
        other => OneSidedError::Failed {
            op,
            detail: other.to_string(),
        },
    }
}

fn map_completion(
    op: &'static str,
    remote: Option<&RdmaRemote>,
    e: CompletionError,
) -> OneSidedError {
    match remote {
        Some(r) if e.is_remote_access() => OneSidedError::WrongKey {
            region: r.region_id,
            key: r.region.rkey.into(),
        },
        _ => OneSidedError::Failed {
            op,
            detail: e.to_string(),
        },
    }
}

/// Encode this backend's endpoint bytes.
pub fn encode_endpoint(ep: &QpEndpoint) -> [u8; ENDPOINT_LEN] {
    let mut b = [0u8; ENDPOINT_LEN];
    b[0..4].copy_from_slice(&ENDPOINT_MAGIC);
    b[4] = ENDPOINT_VERSION;
    b[5] = BackendKind::Rdma as u8;
    b[ENDPOINT_HEADER..].copy_from_slice(&ep.encode());
    b
}

/// Decode a peer's endpoint bytes. Never panics; endpoint bytes of another backend give
/// [`OneSidedError::WrongBackend`].
pub fn decode_endpoint(b: &[u8]) -> Result<QpEndpoint> {
    let bad = |reason| OneSidedError::Malformed {
        what: "endpoint",
        reason,
    };
    if b.len() < ENDPOINT_HEADER {
        return Err(bad("shorter than the fixed part"));
    }
    if b[0..4] != ENDPOINT_MAGIC {
        return Err(bad("bad magic"));
    }
    if b[4] != ENDPOINT_VERSION {
        return Err(bad("unknown version"));
    }
    match BackendKind::from_u8(b[5]) {
        Some(BackendKind::Rdma) => {}
        Some(found) => {
            return Err(OneSidedError::WrongBackend {
                expected: BackendKind::Rdma,
                found,
            })
        }
        None => return Err(bad("unknown backend kind")),
    }
    if b[6..8] != [0, 0] {
        return Err(bad("reserved bytes not zero"));
    }
    if b.len() != ENDPOINT_LEN {
        return Err(bad("wrong length for an rdma endpoint"));
    }
    QpEndpoint::decode(&b[ENDPOINT_HEADER..]).map_err(|_| bad("invalid queue-pair endpoint"))
}

/// The verbs view of an rdma descriptor. Refuses descriptors of another backend, keys
/// wider than an rkey, and non-empty locators.
pub fn remote_region(desc: &RegionDesc) -> Result<RemoteRegion> {
    if desc.kind != BackendKind::Rdma {
        return Err(OneSidedError::WrongBackend {
            expected: BackendKind::Rdma,
            found: desc.kind,
        });
    }
    let bad = |reason| OneSidedError::Malformed {
        what: "descriptor",
        reason,
    };
    let rkey = u32::try_from(desc.key).map_err(|_| bad("rdma key wider than 32 bits"))?;
    if !desc.locator.is_empty() {
        return Err(bad("rdma descriptors carry no locator"));
    }
    if usize::try_from(desc.len).is_err() {
        return Err(bad("length beyond the address space"));
    }
    Ok(RemoteRegion {
        addr: desc.addr,
        len: desc.len,
        rkey,
    })
}

/// The verbs backend: one device context and protection domain, one queue pair per
/// connected peer.
#[derive(Debug)]
pub struct RdmaBackend {
    cfg: RdmaConfig,
    pd: ProtectionDomain,
    /// The channel every queue pair's receive CQ sits on (notices).
    notice_channel: CompletionChannel,
    peers: Mutex<Vec<Arc<Conn>>>,
    notices: Arc<Mutex<VecDeque<Notice>>>,
    next_region: AtomicU64,
    next_peer: AtomicU64,
}

/// A region this process registered.
#[derive(Debug)]
pub struct RdmaLocal {
    mr: Arc<MemoryRegion>,
    id: u64,
    len: usize,
}

/// A queue pair waiting for the peer's endpoint.
#[derive(Debug)]
pub struct RdmaPending(PreparedQueuePair);

/// A connected peer.
#[derive(Clone, Debug)]
pub struct RdmaPeer(Arc<Conn>);

/// A peer's region, reached through the peer's queue pair.
#[derive(Debug)]
pub struct RdmaRemote {
    conn: Arc<Conn>,
    region: RemoteRegion,
    region_id: u64,
    len: usize,
}

#[derive(Debug)]
struct Conn {
    id: PeerId,
    /// The longest message one work request carries (the port's `max_msg_sz`).
    max_msg: usize,
    state: Mutex<ConnState>,
}

impl Conn {
    /// `(offset, length)` pieces of a `len`-byte transfer that each fit one work request;
    /// none for an empty transfer.
    fn chunks(&self, len: usize) -> impl Iterator<Item = (usize, usize)> {
        let max = self.max_msg.max(1);
        (0..len.div_ceil(max)).map(move |i| (i * max, (len - i * max).min(max)))
    }
}

#[derive(Debug)]
struct ConnState {
    qp: QueuePair,
    next_wr: u64,
    /// Set by the first failure; the queue pair is unusable after it.
    broken: Option<String>,
}

impl RdmaLocal {
    /// The region's id (unique within this backend).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl RdmaPeer {
    /// This side's id for the peer.
    pub fn id(&self) -> PeerId {
        self.0.id
    }

    /// The peer's queue-pair endpoint.
    pub fn remote_endpoint(&self) -> QpEndpoint {
        self.0.state.lock().qp.remote_endpoint()
    }
}

impl RdmaRemote {
    /// The owner's id for the region.
    pub fn region_id(&self) -> u64 {
        self.region_id
    }

    /// The peer the region was attached through.
    pub fn peer(&self) -> RdmaPeer {
        RdmaPeer(self.conn.clone())
    }
}

/// Debug-build check that the pieces `chunks` gave for a transfer of `len` bytes, ending
/// at `end`, covered all of it.
fn debug_assert_covered(end: usize, len: usize, op: &str) {
    debug_assert_eq!(
        end, len,
        "the pieces of a {op} do not cover its {len} bytes"
    );
}

fn memory_check(len: usize, off: usize, n: usize, op: &str) {
    assert!(
        off.checked_add(n).is_some_and(|e| e <= len),
        "{op}({off}, {n}) outside a {len}-byte region"
    );
}

impl Memory for RdmaLocal {
    fn len(&self) -> usize {
        self.len
    }
    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        memory_check(self.len, off, 8, "atomic_u64");
        assert!(
            off.is_multiple_of(8),
            "atomic_u64({off}) is not 8-byte aligned"
        );
        self.mr
            .atomic_u64(off)
            .expect("checked in range and aligned")
    }
    fn copy_out(&self, off: usize, dst: &mut [u8]) {
        memory_check(self.len, off, dst.len(), "copy_out");
        self.mr.read_at(off, dst).expect("checked in range");
    }
    fn copy_in(&self, off: usize, src: &[u8]) {
        memory_check(self.len, off, src.len(), "copy_in");
        self.mr.write_at(off, src).expect("checked in range");
    }
}

impl ConnState {
    /// Handle a receive completion: a notice (queued) and a fresh receive in its place.
    fn on_recv(&mut self, peer: PeerId, c: &Completion, notices: &Mutex<VecDeque<Notice>>) {
        match c.status {
            Ok(()) => {
                if let (Opcode::RecvWithImm, Some(imm)) = (c.opcode, c.imm_data) {
                    notices.lock().push_back(Notice { peer, imm });
                } else {
                    tracing::debug!(?peer, opcode = ?c.opcode, "receive without immediate ignored");
                }
                if let Err(e) = self.qp.post_recv(c.wr_id, None) {
                    self.broken
                        .get_or_insert_with(|| format!("re-posting a receive: {e}"));
                }
            }
            Err(e) => {
                self.broken.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Poll once without blocking, handling receives; report a failed send completion.
    fn drain(&mut self, peer: PeerId, notices: &Mutex<VecDeque<Notice>>) -> Result<()> {
        let mut buf = [Completion::default(); POLL_BATCH];
        let n = self.qp.poll(&mut buf).map_err(|e| map_err("poll", e))?;
        for c in &buf[..n] {
            if c.opcode.is_recv() {
                self.on_recv(peer, c, notices);
            } else if let Err(e) = c.status {
                self.broken.get_or_insert_with(|| e.to_string());
            }
        }
        Ok(())
    }
}

impl RdmaBackend {
    /// Open the configured device (or the first one). On a machine without RDMA devices
    /// this fails with [`OneSidedError::Unavailable`] saying "no RDMA device found".
    pub fn new(cfg: RdmaConfig) -> Result<Self> {
        let ctx = Context::open(cfg.device.as_deref()).map_err(|e| unavailable(&e))?;
        let pd = ctx.alloc_pd().map_err(|e| map_err("alloc_pd", e))?;
        let notice_channel = ctx
            .create_channel()
            .map_err(|e| map_err("create_channel", e))?;
        if ctx.is_software_device() {
            tracing::info!(
                device = ctx.name(),
                firmware = ctx.firmware(),
                "rdma backend opened on the software device (sys/softrdma): verbs run, speed is not hardware's"
            );
        } else {
            tracing::info!(
                device = ctx.name(),
                firmware = ctx.firmware(),
                "rdma backend opened"
            );
        }
        Ok(Self {
            cfg,
            pd,
            notice_channel,
            peers: Mutex::new(Vec::new()),
            notices: Arc::new(Mutex::new(VecDeque::new())),
            next_region: AtomicU64::new(1),
            next_peer: AtomicU64::new(1),
        })
    }

    /// The device in use.
    pub fn device(&self) -> &str {
        self.pd.context().name()
    }

    /// Post one signaled send-queue request with `post` and wait for its completion.
    fn run(
        &self,
        op: &'static str,
        remote: &RdmaRemote,
        post: impl FnOnce(&mut QueuePair, u64) -> std::result::Result<(), RdmaError>,
    ) -> Result<()> {
        let conn = &remote.conn;
        let mut st = conn.state.lock();
        if let Some(why) = &st.broken {
            return Err(OneSidedError::Failed {
                op,
                detail: format!("connection to peer {} is broken: {why}", conn.id.0),
            });
        }
        let wr = st.next_wr;
        st.next_wr += 1;
        post(&mut st.qp, wr).map_err(|e| map_err(op, e))?;

        let start = Instant::now();
        let mut buf = [Completion::default(); POLL_BATCH];
        loop {
            let elapsed = start.elapsed();
            let n = if elapsed < self.cfg.spin {
                st.qp.poll(&mut buf)
            } else {
                let left = self.cfg.op_timeout.saturating_sub(elapsed);
                st.qp.wait(&mut buf, left.min(WAIT_SLICE))
            }
            .map_err(|e| map_err(op, e))?;
            let mut outcome = None;
            for c in &buf[..n] {
                if c.opcode.is_recv() {
                    st.on_recv(conn.id, c, &self.notices);
                } else if c.wr_id == wr {
                    outcome = Some(c.status);
                } else if let Err(e) = c.status {
                    // A request of an earlier operation that timed out.
                    st.broken.get_or_insert_with(|| e.to_string());
                }
            }
            match outcome {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => {
                    st.broken.get_or_insert_with(|| e.to_string());
                    return Err(map_completion(op, Some(remote), e));
                }
                None if start.elapsed() >= self.cfg.op_timeout => {
                    st.broken.get_or_insert_with(|| format!("{op} timed out"));
                    return Err(OneSidedError::Timeout {
                        op,
                        after: self.cfg.op_timeout,
                    });
                }
                None => {}
            }
        }
    }

    fn pop_notice(&self) -> Option<Notice> {
        self.notices.lock().pop_front()
    }

    /// Poll every peer that no operation is using right now (a busy one hands its
    /// notices over itself).
    fn poll_peers(&self) -> Result<()> {
        let peers: Vec<Arc<Conn>> = self.peers.lock().clone();
        for conn in peers {
            if let Some(mut st) = conn.state.try_lock() {
                if st.broken.is_none() {
                    st.drain(conn.id, &self.notices)?;
                }
            }
        }
        Ok(())
    }
}

impl OneSided for RdmaBackend {
    type Local = RdmaLocal;
    type Pending = RdmaPending;
    type Peer = RdmaPeer;
    type Remote = RdmaRemote;

    fn kind(&self) -> BackendKind {
        BackendKind::Rdma
    }

    fn register(&self, len: usize) -> Result<RdmaLocal> {
        let region = PinnedRegion::new(len.max(1)).map_err(|e| OneSidedError::Io {
            op: "mapping a region to register",
            source: std::io::Error::other(e),
        })?;
        let mr = self
            .pd
            .register(region, Access::ALL)
            .map_err(|e| map_err("register", e))?;
        debug_assert!(
            mr.len() >= len,
            "a memory region of {} bytes registered for {len}",
            mr.len()
        );
        Ok(RdmaLocal {
            mr: Arc::new(mr),
            id: self.next_region.fetch_add(1, Ordering::Relaxed),
            len,
        })
    }

    fn describe(&self, local: &RdmaLocal) -> RegionDesc {
        RegionDesc {
            kind: BackendKind::Rdma,
            region_id: local.id,
            addr: local.mr.addr(),
            len: local.len as u64,
            key: local.mr.rkey().into(),
            locator: Vec::new(),
        }
    }

    fn prepare(&self) -> Result<(RdmaPending, Vec<u8>)> {
        let q = &self.cfg.qp;
        let ctx = self.pd.context();
        let send_cq = ctx
            .create_cq(q.max_send_wr as usize)
            .map_err(|e| map_err("create_cq", e))?;
        let recv_cq = ctx
            .create_cq_on(q.max_recv_wr as usize, &self.notice_channel)
            .map_err(|e| map_err("create_cq", e))?;
        let pending = self
            .pd
            .prepare_qp_split(send_cq, recv_cq, q.clone())
            .map_err(|e| map_err("prepare_qp", e))?;
        let bytes = encode_endpoint(&pending.endpoint()).to_vec();
        Ok((RdmaPending(pending), bytes))
    }

    fn connect(&self, pending: RdmaPending, remote_endpoint: &[u8]) -> Result<RdmaPeer> {
        let ep = decode_endpoint(remote_endpoint)?;
        let mut qp = pending.0.handshake(ep).map_err(|e| map_err("connect", e))?;
        for i in 0..qp.max_recv_wr() {
            qp.post_recv(i as u64, None)
                .map_err(|e| map_err("connect", e))?;
        }
        let id = PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed));
        let conn = Arc::new(Conn {
            id,
            max_msg: qp.max_message(),
            state: Mutex::new(ConnState {
                qp,
                next_wr: 0,
                broken: None,
            }),
        });
        self.peers.lock().push(conn.clone());
        Ok(RdmaPeer(conn))
    }

    fn peer_id(&self, peer: &RdmaPeer) -> PeerId {
        peer.0.id
    }

    fn attach(&self, peer: &RdmaPeer, desc: &RegionDesc) -> Result<RdmaRemote> {
        let region = remote_region(desc)?;
        Ok(RdmaRemote {
            conn: peer.0.clone(),
            region,
            region_id: desc.region_id,
            len: usize::try_from(desc.len).expect("checked by remote_region"),
        })
    }

    fn remote_len(&self, remote: &RdmaRemote) -> usize {
        remote.len
    }

    fn read(
        &self,
        remote: &RdmaRemote,
        remote_off: usize,
        local: &mut RdmaLocal,
        local_off: usize,
        len: usize,
    ) -> Result<()> {
        check_range("remote", remote_off, len, remote.len)?;
        check_range("local", local_off, len, local.len)?;
        let mut end = 0;
        for (at, n) in remote.conn.chunks(len) {
            debug_assert_eq!(at, end, "the pieces of a read are not contiguous");
            end = at + n;
            self.run("read", remote, |qp, wr| {
                qp.post_read(
                    wr,
                    local.mr.slice(local_off + at..local_off + at + n),
                    &remote.region,
                    (remote_off + at) as u64,
                    true,
                )
            })?;
        }
        debug_assert_covered(end, len, "read");
        Ok(())
    }

    fn write(
        &self,
        remote: &RdmaRemote,
        remote_off: usize,
        local: &RdmaLocal,
        local_off: usize,
        len: usize,
    ) -> Result<()> {
        check_range("remote", remote_off, len, remote.len)?;
        check_range("local", local_off, len, local.len)?;
        let mut end = 0;
        for (at, n) in remote.conn.chunks(len) {
            debug_assert_eq!(at, end, "the pieces of a write are not contiguous");
            end = at + n;
            self.run("write", remote, |qp, wr| {
                qp.post_write(
                    wr,
                    local.mr.slice(local_off + at..local_off + at + n),
                    &remote.region,
                    (remote_off + at) as u64,
                    true,
                )
            })?;
        }
        debug_assert_covered(end, len, "write");
        Ok(())
    }

    fn notify(&self, remote: &RdmaRemote, imm: u32) -> Result<()> {
        self.run("notify", remote, |qp, wr| {
            qp.post_write_with_imm(wr, None, &remote.region, 0, imm, true)
        })
    }

    fn write_notify(
        &self,
        remote: &RdmaRemote,
        remote_off: usize,
        local: &RdmaLocal,
        local_off: usize,
        len: usize,
        imm: u32,
    ) -> Result<()> {
        check_range("remote", remote_off, len, remote.len)?;
        check_range("local", local_off, len, local.len)?;
        // All but the last piece as plain writes; the immediate rides on the last, which
        // lands after the others (a queue pair executes its requests in order).
        let mut pieces = remote.conn.chunks(len).peekable();
        let mut last = (0, 0);
        let mut end = 0;
        while let Some((at, n)) = pieces.next() {
            debug_assert_eq!(at, end, "the pieces of a write_notify are not contiguous");
            end = at + n;
            if pieces.peek().is_none() {
                last = (at, n);
                break;
            }
            self.run("write_notify", remote, |qp, wr| {
                qp.post_write(
                    wr,
                    local.mr.slice(local_off + at..local_off + at + n),
                    &remote.region,
                    (remote_off + at) as u64,
                    true,
                )
            })?;
        }
        let (at, n) = last;
        // The notice rides on the piece that ends the transfer: it lands after all of it.
        debug_assert_covered(at + n, len, "write_notify");
        self.run("write_notify", remote, |qp, wr| {
            let data = (n > 0).then(|| local.mr.slice(local_off + at..local_off + at + n));
            qp.post_write_with_imm(
                wr,
                data,
                &remote.region,
                (remote_off + at) as u64,
                imm,
                true,
            )
        })
    }

    fn poll_notice(&self) -> Result<Option<Notice>> {
        if let Some(n) = self.pop_notice() {
            return Ok(Some(n));
        }
        self.poll_peers()?;
        Ok(self.pop_notice())
    }

    fn wait_notice(&self, timeout: Duration) -> Result<Option<Notice>> {
        let start = Instant::now();
        loop {
            if let Some(n) = self.poll_notice()? {
                return Ok(Some(n));
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Ok(None);
            }
            if elapsed < self.cfg.spin {
                std::hint::spin_loop();
                continue;
            }
            // Arm every peer's receive queue, look once more (a notice that came before
            // arming raises no event), then sleep on the shared channel.
            let peers = self.peers.lock().clone();
            for conn in &peers {
                let mut st = conn.state.lock();
                if st.broken.is_some() {
                    continue;
                }
                if let Err(e) = st.qp.arm_recv() {
                    st.broken
                        .get_or_insert_with(|| format!("arming the receive queue: {e}"));
                    continue;
                }
                st.drain(conn.id, &self.notices)?;
            }
            if let Some(n) = self.pop_notice() {
                return Ok(Some(n));
            }
            let slice = timeout.saturating_sub(start.elapsed()).min(WAIT_SLICE);
            self.notice_channel
                .wait(slice)
                .map_err(|e| map_err("wait_notice", e))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn has_devices() -> bool {
        !devices().unwrap().is_empty()
    }

    #[test]
    fn without_a_device_rdma_is_unavailable_with_a_clear_reason() {
        if has_devices() {
            eprintln!("skipped: this machine has RDMA devices");
            return;
        }
        let e = RdmaBackend::new(RdmaConfig::default()).unwrap_err();
        match &e {
            OneSidedError::Unavailable { backend, reason } => {
                assert_eq!(*backend, BackendKind::Rdma);
                assert!(reason.contains("no RDMA device found"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e
            .to_string()
            .starts_with("rdma backend unavailable: no RDMA device"));
        assert!(matches!(probe(), Err(OneSidedError::Unavailable { .. })));
        let named = RdmaBackend::new(RdmaConfig {
            device: Some("mlx5_0".into()),
            ..RdmaConfig::default()
        });
        assert!(matches!(named, Err(OneSidedError::Unavailable { .. })));
    }

    fn ep() -> QpEndpoint {
        QpEndpoint {
            qpn: 0x11,
            lid: 3,
            gid: [7; 16],
            psn: 0x12_3456,
            mtu: pserv_sys::rdma::Mtu::Mtu4096,
        }
    }

    #[test]
    fn endpoint_bytes_round_trip_and_refuse_others() {
        let b = encode_endpoint(&ep());
        assert_eq!(decode_endpoint(&b).unwrap(), ep());
        let mut shm = b;
        shm[5] = BackendKind::Shm as u8;
        assert!(matches!(
            decode_endpoint(&shm),
            Err(OneSidedError::WrongBackend {
                expected: BackendKind::Rdma,
                found: BackendKind::Shm
            })
        ));
        let malformed = |bytes: &[u8], reason: &str| match decode_endpoint(bytes) {
            Err(OneSidedError::Malformed { reason: r, .. }) => assert_eq!(r, reason),
            other => panic!("expected {reason:?}, got {other:?}"),
        };
        malformed(&b[..7], "shorter than the fixed part");
        malformed(&b[..39], "wrong length for an rdma endpoint");
        let mut x = b;
        x[0] = 0;
        malformed(&x, "bad magic");
        let mut x = b;
        x[4] = 2;
        malformed(&x, "unknown version");
        let mut x = b;
        x[ENDPOINT_HEADER + 7] = 0xff; // qpn beyond 24 bits
        malformed(&x, "invalid queue-pair endpoint");
    }

    fn desc() -> RegionDesc {
        RegionDesc {
            kind: BackendKind::Rdma,
            region_id: 5,
            addr: 0x7f12_3456_0000,
            len: 1 << 20,
            key: 0x1234,
            locator: Vec::new(),
        }
    }

    #[test]
    fn descriptors_map_to_remote_regions() {
        let d = RegionDesc::decode(&desc().encode()).unwrap();
        assert_eq!(
            remote_region(&d).unwrap(),
            RemoteRegion {
                addr: 0x7f12_3456_0000,
                len: 1 << 20,
                rkey: 0x1234
            }
        );
        let mut d = desc();
        d.kind = BackendKind::Shm;
        assert!(matches!(
            remote_region(&d),
            Err(OneSidedError::WrongBackend { .. })
        ));
        let mut d = desc();
        d.key = 1 << 32;
        assert!(matches!(
            remote_region(&d),
            Err(OneSidedError::Malformed { .. })
        ));
        let mut d = desc();
        d.locator = b"/proc/1/fd/3".to_vec();
        assert!(matches!(
            remote_region(&d),
            Err(OneSidedError::Malformed { .. })
        ));
    }

    #[test]
    fn verbs_errors_keep_their_meaning() {
        let e = map_err(
            "read",
            RdmaError::OutOfBounds {
                what: "remote",
                offset: 8,
                len: 4,
                region_len: 10,
            },
        );
        assert_eq!(
            e.to_string(),
            "remote range [8, 8+4) does not fit in a region of 10 bytes"
        );
        assert!(matches!(
            map_err("open", RdmaError::NoDevice),
            OneSidedError::Unavailable { .. }
        ));
        assert!(matches!(
            map_err(
                "write",
                RdmaError::QueueFull {
                    queue: "send",
                    max: 4
                }
            ),
            OneSidedError::Failed { op: "write", .. }
        ));
    }

    proptest! {
        #[test]
        fn endpoint_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(ep) = decode_endpoint(&bytes) {
                prop_assert_eq!(&encode_endpoint(&ep)[..], &bytes[..]);
            }
        }
    }

    // ------------------------------------------------------------ with a device
    //
    // PSERV_RDMA_DEVICE=rxe0 cargo test -p pserv-transport --features rdma -- --ignored rdma

    fn device_backend() -> RdmaBackend {
        let device = std::env::var("PSERV_RDMA_DEVICE").expect(
            "PSERV_RDMA_DEVICE is not set: name an RDMA device (e.g. rxe0) to run device tests",
        );
        let mut cfg = RdmaConfig {
            device: Some(device),
            ..RdmaConfig::default()
        };
        if let Ok(g) = std::env::var("PSERV_RDMA_GID_INDEX") {
            cfg.qp.gid_index = Some(g.parse().expect("PSERV_RDMA_GID_INDEX is a u8"));
        }
        RdmaBackend::new(cfg).expect("open the RDMA device")
    }

    /// Two backends on one device, connected both ways, as two processes would be.
    fn pair() -> (RdmaBackend, RdmaBackend, RdmaPeer, RdmaPeer) {
        let (a, b) = (device_backend(), device_backend());
        let (pa, ea) = a.prepare().unwrap();
        let (pb, eb) = b.prepare().unwrap();
        let a_to_b = a.connect(pa, &eb).unwrap();
        let b_to_a = b.connect(pb, &ea).unwrap();
        (a, b, a_to_b, b_to_a)
    }

    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn rdma_read_write_notify_between_two_backends() {
        let (owner, peer, _o2p, p2o) = pair();
        let (_store, remote, mut buf) = super::super::check_read_write_notify(&owner, &peer, &p2o);
        peer.notify(&remote, 78).unwrap();
        assert_eq!(
            owner
                .wait_notice(Duration::from_secs(5))
                .unwrap()
                .unwrap()
                .imm,
            78
        );
        assert_eq!(owner.poll_notice().unwrap(), None);
        assert_eq!(owner.wait_notice(Duration::from_millis(20)).unwrap(), None);

        // Refused before posting.
        assert!(matches!(
            peer.read(&remote, 9_999, &mut buf, 0, 2),
            Err(OneSidedError::OutOfRange { side: "remote", .. })
        ));
    }

    /// CPU time (user + system) of the calling thread, from /proc.
    fn thread_cpu() -> Duration {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5) (utime, stime), counted from `state` as 3.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
    }

    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn waiting_for_notices_of_several_idle_peers_sleeps_and_still_wakes() {
        let owner = device_backend();
        let peers: Vec<(RdmaBackend, RdmaPeer)> = (0..3)
            .map(|_| {
                let p = device_backend();
                let (po, eo) = owner.prepare().unwrap();
                let (pp, ep) = p.prepare().unwrap();
                owner.connect(po, &ep).unwrap();
                let to_owner = p.connect(pp, &eo).unwrap();
                (p, to_owner)
            })
            .collect();
        let store = owner.register(4096).unwrap();
        let desc = owner.describe(&store);
        // Idle: the wait sleeps instead of spinning (it used to yield in a loop).
        let cpu0 = thread_cpu();
        let t0 = Instant::now();
        assert_eq!(owner.wait_notice(Duration::from_millis(600)).unwrap(), None);
        let (wall, cpu) = (t0.elapsed(), thread_cpu() - cpu0);
        eprintln!("idle wait of {wall:?} used {cpu:?} of CPU");
        assert!(cpu < wall / 4, "waiting used {cpu:?} of CPU in {wall:?}");
        // And a notice from any of the peers wakes it.
        std::thread::scope(|s| {
            let (p, to_owner) = &peers[2];
            let remote = p.attach(to_owner, &desc).unwrap();
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                p.notify(&remote, 31).unwrap();
            });
            let n = owner.wait_notice(Duration::from_secs(5)).unwrap().unwrap();
            assert_eq!(n.imm, 31);
        });
    }

    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn rdma_transfers_longer_than_one_message_are_split() {
        let (owner, peer, _o2p, p2o) = pair();
        let max = p2o.0.max_msg;
        // Longer than one message on every port that has a small limit (8 MiB on
        // Soft-RoCE), and not a multiple of it; capped for ports that allow GiBs.
        let len = (max + max / 2 + 12_345).min(24 << 20);
        let store = owner.register(len).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        store.copy_in(0, &data);
        let remote = peer.attach(&p2o, &owner.describe(&store)).unwrap();
        let mut buf = peer.register(len).unwrap();
        peer.read(&remote, 0, &mut buf, 0, len).unwrap();
        let mut got = vec![0u8; len];
        buf.copy_out(0, &mut got);
        assert!(
            got == data,
            "read of {len} bytes (max message {max}) differs"
        );
        let back: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        buf.copy_in(0, &back);
        peer.write_notify(&remote, 0, &buf, 0, len, 9).unwrap();
        assert_eq!(
            owner
                .wait_notice(Duration::from_secs(10))
                .unwrap()
                .unwrap()
                .imm,
            9
        );
        store.copy_out(0, &mut got);
        assert!(
            got == back,
            "write of {len} bytes (max message {max}) differs"
        );
    }

    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn rdma_wrong_key_is_refused_by_the_peer() {
        let (owner, peer, _o2p, p2o) = pair();
        let store = owner.register(4096).unwrap();
        let mut d = owner.describe(&store);
        d.key ^= 0x5a5a;
        let remote = peer.attach(&p2o, &d).unwrap();
        let mut buf = peer.register(4096).unwrap();
        let e = peer.read(&remote, 0, &mut buf, 0, 64).unwrap_err();
        assert!(matches!(e, OneSidedError::WrongKey { .. }), "{e}");
        // The connection is broken now and says so.
        let e = peer.read(&remote, 0, &mut buf, 0, 64).unwrap_err();
        assert!(e.to_string().contains("broken"), "{e}");
    }

    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn rdma_reads_of_versioned_blocks_are_never_torn() {
        use crate::onesided::seqlock::{BlockLayout, Seqlock};
        use std::sync::atomic::AtomicBool;

        let (owner, peer, _o2p, p2o) = pair();
        let layout = BlockLayout::new(4096, 4);
        let store = owner.register(layout.physical_len()).unwrap();
        let desc = owner.describe(&store);
        let remote = peer.attach(&p2o, &desc).unwrap();
        let mut buf = peer.register(layout.physical_len()).unwrap();
        let stop = AtomicBool::new(false);
        // Stops the writer however the reader ends (a failed check must not leave the
        // scope waiting for it forever).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            let _stop = StopOnDrop(&stop);
            s.spawn(|| {
                let lock = Seqlock::new(layout, &store).unwrap();
                let mut v = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    v = v.wrapping_add(1);
                    lock.write(0, &vec![v; layout.logical_len()]).unwrap();
                }
            });
            let (mut ok, mut torn) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut phys = vec![0u8; layout.physical_len()];
            while Instant::now() < deadline {
                peer.read(&remote, 0, &mut buf, 0, layout.physical_len())
                    .unwrap();
                buf.copy_out(0, &mut phys);
                match layout.validate_copied(0, &phys) {
                    Ok(_) => {
                        let mut block = vec![0u8; 4096];
                        for i in 0..layout.blocks() {
                            layout.extract(0, &phys, i * 4096, &mut block);
                            assert!(
                                block.iter().all(|&b| b == block[0]),
                                "block {i} validated but holds two states"
                            );
                        }
                        ok += 1;
                    }
                    Err(OneSidedError::Torn { .. }) => torn += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            stop.store(true, Ordering::Relaxed);
            eprintln!("rdma seqlock stress: {ok} consistent reads, {torn} torn reads detected");
            assert!(ok > 0);
        });
    }
}
