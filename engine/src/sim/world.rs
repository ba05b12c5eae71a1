//! The simulated cluster: the real [`SchedulerCore`], simulated servers and workers, the
//! network, the faults, and the loop that runs one event at a time and checks after
//! each.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::base::keys::Key;
use crate::consistency::Consistency;
use crate::placement::ring::splitmix64;
use crate::proto::{Control, ValueType};
use crate::replication::ReplicationConfig;
use crate::scheduler::{ClusterSpec, Input, Output, SchedulerCore};
use crate::update::UpdateSpec;

use super::check::Checker;
use super::net::{Addr, ConnId, Delays, Event, Msg, Net, Timer};
use super::rng::Rng;
use super::server::SimServer;
use super::store::{PushId, SimStore};
use super::worker::{Plan, SimWorker};

/// The scheduler's tick.
const SCHED_TICK_US: u64 = 100_000;
/// The longest run, in simulated time.
const RUN_LIMIT_US: u64 = 120_000_000;
/// Lines of the event log kept for a failure report.
const LOG_LINES: usize = 4000;

/// A fault or membership change.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// A server process dies.
    CrashServer,
    /// A new server joins the running job.
    JoinServer,
    /// A server asks to leave.
    LeaveServer,
    /// The connections between a server and the scheduler stall for this long.
    IsolateServer(u64),
    /// The connections between two servers stall for this long.
    SplitServers(u64),
    /// The connections between a worker and a server stall for this long.
    SplitWorker(u64),
    /// The scheduler dies; a new one starts (`--recover`) after this long.
    CrashScheduler(u64),
    /// The scheduler process starts again.
    RestartScheduler,
    /// A worker dies.
    CrashWorker,
    /// A worker joins the running job.
    JoinWorker,
}

/// The settings of one run, drawn from its seed.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Servers at the start.
    pub servers: u32,
    /// Workers at the start.
    pub workers: u32,
    /// Replicas after each head.
    pub replicas: u32,
    /// Virtual nodes per server.
    pub vnodes: u32,
    /// Keys the workers push to.
    pub keys: u64,
    /// Iterations per worker.
    pub iterations: u64,
    /// The workers' consistency model.
    pub model: Consistency,
    /// Whether workers pull.
    pub pulls: bool,
    /// A barrier every this many iterations (0: none).
    pub barrier_every: u64,
    /// Replication batching.
    pub replication: ReplicationConfig,
    /// The scheduler's heartbeat timeout.
    pub heartbeat_timeout_ms: u64,
    /// Faults injected (none: the failure-free run).
    pub faults: Vec<(u64, FaultKind)>,
}

/// Which faults a run may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Server crash.
    Crash,
    /// Server join.
    Join,
    /// Server leave.
    Leave,
    /// Server cut off from the scheduler.
    Isolate,
    /// Two servers cut off from each other.
    SplitServers,
    /// A worker cut off from a server.
    SplitWorker,
    /// Scheduler crash and restart.
    Scheduler,
    /// Worker crash.
    WorkerCrash,
    /// Worker join.
    WorkerJoin,
}

impl SimConfig {
    /// The settings seed `seed` draws (`faults`: whether it injects faults).
    pub fn draw(seed: u64, faults: Option<Mix>) -> SimConfig {
        let mut r = Rng::new(seed);
        let servers = r.between(3, 5) as u32;
        let replicas = r.between(1, 2.min(u64::from(servers) - 2)) as u32;
        let model = match r.below(4) {
            0 | 1 => Consistency::Sequential,
            2 => Consistency::Eventual,
            _ => Consistency::BoundedDelay(r.between(1, 3)),
        };
        let max_pushes = r.between(1, 8) as usize;
        let window = Duration::from_micros(r.below(2) * r.between(0, 800));
        let cfg_repl = ReplicationConfig {
            max_pushes,
            window,
            // A zero window is the servers' group commit (their default): the batch
            // leaves at the end of the turn, here at the flusher's timer 20 us later.
            group_commit: window.is_zero(),
            remember_all: false,
        };
        let sequential = model == Consistency::Sequential;
        let clocked = model != Consistency::Eventual;
        let mut list = Vec::new();
        if let Some(mix) = faults {
            let n = r.between(1, 4);
            for _ in 0..n {
                let at = r.between(10_000, 300_000);
                let kinds: &[FaultKind] = if mix == Mix::Checked && clocked {
                    // A range that changes head loses its clock-gate state (open, see
                    // `Mix`): only faults that keep every range's head.
                    if sequential {
                        &[
                            FaultKind::SplitServers,
                            FaultKind::SplitWorker,
                            FaultKind::Scheduler,
                        ]
                    } else {
                        &[
                            FaultKind::SplitServers,
                            FaultKind::SplitWorker,
                            FaultKind::Scheduler,
                            FaultKind::WorkerCrash,
                            FaultKind::WorkerJoin,
                        ]
                    }
                } else if sequential {
                    // The failure-free model the run is compared with has the same
                    // workers: no worker comes or goes.
                    &[
                        FaultKind::Crash,
                        FaultKind::Crash,
                        FaultKind::Join,
                        FaultKind::Leave,
                        FaultKind::Isolate,
                        FaultKind::SplitServers,
                        FaultKind::SplitWorker,
                        FaultKind::Scheduler,
                    ]
                } else {
                    &[
                        FaultKind::Crash,
                        FaultKind::Crash,
                        FaultKind::Join,
                        FaultKind::Leave,
                        FaultKind::Isolate,
                        FaultKind::SplitServers,
                        FaultKind::SplitWorker,
                        FaultKind::Scheduler,
                        FaultKind::WorkerCrash,
                        FaultKind::WorkerJoin,
                    ]
                };
                list.push((at, kinds[r.below(kinds.len() as u64) as usize]));
            }
            list.sort_by_key(|(t, _)| *t);
        }
        SimConfig {
            servers,
            workers: r.between(2, 3) as u32,
            replicas,
            vnodes: r.between(2, 6) as u32,
            keys: r.between(16, 64),
            iterations: r.between(6, 20),
            model,
            pulls: r.chance(700),
            barrier_every: if r.chance(500) { r.between(3, 6) } else { 0 },
            replication: cfg_repl,
            heartbeat_timeout_ms: r.between(400, 1_000),
            faults: list,
        }
    }
}

/// Which faults a run draws from.
///
/// `All` is every fault with every consistency model. `Checked` (what CI runs) leaves
/// out, under sequential and bounded-delay consistency, the faults that give a range a
/// new head (server crash, isolation, join, leave): the clock gate's per-range clocks
/// live in each server and are not handed over with a range. Under sequential
/// consistency a new head no longer answers a pull early (a resent piece moves no clock),
/// but with several faults in a row gates can wait on each other for a clock they will
/// never see (a hang); under bounded delay a worker's first message of a clock to a new
/// head moves its clock there past a push of an older clock still being resent (a pull
/// answered early). Those are open findings of the simulation (`sim_seeds_all_faults`
/// shows them); with eventual consistency every fault is in both mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// What CI runs.
    Checked,
    /// Every fault.
    All,
}

/// What one run did.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// Events processed.
    pub events: u64,
    /// Simulated time at the end, in microseconds.
    pub time_us: u64,
    /// Pushes acknowledged.
    pub acked: usize,
    /// Faults injected (that applied).
    pub faults: Vec<String>,
    /// Pulls checked against the workers' clocks.
    pub pulls_checked: u64,
    /// The final routing-table epoch.
    pub epoch: u64,
    /// Per key, the final history (for the sequential comparison).
    pub finals: BTreeMap<Key, Vec<PushId>>,
    /// The event log (`PSERV_SIM_VERBOSE` only).
    #[doc(hidden)]
    pub log: Vec<String>,
}

/// A failed run: what broke, and the last events before it.
#[derive(Debug)]
pub struct SimFailure {
    /// The violations, first first.
    pub violations: Vec<String>,
    /// The last events.
    pub log: Vec<String>,
}

/// What process handlers get: the network, the checkers, who accepts connections, the
/// event log.
pub(crate) struct Ctx<'a> {
    pub(crate) net: &'a mut Net,
    pub(crate) check: &'a mut Checker,
    accepting: &'a BTreeSet<Addr>,
    log: &'a mut VecDeque<String>,
}

impl Ctx<'_> {
    /// Whether process `a` runs and accepts connections.
    pub(crate) fn accepting(&self, a: Addr) -> bool {
        self.accepting.contains(&a)
    }

    /// A line for the event log.
    pub(crate) fn trace(&mut self, line: String) {
        if self.log.len() >= LOG_LINES && std::env::var_os("PSERV_SIM_VERBOSE").is_none() {
            self.log.pop_front();
        }
        self.log.push_back(format!("{:>9}us {line}", self.net.now));
    }
}

/// The simulated cluster.
pub(crate) struct World {
    cfg: SimConfig,
    spec: ClusterSpec,
    net: Net,
    check: Checker,
    sched: Option<SchedulerCore>,
    sched_life: u64,
    servers: BTreeMap<u32, SimServer>,
    workers: BTreeMap<u32, SimWorker>,
    accepting: BTreeSet<Addr>,
    log: VecDeque<String>,
    job_done: bool,
    faults: Rng,
    next_server: u32,
    next_worker: u32,
    plan: Plan,
    base: Instant,
    worker_rngs: Rng,
    report: SimReport,
    /// `PSERV_SIM_VERBOSE`: every delivered message goes into the event log.
    verbose: bool,
}

/// One line for a delivered message.
fn describe(conn: ConnId, to: Addr, msg: &Msg) -> String {
    match msg {
        Msg::Control(c) => format!("{conn:?} -> {to:?}: {c:?}")
            .chars()
            .take(300)
            .collect(),
        Msg::Data(b) if b.len() >= pserv_transport::wire::HEADER_LEN => {
            let mut h = [0u8; pserv_transport::wire::HEADER_LEN];
            h.copy_from_slice(&b[..pserv_transport::wire::HEADER_LEN]);
            let h = pserv_transport::wire::Header::from_bytes(&h);
            format!(
                "{conn:?} -> {to:?}: kind {} status {} sender {} flags {:#x} ts {:#x} keys {} epoch {} clock {}",
                h.kind, h.status, h.sender, h.flags, h.timestamp, h.key_count, h.epoch, h.clock
            )
        }
        Msg::Data(b) => format!("{conn:?} -> {to:?}: {} bytes", b.len()),
    }
}

macro_rules! ctx {
    ($w:expr) => {
        Ctx {
            net: &mut $w.net,
            check: &mut $w.check,
            accepting: &$w.accepting,
            log: &mut $w.log,
        }
    };
}

impl World {
    /// The cluster of seed `seed` with settings `cfg`.
    pub(crate) fn new(seed: u64, cfg: SimConfig) -> World {
        let mut root = Rng::new(seed ^ 0xc1a5_7e55);
        let net_rng = root.fork(1);
        let faults = root.fork(2);
        // The workload depends on the seed only, not on the faults: the failure-free run
        // of a seed makes the same pushes.
        let worker_rngs = Rng::new(seed ^ 0x3057_11ad);
        let spec = ClusterSpec {
            servers: cfg.servers,
            workers: cfg.workers,
            value_type: ValueType::F64,
            value_len: 1,
            update: UpdateSpec::Sum,
            vnodes: cfg.vnodes,
            replicas: cfg.replicas,
        };
        let keys: Vec<Key> = {
            let mut k: Vec<Key> = (0..cfg.keys)
                .map(|i| splitmix64(seed ^ (i + 1)) >> 1)
                .collect();
            k.sort_unstable();
            k.dedup();
            k
        };
        let plan = Plan {
            iterations: cfg.iterations,
            model: cfg.model,
            pulls: cfg.pulls,
            barrier_every: cfg.barrier_every,
            in_flight: 3,
            keys: Arc::new(keys),
            keys_per_push: 6,
        };
        let delays = Delays {
            min_us: 20,
            max_us: 400,
            spike_per_mille: 20,
            spike_us: 20_000,
            close_us: 5_000,
        };
        World {
            spec: spec.clone(),
            net: Net::new(net_rng, delays),
            check: Checker::default(),
            sched: None,
            sched_life: 0,
            servers: BTreeMap::new(),
            workers: BTreeMap::new(),
            accepting: BTreeSet::new(),
            log: VecDeque::new(),
            job_done: false,
            faults,
            next_server: cfg.servers,
            next_worker: cfg.workers,
            plan,
            base: Instant::now(),
            worker_rngs,
            report: SimReport::default(),
            verbose: std::env::var_os("PSERV_SIM_VERBOSE").is_some(),
            cfg,
        }
    }

    fn trace(&mut self, line: String) {
        ctx!(self).trace(line);
    }

    fn start_scheduler(&mut self, recovering: bool) {
        let mut core = SchedulerCore::new(self.spec.clone())
            .with_heartbeat_timeout(Duration::from_millis(self.cfg.heartbeat_timeout_ms));
        if recovering {
            core = core.recovering(Duration::from_millis(500));
        }
        self.sched = Some(core);
        self.sched_life += 1;
        self.accepting.insert(Addr::Sched);
        let life = self.sched_life;
        self.net.timer(Addr::Sched, life, Timer::SchedTick, 0);
    }

    fn start_server(&mut self, rank: u32, join: bool) {
        let mut s = SimServer::new(rank, join, self.cfg.replication);
        self.check.forget(Addr::Server(rank));
        self.accepting.insert(Addr::Server(rank));
        s.start(&mut ctx!(self));
        if !s.alive {
            self.accepting.remove(&Addr::Server(rank));
        }
        self.servers.insert(rank, s);
    }

    fn start_worker(&mut self, rank: u32, late: bool) {
        let rng = self.worker_rngs.fork(u64::from(rank));
        let mut w = SimWorker::new(rank, late, self.plan.clone(), rng, self.base);
        self.accepting.insert(Addr::Worker(rank));
        w.start(&mut ctx!(self));
        self.workers.insert(rank, w);
    }

    /// Run to the end; returns the report or the violations.
    pub(crate) fn run(mut self) -> Result<SimReport, SimFailure> {
        self.start_scheduler(false);
        for r in 0..self.cfg.servers {
            self.start_server(r, false);
        }
        for w in 0..self.cfg.workers {
            self.start_worker(w, false);
        }
        for (at, kind) in self.cfg.faults.clone() {
            let f = match kind {
                FaultKind::Crash => Fault::CrashServer,
                FaultKind::Join => Fault::JoinServer,
                FaultKind::Leave => Fault::LeaveServer,
                FaultKind::Isolate => Fault::IsolateServer(self.faults.between(200_000, 1_500_000)),
                FaultKind::SplitServers => Fault::SplitServers(self.faults.between(5_000, 300_000)),
                FaultKind::SplitWorker => Fault::SplitWorker(self.faults.between(5_000, 300_000)),
                FaultKind::Scheduler => Fault::CrashScheduler(self.faults.between(50_000, 700_000)),
                FaultKind::WorkerCrash => Fault::CrashWorker,
                FaultKind::WorkerJoin => Fault::JoinWorker,
            };
            self.net.at(at, Event::Fault(f));
        }
        let mut quiet_since: Option<u64> = None;
        while let Some(ev) = self.net.pop() {
            self.report.events += 1;
            self.dispatch(ev);
            self.after_step();
            if !self.check.violations.is_empty() {
                return Err(self.failure());
            }
            if self.net.now > RUN_LIMIT_US {
                self.check.violation(format!(
                    "the job did not finish within {} s of simulated time ({})",
                    RUN_LIMIT_US / 1_000_000,
                    self.stuck()
                ));
                return Err(self.failure());
            }
            if self.job_done && self.all_quiet() {
                let t = *quiet_since.get_or_insert(self.net.now);
                if self.net.now - t > 50_000 {
                    break;
                }
            } else {
                quiet_since = None;
            }
        }
        if !self.job_done {
            self.check.violation(format!(
                "the run went quiet without the job ending ({})",
                self.stuck()
            ));
            return Err(self.failure());
        }
        self.end()
    }

    fn all_quiet(&self) -> bool {
        self.servers.values().all(SimServer::quiet)
    }

    /// What is still waiting, for a report.
    fn stuck(&self) -> String {
        let mut parts = Vec::new();
        for (r, w) in &self.workers {
            if w.alive && !w.done() {
                parts.push(format!("worker {r}: {} tasks open", w.open_tasks()));
                if self.verbose {
                    parts.push(format!("worker {r} detail: {}", w.open_detail()));
                }
            }
        }
        for (r, s) in &self.servers {
            if s.alive {
                let (p, q) = s.held();
                parts.push(format!(
                    "server {r}: {p} pulls, {q} pushes held, quiet {}",
                    s.quiet()
                ));
            }
        }
        parts.join("; ")
    }

    fn failure(&self) -> SimFailure {
        SimFailure {
            violations: self.check.violations.clone(),
            log: self.log.iter().cloned().collect(),
        }
    }

    fn after_step(&mut self) {
        let view: BTreeMap<u32, (bool, Option<&SimStore>)> = self
            .servers
            .iter()
            .map(|(r, s)| (*r, (s.holds_data(), s.ready.as_ref().map(|r| &r.store))))
            .collect();
        self.check.after_step(&view);
    }

    fn end(mut self) -> Result<SimReport, SimFailure> {
        let table = self
            .sched
            .as_ref()
            .map(|s| s.table().clone())
            .expect("the job ended with a scheduler");
        let view: BTreeMap<u32, (bool, Option<&SimStore>)> = self
            .servers
            .iter()
            .map(|(r, s)| (*r, (s.holds_data(), s.ready.as_ref().map(|r| &r.store))))
            .collect();
        let settled: BTreeSet<u32> = self
            .servers
            .iter()
            .filter(|(_, s)| s.settled_at(table.epoch()))
            .map(|(r, _)| *r)
            .collect();
        let finals = self.check.at_end(&table, &view, &settled);
        for (r, w) in &self.workers {
            if w.alive && !w.done() && !w.exited {
                self.check
                    .violations
                    .push(format!("worker {r} never finished"));
            }
        }
        if !self.check.violations.is_empty() {
            return Err(self.failure());
        }
        self.report.time_us = self.net.now;
        self.report.acked = self.check.acked_pushes();
        self.report.pulls_checked = self.check.pulls_checked;
        self.report.epoch = table.epoch();
        self.report.finals = finals;
        if self.verbose {
            self.report.log = self.log.iter().cloned().collect();
        }
        Ok(self.report)
    }

    fn dispatch(&mut self, ev: Event) {
        match ev {
            Event::Deliver { conn, to, msg } => {
                if !self.net.deliverable(conn, to) {
                    return;
                }
                self.net.delivered += 1;
                if self.verbose && !matches!(msg, Msg::Control(Control::Heartbeat)) {
                    let line = describe(conn, to, &msg);
                    self.trace(line);
                }
                self.deliver(conn, to, msg);
            }
            Event::Closed { conn, at } => {
                self.net.learn_closed(conn, at);
                match at {
                    Addr::Sched => {
                        if self.sched.is_some() {
                            self.sched_input(Input::Closed { conn: conn.0 });
                        }
                    }
                    Addr::Server(r) => {
                        if let Some(mut s) = self.servers.remove(&r) {
                            if s.alive {
                                s.on_closed(&mut ctx!(self), conn);
                            }
                            self.settle_server(r, s);
                        }
                    }
                    Addr::Worker(r) => {
                        if let Some(mut w) = self.workers.remove(&r) {
                            if w.alive {
                                w.on_closed(&mut ctx!(self), conn);
                            }
                            self.settle_worker(r, w);
                        }
                    }
                }
            }
            Event::Timer { at, life, kind } => match at {
                Addr::Sched => {
                    if self.sched.is_some() && life == self.sched_life {
                        let now_ms = self.net.now / 1_000;
                        self.sched_input(Input::Tick { now_ms });
                        self.net
                            .timer(Addr::Sched, life, Timer::SchedTick, SCHED_TICK_US);
                    }
                }
                Addr::Server(r) => {
                    if let Some(mut s) = self.servers.remove(&r) {
                        if s.alive && s.life == life {
                            s.on_timer(&mut ctx!(self), kind);
                        }
                        self.settle_server(r, s);
                    }
                }
                Addr::Worker(r) => {
                    if let Some(mut w) = self.workers.remove(&r) {
                        if w.alive && w.life == life {
                            w.on_timer(&mut ctx!(self), kind);
                        }
                        self.settle_worker(r, w);
                    }
                }
            },
            Event::Fault(f) => self.fault(f),
        }
    }

    /// Put a server back after a handler ran, noting whether it still accepts.
    fn settle_server(&mut self, r: u32, s: SimServer) {
        if !s.alive {
            self.accepting.remove(&Addr::Server(r));
        }
        self.servers.insert(r, s);
    }

    fn settle_worker(&mut self, r: u32, mut w: SimWorker) {
        if w.alive && w.done() {
            // `finish`: the report left; the process ends.
            w.exit_flushed(&mut ctx!(self));
        }
        if !w.alive {
            self.accepting.remove(&Addr::Worker(r));
        }
        self.workers.insert(r, w);
    }

    fn deliver(&mut self, conn: ConnId, to: Addr, msg: Msg) {
        match to {
            Addr::Sched => {
                if self.sched.is_none() {
                    return;
                }
                match msg {
                    Msg::Control(c) => self.sched_input(Input::Message {
                        conn: conn.0,
                        msg: c,
                    }),
                    Msg::Data(_) => {}
                }
            }
            Addr::Server(r) => {
                if let Some(mut s) = self.servers.remove(&r) {
                    if s.alive {
                        s.on_msg(&mut ctx!(self), conn, msg);
                    }
                    self.settle_server(r, s);
                }
            }
            Addr::Worker(r) => {
                if let Some(mut w) = self.workers.remove(&r) {
                    if w.alive {
                        w.on_msg(&mut ctx!(self), conn, msg);
                    }
                    self.settle_worker(r, w);
                }
            }
        }
    }

    fn sched_input(&mut self, input: Input) {
        let Some(core) = self.sched.as_mut() else {
            return;
        };
        let now_ms = self.net.now / 1_000;
        let mut out = core.handle(Input::Tick { now_ms });
        if !matches!(input, Input::Tick { .. }) {
            out.extend(core.handle(input));
        }
        for o in out {
            match o {
                Output::Send { conn, msg } => {
                    if let Control::Table { partition } = &msg {
                        self.check.table_seen(Addr::Sched, partition);
                    }
                    self.net.send(ConnId(conn), Addr::Sched, Msg::Control(msg));
                }
                Output::Log(line) => self.trace(format!("scheduler: {line}")),
                Output::Progress { .. } => {}
                // The simulation takes no checkpoints.
                Output::WriteCheckpoint { .. } => {}
                Output::JobDone => {
                    self.job_done = true;
                    self.trace("scheduler: job done".into());
                }
            }
        }
    }

    /// Whether the cluster is at rest: every server at the scheduler's epoch with
    /// nothing waiting for replication, no change in progress (faults that take a
    /// server's data away wait for this).
    fn stable(&self) -> bool {
        let Some(sched) = self.sched.as_ref() else {
            return false;
        };
        if sched.is_recovering() || !sched.is_running() {
            return false;
        }
        let epoch = sched.table().epoch();
        !sched.is_changing()
            && self
                .servers
                .values()
                .filter(|s| s.alive)
                .all(|s| s.quiet() && s.ready.as_ref().is_some_and(|r| r.table.epoch() == epoch))
    }

    fn live_ring_servers(&self) -> Vec<u32> {
        let Some(sched) = self.sched.as_ref() else {
            return Vec::new();
        };
        let t = sched.table();
        let mut on: Vec<u32> = t.owners().to_vec();
        on.sort_unstable();
        on.dedup();
        on.into_iter()
            .filter(|r| self.servers.get(r).is_some_and(|s| s.alive && !s.leaving))
            .collect()
    }

    fn fault(&mut self, f: Fault) {
        if self.job_done {
            return;
        }
        let postpone = |w: &mut World, f: Fault| {
            let t = w.net.now + 50_000;
            w.net.at(t, Event::Fault(f));
        };
        match f {
            Fault::CrashServer | Fault::IsolateServer(_) | Fault::LeaveServer => {
                let ring = self.live_ring_servers();
                let min = self.cfg.replicas as usize + 2;
                if ring.len() < min {
                    return;
                }
                if !self.stable() {
                    return postpone(self, f);
                }
                let r = ring[self.faults.below(ring.len() as u64) as usize];
                match f {
                    Fault::CrashServer => {
                        self.trace(format!("FAULT server {r} crashes"));
                        self.report.faults.push(format!("crash server {r}"));
                        self.check.crashed();
                        let mut s = self.servers.remove(&r).expect("listed");
                        s.exit(&mut ctx!(self), false);
                        self.settle_server(r, s);
                    }
                    Fault::IsolateServer(us) => {
                        self.trace(format!(
                            "FAULT server {r} cut off from the scheduler for {us} us"
                        ));
                        self.report.faults.push(format!("isolate server {r}"));
                        let until = self.net.now + us;
                        self.net.stall(Addr::Server(r), Addr::Sched, until);
                    }
                    _ => {
                        self.trace(format!("FAULT server {r} asks to leave"));
                        self.report.faults.push(format!("leave server {r}"));
                        let mut s = self.servers.remove(&r).expect("listed");
                        s.leave(&mut ctx!(self));
                        self.settle_server(r, s);
                    }
                }
            }
            Fault::JoinServer => {
                let r = self.next_server;
                self.next_server += 1;
                self.trace(format!("FAULT server {r} joins"));
                self.report.faults.push(format!("join server {r}"));
                self.start_server(r, true);
            }
            Fault::SplitServers(us) => {
                let ring = self.live_ring_servers();
                if ring.len() < 2 {
                    return;
                }
                let a = ring[self.faults.below(ring.len() as u64) as usize];
                let b = ring[self.faults.below(ring.len() as u64) as usize];
                if a == b {
                    return;
                }
                self.trace(format!("FAULT servers {a} and {b} cut off for {us} us"));
                self.report.faults.push(format!("split servers {a} {b}"));
                let until = self.net.now + us;
                self.net.stall(Addr::Server(a), Addr::Server(b), until);
            }
            Fault::SplitWorker(us) => {
                let ring = self.live_ring_servers();
                let ws: Vec<u32> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.alive)
                    .map(|(r, _)| *r)
                    .collect();
                if ring.is_empty() || ws.is_empty() {
                    return;
                }
                let s = ring[self.faults.below(ring.len() as u64) as usize];
                let w = ws[self.faults.below(ws.len() as u64) as usize];
                self.trace(format!(
                    "FAULT worker {w} and server {s} cut off for {us} us"
                ));
                self.report
                    .faults
                    .push(format!("split worker {w} server {s}"));
                let until = self.net.now + us;
                self.net.stall(Addr::Worker(w), Addr::Server(s), until);
            }
            Fault::CrashScheduler(us) => {
                if self.sched.is_none() || !self.sched.as_ref().is_some_and(|s| s.is_running()) {
                    return;
                }
                self.trace(format!("FAULT the scheduler crashes; back in {us} us"));
                self.report.faults.push("crash scheduler".into());
                self.sched = None;
                self.accepting.remove(&Addr::Sched);
                self.net.close_all(Addr::Sched, false);
                let t = self.net.now + us;
                self.net.at(t, Event::Fault(Fault::RestartScheduler));
            }
            Fault::RestartScheduler => {
                self.trace("FAULT the scheduler restarts (recovering)".into());
                self.start_scheduler(true);
            }
            Fault::CrashWorker => {
                // Before the job runs a dead worker only means the cluster never
                // completes (no replacement comes): wait until it runs.
                if !self.sched.as_ref().is_some_and(|s| s.is_running()) {
                    return postpone(self, f);
                }
                let ws: Vec<u32> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.alive && !w.done())
                    .map(|(r, _)| *r)
                    .collect();
                if ws.len() < 2 {
                    return;
                }
                let r = ws[self.faults.below(ws.len() as u64) as usize];
                self.trace(format!("FAULT worker {r} crashes"));
                self.report.faults.push(format!("crash worker {r}"));
                let mut w = self.workers.remove(&r).expect("listed");
                w.exit(&mut ctx!(self));
                self.settle_worker(r, w);
            }
            Fault::JoinWorker => {
                let r = self.next_worker;
                self.next_worker += 1;
                self.trace(format!("FAULT worker {r} joins"));
                self.report.faults.push(format!("join worker {r}"));
                self.start_worker(r, true);
            }
        }
    }
}
