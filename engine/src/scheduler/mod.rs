//! The scheduler: registration, the cluster table, barriers, the job's end (MISSION.md P1).
//!
//! [`SchedulerCore`] is the decision logic as a plain state machine: it is fed
//! [`Input`]s (a control message from a connection, a connection closed) and returns
//! [`Output`]s (messages to send, lines for the operator). It does no I/O, so it is tested
//! without sockets. [`run_scheduler`] wires it to the TCP transport, draws the progress bar
//! and writes the job summary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pserv_transport::{CloseReason, Conn, Handler, RecvFrame, TcpConfig, TcpTransport};

use crate::base::error::EngineError;
use crate::placement::Partition;
use crate::proto::{
    ClusterInfo, Control, NodeStatus, RangeStatus, Role, ServerInfo, ServerStats, StatusReport,
    ValueType, WorkerStats, SCHEDULER_ID,
};
use crate::update::UpdateSpec;

/// Identifies a connection to the scheduler.
pub type ConnKey = u64;

/// Cluster shape and settings every node learns from the scheduler.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of servers.
    pub servers: u32,
    /// Number of workers.
    pub workers: u32,
    /// Element type of the values.
    pub value_type: ValueType,
    /// Values per key.
    pub value_len: u32,
    /// The servers' default update function.
    pub update: UpdateSpec,
    /// Virtual nodes per server on the consistent-hashing ring that routes keys
    /// ([`crate::placement::ring`]); 0 splits the key space evenly instead (one range per server).
    pub vnodes: u32,
    /// Replicas of every range after its head (chain replication, MISSION.md P10); needs
    /// the ring (`vnodes > 0`). With replicas, a server that fails is taken off the ring
    /// and its ranges pass to their replicas.
    pub replicas: u32,
}

impl ClusterSpec {
    /// The routing table this spec describes (epoch 1).
    pub fn partition(&self) -> Partition {
        let servers = self.servers as usize;
        match self.ring() {
            None => Partition::even(servers),
            Some(ring) => Partition::from_ring_chains(&ring, servers, self.replicas as usize),
        }
    }

    /// The ring of this spec (none for the even split).
    pub fn ring(&self) -> Option<crate::placement::ring::Ring> {
        let ids: Vec<u32> = (0..self.servers).collect();
        (self.vnodes > 0).then(|| crate::placement::ring::Ring::new(&ids, self.vnodes))
    }

    /// Check the settings fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.replicas > 0 && self.vnodes == 0 {
            return Err("--replicas needs the consistent-hashing ring (--vnodes above 0)".into());
        }
        if self.replicas >= self.servers && self.replicas > 0 {
            return Err(format!(
                "--replicas {} needs at least {} servers (a chain holds distinct servers)",
                self.replicas,
                self.replicas + 1
            ));
        }
        Ok(())
    }
}

/// Something that happened at the scheduler.
#[derive(Debug)]
pub enum Input {
    /// A control message arrived on a connection.
    Message {
        /// The connection.
        conn: ConnKey,
        /// The message.
        msg: Control,
    },
    /// A connection closed.
    Closed {
        /// The connection.
        conn: ConnKey,
    },
    /// Time passed: milliseconds since the scheduler started (never decreasing). Fed
    /// before every other input and at least every 200 ms.
    Tick {
        /// Now.
        now_ms: u64,
    },
}

/// What the scheduler decided to do.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Send a message.
    Send {
        /// The connection.
        conn: ConnKey,
        /// The message.
        msg: Control,
    },
    /// A line for the operator.
    Log(String),
    /// Overall progress of the workers.
    Progress {
        /// Units done.
        done: u64,
        /// Units in total.
        total: u64,
    },
    /// Every worker finished (or left); servers and workers were told to shut down.
    JobDone,
}

#[derive(Debug, Clone)]
struct Node {
    role: Role,
    rank: u32,
    addr: Option<SocketAddr>,
    done: bool,
    gone: bool,
    /// When it last proved alive (registration or heartbeat), in `now_ms` time.
    seen_ms: u64,
    /// Missed heartbeats for longer than the timeout.
    dead: bool,
    /// Its last replication report (servers).
    lag: Option<(u64, u64, u64)>,
}

/// The scheduler's state machine.
#[derive(Debug)]
pub struct SchedulerCore {
    spec: ClusterSpec,
    nodes: HashMap<ConnKey, Node>,
    /// Servers got the cluster table (phase 1).
    servers_welcomed: bool,
    /// Servers that answered `Ready`.
    ready: BTreeSet<ConnKey>,
    /// Workers got the cluster table too: the job runs (phase 2).
    welcomed: bool,
    finished: bool,
    barriers: BTreeMap<u64, BTreeSet<ConnKey>>,
    progress: HashMap<ConnKey, (u64, u64)>,
    /// Stats of finished workers.
    pub stats: Vec<WorkerStats>,
    /// JSON objects workers sent as summaries.
    pub summaries: Vec<serde_json::Value>,
    /// Final counters of the servers that reported after the job ended.
    pub server_stats: Vec<ServerStats>,
    now_ms: u64,
    heartbeat_timeout_ms: u64,
    /// The ring as it is now (servers that failed taken off), if the cluster uses one.
    ring: Option<crate::placement::ring::Ring>,
    /// The routing table as it is now.
    table: Partition,
    /// Servers taken off the ring: (rank, when, in `now_ms` time).
    pub failovers: Vec<(u32, u64)>,
    /// A join or leave in progress.
    change: Option<Change>,
    /// Server ranks handed out so far (the initial servers, then joiners).
    server_ranks: u32,
    /// Worker ranks handed out so far (the initial workers, then joiners).
    worker_ranks: u32,
    /// Rebuilding the view after a restart: until this time (`now_ms`), or until every
    /// node of the spec reported, nodes rejoin and nothing is decided.
    recovering_until: Option<u64>,
    /// Milliseconds a restarted scheduler waits for nodes to rejoin.
    recover_ms: u64,
    /// The newest barrier released.
    last_barrier: u64,
}

/// A join or a graceful leave in progress: the copy phase runs under the middle table
/// (chains extended by the servers that will hold each range), and the final table is
/// sent once every head reported its copies acknowledged.
#[derive(Debug)]
struct Change {
    /// The ring after the change.
    target: crate::placement::ring::Ring,
    /// The middle table's epoch.
    epoch: u64,
    /// Heads of the middle table that have not reported `Synced` yet.
    waiting: BTreeSet<u32>,
    /// The server that leaves, told to shut down after the flip.
    leaving: Option<u32>,
}

impl SchedulerCore {
    /// A scheduler for a cluster of this shape.
    pub fn new(spec: ClusterSpec) -> Self {
        assert!(
            spec.servers > 0 && spec.workers > 0,
            "a cluster needs servers and workers"
        );
        SchedulerCore {
            ring: spec.ring(),
            table: spec.partition(),
            failovers: Vec::new(),
            change: None,
            server_ranks: spec.servers,
            worker_ranks: spec.workers,
            recovering_until: None,
            recover_ms: 0,
            last_barrier: 0,
            spec,
            nodes: HashMap::new(),
            servers_welcomed: false,
            ready: BTreeSet::new(),
            welcomed: false,
            finished: false,
            barriers: BTreeMap::new(),
            progress: HashMap::new(),
            stats: Vec::new(),
            summaries: Vec::new(),
            server_stats: Vec::new(),
            now_ms: 0,
            heartbeat_timeout_ms: 3000,
        }
    }

    /// A scheduler restarted while the job runs: it rebuilds its view (nodes, routing
    /// table, ring, barriers) from the nodes' `Rejoin` reports, for up to `wait` after the
    /// first one or until every node of the spec reported.
    pub fn recovering(mut self, wait: Duration) -> Self {
        self.servers_welcomed = true;
        self.welcomed = true;
        self.recover_ms = wait.as_millis() as u64;
        self.recovering_until = Some(u64::MAX);
        self
    }

    /// Whether the view is still being rebuilt after a restart.
    pub fn is_recovering(&self) -> bool {
        self.recovering_until.is_some()
    }

    fn on_rejoin(&mut self, conn: ConnKey, msg: Control, out: &mut Vec<Output>) {
        let Control::Rejoin {
            role,
            rank,
            node_id,
            addr,
            pid,
            table,
            barriers,
        } = msg
        else {
            return;
        };
        if self.recovering_until.is_none() {
            return self.refuse(
                conn,
                "this scheduler is not recovering; register instead",
                out,
            );
        }
        if self
            .nodes
            .values()
            .any(|n| n.role == role && n.rank == rank)
        {
            return self.refuse(conn, &format!("{role} {rank} rejoined already"), out);
        }
        if self.recovering_until == Some(u64::MAX) {
            self.recovering_until = Some(self.now_ms + self.recover_ms);
        }
        debug_assert_eq!(self.node_id(role, rank), node_id);
        out.push(Output::Log(format!(
            "{role} {rank} rejoined (pid {pid}, table epoch {})",
            table.epoch()
        )));
        match role {
            Role::Server => {
                self.server_ranks = self.server_ranks.max(rank + 1);
                if table.epoch() > self.table.epoch() {
                    self.table = table;
                }
            }
            Role::Worker => {
                self.worker_ranks = self.worker_ranks.max(rank + 1);
                self.last_barrier = self.last_barrier.max(barriers);
            }
        }
        self.add_node(conn, role, rank, addr);
        let count = |r: Role| self.nodes.values().filter(|n| n.role == r).count() as u32;
        if count(Role::Server) >= self.spec.servers && count(Role::Worker) >= self.spec.workers {
            self.finish_recovery(out);
        }
    }

    /// The view is rebuilt: the ring from the newest table the servers had, every node
    /// gets that table, and decisions resume.
    fn finish_recovery(&mut self, out: &mut Vec<Output>) {
        if self.recovering_until.take().is_none() {
            return;
        }
        if self.ring.is_some() {
            let mut ids: Vec<u32> = self.table.owners().to_vec();
            ids.sort_unstable();
            ids.dedup();
            self.ring = Some(
                crate::placement::ring::Ring::new(&ids, self.spec.vnodes)
                    .with_epoch(self.table.epoch()),
            );
        }
        let servers = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Server)
            .count();
        let workers = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Worker)
            .count();
        out.push(Output::Log(format!(
            "view rebuilt after a restart: {servers} servers, {workers} workers, routing table epoch {}",
            self.table.epoch()
        )));
        self.broadcast(
            &Control::Table {
                partition: self.table.clone(),
            },
            out,
        );
        self.release_barriers(out);
    }

    /// Declare a server dead when it sent no heartbeat for this long (default 3 s).
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout_ms = (timeout.as_millis() as u64).max(1);
        self
    }

    /// The cluster as this scheduler sees it (what `pserv status` prints).
    pub fn status(&self) -> StatusReport {
        let partition = &self.table;
        let mut nodes: Vec<NodeStatus> = self
            .nodes
            .values()
            .map(|n| NodeStatus {
                role: n.role,
                rank: n.rank,
                addr: n.addr,
                state: if n.gone {
                    "gone"
                } else if n.dead {
                    "dead"
                } else if n.done {
                    "done"
                } else {
                    "live"
                }
                .to_owned(),
                replication: n.lag,
                heartbeat_ms_ago: (n.role == Role::Server)
                    .then(|| self.now_ms.saturating_sub(n.seen_ms)),
            })
            .collect();
        nodes.sort_by_key(|n| (n.role == Role::Worker, n.rank));
        StatusReport {
            epoch: partition.epoch(),
            replicas: self.spec.replicas,
            ranges: partition
                .ranges()
                .iter()
                .zip(partition.owners())
                .zip(partition.followers())
                .map(|((r, &o), f)| RangeStatus {
                    range: *r,
                    chain: std::iter::once(o).chain(f.iter().copied()).collect(),
                })
                .collect(),
            nodes,
            running: self.welcomed,
            finished: self.finished,
            replication_lag: Vec::new(),
        }
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        debug_assert!(now_ms >= self.now_ms, "time never goes back");
        self.now_ms = self.now_ms.max(now_ms);
        if !self.welcomed || self.finished {
            // Servers heartbeat once they serve (after the welcome); not before the job
            // runs, and no verdicts once it is over.
            return;
        }
        if let Some(until) = self.recovering_until {
            if until != u64::MAX && self.now_ms >= until {
                self.finish_recovery(out);
            }
            return;
        }
        let (now, limit) = (self.now_ms, self.heartbeat_timeout_ms);
        let mut died = Vec::new();
        for n in self.nodes.values_mut() {
            if n.role == Role::Server && !n.gone && !n.dead && now - n.seen_ms > limit {
                n.dead = true;
                died.push(n.rank);
                out.push(Output::Log(format!(
                    "server {} sent no heartbeat for {} ms: presumed dead",
                    n.rank,
                    now - n.seen_ms
                )));
            }
        }
        for rank in died {
            self.fail_server(rank, out);
        }
    }

    /// Record a node (registered, joined or rejoined) on `conn`, alive as of now.
    fn add_node(&mut self, conn: ConnKey, role: Role, rank: u32, addr: Option<SocketAddr>) {
        self.nodes.insert(
            conn,
            Node {
                role,
                rank,
                addr,
                done: false,
                gone: false,
                seen_ms: self.now_ms,
                dead: false,
                lag: None,
            },
        );
    }

    /// Whether every node registered and got the cluster table.
    pub fn is_running(&self) -> bool {
        self.welcomed
    }

    /// Whether the job is over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether every server still connected has sent its final counters (a server that
    /// reported and then left does not stand in for one that has not reported).
    pub fn servers_reported(&self) -> bool {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Server && !n.gone)
            .all(|n| self.server_stats.iter().any(|s| s.rank == n.rank))
    }

    fn count(&self, role: Role) -> u32 {
        match role {
            Role::Server => self.spec.servers,
            Role::Worker => self.spec.workers,
        }
    }

    fn node_id(&self, role: Role, rank: u32) -> u32 {
        match role {
            // Servers that joined later get ids above every worker's.
            Role::Server if rank >= self.spec.servers => crate::proto::JOINED_SERVER_BASE + rank,
            Role::Server => 1 + rank,
            Role::Worker => 1 + self.spec.servers + rank,
        }
    }

    fn live_workers(&self) -> impl Iterator<Item = (&ConnKey, &Node)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.role == Role::Worker && !n.gone && !n.done)
    }

    /// Feed one input; returns what to do.
    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Message { conn, msg } => self.on_message(conn, msg, &mut out),
            Input::Closed { conn } => self.on_closed(conn, &mut out),
            Input::Tick { now_ms } => self.on_tick(now_ms, &mut out),
        }
        out
    }

    fn on_message(&mut self, conn: ConnKey, msg: Control, out: &mut Vec<Output>) {
        match msg {
            Control::Register {
                role,
                addr,
                rank,
                pid,
            } => self.on_register(conn, role, addr, rank, pid, out),
            Control::Ready => {
                let is_server = self
                    .nodes
                    .get(&conn)
                    .is_some_and(|n| n.role == Role::Server);
                let joining = self
                    .nodes
                    .get(&conn)
                    .is_some_and(|n| n.role == Role::Server && n.rank >= self.spec.servers);
                if is_server && joining && self.welcomed && !self.ready.contains(&conn) {
                    self.ready.insert(conn);
                    return self.joined(conn, out);
                }
                if !is_server || !self.servers_welcomed || self.welcomed {
                    return self.refuse(
                        conn,
                        "ready from a node that is not a welcomed server",
                        out,
                    );
                }
                self.ready.insert(conn);
                if self.ready.len() as u32 == self.spec.servers {
                    self.welcome(Role::Worker, out);
                }
            }
            Control::Barrier { seq } => {
                if !self.is_worker(conn) {
                    return self.refuse(
                        conn,
                        "barrier from a node that is not a registered worker",
                        out,
                    );
                }
                // Barrier 0: a worker that joined the running job takes part from the
                // next barrier the others will reach.
                let seq = if seq == 0 { self.last_barrier + 1 } else { seq };
                self.barriers.entry(seq).or_default().insert(conn);
                self.release_barriers(out);
            }
            Control::Progress { done, total } => {
                let e = self.progress.entry(conn).or_default();
                e.0 += done;
                e.1 = total;
                let (d, t) = self
                    .progress
                    .values()
                    .fold((0, 0), |(d, t), (dd, tt)| (d + dd, t + tt));
                out.push(Output::Progress { done: d, total: t });
            }
            Control::Log { line } => out.push(Output::Log(line)),
            Control::Heartbeat => {
                let now = self.now_ms;
                match self.nodes.get_mut(&conn).filter(|n| n.role == Role::Server) {
                    Some(n) => {
                        n.seen_ms = now;
                        if n.dead {
                            n.dead = false;
                            out.push(Output::Log(format!(
                                "server {} is sending heartbeats again",
                                n.rank
                            )));
                        }
                    }
                    None => self.refuse(conn, "heartbeat from an unknown node", out),
                }
            }
            Control::Join { addr, rank, pid } => self.on_join(conn, addr, rank, pid, out),
            msg @ Control::Rejoin { .. } => self.on_rejoin(conn, msg, out),
            Control::ReplicationLag {
                batches,
                pushes,
                oldest_us,
            } => {
                if let Some(n) = self.nodes.get_mut(&conn).filter(|n| n.role == Role::Server) {
                    n.lag = Some((batches, pushes, oldest_us));
                }
            }
            Control::Leave { rank } => self.on_leave(conn, rank, out),
            Control::Synced { epoch } => {
                let rank = self
                    .nodes
                    .get(&conn)
                    .filter(|n| n.role == Role::Server)
                    .map(|n| n.rank);
                if let (Some(rank), Some(ch)) = (rank, self.change.as_mut()) {
                    if ch.epoch == epoch {
                        ch.waiting.remove(&rank);
                    }
                }
                self.maybe_flip(out);
            }
            Control::StatusRequest => out.push(Output::Send {
                conn,
                msg: Control::Status {
                    report: self.status(),
                },
            }),
            Control::ServerDone { stats } => {
                let is_server = self
                    .nodes
                    .get(&conn)
                    .is_some_and(|n| n.role == Role::Server);
                if !is_server {
                    return self.refuse(
                        conn,
                        "server counters from a node that is not a server",
                        out,
                    );
                }
                if !self.server_stats.iter().any(|s| s.rank == stats.rank) {
                    self.server_stats.push(stats);
                }
            }
            Control::Summary { json } => match serde_json::from_str(&json) {
                Ok(v) => self.summaries.push(v),
                Err(e) => out.push(Output::Log(format!("ignored a malformed summary: {e}"))),
            },
            Control::Done { stats } => {
                let Some(node) = self.nodes.get_mut(&conn).filter(|n| n.role == Role::Worker)
                else {
                    return self.refuse(
                        conn,
                        "done from a node that is not a registered worker",
                        out,
                    );
                };
                if !node.done {
                    node.done = true;
                    self.stats.push(stats);
                }
                self.release_barriers(out);
                self.maybe_finish(out);
            }
            other => out.push(Output::Log(format!(
                "ignored unexpected control message {other:?} on connection {conn}"
            ))),
        }
    }

    fn is_worker(&self, conn: ConnKey) -> bool {
        self.welcomed
            && self
                .nodes
                .get(&conn)
                .is_some_and(|n| n.role == Role::Worker)
    }

    fn refuse(&mut self, conn: ConnKey, reason: &str, out: &mut Vec<Output>) {
        out.push(Output::Log(format!("refused connection {conn}: {reason}")));
        out.push(Output::Send {
            conn,
            msg: Control::Refused {
                reason: reason.to_string(),
            },
        });
    }

    fn on_register(
        &mut self,
        conn: ConnKey,
        role: Role,
        addr: Option<SocketAddr>,
        rank: Option<u32>,
        pid: u32,
        out: &mut Vec<Output>,
    ) {
        if self.servers_welcomed && role == Role::Worker && self.welcomed && !self.finished {
            return self.late_worker(conn, rank, pid, out);
        }
        if self.servers_welcomed {
            return self.refuse(
                conn,
                "the cluster is complete; servers join a running job with `pserv server --join`",
                out,
            );
        }
        if self.nodes.contains_key(&conn) {
            return self.refuse(conn, "this connection already registered", out);
        }
        if role == Role::Server && addr.is_none() {
            return self.refuse(conn, "a server must give its listening address", out);
        }
        let count = self.count(role);
        let taken: BTreeSet<u32> = self
            .nodes
            .values()
            .filter(|n| n.role == role)
            .map(|n| n.rank)
            .collect();
        let rank = match rank {
            Some(r) if r >= count => {
                return self.refuse(
                    conn,
                    &format!("{role} rank {r} is out of range (the cluster has {count})"),
                    out,
                )
            }
            Some(r) if taken.contains(&r) => {
                return self.refuse(conn, &format!("{role} rank {r} is already taken"), out)
            }
            Some(r) => r,
            None => match (0..count).find(|r| !taken.contains(r)) {
                Some(r) => r,
                None => {
                    return self.refuse(conn, &format!("all {count} {role} places are taken"), out)
                }
            },
        };
        out.push(Output::Log(format!("{role} {rank} registered (pid {pid})")));
        self.add_node(conn, role, rank, addr);
        let registered = |r: Role| self.nodes.values().filter(|n| n.role == r).count() as u32;
        if registered(Role::Server) == self.spec.servers
            && registered(Role::Worker) == self.spec.workers
        {
            self.welcome(Role::Server, out);
        }
    }

    /// The cluster table, from the registered servers.
    fn cluster(&self) -> ClusterInfo {
        let mut servers: Vec<ServerInfo> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Server)
            .map(|n| ServerInfo {
                id: self.node_id(Role::Server, n.rank),
                rank: n.rank,
                addr: n.addr.expect("servers register with an address"),
            })
            .collect();
        servers.sort_by_key(|s| s.rank);
        ClusterInfo {
            servers,
            workers: self.spec.workers,
            partition: self.table.clone(),
            value_type: self.spec.value_type,
            value_len: self.spec.value_len,
            update: self.spec.update,
        }
    }

    /// Send the cluster table to every node of `role`: servers first (phase 1); workers
    /// once every server is ready (phase 2), so no request reaches a server without a store.
    fn welcome(&mut self, role: Role, out: &mut Vec<Output>) {
        if role == Role::Worker {
            // The job starts now: servers' heartbeat clocks start now too.
            let now = self.now_ms;
            for n in self.nodes.values_mut().filter(|n| n.role == Role::Server) {
                n.seen_ms = n.seen_ms.max(now);
            }
        }
        let cluster = self.cluster();
        let mut conns: Vec<(ConnKey, u32)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.role == role)
            .map(|(c, n)| (*c, n.rank))
            .collect();
        conns.sort_by_key(|&(_, rank)| rank);
        for (conn, rank) in conns {
            out.push(Output::Send {
                conn,
                msg: Control::Welcome {
                    node_id: self.node_id(role, rank),
                    rank,
                    cluster: cluster.clone(),
                },
            });
        }
        match role {
            Role::Server => self.servers_welcomed = true,
            Role::Worker => {
                self.welcomed = true;
                out.push(Output::Log(format!(
                    "cluster complete: {} servers, {} workers",
                    self.spec.servers, self.spec.workers
                )));
            }
        }
    }

    /// Release every barrier that all live workers have reached.
    fn release_barriers(&mut self, out: &mut Vec<Output>) {
        if self.recovering_until.is_some() {
            return;
        }
        let live: BTreeSet<ConnKey> = self.live_workers().map(|(c, _)| *c).collect();
        let mut ranks: Vec<u32> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Worker && !n.gone)
            .map(|n| n.rank)
            .collect();
        ranks.sort_unstable();
        let ready: Vec<u64> = self
            .barriers
            .iter()
            .filter(|(_, arrived)| live.is_subset(arrived))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in ready {
            self.last_barrier = self.last_barrier.max(seq);
            let arrived = self.barriers.remove(&seq).unwrap_or_default();
            for conn in arrived {
                if self.nodes.get(&conn).is_some_and(|n| !n.gone) {
                    out.push(Output::Send {
                        conn,
                        msg: Control::BarrierDone {
                            seq,
                            live: ranks.clone(),
                        },
                    });
                }
            }
        }
    }

    fn on_closed(&mut self, conn: ConnKey, out: &mut Vec<Output>) {
        if !self.servers_welcomed {
            if let Some(n) = self.nodes.remove(&conn) {
                out.push(Output::Log(format!(
                    "{} {} left before the cluster was complete",
                    n.role, n.rank
                )));
            }
            return;
        }
        let Some(n) = self.nodes.get_mut(&conn) else {
            return;
        };
        n.gone = true;
        let (role, rank, done) = (n.role, n.rank, n.done);
        if self.finished {
            return;
        }
        match role {
            Role::Worker if !done => {
                out.push(Output::Log(format!(
                    "worker {rank} disconnected before finishing; the others learn it at the next barrier (its data shard passes to them unless the job skips it)"
                )));
                self.release_barriers(out);
                self.maybe_finish(out);
            }
            Role::Server => self.fail_server(rank, out),
            _ => {}
        }
    }

    /// Server `rank` failed (its connection closed, or it missed heartbeats). With
    /// replicas, take it off the ring: its ranges pass to the next servers of their chains
    /// (which hold every acknowledged push), a new epoch of the routing table goes to every
    /// node, and the heads copy ranges to the replicas new in their chains. Without
    /// replicas its ranges are lost: said so.
    fn fail_server(&mut self, rank: u32, out: &mut Vec<Output>) {
        let joining = self.change.as_ref().is_some_and(|c| {
            c.target.has_server(rank) && !self.ring.as_ref().is_some_and(|r| r.has_server(rank))
        });
        if joining {
            // The joining server failed while it copied: back to the table without it.
            self.change = None;
            if let Some(ring) = &self.ring {
                let ring = ring.with_epoch(self.table.epoch() + 1);
                self.table = Partition::from_ring_chains(
                    &ring,
                    self.server_ranks as usize,
                    self.spec.replicas as usize,
                );
                self.ring = Some(ring);
                out.push(Output::Log(format!(
                    "joining server {rank} failed: routing table epoch {} without it",
                    self.table.epoch()
                )));
                self.broadcast(
                    &Control::Table {
                        partition: self.table.clone(),
                    },
                    out,
                );
            }
            return;
        }
        let Some(ring) = self.ring.as_ref().filter(|r| r.has_server(rank)) else {
            return;
        };
        if self.spec.replicas == 0 || ring.servers().len() < 2 {
            out.push(Output::Log(format!(
                "server {rank} failed; without replicas (--replicas 0) its key ranges are unavailable"
            )));
            return;
        }
        // A join or leave in progress is abandoned: back to the ring before it, less
        // the failed server.
        if let Some(ch) = self.change.take() {
            out.push(Output::Log(format!(
                "server {rank} failed during a ring change (epoch {}): change abandoned",
                ch.epoch
            )));
        }
        let ring = ring.remove_server(rank).with_epoch(self.table.epoch() + 1);
        self.table = Partition::from_ring_chains(
            &ring,
            self.server_ranks as usize,
            self.spec.replicas as usize,
        );
        self.ring = Some(ring);
        self.failovers.push((rank, self.now_ms));
        out.push(Output::Log(format!(
            "server {rank} failed: routing table epoch {} moves its ranges to their replicas",
            self.table.epoch()
        )));
        let mut targets: Vec<ConnKey> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.gone)
            .map(|(c, _)| *c)
            .collect();
        targets.sort_unstable();
        for conn in targets {
            out.push(Output::Send {
                conn,
                msg: Control::Table {
                    partition: self.table.clone(),
                },
            });
        }
    }

    /// The routing table as it is now.
    pub fn table(&self) -> &Partition {
        &self.table
    }

    /// Send `msg` to every node still connected.
    fn broadcast(&self, msg: &Control, out: &mut Vec<Output>) {
        let mut targets: Vec<ConnKey> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.gone)
            .map(|(c, _)| *c)
            .collect();
        targets.sort_unstable();
        for conn in targets {
            out.push(Output::Send {
                conn,
                msg: msg.clone(),
            });
        }
    }

    /// A worker registers while the job runs (elastic workers): it gets the next rank
    /// and the current table, and takes part in barriers from the next one it joins.
    fn late_worker(&mut self, conn: ConnKey, rank: Option<u32>, pid: u32, out: &mut Vec<Output>) {
        if self.nodes.contains_key(&conn) {
            return self.refuse(conn, "this connection already registered", out);
        }
        if let Some(r) = rank.filter(|r| {
            self.nodes
                .values()
                .any(|n| n.role == Role::Worker && n.rank == *r)
        }) {
            return self.refuse(conn, &format!("worker rank {r} is already taken"), out);
        }
        let rank = rank.unwrap_or(self.worker_ranks).max(self.worker_ranks);
        self.worker_ranks = rank + 1;
        out.push(Output::Log(format!(
            "worker {rank} joins the running job (pid {pid})"
        )));
        self.add_node(conn, Role::Worker, rank, None);
        out.push(Output::Send {
            conn,
            msg: Control::Welcome {
                node_id: self.node_id(Role::Worker, rank),
                rank,
                cluster: self.cluster(),
            },
        });
    }

    /// A server asks to join the running job.
    fn on_join(
        &mut self,
        conn: ConnKey,
        addr: SocketAddr,
        rank: Option<u32>,
        pid: u32,
        out: &mut Vec<Output>,
    ) {
        let refuse = |c: &mut Self, why: String, out: &mut Vec<Output>| c.refuse(conn, &why, out);
        if !self.welcomed || self.finished {
            return refuse(self, "joins are taken while a job runs".into(), out);
        }
        if self.ring.is_none() {
            return refuse(
                self,
                "joins need the consistent-hashing ring (--vnodes above 0)".into(),
                out,
            );
        }
        if self.nodes.contains_key(&conn) {
            return refuse(self, "this connection already registered".into(), out);
        }
        if self.change.is_some() {
            return refuse(
                self,
                "another join or leave is in progress; try again when it is done".into(),
                out,
            );
        }
        let servers: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Server)
            .collect();
        if let Some(r) = rank.filter(|r| servers.iter().any(|n| n.rank == *r)) {
            return refuse(
                self,
                format!("server rank {r} is already taken (duplicate id)"),
                out,
            );
        }
        if servers.iter().any(|n| !n.gone && n.addr == Some(addr)) {
            return refuse(
                self,
                format!("a live server already listens at {addr} (duplicate)"),
                out,
            );
        }
        let rank = rank.unwrap_or(self.server_ranks).max(self.server_ranks);
        self.server_ranks = rank + 1;
        out.push(Output::Log(format!(
            "server {rank} asks to join (pid {pid}, {addr})"
        )));
        self.add_node(conn, Role::Server, rank, Some(addr));
        out.push(Output::Send {
            conn,
            msg: Control::Welcome {
                node_id: self.node_id(Role::Server, rank),
                rank,
                cluster: self.cluster(),
            },
        });
    }

    /// A joining server has its store: everyone learns its address, and the copy phase
    /// of the ring with it begins.
    fn joined(&mut self, conn: ConnKey, out: &mut Vec<Output>) {
        let Some(rank) = self.nodes.get(&conn).map(|n| n.rank) else {
            return;
        };
        let servers = self.cluster().servers;
        self.broadcast(&Control::Servers { servers }, out);
        let Some(ring) = self.ring.as_ref() else {
            return;
        };
        let target = ring.add_server(rank);
        self.start_change(target, None, out);
    }

    /// Server `rank` should leave gracefully.
    fn on_leave(&mut self, conn: ConnKey, rank: u32, out: &mut Vec<Output>) {
        let Some(ring) = self.ring.as_ref() else {
            return self.refuse(
                conn,
                "leaves need the consistent-hashing ring (--vnodes above 0)",
                out,
            );
        };
        if !ring.has_server(rank) {
            return self.refuse(
                conn,
                &format!("server {rank} holds no ranges (not on the ring)"),
                out,
            );
        }
        if ring.servers().len() < 2 {
            return self.refuse(conn, "the last server cannot leave", out);
        }
        if self.change.is_some() {
            return self.refuse(
                conn,
                "another join or leave is in progress; try again when it is done",
                out,
            );
        }
        if !self.welcomed || self.finished {
            return self.refuse(conn, "leaves are taken while a job runs", out);
        }
        let target = ring.remove_server(rank);
        out.push(Output::Send {
            conn,
            msg: Control::Log {
                line: format!(
                    "server {rank} is leaving: its ranges are copied, then the table flips"
                ),
            },
        });
        self.start_change(target, Some(rank), out);
    }

    /// Begin moving to `target`: the middle table keeps every head and extends each chain
    /// by the servers that will hold the range under `target`; heads copy to them and
    /// report `Synced`; then [`maybe_flip`](Self::maybe_flip) sends the final table.
    fn start_change(
        &mut self,
        target: crate::placement::ring::Ring,
        leaving: Option<u32>,
        out: &mut Vec<Output>,
    ) {
        let k = self.spec.replicas as usize;
        let ranks = self.server_ranks as usize;
        let old = self.table.clone();
        let fin = Partition::from_ring_chains(&target, ranks, k);
        let mut pieces: Vec<(crate::base::keys::KeyRange, Vec<u32>)> = Vec::new();
        for (i, r) in fin.ranges().iter().enumerate() {
            // Cut by the old table's ranges too.
            let mut b = r.begin;
            while b < r.end {
                let oi = old.index_of(b);
                let e = old.ranges()[oi].end.min(r.end);
                let mut chain: Vec<u32> = std::iter::once(old.owners()[oi])
                    .chain(old.followers()[oi].iter().copied())
                    .collect();
                for s in std::iter::once(fin.owners()[i]).chain(fin.followers()[i].iter().copied())
                {
                    if !chain.contains(&s) {
                        chain.push(s);
                    }
                }
                pieces.push((crate::base::keys::KeyRange::new(b, e), chain));
                b = e;
            }
        }
        let epoch = old.epoch() + 1;
        let mid = Partition::from_chains(pieces, ranks, epoch)
            .expect("the middle table tiles the key space");
        let waiting: BTreeSet<u32> = mid.owners().iter().copied().collect();
        out.push(Output::Log(format!(
            "routing table epoch {epoch}: copying ranges for {} (final epoch {})",
            match leaving {
                Some(r) => format!("the leave of server {r}"),
                None => "a joining server".into(),
            },
            epoch + 1
        )));
        let target = target.with_epoch(epoch + 1);
        self.table = mid;
        self.change = Some(Change {
            target,
            epoch,
            waiting,
            leaving,
        });
        self.broadcast(
            &Control::Table {
                partition: self.table.clone(),
            },
            out,
        );
    }

    /// Every head of the middle table has copied: send the final table.
    fn maybe_flip(&mut self, out: &mut Vec<Output>) {
        if !self.change.as_ref().is_some_and(|c| c.waiting.is_empty()) {
            return;
        }
        let ch = self.change.take().expect("checked above");
        self.table = Partition::from_ring_chains(
            &ch.target,
            self.server_ranks as usize,
            self.spec.replicas as usize,
        );
        self.ring = Some(ch.target);
        out.push(Output::Log(format!(
            "routing table epoch {}: ranges moved",
            self.table.epoch()
        )));
        self.broadcast(
            &Control::Table {
                partition: self.table.clone(),
            },
            out,
        );
        if let Some(rank) = ch.leaving {
            if let Some((&conn, _)) = self
                .nodes
                .iter()
                .find(|(_, n)| n.role == Role::Server && n.rank == rank && !n.gone)
            {
                out.push(Output::Send {
                    conn,
                    msg: Control::Shutdown,
                });
            }
        }
    }

    fn maybe_finish(&mut self, out: &mut Vec<Output>) {
        if self.finished || self.live_workers().next().is_some() {
            return;
        }
        self.finished = true;
        let mut targets: Vec<(ConnKey, Role, u32)> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.gone)
            .map(|(c, n)| (*c, n.role, n.rank))
            .collect();
        targets.sort_by_key(|&(_, role, rank)| (role == Role::Server, rank));
        for (conn, _, _) in targets {
            out.push(Output::Send {
                conn,
                msg: Control::Shutdown,
            });
        }
        out.push(Output::JobDone);
    }
}

/// Configuration of the scheduler process.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The cluster.
    pub spec: ClusterSpec,
    /// The transport.
    pub tcp: TcpConfig,
    /// Write the bound address here once listening (for launchers using port 0).
    pub port_file: Option<PathBuf>,
    /// Write the job summary (JSON) here at the end.
    pub summary_json: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Give up if the cluster is not complete after this long.
    pub register_timeout: Duration,
    /// Declare a server dead after this long without a heartbeat.
    pub heartbeat_timeout: Duration,
    /// A restart of a failed scheduler: rebuild the view from the nodes' reports, waiting
    /// at most this long after the first one (or until every node of the spec reported).
    pub recover: Option<Duration>,
}

/// How often the scheduler's loop feeds time to its state machine.
const TICK_EVERY: Duration = Duration::from_millis(200);

/// What the job reported, merged.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The merged summary object.
    pub summary: serde_json::Value,
}

struct SchedHandler {
    events: crossbeam_channel::Sender<(Conn, Option<Control>)>,
}

impl Handler for SchedHandler {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        match Control::from_frame(&frame.frame()) {
            Ok(msg) => {
                let _ = self.events.send((conn.clone(), Some(msg)));
            }
            Err(e) => {
                tracing::warn!(peer = %conn.peer_addr(), error = %e, "closing a connection that sent a bad control message");
                conn.close();
            }
        }
    }
    fn on_close(&mut self, conn: &Conn, _reason: &CloseReason) {
        let _ = self.events.send((conn.clone(), None));
    }
}

/// Run the scheduler until the job is over; returns the merged job summary.
pub fn run_scheduler(cfg: SchedulerConfig) -> Result<JobReport, EngineError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let transport = TcpTransport::start(cfg.tcp.clone(), |_| SchedHandler { events: tx.clone() })?;
    let addr = transport.listen(cfg.listen)?;
    if let Some(p) = &cfg.port_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|_| std::fs::rename(&tmp, p))
            .map_err(|source| EngineError::Io {
                context: format!("writing the port file {}", p.display()),
                source,
            })?;
    }
    tracing::info!(%addr, "scheduler listening");
    let mut core =
        SchedulerCore::new(cfg.spec.clone()).with_heartbeat_timeout(cfg.heartbeat_timeout);
    if let Some(wait) = cfg.recover {
        tracing::info!(%addr, "recovering: waiting for the nodes to rejoin");
        core = core.recovering(wait);
    }
    let conns: Arc<Mutex<HashMap<ConnKey, Conn>>> = Arc::default();
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} examples ({per_sec}, eta {eta})",
            )
            .expect("a valid template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut running_since: Option<Instant> = None;
    let mut finished_at: Option<Instant> = None;
    let mut seconds = 0.0;
    // Run until the job is over and every server has reported (or 10 s passed).
    while !(core.is_finished()
        && (core.servers_reported()
            || finished_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10))))
    {
        let timeout = if core.is_finished() {
            Duration::from_millis(100)
        } else if core.is_running() {
            TICK_EVERY
        } else {
            cfg.register_timeout
                .saturating_sub(started.elapsed())
                .min(TICK_EVERY)
        };
        let received = rx.recv_timeout(timeout);
        let now_ms = started.elapsed().as_millis() as u64;
        let mut outs = core.handle(Input::Tick { now_ms });
        match received {
            Ok((conn, msg)) => {
                let key = conn.id();
                let input = match msg {
                    Some(msg) => {
                        conns.lock().insert(key, conn);
                        Input::Message { conn: key, msg }
                    }
                    None => {
                        conns.lock().remove(&key);
                        Input::Closed { conn: key }
                    }
                };
                outs.extend(core.handle(input));
            }
            Err(_)
                if core.is_finished()
                    || core.is_running()
                    || started.elapsed() < cfg.register_timeout => {}
            Err(_) => {
                return Err(EngineError::Registration(format!(
                    "the cluster did not complete within {:?}",
                    cfg.register_timeout
                )))
            }
        }
        for o in outs {
            match o {
                Output::Send { conn, msg } => {
                    if let Some(c) = conns.lock().get(&conn) {
                        if let Err(e) = c.send(msg.to_frame(SCHEDULER_ID)) {
                            tracing::debug!(error = %e, "scheduler send failed");
                        }
                    }
                }
                Output::Log(line) => {
                    tracing::info!("{line}");
                    if line.starts_with("epoch") || line.starts_with("final") {
                        bar.suspend(|| println!("{line}"));
                    }
                }
                Output::Progress { done, total } => {
                    if bar.length() != Some(total) {
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                }
                Output::JobDone => {
                    finished_at = Some(Instant::now());
                    seconds = running_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                }
            }
        }
        if core.is_running() && running_since.is_none() {
            running_since = Some(Instant::now());
        }
    }
    bar.finish_and_clear();
    let summary = merge_summary(&core, seconds);
    if let Some(p) = &cfg.summary_json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&summary).expect("json encodes"),
        )
        .map_err(|source| EngineError::Io {
            context: format!("writing the summary {}", p.display()),
            source,
        })?;
    }
    // Let the shutdown messages leave before the loops stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while conns.lock().values().any(|c| c.queued_bytes() > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    transport.shutdown();
    Ok(JobReport { summary })
}

fn merge_summary(core: &SchedulerCore, seconds: f64) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for s in &core.summaries {
        if let Some(m) = s.as_object() {
            for (k, v) in m {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    let examples: u64 = core.stats.iter().map(|s| s.examples).sum();
    let sent: u64 = core.stats.iter().map(|s| s.bytes_sent).sum();
    let received: u64 = core.stats.iter().map(|s| s.bytes_received).sum();
    obj.insert("examples".into(), examples.into());
    obj.insert("seconds".into(), seconds.into());
    obj.insert(
        "examples_per_sec".into(),
        (if seconds > 0.0 {
            examples as f64 / seconds
        } else {
            0.0
        })
        .into(),
    );
    obj.insert("bytes_sent".into(), sent.into());
    obj.insert("bytes_received".into(), received.into());
    obj.insert("workers_finished".into(), (core.stats.len() as u64).into());
    obj.insert(
        "worker_examples".into(),
        core.stats
            .iter()
            .map(|s| s.examples)
            .collect::<Vec<u64>>()
            .into(),
    );
    let worked: f64 = core.stats.iter().map(|s| s.seconds).sum();
    let blocked: f64 = core.stats.iter().map(|s| s.blocked_seconds).sum();
    obj.insert("worker_seconds".into(), worked.into());
    if worked > 0.0 {
        // Share of the workers' time spent waiting for pulls: round trips plus any time
        // the consistency gates held them (gate_held_seconds, from the servers).
        obj.insert("blocked_fraction".into(), (blocked / worked).into());
    }
    if !core.server_stats.is_empty() {
        let nonzero: u64 = core.server_stats.iter().map(|s| s.nonzero).sum();
        let keys: u64 = core.server_stats.iter().map(|s| s.keys).sum();
        obj.insert("nonzero_weights".into(), nonzero.into());
        obj.insert("stored_keys".into(), keys.into());
        let held: u64 = core.server_stats.iter().map(|s| s.held_pulls).sum();
        let held_s: f64 = core.server_stats.iter().map(|s| s.held_pull_seconds).sum();
        obj.insert("gate_held_pulls".into(), held.into());
        obj.insert("gate_held_seconds".into(), held_s.into());
        let batches: u64 = core.server_stats.iter().map(|s| s.replica_batches).sum();
        let pushes: u64 = core.server_stats.iter().map(|s| s.replica_pushes).sum();
        let bytes: u64 = core.server_stats.iter().map(|s| s.replica_bytes).sum();
        obj.insert("replica_batches".into(), batches.into());
        obj.insert("replica_pushes".into(), pushes.into());
        obj.insert("replica_bytes".into(), bytes.into());
    }
    obj.insert("failovers".into(), (core.failovers.len() as u64).into());
    serde_json::Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(servers: u32, workers: u32) -> ClusterSpec {
        ClusterSpec {
            servers,
            workers,
            value_type: ValueType::F32,
            value_len: 1,
            update: UpdateSpec::Sum,
            vnodes: 0,
            replicas: 0,
        }
    }

    fn register(
        core: &mut SchedulerCore,
        conn: ConnKey,
        role: Role,
        rank: Option<u32>,
    ) -> Vec<Output> {
        core.handle(Input::Message {
            conn,
            msg: Control::Register {
                role,
                addr: (role == Role::Server)
                    .then(|| format!("127.0.0.1:{}", 7000 + conn).parse().unwrap()),
                rank,
                pid: 1,
            },
        })
    }

    fn sends(out: &[Output]) -> Vec<(ConnKey, &Control)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { conn, msg } => Some((*conn, msg)),
                _ => None,
            })
            .collect()
    }

    /// Two servers and two workers registered; returns the core.
    fn running() -> SchedulerCore {
        running_spec(spec(2, 2))
    }

    /// Like [`running`], for a spec of two servers and two workers.
    fn running_spec(sp: ClusterSpec) -> SchedulerCore {
        let mut c = SchedulerCore::new(sp);
        assert!(sends(&register(&mut c, 1, Role::Server, Some(1))).is_empty());
        register(&mut c, 2, Role::Worker, None);
        register(&mut c, 3, Role::Server, None);
        let out = register(&mut c, 4, Role::Worker, None);
        // Phase 1: servers only.
        let mut welcomes = sends(&out);
        assert_eq!(welcomes.len(), 2);
        assert!(welcomes.iter().all(|(c, _)| [1, 3].contains(c)));
        let out = c.handle(Input::Message {
            conn: 1,
            msg: Control::Ready,
        });
        assert!(sends(&out).is_empty());
        assert!(!c.is_running());
        // Phase 2: the last server is ready; workers get the table.
        let out = c.handle(Input::Message {
            conn: 3,
            msg: Control::Ready,
        });
        let workers = sends(&out);
        assert_eq!(workers.len(), 2);
        assert!(workers.iter().all(|(c, _)| [2, 4].contains(c)));
        welcomes.extend(workers);
        // Servers are welcomed first, ranks honoured, ids distinct.
        let mut ids = BTreeSet::new();
        for (i, (conn, msg)) in welcomes.iter().enumerate() {
            let Control::Welcome {
                node_id,
                rank,
                cluster,
            } = msg
            else {
                panic!("expected a welcome, got {msg:?}")
            };
            ids.insert(*node_id);
            assert_eq!(cluster.servers.len(), 2);
            assert_eq!(cluster.servers[1].addr.port(), 7001);
            if i < 2 {
                assert!([1, 3].contains(conn));
            }
            if *conn == 1 {
                assert_eq!(*rank, 1);
            }
            if *conn == 3 {
                assert_eq!(*rank, 0);
            }
        }
        assert_eq!(ids.len(), 4);
        assert!(c.is_running());
        c
    }

    #[test]
    fn a_failed_server_leaves_the_ring_and_everyone_gets_the_new_table() {
        let mut sp = spec(2, 2);
        sp.vnodes = 16;
        sp.replicas = 1;
        assert!(sp.validate().is_ok());
        let mut c = running_spec(sp.clone());
        assert_eq!(c.table().replicas(), 1);
        assert_eq!(c.status().ranges[0].chain.len(), 2);
        // Server rank 1 (connection 1) dies.
        let out = c.handle(Input::Closed { conn: 1 });
        let tables: Vec<_> = sends(&out)
            .into_iter()
            .filter_map(|(conn, m)| match m {
                Control::Table { partition } => Some((conn, partition.clone())),
                _ => None,
            })
            .collect();
        let mut to: Vec<ConnKey> = tables.iter().map(|t| t.0).collect();
        to.sort_unstable();
        assert_eq!(to, vec![2, 3, 4], "every live node learns the table");
        let t = &tables[0].1;
        assert_eq!(t.epoch(), 2);
        assert!(
            t.owners().iter().all(|&o| o == 0),
            "server 0 heads everything"
        );
        assert!(
            t.followers().iter().all(Vec::is_empty),
            "no server left to replicate to"
        );
        assert_eq!(c.failovers.len(), 1);
        assert_eq!(c.status().epoch, 2);
        // Again: nothing more happens.
        let out = c.handle(Input::Closed { conn: 1 });
        assert!(sends(&out).is_empty());

        // Without replicas the ranges are lost, said so, and the table stays.
        sp.replicas = 0;
        let mut c = running_spec(sp);
        let out = c.handle(Input::Closed { conn: 1 });
        assert!(sends(&out).is_empty());
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Log(l) if l.contains("unavailable"))));
        assert_eq!(c.table().epoch(), 1);
    }

    fn tables(out: &[Output]) -> Vec<(ConnKey, Partition)> {
        sends(out)
            .into_iter()
            .filter_map(|(conn, m)| match m {
                Control::Table { partition } => Some((conn, partition.clone())),
                _ => None,
            })
            .collect()
    }

    fn msg(c: &mut SchedulerCore, conn: ConnKey, msg: Control) -> Vec<Output> {
        c.handle(Input::Message { conn, msg })
    }

    #[test]
    fn a_server_joins_copies_first_then_the_table_flips_and_another_leaves() {
        let mut sp = spec(2, 2);
        sp.vnodes = 16;
        sp.replicas = 1;
        let mut c = running_spec(sp);
        let join = |addr: &str, rank| Control::Join {
            addr: addr.parse().unwrap(),
            rank,
            pid: 9,
        };
        // Duplicates are refused and change nothing.
        for bad in [
            join("127.0.0.1:7001", None),
            join("127.0.0.1:9000", Some(1)),
        ] {
            let out = msg(&mut c, 9, bad);
            assert!(
                matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("duplicate"))
            );
        }
        assert_eq!(c.table().epoch(), 1);
        // A real join: welcomed with the current table, as rank 2, id above the workers'.
        let out = msg(&mut c, 9, join("127.0.0.1:9000", None));
        let Control::Welcome {
            node_id,
            rank,
            cluster,
        } = sends(&out)[0].1
        else {
            panic!("expected a welcome: {out:?}")
        };
        assert_eq!((*rank, *node_id), (2, crate::proto::JOINED_SERVER_BASE + 2));
        assert_eq!(cluster.partition.epoch(), 1);
        // Ready: everyone learns the servers, and the copy table (epoch 2) goes out.
        let out = msg(&mut c, 9, Control::Ready);
        assert!(sends(&out)
            .iter()
            .any(|(_, m)| matches!(m, Control::Servers { servers } if servers.len() == 3)));
        let t = tables(&out);
        assert_eq!(t.len(), 5, "all five nodes get the copy table");
        let mid = t[0].1.clone();
        assert_eq!(mid.epoch(), 2);
        assert!(
            mid.owners().iter().all(|&o| o < 2),
            "heads do not change while copying"
        );
        assert!(
            mid.followers().iter().any(|f| f.contains(&2)),
            "the joiner receives copies"
        );
        // A second change waits for this one.
        let out = msg(&mut c, 2, Control::Leave { rank: 0 });
        assert!(
            matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("in progress"))
        );
        // Heads report their copies; a stale report does not count.
        assert!(tables(&msg(&mut c, 1, Control::Synced { epoch: 1 })).is_empty());
        assert!(tables(&msg(&mut c, 1, Control::Synced { epoch: 2 })).is_empty());
        let out = msg(&mut c, 3, Control::Synced { epoch: 2 });
        let t = tables(&out);
        assert_eq!(t.len(), 5);
        let fin = &t[0].1;
        assert_eq!(fin.epoch(), 3);
        assert!(fin.owners().contains(&2), "the joiner heads ranges now");
        assert_eq!(c.table(), fin);
        // Now server 0 (connection 3) leaves gracefully.
        let out = msg(&mut c, 2, Control::Leave { rank: 7 });
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        let out = msg(&mut c, 2, Control::Leave { rank: 0 });
        let mid = &tables(&out)[0].1;
        assert_eq!(mid.epoch(), 4);
        let heads: BTreeSet<u32> = mid.owners().iter().copied().collect();
        let mut out = Vec::new();
        for (conn, rank) in [(1, 1), (3, 0), (9, 2)] {
            if heads.contains(&rank) {
                out = msg(&mut c, conn, Control::Synced { epoch: 4 });
            }
        }
        let fin = &tables(&out)[0].1;
        assert_eq!(fin.epoch(), 5);
        assert!(fin.owners().iter().all(|&o| o != 0));
        assert!(fin.followers().iter().all(|f| !f.contains(&0)));
        assert!(
            sends(&out).contains(&(3, &Control::Shutdown)),
            "the leaver is told to stop"
        );
        // Its connection closing afterwards is no failure.
        let out = c.handle(Input::Closed { conn: 3 });
        assert!(tables(&out).is_empty());
        assert!(c.failovers.is_empty());
    }

    #[test]
    fn a_restarted_scheduler_rebuilds_its_view_from_the_rejoining_nodes() {
        let mut sp = spec(2, 2);
        sp.vnodes = 16;
        sp.replicas = 1;
        // The table the servers had: server 1 failed earlier (epoch 2).
        let ring = crate::placement::ring::Ring::new(&[0, 1], 16).remove_server(1);
        let table = Partition::from_ring_chains(&ring, 2, 1);
        assert_eq!(table.epoch(), 2);
        let rejoin = |role, rank, node_id, table: &Partition, barriers| Control::Rejoin {
            role,
            rank,
            node_id,
            addr: (role == Role::Server).then(|| "127.0.0.1:7000".parse().unwrap()),
            pid: 1,
            table: table.clone(),
            barriers,
        };
        // Not recovering: a rejoin is refused.
        let mut fresh = running_spec(sp.clone());
        let out = msg(&mut fresh, 50, rejoin(Role::Worker, 0, 3, &table, 0));
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));

        let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
        assert!(c.is_recovering());
        // Only server 0 is alive; the workers passed 4 barriers.
        let out = msg(&mut c, 1, rejoin(Role::Server, 0, 1, &table, 0));
        assert!(sends(&out).is_empty());
        msg(&mut c, 2, rejoin(Role::Worker, 0, 3, &table, 4));
        // A barrier before the view is rebuilt waits.
        assert!(sends(&msg(&mut c, 2, Control::Barrier { seq: 5 })).is_empty());
        msg(&mut c, 3, rejoin(Role::Worker, 1, 4, &table, 4));
        // A rank that rejoined already is refused.
        let out = msg(&mut c, 4, rejoin(Role::Worker, 1, 4, &table, 4));
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        // Server 1 never comes: the wait ends and the view is the servers' newest table.
        let out = c.handle(Input::Tick { now_ms: 600 });
        assert!(!c.is_recovering());
        assert_eq!(c.table().epoch(), 2);
        let t = tables(&out);
        assert_eq!(t.len(), 3, "every node gets the table");
        // Barriers go on from where the workers are.
        let out = msg(&mut c, 3, Control::Barrier { seq: 5 });
        assert_eq!(sends(&out).len(), 2);
        // And decisions resume: server 0 is the only one, so its failure is said plainly.
        let out = c.handle(Input::Closed { conn: 1 });
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Log(l) if l.contains("unavailable"))));
    }

    #[test]
    fn replica_settings_that_cannot_work_are_refused() {
        let mut sp = spec(2, 2);
        sp.replicas = 1;
        assert!(sp.validate().unwrap_err().contains("--vnodes"));
        sp.vnodes = 8;
        sp.replicas = 2;
        assert!(sp.validate().unwrap_err().contains("at least 3 servers"));
        sp.replicas = 1;
        assert!(sp.validate().is_ok());
    }

    #[test]
    fn registration_assigns_ranks_and_welcomes_everyone() {
        running();
    }

    #[test]
    fn bad_registrations_are_refused() {
        let mut c = SchedulerCore::new(spec(1, 1));
        let out = register(&mut c, 1, Role::Server, Some(5));
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        register(&mut c, 2, Role::Server, Some(0));
        let out = register(&mut c, 3, Role::Server, Some(0));
        assert!(
            matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("taken"))
        );
        let out = register(&mut c, 4, Role::Server, None);
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        let out = c.handle(Input::Message {
            conn: 9,
            msg: Control::Register {
                role: Role::Server,
                addr: None,
                rank: None,
                pid: 1,
            },
        });
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        // A node leaving before the cluster completes frees its rank.
        c.handle(Input::Closed { conn: 2 });
        assert!(sends(&register(&mut c, 5, Role::Server, Some(0))).is_empty());
    }

    #[test]
    fn barriers_release_when_all_live_workers_arrive() {
        let mut c = running();
        let out = c.handle(Input::Message {
            conn: 2,
            msg: Control::Barrier { seq: 1 },
        });
        assert!(sends(&out).is_empty());
        let out = c.handle(Input::Message {
            conn: 4,
            msg: Control::Barrier { seq: 1 },
        });
        let s = sends(&out);
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|(_, m)| **m
            == Control::BarrierDone {
                seq: 1,
                live: vec![0, 1]
            }));
        // A worker that vanishes no longer holds others back.
        c.handle(Input::Message {
            conn: 2,
            msg: Control::Barrier { seq: 2 },
        });
        let out = c.handle(Input::Closed { conn: 4 });
        // ...and the others learn it left (its data shard passes to them).
        assert_eq!(
            sends(&out),
            vec![(
                2,
                &Control::BarrierDone {
                    seq: 2,
                    live: vec![0]
                }
            )]
        );
    }

    #[test]
    fn barrier_from_a_server_or_stranger_is_refused() {
        let mut c = running();
        let out = c.handle(Input::Message {
            conn: 1,
            msg: Control::Barrier { seq: 1 },
        });
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        let out = c.handle(Input::Message {
            conn: 77,
            msg: Control::Done {
                stats: WorkerStats::default(),
            },
        });
        assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
        assert!(!c.is_finished());
    }

    #[test]
    fn job_ends_when_every_worker_is_done_and_everyone_is_told() {
        let mut c = running();
        let done = |examples| Control::Done {
            stats: WorkerStats {
                examples,
                bytes_sent: 10,
                bytes_received: 20,
                seconds: 2.0,
                blocked_seconds: 0.5,
            },
        };
        let out = c.handle(Input::Message {
            conn: 2,
            msg: done(5),
        });
        assert!(!out.contains(&Output::JobDone));
        let out = c.handle(Input::Message {
            conn: 4,
            msg: done(7),
        });
        assert!(out.contains(&Output::JobDone));
        let shut: Vec<ConnKey> = sends(&out)
            .iter()
            .filter(|(_, m)| **m == Control::Shutdown)
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(shut.len(), 4);
        let s = merge_summary(&c, 2.0);
        assert_eq!(s["examples"], 12);
        assert_eq!(s["examples_per_sec"], 6.0);
        assert_eq!(s["bytes_sent"], 20);
    }

    #[test]
    fn late_servers_must_join_and_late_workers_take_part_from_the_next_barrier() {
        let mut c = running();
        // A server registering the old way once the job runs is refused.
        let out = register(&mut c, 10, Role::Server, None);
        assert!(
            matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("--join"))
        );
        // Barrier 1 released for the two workers.
        for conn in [2, 4] {
            c.handle(Input::Message {
                conn,
                msg: Control::Barrier { seq: 1 },
            });
        }
        // A worker joins: the next rank, an id after the other workers'.
        let out = register(&mut c, 11, Role::Worker, None);
        let Control::Welcome { node_id, rank, .. } = sends(&out)[0].1 else {
            panic!("{out:?}")
        };
        assert_eq!((*rank, *node_id), (2, 1 + 2 + 2));
        // A taken rank is refused.
        let out = register(&mut c, 12, Role::Worker, Some(0));
        assert!(
            matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("taken"))
        );
        // The others reach barrier 2; it waits for the joiner, who asks for "the next"
        // (seq 0) and gets barrier 2 with every live rank.
        for conn in [2, 4] {
            let out = c.handle(Input::Message {
                conn,
                msg: Control::Barrier { seq: 2 },
            });
            assert!(sends(&out).is_empty());
        }
        let out = c.handle(Input::Message {
            conn: 11,
            msg: Control::Barrier { seq: 0 },
        });
        let s = sends(&out);
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|(_, m)| **m
            == Control::BarrierDone {
                seq: 2,
                live: vec![0, 1, 2]
            }));
    }

    fn heartbeat(c: &mut SchedulerCore, conn: ConnKey, now_ms: u64) -> Vec<Output> {
        let mut out = c.handle(Input::Tick { now_ms });
        out.extend(c.handle(Input::Message {
            conn,
            msg: Control::Heartbeat,
        }));
        out
    }

    fn states(c: &SchedulerCore) -> Vec<(Role, u32, String)> {
        c.status()
            .nodes
            .into_iter()
            .map(|n| (n.role, n.rank, n.state))
            .collect()
    }

    #[test]
    fn heartbeats_keep_servers_live_and_silence_makes_them_dead() {
        let mut c = running().with_heartbeat_timeout(Duration::from_millis(1000));
        // Both servers beat for a while: live.
        for t in (0..3000).step_by(300) {
            heartbeat(&mut c, 1, t);
            heartbeat(&mut c, 3, t);
        }
        assert!(
            states(&c).iter().all(|(_, _, s)| s == "live"),
            "{:?}",
            states(&c)
        );
        // Server on conn 3 falls silent after its beat at 2700: dead once the timeout
        // passes (after 3700), not before.
        for t in (3000..3700).step_by(300) {
            heartbeat(&mut c, 1, t);
        }
        c.handle(Input::Tick { now_ms: 3700 });
        assert!(states(&c).iter().all(|(_, _, s)| s == "live"));
        let out = heartbeat(&mut c, 1, 3800);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Log(l) if l.contains("presumed dead"))),
            "{out:?}"
        );
        let dead: Vec<_> = states(&c)
            .into_iter()
            .filter(|(_, _, s)| s == "dead")
            .collect();
        assert_eq!(dead.len(), 1, "{dead:?}");
        // It comes back: live again.
        heartbeat(&mut c, 3, 4500);
        assert!(states(&c).iter().all(|(_, _, s)| s == "live"));
    }

    #[test]
    fn a_heartbeat_from_an_unknown_node_is_refused_and_changes_nothing() {
        let mut c = running();
        let before = c.status();
        for (conn, why) in [(99, "unknown connection"), (2, "a worker, not a server")] {
            let out = c.handle(Input::Message {
                conn,
                msg: Control::Heartbeat,
            });
            let sent = sends(&out);
            assert!(
                matches!(sent.as_slice(), [(to, Control::Refused { reason })]
                    if *to == conn && reason.contains("heartbeat from an unknown node")),
                "{why}: {out:?}"
            );
        }
        assert_eq!(c.status(), before);
    }

    #[test]
    fn status_reports_the_routing_table_and_every_node() {
        let mut c = running();
        let out = c.handle(Input::Message {
            conn: 77,
            msg: Control::StatusRequest,
        });
        let [(77, Control::Status { report })] = sends(&out).as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(report.epoch, 1);
        assert_eq!(report.ranges.len(), 2);
        assert_eq!(report.ranges[0].range.begin, 0);
        assert_eq!(report.ranges[1].range.end, crate::base::keys::KEY_END);
        assert_eq!(report.ranges[1].chain, vec![1]);
        assert_eq!(report.nodes.len(), 4);
        assert!(report.running && !report.finished);
        let text = crate::cli::status::render(report);
        assert!(text.contains("routing table epoch 1"), "{text}");
        assert!(text.contains("server 1 at 127.0.0.1:"), "{text}");
        assert!(
            text.contains("replication lag: no server reported yet"),
            "{text}"
        );
    }
}
