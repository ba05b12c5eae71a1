//! The task table: timestamps, segments, completion, the consistency gate, and
//! waiting for a task.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};

use pserv_transport::wire::{Header, MessageKind, FLAG_ORDERED};
use pserv_transport::{Conn, OutFrame, OwnedFrame};

use crate::base::error::EngineError;
use crate::base::value::Value;
use crate::consistency::Gate;
use crate::placement::Partition;
use crate::proto::{segment_of, task_of, Control, Status};

use super::config::TaskOpts;
use super::pulled::{Answer, Pulled};
use super::request::Request;
use super::retry::Failure;
use super::state::{in_table, Core};
use super::Worker;

/// Identifies a task (a push, pull or push-pull) of one worker. Increases by one per task.
pub type Timestamp = u64;

/// Where a segment stands.
#[derive(Debug)]
pub(crate) enum SegState {
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
pub(crate) struct Segment {
    pub(crate) server: u32,
    /// Values expected (pulls), in elements.
    pub(crate) values: usize,
    pub(crate) state: SegState,
    pub(crate) part: Option<OwnedFrame>,
    /// Where this segment's keys sit in the request's key order (index ranges, in the
    /// order its answer holds them; for ranges, offsets from the range's begin). A
    /// replaced segment has none.
    pub(crate) runs: Vec<Range<usize>>,
    /// The epoch of the routing table it was split with.
    pub(crate) epoch: u64,
    /// When the first segment it descends from failed (resent segments inherit it).
    pub(crate) failed_at: Option<Instant>,
    /// How many times its keys were resent before it.
    pub(crate) attempt: u32,
    /// The segment of the task's first split its keys come from (servers recognise a
    /// resent piece of a push by it).
    pub(crate) origin: usize,
    /// The name of its key list when key caching applies to it (sent by name, or in
    /// full asking the server to cache it).
    pub(crate) list: Option<crate::keycache::ListId>,
}

/// The [`Control::Completed`] notice a finished task calls for: it was a sequential
/// clocked push and some of its keys were resent (a segment whose index is not its
/// origin's), so the servers learnt its clock only where the resent pieces wrote.
pub(crate) fn completed_notice(st: &TaskState) -> Option<(Control, u32)> {
    let req = st.request.as_ref()?;
    let h = &req.header;
    let sequential_push =
        h.kind == MessageKind::Push as u8 && h.clock > 0 && h.flags & FLAG_ORDERED != 0;
    let resent = st.segments.iter().enumerate().any(|(i, s)| i != s.origin);
    (sequential_push && resent && st.error.is_none())
        .then_some((Control::Completed { clock: h.clock }, h.sender))
}

/// The [`Control::CompletedHere`] notices a sequential clocked push with resent keys
/// calls for while it is still open (after one of its segments was acknowledged): one
/// to each head of `table` none of whose keys of the task is still unacknowledged (a
/// segment sent or waiting for a resend), once per head and epoch (`st.noticed`). The
/// first message a server got moved the worker's clock there only under the table it
/// was routed with, and a resent piece moves none; without this a server that got all
/// its keys could hold the others' pushes until the whole task finished, while the task
/// waits on a server whose gate waits on those others.
pub(crate) fn completed_here_notices(st: &mut TaskState, table: &Partition) -> Vec<(u32, Control)> {
    let Some(req) = st.request.clone() else {
        return Vec::new();
    };
    let h = &req.header;
    let sequential_push =
        h.kind == MessageKind::Push as u8 && h.clock > 0 && h.flags & FLAG_ORDERED != 0;
    let resent = st.segments.iter().enumerate().any(|(i, s)| i != s.origin);
    if !(sequential_push && resent && st.error.is_none() && st.started) {
        return Vec::new();
    }
    let mut busy = std::collections::BTreeSet::new();
    for s in &st.segments {
        if matches!(s.state, SegState::Done) || s.runs.is_empty() {
            continue;
        }
        busy.extend(
            req.split(table, &s.runs)
                .into_iter()
                .map(|(server, _)| server),
        );
    }
    let epoch = table.epoch();
    let heads: std::collections::BTreeSet<u32> = table.owners().iter().copied().collect();
    let mut out = Vec::new();
    for s in heads {
        if busy.contains(&s) || st.noticed.contains(&(s, epoch)) {
            continue;
        }
        st.noticed.push((s, epoch));
        out.push((
            s,
            Control::CompletedHere {
                clock: h.clock,
                epoch,
            },
        ));
    }
    out
}

pub(crate) struct TaskState {
    /// The heads (and epochs) told [`Control::CompletedHere`] for this task.
    pub(crate) noticed: Vec<(u32, u64)>,
    pub(crate) segments: Vec<Segment>,
    pub(crate) error: Option<EngineError>,
    pub(crate) waiter: Option<Thread>,
    /// Whether answers carry values to keep.
    pub(crate) keeps_values: bool,
    /// Element type tag expected in answers.
    pub(crate) dtype: u8,
    /// The request, to resend failed segments (None: refused before sending).
    pub(crate) request: Option<Arc<Request>>,
    /// Whether the consistency gate let it start (before that, its messages are parked
    /// unsent, and nothing of it may be resent).
    pub(crate) started: bool,
}

impl TaskState {
    /// The answered segments' values with their runs (replaced segments hold none).
    pub(crate) fn take_answers(&mut self) -> Vec<Answer> {
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

pub(super) struct Task {
    /// Segments not yet settled (sent or waiting for a resend).
    pub(super) remaining: AtomicUsize,
    pub(super) state: Mutex<TaskState>,
}

impl Task {
    fn done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }
}

/// The gate and the requests it holds back, under one lock (a task found ready by
/// `finish` on a loop thread must find its frames already parked).
pub(super) struct GateState {
    pub(super) gate: Gate,
    /// Frames of submitted tasks that may not start yet, with the routing table epoch
    /// they were split with.
    pub(super) deferred: HashMap<Timestamp, (u64, Vec<(u32, OutFrame)>)>,
    /// The next task's timestamp (allocated under this lock, so submissions are in order).
    pub(super) next_ts: Timestamp,
}

/// What an answer (or a failure) does to its segment.
pub(crate) enum Outcome {
    /// The segment is settled.
    Done,
    /// The segment failed retryably: resend it when possible.
    Retry(Failure),
}

/// Judge the answer `h` (`value_bytes` of values; the error text where its status is
/// not Ok) of segment `seg`, sent to `server`: the
/// outcome, and whether the answer's frame is to be kept as the segment's values. A
/// refusal as routed with another table (`StaleEpoch`, `NotOwner`) is retryable; any
/// other error, or values of the wrong type or length, fail the task (the error is kept
/// in `st`). The worker's handler and the simulation both judge answers with it.
pub(crate) fn judge_answer(
    st: &mut TaskState,
    seg: usize,
    server: u32,
    h: &Header,
    value_bytes: usize,
    error_text: Option<String>,
) -> (Outcome, bool) {
    debug_assert!(
        seg < st.segments.len(),
        "an answer names a segment of its task"
    );
    if h.status != Status::Ok as u8 {
        let status = Status::from_u8(h.status);
        let failure = Failure::Refused {
            server,
            status,
            message: error_text.unwrap_or_default(),
        };
        if matches!(status, Status::StaleEpoch | Status::NotOwner) {
            // Routed by a table the server does not share: resend by a newer one.
            return (Outcome::Retry(failure), false);
        }
        if status == Status::KeyCacheMiss && st.segments[seg].list.is_some() {
            // Named by a list the server does not hold: nothing was applied; resent at
            // once with its keys.
            return (Outcome::Retry(failure), false);
        }
        st.error.get_or_insert(failure.error());
        return (Outcome::Done, false);
    }
    if !st.keeps_values {
        return (Outcome::Done, false);
    }
    let want = st.segments[seg].values;
    let elem = pserv_transport::DType::from_u8(st.dtype).map_or(1, |d| d.size());
    if h.dtype != st.dtype || value_bytes != want * elem {
        st.error.get_or_insert(EngineError::Server {
            server,
            status: Status::BadRequest,
            message: format!(
                "answer holds {} value bytes of type {}, expected {want} values of type {}",
                value_bytes, h.dtype, st.dtype
            ),
        });
        return (Outcome::Done, false);
    }
    (Outcome::Done, true)
}

impl Core {
    /// Let the next task be `ts` (when it is ahead): the numbers skipped count as
    /// finished tasks ([`crate::consistency::Gate::skip`]).
    pub(super) fn skip_tasks_to(&self, ts: Timestamp) {
        let mut g = self.gate.lock();
        if ts > g.next_ts {
            let n = ts - g.next_ts;
            g.gate.skip(n);
            g.next_ts = ts;
        }
    }

    /// Record the answer (or failure) of the segment a request's `stamp` names, sent to
    /// `server`.
    pub(super) fn settle(
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
                let table = self.table();
                let notices = if task.remaining.load(Ordering::Acquire) > 1 {
                    completed_here_notices(&mut st, &table)
                } else {
                    Vec::new()
                };
                let sender = st.request.as_ref().map_or(0, |r| r.header.sender);
                self.count_off(ts, &task, st, 1);
                self.send_notices(notices, sender);
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
    pub(super) fn count_off(
        &self,
        ts: Timestamp,
        task: &Task,
        mut st: MutexGuard<'_, TaskState>,
        n: usize,
    ) {
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

    /// Send each server its [`Control::CompletedHere`] (a server that is gone needs none).
    fn send_notices(&self, notices: Vec<(u32, Control)>, sender: u32) {
        if notices.is_empty() {
            return;
        }
        let servers = self.servers.read();
        for (s, notice) in notices {
            if let Some(Some(c)) = servers.get(s as usize) {
                let _ = c.send(notice.to_frame(sender));
            }
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
}

impl Worker {
    /// Allocate the next timestamp, record the task, and start it now or park it until
    /// the gate lets it start. `build` makes the task's request, or refuses it (the task
    /// then fails at once, without sending); the request is split by the current routing
    /// table into one message per server.
    pub(super) fn launch(
        &self,
        kind: MessageKind,
        dtype: u8,
        opts: &TaskOpts,
        build: impl FnOnce() -> Result<Request, EngineError>,
    ) -> Timestamp {
        let (ts, start) = self.launch_held(kind, dtype, opts, build);
        if let Some(frames) = start {
            self.send_first(ts, frames);
        }
        ts
    }

    /// Send the first messages of started task `ts` (none: it is done at once).
    pub(super) fn send_first(&self, ts: Timestamp, frames: Vec<(u32, OutFrame)>) {
        if frames.is_empty() {
            self.core.task_done(ts);
        }
        for (server, frame) in frames {
            self.core.send(server, frame);
        }
    }

    /// [`launch`](Self::launch) without sending: the first messages of the task if it
    /// started at once (the caller sends them, see [`send_first`](Self::send_first)),
    /// `None` where the gate deferred it.
    pub(super) fn launch_held(
        &self,
        kind: MessageKind,
        dtype: u8,
        opts: &TaskOpts,
        build: impl FnOnce() -> Result<Request, EngineError>,
    ) -> (Timestamp, Option<Vec<(u32, OutFrame)>>) {
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
                    noticed: Vec::new(),
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
        (ts, start)
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
                        let mut waiting: Vec<u32> = st
                            .segments
                            .iter()
                            .filter(|s| matches!(s.state, SegState::Sent))
                            .map(|s| s.server)
                            .collect();
                        waiting.sort_unstable();
                        waiting.dedup();
                        return Err(EngineError::Timeout(format!(
                            "task {ts} not answered within {:?} (no answer yet from server(s) {waiting:?})",
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
}
