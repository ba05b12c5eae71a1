//! The worker API: what training code calls (MISSION.md P1, P2, P3).
//!
//! A [`Worker`] registers with the scheduler, learns the cluster table, connects to every
//! server, and then offers asynchronous range push and pull:
//!
//! - [`push`](Worker::push), [`pull`](Worker::pull), [`push_pull`](Worker::push_pull) take a
//!   sorted key list; [`push_range`](Worker::push_range) and
//!   [`pull_range`](Worker::pull_range) take a [`KeyRange`] whose values are dense.
//! - Each returns a [`Timestamp`] at once. [`wait`](Worker::wait) blocks until that task is
//!   done; [`wait_pull`](Worker::wait_pull) also hands over the pulled values.
//! - A request is split by the server partition and sent as one message per server,
//!   never one per key. Keys and values are sent straight from the caller's buffers
//!   (moved or shared into the request, not copied) with one vectored write.
//! - Invalid requests (unsorted keys, lengths that do not fit) do not panic: the task
//!   completes at once with the error, which `wait` returns.
//!
//! Waiting spins for `spin_us` before it parks the thread: an answer on loopback usually
//! arrives within tens of microseconds, and waking a parked thread costs about 25 us on
//! these machines. Set `spin_us` to 0 on oversubscribed hosts.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use pserv_transport::wire::{Header, MessageKind, FLAG_ORDERED, FLAG_RANGE};
use pserv_transport::{
    AsBytes, CloseReason, Conn, Handler, OutFrame, OwnedFrame, Payload, RecvFrame, TcpConfig,
    TcpTransport,
};

use crate::consistency::{Consistency, Gate};
use crate::error::EngineError;
use crate::keys::{Key, KeyRange};
use crate::onesided::{ClientOneSided, TransportKind};
use crate::proto::{ClusterInfo, Control, Role, Status, WorkerStats};
use crate::value::Value;

/// Identifies a task (a push, pull or push-pull) of one worker. Increases by one per task.
pub type Timestamp = u64;

/// Conn tag of the scheduler connection.
pub(crate) const SCHEDULER_TAG: u64 = u64::MAX;

/// Configuration of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The scheduler's address.
    pub scheduler: SocketAddr,
    /// The transport's event loops.
    pub tcp: TcpConfig,
    /// A requested rank (decides, for example, the data shard).
    pub rank: Option<u32>,
    /// How long `wait` spins before parking.
    pub spin_us: u64,
    /// How long to wait for the scheduler's cluster table.
    pub register_timeout: Duration,
    /// The default consistency model of this worker's tasks (default: eventual).
    pub consistency: Consistency,
    /// How long `wait` and `barrier` block before they give up with
    /// [`EngineError::Timeout`] (a server or the scheduler that stopped answering).
    pub timeout: Duration,
    /// The data path of dense ranges in windows ([`Worker::open_window`]): auto, tcp, shm
    /// or rdma (see [`crate::onesided`]).
    pub transport: TransportKind,
}

impl WorkerConfig {
    /// Defaults for a scheduler at `scheduler`.
    pub fn new(scheduler: SocketAddr) -> Self {
        WorkerConfig {
            scheduler,
            tcp: TcpConfig::default(),
            rank: None,
            spin_us: 100,
            register_timeout: Duration::from_secs(120),
            timeout: Duration::from_secs(600),
            consistency: Consistency::Eventual,
            transport: TransportKind::Tcp,
        }
    }
}

/// Options of one task (MISSION P5, P6).
#[derive(Clone, Debug, Default)]
pub struct TaskOpts {
    /// Start only after these earlier tasks of this worker have finished
    /// (execute-after-finished dependencies).
    pub after: Vec<Timestamp>,
    /// The consistency model of this task (default: the worker's).
    pub consistency: Option<Consistency>,
    /// Update function id for pushes (0: the server's default).
    pub func: u16,
}

/// A shared, typed buffer that requests send from without copying.
///
/// Made from a `Vec<T>` (moved in), an `Arc<Vec<T>>` (shared), or a slice (copied once).
pub struct Shared<T> {
    buf: Arc<dyn AsBytes>,
    _t: PhantomData<T>,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            buf: self.buf.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: bytemuck::Pod + Send + Sync> Shared<T> {
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        bytemuck::cast_slice(self.buf.as_bytes())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.buf.as_bytes().len() / std::mem::size_of::<T>()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn payload(&self, elems: std::ops::Range<usize>) -> Payload {
        let sz = std::mem::size_of::<T>();
        Payload::shared(self.buf.clone(), elems.start * sz..elems.end * sz)
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<Vec<T>> for Shared<T> {
    fn from(v: Vec<T>) -> Self {
        Shared {
            buf: Arc::new(v),
            _t: PhantomData,
        }
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<Arc<Vec<T>>> for Shared<T> {
    fn from(v: Arc<Vec<T>>) -> Self {
        Shared {
            buf: v,
            _t: PhantomData,
        }
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<&[T]> for Shared<T> {
    fn from(v: &[T]) -> Self {
        Shared::from(v.to_vec())
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<&Vec<T>> for Shared<T> {
    fn from(v: &Vec<T>) -> Self {
        Shared::from(v.clone())
    }
}

/// Values returned by a pull: one segment per answering server, each still in the buffer
/// it was received into (no copy until you ask for one). A server that owns several
/// ranges answers for all of its keys in one segment, so segments are in server order,
/// not necessarily in key order: [`copy_to`](Self::copy_to) puts values back in key order.
pub struct Pulled<T> {
    /// Each answer with the runs of the request's keys it holds, in its order.
    parts: Vec<Answer>,
    _t: PhantomData<T>,
}

impl<T: Value> Pulled<T> {
    /// The segments, one per answer (see the type's doc for their order).
    pub fn segments(&self) -> impl Iterator<Item = &[T]> {
        self.parts
            .iter()
            .map(|(p, _)| p.frame().values_as::<T>().expect("checked when received"))
    }

    /// The values as one slice in key order, when they came in one piece.
    pub fn as_slice(&self) -> Option<&[T]> {
        match self.parts.as_slice() {
            [] => Some(&[]),
            [(_, runs)] if runs.len() <= 1 => self.segments().next(),
            _ => None,
        }
    }

    /// The smallest worker clock the servers had reached on these keys when they
    /// answered (0 for unclocked pulls): how stale the values may be.
    pub fn server_clock(&self) -> u64 {
        self.parts
            .iter()
            .map(|(p, _)| p.header().clock)
            .min()
            .unwrap_or(0)
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.segments().map(<[T]>::len).sum()
    }

    /// Whether no value was pulled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy the values into `out` in key order (which must have exactly
    /// [`len`](Self::len) elements).
    ///
    /// # Panics
    /// If `out` has the wrong length.
    pub fn copy_to(&self, out: &mut [T]) {
        assert_eq!(
            out.len(),
            self.len(),
            "pull destination has the wrong length"
        );
        for ((frame, runs), seg) in self.parts.iter().zip(self.segments()) {
            let keys: usize = runs.iter().map(|r| r.len()).sum();
            if keys == 0 {
                continue;
            }
            let vl = seg.len() / keys;
            let mut at = 0;
            for r in runs {
                let n = r.len() * vl;
                out[r.start * vl..r.start * vl + n].copy_from_slice(&seg[at..at + n]);
                at += n;
            }
            debug_assert_eq!(
                at,
                seg.len(),
                "answer {} sized for its runs",
                frame.header().timestamp
            );
        }
    }

    /// The values in one new vector, in key order.
    pub fn to_vec(&self) -> Vec<T> {
        let mut v = vec![T::default(); self.len()];
        self.copy_to(&mut v);
        v
    }
}

/// One server's answer to a task, with the runs of the request's keys it holds.
type Answer = (OwnedFrame, Vec<std::ops::Range<usize>>);

/// What a task expects from one server.
struct Segment {
    server: u32,
    /// Values expected (pulls), in elements.
    values: usize,
    answered: bool,
    part: Option<OwnedFrame>,
    /// Where this segment's keys sit in the request's key order (index ranges, in the
    /// order its answer holds them).
    runs: Vec<std::ops::Range<usize>>,
}

struct TaskState {
    segments: Vec<Segment>,
    error: Option<EngineError>,
    waiter: Option<Thread>,
    /// Whether answers carry values to keep.
    keeps_values: bool,
    /// Element type tag expected in answers.
    dtype: u8,
}

struct Task {
    remaining: AtomicUsize,
    state: Mutex<TaskState>,
}

impl Task {
    fn done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }
}

/// The gate and the requests it holds back, under one lock (a task found ready by
/// `finish` on a loop thread must find its frames already parked).
struct GateState {
    gate: Gate,
    /// Frames of submitted tasks that may not start yet.
    deferred: HashMap<Timestamp, Vec<(u32, OutFrame)>>,
    /// The next task's timestamp (allocated under this lock, so submissions are in order).
    next_ts: Timestamp,
}

/// State shared between the application threads and the event loops.
struct Core {
    tasks: Mutex<HashMap<Timestamp, Arc<Task>>>,
    control: Sender<Control>,
    gate: Mutex<GateState>,
    servers: std::sync::OnceLock<Vec<Conn>>,
}

impl Core {
    /// Record one server's part of a task; returns the task when it is now complete.
    fn settle(&self, ts: Timestamp, server: u32, settle: impl FnOnce(&mut TaskState, usize)) {
        let Some(task) = self.tasks.lock().get(&ts).cloned() else {
            tracing::warn!(server, ts, "answer for an unknown task; dropped");
            return;
        };
        let mut st = task.state.lock();
        let Some(seg) = st
            .segments
            .iter()
            .position(|s| s.server == server && !s.answered)
        else {
            tracing::warn!(server, ts, "duplicate or unexpected answer; dropped");
            return;
        };
        st.segments[seg].answered = true;
        settle(&mut st, seg);
        let left = task.remaining.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 {
            if let Some(t) = st.waiter.take() {
                t.unpark();
            } else if !st.keeps_values && st.error.is_none() {
                // A push nobody waits for yet: forget it, so un-waited pushes do not pile
                // up. `wait` on it later finds it gone and below `next_ts`: done, no error.
                drop(st);
                self.tasks.lock().remove(&ts);
            }
            self.task_done(ts);
        }
    }

    /// Task `ts` finished: tell the gate and start what it releases.
    fn task_done(&self, ts: Timestamp) {
        let mut start = Vec::new();
        {
            let mut g = self.gate.lock();
            let mut finished = vec![ts];
            while let Some(t) = finished.pop() {
                for ready in g.gate.finish(t) {
                    let frames = g.deferred.remove(&ready).unwrap_or_default();
                    if frames.is_empty() {
                        // Nothing to send (empty or refused before sending): done at once.
                        finished.push(ready);
                    } else {
                        start.push((ready, frames));
                    }
                }
            }
        }
        for (t, frames) in start {
            for (server, frame) in frames {
                self.send(t, server, frame);
            }
        }
    }

    fn send(&self, ts: Timestamp, server: u32, frame: OutFrame) {
        let conn = self.servers.get().and_then(|s| s.get(server as usize));
        let result = match conn {
            Some(c) => c.send(frame).map_err(|e| e.to_string()),
            None => Err("no connection".to_string()),
        };
        if let Err(e) = result {
            tracing::debug!(server, error = %e, "send failed");
            self.settle(ts, server, |st, _| {
                st.error.get_or_insert(EngineError::Disconnected { server });
            });
        }
    }

    /// Fail every segment still waiting on `server`.
    fn server_lost(&self, server: u32) {
        let pending: Vec<(Timestamp, Arc<Task>)> = self
            .tasks
            .lock()
            .iter()
            .map(|(ts, t)| (*ts, t.clone()))
            .collect();
        for (ts, task) in pending {
            let waiting = task
                .state
                .lock()
                .segments
                .iter()
                .any(|s| s.server == server && !s.answered);
            if waiting {
                self.settle(ts, server, |st, _| {
                    st.error.get_or_insert(EngineError::Disconnected { server });
                });
            }
        }
    }
}

struct WorkerHandler {
    core: Arc<Core>,
}

impl Handler for WorkerHandler {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        let f = frame.frame();
        let h = *f.header();
        if conn.tag() == SCHEDULER_TAG {
            match Control::from_frame(&f) {
                Ok(msg) => {
                    let _ = self.core.control.send(msg);
                }
                Err(e) => tracing::warn!(error = %e, "bad control message from the scheduler"),
            }
            return;
        }
        let Some(server) = conn.tag().checked_sub(1) else {
            tracing::warn!(peer = %conn.peer_addr(), "frame from an unknown peer; closing it");
            conn.close();
            return;
        };
        if h.kind == MessageKind::Control as u8 {
            // Window grants and refusals (one-sided setup) go to the caller waiting for them.
            match Control::from_frame(&f) {
                Ok(msg) => {
                    let _ = self.core.control.send(msg);
                }
                Err(e) => tracing::warn!(server, error = %e, "bad control message from a server"),
            }
            return;
        }
        let server = server as u32;
        let value_bytes = f.values().len();
        let error_text = (h.status != Status::Ok as u8)
            .then(|| String::from_utf8_lossy(f.values()).into_owned());
        self.core.settle(h.timestamp, server, |st, seg| {
            if let Some(message) = error_text {
                st.error.get_or_insert(EngineError::Server {
                    server,
                    status: Status::from_u8(h.status),
                    message,
                });
                return;
            }
            if !st.keeps_values {
                return;
            }
            let want = st.segments[seg].values;
            let elem = pserv_transport::DType::from_u8(st.dtype).map_or(1, |d| d.size());
            if h.dtype != st.dtype || value_bytes != want * elem {
                st.error.get_or_insert(EngineError::Server {
                    server,
                    status: Status::BadRequest,
                    message: format!(
                        "answer holds {value_bytes} value bytes of type {}, expected {want} values of type {}",
                        h.dtype, st.dtype
                    ),
                });
                return;
            }
            st.segments[seg].part = Some(frame.into_owned());
        });
    }

    fn on_close(&mut self, conn: &Conn, reason: &CloseReason) {
        match conn.tag() {
            SCHEDULER_TAG => {
                tracing::debug!(%reason, "scheduler connection closed");
                let _ = self.core.control.send(Control::Shutdown);
            }
            0 => {}
            t => self.core.server_lost((t - 1) as u32),
        }
    }
}

/// A worker node: the handle training code pushes and pulls through.
pub struct Worker {
    core: Arc<Core>,
    node_id: u32,
    rank: u32,
    cluster: ClusterInfo,
    servers: Vec<Conn>,
    scheduler: Conn,
    control: Receiver<Control>,
    clock: AtomicU64,
    consistency: Consistency,
    barrier_seq: AtomicU64,
    spin: Duration,
    timeout: Duration,
    transport: TcpTransport,
    onesided: Option<ClientOneSided>,
}

impl Worker {
    /// Register with the scheduler, wait for the cluster table, connect to every server.
    pub fn connect(cfg: WorkerConfig) -> Result<Worker, EngineError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let core = Arc::new(Core {
            tasks: Mutex::new(HashMap::new()),
            control: tx,
            gate: Mutex::new(GateState {
                gate: Gate::new(),
                deferred: HashMap::new(),
                next_ts: 1,
            }),
            servers: std::sync::OnceLock::new(),
        });
        let transport =
            TcpTransport::start(cfg.tcp.clone(), |_| WorkerHandler { core: core.clone() })?;
        let scheduler = transport.connect(cfg.scheduler, Duration::from_secs(10))?;
        scheduler.set_tag(SCHEDULER_TAG);
        scheduler.send(
            Control::Register {
                role: Role::Worker,
                addr: None,
                rank: cfg.rank,
                pid: std::process::id(),
            }
            .to_frame(0),
        )?;
        let (node_id, rank, cluster) = match rx.recv_timeout(cfg.register_timeout) {
            Ok(Control::Welcome {
                node_id,
                rank,
                cluster,
            }) => (node_id, rank, cluster),
            Ok(Control::Refused { reason }) => return Err(EngineError::Registration(reason)),
            Ok(Control::Shutdown) => return Err(EngineError::SchedulerGone),
            Ok(other) => {
                return Err(EngineError::Registration(format!(
                    "unexpected answer {other:?}"
                )))
            }
            Err(_) => {
                return Err(EngineError::Registration(format!(
                    "no cluster table from the scheduler at {} within {:?}",
                    cfg.scheduler, cfg.register_timeout
                )))
            }
        };
        transport.repin(node_id as usize);
        let mut servers = Vec::with_capacity(cluster.servers.len());
        for s in &cluster.servers {
            let conn = transport.connect(s.addr, Duration::from_secs(10))?;
            conn.set_tag(u64::from(s.rank) + 1);
            servers.push(conn);
        }
        tracing::debug!(node_id, rank, servers = servers.len(), "worker connected");
        let _ = core.servers.set(servers.clone());
        let onesided = match ClientOneSided::new(cfg.transport) {
            Ok(o) => o,
            Err(e) if cfg.transport == TransportKind::Auto => {
                tracing::info!(error = %e, "transport auto: no one-sided backend, using tcp");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Worker {
            core,
            node_id,
            rank,
            cluster,
            servers,
            scheduler,
            control: rx,
            clock: AtomicU64::new(0),
            consistency: cfg.consistency,
            barrier_seq: AtomicU64::new(0),
            spin: Duration::from_micros(cfg.spin_us),
            timeout: cfg.timeout,
            transport,
            onesided,
        })
    }

    /// This worker's rank among workers.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// This worker's node id.
    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    /// The cluster table.
    pub fn cluster(&self) -> &ClusterInfo {
        &self.cluster
    }

    /// Number of workers in the cluster.
    pub fn num_workers(&self) -> u32 {
        self.cluster.workers
    }

    /// Values per key.
    pub fn value_len(&self) -> usize {
        self.cluster.value_len as usize
    }

    /// Bytes written to and read from sockets so far.
    pub fn traffic(&self) -> (u64, u64) {
        let s = self.transport.stats();
        (
            s.bytes_sent.load(Ordering::Relaxed),
            s.bytes_received.load(Ordering::Relaxed),
        )
    }

    /// Push `values` (`keys.len() * value_len` of them) for sorted, distinct `keys`; the
    /// servers apply their update function. Returns at once.
    pub fn push<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
    ) -> Timestamp {
        self.push_opts(keys, values, &TaskOpts::default())
    }

    /// [`push`](Self::push) with an explicit update function id (0: the server default).
    pub fn push_with<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
        func: u16,
    ) -> Timestamp {
        self.push_opts(
            keys,
            values,
            &TaskOpts {
                func,
                ..TaskOpts::default()
            },
        )
    }

    /// [`push`](Self::push) with task options (dependencies, consistency, function).
    pub fn push_opts<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        self.keyed::<T>(MessageKind::Push, keys.into(), Some(values.into()), opts)
    }

    /// Pull the values of sorted, distinct `keys`. Returns at once; collect the values with
    /// [`wait_pull`](Self::wait_pull). Keys never pushed read as zero.
    pub fn pull<T: Value>(&self, keys: impl Into<Shared<Key>>) -> Timestamp {
        self.pull_opts::<T>(keys, &TaskOpts::default())
    }

    /// [`pull`](Self::pull) with task options.
    pub fn pull_opts<T: Value>(&self, keys: impl Into<Shared<Key>>, opts: &TaskOpts) -> Timestamp {
        self.keyed::<T>(MessageKind::Pull, keys.into(), None, opts)
    }

    /// Push, then pull the updated values of the same keys, in one round trip per server.
    pub fn push_pull<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
    ) -> Timestamp {
        self.push_pull_opts(keys, values, &TaskOpts::default())
    }

    /// [`push_pull`](Self::push_pull) with task options.
    pub fn push_pull_opts<T: Value>(
        &self,
        keys: impl Into<Shared<Key>>,
        values: impl Into<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        self.keyed::<T>(
            MessageKind::PushPull,
            keys.into(),
            Some(values.into()),
            opts,
        )
    }

    /// Push dense values for every key of `range` (`range.len() * value_len` values).
    pub fn push_range<T: Value>(&self, range: KeyRange, values: impl Into<Shared<T>>) -> Timestamp {
        self.push_range_opts(range, values, &TaskOpts::default())
    }

    /// [`push_range`](Self::push_range) with task options.
    pub fn push_range_opts<T: Value>(
        &self,
        range: KeyRange,
        values: impl Into<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        self.ranged::<T>(MessageKind::Push, range, Some(values.into()), opts)
    }

    /// Pull the dense values of every key of `range`.
    pub fn pull_range<T: Value>(&self, range: KeyRange) -> Timestamp {
        self.pull_range_opts::<T>(range, &TaskOpts::default())
    }

    /// [`pull_range`](Self::pull_range) with task options.
    pub fn pull_range_opts<T: Value>(&self, range: KeyRange, opts: &TaskOpts) -> Timestamp {
        self.ranged::<T>(MessageKind::Pull, range, None, opts)
    }

    /// Push dense values for `range`, then pull the updated values.
    pub fn push_pull_range<T: Value>(
        &self,
        range: KeyRange,
        values: impl Into<Shared<T>>,
    ) -> Timestamp {
        self.ranged::<T>(
            MessageKind::PushPull,
            range,
            Some(values.into()),
            &TaskOpts::default(),
        )
    }

    /// Attach the servers' one-sided windows covering `range` (each server's part of it
    /// becomes its window; one window per server). Returns, per server part, whether it
    /// is one-sided and why: a server that runs over TCP only, or a backend the two ends
    /// do not share, leaves that part on TCP (logged). With `--transport tcp` nothing is
    /// attached. Call it once, before pushing and pulling the range, on every worker
    /// that wants the one-sided path.
    pub fn open_window(&self, range: KeyRange) -> Result<Vec<(u32, bool, String)>, EngineError> {
        let mut out = Vec::new();
        let Some(os) = &self.onesided else {
            return Ok(self
                .cluster
                .partition
                .split_range(range)
                .into_iter()
                .map(|(s, _)| (s as u32, false, "transport tcp".to_owned()))
                .collect());
        };
        let host = crate::onesided::host_id();
        for (server, piece) in self.cluster.partition.split_range(range) {
            let server = server as u32;
            let (pending, endpoint) = os.backend.prepare()?;
            let msg = Control::OpenWindow {
                range: piece,
                host: host.clone(),
                offers: vec![(os.backend.kind() as u8, endpoint)],
            };
            self.servers[server as usize].send(msg.to_frame(self.node_id))?;
            let answer = self
                .control
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| {
                    EngineError::Timeout(format!(
                        "server {server} did not answer the window request"
                    ))
                })?;
            match answer {
                Control::WindowGranted { grant } => {
                    os.attach(server, pending, &grant)?;
                    tracing::info!(
                        server,
                        range = %piece,
                        backend = %os.backend.kind(),
                        reason = %grant.reason,
                        "one-sided window attached"
                    );
                    out.push((
                        server,
                        true,
                        format!("{}: {}", os.backend.kind(), grant.reason),
                    ));
                }
                Control::WindowRefused { reason } => {
                    tracing::info!(server, range = %piece, %reason, "no one-sided window; this part stays on tcp");
                    out.push((server, false, reason));
                }
                other => {
                    return Err(EngineError::InvalidRequest(format!(
                        "unexpected answer to a window request: {other:?}"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The oldest clock a pull with these options may reflect (0: any).
    fn pull_min_clock(&self, opts: &TaskOpts) -> u64 {
        let clock = self.clock();
        if clock == 0 {
            0
        } else {
            opts.consistency
                .unwrap_or(self.consistency)
                .min_clock(clock)
        }
    }

    /// Pull the dense values of `range` straight into `out` (`range.len() * value_len`
    /// values) and return when they are there. Parts inside attached one-sided windows
    /// ([`open_window`](Self::open_window)) are one-sided reads of the servers' memory
    /// (after waiting, one-sidedly, for the servers' clock when the pull is clocked);
    /// other parts go over TCP.
    pub fn pull_range_into<T: Value>(
        &self,
        range: KeyRange,
        out: &mut [T],
        opts: &TaskOpts,
    ) -> Result<(), EngineError> {
        self.check_types::<T>()?;
        let vl = self.value_len();
        if out.len() as u64 != range.len() * vl as u64 {
            return Err(EngineError::InvalidRequest(format!(
                "{} values for {} keys x {vl}",
                out.len(),
                range.len()
            )));
        }
        let mut at = 0usize;
        for (server, piece) in self.cluster.partition.split_range(range) {
            let n = piece.len() as usize * vl;
            let dst = &mut out[at..at + n];
            at += n;
            let win = self
                .onesided
                .as_ref()
                .and_then(|os| os.window_for(server as u32, &piece).map(|w| (os, w)));
            match win {
                Some((os, w)) => {
                    os.wait_clock(&w, self.pull_min_clock(opts), self.timeout)?;
                    os.read(&w, piece, bytemuck::cast_slice_mut(dst))?;
                }
                None => {
                    let p = self.wait_pull::<T>(self.pull_range_opts::<T>(piece, opts))?;
                    p.copy_to(dst);
                }
            }
        }
        Ok(())
    }

    /// Push dense values for `range` and return once the servers applied them. Parts
    /// inside attached one-sided windows go as one-sided writes into the worker's
    /// landing areas plus a notification, when the push is unclocked (this worker never
    /// ticked); clocked pushes and other parts go over TCP.
    pub fn push_range_now<T: Value>(
        &self,
        range: KeyRange,
        values: &[T],
        opts: &TaskOpts,
    ) -> Result<(), EngineError> {
        self.check_types::<T>()?;
        let vl = self.value_len();
        if values.len() as u64 != range.len() * vl as u64 {
            return Err(EngineError::InvalidRequest(format!(
                "{} values for {} keys x {vl}",
                values.len(),
                range.len()
            )));
        }
        let mut at = 0usize;
        let mut tcp = Vec::new();
        for (server, piece) in self.cluster.partition.split_range(range) {
            let n = piece.len() as usize * vl;
            let src = &values[at..at + n];
            at += n;
            let win = self
                .onesided
                .as_ref()
                .filter(|_| self.clock() == 0 && opts.after.is_empty())
                .and_then(|os| os.window_for(server as u32, &piece).map(|w| (os, w)));
            match win {
                Some((os, w)) => os.push(
                    &w,
                    piece,
                    opts.func,
                    bytemuck::cast_slice(src),
                    self.timeout,
                )?,
                None => tcp.push(self.push_range_opts::<T>(piece, src.to_vec(), opts)),
            }
        }
        for ts in tcp {
            self.wait(ts)?;
        }
        Ok(())
    }

    /// Advance this worker's consistency clock by one and return it (the first call
    /// returns 1). Once a worker ticks, its pushes carry its clock to every server, and
    /// its pulls wait on the servers until every worker's clock has reached
    /// `clock - tau - 1` (the task's consistency model decides tau): bounded delay across
    /// workers (MISSION P6). A clocked worker should push once per tick.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// This worker's consistency clock (0: never ticked, requests carry no clock).
    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Acquire)
    }

    /// Allocate the next timestamp, record the task, and start it now or park it until
    /// the gate lets it start. `build` makes the task's segments and frames for the
    /// timestamp, or refuses the request (the task then fails at once, without sending).
    fn launch(
        &self,
        kind: MessageKind,
        dtype: u8,
        opts: &TaskOpts,
        build: impl FnOnce(Timestamp) -> Result<(Vec<Segment>, Vec<(u32, OutFrame)>), EngineError>,
    ) -> Timestamp {
        let model = opts.consistency.unwrap_or(self.consistency);
        let (ts, start) = {
            let mut g = self.core.gate.lock();
            let ts = g.next_ts;
            g.next_ts += 1;
            let bad_dep = opts.after.iter().find(|&&d| d == 0 || d >= ts);
            let built = match bad_dep {
                Some(d) => Err(EngineError::InvalidRequest(format!(
                    "task {ts} cannot wait for task {d}: dependencies must be earlier tasks"
                ))),
                None => build(ts),
            };
            let (segments, frames, error) = match built {
                Ok((segments, frames)) => (segments, frames, None),
                Err(e) => (Vec::new(), Vec::new(), Some(e)),
            };
            let deps: &[Timestamp] = if error.is_some() { &[] } else { &opts.after };
            let task = Arc::new(Task {
                remaining: AtomicUsize::new(segments.len()),
                state: Mutex::new(TaskState {
                    segments,
                    error,
                    waiter: None,
                    keeps_values: kind != MessageKind::Push,
                    dtype,
                }),
            });
            self.core.tasks.lock().insert(ts, task);
            if g.gate.submit(ts, model, deps) {
                (ts, Some(frames))
            } else {
                g.deferred.insert(ts, frames);
                (ts, None)
            }
        };
        match start {
            Some(frames) if frames.is_empty() => self.core.task_done(ts),
            Some(frames) => {
                for (server, frame) in frames {
                    self.core.send(ts, server, frame);
                }
            }
            None => {}
        }
        ts
    }

    fn check_types<T: Value>(&self) -> Result<(), EngineError> {
        if T::DTYPE != self.cluster.value_type.dtype() {
            return Err(EngineError::InvalidRequest(format!(
                "values of type {:?}, but the cluster stores {:?}",
                T::DTYPE,
                self.cluster.value_type
            )));
        }
        Ok(())
    }

    /// The header of a request of task `ts`, with its consistency clock and flags.
    fn header<T: Value>(&self, kind: MessageKind, ts: Timestamp, opts: &TaskOpts) -> Header {
        let mut h = Header::new(kind, self.node_id, ts);
        h.dtype = T::DTYPE as u8;
        h.value_len = self.value_len() as u32;
        h.func = opts.func;
        // The routing table this request was split with: a server at another epoch
        // refuses it (StaleEpoch) instead of serving keys it may no longer own.
        h.epoch = u32::try_from(self.cluster.partition.epoch()).unwrap_or(u32::MAX);
        let clock = self.clock();
        if clock > 0 {
            let model = opts.consistency.unwrap_or(self.consistency);
            if kind == MessageKind::Pull {
                h.clock = model.min_clock(clock);
            } else {
                h.clock = clock;
                if model == Consistency::Sequential {
                    h.flags |= FLAG_ORDERED;
                }
            }
        }
        h
    }

    /// Whether a request of this kind advances this worker's clock on the servers (then
    /// it goes to every server, with an empty key list where it has no keys).
    fn clocked_write(&self, kind: MessageKind) -> bool {
        self.clock() > 0 && kind != MessageKind::Pull
    }

    fn keyed<T: Value>(
        &self,
        kind: MessageKind,
        keys: Shared<Key>,
        values: Option<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        let vlen = self.value_len();
        self.launch(kind, T::DTYPE as u8, opts, |ts| {
            let k = keys.as_slice();
            self.check_types::<T>()?;
            if let Some(i) = k.windows(2).position(|w| w[0] >= w[1]) {
                return Err(EngineError::InvalidRequest(format!(
                    "keys must be sorted and distinct: keys[{i}] = {} then {}",
                    k[i],
                    k[i + 1]
                )));
            }
            if k.last() == Some(&crate::keys::KEY_END) {
                return Err(EngineError::InvalidRequest(
                    "key u64::MAX is outside the key space".into(),
                ));
            }
            if let Some(v) = &values {
                if v.len() != k.len() * vlen {
                    return Err(EngineError::InvalidRequest(format!(
                        "{} values for {} keys x {vlen} values per key",
                        v.len(),
                        k.len()
                    )));
                }
            }
            // Runs of keys by owner; one message per server (a server owning several
            // runs gets them gathered into one key list, scattered back on answer).
            let mut groups: std::collections::BTreeMap<usize, Vec<std::ops::Range<usize>>> =
                std::collections::BTreeMap::new();
            for (server, run) in self.cluster.partition.split_keys(k) {
                groups.entry(server).or_default().push(run);
            }
            if self.clocked_write(kind) {
                // Every server learns this worker's clock, even where it has no keys.
                for s in 0..self.servers.len() {
                    groups.entry(s).or_default();
                }
            }
            let mut segments = Vec::with_capacity(groups.len());
            let mut frames = Vec::with_capacity(groups.len());
            for (server, runs) in groups {
                let n: usize = runs.iter().map(|r| r.len()).sum();
                let (kp, vals) = if runs.len() <= 1 {
                    let idx = runs.first().cloned().unwrap_or(0..0);
                    let vals = match &values {
                        Some(v) => v.payload(idx.start * vlen..idx.end * vlen),
                        None => Payload::empty(),
                    };
                    (keys.payload(idx), vals)
                } else {
                    let ks: Vec<Key> = runs
                        .iter()
                        .flat_map(|r| k[r.clone()].iter().copied())
                        .collect();
                    let vals = match &values {
                        Some(v) => {
                            let v = v.as_slice();
                            let vs: Vec<T> = runs
                                .iter()
                                .flat_map(|r| v[r.start * vlen..r.end * vlen].iter().copied())
                                .collect();
                            Shared::from(vs).payload(0..n * vlen)
                        }
                        None => Payload::empty(),
                    };
                    (Shared::from(ks).payload(0..n), vals)
                };
                segments.push(Segment {
                    server: server as u32,
                    values: n * vlen,
                    answered: false,
                    part: None,
                    runs,
                });
                let h = self.header::<T>(kind, ts, opts);
                frames.push((server as u32, OutFrame::new(h, kp, vals)));
            }
            Ok((segments, frames))
        })
    }

    fn ranged<T: Value>(
        &self,
        kind: MessageKind,
        range: KeyRange,
        values: Option<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        let vlen = self.value_len() as u64;
        self.launch(kind, T::DTYPE as u8, opts, |ts| {
            self.check_types::<T>()?;
            if let Some(v) = &values {
                if Some(v.len() as u64) != range.len().checked_mul(vlen) {
                    return Err(EngineError::InvalidRequest(format!(
                        "{} values for a range of {} keys x {vlen} values per key",
                        v.len(),
                        range.len()
                    )));
                }
            }
            let mut parts: Vec<(usize, Option<KeyRange>)> = self
                .cluster
                .partition
                .split_range(range)
                .into_iter()
                .map(|(s, r)| (s, Some(r)))
                .collect();
            if self.clocked_write(kind) {
                let have: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
                parts.extend(
                    (0..self.servers.len())
                        .filter(|s| !have.contains(s))
                        .map(|s| (s, None)),
                );
                parts.sort_by_key(|(s, _)| *s);
            }
            let mut segments = Vec::with_capacity(parts.len());
            let mut frames = Vec::with_capacity(parts.len());
            for (server, part) in parts {
                let n = part.map_or(0, |p| p.len());
                let runs = match part {
                    Some(p) => {
                        let at = (p.begin - range.begin) as usize;
                        std::iter::once(at..at + p.len() as usize).collect()
                    }
                    None => Vec::new(),
                };
                segments.push(Segment {
                    server: server as u32,
                    values: (n * vlen) as usize,
                    answered: false,
                    part: None,
                    runs,
                });
                let mut h = self.header::<T>(kind, ts, opts);
                let frame = match part {
                    Some(part) => {
                        h.flags |= FLAG_RANGE;
                        let vals = match &values {
                            Some(v) => {
                                let from = ((part.begin - range.begin) * vlen) as usize;
                                v.payload(from..from + (part.len() * vlen) as usize)
                            }
                            None => Payload::empty(),
                        };
                        OutFrame::new(h, Payload::owned(vec![part.begin, part.end]), vals)
                    }
                    // A clock-only message: no keys, no values.
                    None => OutFrame::new(h, Payload::empty(), Payload::empty()),
                };
                frames.push((server as u32, frame));
            }
            Ok((segments, frames))
        })
    }

    /// Block until task `ts` is complete; return its error if it failed. Values of a pull
    /// waited on this way are dropped.
    pub fn wait(&self, ts: Timestamp) -> Result<(), EngineError> {
        self.collect(ts).map(|_| ())
    }

    /// Block until pull (or push-pull) `ts` is complete and take its values.
    pub fn wait_pull<T: Value>(&self, ts: Timestamp) -> Result<Pulled<T>, EngineError> {
        let parts = self.collect(ts)?;
        Ok(Pulled {
            parts,
            _t: PhantomData,
        })
    }

    fn collect(&self, ts: Timestamp) -> Result<Vec<Answer>, EngineError> {
        let Some(task) = self.core.tasks.lock().get(&ts).cloned() else {
            // Successful pushes are forgotten when they complete un-waited.
            return if ts < self.core.gate.lock().next_ts {
                Ok(Vec::new())
            } else {
                Err(EngineError::UnknownTimestamp(ts))
            };
        };
        if !task.done() {
            let start = Instant::now();
            // Spin, but yield between checks: on a small machine the thread that will
            // answer may be waiting for this very core.
            while !task.done() && start.elapsed() < self.spin {
                std::hint::spin_loop();
                std::thread::yield_now();
            }
            if !task.done() {
                task.state.lock().waiter = Some(std::thread::current());
                let deadline = start + self.timeout;
                while !task.done() {
                    let now = Instant::now();
                    if now >= deadline {
                        task.state.lock().waiter = None;
                        return Err(EngineError::Timeout(format!(
                            "task {ts} not answered within {:?}",
                            self.timeout
                        )));
                    }
                    std::thread::park_timeout(deadline - now);
                }
            }
        }
        self.core.tasks.lock().remove(&ts);
        let mut st = task.state.lock();
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        Ok(st
            .segments
            .iter_mut()
            .filter_map(|s| s.part.take().map(|p| (p, std::mem::take(&mut s.runs))))
            .collect())
    }

    /// Wait until every worker has called `barrier` as often as this one.
    pub fn barrier(&self) -> Result<(), EngineError> {
        let seq = self.barrier_seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.scheduler
            .send(Control::Barrier { seq }.to_frame(self.node_id))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.control.recv_deadline(deadline) {
                Ok(Control::BarrierDone { seq: s }) if s == seq => return Ok(()),
                Ok(Control::Shutdown) => return Err(EngineError::SchedulerGone),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(EngineError::Timeout(format!(
                        "barrier {seq} not released within {:?}",
                        self.timeout
                    )))
                }
                Err(_) => return Err(EngineError::SchedulerGone),
                Ok(other) => tracing::debug!(?other, "control message while in a barrier"),
            }
        }
    }

    /// Send a control message to the scheduler (progress, log lines, summaries).
    pub fn tell_scheduler(&self, msg: Control) -> Result<(), EngineError> {
        Ok(self.scheduler.send(msg.to_frame(self.node_id))?)
    }

    /// Report that this worker is done and disconnect. Does not wait for the other
    /// workers (the scheduler ends the job when the last one is done).
    pub fn finish(self, examples: u64) -> Result<(), EngineError> {
        self.finish_with(examples, 0.0, 0.0)
    }

    /// [`finish`](Self::finish), reporting the seconds spent training and, of those, the
    /// seconds spent blocked on pulls.
    pub fn finish_with(
        self,
        examples: u64,
        seconds: f64,
        blocked_seconds: f64,
    ) -> Result<(), EngineError> {
        let (bytes_sent, bytes_received) = self.traffic();
        self.tell_scheduler(Control::Done {
            stats: WorkerStats {
                examples,
                bytes_sent,
                bytes_received,
                seconds,
                blocked_seconds,
            },
        })?;
        // Let the report leave before the sockets close.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.scheduler.queued_bytes() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.transport.shutdown();
        Ok(())
    }
}
