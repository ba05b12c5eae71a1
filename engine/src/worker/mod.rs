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
//! - The routing table can change (a server failed, joined or left): the scheduler sends
//!   a newer one ([`Worker::table`]). A message lost with its server, or refused as routed
//!   with another table (`StaleEpoch`, `NotOwner`), is resent: its keys are split again
//!   by the newest table (servers apply a resent push once). A message that finds no
//!   taker within the worker's `timeout` since it first failed fails its task.
//!
//! Waiting spins for `spin_us` before it parks the thread: an answer on loopback usually
//! arrives within tens of microseconds, and waking a parked thread costs about 25 us on
//! these machines. Set `spin_us` to 0 on oversubscribed hosts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, MutexGuard, RwLock};

use pserv_transport::wire::{Header, MessageKind, FLAG_ORDERED, FLAG_RANGE};
use pserv_transport::{
    AsBytes, CloseReason, Conn, Handler, OutFrame, OwnedFrame, Payload, RecvFrame, TcpConfig,
    TcpTransport,
};

use crate::base::error::EngineError;
use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;
use crate::consistency::{Consistency, Gate};
use crate::onesided::{ClientOneSided, TransportKind};
use crate::placement::Partition;
use crate::proto::{
    request_timestamp, segment_of, task_of, ClusterInfo, Control, Role, Status, WorkerStats,
    MAX_SEGMENTS,
};

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
    /// When the scheduler's connection closes before it said the job is over, try this
    /// long to reach a restarted scheduler (`pserv scheduler --recover`) before giving up.
    pub scheduler_grace: Duration,
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
            scheduler_grace: Duration::from_secs(10),
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
/// not necessarily in key order (and parts resent after a routing change come last):
/// [`copy_to`](Self::copy_to) puts values back in key order.
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
type Answer = (OwnedFrame, Vec<Range<usize>>);

/// How often the retry thread looks at segments waiting for a delayed resend.
const RETRY_TICK: Duration = Duration::from_millis(2);
/// The first delay before resending a request a server refused as stale while this
/// worker has no newer table (the server may be the one behind); it doubles with each
/// attempt, up to [`RETRY_MAX_DELAY`].
const RETRY_DELAY: Duration = Duration::from_millis(3);
/// The longest delay between resends of a request refused as stale.
const RETRY_MAX_DELAY: Duration = Duration::from_millis(200);

/// Why a segment failed: kept to end its task with a clear error if no resend succeeds
/// within the worker's timeout.
#[derive(Clone, Debug)]
enum Failure {
    /// The server's connection closed, or a send to it failed.
    Disconnected {
        /// Rank of the server.
        server: u32,
    },
    /// The server answered with an error status.
    Refused {
        /// Rank of the server.
        server: u32,
        /// The status.
        status: Status,
        /// The server's text.
        message: String,
    },
}

impl Failure {
    fn error(&self) -> EngineError {
        match self {
            Failure::Disconnected { server } => EngineError::Disconnected { server: *server },
            Failure::Refused {
                server,
                status,
                message,
            } => EngineError::Server {
                server: *server,
                status: *status,
                message: message.clone(),
            },
        }
    }

    /// Whether it is worth resending after a delay under the same table.
    fn stale(&self) -> bool {
        matches!(
            self,
            Failure::Refused {
                status: Status::StaleEpoch,
                ..
            }
        )
    }
}

/// Where a segment stands.
#[derive(Debug)]
enum SegState {
    /// Sent (or about to be); its answer is expected.
    Sent,
    /// Failed retryably; waits for a resend under a newer table (or, when refused as
    /// stale, after `resend_at`).
    Waiting {
        /// The last failure.
        failure: Failure,
        /// When to resend even without a newer table.
        resend_at: Option<Instant>,
    },
    /// Answered, failed for good, or replaced by resent segments.
    Done,
}

/// One message of a task: what it expects from one server.
struct Segment {
    server: u32,
    /// Values expected (pulls), in elements.
    values: usize,
    state: SegState,
    part: Option<OwnedFrame>,
    /// Where this segment's keys sit in the request's key order (index ranges, in the
    /// order its answer holds them; for ranges, offsets from the range's begin). A
    /// replaced segment has none.
    runs: Vec<Range<usize>>,
    /// The epoch of the routing table it was split with.
    epoch: u64,
    /// When the first segment it descends from failed (resent segments inherit it).
    failed_at: Option<Instant>,
    /// How many times its keys were resent before it.
    attempt: u32,
    /// The segment of the task's first split its keys come from (servers recognise a
    /// resent piece of a push by it).
    origin: usize,
}

/// The keys of a request.
enum RequestKeys {
    /// A sorted key list.
    List(Shared<Key>),
    /// A dense range (runs are offsets from its begin).
    Range(KeyRange),
}

/// The key and value payloads of the message holding some runs of a request's keys.
type Body = Box<dyn Fn(&[Range<usize>]) -> (Payload, Payload) + Send + Sync>;

/// A task's request, kept to build its messages: the first ones, and those that resend a
/// failed segment's keys under a newer routing table (same message, new epoch, new
/// segment index).
struct Request {
    keys: RequestKeys,
    /// Kind, sender, dtype, value length, function, clock and flags; the timestamp and
    /// epoch are set per message.
    header: Header,
    /// Values per key.
    vlen: usize,
    /// Whether it goes to every server (an empty message where it has no keys) to carry
    /// the worker's clock.
    clocked: bool,
    body: Body,
}

impl Request {
    /// A request for sorted `keys` (values from `values`, gathered per message).
    fn keyed<T: Value>(
        header: Header,
        vlen: usize,
        clocked: bool,
        keys: Shared<Key>,
        values: Option<Shared<T>>,
    ) -> Request {
        let ks = keys.clone();
        let body = move |runs: &[Range<usize>]| -> (Payload, Payload) {
            if runs.len() <= 1 {
                let idx = runs.first().cloned().unwrap_or(0..0);
                let vals = match &values {
                    Some(v) => v.payload(idx.start * vlen..idx.end * vlen),
                    None => Payload::empty(),
                };
                return (ks.payload(idx), vals);
            }
            // A server owning several runs gets them gathered into one key list,
            // scattered back on answer.
            let k = ks.as_slice();
            let n: usize = runs.iter().map(|r| r.len()).sum();
            let gathered: Vec<Key> = runs
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
            (Shared::from(gathered).payload(0..n), vals)
        };
        Request {
            keys: RequestKeys::List(keys),
            header,
            vlen,
            clocked,
            body: Box::new(body),
        }
    }

    /// A request for every key of `range` (dense values from `values`).
    fn ranged<T: Value>(
        header: Header,
        vlen: usize,
        clocked: bool,
        range: KeyRange,
        values: Option<Shared<T>>,
    ) -> Request {
        let body = move |runs: &[Range<usize>]| -> (Payload, Payload) {
            let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
                // A clock-only message: no keys, no values.
                return (Payload::empty(), Payload::empty());
            };
            debug_assert!(
                runs.windows(2).all(|w| w[0].end == w[1].start),
                "a range message holds one run"
            );
            let (from, to) = (first.start, last.end);
            let vals = match &values {
                Some(v) => v.payload(from * vlen..to * vlen),
                None => Payload::empty(),
            };
            let keys = vec![range.begin + from as u64, range.begin + to as u64];
            (Payload::owned(keys), vals)
        };
        Request {
            keys: RequestKeys::Range(range),
            header,
            vlen,
            clocked,
            body: Box::new(body),
        }
    }

    /// All of the request's keys as runs.
    fn all(&self) -> Vec<Range<usize>> {
        let n = match &self.keys {
            RequestKeys::List(k) => k.len(),
            RequestKeys::Range(r) => r.len() as usize,
        };
        if n == 0 {
            Vec::new()
        } else {
            std::iter::once(0..n).collect()
        }
    }

    /// Split the keys at `runs` by `table`: per message, its server and runs.
    fn split(&self, table: &Partition, runs: &[Range<usize>]) -> Vec<(u32, Vec<Range<usize>>)> {
        match &self.keys {
            RequestKeys::List(k) => split_key_runs(table, k.as_slice(), runs),
            RequestKeys::Range(r) => split_range_runs(table, *r, runs),
        }
    }

    /// The first messages: every key split by `table`, plus, for clocked requests, an
    /// empty message to each server of `clock_to` that gets no keys. A range request's
    /// messages carry one range each, and a server may get several: each moves the
    /// worker's clock only on what it writes, so every server of `clock_to` gets a
    /// closing empty message, which moves it on the rest.
    fn first_plan(&self, table: &Partition, clock_to: &[u32]) -> Vec<(u32, Vec<Range<usize>>)> {
        let mut plan = self.split(table, &self.all());
        if self.clocked {
            let ranged = matches!(self.keys, RequestKeys::Range(_));
            for &s in clock_to {
                if ranged || !plan.iter().any(|(p, _)| *p == s) {
                    plan.push((s, Vec::new()));
                }
            }
            // Stable: a server's several range messages stay in key order.
            plan.sort_by_key(|(s, _)| *s);
        }
        plan
    }

    /// Segment `index` of task `ts`: the keys at `runs` to `server`, routed by a table
    /// of epoch `epoch`.
    fn message(
        &self,
        epoch: u64,
        ts: Timestamp,
        (index, origin): (usize, usize),
        server: u32,
        runs: Vec<Range<usize>>,
    ) -> (Segment, OutFrame) {
        let mut h = self.header;
        h.timestamp = request_timestamp(ts, index, origin);
        // The routing table this request was split with: a server at another epoch
        // refuses it (StaleEpoch) instead of serving keys it may no longer own.
        h.epoch = u32::try_from(epoch).unwrap_or(u32::MAX);
        if matches!(self.keys, RequestKeys::Range(_)) && !runs.is_empty() {
            h.flags |= FLAG_RANGE;
        }
        let (keys, values) = (self.body)(&runs);
        let n: usize = runs.iter().map(|r| r.len()).sum();
        let seg = Segment {
            server,
            values: n * self.vlen,
            state: SegState::Sent,
            part: None,
            runs,
            epoch,
            failed_at: None,
            attempt: 0,
            origin,
        };
        (seg, OutFrame::new(h, keys, values))
    }

    /// The segments and frames of a plan, numbered from segment `first`.
    fn messages(
        &self,
        table: &Partition,
        ts: Timestamp,
        first: usize,
        plan: Vec<(u32, Vec<Range<usize>>)>,
    ) -> (Vec<Segment>, Vec<(u32, OutFrame)>) {
        let mut segments = Vec::with_capacity(plan.len());
        let mut frames = Vec::with_capacity(plan.len());
        for (i, (server, runs)) in plan.into_iter().enumerate() {
            let (seg, frame) =
                self.message(table.epoch(), ts, (first + i, first + i), server, runs);
            segments.push(seg);
            frames.push((server, frame));
        }
        (segments, frames)
    }
}

/// Split the keys at `runs` (index ranges into the sorted `keys`) by `table`: one entry
/// per server, in server order, with its runs in key order (adjacent ones merged).
fn split_key_runs(
    table: &Partition,
    keys: &[Key],
    runs: &[Range<usize>],
) -> Vec<(u32, Vec<Range<usize>>)> {
    let mut groups: BTreeMap<u32, Vec<Range<usize>>> = BTreeMap::new();
    for run in runs {
        for (server, r) in table.split_keys(&keys[run.clone()]) {
            let r = run.start + r.start..run.start + r.end;
            let g = groups.entry(server as u32).or_default();
            match g.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => g.push(r),
            }
        }
    }
    groups.into_iter().collect()
}

/// Split the keys at `runs` (offsets from `range.begin`) by `table`: one entry per part
/// with one owner, in key order, each with its one run.
fn split_range_runs(
    table: &Partition,
    range: KeyRange,
    runs: &[Range<usize>],
) -> Vec<(u32, Vec<Range<usize>>)> {
    let mut out = Vec::new();
    for run in runs {
        let piece = KeyRange::new(range.begin + run.start as u64, range.begin + run.end as u64);
        for (server, p) in table.split_range(piece) {
            let at = (p.begin - range.begin) as usize;
            out.push((
                server as u32,
                std::iter::once(at..at + p.len() as usize).collect(),
            ));
        }
    }
    out
}

/// The [`Control::Completed`] notice a finished task calls for: it was a sequential
/// clocked push and some of its keys were resent (a segment whose index is not its
/// origin's), so the servers learnt its clock only where the resent pieces wrote.
fn completed_notice(st: &TaskState) -> Option<(Control, u32)> {
    let req = st.request.as_ref()?;
    let h = &req.header;
    let sequential_push =
        h.kind == MessageKind::Push as u8 && h.clock > 0 && h.flags & FLAG_ORDERED != 0;
    let resent = st.segments.iter().enumerate().any(|(i, s)| i != s.origin);
    (sequential_push && resent && st.error.is_none())
        .then_some((Control::Completed { clock: h.clock }, h.sender))
}

/// Whether `server` holds any range of `table` (as head or replica).
fn in_table(table: &Partition, server: u32) -> bool {
    table.owners().contains(&server) || table.followers().iter().any(|f| f.contains(&server))
}

/// What one look at a task's waiting segments decided.
#[derive(Default)]
struct Resend {
    /// Segments added (resends).
    added: usize,
    /// Segments settled (replaced, dropped or given up).
    closed: usize,
    /// The resends' frames, by server.
    sends: Vec<(u32, OutFrame)>,
    /// Whether some segment still waits.
    waiting: bool,
}

struct TaskState {
    segments: Vec<Segment>,
    error: Option<EngineError>,
    waiter: Option<Thread>,
    /// Whether answers carry values to keep.
    keeps_values: bool,
    /// Element type tag expected in answers.
    dtype: u8,
    /// The request, to resend failed segments (None: refused before sending).
    request: Option<Arc<Request>>,
    /// Whether the consistency gate let it start (before that, its messages are parked
    /// unsent, and nothing of it may be resent).
    started: bool,
}

impl TaskState {
    /// Segment `seg` failed retryably at `now`: let it wait for a resend.
    fn park(&mut self, seg: usize, failure: Failure, now: Instant) {
        let s = &mut self.segments[seg];
        let resend_at = failure.stale().then(|| {
            let backoff = RETRY_DELAY
                .saturating_mul(1 << s.attempt.min(16))
                .min(RETRY_MAX_DELAY);
            now + backoff
        });
        s.failed_at.get_or_insert(now);
        s.state = SegState::Waiting { failure, resend_at };
    }

    /// Resend the waiting segments that are due under `table` (a newer table than they
    /// were routed with, or a stale refusal's delay passed), give up on those waiting for
    /// `timeout` since they first failed, and drop keyless ones whose server is gone
    /// (`alive` says whose connection is open).
    fn resend_due(
        &mut self,
        ts: Timestamp,
        table: &Partition,
        now: Instant,
        timeout: Duration,
        alive: &dyn Fn(u32) -> bool,
    ) -> Resend {
        let mut out = Resend::default();
        let Some(req) = self.request.clone().filter(|_| self.started) else {
            return out;
        };
        for i in 0..self.segments.len() {
            let seg = &self.segments[i];
            let SegState::Waiting { failure, resend_at } = &seg.state else {
                continue;
            };
            let since = seg.failed_at.unwrap_or(now);
            let keyless = seg.runs.is_empty();
            if keyless && !(alive(seg.server) && in_table(table, seg.server)) {
                // A clock-only message to a server that is gone: nothing to resend.
                self.segments[i].state = SegState::Done;
                out.closed += 1;
                continue;
            }
            let give_up = |st: &mut TaskState, out: &mut Resend, failure: Failure| {
                st.error.get_or_insert(failure.error());
                st.segments[i].state = SegState::Done;
                st.segments[i].runs.clear();
                out.closed += 1;
            };
            if now.saturating_duration_since(since) >= timeout {
                let failure = failure.clone();
                tracing::warn!(
                    ts,
                    segment = i,
                    ?failure,
                    "no resend succeeded in time; task fails"
                );
                give_up(self, &mut out, failure);
                continue;
            }
            let due = table.epoch() > seg.epoch || resend_at.is_some_and(|t| now >= t);
            if !due {
                out.waiting = true;
                continue;
            }
            let plan = if keyless {
                vec![(seg.server, Vec::new())]
            } else {
                req.split(table, &seg.runs)
            };
            if self.segments.len() + plan.len() > MAX_SEGMENTS {
                let failure = failure.clone();
                give_up(self, &mut out, failure);
                continue;
            }
            let attempt = seg.attempt + 1;
            let origin = seg.origin;
            tracing::debug!(
                ts,
                segment = i,
                server = seg.server,
                epoch = table.epoch(),
                messages = plan.len(),
                "resending a failed segment"
            );
            let seg = &mut self.segments[i];
            seg.state = SegState::Done;
            seg.runs.clear();
            seg.part = None;
            for (server, runs) in plan {
                let index = self.segments.len();
                let (mut s, frame) = req.message(table.epoch(), ts, (index, origin), server, runs);
                s.failed_at = Some(since);
                s.attempt = attempt;
                self.segments.push(s);
                out.sends.push((server, frame));
                out.added += 1;
            }
            out.closed += 1;
        }
        out
    }

    /// The answered segments' values with their runs (replaced segments hold none).
    fn take_answers(&mut self) -> Vec<Answer> {
        self.segments
            .iter_mut()
            .filter_map(|s| s.part.take().map(|p| (p, std::mem::take(&mut s.runs))))
            .collect()
    }

    /// The failure of a segment still waiting for a resend, if any.
    fn waiting_failure(&self) -> Option<&Failure> {
        self.segments.iter().find_map(|s| match &s.state {
            SegState::Waiting { failure, .. } => Some(failure),
            _ => None,
        })
    }
}

struct Task {
    /// Segments not yet settled (sent or waiting for a resend).
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
    /// Frames of submitted tasks that may not start yet, with the routing table epoch
    /// they were split with.
    deferred: HashMap<Timestamp, (u64, Vec<(u32, OutFrame)>)>,
    /// The next task's timestamp (allocated under this lock, so submissions are in order).
    next_ts: Timestamp,
}

/// What an answer (or a failure) does to its segment.
enum Outcome {
    /// The segment is settled.
    Done,
    /// The segment failed retryably: resend it when possible.
    Retry(Failure),
}

/// State shared between the application threads, the event loops and the retry thread.
struct Core {
    tasks: Mutex<HashMap<Timestamp, Arc<Task>>>,
    control: Sender<Control>,
    gate: Mutex<GateState>,
    /// Connections to the servers, by rank (none to one that could not be reached).
    servers: RwLock<Vec<Option<Conn>>>,
    /// Opens connections to servers that join.
    connector: std::sync::OnceLock<pserv_transport::Connector>,
    /// The scheduler connection (replaced when a restarted scheduler comes back).
    sched: Mutex<Option<Conn>>,
    /// Where the scheduler is, who this worker is (rank, node id), and how long to look
    /// for a restarted scheduler.
    sched_info: std::sync::OnceLock<(SocketAddr, u32, u32, Duration)>,
    /// Barriers passed (a restarted scheduler learns it).
    barriers_passed: AtomicU64,
    /// The job is over (the scheduler said so): a closed scheduler connection is expected.
    over: AtomicBool,
    /// The routing table requests are split by (None until the welcome; replaced by
    /// newer tables from the scheduler).
    table: RwLock<Option<Arc<Partition>>>,
    /// Tasks with segments waiting for a resend.
    retrying: Mutex<HashSet<Timestamp>>,
    /// Wakes the retry thread.
    wake: Sender<()>,
    /// Tells the retry thread to stop.
    stop: AtomicBool,
    /// How long a failed segment may wait for a successful resend.
    timeout: Duration,
}

impl Core {
    fn new(control: Sender<Control>, wake: Sender<()>, timeout: Duration) -> Core {
        Core {
            tasks: Mutex::new(HashMap::new()),
            control,
            gate: Mutex::new(GateState {
                gate: Gate::new(),
                deferred: HashMap::new(),
                next_ts: 1,
            }),
            servers: RwLock::new(Vec::new()),
            connector: std::sync::OnceLock::new(),
            sched: Mutex::new(None),
            sched_info: std::sync::OnceLock::new(),
            barriers_passed: AtomicU64::new(0),
            over: AtomicBool::new(false),
            table: RwLock::new(None),
            retrying: Mutex::new(HashSet::new()),
            wake,
            stop: AtomicBool::new(false),
            timeout,
        }
    }

    /// The current routing table.
    ///
    /// # Panics
    /// Before the welcome's table is installed (a `Worker` always has one).
    fn table(&self) -> Arc<Partition> {
        self.table
            .read()
            .clone()
            .expect("the routing table is installed before the worker is used")
    }

    /// Install `table` if it is newer than the current one; returns whether it did.
    fn install(&self, table: Partition) -> bool {
        let mut t = self.table.write();
        if t.as_ref().is_some_and(|cur| cur.epoch() >= table.epoch()) {
            return false;
        }
        *t = Some(Arc::new(table));
        true
    }

    fn wake(&self) {
        let _ = self.wake.send(());
    }

    /// Send to the scheduler (over the current connection).
    fn to_scheduler(&self, msg: &Control, sender: u32) -> Result<(), EngineError> {
        let conn = self
            .sched
            .lock()
            .clone()
            .ok_or(EngineError::SchedulerGone)?;
        Ok(conn.send(msg.to_frame(sender))?)
    }

    /// The scheduler's connection closed before the job was over: look for a restarted
    /// scheduler for the grace period (on a thread of its own), report this worker to it
    /// and let a barrier in progress ask again; else stop as before.
    fn scheduler_lost(self: &Arc<Self>) {
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        let (Some(connector), Some(&(addr, rank, node_id, grace))) =
            (self.connector.get().cloned(), self.sched_info.get())
        else {
            let _ = self.control.send(Control::Shutdown);
            return;
        };
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pserv-rejoin".into())
            .spawn(move || {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline && !core.stop.load(Ordering::Relaxed) {
                    if let Ok(conn) = connector.connect(addr, Duration::from_millis(200)) {
                        conn.set_tag(SCHEDULER_TAG);
                        let rejoin = Control::Rejoin {
                            role: Role::Worker,
                            rank,
                            node_id,
                            addr: None,
                            pid: std::process::id(),
                            table: core.table().as_ref().clone(),
                            barriers: core.barriers_passed.load(Ordering::Acquire),
                        };
                        if conn.send(rejoin.to_frame(node_id)).is_ok() {
                            tracing::info!(scheduler = %addr, "reconnected to a restarted scheduler");
                            *core.sched.lock() = Some(conn);
                            let _ = core.control.send(Control::SchedulerBack);
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                tracing::warn!(scheduler = %addr, "the scheduler did not come back; stopping");
                let _ = core.control.send(Control::Shutdown);
            });
        if spawned.is_err() {
            let _ = self.control.send(Control::Shutdown);
        }
    }

    /// Connect (on a thread of its own: connecting blocks) to the servers not connected
    /// yet, then wake the resends waiting for them.
    fn connect_new(self: &Arc<Self>, servers: Vec<crate::proto::ServerInfo>) {
        let Some(connector) = self.connector.get().cloned() else {
            return;
        };
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pserv-connect".into())
            .spawn(move || {
                for s in servers {
                    let have = core
                        .servers
                        .read()
                        .get(s.rank as usize)
                        .is_some_and(Option::is_some);
                    if have {
                        continue;
                    }
                    match connector.connect(s.addr, Duration::from_secs(5)) {
                        Ok(conn) => {
                            conn.set_tag(u64::from(s.rank) + 1);
                            let mut v = core.servers.write();
                            if v.len() <= s.rank as usize {
                                v.resize(s.rank as usize + 1, None);
                            }
                            v[s.rank as usize] = Some(conn);
                            tracing::info!(server = s.rank, addr = %s.addr, "connected to a server that joined");
                        }
                        Err(e) => tracing::warn!(server = s.rank, error = %e, "cannot reach a server"),
                    }
                }
                core.wake();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to connect to new servers");
        }
    }

    /// Whether the connection to `server` is open.
    fn alive(&self, server: u32) -> bool {
        self.servers
            .read()
            .get(server as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| !c.is_closed())
    }

    /// Record the answer (or failure) of the segment a request's `stamp` names, sent to
    /// `server`.
    fn settle(
        &self,
        stamp: u64,
        server: u32,
        settle: impl FnOnce(&mut TaskState, usize) -> Outcome,
    ) {
        let (ts, seg) = (task_of(stamp), segment_of(stamp));
        let Some(task) = self.tasks.lock().get(&ts).cloned() else {
            tracing::warn!(server, ts, "answer for an unknown task; dropped");
            return;
        };
        let mut st = task.state.lock();
        let expected = st
            .segments
            .get(seg)
            .is_some_and(|s| s.server == server && matches!(s.state, SegState::Sent));
        if !expected {
            tracing::warn!(server, ts, seg, "duplicate or unexpected answer; dropped");
            return;
        }
        match settle(&mut st, seg) {
            Outcome::Done => {
                st.segments[seg].state = SegState::Done;
                self.count_off(ts, &task, st, 1);
            }
            Outcome::Retry(failure) => {
                tracing::debug!(server, ts, seg, ?failure, "segment failed; will resend");
                st.park(seg, failure, Instant::now());
                drop(st);
                self.retrying.lock().insert(ts);
                self.wake();
            }
        }
    }

    /// `n` segments of task `ts` were settled (under its lock `st`): count them off, and
    /// finish the task when none is left.
    fn count_off(&self, ts: Timestamp, task: &Task, mut st: MutexGuard<'_, TaskState>, n: usize) {
        if n == 0 {
            return;
        }
        let left = task.remaining.fetch_sub(n, Ordering::AcqRel) - n;
        if left > 0 {
            return;
        }
        let notice = completed_notice(&st);
        let forget = match st.waiter.take() {
            Some(t) => {
                t.unpark();
                false
            }
            // A push nobody waits for yet: forget it, so un-waited pushes do not pile
            // up. `wait` on it later finds it gone and below `next_ts`: done, no error.
            None => !st.keeps_values && st.error.is_none(),
        };
        drop(st);
        if forget {
            self.tasks.lock().remove(&ts);
        }
        if let Some((notice, sender)) = notice {
            let table = self.table();
            let conns: Vec<Conn> = self
                .servers
                .read()
                .iter()
                .enumerate()
                .filter(|(s, _)| in_table(&table, *s as u32))
                .filter_map(|(_, c)| c.clone())
                .collect();
            for c in conns {
                // A server that is gone needs no notice.
                let _ = c.send(notice.to_frame(sender));
            }
        }
        self.task_done(ts);
    }

    /// Task `ts` finished: tell the gate and start what it releases.
    fn task_done(&self, ts: Timestamp) {
        let mut start = Vec::new();
        {
            let mut g = self.gate.lock();
            let mut finished = vec![ts];
            while let Some(t) = finished.pop() {
                for ready in g.gate.finish(t) {
                    let (epoch, frames) = g.deferred.remove(&ready).unwrap_or_default();
                    if frames.is_empty() {
                        // Nothing to send (empty or refused before sending): done at once.
                        finished.push(ready);
                    } else {
                        start.push((ready, epoch, frames));
                    }
                }
            }
        }
        for (t, epoch, frames) in start {
            if let Some(task) = self.tasks.lock().get(&t).cloned() {
                task.state.lock().started = true;
            }
            if epoch != self.table().epoch() {
                // Split with a table replaced while the task waited: resplit it now
                // rather than have the servers refuse it.
                self.requeue(t);
                continue;
            }
            for (server, frame) in frames {
                self.send(server, frame);
            }
        }
    }

    /// Let every unsent segment of task `ts` wait for a resend under the current table.
    fn requeue(&self, ts: Timestamp) {
        let Some(task) = self.tasks.lock().get(&ts).cloned() else {
            return;
        };
        let mut st = task.state.lock();
        let now = Instant::now();
        for i in 0..st.segments.len() {
            if matches!(st.segments[i].state, SegState::Sent) {
                let server = st.segments[i].server;
                let failure = Failure::Refused {
                    server,
                    status: Status::StaleEpoch,
                    message: "not sent: the routing table changed while the task waited to start"
                        .into(),
                };
                st.park(i, failure, now);
            }
        }
        drop(st);
        self.retrying.lock().insert(ts);
        self.wake();
    }

    /// Send a request to `server`; a failed send fails its segment retryably.
    fn send(&self, server: u32, frame: OutFrame) {
        let stamp = frame.header().timestamp;
        let conn = self
            .servers
            .read()
            .get(server as usize)
            .and_then(Option::clone);
        let Some(conn) = conn else {
            // A server that joined and is not connected yet: try again shortly.
            tracing::debug!(server, "no connection to this server yet");
            self.settle(stamp, server, |_, _| {
                Outcome::Retry(Failure::Refused {
                    server,
                    status: Status::StaleEpoch,
                    message: "not connected to this server yet".into(),
                })
            });
            return;
        };
        let result = conn.send(frame).map_err(|e| e.to_string());
        if let Err(e) = result {
            tracing::debug!(server, error = %e, "send failed");
            self.settle(stamp, server, |_, _| {
                Outcome::Retry(Failure::Disconnected { server })
            });
        }
    }

    /// Every segment still waiting on `server` fails retryably.
    fn server_lost(&self, server: u32) {
        let pending: Vec<(Timestamp, Arc<Task>)> = self
            .tasks
            .lock()
            .iter()
            .map(|(ts, t)| (*ts, t.clone()))
            .collect();
        let now = Instant::now();
        let mut any = false;
        for (ts, task) in pending {
            let mut st = task.state.lock();
            if !st.started {
                // Parked by the gate: its messages go out (and fail, if the server is
                // gone) when it starts.
                continue;
            }
            let mut hit = false;
            for i in 0..st.segments.len() {
                let s = &st.segments[i];
                if s.server == server && matches!(s.state, SegState::Sent) {
                    st.park(i, Failure::Disconnected { server }, now);
                    hit = true;
                }
            }
            drop(st);
            if hit {
                self.retrying.lock().insert(ts);
                any = true;
            }
        }
        if any {
            tracing::info!(
                server,
                "server connection lost; its requests wait for a resend"
            );
            self.wake();
        }
    }

    /// Resend what is due of every task with waiting segments.
    fn retry_pass(&self) {
        let list: Vec<Timestamp> = self.retrying.lock().iter().copied().collect();
        if list.is_empty() {
            return;
        }
        let table = self.table();
        let now = Instant::now();
        for ts in list {
            let Some(task) = self.tasks.lock().get(&ts).cloned() else {
                self.retrying.lock().remove(&ts);
                continue;
            };
            let mut st = task.state.lock();
            let r = st.resend_due(ts, &table, now, self.timeout, &|s| self.alive(s));
            if !r.waiting {
                self.retrying.lock().remove(&ts);
            }
            // New segments first, so the task cannot complete before they are answered.
            task.remaining.fetch_add(r.added, Ordering::AcqRel);
            self.count_off(ts, &task, st, r.closed);
            for (server, frame) in r.sends {
                self.send(server, frame);
            }
        }
    }
}

/// The thread that resends failed segments: woken when a segment fails or a new table
/// arrives, and every [`RETRY_TICK`] while segments wait. Stopped when dropped.
struct Retrier {
    core: Arc<Core>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Retrier {
    fn start(core: Arc<Core>, wake: Receiver<()>) -> Result<Retrier, EngineError> {
        let c = core.clone();
        let thread = std::thread::Builder::new()
            .name("pserv-retry".into())
            .spawn(move || loop {
                let wait = if c.retrying.lock().is_empty() {
                    Duration::from_millis(100)
                } else {
                    RETRY_TICK
                };
                if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) =
                    wake.recv_timeout(wait)
                {
                    return;
                }
                while wake.try_recv().is_ok() {}
                if c.stop.load(Ordering::Acquire) {
                    return;
                }
                c.retry_pass();
            })
            .map_err(|source| EngineError::Io {
                context: "starting the worker's retry thread".into(),
                source,
            })?;
        Ok(Retrier {
            core,
            thread: Some(thread),
        })
    }
}

impl Drop for Retrier {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::Release);
        self.core.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
                Ok(Control::Servers { servers }) => self.core.connect_new(servers),
                Ok(Control::Shutdown) => {
                    self.core.over.store(true, Ordering::Release);
                    let _ = self.core.control.send(Control::Shutdown);
                }
                Ok(Control::Table { partition }) => {
                    let epoch = partition.epoch();
                    if self.core.install(partition) {
                        tracing::info!(epoch, "new routing table installed");
                        self.core.wake();
                    } else {
                        tracing::debug!(epoch, "routing table not newer than ours; ignored");
                    }
                }
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
            // A server's redirect carries its routing table; window grants and refusals
            // (one-sided setup) go to the caller waiting for them.
            match Control::from_frame(&f) {
                Ok(Control::Table { partition }) => {
                    let epoch = partition.epoch();
                    if self.core.install(partition) {
                        tracing::info!(epoch, server, "newer routing table learnt from a server");
                        self.core.wake();
                    }
                }
                Ok(msg) => {
                    let _ = self.core.control.send(msg);
                }
                Err(e) => tracing::warn!(server, error = %e, "bad control message from a server"),
            }
            return;
        }
        let server = server as u32;
        let value_bytes = f.values().len();
        let status = Status::from_u8(h.status);
        let error_text = (h.status != Status::Ok as u8)
            .then(|| String::from_utf8_lossy(f.values()).into_owned());
        self.core.settle(h.timestamp, server, |st, seg| {
            if let Some(message) = error_text {
                let failure = Failure::Refused {
                    server,
                    status,
                    message,
                };
                if matches!(status, Status::StaleEpoch | Status::NotOwner) {
                    // Routed by a table the server does not share: resend by a newer one.
                    return Outcome::Retry(failure);
                }
                st.error.get_or_insert(failure.error());
                return Outcome::Done;
            }
            if !st.keeps_values {
                return Outcome::Done;
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
                return Outcome::Done;
            }
            st.segments[seg].part = Some(frame.into_owned());
            Outcome::Done
        });
    }

    fn on_close(&mut self, conn: &Conn, reason: &CloseReason) {
        match conn.tag() {
            SCHEDULER_TAG => {
                tracing::debug!(%reason, "scheduler connection closed");
                let current = self
                    .core
                    .sched
                    .lock()
                    .as_ref()
                    .is_some_and(|c| c.id() == conn.id());
                if self.core.over.load(Ordering::Acquire) {
                    let _ = self.core.control.send(Control::Shutdown);
                } else if current {
                    self.core.scheduler_lost();
                }
            }
            0 => {}
            t => self.core.server_lost((t - 1) as u32),
        }
    }
}

/// A worker node: the handle training code pushes and pulls through.
pub struct Worker {
    core: Arc<Core>,
    /// Resends failed segments; stops when the worker is dropped (before the transport,
    /// whose closing connections must not look like a failed scheduler).
    _retrier: Retrier,
    node_id: u32,
    rank: u32,
    cluster: ClusterInfo,
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
        let (wake_tx, wake_rx) = crossbeam_channel::unbounded();
        let core = Arc::new(Core::new(tx, wake_tx, cfg.timeout));
        let transport =
            TcpTransport::start(cfg.tcp.clone(), |_| WorkerHandler { core: core.clone() })?;
        let scheduler = transport.connect(cfg.scheduler, Duration::from_secs(10))?;
        scheduler.set_tag(SCHEDULER_TAG);
        *core.sched.lock() = Some(scheduler.clone());
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
        // A newer table may already have come (then the welcome's is not installed).
        core.install(cluster.partition.clone());
        transport.repin(node_id as usize);
        let _ = core.connector.set(transport.connector());
        let _ = core
            .sched_info
            .set((cfg.scheduler, rank, node_id, cfg.scheduler_grace));
        let mut servers: Vec<Option<Conn>> = Vec::with_capacity(cluster.servers.len());
        for s in &cluster.servers {
            if servers.len() <= s.rank as usize {
                servers.resize(s.rank as usize + 1, None);
            }
            match transport.connect(s.addr, Duration::from_secs(10)) {
                Ok(conn) => {
                    conn.set_tag(u64::from(s.rank) + 1);
                    servers[s.rank as usize] = Some(conn);
                }
                // A worker that joins late may find servers that failed since; the
                // routing table sends it nothing there.
                Err(e) if rank >= cluster.workers => {
                    tracing::warn!(server = s.rank, error = %e, "cannot reach a server")
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::debug!(node_id, rank, servers = servers.len(), "worker connected");
        *core.servers.write() = servers;
        let onesided = match ClientOneSided::new(cfg.transport) {
            Ok(o) => o,
            Err(e) if cfg.transport == TransportKind::Auto => {
                tracing::info!(error = %e, "transport auto: no one-sided backend, using tcp");
                None
            }
            Err(e) => return Err(e),
        };
        let retrier = Retrier::start(core.clone(), wake_rx)?;
        Ok(Worker {
            core,
            node_id,
            rank,
            cluster,
            control: rx,
            clock: AtomicU64::new(0),
            consistency: cfg.consistency,
            barrier_seq: AtomicU64::new(0),
            spin: Duration::from_micros(cfg.spin_us),
            timeout: cfg.timeout,
            transport,
            onesided,
            _retrier: retrier,
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

    /// The cluster table as the scheduler's welcome gave it (its `partition` is the
    /// first routing table; see [`table`](Self::table) for the current one).
    pub fn cluster(&self) -> &ClusterInfo {
        &self.cluster
    }

    /// The routing table requests are split by now: the welcome's, or a newer one the
    /// scheduler sent after a server failed, joined or left (requests routed with an
    /// older one are resent by this worker).
    pub fn table(&self) -> Arc<Partition> {
        self.core.table()
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
        let table = self.table();
        let Some(os) = &self.onesided else {
            return Ok(table
                .split_range(range)
                .into_iter()
                .map(|(s, _)| (s as u32, false, "transport tcp".to_owned()))
                .collect());
        };
        let host = crate::onesided::host_id();
        for (server, piece) in table.split_range(range) {
            let server = server as u32;
            let (pending, endpoint) = os.backend.prepare()?;
            let msg = Control::OpenWindow {
                range: piece,
                host: host.clone(),
                offers: vec![(os.backend.kind() as u8, endpoint)],
            };
            let conn = self
                .core
                .servers
                .read()
                .get(server as usize)
                .and_then(Option::clone)
                .ok_or(EngineError::Disconnected { server })?;
            conn.send(msg.to_frame(self.node_id))?;
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
        for (server, piece) in self.table().split_range(range) {
            let n = piece.len() as usize * vl;
            let dst = &mut out[at..at + n];
            at += n;
            let win = self
                .onesided
                .as_ref()
                .and_then(|os| os.window_for(server as u32, &piece).map(|w| (os, w)));
            if let Some((os, w)) = win {
                let one_sided = os
                    .wait_clock(&w, self.pull_min_clock(opts), self.timeout)
                    .and_then(|()| os.read(&w, piece, bytemuck::cast_slice_mut(dst)));
                match one_sided {
                    Ok(()) => continue,
                    // A broken path (a queue pair in error, a peer's NIC that stopped
                    // answering, a mapping that went away): the keys are still served over
                    // TCP, from the same window. Reads change nothing, so reading again
                    // is safe.
                    Err(e @ EngineError::OneSided(_)) => {
                        tracing::warn!(server, %piece, error = %e, "one-sided pull failed; this window goes over TCP from now on");
                        os.detach(server as u32);
                    }
                    Err(e) => return Err(e),
                }
            }
            let p = self.wait_pull::<T>(self.pull_range_opts::<T>(piece, opts))?;
            p.copy_to(dst);
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
        for (server, piece) in self.table().split_range(range) {
            let n = piece.len() as usize * vl;
            let src = &values[at..at + n];
            at += n;
            let win = self
                .onesided
                .as_ref()
                .filter(|_| self.clock() == 0 && opts.after.is_empty())
                .and_then(|os| os.window_for(server as u32, &piece).map(|w| (os, w)));
            if let Some((os, w)) = win {
                let pushed = os.push(
                    &w,
                    piece,
                    opts.func,
                    bytemuck::cast_slice(src),
                    self.timeout,
                );
                match pushed {
                    Ok(()) => continue,
                    // The path broke before any of this push reached the server: send it
                    // over TCP instead, and the window's keys from now on.
                    Err(f) if !f.notified && matches!(f.error, EngineError::OneSided(_)) => {
                        tracing::warn!(server, %piece, error = %f.error, "one-sided push failed before the server saw it; sent over TCP, and this window from now on");
                        os.detach(server as u32);
                    }
                    // It broke after the server may have applied part of it: sending it
                    // again could apply that part twice, so say so instead.
                    Err(f) if matches!(f.error, EngineError::OneSided(_)) => {
                        os.detach(server as u32);
                        return Err(EngineError::OneSided(format!(
                            "one-sided push of {piece} to server {server} failed after part of it \
                             was handed to the server, which may have applied that part (not \
                             resent, so nothing is applied twice; this window goes over TCP from \
                             now on): {}",
                            f.error
                        )));
                    }
                    Err(f) => return Err(f.error),
                }
            }
            tcp.push(self.push_range_opts::<T>(piece, src.to_vec(), opts));
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
    /// the gate lets it start. `build` makes the task's request, or refuses it (the task
    /// then fails at once, without sending); the request is split by the current routing
    /// table into one message per server.
    fn launch(
        &self,
        kind: MessageKind,
        dtype: u8,
        opts: &TaskOpts,
        build: impl FnOnce() -> Result<Request, EngineError>,
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
                None => build(),
            };
            // One table for the split and for the epoch of every message.
            let table = self.table();
            let (request, segments, frames, error) = match built {
                Ok(request) => {
                    let clock_to: Vec<u32> = if request.clocked {
                        (0..self.core.servers.read().len() as u32)
                            .filter(|&s| self.core.alive(s) && in_table(&table, s))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let plan = request.first_plan(&table, &clock_to);
                    let (segments, frames) = request.messages(&table, ts, 0, plan);
                    (Some(Arc::new(request)), segments, frames, None)
                }
                Err(e) => (None, Vec::new(), Vec::new(), Some(e)),
            };
            let deps: &[Timestamp] = if error.is_some() { &[] } else { &opts.after };
            // Under the gate lock: nothing can release it before it is recorded.
            let started = g.gate.submit(ts, model, deps);
            let task = Arc::new(Task {
                remaining: AtomicUsize::new(segments.len()),
                state: Mutex::new(TaskState {
                    segments,
                    error,
                    waiter: None,
                    keeps_values: kind != MessageKind::Push,
                    dtype,
                    request,
                    started,
                }),
            });
            self.core.tasks.lock().insert(ts, task);
            if started {
                (ts, Some(frames))
            } else {
                g.deferred.insert(ts, (table.epoch(), frames));
                (ts, None)
            }
        };
        match start {
            Some(frames) if frames.is_empty() => self.core.task_done(ts),
            Some(frames) => {
                for (server, frame) in frames {
                    self.core.send(server, frame);
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

    /// The header of a request, with its consistency clock and flags (the timestamp and
    /// the routing epoch are set per message, see [`Request::message`]).
    fn header<T: Value>(&self, kind: MessageKind, opts: &TaskOpts) -> Header {
        let mut h = Header::new(kind, self.node_id, 0);
        h.dtype = T::DTYPE as u8;
        h.value_len = self.value_len() as u32;
        h.func = opts.func;
        let clock = self.clock();
        if clock > 0 {
            let model = opts.consistency.unwrap_or(self.consistency);
            h.clock = if kind == MessageKind::Pull {
                model.min_clock(clock)
            } else {
                clock
            };
            // Sequential: pushes apply in (clock, rank) order, and any request says that
            // every earlier task of this worker finished (the servers move its clock).
            if model == Consistency::Sequential {
                h.flags |= FLAG_ORDERED;
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
        self.launch(kind, T::DTYPE as u8, opts, || {
            let k = keys.as_slice();
            self.check_types::<T>()?;
            if let Some(i) = k.windows(2).position(|w| w[0] >= w[1]) {
                return Err(EngineError::InvalidRequest(format!(
                    "keys must be sorted and distinct: keys[{i}] = {} then {}",
                    k[i],
                    k[i + 1]
                )));
            }
            if k.last() == Some(&crate::base::keys::KEY_END) {
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
            Ok(Request::keyed(
                self.header::<T>(kind, opts),
                vlen,
                self.clocked_write(kind),
                keys,
                values,
            ))
        })
    }

    fn ranged<T: Value>(
        &self,
        kind: MessageKind,
        range: KeyRange,
        values: Option<Shared<T>>,
        opts: &TaskOpts,
    ) -> Timestamp {
        let vlen = self.value_len();
        self.launch(kind, T::DTYPE as u8, opts, || {
            self.check_types::<T>()?;
            if let Some(v) = &values {
                if Some(v.len() as u64) != range.len().checked_mul(vlen as u64) {
                    return Err(EngineError::InvalidRequest(format!(
                        "{} values for a range of {} keys x {vlen} values per key",
                        v.len(),
                        range.len()
                    )));
                }
            }
            Ok(Request::ranged(
                self.header::<T>(kind, opts),
                vlen,
                self.clocked_write(kind),
                range,
                values,
            ))
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
                        let mut st = task.state.lock();
                        st.waiter = None;
                        // A segment still waiting for a resend: its failure says more.
                        if let Some(f) = st.waiting_failure() {
                            return Err(f.error());
                        }
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
        Ok(st.take_answers())
    }

    /// Wait until every worker has called `barrier` as often as this one.
    pub fn barrier(&self) -> Result<(), EngineError> {
        self.barrier_live().map(|_| ())
    }

    /// Whether this worker joined a running job (its rank is beyond the first workers').
    pub fn joined_late(&self) -> bool {
        self.rank >= self.cluster.workers
    }

    /// For a worker that joined a running job: wait for the next barrier the others
    /// reach and take part from there on. Returns that barrier's number and the ranks of
    /// the workers running.
    pub fn join_barrier(&self) -> Result<(u64, Vec<u32>), EngineError> {
        self.await_barrier(0)
    }

    /// [`barrier`](Self::barrier), returning the ranks of the workers still running
    /// (sorted; workers that left are missing): what a job needs to hand a departed
    /// worker's data to the others.
    pub fn barrier_live(&self) -> Result<Vec<u32>, EngineError> {
        let seq = self.barrier_seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.await_barrier(seq).map(|(_, live)| live)
    }

    /// Ask for barrier `seq` (0: the next one the others reach) and wait until it is
    /// released; a restarted scheduler is asked again. Returns the barrier's number and
    /// the live workers.
    fn await_barrier(&self, seq: u64) -> Result<(u64, Vec<u32>), EngineError> {
        if let Err(e) = self.tell_scheduler(Control::Barrier { seq }) {
            // The scheduler is gone: a restarted one gets it when this worker rejoins.
            tracing::debug!(error = %e, "barrier not sent; waiting for the scheduler");
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.control.recv_deadline(deadline) {
                Ok(Control::BarrierDone { seq: s, live }) if seq == 0 || s == seq => {
                    self.barrier_seq.store(s, Ordering::Relaxed);
                    self.core.barriers_passed.store(s, Ordering::Release);
                    return Ok((s, live));
                }
                Ok(Control::SchedulerBack) => {
                    let _ = self.tell_scheduler(Control::Barrier { seq });
                }
                Ok(Control::Shutdown) => return Err(EngineError::SchedulerGone),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(EngineError::Timeout(if seq == 0 {
                        format!("no barrier reached within {:?} of joining", self.timeout)
                    } else {
                        format!("barrier {seq} not released within {:?}", self.timeout)
                    }))
                }
                Err(_) => return Err(EngineError::SchedulerGone),
                Ok(other) => tracing::debug!(?other, "control message while in a barrier"),
            }
        }
    }

    /// Send a control message to the scheduler (progress, log lines, summaries).
    pub fn tell_scheduler(&self, msg: Control) -> Result<(), EngineError> {
        self.core.to_scheduler(&msg, self.node_id)
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
        self.core.over.store(true, Ordering::Release);
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
        while self
            .core
            .sched
            .lock()
            .as_ref()
            .is_some_and(|c| c.queued_bytes() > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.transport.shutdown();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ring::Ring;
    use crate::proto::TASK_BITS;
    use pserv_transport::wire::DType;
    use pserv_transport::{BufPool, Frame};

    /// Three servers, 8 virtual nodes each (epoch 1), and the table after server 1 left
    /// (epoch 2).
    fn tables() -> (Partition, Partition) {
        let ring = Ring::new(&[0, 1, 2], 8);
        let after = ring.remove_server(1);
        (
            Partition::from_ring_chains(&ring, 3, 0),
            Partition::from_ring_chains(&after, 3, 0),
        )
    }

    /// All of `n` keys as runs.
    fn req_all(n: usize) -> Vec<Range<usize>> {
        std::iter::once(0..n).collect()
    }

    /// Keys spread over the whole key space.
    fn spread(n: u64) -> Vec<Key> {
        (0..n).map(|i| i * (u64::MAX / n)).collect()
    }

    /// A received frame holding `values`, answering `request`.
    fn answer(request: &Header, values: &[f32]) -> OwnedFrame {
        let mut h = *request;
        h.flags = pserv_transport::wire::FLAG_RESPONSE;
        h.dtype = DType::F32 as u8;
        let bytes = pserv_transport::wire::encode(&h, &[], bytemuck::cast_slice(values));
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(&bytes);
        let (frame, _) = Frame::new_checked(bytemuck::cast_slice(&buf), 1 << 20).unwrap();
        let pool = BufPool::new(4);
        RecvFrame::Borrowed { frame, pool: &pool }.into_owned()
    }

    fn pull_header() -> Header {
        let mut h = Header::new(MessageKind::Pull, 7, 0);
        h.dtype = DType::F32 as u8;
        h.value_len = 1;
        h
    }

    fn task_state(request: Request, segments: Vec<Segment>) -> TaskState {
        TaskState {
            segments,
            error: None,
            waiter: None,
            keeps_values: true,
            dtype: DType::F32 as u8,
            request: Some(Arc::new(request)),
            started: true,
        }
    }

    /// Answer every sent segment of a pull of `keys` with the keys themselves as values.
    fn answer_all(st: &mut TaskState, keys: &[Key], headers: &HashMap<usize, Header>) {
        for (i, s) in st.segments.iter_mut().enumerate() {
            if matches!(s.state, SegState::Sent) {
                let vals: Vec<f32> = s
                    .runs
                    .iter()
                    .flat_map(|r| keys[r.clone()].iter().map(|&k| k as f32))
                    .collect();
                s.part = Some(answer(&headers[&i], &vals));
                s.state = SegState::Done;
            }
        }
    }

    #[test]
    fn request_timestamps_carry_task_and_segment() {
        for (ts, seg) in [
            (1u64, 0usize),
            (42, 3),
            ((1 << TASK_BITS) - 1, MAX_SEGMENTS - 1),
        ] {
            for origin in [0, seg.min(MAX_SEGMENTS - 2), MAX_SEGMENTS - 2] {
                let stamp = request_timestamp(ts, seg, origin);
                assert_eq!((task_of(stamp), segment_of(stamp)), (ts, seg));
                assert_eq!(crate::proto::origin_of(stamp), origin + 1);
                // The piece's identity does not depend on the segment it travels in.
                assert_eq!(
                    crate::proto::push_id(stamp),
                    crate::proto::push_id(request_timestamp(ts, 0, origin))
                );
            }
        }
        assert_ne!(
            crate::proto::push_id(request_timestamp(9, 0, 0)),
            crate::proto::push_id(request_timestamp(9, 0, 1))
        );
    }

    #[test]
    fn resplitting_failed_keys_covers_exactly_them_grouped_by_new_owner() {
        let (old, new) = tables();
        let keys = spread(500);
        let first = split_key_runs(&old, &keys, &req_all(keys.len()));
        assert_eq!(
            first.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let failed = first[1].1.clone();
        assert!(failed.len() > 1, "server 1 owns several runs: {failed:?}");
        let again = split_key_runs(&new, &keys, &failed);
        let servers: Vec<u32> = again.iter().map(|(s, _)| *s).collect();
        assert!(!servers.contains(&1), "{servers:?}");
        assert!(
            servers.windows(2).all(|w| w[0] < w[1]),
            "one group per server, in order"
        );
        let mut covered = Vec::new();
        for (server, runs) in &again {
            assert!(runs.windows(2).all(|w| w[0].end < w[1].start), "{runs:?}");
            for r in runs {
                assert!(new.owns_keys(*server as usize, &keys[r.clone()]));
                covered.extend(r.clone());
            }
        }
        covered.sort_unstable();
        let want: Vec<usize> = failed.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, want);
    }

    #[test]
    fn resplitting_a_failed_range_part_covers_exactly_it() {
        let (old, new) = tables();
        let range = KeyRange::new(1000, u64::MAX - 1000);
        let first = split_range_runs(&old, range, &req_all(range.len() as usize));
        let (_, failed) = first.iter().find(|(s, _)| *s == 1).unwrap().clone();
        assert_eq!(failed.len(), 1);
        let again = split_range_runs(&new, range, &failed);
        assert!(!again.is_empty());
        let mut at = failed[0].start;
        for (server, runs) in &again {
            assert_eq!(runs.len(), 1);
            assert_eq!(runs[0].start, at, "in key order, without gaps");
            at = runs[0].end;
            let part = KeyRange::new(
                range.begin + runs[0].start as u64,
                range.begin + runs[0].end as u64,
            );
            assert!(new.owns(*server as usize, &part));
        }
        assert_eq!(at, failed[0].end);
    }

    #[test]
    fn clocked_requests_reach_every_listed_server() {
        let (old, _) = tables();
        let keys: Shared<Key> = vec![5u64].into();
        let owner = old.server_of(5) as u32;
        let req = Request::keyed::<f32>(pull_header(), 1, true, keys, None);
        let plan = req.first_plan(&old, &[0, 1, 2]);
        assert_eq!(
            plan.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        for (s, runs) in plan {
            assert_eq!(runs.is_empty(), s != owner);
        }
        // A range request: every server also gets a closing empty message, after its
        // ranges.
        let (lo, hi) = (old.ranges()[0].begin, old.ranges()[1].end);
        let req = Request::ranged::<f32>(pull_header(), 1, true, KeyRange::new(lo, hi), None);
        let plan = req.first_plan(&old, &[0, 1, 2]);
        for s in 0..3u32 {
            let mine: Vec<&Vec<Range<usize>>> = plan
                .iter()
                .filter(|(p, _)| *p == s)
                .map(|(_, r)| r)
                .collect();
            assert!(mine.last().unwrap().is_empty(), "server {s}: {mine:?}");
            assert!(mine[..mine.len() - 1].iter().all(|r| !r.is_empty()));
        }
        assert_eq!(plan.iter().filter(|(_, r)| r.is_empty()).count(), 3);
        assert!(plan.len() > 3);
    }

    #[test]
    fn a_lost_segment_is_resent_by_the_new_table_and_the_pull_scatters_in_key_order() {
        let (old, new) = tables();
        let keys = spread(300);
        let shared: Shared<Key> = keys.clone().into();
        let req = Request::keyed::<f32>(pull_header(), 1, false, shared, None);
        let plan = req.first_plan(&old, &[]);
        let (segments, frames) = req.messages(&old, 5, 0, plan);
        let mut headers: HashMap<usize, Header> = frames
            .iter()
            .map(|(_, f)| (segment_of(f.header().timestamp), *f.header()))
            .collect();
        let mut st = task_state(req, segments);
        let t0 = Instant::now();
        st.park(1, Failure::Disconnected { server: 1 }, t0);
        let timeout = Duration::from_secs(60);
        // Same table: nothing to do yet.
        let r = st.resend_due(5, &old, t0, timeout, &|_| true);
        assert!(r.waiting && r.added == 0 && r.closed == 0);
        // A newer table: server 1's keys go to the others.
        let r = st.resend_due(5, &new, t0, timeout, &|_| true);
        assert!(!r.waiting);
        assert_eq!(r.closed, 1);
        assert_eq!(r.added, r.sends.len());
        assert_eq!(st.segments.len(), 3 + r.added);
        for (server, frame) in &r.sends {
            let h = frame.header();
            let seg = segment_of(h.timestamp);
            assert_eq!(task_of(h.timestamp), 5);
            assert!(seg >= 3);
            assert_eq!(st.segments[seg].server, *server);
            assert_eq!(u64::from(h.epoch), new.epoch());
            assert_eq!(st.segments[seg].epoch, new.epoch());
            assert_eq!(st.segments[seg].failed_at, Some(t0));
            // The message holds the keys of its runs, gathered.
            let want: Vec<Key> = st.segments[seg]
                .runs
                .iter()
                .flat_map(|r| keys[r.clone()].iter().copied())
                .collect();
            assert_eq!(h.key_count as usize, want.len());
            let (kp, _) = (st.request.as_ref().unwrap().body)(&st.segments[seg].runs);
            assert_eq!(bytemuck::cast_slice::<u8, Key>(kp.bytes()), &want[..]);
            headers.insert(seg, *h);
        }
        let replaced = &st.segments[1];
        assert!(matches!(replaced.state, SegState::Done));
        assert!(replaced.runs.is_empty() && replaced.part.is_none());
        answer_all(&mut st, &keys, &headers);
        let pulled: Pulled<f32> = Pulled {
            parts: st.take_answers(),
            _t: PhantomData,
        };
        let want: Vec<f32> = keys.iter().map(|&k| k as f32).collect();
        assert_eq!(pulled.to_vec(), want);
    }

    #[test]
    fn a_range_part_refused_as_stale_is_resent_as_ranges() {
        let (old, new) = tables();
        let range = KeyRange::new(0, 3000);
        let vals: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let mut h = Header::new(MessageKind::Push, 7, 0);
        h.dtype = DType::F32 as u8;
        h.value_len = 1;
        let req = Request::ranged::<f32>(h, 1, false, range, Some(vals.clone().into()));
        // One table routes the whole small range to one server; the new table may too.
        let plan = req.first_plan(&old, &[]);
        let (segments, _) = req.messages(&old, 9, 0, plan);
        let n = segments.len();
        let mut st = task_state(req, segments);
        let t0 = Instant::now();
        let failure = Failure::Refused {
            server: st.segments[0].server,
            status: Status::StaleEpoch,
            message: "stale".into(),
        };
        st.park(0, failure, t0);
        let r = st.resend_due(9, &new, t0, Duration::from_secs(60), &|_| true);
        assert_eq!((r.closed, r.added), (1, r.sends.len()));
        for (server, frame) in &r.sends {
            let seg = segment_of(frame.header().timestamp);
            assert!(seg >= n);
            assert_ne!(frame.header().flags & FLAG_RANGE, 0);
            let runs = st.segments[seg].runs.clone();
            let (kp, vp) = (st.request.as_ref().unwrap().body)(&runs);
            let kr: &[u64] = bytemuck::cast_slice(kp.bytes());
            let part = KeyRange::new(kr[0], kr[1]);
            assert!(new.owns(*server as usize, &part));
            assert_eq!(part.begin, runs[0].start as u64);
            let v: &[f32] = bytemuck::cast_slice(vp.bytes());
            assert_eq!(v, &vals[runs[0].clone()]);
        }
    }

    #[test]
    fn stale_refusals_under_the_same_table_are_resent_after_a_delay() {
        let (old, _) = tables();
        let keys: Shared<Key> = vec![5u64, 6].into();
        let req = Request::keyed::<f32>(pull_header(), 1, false, keys, None);
        let plan = req.first_plan(&old, &[]);
        let (segments, _) = req.messages(&old, 3, 0, plan);
        let mut st = task_state(req, segments);
        let server = st.segments[0].server;
        let t0 = Instant::now();
        let stale = || Failure::Refused {
            server,
            status: Status::StaleEpoch,
            message: "behind".into(),
        };
        st.park(0, stale(), t0);
        let timeout = Duration::from_secs(60);
        let r = st.resend_due(3, &old, t0, timeout, &|_| true);
        assert!(r.waiting && r.sends.is_empty());
        let later = t0 + RETRY_DELAY;
        let r = st.resend_due(3, &old, later, timeout, &|_| true);
        assert_eq!((r.closed, r.added), (1, 1));
        assert_eq!(r.sends[0].0, server);
        assert_eq!(st.segments[1].runs, vec![0..2]);
        assert_eq!(st.segments[1].attempt, 1);
        // Refused again: the next delay is longer.
        st.park(1, stale(), later);
        let r = st.resend_due(3, &old, later + RETRY_DELAY, timeout, &|_| true);
        assert!(r.waiting && r.sends.is_empty());
        let r = st.resend_due(3, &old, later + RETRY_DELAY * 2, timeout, &|_| true);
        assert_eq!(r.added, 1);
        // And after the timeout since the first failure, the task fails with it.
        st.park(2, stale(), later + RETRY_DELAY * 2);
        let r = st.resend_due(3, &old, t0 + timeout, timeout, &|_| true);
        assert_eq!((r.closed, r.added, r.waiting), (1, 0, false));
        assert!(matches!(
            st.error,
            Some(EngineError::Server {
                status: Status::StaleEpoch,
                ..
            })
        ));
    }

    #[test]
    fn clock_only_segments_are_dropped_when_their_server_is_gone() {
        let (old, new) = tables();
        let keys: Shared<Key> = vec![5u64].into();
        let owner = old.server_of(5) as u32;
        let req = Request::keyed::<f32>(pull_header(), 1, true, keys, None);
        let plan = req.first_plan(&old, &[0, 1, 2]);
        let (segments, _) = req.messages(&old, 4, 0, plan);
        let mut st = task_state(req, segments);
        let t0 = Instant::now();
        let empty: Vec<usize> = (0..3).filter(|&i| i as u32 != owner).collect();
        // One keyless segment lost with its server, one refused as stale by a live one.
        st.park(
            empty[0],
            Failure::Disconnected {
                server: empty[0] as u32,
            },
            t0,
        );
        st.park(
            empty[1],
            Failure::Refused {
                server: empty[1] as u32,
                status: Status::StaleEpoch,
                message: String::new(),
            },
            t0,
        );
        let gone = empty[0] as u32;
        let alive = move |s: u32| s != gone;
        let table = if gone == 1 { &new } else { &old };
        let r = st.resend_due(4, table, t0 + RETRY_DELAY, Duration::from_secs(60), &alive);
        assert_eq!(r.closed, 2);
        assert_eq!(r.sends.len(), 1);
        assert_eq!(r.sends[0].0, empty[1] as u32);
        assert_eq!(r.sends[0].1.header().key_count, 0);
        assert!(st.error.is_none());
    }

    #[test]
    fn answers_settle_their_segment_and_only_newer_tables_install() {
        let (old, new) = tables();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let (wtx, _wrx) = crossbeam_channel::unbounded();
        let core = Core::new(tx, wtx, Duration::from_secs(60));
        assert!(core.install(old.clone()));
        assert!(!core.install(old.clone()));
        let keys = spread(30);
        let req = Request::keyed::<f32>(pull_header(), 1, false, keys.clone().into(), None);
        let plan = req.first_plan(&old, &[]);
        let (segments, frames) = req.messages(&old, 1, 0, plan);
        let n = segments.len();
        let task = Arc::new(Task {
            remaining: AtomicUsize::new(n),
            state: Mutex::new(task_state(req, segments)),
        });
        core.tasks.lock().insert(1, task.clone());
        // An answer naming the wrong server for its segment is dropped.
        let stamp = frames[0].1.header().timestamp;
        core.settle(stamp, frames[0].0 + 1, |_, _| Outcome::Done);
        assert_eq!(task.remaining.load(Ordering::Acquire), n);
        // A stale refusal parks the segment for a resend.
        let failure = Failure::Refused {
            server: frames[0].0,
            status: Status::StaleEpoch,
            message: String::new(),
        };
        core.settle(stamp, frames[0].0, |_, _| Outcome::Retry(failure));
        assert!(core.retrying.lock().contains(&1));
        assert_eq!(task.remaining.load(Ordering::Acquire), n);
        // A newer table: the segment is resent; without a connection to its server it
        // waits again (as for a server not connected yet), now routed with the new epoch.
        assert!(core.install(new.clone()));
        assert_eq!(core.table().epoch(), new.epoch());
        core.retry_pass();
        let st = task.state.lock();
        assert!(st.segments.len() > n);
        assert!(matches!(st.segments[0].state, SegState::Done));
        for s in &st.segments[n..] {
            assert_eq!(s.epoch, new.epoch());
            assert!(matches!(
                s.state,
                SegState::Waiting {
                    failure: Failure::Refused {
                        status: Status::StaleEpoch,
                        ..
                    },
                    ..
                }
            ));
        }
        assert_eq!(
            task.remaining.load(Ordering::Acquire),
            n - 1 + st.segments.len() - n
        );
    }
}
