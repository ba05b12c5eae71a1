//! [`SchedulerCore`], the sans-I/O state machine: its state, its [`Input`]s and
//! [`Output`]s, [`SchedulerCore::handle`] and the dispatch of control messages, the status
//! report and the node bookkeeping the other parts share.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use super::membership::Change;
use super::spec::ClusterSpec;
use crate::base::ids::{NodeId, ServerRank, WorkerRank};
use crate::placement::Partition;
use crate::proto::{
    Control, NodeStatus, RangeStatus, Role, ServerStats, StatusReport, WorkerStats,
};

/// Identifies a connection to the scheduler.
pub type ConnKey = u64;

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
    /// The process wrote (or failed to write) the manifest of
    /// [`Output::WriteCheckpoint`]: `Ok` holds the checkpoint's folder.
    CheckpointCommitted {
        /// The checkpoint's job epoch.
        epoch: u64,
        /// The folder written, or why not.
        result: Result<std::path::PathBuf, String>,
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
    /// Every server wrote its checkpoint file: write `manifest` into `root` (then
    /// `latest`, [`crate::checkpoint::commit`]) and answer with
    /// [`Input::CheckpointCommitted`]; the barrier waits until then.
    WriteCheckpoint {
        /// The checkpoint folder.
        root: std::path::PathBuf,
        /// The manifest.
        manifest: Box<crate::checkpoint::Manifest>,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) role: Role,
    pub(super) rank: u32,
    pub(super) addr: Option<SocketAddr>,
    pub(super) done: bool,
    pub(super) gone: bool,
    /// When it last proved alive (registration or heartbeat), in `now_ms` time.
    pub(super) seen_ms: u64,
    /// Missed heartbeats for longer than the timeout.
    pub(super) dead: bool,
    /// Its last replication report (servers).
    pub(super) lag: Option<(u64, u64, u64)>,
    /// A worker counts in barriers (workers of the spec from the start; a worker that
    /// joins once it entered at an epoch barrier, see `scheduler/workers.rs`).
    pub(super) entered: bool,
    /// A worker told the scheduler it leaves gracefully (`Leaving`).
    pub(super) leaving: bool,
    /// A failed worker whose place a replacement took.
    pub(super) replaced: bool,
    /// A worker's shard and clock as it reported them (status).
    pub(super) shard: Option<crate::proto::WorkerShard>,
}

/// The scheduler's state machine.
#[derive(Debug)]
pub struct SchedulerCore {
    pub(super) spec: ClusterSpec,
    pub(super) nodes: HashMap<ConnKey, Node>,
    /// Servers got the cluster table (phase 1).
    pub(super) servers_welcomed: bool,
    /// Servers that answered `Ready`.
    pub(super) ready: BTreeSet<ConnKey>,
    /// Workers got the cluster table too: the job runs (phase 2).
    pub(super) welcomed: bool,
    pub(super) finished: bool,
    pub(super) barriers: BTreeMap<u64, BTreeSet<ConnKey>>,
    pub(super) progress: HashMap<ConnKey, (u64, u64)>,
    /// Stats of finished workers.
    pub stats: Vec<WorkerStats>,
    /// JSON objects workers sent as summaries.
    pub summaries: Vec<serde_json::Value>,
    /// Final counters of the servers that reported after the job ended.
    pub server_stats: Vec<ServerStats>,
    pub(super) now_ms: u64,
    pub(super) heartbeat_timeout_ms: u64,
    /// The ring as it is now (servers that failed taken off), if the cluster uses one.
    pub(super) ring: Option<crate::placement::ring::Ring>,
    /// The routing table as it is now.
    pub(super) table: Partition,
    /// Servers taken off the ring: (rank, when, in `now_ms` time).
    pub failovers: Vec<(u32, u64)>,
    /// A join or leave in progress.
    pub(super) change: Option<Change>,
    /// Server ranks handed out so far (the initial servers, then joiners).
    pub(super) server_ranks: u32,
    /// Worker ranks handed out so far (the initial workers, then joiners).
    pub(super) worker_ranks: u32,
    /// Rebuilding the view after a restart: until this time (`now_ms`), or until every
    /// node of the spec reported, nodes rejoin and nothing is decided.
    pub(super) recovering_until: Option<u64>,
    /// Milliseconds a restarted scheduler waits for nodes to rejoin.
    pub(super) recover_ms: u64,
    /// The newest barrier released.
    pub(super) last_barrier: u64,
    /// Workers beyond the spec that registered after the servers got the table but
    /// before the job ran (connection, asked rank, pid): they join once it runs.
    pub(super) early_workers: Vec<(ConnKey, Option<u32>, u32)>,
    /// Checkpoints: when, where, the one being taken.
    pub(super) ckpt: super::checkpoint::Checkpoints,
    /// Workers joining, leaving and replaced (`scheduler/workers.rs`).
    pub(super) wk: super::workers::WorkerChanges,
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
            early_workers: Vec::new(),
            ckpt: Default::default(),
            wk: Default::default(),
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
                state: if n.replaced {
                    "replaced"
                } else if n.gone && n.role == Role::Worker && self.wk.vacant.contains_key(&n.rank) {
                    "failed, place kept"
                } else if n.leaving && !n.gone {
                    "leaving"
                } else if n.gone {
                    "gone"
                } else if !n.entered {
                    "joining"
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
                shard: n.shard.clone(),
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

    /// Record a node (registered, joined or rejoined) on `conn`, alive as of now.
    pub(super) fn add_node(
        &mut self,
        conn: ConnKey,
        role: Role,
        rank: u32,
        addr: Option<SocketAddr>,
    ) {
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
                entered: true,
                leaving: false,
                replaced: false,
                shard: None,
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

    pub(super) fn count(&self, role: Role) -> u32 {
        match role {
            Role::Server => self.spec.servers,
            Role::Worker => self.spec.workers,
        }
    }

    pub(super) fn node_id(&self, role: Role, rank: u32) -> u32 {
        // Servers that joined later (ranks from `spec.servers` on) get ids above every
        // worker's.
        let id = match role {
            Role::Server => NodeId::server(ServerRank(rank), self.spec.servers),
            Role::Worker => NodeId::worker(WorkerRank(rank), self.spec.servers),
        };
        id.0
    }

    pub(super) fn live_workers(&self) -> impl Iterator<Item = (&ConnKey, &Node)> {
        self.nodes.iter().filter(|(_, n)| {
            n.role == Role::Worker && !n.gone && !n.done && n.entered && !n.leaving
        })
    }

    /// Feed one input; returns what to do.
    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Message { conn, msg } => self.on_message(conn, msg, &mut out),
            Input::Closed { conn } => self.on_closed(conn, &mut out),
            Input::Tick { now_ms } => self.on_tick(now_ms, &mut out),
            Input::CheckpointCommitted { epoch, result } => {
                self.on_checkpoint_committed(epoch, result, &mut out)
            }
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
            Control::Barrier { seq, clock } => {
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
                if !self.nodes.get(&conn).is_some_and(|n| n.entered) && seq <= self.last_barrier {
                    return self.refuse(
                        conn,
                        &format!(
                            "barrier {seq} was released already (the job is past it): a worker joins at a later one"
                        ),
                        out,
                    );
                }
                self.barriers.entry(seq).or_default().insert(conn);
                let c = self.wk.barrier_clocks.entry(seq).or_default();
                *c = (*c).max(clock);
                self.release_barriers(out);
            }
            Control::Replace { rank, pid } => self.on_replace(conn, rank, pid, out),
            Control::WorkerEntered { rank } => self.on_worker_entered(conn, rank, out),
            Control::WorkerClockIs { rank, clock } => self.on_worker_clock(conn, rank, clock, out),
            Control::WorkerLeave { rank } => self.on_worker_leave(conn, rank, out),
            Control::Leaving { clock } => self.on_leaving(conn, clock, out),
            Control::Shard { epoch, rows, clock } => {
                if let Some(n) = self.nodes.get_mut(&conn).filter(|n| n.role == Role::Worker) {
                    let s = n.shard.get_or_insert_with(Default::default);
                    s.epoch = epoch;
                    s.rows = rows;
                    s.clock = clock;
                }
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
            Control::CheckpointRequest { dir } => self.on_checkpoint_request(conn, dir, out),
            Control::CheckpointWritten { epoch, file } => {
                self.on_checkpoint_written(conn, epoch, file, out)
            }
            Control::CheckpointFailed { epoch, reason } => {
                self.on_checkpoint_failed(conn, epoch, reason, out)
            }
            Control::JobFlags { .. } if !self.is_worker(conn) => self.refuse(
                conn,
                "job flags from a node that is not a registered worker",
                out,
            ),
            Control::JobFlags { json } => self.on_job_flags(json, out),
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
            // Only the job's workers write into its summary.
            Control::Summary { .. } if !self.is_worker(conn) => self.refuse(
                conn,
                "a summary from a node that is not a registered worker",
                out,
            ),
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

    pub(super) fn refuse(&mut self, conn: ConnKey, reason: &str, out: &mut Vec<Output>) {
        out.push(Output::Log(format!("refused connection {conn}: {reason}")));
        out.push(Output::Send {
            conn,
            msg: Control::Refused {
                reason: reason.to_string(),
            },
        });
    }

    /// Whether a join or a graceful leave is in progress (the copy phase).
    pub fn is_changing(&self) -> bool {
        self.change.is_some()
    }

    /// The routing table as it is now.
    pub fn table(&self) -> &Partition {
        &self.table
    }

    /// Send `msg` to every node still connected.
    pub(super) fn broadcast(&self, msg: &Control, out: &mut Vec<Output>) {
        let mut targets: Vec<ConnKey> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.gone)
            .map(|(c, _)| *c)
            .collect();
        targets.sort_unstable();
        Self::send_each(targets, msg, out);
    }

    /// Send `msg` to each of `conns`, in that order.
    pub(super) fn send_each(
        conns: impl IntoIterator<Item = ConnKey>,
        msg: &Control,
        out: &mut Vec<Output>,
    ) {
        for conn in conns {
            out.push(Output::Send {
                conn,
                msg: msg.clone(),
            });
        }
    }
}
