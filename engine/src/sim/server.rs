//! A simulated server process: the shipped decision code (routing refusals, clock gate
//! admission, the table switch, the replication core) behind the same steps as
//! `server/` runs them, over the simulated network, with a [`SimStore`].
//!
//! What differs from the real process, on purpose: one event at a time (the real
//! server serves requests on several loops at once; the one interleaving it allows that
//! matters, requests served between a table switch and replication moving to the new
//! chains, is simulated with [`Timer::OnTable`]); values are push histories.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pserv_transport::wire::{Frame, MessageKind, FLAG_ORDERED, FLAG_RANGE, FLAG_RESPONSE};
use pserv_transport::Payload;

use crate::base::keys::KeyRange;
use crate::consistency::clock::{Action, ClockGate};
use crate::placement::Partition;
use crate::proto::{self, ClusterInfo, Control, Role, Status};
use crate::replication::core::{Output, ReplicationCore};
use crate::replication::{AnswerId, HeldPart, KeysRef, ReplicationConfig};
use crate::server::admit::{admit, completed_here, Clocked};
use crate::server::route::{route, stale_epoch, touched_ranges, unheld_keys, Refusal};
use crate::server::switch::{switch_table, Switched};

use super::net::{Addr, ConnId, Msg, Timer};
use super::store::SimStore;
use super::world::Ctx;

/// The largest frame a simulated server takes.
const MAX_FRAME: usize = 1 << 24;
/// How long a server told to shut down waits for its replication to go idle (the
/// real server's bound).
const STOP_WAIT_US: u64 = 5_000_000;

/// The control loop's timeout: heartbeats, reconnects, stopping once idle.
pub(crate) const TICK_US: u64 = 100_000;

/// A clocked request the gate holds.
struct Held {
    conn: ConnId,
    frame: Vec<u8>,
    ranges: Vec<KeyRange>,
}

impl Held {
    fn epoch(&self) -> u32 {
        header_of(&self.frame).epoch
    }
}

fn header_of(bytes: &[u8]) -> pserv_transport::Header {
    let (f, _) = Frame::new_checked(bytes, MAX_FRAME).expect("held frames were checked");
    *f.header()
}

/// A push answer waiting for replication: the connection, the answer's bytes, and what
/// it acknowledges (sender node, push, push id, keys).
type WaitingAnswer = (
    ConnId,
    Vec<u8>,
    (u32, u64, u64, Vec<crate::base::keys::Key>),
);

/// What a server knows once welcomed.
pub(crate) struct Ready {
    pub(crate) node_id: u32,
    first_servers: u32,
    workers: u32,
    pub(crate) table: Arc<Partition>,
    gate: ClockGate<Held>,
    pub(crate) core: ReplicationCore,
    pub(crate) store: SimStore,
    /// Connections to the other servers by rank (None: the connect failed).
    peers: BTreeMap<u32, Option<ConnId>>,
    undelivered: BTreeMap<u32, Vec<Control>>,
    /// Answers waiting for replication, with what they acknowledge (sender node, push,
    /// push id, keys).
    answers: BTreeMap<AnswerId, WaitingAnswer>,
    next_answer: u64,
    /// Accepted connections that sent a worker's data (tagged, as the real server does).
    tags: BTreeMap<ConnId, u32>,
}

/// A simulated server process.
pub(crate) struct SimServer {
    pub(crate) rank: u32,
    pub(crate) addr: SocketAddr,
    /// Started with `--join`.
    pub(crate) join: bool,
    /// Incarnation (timers of another one are ignored).
    pub(crate) life: u64,
    /// The process runs.
    pub(crate) alive: bool,
    /// The process ended (stopped, or registration failed).
    pub(crate) exited: bool,
    /// The scheduler connection.
    sched: Option<ConnId>,
    pub(crate) ready: Option<Ready>,
    /// Told to shut down: stops once replication is idle.
    stopping: bool,
    /// When told to shut down: the real server waits at most 5 s for its replication
    /// to go idle, then exits anyway.
    stop_by: u64,
    /// Asked to leave.
    pub(crate) leaving: bool,
    cfg: ReplicationConfig,
    /// Control messages waiting while the second half of a table switch is pending.
    control: VecDeque<Control>,
    on_table: Option<(Arc<Partition>, Arc<Partition>)>,
    /// When the flusher timer is due, if set.
    flush_at: Option<u64>,
}

impl SimServer {
    /// A server process of `rank` (not started).
    pub(crate) fn new(rank: u32, join: bool, cfg: ReplicationConfig) -> SimServer {
        SimServer {
            rank,
            addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + rank as u16)),
            join,
            life: 0,
            alive: false,
            exited: false,
            sched: None,
            ready: None,
            stopping: false,
            stop_by: u64::MAX,
            leaving: false,
            cfg,
            control: VecDeque::new(),
            on_table: None,
            flush_at: None,
        }
    }

    fn me(&self) -> Addr {
        Addr::Server(self.rank)
    }

    /// Start the process: connect to the scheduler and register (or join).
    pub(crate) fn start(&mut self, ctx: &mut Ctx<'_>) {
        debug_assert!(!self.alive, "a process starts once per life");
        self.alive = true;
        self.life += 1;
        if !ctx.accepting(Addr::Sched) {
            // The real server fails to start: the launcher sees it exit.
            ctx.trace(format!(
                "server {} cannot reach the scheduler; exits",
                self.rank
            ));
            self.exit(ctx, false);
            return;
        }
        let conn = ctx.net.connect(self.me(), Addr::Sched);
        self.sched = Some(conn);
        let hello = if self.join {
            Control::Join {
                addr: self.addr,
                rank: Some(self.rank),
                pid: 1000 + self.rank,
            }
        } else {
            Control::Register {
                role: Role::Server,
                addr: Some(self.addr),
                rank: Some(self.rank),
                pid: 1000 + self.rank,
            }
        };
        ctx.net.send(conn, self.me(), Msg::Control(hello));
        ctx.net
            .timer(self.me(), self.life, Timer::ServerTick, TICK_US);
    }

    /// The process dies (or, with `flush`, stops): its connections close.
    pub(crate) fn exit(&mut self, ctx: &mut Ctx<'_>, flush: bool) {
        self.alive = false;
        self.exited = true;
        ctx.net.close_all(self.me(), flush);
    }

    /// A message arrived on `conn`.
    pub(crate) fn on_msg(&mut self, ctx: &mut Ctx<'_>, conn: ConnId, msg: Msg) {
        if Some(conn) == self.sched {
            match msg {
                Msg::Control(c) => self.on_scheduler_msg(ctx, c),
                Msg::Data(_) => ctx.trace("data frame from the scheduler; ignored".into()),
            }
            return;
        }
        match msg {
            Msg::Control(c) => self.on_peer_msg(ctx, conn, c),
            Msg::Data(bytes) => self.on_data(ctx, conn, bytes),
        }
    }

    fn on_scheduler_msg(&mut self, ctx: &mut Ctx<'_>, msg: Control) {
        match msg {
            Control::Welcome {
                node_id,
                rank,
                cluster,
                ..
            } if self.ready.is_none() => self.welcome(ctx, node_id, rank, &cluster),
            Control::Refused { reason } if self.ready.is_none() || self.leaving => {
                ctx.trace(format!("server {} refused: {reason}; exits", self.rank));
                self.exit(ctx, true);
            }
            Control::Refused { reason } => {
                ctx.trace(format!("server {} refused: {reason}", self.rank));
            }
            other => {
                // The control loop, in order; it waits while a table switch finishes.
                self.control.push_back(other);
                self.run_control(ctx);
            }
        }
    }

    fn run_control(&mut self, ctx: &mut Ctx<'_>) {
        while self.on_table.is_none() && self.alive {
            let Some(msg) = self.control.pop_front() else {
                return;
            };
            match msg {
                Control::Table { partition } => self.install_table(ctx, partition),
                Control::Servers { servers } => {
                    let Some(ready) = self.ready.as_mut() else {
                        continue;
                    };
                    for s in servers {
                        if s.rank == self.rank
                            || ready.peers.get(&s.rank).is_some_and(Option::is_some)
                        {
                            continue;
                        }
                        if ctx.accepting(Addr::Server(s.rank)) {
                            let c = ctx
                                .net
                                .connect(Addr::Server(self.rank), Addr::Server(s.rank));
                            for m in ready.undelivered.remove(&s.rank).unwrap_or_default() {
                                ctx.net.send(c, Addr::Server(self.rank), Msg::Control(m));
                            }
                            ready.peers.insert(s.rank, Some(c));
                            ready.core.peer_up(s.rank);
                        }
                    }
                }
                Control::WorkerGone { rank } => {
                    if let Some(ready) = self.ready.as_mut() {
                        let actions = ready.gate.retire(rank as usize);
                        self.run_actions(ctx, actions);
                    }
                }
                Control::WorkerEnters { rank, clock } => {
                    // As `server/node.rs`: the gate counts the joiner, then says so.
                    if let Some(ready) = self.ready.as_mut() {
                        let actions = ready.gate.add_worker(rank as usize, clock);
                        ready.workers = ready.workers.max(rank + 1);
                        self.run_actions(ctx, actions);
                    }
                    if let Some(c) = self.sched {
                        let me = self.me();
                        ctx.net
                            .send(c, me, Msg::Control(Control::WorkerEntered { rank }));
                    }
                }
                Control::Shutdown => {
                    self.stopping = true;
                    self.stop_by = ctx.net.now + STOP_WAIT_US;
                    self.maybe_stop(ctx);
                }
                _ => {}
            }
        }
    }

    fn welcome(&mut self, ctx: &mut Ctx<'_>, node_id: u32, rank: u32, cluster: &ClusterInfo) {
        debug_assert_eq!(rank, self.rank, "the scheduler gives the rank asked for");
        let me = self.me();
        let mut peers = BTreeMap::new();
        for s in &cluster.servers {
            if s.rank == rank {
                continue;
            }
            let c = ctx
                .accepting(Addr::Server(s.rank))
                .then(|| ctx.net.connect(me, Addr::Server(s.rank)));
            peers.insert(s.rank, c);
        }
        let reachable = peers
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(r, _)| *r)
            .collect();
        let table = Arc::new(cluster.partition.clone());
        ctx.check.table_seen(me, &table);
        self.ready = Some(Ready {
            node_id,
            first_servers: cluster
                .servers
                .iter()
                .filter(|s| s.id == 1 + s.rank)
                .count() as u32,
            workers: cluster.workers,
            table,
            gate: {
                let mut gate = ClockGate::new(KeyRange::FULL, cluster.workers as usize);
                for &w in &cluster.gone_workers {
                    gate.retire(w as usize);
                }
                gate
            },
            core: ReplicationCore::new(rank, self.cfg, reachable),
            store: SimStore::default(),
            peers,
            undelivered: BTreeMap::new(),
            answers: BTreeMap::new(),
            next_answer: 1,
            tags: BTreeMap::new(),
        });
        if let Some(c) = self.sched {
            ctx.net.send(c, me, Msg::Control(Control::Ready));
        }
    }

    /// The scheduler sent a table: the switch as `Server::install_table` makes it; the
    /// replication half follows as a timer of its own.
    fn install_table(&mut self, ctx: &mut Ctx<'_>, new: Partition) {
        let me = self.me();
        let Some(ready) = self.ready.as_mut() else {
            return;
        };
        let new = Arc::new(new);
        let core = &mut ready.core;
        let switched = switch_table(
            &mut ready.gate,
            &mut ready.table,
            new.clone(),
            |old, new| {
                core.prepare_table(old, new);
            },
            Held::epoch,
        );
        let Some(Switched {
            old,
            stale,
            actions,
        }) = switched
        else {
            return;
        };
        ctx.check.table_seen(me, &new);
        ctx.trace(format!(
            "server {} table {} -> {}",
            self.rank,
            old.epoch(),
            new.epoch()
        ));
        for p in stale {
            let h = header_of(&p.frame);
            let refusal = Refusal(
                Status::StaleEpoch,
                format!("the routing table changed to epoch {}", new.epoch()),
            );
            self.refuse(ctx, p.conn, &h, refusal);
        }
        self.run_actions(ctx, actions);
        self.on_table = Some((old, new));
        let after = ctx.net.rng.below(200);
        ctx.net.timer(me, self.life, Timer::OnTable, after);
    }

    fn finish_table(&mut self, ctx: &mut Ctx<'_>) {
        let Some((old, new)) = self.on_table.take() else {
            return;
        };
        let now = Duration::from_micros(ctx.net.now);
        let mut out = Vec::new();
        if let Some(ready) = self.ready.as_mut() {
            ready.core.on_table(&ready.store, &old, &new, now, &mut out);
        }
        self.outputs(ctx, out);
        self.arm_flusher(ctx);
        self.run_control(ctx);
    }

    fn on_peer_msg(&mut self, ctx: &mut Ctx<'_>, conn: ConnId, msg: Control) {
        let from = ctx.net.peer(conn, self.me());
        let Some(ready) = self.ready.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        match (msg, from) {
            (Control::Replicate { batch }, Addr::Server(_)) => {
                ready.core.on_batch(&ready.store, batch, &mut out)
            }
            (Control::ReplicaAck { seq }, Addr::Server(_)) => {
                ctx.check.ack_received(self.rank, seq);
                ready.core.on_ack(seq, &mut out)
            }
            (Control::Completed { clock }, Addr::Worker(w)) => {
                // The real server reads the worker from the frame's sender (node id).
                if w < ready.workers {
                    let actions = ready.gate.completed(w as usize, clock);
                    self.run_actions(ctx, actions);
                }
            }
            (Control::CompletedHere { clock, epoch }, Addr::Worker(w)) => {
                if w < ready.workers {
                    let table = ready.table.clone();
                    let me = self.rank as usize;
                    let actions =
                        completed_here(&mut ready.gate, &table, me, (w as usize, clock, epoch));
                    self.run_actions(ctx, actions);
                }
            }
            (other, _) => ctx.trace(format!("server {} ignores {other:?}", self.rank)),
        }
        self.outputs(ctx, out);
        self.maybe_stop(ctx);
    }

    /// A data frame from a worker: the handler's steps (tag, unclocked or clocked,
    /// precheck, gate).
    fn on_data(&mut self, ctx: &mut Ctx<'_>, conn: ConnId, bytes: Vec<u8>) {
        let Ok((f, _)) = Frame::new_checked(&bytes, MAX_FRAME) else {
            ctx.check
                .violation("a malformed frame on the simulated wire".into());
            return;
        };
        let h = *f.header();
        let Some(ready) = self.ready.as_mut() else {
            let e = proto::error_answer(&h, 0, Status::NotReady, "server has no cluster table yet");
            ctx.net.send(conn, self.me(), Msg::Data(e.to_bytes()));
            return;
        };
        let worker = h.sender.checked_sub(1 + ready.first_servers);
        if let Some(w) = worker {
            ready.tags.entry(conn).or_insert(w);
        }
        if h.clock == 0 {
            self.answer_request(ctx, conn, &bytes, 0);
            return;
        }
        let Some(worker) = worker.filter(|&w| w < ready.workers) else {
            let msg = format!(
                "clocked request from node {}, which is not a worker",
                h.sender
            );
            let e = proto::error_answer(&h, ready.node_id, Status::BadRequest, &msg);
            ctx.net.send(conn, self.me(), Msg::Data(e.to_bytes()));
            return;
        };
        let keys = keys_of(&f);
        let me = self.rank as usize;
        let refusal = match keys {
            None => None,
            Some(k) => route(&ready.table, me, h.epoch, k, |k| {
                ready.core.handoff_pending(k).0
            }),
        };
        if let Some(r) = refusal {
            self.refuse(ctx, conn, &h, r);
            return;
        }
        if h.epoch != 0 && u64::from(h.epoch) != ready.table.epoch() {
            let r = stale_epoch(h.epoch, ready.table.epoch());
            self.refuse(ctx, conn, &h, r);
            return;
        }
        let Some(keys) = keys else {
            // Malformed keys: serving refuses them with the reason.
            self.answer_request(ctx, conn, &bytes, 0);
            return;
        };
        let ranges = touched_ranges(&ready.table, me, keys);
        let req = Clocked {
            worker: worker as usize,
            clock: h.clock,
            is_pull: h.kind == MessageKind::Pull as u8,
            ordered: h.has(FLAG_ORDERED),
            timestamp: h.timestamp,
            is_range: h.has(FLAG_RANGE),
        };
        let held = Held {
            conn,
            frame: bytes.clone(),
            ranges: ranges.clone(),
        };
        let table = ready.table.clone();
        let actions = admit(&mut ready.gate, &table, me, &req, ranges, held);
        self.run_actions(ctx, actions);
    }

    fn run_actions(&mut self, ctx: &mut Ctx<'_>, actions: Vec<Action<Held>>) {
        for a in actions {
            match a {
                Action::Apply(p) | Action::Answer(p) => {
                    let clock = self.ready.as_ref().map_or(0, |r| r.gate.min(&p.ranges));
                    self.answer_request(ctx, p.conn, &p.frame, clock);
                }
            }
        }
    }

    /// Serve one data request, as `server::serve` does: checks, routing, what is held,
    /// the apply, the answer (held back by replication for pushes).
    fn answer_request(&mut self, ctx: &mut Ctx<'_>, conn: ConnId, bytes: &[u8], clock: u64) {
        let (f, _) = Frame::new_checked(bytes, MAX_FRAME).expect("checked on arrival");
        let mut h = *f.header();
        h.clock = clock;
        let rank = self.rank;
        let me_addr = self.me();
        let ready = self.ready.as_mut().expect("serving needs the table");
        let bad = |m: &str| Refusal(Status::BadRequest, m.to_string());
        let kind = MessageKind::from_u8(h.kind);
        let checked = (|| {
            if h.has(FLAG_RESPONSE) {
                return Err(bad("servers do not take answers"));
            }
            if h.has(FLAG_RANGE) {
                return Err(bad("the simulation pushes key lists"));
            }
            let Some(kind) = kind.filter(|k| *k != MessageKind::Control) else {
                return Err(bad("unknown kind"));
            };
            if f.keys().windows(2).any(|w| w[0] >= w[1]) {
                return Err(bad("keys not sorted"));
            }
            let is_push = matches!(kind, MessageKind::Push | MessageKind::PushPull);
            let vals = f.values_as::<f64>().unwrap_or(&[]);
            if is_push && vals.len() != f.keys().len() {
                return Err(bad("one value per key"));
            }
            if let Some(r) = route(
                &ready.table,
                rank as usize,
                h.epoch,
                KeysRef::List(f.keys()),
                |k| ready.core.handoff_pending(k).0,
            ) {
                return Err(r);
            }
            Ok((kind, is_push))
        })();
        let (kind, is_push) = match checked {
            Ok(k) => k,
            Err(r) => return self.refuse(ctx, conn, &h, r),
        };
        let keys = f.keys();
        let table = ready.table.clone();
        let push = proto::push_id(h.timestamp);
        if is_push {
            let held = if table.replicas() > 0 {
                ready.core.held(h.sender, push, KeysRef::List(keys))
            } else {
                HeldPart::Nothing
            };
            if held != HeldPart::All {
                ready.core.note_apply(table.epoch(), KeysRef::List(keys));
            }
            let apply: Vec<usize> = match &held {
                HeldPart::Nothing => (0..keys.len()).collect(),
                HeldPart::All => Vec::new(),
                HeldPart::Part(ranges) => unheld_keys(keys, ranges),
            };
            let vals = f.values_as::<f64>().expect("checked above");
            for i in apply {
                let id = vals[i] as u64;
                let fresh = ready.store.apply(keys[i], id);
                ctx.check.applied(rank, keys[i], id, fresh);
            }
        }
        let values: Vec<f64> = if kind == MessageKind::Push {
            Vec::new()
        } else {
            if kind == MessageKind::Pull && h.clock > 0 {
                let retired = |w: usize| ready.gate.clock().is_retired(w);
                ctx.check
                    .pulled(rank, h.clock, keys, &ready.store, &retired, ready.workers);
            }
            keys.iter()
                .map(|&k| ready.store.history(k).len() as f64)
                .collect()
        };
        let vlen = if values.is_empty() { 0 } else { 1 };
        let answer = proto::answer(&h, ready.node_id, vlen, Payload::owned(values));
        if !is_push {
            ctx.net.send(conn, me_addr, Msg::Data(answer.to_bytes()));
            return;
        }
        let id = AnswerId(ready.next_answer);
        ready.next_answer += 1;
        let pid = f
            .values_as::<f64>()
            .and_then(|v| v.first())
            .map_or(0, |&v| v as u64);
        ready.answers.insert(
            id,
            (
                conn,
                answer.to_bytes(),
                (h.sender, push, pid, keys.to_vec()),
            ),
        );
        let now = Duration::from_micros(ctx.net.now);
        let mut out = Vec::new();
        let q = ready.core.after_apply(
            &table,
            h.sender,
            push,
            KeysRef::List(keys),
            id,
            now,
            &mut out,
        );
        if !q.full.is_empty() {
            ready
                .core
                .flush_chains(&ready.store, table.epoch(), q.full, now, &mut out);
        }
        self.outputs(ctx, out);
        if q.armed {
            self.arm_flusher(ctx);
        }
    }

    fn refuse(&mut self, ctx: &mut Ctx<'_>, conn: ConnId, h: &pserv_transport::Header, r: Refusal) {
        let Refusal(status, msg) = r;
        let Some(ready) = self.ready.as_ref() else {
            return;
        };
        let me = self.me();
        if status == Status::StaleEpoch && h.epoch != 0 && u64::from(h.epoch) < ready.table.epoch()
        {
            let t = Control::Table {
                partition: (*ready.table).clone(),
            };
            ctx.net.send(conn, me, Msg::Control(t));
        }
        let e = proto::error_answer(h, ready.node_id, status, &msg);
        ctx.net.send(conn, me, Msg::Data(e.to_bytes()));
    }

    /// Carry out the replication core's outputs, as the driver does: sends in order,
    /// then answers and sync reports.
    fn outputs(&mut self, ctx: &mut Ctx<'_>, out: Vec<Output>) {
        let me = self.me();
        let sched = self.sched;
        let Some(ready) = self.ready.as_mut() else {
            return;
        };
        for o in out {
            match o {
                Output::Send { to, msg } => {
                    ctx.check.replication_sent(self.rank, to, &msg);
                    match ready.peers.get(&to) {
                        Some(Some(c)) => {
                            ctx.net.send(*c, me, Msg::Control(msg));
                        }
                        Some(None) => {}
                        None => {
                            let q = ready.undelivered.entry(to).or_default();
                            if q.len() < 4096 {
                                q.push(msg);
                            }
                        }
                    }
                }
                Output::Answer(id) => match ready.answers.remove(&id) {
                    Some((conn, frame, (sender, push, pid, keys))) => {
                        ctx.trace(format!(
                            "server {} releases push {pid:#x} of node {sender} ({} keys from {:#x})",
                            self.rank,
                            keys.len(),
                            keys.first().copied().unwrap_or(0)
                        ));
                        ctx.check
                            .released(self.rank, sender, push, pid, keys, &ready.store);
                        ctx.net.send(conn, me, Msg::Data(frame));
                    }
                    None => ctx.check.violation(format!(
                        "server {}: answer {id:?} released twice",
                        self.rank
                    )),
                },
                Output::Synced(epoch) => {
                    if let Some(c) = sched {
                        ctx.net.send(c, me, Msg::Control(Control::Synced { epoch }));
                    }
                }
            }
        }
    }

    fn arm_flusher(&mut self, ctx: &mut Ctx<'_>) {
        let Some(ready) = self.ready.as_ref() else {
            return;
        };
        let Some(due) = ready.core.poll_timeout() else {
            return;
        };
        let due_us = (due.as_micros() as u64).max(ctx.net.now + 20);
        if self
            .flush_at
            .is_some_and(|t| t <= due_us && t >= ctx.net.now)
        {
            return;
        }
        self.flush_at = Some(due_us);
        let me = self.me();
        ctx.net
            .timer(me, self.life, Timer::Flush, due_us - ctx.net.now);
    }

    /// A timer fired.
    pub(crate) fn on_timer(&mut self, ctx: &mut Ctx<'_>, kind: Timer) {
        match kind {
            Timer::ServerTick => {
                self.tick(ctx);
                if self.alive {
                    ctx.net
                        .timer(self.me(), self.life, Timer::ServerTick, TICK_US);
                }
            }
            Timer::Flush => {
                if self.flush_at.is_some_and(|t| t > ctx.net.now) {
                    return;
                }
                self.flush_at = None;
                let now = Duration::from_micros(ctx.net.now);
                let mut out = Vec::new();
                if let Some(ready) = self.ready.as_mut() {
                    let epoch = ready.table.epoch();
                    ready
                        .core
                        .flush_due(&ready.store, epoch, false, now, &mut out);
                }
                self.outputs(ctx, out);
                self.arm_flusher(ctx);
                self.maybe_stop(ctx);
            }
            Timer::OnTable => self.finish_table(ctx),
            _ => {}
        }
    }

    fn tick(&mut self, ctx: &mut Ctx<'_>) {
        let me = self.me();
        let Some(ready) = self.ready.as_ref() else {
            return;
        };
        let closed = self.sched.is_none_or(|c| !ctx.net.usable(c, me));
        if closed && ctx.accepting(Addr::Sched) {
            let c = ctx.net.connect(me, Addr::Sched);
            let rejoin = Control::Rejoin {
                role: Role::Server,
                rank: self.rank,
                node_id: ready.node_id,
                addr: Some(self.addr),
                pid: 1000 + self.rank,
                table: (*ready.table).clone(),
                barriers: 0,
            };
            ctx.net.send(c, me, Msg::Control(rejoin));
            ctx.trace(format!(
                "server {} rejoins a restarted scheduler",
                self.rank
            ));
            self.sched = Some(c);
        }
        if let Some(c) = self.sched {
            ctx.net.send(c, me, Msg::Control(Control::Heartbeat));
        }
        self.maybe_stop(ctx);
    }

    fn maybe_stop(&mut self, ctx: &mut Ctx<'_>) {
        if !self.stopping || !self.alive {
            return;
        }
        if self.ready.as_ref().is_some_and(|r| !r.core.idle()) && ctx.net.now < self.stop_by {
            return;
        }
        ctx.trace(format!("server {} stops", self.rank));
        self.exit(ctx, true);
    }

    /// `conn` closed (this end learnt it).
    pub(crate) fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnId) {
        if Some(conn) == self.sched {
            return;
        }
        let Some(ready) = self.ready.as_mut() else {
            return;
        };
        if let Some((&rank, _)) = ready.peers.iter().find(|(_, c)| **c == Some(conn)) {
            let now = Duration::from_micros(ctx.net.now);
            let mut out = Vec::new();
            let table = ready.table.clone();
            ready
                .core
                .peer_lost(&ready.store, &table, rank, now, &mut out);
            self.outputs(ctx, out);
            return;
        }
        if let Some(w) = ready.tags.remove(&conn) {
            let actions = ready.gate.retire(w as usize);
            self.run_actions(ctx, actions);
        }
    }

    /// Ask the scheduler to let this server leave (SIGTERM).
    pub(crate) fn leave(&mut self, ctx: &mut Ctx<'_>) {
        self.leaving = true;
        let me = self.me();
        if let Some(c) = self.sched {
            ctx.net
                .send(c, me, Msg::Control(Control::Leave { rank: self.rank }));
        }
    }

    /// Whether its store counts: it runs, or it stopped when the job ended (its store
    /// is the final state; a server that left handed its ranges over first).
    pub(crate) fn holds_data(&self) -> bool {
        self.alive || (self.exited && self.stopping && !self.leaving)
    }

    /// Whether it ended with table `epoch` and nothing of its replication waiting.
    pub(crate) fn settled_at(&self, epoch: u64) -> bool {
        self.ready
            .as_ref()
            .is_some_and(|r| r.table.epoch() == epoch && r.core.idle())
    }

    /// Whether replication waits for nothing (or the process is gone).
    pub(crate) fn quiet(&self) -> bool {
        !self.alive || self.on_table.is_none() && self.ready.as_ref().is_none_or(|r| r.core.idle())
    }

    /// The gate's held requests (pulls, pushes).
    pub(crate) fn held(&self) -> (usize, usize) {
        self.ready
            .as_ref()
            .map_or((0, 0), |r| (r.gate.held_pulls(), r.gate.held_pushes()))
    }
}

/// The keys of a request, or `None` when they are malformed.
fn keys_of<'a>(f: &'a Frame<'_>) -> Option<KeysRef<'a>> {
    if f.keys().windows(2).any(|w| w[0] >= w[1]) {
        return None;
    }
    Some(KeysRef::List(f.keys()))
}
