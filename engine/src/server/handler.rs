//! The transport handler of a server: frames in, decisions out (control messages, the
//! clock gate, refusals), and what a closed connection means.

use std::sync::atomic::Ordering;

use std::time::Duration;

use pserv_transport::wire::{MessageKind, FLAG_ORDERED, FLAG_RANGE};
use pserv_transport::{CloseReason, Conn, Frame, Handler, OwnedFrame, RecvFrame};

use crate::base::ids::{ConnTag, Holder, NodeId, Who, WorkerRank};
use crate::base::keys::KeyRange;
use crate::consistency::clock::{Action, ClockGate};
use crate::proto::{self, Control, Status};
use crate::replication::{EntryStore, KeysRef};

use super::admit::{admit, completed_here, Clocked};
use super::keys::resolve;
use super::route::{route, stale_epoch, touched_ranges, Refusal};
use super::serve::{answer_request, non_finite};
use super::window::open_window;
use super::{Core, Ready, ServerHandler};

impl Handler for ServerHandler {
    fn on_turn_end(&mut self) {
        if let Some(ready) = self.core.ready.get() {
            ready
                .repl
                .end_of_turn(entries(ready), || ready.table.read().epoch());
        }
    }

    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        let f = frame.frame();
        let h = *f.header();
        if h.kind == MessageKind::Control as u8 {
            if ConnTag::from_u64(conn.tag(), Holder::Server) == ConnTag::Scheduler {
                match Control::from_frame(&f) {
                    Ok(msg) => {
                        let _ = self.core.control.send(msg);
                    }
                    Err(e) => tracing::warn!(error = %e, "bad control message from the scheduler"),
                }
            } else {
                match Control::from_frame(&f) {
                    Ok(Control::OpenWindow {
                        range,
                        host,
                        offers,
                    }) => open_window(&self.core, conn, h.sender, range, &host, &offers),
                    Ok(Control::Replicate { batch }) => match self.core.ready.get() {
                        Some(ready) if is_server(ready, h.sender) => {
                            ready.repl.on_batch(entries(ready), batch)
                        }
                        _ => {
                            tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "replica batch from a node that is not a server; ignored")
                        }
                    },
                    Ok(Control::ReplicaAck { seq }) => match self.core.ready.get() {
                        Some(ready) if is_server(ready, h.sender) => ready.repl.on_ack(seq),
                        _ => {
                            tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "replica ack from a node that is not a server; ignored")
                        }
                    },
                    Ok(Control::Completed { clock }) => {
                        if let Some(ready) = self.core.ready.get() {
                            match worker_of(ready, h.sender) {
                                Some(WorkerRank(w))
                                    if w < ready
                                        .workers
                                        .load(std::sync::atomic::Ordering::Acquire) =>
                                {
                                    let mut gate = ready.clocks.lock();
                                    let actions = gate.completed(w as usize, clock);
                                    run_actions(&self.core, ready, &mut gate, actions);
                                }
                                _ => {
                                    tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "clock notice from a node that is not a worker; ignored")
                                }
                            }
                        }
                    }
                    Ok(Control::CompletedHere { clock, epoch }) => {
                        if let Some(ready) = self.core.ready.get() {
                            match worker_of(ready, h.sender) {
                                Some(WorkerRank(w))
                                    if w < ready
                                        .workers
                                        .load(std::sync::atomic::Ordering::Acquire) =>
                                {
                                    let mut gate = ready.clocks.lock();
                                    let table = ready.table.read().clone();
                                    let me = ready.rank as usize;
                                    let actions = completed_here(
                                        &mut gate,
                                        &table,
                                        me,
                                        (w as usize, clock, epoch),
                                    );
                                    run_actions(&self.core, ready, &mut gate, actions);
                                }
                                _ => {
                                    tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "clock notice from a node that is not a worker; ignored")
                                }
                            }
                        }
                    }
                    Ok(Control::Compress { codec }) => {
                        match codec.parse::<pserv_transport::compress::Codec>() {
                            Ok(c) => {
                                tracing::debug!(peer = %conn.peer_addr(), codec = %c, "answers on this connection are compressed");
                                conn.set_codec(c);
                            }
                            Err(e) => {
                                tracing::warn!(peer = %conn.peer_addr(), error = %e, "a worker asked for a codec this server does not know; answers stay uncompressed")
                            }
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(peer = %conn.peer_addr(), ?other, "unexpected control message from a worker; ignored")
                    }
                    Err(e) => {
                        tracing::warn!(peer = %conn.peer_addr(), error = %e, "bad control message from a worker; ignored")
                    }
                }
            }
            return;
        }
        let Some(ready) = self.core.ready.get() else {
            let _ = conn.send(proto::error_answer(
                &h,
                0,
                Status::NotReady,
                "server has no cluster table yet",
            ));
            return;
        };
        // Named key lists resolved, lists to cache stored: nothing past here sees a name.
        let Some(frame) = resolve(&self.core, ready, conn, frame) else {
            return;
        };
        let f = frame.frame();
        let h = *f.header();
        // Remember which worker this connection belongs to, so its clock can be retired
        // when it goes away.
        let worker = worker_of(ready, h.sender);
        if ConnTag::from_u64(conn.tag(), Holder::Server) == ConnTag::Unknown {
            if let Some(w) = worker {
                conn.set_tag(ConnTag::Worker(w).to_u64(Holder::Server));
            }
        }
        // A push of NaN or infinities is refused before anything (the clock gate
        // included) sees it.
        if let Some(refusal) = non_finite(&self.core, ready, &f) {
            tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, reason = %refusal.1, "refused a push");
            refuse(ready, conn, &h, refusal);
            return;
        }
        if h.clock == 0 {
            // Unclocked: serve at once, from the receive buffer.
            answer_request(&self.core, ready, &f, conn, 0);
            return;
        }
        let Some(WorkerRank(worker)) =
            worker.filter(|w| w.0 < ready.workers.load(std::sync::atomic::Ordering::Acquire))
        else {
            let _ = conn.send(proto::error_answer(
                &h,
                ready.node_id,
                Status::BadRequest,
                &format!(
                    "clocked request from node {}, which is not a worker",
                    h.sender
                ),
            ));
            return;
        };
        if keys_of(&f).is_none() {
            // Malformed keys (unsorted, repeated): refused with the reason, and the gate
            // never sees them.
            answer_request(&self.core, ready, &f, conn, 0);
            return;
        }
        // Requests this server will refuse (routed with another table, keys it does not
        // head, ranges not handed over yet) are refused before the clock gate sees them:
        // the gate must not count a push that is not applied.
        if let Some(refusal) = precheck(ready, &f) {
            refuse(ready, conn, &h, refusal);
            return;
        }
        let mut gate = ready.clocks.lock();
        // A table installed since the precheck evicted what the gate held (under this
        // lock): so check the epoch again, and nothing routed with an older table enters.
        let table = ready.table.read().clone();
        if h.epoch != 0 && u64::from(h.epoch) != table.epoch() {
            drop(gate);
            refuse(ready, conn, &h, stale_epoch(h.epoch, table.epoch()));
            return;
        }
        let me = ready.rank as usize;
        let keys = keys_of(&f).expect("the precheck refused malformed keys");
        let ranges = touched_ranges(&table, me, keys);
        let req = Clocked {
            worker: worker as usize,
            clock: h.clock,
            is_pull: h.kind == MessageKind::Pull as u8,
            ordered: h.has(FLAG_ORDERED),
            timestamp: h.timestamp,
            is_range: h.has(FLAG_RANGE),
        };
        let held = Held {
            conn: conn.clone(),
            frame: frame.into_owned(),
            since: std::time::Instant::now(),
            ranges: ranges.clone(),
        };
        let actions = admit(&mut gate, &table, me, &req, ranges, held);
        run_actions(&self.core, ready, &mut gate, actions);
    }

    fn on_close(&mut self, conn: &Conn, _reason: &CloseReason) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        match ConnTag::from_u64(conn.tag(), Holder::Server) {
            ConnTag::Server(peer) => {
                // A connection to another server closed: batches on chains through it
                // are regrouped (it failed or left).
                let table = ready.table.read().clone();
                ready.repl.peer_lost(entries(ready), &table, peer.0);
            }
            ConnTag::Worker(WorkerRank(w)) => {
                // Its key lists go with it (a worker that comes back populates anew,
                // and its side forgot this server when the connection closed).
                self.core
                    .key_cache
                    .forget_sender(NodeId::worker(WorkerRank(w), ready.servers).0);
                if ready.replace_workers {
                    // Its place is kept for a replacement: the gate keeps its slot until
                    // the scheduler says it is gone (`WorkerGone`).
                    return;
                }
                let mut gate = ready.clocks.lock();
                let actions = gate.retire(w as usize);
                run_actions(&self.core, ready, &mut gate, actions);
            }
            ConnTag::Unknown | ConnTag::Scheduler => {}
        }
    }
}

/// Answer `h` with `refusal`. A request routed with an older table than this server's is
/// a redirect: the current table goes first, so the worker learns it from here too (not
/// only from the scheduler) and resends.
pub(super) fn refuse(ready: &Ready, conn: &Conn, h: &pserv_transport::Header, refusal: Refusal) {
    let Refusal(status, msg) = refusal;
    if status == Status::StaleEpoch && h.epoch != 0 {
        let table = ready.table.read().clone();
        if u64::from(h.epoch) < table.epoch() {
            let t = Control::Table {
                partition: (*table).clone(),
            };
            let _ = conn.send(t.to_frame(ready.node_id));
        }
    }
    tracing::debug!(peer = %conn.peer_addr(), %status, %msg, "refused a request");
    let _ = conn.send(proto::error_answer(h, ready.node_id, status, &msg));
}

/// The keys of a data request, or `None` when they are malformed (a backwards range,
/// unsorted keys: `serve` refuses those with the reason).
pub(super) fn keys_of<'a>(f: &'a Frame<'_>) -> Option<KeysRef<'a>> {
    match f.range() {
        Some((b, e)) if b > e => None,
        Some((b, e)) => Some(KeysRef::Range(KeyRange::new(b, e))),
        None if f.keys().windows(2).any(|w| w[0] >= w[1]) => None,
        None => Some(KeysRef::List(f.keys())),
    }
}

/// The routing checks of a data request (epoch, ownership, hand-off), without the store.
pub(super) fn precheck(ready: &Ready, f: &Frame<'_>) -> Option<Refusal> {
    // Malformed keys: serve() answers them with the reason.
    let keys = keys_of(f)?;
    let table = ready.table.read();
    route(&table, ready.rank as usize, f.header().epoch, keys, |k| {
        ready.repl.handoff_pending(k)
    })
}

/// Whether node `id` is a server of the cluster (servers that joined later have ids
/// above every worker's).
pub(super) fn is_server(ready: &Ready, id: u32) -> bool {
    matches!(NodeId(id).who(ready.servers), Who::Server(_))
}

/// The worker whose node id is `id`, if it is one (also a worker that joined after this
/// server got its table: its rank is not below the number of workers then).
pub(super) fn worker_of(ready: &Ready, id: u32) -> Option<WorkerRank> {
    match NodeId(id).who(ready.servers) {
        Who::Worker(w) => Some(w),
        Who::Scheduler | Who::Server(_) => None,
    }
}

/// The store, for replication (through the server, so installs into keys of a
/// one-sided window update the window too).
pub(super) fn entries(ready: &Ready) -> &dyn EntryStore {
    ready
}

/// A clocked request the gate holds: where it came from, its bytes, when it arrived,
/// the table ranges it touches.
pub(super) struct Held {
    pub(super) conn: Conn,
    pub(super) frame: OwnedFrame,
    pub(super) since: std::time::Instant,
    pub(super) ranges: Vec<KeyRange>,
}

/// A request served this long after it arrived counts as held by the gate (requests
/// served at once take a few microseconds).
pub(super) const HELD_MIN: Duration = Duration::from_micros(50);

/// Carry out the gate's decisions, in order, with the gate still locked (the order of
/// applies is what sequential consistency promises).
pub(super) fn run_actions(
    core: &Core,
    ready: &Ready,
    gate: &mut ClockGate<Held>,
    actions: Vec<Action<Held>>,
) {
    let publish = !actions.is_empty();
    for a in actions {
        match a {
            Action::Apply(p) | Action::Answer(p) => {
                let waited = p.since.elapsed();
                if waited >= HELD_MIN {
                    ready.held.0.fetch_add(1, Ordering::Relaxed);
                    ready
                        .held
                        .1
                        .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                }
                let clock = gate.min(&p.ranges);
                answer_request(core, ready, &p.frame.frame(), &p.conn, clock);
            }
        }
    }
    if publish {
        // One-sided readers wait on this word instead of the gate (after the applies).
        if let Some(os) = ready.onesided.as_ref() {
            for w in os.windows() {
                w.publish_clock(gate.clock().min(w.range));
            }
        }
    }
}
