//! Deterministic simulation of the control plane and the replication chains (TigerBeetle's
//! VOPR in miniature): the [`crate::sim::manager::Manager`], many [`crate::sim::chain::ChainNode`]
//! servers and a few workers in one thread, over a simulated network whose delays, message
//! interleaving and duplicates come from one seeded RNG, with fake time, server crashes
//! (state gone), joins and graceful leaves. Links are FIFO per pair (like TCP); a crash
//! drops what is addressed to the dead server and, by a coin, what it still had in flight.
//! Workers retry unacknowledged pushes.
//!
//! Checkers run after **every step**:
//! - a push acknowledged to a worker is, at the moment of the ack, on every replica of the
//!   acking stream that is still at that epoch (so it is at the tail);
//! - never lost afterwards: every live server that holds a key's range (is in its chain at
//!   the manager's epoch, has that epoch, and is synced) has every push acknowledged on that
//!   key, and some live server always has it;
//! - at most one ready head per key per epoch, and the manager's ring names exactly one;
//! - ring epochs only grow at every node (also asserted inside the nodes);
//! - at the end, once quiet: every push acknowledged, every replica of a key equal (value
//!   and pushes), and the value exactly the sum of its pushes' deltas.
//!
//! `PSERV_SIM_SEED=n` reruns one seed; `PSERV_SIM_SEEDS=n` sets the count; a failure prints
//! its seed.

#[allow(dead_code)] // the model the simulation drives until it drives the shipped code
pub mod chain;
#[allow(dead_code)]
pub mod manager;

use std::collections::{BTreeMap, BTreeSet};

use crate::base::keys::{Key, KeyRange, KEY_END};
use crate::placement::ring::{splitmix64, Ring, ServerId};
use crate::sim::chain::{ChainConfig, ChainMsg, ChainNode, Command, Handover, PushId, PushReply};
use crate::sim::manager::{Cmd, Event, Manager, ManagerConfig};

/// A tiny seeded RNG (splitmix64 stream).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    Manager,
    Server(ServerId),
    Worker(u32),
}

#[derive(Clone, Debug)]
enum Msg {
    Chain(ChainMsg),
    Push {
        push: PushId,
        epoch: u64,
        keys: Vec<Key>,
        deltas: Vec<f32>,
    },
    Reply(PushId, PushReply),
    Ack(PushId, KeyRange),
    Ring(Ring, Vec<Handover>),
    Heartbeat,
    StartCopy {
        to: ServerId,
        epoch: u64,
        range: KeyRange,
    },
    CopyDone {
        epoch: u64,
        range: KeyRange,
    },
    Leave,
    Join,
}

struct Flight {
    at: u64,
    from: Addr,
    to: Addr,
    msg: Msg,
}

struct Server {
    node: ChainNode,
    leaving: bool,
    last_hb: u64,
}

struct Pending {
    keys: Vec<Key>,
    deltas: Vec<f32>,
    unacked: BTreeSet<Key>,
    next_try: u64,
}

struct Worker {
    ring: Ring,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
}

/// Settings of one simulation run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Servers at the start.
    pub servers: u32,
    /// Workers.
    pub workers: u32,
    /// Replicas besides the head.
    pub k: usize,
    /// Virtual nodes per server.
    pub vnodes: u32,
    /// Steps with traffic and faults (then the run drains).
    pub steps: u64,
    /// Distinct keys pushed.
    pub keys: u64,
    /// Aggregation settings.
    pub agg_max_pushes: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            servers: 4,
            workers: 3,
            k: 1,
            vnodes: 4,
            steps: 300,
            keys: 24,
            agg_max_pushes: 3,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Steps taken (including the drain).
    pub steps: u64,
    /// Pushes acknowledged.
    pub acked: u64,
    /// Crashes, joins, leaves.
    pub crashes: u64,
    /// Joins.
    pub joins: u64,
    /// Leaves.
    pub leaves: u64,
    /// Final epoch.
    pub epoch: u64,
}

const HB_MS: u64 = 20;
const HB_TIMEOUT_MS: u64 = 200;
const DELAY_MAX_MS: u64 = 8;
const RETRY_MS: u64 = 60;

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    manager: Manager,
    servers: BTreeMap<ServerId, Server>,
    workers: Vec<Worker>,
    net: Vec<Flight>,
    /// Last delivery time per pair (FIFO).
    pair_at: BTreeMap<(Addr, Addr), u64>,
    keys: Vec<Key>,
    /// Acked pushes per key.
    acked: BTreeMap<Key, BTreeSet<PushId>>,
    deltas: BTreeMap<(PushId, Key), f32>,
    epochs: BTreeMap<ServerId, u64>,
    next_server: ServerId,
    stats: SimStats,
    /// Recent events, printed when a checker fires (`PSERV_SIM_TRACE=1` prints all).
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        let mut rng = Rng(seed);
        let ids: Vec<(ServerId, String)> = (0..cfg.servers).map(|i| (i, format!("s{i}"))).collect();
        let mcfg = ManagerConfig {
            k: cfg.k,
            vnodes: cfg.vnodes,
            heartbeat_timeout_ms: HB_TIMEOUT_MS,
        };
        let (manager, first) = Manager::new(mcfg, &ids, 0);
        let Cmd::Broadcast { ring, .. } = first else {
            unreachable!()
        };
        let ccfg = ChainConfig {
            k: cfg.k,
            agg_max_pushes: cfg.agg_max_pushes,
            agg_window_ms: 3,
            park_max: 100_000,
        };
        let mut servers = BTreeMap::new();
        for (id, _) in &ids {
            let mut node = ChainNode::new(*id, ccfg.clone());
            node.install_ring(ring.clone(), &[]);
            servers.insert(
                *id,
                Server {
                    node,
                    leaving: false,
                    last_hb: 0,
                },
            );
        }
        let salt = rng.next();
        let keys = (0..cfg.keys)
            .map(|i| splitmix64(i ^ salt) % KEY_END)
            .collect();
        let workers = (0..cfg.workers)
            .map(|_| Worker {
                ring: ring.clone(),
                next_id: 1,
                pending: BTreeMap::new(),
            })
            .collect();
        Sim {
            next_server: cfg.servers,
            cfg,
            rng,
            now: 0,
            manager,
            servers,
            workers,
            net: Vec::new(),
            pair_at: BTreeMap::new(),
            keys,
            acked: BTreeMap::new(),
            deltas: BTreeMap::new(),
            epochs: BTreeMap::new(),
            stats: SimStats::default(),
            log: Vec::new(),
        }
    }

    fn send(&mut self, from: Addr, to: Addr, msg: Msg) {
        let at = (self.now + 1 + self.rng.below(DELAY_MAX_MS))
            .max(*self.pair_at.get(&(from, to)).unwrap_or(&0));
        self.pair_at.insert((from, to), at);
        if let Msg::Chain(ChainMsg::Forward { .. }) = &msg {
            if self.rng.chance(20) {
                // A duplicate, right behind the original.
                self.net.push(Flight {
                    at,
                    from,
                    to,
                    msg: msg.clone(),
                });
            }
        }
        self.net.push(Flight { at, from, to, msg });
    }

    /// Carry out a server's commands.
    fn drain(&mut self, id: ServerId) {
        loop {
            let Some(s) = self.servers.get_mut(&id) else {
                return;
            };
            let Some(c) = s.node.poll_command() else {
                return;
            };
            match c {
                Command::Send { to, msg } => {
                    self.send(Addr::Server(id), Addr::Server(to), Msg::Chain(msg))
                }
                Command::AckToWorker { push, range } => {
                    self.check_ack(id, push, range);
                    self.send(
                        Addr::Server(id),
                        Addr::Worker(push.worker),
                        Msg::Ack(push, range),
                    );
                }
                Command::Reply { push, reply } => self.send(
                    Addr::Server(id),
                    Addr::Worker(push.worker),
                    Msg::Reply(push, reply),
                ),
                Command::CopyDone { epoch, range } => self.send(
                    Addr::Server(id),
                    Addr::Manager,
                    Msg::CopyDone { epoch, range },
                ),
            }
        }
    }

    /// At ack time: every replica of the acking stream still at that epoch has the push.
    fn check_ack(&self, head: ServerId, push: PushId, range: KeyRange) {
        let node = &self.servers[&head].node;
        let ring = node.ring().expect("ring");
        let Some(p) = self.workers[push.worker as usize].pending.get(&push.id) else {
            return; // already fully acked (a re-ack)
        };
        for &key in p.keys.iter().filter(|k| range.contains(**k)) {
            for s in ring.chain(key, self.cfg.k) {
                if let Some(srv) = self.servers.get(&s) {
                    if srv.node.epoch() == ring.epoch() {
                        assert!(
                            srv.node.store.has(key, push),
                            "ack of {push:?} on {key:#x} by {head} but replica {s} lacks it"
                        );
                    }
                }
            }
        }
    }

    fn manager_cmds(&mut self, cmds: Vec<Cmd>) {
        for c in cmds {
            match c {
                Cmd::Broadcast { ring, plan } => {
                    let to: Vec<ServerId> = self.servers.keys().copied().collect();
                    for s in to {
                        self.send(
                            Addr::Manager,
                            Addr::Server(s),
                            Msg::Ring(ring.clone(), plan.clone()),
                        );
                    }
                }
                Cmd::StartCopy {
                    from,
                    to,
                    epoch,
                    range,
                } => self.send(
                    Addr::Manager,
                    Addr::Server(from),
                    Msg::StartCopy { to, epoch, range },
                ),
                Cmd::Dead { .. } | Cmd::Rebuilt { .. } => {}
                Cmd::Reject { .. } => {}
                Cmd::Lost { range } => panic!("range {range} lost"),
            }
        }
    }

    fn trace(&mut self, line: String) {
        if self.log.len() > 400 {
            self.log.drain(..200);
        }
        self.log.push(format!("t={} {line}", self.now));
    }

    fn deliver(&mut self, f: Flight) {
        if !matches!(f.msg, Msg::Heartbeat) {
            let line = format!("{:?} -> {:?}: {:?}", f.from, f.to, f.msg);
            self.trace(line);
        }
        match f.to {
            Addr::Manager => {
                let Addr::Server(id) = f.from else {
                    unreachable!()
                };
                let ev = match f.msg {
                    Msg::Heartbeat => Event::Heartbeat { id, now: self.now },
                    Msg::CopyDone { epoch, range } => Event::CopyDone { id, epoch, range },
                    Msg::Leave => Event::Leave { id },
                    Msg::Join => Event::Join {
                        id,
                        addr: format!("s{id}"),
                        now: self.now,
                    },
                    m => unreachable!("{m:?}"),
                };
                let out = self.manager.handle(ev);
                self.manager_cmds(out);
            }
            Addr::Server(id) => {
                let Some(s) = self.servers.get_mut(&id) else {
                    return;
                };
                match f.msg {
                    Msg::Chain(ChainMsg::CopyData {
                        epoch,
                        range,
                        entries,
                    }) => s.node.handle_copy(epoch, range, &entries),
                    Msg::Chain(m) => {
                        let Addr::Server(from) = f.from else {
                            unreachable!()
                        };
                        s.node.handle(from, m)
                    }
                    Msg::Push {
                        push,
                        epoch,
                        keys,
                        deltas,
                    } => s.node.push(self.now, push, epoch, &keys, &deltas),
                    Msg::Ring(ring, plan) => {
                        if ring.epoch() > s.node.epoch() {
                            let gone = !ring.has_server(id) && s.node.epoch() > 0;
                            s.node.install_ring(ring, &plan);
                            let e = s.node.epoch();
                            let last = self.epochs.insert(id, e).unwrap_or(0);
                            assert!(e > last, "epoch of {id} went from {last} to {e}");
                            if gone && s.leaving {
                                // Handed over: flush and go.
                                self.drain(id);
                                self.servers.remove(&id);
                                return;
                            }
                        }
                    }
                    Msg::StartCopy { to, epoch, range } => s.node.start_copy(to, epoch, range),
                    m => unreachable!("{m:?}"),
                }
                self.drain(id);
            }
            Addr::Worker(w) => {
                let wk = &mut self.workers[w as usize];
                match f.msg {
                    Msg::Ack(push, range) => {
                        if let Some(p) = wk.pending.get_mut(&push.id) {
                            p.unacked.retain(|k| !range.contains(*k));
                            if p.unacked.is_empty() {
                                let p = wk.pending.remove(&push.id).unwrap();
                                for (&k, &d) in p.keys.iter().zip(&p.deltas) {
                                    self.acked.entry(k).or_default().insert(push);
                                    self.deltas.insert((push, k), d);
                                }
                                self.stats.acked += 1;
                            }
                        }
                    }
                    Msg::Reply(push, PushReply::Redirect(ring)) => {
                        if ring.epoch() > wk.ring.epoch() {
                            wk.ring = *ring;
                        }
                        if let Some(p) = wk.pending.get_mut(&push.id) {
                            p.next_try = self.now;
                        }
                    }
                    Msg::Reply(_, PushReply::Busy) => {}
                    m => unreachable!("{m:?}"),
                }
            }
        }
    }

    /// Workers push new updates and retry old ones.
    fn workers_act(&mut self, new_pushes: bool) {
        for w in 0..self.workers.len() {
            if new_pushes && self.workers[w].pending.len() < 3 && self.rng.chance(300) {
                let n = 1 + self.rng.below(4) as usize;
                let mut keys: Vec<Key> = (0..n)
                    .map(|_| self.keys[self.rng.below(self.keys.len() as u64) as usize])
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                let deltas = keys
                    .iter()
                    .map(|_| (1 + self.rng.below(4)) as f32)
                    .collect();
                let wk = &mut self.workers[w];
                let id = wk.next_id;
                wk.next_id += 1;
                wk.pending.insert(
                    id,
                    Pending {
                        unacked: keys.iter().copied().collect(),
                        keys,
                        deltas,
                        next_try: self.now,
                    },
                );
            }
            let due: Vec<u64> = self.workers[w]
                .pending
                .iter()
                .filter(|(_, p)| p.next_try <= self.now)
                .map(|(&id, _)| id)
                .collect();
            for id in due {
                let wk = &mut self.workers[w];
                let p = wk.pending.get_mut(&id).unwrap();
                p.next_try = self.now + RETRY_MS;
                let (keys, deltas): (Vec<Key>, Vec<f32>) = p
                    .keys
                    .iter()
                    .zip(&p.deltas)
                    .filter(|(k, _)| p.unacked.contains(k))
                    .map(|(k, d)| (*k, *d))
                    .unzip();
                let ring = wk.ring.clone();
                let push = PushId {
                    worker: w as u32,
                    id,
                };
                for (owner, idx) in ring.split_keys(&keys) {
                    // One message per owned range (a push to a server spanning two of its
                    // ranges is split further, by range).
                    let mut start = idx.start;
                    while start < idx.end {
                        let r = ring.range_of(keys[start]);
                        let end = start + keys[start..idx.end].partition_point(|&k| r.contains(k));
                        if !self.servers.contains_key(&owner) {
                            // Connection refused: the worker asks the scheduler for the
                            // current ring and retries at once.
                            let r = self.manager.ring().unwrap().clone();
                            if r.epoch() > self.workers[w].ring.epoch() {
                                self.workers[w].ring = r;
                                self.workers[w].pending.get_mut(&id).unwrap().next_try = self.now;
                            }
                            break;
                        }
                        self.send(
                            Addr::Worker(w as u32),
                            Addr::Server(owner),
                            Msg::Push {
                                push,
                                epoch: ring.epoch(),
                                keys: keys[start..end].to_vec(),
                                deltas: deltas[start..end].to_vec(),
                            },
                        );
                        start = end;
                    }
                }
            }
        }
    }

    /// The cluster is settled enough for a new fault: no change in progress, every server at
    /// the manager's epoch with its ranges synced.
    fn stable(&self) -> bool {
        let e = self.manager.ring().map_or(0, Ring::epoch);
        !self.manager.is_changing()
            && self.servers.values().all(|s| !s.leaving)
            && self.servers.keys().copied().collect::<Vec<_>>() == self.manager.members()
            && self
                .servers
                .values()
                .all(|s| s.node.epoch() == e && s.node.report().iter().all(|r| r.2))
    }

    fn faults(&mut self) {
        if !self.stable() {
            return;
        }
        let live: Vec<ServerId> = self.servers.keys().copied().collect();
        let min = self.cfg.k as u32 + 2;
        let r = self.rng.below(1000);
        if r < 6 && live.len() as u32 > min {
            let victim = live[self.rng.below(live.len() as u64) as usize];
            self.servers.remove(&victim);
            let drop_out = self.rng.chance(500);
            self.net.retain(|f| {
                f.to != Addr::Server(victim) && !(drop_out && f.from == Addr::Server(victim))
            });
            self.stats.crashes += 1;
            self.trace(format!("CRASH {victim}"));
        } else if r < 12 && live.len() < 7 {
            let id = self.next_server;
            self.next_server += 1;
            let ccfg = ChainConfig {
                k: self.cfg.k,
                agg_max_pushes: self.cfg.agg_max_pushes,
                agg_window_ms: 3,
                park_max: 100_000,
            };
            let mut node = ChainNode::new(id, ccfg);
            // The joiner starts from the current ring (it asks the manager first).
            node.install_ring(self.manager.ring().unwrap().clone(), &[]);
            self.epochs.insert(id, node.epoch());
            self.servers.insert(
                id,
                Server {
                    node,
                    leaving: false,
                    last_hb: self.now,
                },
            );
            self.send(Addr::Server(id), Addr::Manager, Msg::Join);
            self.stats.joins += 1;
            self.trace(format!("JOIN {id}"));
        } else if r < 16 && live.len() as u32 > min {
            let id = live[self.rng.below(live.len() as u64) as usize];
            self.servers.get_mut(&id).unwrap().leaving = true;
            self.servers.get_mut(&id).unwrap().node.flush_all();
            self.drain(id);
            self.send(Addr::Server(id), Addr::Manager, Msg::Leave);
            self.stats.leaves += 1;
            self.trace(format!("LEAVE {id}"));
        }
    }

    fn heartbeats_and_ticks(&mut self) {
        let ids: Vec<ServerId> = self.servers.keys().copied().collect();
        for id in ids {
            let s = self.servers.get_mut(&id).unwrap();
            s.node.tick(self.now);
            let hb = self.now >= s.last_hb + HB_MS;
            if hb {
                s.last_hb = self.now;
            }
            self.drain(id);
            if hb {
                self.send(Addr::Server(id), Addr::Manager, Msg::Heartbeat);
            }
        }
        let out = self.manager.handle(Event::Tick { now: self.now });
        self.manager_cmds(out);
    }

    /// One step: time may advance, then one deliverable message (chosen at random among
    /// the heads of the per-pair queues) is delivered, workers act, faults may strike.
    fn step(&mut self, traffic: bool) {
        self.stats.steps += 1;
        if self.rng.chance(400) || self.net.iter().all(|f| f.at > self.now) {
            self.now += 1;
            self.heartbeats_and_ticks();
        }
        // Deliverable: due, and first of its pair.
        let mut firsts: BTreeMap<(Addr, Addr), usize> = BTreeMap::new();
        for (i, f) in self.net.iter().enumerate() {
            if f.at <= self.now {
                let e = firsts.entry((f.from, f.to)).or_insert(i);
                if self.net[*e].at > f.at {
                    *e = i;
                }
            }
        }
        // FIFO: the earliest-scheduled message of a pair goes first (ties by insertion).
        let cand: Vec<usize> = firsts.values().copied().collect();
        if !cand.is_empty() {
            let i = cand[self.rng.below(cand.len() as u64) as usize];
            let f = self.net.remove(i);
            self.deliver(f);
        }
        self.workers_act(traffic);
        if traffic {
            self.faults();
        }
        self.check();
    }

    fn check(&self) {
        let Some(ring) = self.manager.ring() else {
            return;
        };
        let e = ring.epoch();
        for (&key, pushes) in &self.acked {
            let chain = ring.chain(key, self.cfg.k);
            let mut somewhere = false;
            for srv in self.servers.values() {
                let has = pushes.iter().all(|p| srv.node.store.has(key, *p));
                somewhere |= has;
                if chain.contains(&srv.node.id()) && srv.node.epoch() == e && srv.node.holds(key) {
                    assert!(
                        has,
                        "replica {} of {key:#x} at epoch {e} lacks an acked push",
                        srv.node.id()
                    );
                }
            }
            assert!(somewhere, "acked pushes on {key:#x} are on no live server");
        }
        for &key in &self.keys {
            let mut heads: BTreeMap<u64, u32> = BTreeMap::new();
            for srv in self.servers.values() {
                if srv.node.is_ready_head(key) {
                    *heads.entry(srv.node.epoch()).or_default() += 1;
                }
            }
            assert!(
                heads.values().all(|&n| n <= 1),
                "two ready heads for {key:#x}: {heads:?}"
            );
        }
    }

    fn quiet(&self) -> bool {
        self.net.iter().all(|f| matches!(f.msg, Msg::Heartbeat))
            && self.workers.iter().all(|w| w.pending.is_empty())
            && self.servers.values().all(|s| s.node.is_quiet())
            && self.stable()
    }

    fn final_check(&self) {
        let ring = self.manager.ring().unwrap();
        for &key in &self.keys {
            let chain = ring.chain(key, self.cfg.k);
            let mut states = Vec::new();
            for s in &chain {
                let n = &self.servers[s].node;
                assert_eq!(n.epoch(), ring.epoch());
                states.push((
                    n.store.value(key),
                    n.store.pushes(key).cloned().unwrap_or_default(),
                ));
            }
            assert!(
                states.windows(2).all(|w| w[0] == w[1]),
                "replicas of {key:#x} differ: {chain:?}"
            );
            let acked = self.acked.get(&key).cloned().unwrap_or_default();
            assert_eq!(
                states[0].1, acked,
                "pushes on {key:#x} differ from the acked ones"
            );
            let sum: f32 = acked.iter().map(|p| self.deltas[&(*p, key)]).sum();
            assert_eq!(
                states[0].0, sum,
                "value of {key:#x} is not the sum of its pushes"
            );
            let heads = self
                .servers
                .values()
                .filter(|s| s.node.is_ready_head(key))
                .count();
            assert_eq!(heads, 1, "key {key:#x} has {heads} heads when quiet");
        }
    }
}

/// Run one seed; panics (after printing the seed) on a broken invariant.
pub fn run(seed: u64, cfg: SimConfig) -> SimStats {
    let mut sim = Sim::new(seed, cfg.clone());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..cfg.steps {
            sim.step(true);
        }
        let mut drain = 0;
        while !sim.quiet() {
            sim.step(false);
            drain += 1;
            if drain >= 200_000 {
                let busy: Vec<_> = sim
                    .servers
                    .values()
                    .filter(|s| !s.node.is_quiet())
                    .map(|s| (s.node.id(), s.node.report()))
                    .collect();
                let pend: Vec<usize> = sim.workers.iter().map(|w| w.pending.len()).collect();
                panic!(
                    "did not settle: busy servers {busy:?}, pending pushes {pend:?}, epoch {:?}",
                    sim.manager.ring().map(Ring::epoch)
                );
            }
        }
        sim.final_check();
    }));
    match r {
        Ok(()) => {
            sim.stats.epoch = sim.manager.ring().unwrap().epoch();
            sim.stats
        }
        Err(e) => {
            if std::env::var("PSERV_SIM_SEED").is_ok() {
                for l in &sim.log {
                    eprintln!("{l}");
                }
            }
            eprintln!("simulation failed: rerun with PSERV_SIM_SEED={seed} (prints the event log)");
            std::panic::resume_unwind(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(default: u64) -> Vec<u64> {
        if let Ok(s) = std::env::var("PSERV_SIM_SEED") {
            return vec![s.parse().expect("PSERV_SIM_SEED is a number")];
        }
        let n = std::env::var("PSERV_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        (0..n).collect()
    }

    fn many(n: u64, cfg: SimConfig) {
        let t = std::time::Instant::now();
        let mut tot = SimStats::default();
        let list = seeds(n);
        for &seed in &list {
            let s = run(seed, cfg.clone());
            tot.steps += s.steps;
            tot.acked += s.acked;
            tot.crashes += s.crashes;
            tot.joins += s.joins;
            tot.leaves += s.leaves;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "sim k={} agg={}: {} seeds, {} steps ({:.0} seeds/s, {:.0} steps/s), {} pushes acked, {} crashes, {} joins, {} leaves",
            cfg.k,
            cfg.agg_max_pushes,
            list.len(),
            tot.steps,
            list.len() as f64 / secs,
            tot.steps as f64 / secs,
            tot.acked,
            tot.crashes,
            tot.joins,
            tot.leaves
        );
    }

    #[test]
    fn sim_seeds() {
        many(2000, SimConfig::default());
        many(
            1000,
            SimConfig {
                k: 2,
                servers: 5,
                ..SimConfig::default()
            },
        );
        many(
            500,
            SimConfig {
                agg_max_pushes: 1,
                ..SimConfig::default()
            },
        );
    }

    #[test]
    #[ignore]
    fn sim_soak() {
        many(
            5000,
            SimConfig {
                steps: 2000,
                ..SimConfig::default()
            },
        );
        many(
            2000,
            SimConfig {
                k: 2,
                servers: 5,
                steps: 2000,
                ..SimConfig::default()
            },
        );
    }
}
