//! Resending: segments lost with their server, refused as routed with another table, or
//! parked while the table changed, are resent under the newest table by the retry thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use pserv_transport::OutFrame;

use crate::base::error::EngineError;
use crate::placement::Partition;
use crate::proto::{Status, MAX_SEGMENTS};

use super::state::{in_table, Core};
use super::tasks::{SegState, Task, TaskState, Timestamp};

/// How often the retry thread looks at segments waiting for a delayed resend.
const RETRY_TICK: Duration = Duration::from_millis(2);
/// The first delay before resending a request a server refused as stale while this
/// worker has no newer table (the server may be the one behind); it doubles with each
/// attempt, up to [`RETRY_MAX_DELAY`].
pub(super) const RETRY_DELAY: Duration = Duration::from_millis(3);
/// The longest delay between resends of a request refused as stale.
const RETRY_MAX_DELAY: Duration = Duration::from_millis(200);

/// Why a segment failed: kept to end its task with a clear error if no resend succeeds
/// within the worker's timeout.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
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
    pub(crate) fn error(&self) -> EngineError {
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

    /// Whether it is to be resent at once under the same table (with its keys).
    fn resend_now(&self) -> bool {
        matches!(
            self,
            Failure::Refused {
                status: Status::KeyCacheMiss,
                ..
            }
        )
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

/// What one look at a task's waiting segments decided.
#[derive(Default)]
pub(crate) struct Resend {
    /// Segments added (resends).
    pub(crate) added: usize,
    /// Segments settled (replaced, dropped or given up).
    pub(crate) closed: usize,
    /// The resends' frames, by server.
    pub(crate) sends: Vec<(u32, OutFrame)>,
    /// Whether some segment still waits.
    pub(crate) waiting: bool,
}

impl TaskState {
    /// Segment `seg` failed retryably at `now`: let it wait for a resend.
    pub(crate) fn park(&mut self, seg: usize, failure: Failure, now: Instant) {
        let s = &mut self.segments[seg];
        let resend_at = if failure.resend_now() {
            Some(now)
        } else {
            failure.stale().then(|| {
                let backoff = RETRY_DELAY
                    .saturating_mul(1 << s.attempt.min(16))
                    .min(RETRY_MAX_DELAY);
                now + backoff
            })
        };
        s.failed_at.get_or_insert(now);
        s.state = SegState::Waiting { failure, resend_at };
    }

    /// Resend the waiting segments that are due under `table` (a newer table than they
    /// were routed with, or a stale refusal's delay passed), give up on those waiting for
    /// `timeout` since they first failed, and drop keyless ones whose server is gone
    /// (`alive` says whose connection is open).
    pub(crate) fn resend_due(
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
}

impl Core {
    /// Let every unsent segment of task `ts` wait for a resend under the current table.
    pub(super) fn requeue(&self, ts: Timestamp) {
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

    /// Every segment still waiting on `server` fails retryably.
    pub(super) fn server_lost(&self, server: u32) {
        if let Some(lists) = &self.sent_lists {
            // Whoever answers for this rank next holds none of this worker's lists.
            lists.forget_server(server);
        }
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
    pub(super) fn retry_pass(&self) {
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
pub(super) struct Retrier {
    core: Arc<Core>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Retrier {
    pub(super) fn start(core: Arc<Core>, wake: Receiver<()>) -> Result<Retrier, EngineError> {
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
                c.drop_departed_servers();
                c.warn_stalls();
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
