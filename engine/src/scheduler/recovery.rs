//! Recovery: a scheduler restarted with `--recover` rebuilds its view (nodes, routing
//! table, ring, barriers) from the nodes' `Rejoin` reports before it decides anything.

use std::time::Duration;

use super::core::{ConnKey, Output, SchedulerCore};
use crate::proto::{Control, Role};

impl SchedulerCore {
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

    pub(super) fn on_rejoin(&mut self, conn: ConnKey, msg: Control, out: &mut Vec<Output>) {
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
            // A worker whose rejoin came after the wait (a slow link) takes its place
            // back if nobody holds its rank: it gets the current table. A server's
            // ranges were failed over by then; it must not serve them.
            let free = role == Role::Worker
                && self.welcomed
                && !self.finished
                && !self
                    .nodes
                    .values()
                    .any(|n| n.role == Role::Worker && n.rank == rank && !n.gone);
            if !free {
                return self.refuse(
                    conn,
                    "this scheduler is not recovering; register instead",
                    out,
                );
            }
            out.push(Output::Log(format!(
                "worker {rank} rejoined after the view was rebuilt (pid {pid})"
            )));
            self.worker_ranks = self.worker_ranks.max(rank + 1);
            self.last_barrier = self.last_barrier.max(barriers);
            self.add_node(conn, role, rank, addr);
            out.push(Output::Send {
                conn,
                msg: Control::Table {
                    partition: self.table.clone(),
                },
            });
            return;
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
        // Every rank known to exist (those of the spec, and below the highest that
        // rejoined: joined servers and late workers) is back: no need to wait longer. A
        // count is not enough: a joined server or late worker would stand in for one
        // that has not rejoined yet.
        let all_back = |r: Role, n: u32| {
            (0..n).all(|k| self.nodes.values().any(|x| x.role == r && x.rank == k))
        };
        // The newest table names servers too (joined ones may not have rejoined yet).
        let in_table = self.table.owners().iter().max().map_or(0, |&r| r + 1);
        if all_back(
            Role::Server,
            self.spec.servers.max(self.server_ranks).max(in_table),
        ) && all_back(Role::Worker, self.spec.workers.max(self.worker_ranks))
        {
            self.finish_recovery(out);
        }
    }

    /// The view is rebuilt: the ring from the newest table the servers had, every node
    /// gets that table, and decisions resume.
    pub(super) fn finish_recovery(&mut self, out: &mut Vec<Output>) {
        if self.recovering_until.take().is_none() {
            return;
        }
        if self.ring.is_some() {
            let mut ids: Vec<u32> = self.table.owners().to_vec();
            ids.sort_unstable();
            ids.dedup();
            // Servers of the table that have not rejoined still count in the ranks.
            if let Some(&top) = ids.last() {
                self.server_ranks = self.server_ranks.max(top + 1);
            }
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
        // Servers of the table that never rejoined failed while no scheduler ran (or
        // since): their ranges move to their replicas now, as for any failure.
        let mut missing: Vec<u32> = self.table.owners().to_vec();
        missing.sort_unstable();
        missing.dedup();
        missing.retain(|&r| {
            !self
                .nodes
                .values()
                .any(|n| n.role == Role::Server && n.rank == r && !n.gone)
        });
        for rank in missing {
            out.push(Output::Log(format!(
                "server {rank} did not rejoin after the restart: presumed failed"
            )));
            self.fail_server(rank, out);
        }
        self.release_barriers(out);
        // Workers that finished while the view was rebuilt.
        self.maybe_finish(out);
    }
}
