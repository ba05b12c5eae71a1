//! The state the application threads, the event loops and the retry thread share.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use pserv_transport::compress::Codec;
use pserv_transport::{Conn, OutFrame};

use crate::consistency::Gate;
use crate::keycache::{SentLists, DEFAULT_SENT_LISTS};
use crate::node::departed::{Departed, DEPARTED_GRACE};
use crate::placement::Partition;
use crate::proto::{Control, Status};

use super::retry::Failure;
use super::tasks::{GateState, Outcome, Task, Timestamp};

/// State shared between the application threads, the event loops and the retry thread.
pub(super) struct Core {
    pub(super) tasks: Mutex<HashMap<Timestamp, Arc<Task>>>,
    pub(super) control: Sender<Control>,
    pub(super) gate: Mutex<GateState>,
    /// Connections to the servers, by rank (none to one that could not be reached).
    pub(super) servers: RwLock<Vec<Option<Conn>>>,
    /// Opens connections to servers that join.
    pub(super) connector: std::sync::OnceLock<pserv_transport::Connector>,
    /// The scheduler connection (replaced when a restarted scheduler comes back).
    pub(super) sched: Mutex<Option<Conn>>,
    /// Where the scheduler is, who this worker is (rank, node id), and how long to look
    /// for a restarted scheduler.
    pub(super) sched_info: std::sync::OnceLock<(SocketAddr, u32, u32, Duration)>,
    /// Bumped each time a restarted scheduler's connection replaces `sched`.
    pub(super) sched_gen: AtomicU64,
    /// Barriers passed (a restarted scheduler learns it).
    pub(super) barriers_passed: AtomicU64,
    /// The job is over (the scheduler said so): a closed scheduler connection is expected.
    pub(super) over: AtomicBool,
    /// The scheduler (or a SIGTERM) asked this worker to leave gracefully.
    pub(super) leave: Arc<AtomicBool>,
    /// The routing table requests are split by (None until the welcome; replaced by
    /// newer tables from the scheduler).
    table: RwLock<Option<Arc<Partition>>>,
    /// Tasks with segments waiting for a resend.
    pub(super) retrying: Mutex<HashSet<Timestamp>>,
    /// Servers the newest table left out, since when ([`Core::drop_departed_servers`]).
    dropped: Departed,
    /// Sent segments seen unanswered, since when, and whether warned about
    /// ([`Core::warn_stalls`]); with the time of the last look.
    stalls: Mutex<StallWatch>,
    /// Wakes the retry thread.
    wake: Sender<()>,
    /// Tells the retry thread to stop.
    pub(super) stop: AtomicBool,
    /// How long a failed segment may wait for a successful resend.
    pub(super) timeout: Duration,
    /// Which key lists each server confirmed it caches (None: key caching off).
    pub(super) sent_lists: Option<Arc<SentLists>>,
    /// The codec of this worker's requests to servers (and so of their answers).
    pub(super) codec: Codec,
}

/// Sent segments seen unanswered (since when, whether warned), and the last look.
type StallWatch = (
    HashMap<(Timestamp, usize), (Instant, bool)>,
    Option<Instant>,
);

/// How long a request may wait for its answer before the worker says so (once per
/// request; it keeps waiting, up to the task's timeout).
pub(super) const STALL_WARNING: Duration = Duration::from_secs(5);

impl Core {
    pub(super) fn new(control: Sender<Control>, wake: Sender<()>, timeout: Duration) -> Core {
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
            sched_gen: AtomicU64::new(0),
            barriers_passed: AtomicU64::new(0),
            over: AtomicBool::new(false),
            leave: Arc::new(AtomicBool::new(false)),
            table: RwLock::new(None),
            retrying: Mutex::new(HashSet::new()),
            dropped: Departed::default(),
            stalls: Mutex::new((HashMap::new(), None)),
            wake,
            stop: AtomicBool::new(false),
            timeout,
            sent_lists: None,
            codec: Codec::None,
        }
    }

    /// Compress the values of requests with `codec` (servers mirror it in answers).
    pub(super) fn with_codec(mut self, codec: Codec) -> Core {
        self.codec = codec;
        self
    }

    /// Turn key caching on: requests name the lists servers confirmed.
    pub(super) fn with_key_cache(mut self, on: bool) -> Core {
        self.sent_lists = on.then(|| Arc::new(SentLists::new(DEFAULT_SENT_LISTS)));
        self
    }

    /// The current routing table.
    ///
    /// # Panics
    /// Before the welcome's table is installed (a `Worker` always has one).
    pub(super) fn table(&self) -> Arc<Partition> {
        self.table
            .read()
            .clone()
            .expect("the routing table is installed before the worker is used")
    }

    /// Install `table` if it is newer than the current one; returns whether it did.
    pub(super) fn install(&self, table: Partition) -> bool {
        let mut t = self.table.write();
        if t.as_ref().is_some_and(|cur| cur.epoch() >= table.epoch()) {
            return false;
        }
        if let Some(old) = t.as_ref() {
            self.dropped.table_changed(old, &table, None);
        }
        *t = Some(Arc::new(table));
        true
    }

    /// Say (once per request) which requests have waited [`STALL_WARNING`] for an answer,
    /// naming the server: a lossy or slow link is not silent. Looks once a second.
    pub(super) fn warn_stalls(&self) {
        let now = Instant::now();
        let mut g = self.stalls.lock();
        if g.1
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        g.1 = Some(now);
        let tasks: Vec<(Timestamp, Arc<super::tasks::Task>)> = self
            .tasks
            .lock()
            .iter()
            .map(|(ts, t)| (*ts, t.clone()))
            .collect();
        let mut sent = std::collections::HashSet::new();
        let mut late: Vec<(u32, Duration)> = Vec::new();
        for (ts, task) in tasks {
            let st = task.state.lock();
            if !st.started {
                continue;
            }
            for (i, s) in st.segments.iter().enumerate() {
                if !matches!(s.state, super::tasks::SegState::Sent) {
                    continue;
                }
                sent.insert((ts, i));
                let e = g.0.entry((ts, i)).or_insert((now, false));
                let waited = now.saturating_duration_since(e.0);
                if waited >= STALL_WARNING && !e.1 {
                    e.1 = true;
                    late.push((s.server, waited));
                }
            }
        }
        g.0.retain(|k, _| sent.contains(k));
        drop(g);
        late.sort_by_key(|(s, _)| *s);
        late.dedup_by_key(|(s, _)| *s);
        for (server, waited) in late {
            let peer = self
                .servers
                .read()
                .get(server as usize)
                .and_then(Option::clone)
                .map_or_else(
                    || "not connected".to_string(),
                    |c| c.peer_addr().to_string(),
                );
            tracing::warn!(
                server,
                %peer,
                "a request to server {server} at {peer} has waited {:.0} s for its answer (a lossy or slow link, or a server that stopped answering); still waiting, the task fails after {:?}",
                waited.as_secs_f64(),
                self.timeout
            );
        }
    }

    /// Servers the table left out [`DEPARTED_GRACE`] ago whose connection is still
    /// open (a server declared dead behind a partition: its TCP connection does not
    /// close for many minutes, and what was sent to it would wait for an answer that
    /// never comes): close the connection and let what waits on it be resent, as when it
    /// closes. A server that left the table gracefully has answered and gone by then.
    pub(super) fn drop_departed_servers(&self) {
        for s in self.dropped.take_due() {
            let conn = self.servers.read().get(s as usize).and_then(Option::clone);
            if let Some(c) = conn.filter(|c| !c.is_closed()) {
                tracing::warn!(
                    server = s,
                    peer = %c.peer_addr(),
                    "server {s} left the routing table {DEPARTED_GRACE:?} ago and its connection is still open: closing it; what waited on it is resent to the new heads"
                );
                c.close();
                self.server_lost(s);
            }
        }
    }

    pub(super) fn wake(&self) {
        let _ = self.wake.send(());
    }

    /// Whether the connection to `server` is open.
    pub(super) fn alive(&self, server: u32) -> bool {
        self.servers
            .read()
            .get(server as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| !c.is_closed())
    }

    /// Send a request to `server`; a failed send fails its segment retryably.
    pub(super) fn send(&self, server: u32, frame: OutFrame) {
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
}

pub(crate) use crate::node::departed::in_table;
