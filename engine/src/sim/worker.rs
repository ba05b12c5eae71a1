//! A simulated worker process: a small training loop (tick, pull, push, now and then a
//! barrier) over the shipped request code: requests are built by `worker::request` with
//! the worker's header, split by the routing table, judged, parked and resent by the
//! same functions as `worker/` uses, and started by the real task gate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pserv_transport::wire::{Frame, MessageKind};
use pserv_transport::{DType, OutFrame};

use crate::base::keys::Key;
use crate::consistency::{Consistency, Gate};
use crate::placement::Partition;
use crate::proto::{segment_of, task_of, Control, Role, Status, WorkerStats};
use crate::worker::push_pull::{clocked_write, request_header};
use crate::worker::request::Request;
use crate::worker::retry::Failure;
use crate::worker::state::in_table;
use crate::worker::tasks::{
    completed_here_notices, completed_notice, judge_answer, Outcome, SegState, TaskState,
};
use crate::worker::Timestamp;

use super::net::{Addr, ConnId, Msg, Timer};
use super::rng::Rng;
use super::store::{push_id, PushId};
use super::world::Ctx;

/// The retry thread's tick.
const RETRY_TICK_US: u64 = 2_000;
/// How long a failed segment may wait for a resend before its task fails.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker looks for a restarted scheduler.
const REJOIN_GRACE_US: u64 = 20_000_000;

/// What the training loop of one worker does.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Iterations (clocks); a late worker runs unclocked.
    pub(crate) iterations: u64,
    /// The consistency model of its tasks.
    pub(crate) model: Consistency,
    /// Pull before each push.
    pub(crate) pulls: bool,
    /// A barrier every this many iterations (0: none).
    pub(crate) barrier_every: u64,
    /// Most tasks unfinished before the loop waits.
    pub(crate) in_flight: usize,
    /// Keys to choose from, sorted.
    pub(crate) keys: Arc<Vec<Key>>,
    /// Most keys per push.
    pub(crate) keys_per_push: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Registering,
    Running,
    Barrier(u64),
    Finishing,
    Done,
}

struct SimTask {
    st: TaskState,
    remaining: usize,
    keys: Vec<Key>,
    /// The push's id (pushes).
    id: Option<PushId>,
}

/// A simulated worker process.
pub(crate) struct SimWorker {
    pub(crate) rank: u32,
    /// Registered with the job running (no rank asked for, unclocked).
    pub(crate) late: bool,
    pub(crate) life: u64,
    pub(crate) alive: bool,
    pub(crate) exited: bool,
    node_id: u32,
    sched: Option<ConnId>,
    servers: Vec<Option<ConnId>>,
    table: Option<Arc<Partition>>,
    tasks: BTreeMap<Timestamp, SimTask>,
    gate: Gate,
    deferred: BTreeMap<Timestamp, (u64, Vec<(u32, OutFrame)>)>,
    next_ts: Timestamp,
    retrying: BTreeSet<Timestamp>,
    retry_at: Option<u64>,
    clock: u64,
    phase: Phase,
    plan: Plan,
    rng: Rng,
    barriers: u64,
    over: bool,
    lost_sched_at: Option<u64>,
    /// The instant sim time 0 stands for (the shipped code keeps `Instant`s).
    base: Instant,
    /// Iteration next to start (1-based).
    iteration: u64,
    /// Tasks finished, for the report.
    pub(crate) finished: u64,
}

impl SimWorker {
    /// A worker process (not started); its choices come from `rng`.
    pub(crate) fn new(rank: u32, late: bool, plan: Plan, rng: Rng, base: Instant) -> SimWorker {
        SimWorker {
            rank,
            late,
            life: 0,
            alive: false,
            exited: false,
            node_id: 0,
            sched: None,
            servers: Vec::new(),
            table: None,
            tasks: BTreeMap::new(),
            gate: Gate::new(),
            deferred: BTreeMap::new(),
            next_ts: 1,
            retrying: BTreeSet::new(),
            retry_at: None,
            clock: 0,
            phase: Phase::Registering,
            plan,
            rng,
            barriers: 0,
            over: false,
            lost_sched_at: None,
            base,
            iteration: 1,
            finished: 0,
        }
    }

    fn me(&self) -> Addr {
        Addr::Worker(self.rank)
    }

    /// Whether it finished its loop and reported.
    pub(crate) fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn now(&self, ctx: &Ctx<'_>) -> Instant {
        self.base + Duration::from_micros(ctx.net.now)
    }

    /// Start the process: register with the scheduler.
    pub(crate) fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.alive = true;
        self.life += 1;
        if !ctx.accepting(Addr::Sched) {
            ctx.trace(format!(
                "worker {} cannot reach the scheduler; exits",
                self.rank
            ));
            self.exit(ctx);
            return;
        }
        let c = ctx.net.connect(self.me(), Addr::Sched);
        self.sched = Some(c);
        let hello = Control::Register {
            role: Role::Worker,
            addr: None,
            // The simulation names processes by rank: a late worker asks for the next
            // one, which the scheduler gives it.
            rank: Some(self.rank),
            pid: 2000 + self.rank,
        };
        ctx.net.send(c, self.me(), Msg::Control(hello));
    }

    /// The process dies: its connections close.
    pub(crate) fn exit(&mut self, ctx: &mut Ctx<'_>) {
        self.alive = false;
        self.exited = true;
        ctx.net.close_all(self.me(), false);
    }

    /// The process ends after reporting (its last messages leave first).
    pub(crate) fn exit_flushed(&mut self, ctx: &mut Ctx<'_>) {
        self.alive = false;
        self.exited = true;
        ctx.net.close_all(self.me(), true);
    }

    /// A message arrived on `conn`.
    pub(crate) fn on_msg(&mut self, ctx: &mut Ctx<'_>, conn: ConnId, msg: Msg) {
        if Some(conn) == self.sched {
            if let Msg::Control(c) = msg {
                self.on_scheduler_msg(ctx, c);
            }
            return;
        }
        let Addr::Server(server) = ctx.net.peer(conn, self.me()) else {
            return;
        };
        match msg {
            Msg::Control(Control::Table { partition }) => self.install(ctx, partition),
            Msg::Control(other) => ctx.trace(format!("worker {} ignores {other:?}", self.rank)),
            Msg::Data(bytes) => self.on_answer(ctx, server, &bytes),
        }
    }

    fn on_scheduler_msg(&mut self, ctx: &mut Ctx<'_>, msg: Control) {
        match msg {
            Control::Welcome {
                node_id,
                rank,
                cluster,
                ..
            } if self.phase == Phase::Registering => {
                debug_assert!(self.late || rank == self.rank, "the rank asked for");
                if self.late {
                    // The scheduler picks a late worker's rank; the simulation names
                    // processes by rank, so it asked for the one it would get.
                    debug_assert_eq!(rank, self.rank, "late ranks follow the first ones");
                }
                self.node_id = node_id;
                let me = self.me();
                let n = cluster
                    .servers
                    .iter()
                    .map(|s| s.rank + 1)
                    .max()
                    .unwrap_or(0);
                self.servers = vec![None; n as usize];
                for s in &cluster.servers {
                    if ctx.accepting(Addr::Server(s.rank)) {
                        self.servers[s.rank as usize] =
                            Some(ctx.net.connect(me, Addr::Server(s.rank)));
                    }
                }
                ctx.check.table_seen(me, &cluster.partition);
                self.table = Some(Arc::new(cluster.partition));
                self.phase = Phase::Running;
                ctx.net.timer(me, self.life, Timer::Step, 10);
            }
            Control::Refused { reason } => {
                ctx.trace(format!("worker {} refused: {reason}", self.rank));
                if self.phase == Phase::Registering {
                    self.exit(ctx);
                }
            }
            Control::Table { partition } => self.install(ctx, partition),
            Control::Servers { servers } => {
                let me = self.me();
                for s in servers {
                    let r = s.rank as usize;
                    if self.servers.len() <= r {
                        self.servers.resize(r + 1, None);
                    }
                    if self.servers[r].is_none() && ctx.accepting(Addr::Server(s.rank)) {
                        self.servers[r] = Some(ctx.net.connect(me, Addr::Server(s.rank)));
                    }
                }
            }
            Control::BarrierDone { seq, clock, .. }
                if self.phase == Phase::Barrier(seq) || matches!(self.phase, Phase::Barrier(0)) =>
            {
                if self.late && self.phase == Phase::Barrier(0) {
                    // Entered at this barrier (the servers' gates count it from `clock`):
                    // clocked from here on, like the others.
                    self.late = false;
                    self.clock = clock;
                    self.iteration = self.iteration.max(clock + 1);
                }
                self.barriers = seq;
                self.phase = Phase::Running;
                let me = self.me();
                ctx.net.timer(me, self.life, Timer::Step, 10);
            }
            Control::Shutdown => self.over = true,
            _ => {}
        }
    }

    fn install(&mut self, ctx: &mut Ctx<'_>, table: Partition) {
        if self
            .table
            .as_ref()
            .is_some_and(|t| t.epoch() >= table.epoch())
        {
            return;
        }
        ctx.check.table_seen(self.me(), &table);
        self.table = Some(Arc::new(table));
        self.wake(ctx, 1);
    }

    fn wake(&mut self, ctx: &mut Ctx<'_>, after_us: u64) {
        let at = ctx.net.now + after_us;
        if self.retry_at.is_some_and(|t| t <= at && t >= ctx.net.now) {
            return;
        }
        self.retry_at = Some(at);
        let me = self.me();
        ctx.net.timer(me, self.life, Timer::Retry, after_us);
    }

    fn alive_server(&self, ctx: &Ctx<'_>, s: u32) -> bool {
        self.servers
            .get(s as usize)
            .copied()
            .flatten()
            .is_some_and(|c| ctx.net.usable(c, self.me()))
    }

    /// A timer fired.
    pub(crate) fn on_timer(&mut self, ctx: &mut Ctx<'_>, kind: Timer) {
        match kind {
            Timer::Step => self.step(ctx),
            Timer::Retry => {
                if self.retry_at.is_some_and(|t| t > ctx.net.now) {
                    return;
                }
                self.retry_at = None;
                self.retry_pass(ctx);
                if !self.retrying.is_empty() {
                    self.wake(ctx, RETRY_TICK_US);
                }
            }
            Timer::Rejoin => self.rejoin(ctx),
            _ => {}
        }
    }

    /// The training loop's next step.
    fn step(&mut self, ctx: &mut Ctx<'_>) {
        let me = self.me();
        match self.phase {
            Phase::Running => {}
            Phase::Finishing => {
                if !self.tasks.is_empty() {
                    ctx.net.timer(me, self.life, Timer::Step, 1_000);
                    return;
                }
                let Some(c) = self.sched.filter(|&c| ctx.net.usable(c, me)) else {
                    // The real worker's `finish` fails without a scheduler; the
                    // simulation waits for the restarted one instead.
                    ctx.net.timer(me, self.life, Timer::Step, 10_000);
                    return;
                };
                ctx.net.send(
                    c,
                    me,
                    Msg::Control(Control::Done {
                        stats: WorkerStats {
                            examples: self.finished,
                            ..WorkerStats::default()
                        },
                    }),
                );
                self.over = true;
                self.phase = Phase::Done;
                ctx.trace(format!("worker {} done", self.rank));
                return;
            }
            _ => return,
        }
        if self.iteration > self.plan.iterations {
            self.phase = Phase::Finishing;
            ctx.net.timer(me, self.life, Timer::Step, 10);
            return;
        }
        if self.tasks.len() >= self.plan.in_flight {
            ctx.net.timer(me, self.life, Timer::Step, 500);
            return;
        }
        let c = self.iteration;
        self.iteration += 1;
        if !self.late {
            self.clock = c;
        }
        let n = self.rng.between(1, self.plan.keys_per_push);
        let mut keys: Vec<Key> = (0..n)
            .map(|_| self.plan.keys[self.rng.below(self.plan.keys.len() as u64) as usize])
            .collect();
        keys.sort_unstable();
        keys.dedup();
        if self.plan.pulls && self.rng.chance(600) {
            self.launch(ctx, MessageKind::Pull, keys.clone());
        }
        self.launch(ctx, MessageKind::Push, keys);
        if self.plan.barrier_every > 0 && c.is_multiple_of(self.plan.barrier_every) && !self.late {
            let seq = self.barriers + 1;
            self.phase = Phase::Barrier(seq);
            if let Some(conn) = self.sched {
                ctx.net
                    .send(conn, me, Msg::Control(Control::Barrier { seq, clock: c }));
            }
            return;
        }
        let think = self.rng.between(1_000, 30_000);
        ctx.net.timer(me, self.life, Timer::Step, think);
    }

    /// `Worker::launch`: a timestamp, the request split by the current table, started now
    /// or parked by the gate.
    fn launch(&mut self, ctx: &mut Ctx<'_>, kind: MessageKind, keys: Vec<Key>) {
        let table = self.table.clone().expect("running workers have a table");
        let ts = self.next_ts;
        self.next_ts += 1;
        let model = if self.late {
            Consistency::Eventual
        } else {
            self.plan.model
        };
        let header = request_header(
            kind,
            self.node_id,
            (DType::F64 as u8, 1),
            0,
            self.clock,
            model,
        );
        let id = (kind == MessageKind::Push).then(|| push_id(self.clock, self.rank, ts));
        let values = id.map(|id| vec![id as f64; keys.len()].into());
        let request = Request::keyed::<f64>(
            header,
            1,
            clocked_write(self.clock, kind),
            keys.clone().into(),
            values,
        );
        let clock_to: Vec<u32> = if request.clocked {
            (0..self.servers.len() as u32)
                .filter(|&s| self.alive_server(ctx, s) && in_table(&table, s))
                .collect()
        } else {
            Vec::new()
        };
        let plan = request.first_plan(&table, &clock_to);
        let (segments, frames) = request.messages(&table, ts, 0, plan);
        if let Some(id) = id {
            ctx.check.pushed(self.rank, ts, id, &keys);
        }
        let started = self.gate.submit(ts, model, &[]);
        let remaining = segments.len();
        self.tasks.insert(
            ts,
            SimTask {
                st: TaskState {
                    noticed: Vec::new(),
                    segments,
                    error: None,
                    waiter: None,
                    keeps_values: kind != MessageKind::Push,
                    dtype: DType::F64 as u8,
                    request: Some(Arc::new(request)),
                    started,
                },
                remaining,
                keys,
                id,
            },
        );
        if !started {
            self.deferred.insert(ts, (table.epoch(), frames));
            return;
        }
        if frames.is_empty() {
            self.tasks.remove(&ts);
            self.task_done(ctx, ts);
            return;
        }
        for (server, frame) in frames {
            self.send(ctx, server, frame);
        }
    }

    /// `Core::send`: a failed send fails its segment retryably.
    fn send(&mut self, ctx: &mut Ctx<'_>, server: u32, frame: OutFrame) {
        let stamp = frame.header().timestamp;
        let me = self.me();
        let Some(conn) = self.servers.get(server as usize).copied().flatten() else {
            self.settle(ctx, stamp, server, |_, _| {
                Outcome::Retry(Failure::Refused {
                    server,
                    status: Status::StaleEpoch,
                    message: "not connected to this server yet".into(),
                })
            });
            return;
        };
        if !ctx.net.send(conn, me, Msg::Data(frame.to_bytes())) {
            self.settle(ctx, stamp, server, |_, _| {
                Outcome::Retry(Failure::Disconnected { server })
            });
        }
    }

    fn on_answer(&mut self, ctx: &mut Ctx<'_>, server: u32, bytes: &[u8]) {
        let Ok((f, _)) = Frame::new_checked(bytes, 1 << 24) else {
            ctx.check
                .violation("a malformed answer on the simulated wire".into());
            return;
        };
        let h = *f.header();
        let value_bytes = f.values().len();
        let error_text = (h.status != Status::Ok as u8)
            .then(|| String::from_utf8_lossy(f.values()).into_owned());
        let mut acked: Option<(PushId, Vec<Key>)> = None;
        self.settle(ctx, h.timestamp, server, |t, seg| {
            let (outcome, _keep) =
                judge_answer(&mut t.st, seg, server, &h, value_bytes, error_text);
            if let (Outcome::Done, Some(id), true) = (&outcome, t.id, h.status == Status::Ok as u8)
            {
                let keys: Vec<Key> = t.st.segments[seg]
                    .runs
                    .iter()
                    .flat_map(|r| t.keys[r.clone()].iter().copied())
                    .collect();
                acked = Some((id, keys));
            }
            outcome
        });
        if acked.is_some() {
            ctx.check.acks_received += 1;
        }
    }

    /// `Core::settle`: record the answer (or failure) of the segment `stamp` names.
    fn settle(
        &mut self,
        ctx: &mut Ctx<'_>,
        stamp: u64,
        server: u32,
        judge: impl FnOnce(&mut SimTask, usize) -> Outcome,
    ) {
        let (ts, seg) = (task_of(stamp), segment_of(stamp));
        let now = self.now(ctx);
        let table = self.table.clone();
        let Some(t) = self.tasks.get_mut(&ts) else {
            return;
        };
        let expected =
            t.st.segments
                .get(seg)
                .is_some_and(|s| s.server == server && matches!(s.state, SegState::Sent));
        if !expected {
            return;
        }
        match judge(t, seg) {
            Outcome::Done => {
                t.st.segments[seg].state = SegState::Done;
                let notices = match (&table, t.remaining > 1) {
                    (Some(table), true) => completed_here_notices(&mut t.st, table),
                    _ => Vec::new(),
                };
                let me = self.me();
                for (s, notice) in notices {
                    if let Some(Some(c)) = self.servers.get(s as usize) {
                        ctx.net.send(*c, me, Msg::Control(notice));
                    }
                }
                self.count_off(ctx, ts, 1);
            }
            Outcome::Retry(failure) => {
                t.st.park(seg, failure, now);
                self.retrying.insert(ts);
                self.wake(ctx, 1);
            }
        }
    }

    fn count_off(&mut self, ctx: &mut Ctx<'_>, ts: Timestamp, n: usize) {
        if n == 0 {
            return;
        }
        let Some(t) = self.tasks.get_mut(&ts) else {
            return;
        };
        debug_assert!(t.remaining >= n, "task {ts} counted below zero");
        t.remaining -= n;
        if t.remaining > 0 {
            return;
        }
        let t = self.tasks.remove(&ts).expect("found above");
        if let Some(e) = &t.st.error {
            ctx.check
                .violation(format!("worker {} task {ts} failed: {e}", self.rank));
        }
        self.finished += 1;
        if let Some((notice, _sender)) = completed_notice(&t.st) {
            let table = self.table.clone().expect("running workers have a table");
            let me = self.me();
            for (s, c) in self.servers.clone().iter().enumerate() {
                if let Some(c) = c.filter(|_| in_table(&table, s as u32)) {
                    ctx.net.send(c, me, Msg::Control(notice.clone()));
                }
            }
        }
        self.task_done(ctx, ts);
    }

    /// `Core::task_done`: tell the gate and start what it releases.
    fn task_done(&mut self, ctx: &mut Ctx<'_>, ts: Timestamp) {
        let mut start = Vec::new();
        let mut finished = vec![ts];
        while let Some(t) = finished.pop() {
            for ready in self.gate.finish(t) {
                let (epoch, frames) = self.deferred.remove(&ready).unwrap_or_default();
                if frames.is_empty() {
                    finished.push(ready);
                    self.tasks.remove(&ready);
                } else {
                    start.push((ready, epoch, frames));
                }
            }
        }
        let table = self.table.clone().expect("running workers have a table");
        for (t, epoch, frames) in start {
            if let Some(task) = self.tasks.get_mut(&t) {
                task.st.started = true;
            }
            if epoch != table.epoch() {
                self.requeue(ctx, t);
                continue;
            }
            for (server, frame) in frames {
                self.send(ctx, server, frame);
            }
        }
    }

    /// `Core::requeue`: every unsent segment waits for a resend under the current table.
    fn requeue(&mut self, ctx: &mut Ctx<'_>, ts: Timestamp) {
        let now = self.now(ctx);
        let Some(t) = self.tasks.get_mut(&ts) else {
            return;
        };
        for i in 0..t.st.segments.len() {
            if matches!(t.st.segments[i].state, SegState::Sent) {
                let server = t.st.segments[i].server;
                let failure = Failure::Refused {
                    server,
                    status: Status::StaleEpoch,
                    message: "not sent: the routing table changed while the task waited".into(),
                };
                t.st.park(i, failure, now);
            }
        }
        self.retrying.insert(ts);
        self.wake(ctx, 1);
    }

    /// `Core::server_lost`.
    fn server_lost(&mut self, ctx: &mut Ctx<'_>, server: u32) {
        let now = self.now(ctx);
        let mut any = false;
        for (ts, t) in self.tasks.iter_mut() {
            if !t.st.started {
                continue;
            }
            let mut hit = false;
            for i in 0..t.st.segments.len() {
                let s = &t.st.segments[i];
                if s.server == server && matches!(s.state, SegState::Sent) {
                    t.st.park(i, Failure::Disconnected { server }, now);
                    hit = true;
                }
            }
            if hit {
                self.retrying.insert(*ts);
                any = true;
            }
        }
        if any {
            self.wake(ctx, 1);
        }
    }

    /// `Core::retry_pass`.
    fn retry_pass(&mut self, ctx: &mut Ctx<'_>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let now = self.now(ctx);
        let list: Vec<Timestamp> = self.retrying.iter().copied().collect();
        let alive: Vec<bool> = (0..self.servers.len() as u32)
            .map(|s| self.alive_server(ctx, s))
            .collect();
        let alive = |s: u32| alive.get(s as usize).copied().unwrap_or(false);
        for ts in list {
            let Some(t) = self.tasks.get_mut(&ts) else {
                self.retrying.remove(&ts);
                continue;
            };
            let r = t.st.resend_due(ts, &table, now, TIMEOUT, &alive);
            if !r.waiting {
                self.retrying.remove(&ts);
            }
            t.remaining += r.added;
            self.count_off(ctx, ts, r.closed);
            for (server, frame) in r.sends {
                self.send(ctx, server, frame);
            }
        }
    }

    /// `conn` closed (this end learnt it).
    pub(crate) fn on_closed(&mut self, ctx: &mut Ctx<'_>, conn: ConnId) {
        if Some(conn) == self.sched {
            if !self.over && self.lost_sched_at.is_none() {
                self.lost_sched_at = Some(ctx.net.now);
                let me = self.me();
                ctx.net.timer(me, self.life, Timer::Rejoin, 200_000);
            }
            return;
        }
        if let Some(s) = self.servers.iter().position(|c| *c == Some(conn)) {
            self.server_lost(ctx, s as u32);
        }
    }

    /// Look for a restarted scheduler (`Core::scheduler_lost`'s thread).
    fn rejoin(&mut self, ctx: &mut Ctx<'_>) {
        let Some(since) = self.lost_sched_at else {
            return;
        };
        let me = self.me();
        if ctx.net.now.saturating_sub(since) > REJOIN_GRACE_US {
            ctx.check
                .violation(format!("worker {} found no restarted scheduler", self.rank));
            return;
        }
        if !ctx.accepting(Addr::Sched) {
            ctx.net.timer(me, self.life, Timer::Rejoin, 200_000);
            return;
        }
        let c = ctx.net.connect(me, Addr::Sched);
        let table = self
            .table
            .as_ref()
            .map(|t| (**t).clone())
            .unwrap_or_else(|| Partition::even(1));
        let rejoin = Control::Rejoin {
            role: Role::Worker,
            rank: self.rank,
            node_id: self.node_id,
            addr: None,
            pid: 2000 + self.rank,
            table,
            barriers: self.barriers,
        };
        ctx.net.send(c, me, Msg::Control(rejoin));
        if let Phase::Barrier(seq) = self.phase {
            ctx.net
                .send(c, me, Msg::Control(Control::Barrier { seq, clock: 0 }));
        }
        self.sched = Some(c);
        self.lost_sched_at = None;
        ctx.trace(format!(
            "worker {} rejoins a restarted scheduler",
            self.rank
        ));
    }

    /// Tasks not finished.
    pub(crate) fn open_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// The open tasks and what each waits for, for a report.
    pub(crate) fn open_detail(&self) -> String {
        let mut parts = Vec::new();
        for (ts, t) in &self.tasks {
            let segs: Vec<String> =
                t.st.segments
                    .iter()
                    .filter(|s| !matches!(s.state, SegState::Done))
                    .map(|s| {
                        let st = match &s.state {
                            SegState::Sent => "sent".to_string(),
                            SegState::Waiting { failure, .. } => format!("waiting ({failure:?})"),
                            SegState::Done => "done".to_string(),
                        };
                        format!("server {} epoch {} {st}", s.server, s.epoch)
                    })
                    .collect();
            parts.push(format!(
                "ts {ts:#x} started {} deferred {} segs [{}]",
                t.st.started,
                self.deferred.contains_key(ts),
                segs.join(", ")
            ));
        }
        format!(
            "clock {} gate {:?} table {:?} phase {:?}: {}",
            self.clock,
            self.gate,
            self.table.as_ref().map(|t| t.epoch()),
            self.phase,
            parts.join("; ")
        )
    }
}
