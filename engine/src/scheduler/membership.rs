//! Membership: registration, the welcome in two phases, barriers, heartbeats and
//! failure detection, failover decisions, late workers, joins and graceful leaves (the
//! copy phase under a middle table, then the flip), and the job's end.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::core::{ConnKey, Node, Output, SchedulerCore};
use crate::placement::Partition;
use crate::proto::{ClusterInfo, Control, Role, ServerInfo};

/// A join or a graceful leave in progress: the copy phase runs under the middle table
/// (chains extended by the servers that will hold each range), and the final table is
/// sent once every head reported its copies acknowledged.
#[derive(Debug)]
pub(super) struct Change {
    /// The ring after the change.
    pub(super) target: crate::placement::ring::Ring,
    /// The middle table's epoch.
    pub(super) epoch: u64,
    /// Heads of the middle table that have not reported `Synced` yet.
    pub(super) waiting: BTreeSet<u32>,
    /// The server that leaves, told to shut down after the flip.
    pub(super) leaving: Option<u32>,
}

/// The refusal of a membership change asked for while the view is rebuilt: the nodes
/// that have not rejoined yet are unknown, so no rank, range or table can be decided.
const RECOVERING: &str =
    "the scheduler is rebuilding its view after a restart; try again in a few seconds";

impl SchedulerCore {
    pub(super) fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
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
        self.checkpoint_tick(out);
        self.worker_changes_tick(out);
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

    pub(super) fn on_register(
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
        if self.servers_welcomed
            && role == Role::Worker
            && !self.welcomed
            && !self.finished
            && !self.early_workers.iter().any(|e| e.0 == conn)
            && !self.nodes.contains_key(&conn)
        {
            // The servers are setting up: the job is about to run. The worker joins it
            // then, like any worker that comes late.
            out.push(Output::Log(format!(
                "a worker registered before the job started (pid {pid}); it joins once the job runs"
            )));
            self.early_workers.push((conn, rank, pid));
            return;
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
    pub(super) fn cluster(&self) -> ClusterInfo {
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
        let mut gone_workers: Vec<u32> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Worker && (n.gone || n.done))
            .map(|n| n.rank)
            .collect();
        gone_workers.sort_unstable();
        gone_workers.dedup();
        ClusterInfo {
            gone_workers,
            servers,
            workers: self.spec.workers,
            partition: self.table.clone(),
            value_type: self.spec.value_type,
            value_len: self.spec.value_len,
            update: self.spec.update,
            replace_workers: self.replaces_workers(),
        }
    }

    /// Send the cluster table to every node of `role`: servers first (phase 1); workers
    /// once every server is ready (phase 2), so no request reaches a server without a store.
    pub(super) fn welcome(&mut self, role: Role, out: &mut Vec<Output>) {
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
                    cluster: Box::new(cluster.clone()),
                    resume: None,
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
                for (conn, rank, pid) in std::mem::take(&mut self.early_workers) {
                    self.late_worker(conn, rank, pid, out);
                }
            }
        }
    }

    /// Release every barrier that all live workers have reached.
    pub(super) fn release_barriers(&mut self, out: &mut Vec<Output>) {
        if self.recovering_until.is_some() {
            return;
        }
        let live: BTreeSet<ConnKey> = self.live_workers().map(|(c, _)| *c).collect();
        let ready: Vec<u64> = self
            .barriers
            .iter()
            // A barrier some worker passed already (one asking again after a scheduler
            // restart lost its answer) is released at once.
            .filter(|(seq, arrived)| **seq <= self.last_barrier || live.is_subset(arrived))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in ready {
            // A vacancy, a replacement being set up, or workers entering hold it.
            if seq > self.last_barrier && self.worker_changes_hold(seq, out) {
                break;
            }
            // A checkpoint due at this barrier (or being taken) holds it and the later ones.
            if self.checkpoint_holds(seq, out) {
                break;
            }
            // The workers that count (a failed one whose place is kept among them), and
            // not one that is leaving or has not entered.
            let mut ranks: Vec<u32> = self
                .nodes
                .values()
                .filter(|n| n.role == Role::Worker && !n.gone && n.entered && !n.leaving)
                .map(|n| n.rank)
                .chain(self.wk.vacant.keys().copied())
                .collect();
            ranks.sort_unstable();
            ranks.dedup();
            let clock = self.wk.barrier_clocks.get(&seq).copied().unwrap_or(0);
            if seq > self.last_barrier {
                self.wk.released = (ranks.clone(), clock);
            }
            self.wk.barrier_clocks.retain(|&s, _| s > seq);
            self.last_barrier = self.last_barrier.max(seq);
            let arrived = self.barriers.remove(&seq).unwrap_or_default();
            for conn in arrived {
                if self.nodes.get(&conn).is_some_and(|n| !n.gone) {
                    out.push(Output::Send {
                        conn,
                        msg: Control::BarrierDone {
                            seq,
                            live: ranks.clone(),
                            clock,
                        },
                    });
                }
            }
        }
    }

    pub(super) fn on_closed(&mut self, conn: ConnKey, out: &mut Vec<Output>) {
        self.checkpoint_conn_closed(conn);
        if self.wk.replacing.as_ref().is_some_and(|r| r.conn == conn) {
            // A replacement that vanished before it was welcomed: the place stays kept.
            self.wk.replacing = None;
            out.push(Output::Log(
                "a replacement closed its connection before it was welcomed; the place stays kept"
                    .into(),
            ));
        }
        self.early_workers.retain(|e| e.0 != conn);
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
        let (role, rank, done, leaving) = (n.role, n.rank, n.done, n.leaving);
        if self.finished {
            return;
        }
        if role == Role::Server {
            self.worker_changes_server_gone(conn, out);
        }
        if role == Role::Worker && !done && self.worker_failed(rank, leaving, out) {
            // Its place is kept: the servers keep its slot, barriers wait.
            return;
        }
        if role == Role::Worker {
            // Servers it never connected to would wait for its clock forever.
            self.tell_servers(&Control::WorkerGone { rank }, out);
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

    /// Send `msg` to every server still connected.
    fn tell_servers(&self, msg: &Control, out: &mut Vec<Output>) {
        let mut targets: Vec<(u32, ConnKey)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.role == Role::Server && !n.gone)
            .map(|(c, n)| (n.rank, *c))
            .collect();
        targets.sort_unstable();
        Self::send_each(targets.into_iter().map(|(_, c)| c), msg, out);
    }

    /// Server `rank` failed (its connection closed, or it missed heartbeats). With
    /// replicas, take it off the ring: its ranges pass to the next servers of their chains
    /// (which hold every acknowledged push), a new epoch of the routing table goes to every
    /// node, and the heads copy ranges to the replicas new in their chains. Without
    /// replicas its ranges are lost: said so.
    pub(super) fn fail_server(&mut self, rank: u32, out: &mut Vec<Output>) {
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

    /// A worker registers while the job runs (elastic workers): it gets the next rank
    /// and the current table, and takes part in barriers from the next one it joins.
    fn late_worker(&mut self, conn: ConnKey, rank: Option<u32>, pid: u32, out: &mut Vec<Output>) {
        if self.recovering_until.is_some() {
            return self.refuse(conn, RECOVERING, out);
        }
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
        if let Some(n) = self.nodes.get_mut(&conn) {
            // It counts from the barrier it enters at (scheduler/workers.rs).
            n.entered = false;
        }
        out.push(Output::Send {
            conn,
            msg: Control::Welcome {
                node_id: self.node_id(Role::Worker, rank),
                rank,
                cluster: Box::new(self.cluster()),
                resume: None,
            },
        });
    }

    /// A server asks to join the running job.
    pub(super) fn on_join(
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
        if self.recovering_until.is_some() {
            return refuse(self, RECOVERING.into(), out);
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
                cluster: Box::new(self.cluster()),
                resume: None,
            },
        });
    }

    /// A joining server has its store: everyone learns its address, and the copy phase
    /// of the ring with it begins.
    pub(super) fn joined(&mut self, conn: ConnKey, out: &mut Vec<Output>) {
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
    pub(super) fn on_leave(&mut self, conn: ConnKey, rank: u32, out: &mut Vec<Output>) {
        if self.recovering_until.is_some() {
            return self.refuse(conn, RECOVERING, out);
        }
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
    pub(super) fn maybe_flip(&mut self, out: &mut Vec<Output>) {
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

    pub(super) fn maybe_finish(&mut self, out: &mut Vec<Output>) {
        // While recovering, the workers that have not rejoined yet are unknown: the job
        // ends only once the view is rebuilt.
        if self.finished
            || self.recovering_until.is_some()
            || self
                .nodes
                .values()
                .any(|n| n.role == Role::Worker && !n.gone && !n.done)
            || !self.wk.vacant.is_empty()
            || self.wk.replacing.is_some()
        {
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
        self.checkpoint_requests_end(out);
        out.push(Output::JobDone);
    }
}
