//! Workers that join, leave and are replaced while the job runs, under every consistency
//! model.
//!
//! - **Entry at a barrier.** A worker that joins (rank beyond the spec's) counts in
//!   nothing until it *enters*: at the first barrier it arrives at, once every worker
//!   that counts arrived too. Before that barrier is released the scheduler tells every
//!   server `WorkerEnters { rank, clock }` (the clock the workers arrived with: every
//!   worker of a clocked job has the same clock at a barrier) and holds the barrier
//!   until each answered `WorkerEntered`: so no request of clock `clock + 1` of anybody
//!   reaches a server whose clock gate does not count the joiner yet, bounded delay
//!   keeps its bound for everyone and a sequential run with a worker entering at a given
//!   barrier is the same in every run.
//! - **Replacement in place** (`with_replacement`): a worker whose connection closes
//!   before it finished leaves a *vacancy*: its rank stays in the live list, the servers
//!   keep its slot in their clock gates (the others wait for it there, not on a
//!   timeout) and barriers are held. A process that sends `Replace { rank }` takes the
//!   vacancy: the scheduler asks every server which clock the failed worker reached
//!   there (`WorkerClock`), and welcomes the replacement with the rank, the node id and
//!   a [`Resume`]: the newest barrier released, its live workers and clock, and the
//!   smallest of the servers' clocks. The replacement redoes every clock after that one;
//!   the servers' exactly-once memory drops what of it they hold already. A vacancy
//!   nobody takes within the wait is given up: the servers retire the worker and its
//!   shard passes to the others from the next epoch, as without replacements.
//! - **Graceful leave** (`WorkerLeave`, from `pserv leave --worker`, or a worker's
//!   SIGTERM): the worker finishes its clock, says `Leaving`, and the servers retire it
//!   at once: nobody waits for it; its shard passes to the others from the next epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::core::{ConnKey, Output, SchedulerCore};
use crate::proto::{Control, Resume, Role};

/// How long the servers get to say which clock a failed worker reached.
const CLOCK_QUESTION_MS: u64 = 5_000;

/// The scheduler's state of worker changes.
#[derive(Debug, Default)]
pub(crate) struct WorkerChanges {
    /// Keep a failed worker's place this long for a replacement (`None`: no
    /// replacements; a failed worker's shard passes to the others).
    pub(super) replace_wait_ms: Option<u64>,
    /// Failed workers whose places are kept: rank -> since when (`now_ms`).
    pub(super) vacant: BTreeMap<u32, u64>,
    /// A replacement being set up (the servers are asked for the clock).
    pub(super) replacing: Option<Replacing>,
    /// Workers entering at a barrier (the servers are told).
    pub(super) entering: Option<Entering>,
    /// Per barrier, the largest clock a worker arrived with.
    pub(super) barrier_clocks: BTreeMap<u64, u64>,
    /// The newest barrier released: its live workers and its clock.
    pub(super) released: (Vec<u32>, u64),
    /// How often each rank was replaced.
    pub(super) replaced: BTreeMap<u32, u32>,
}

/// A replacement waiting for the servers' clocks of the worker it replaces.
#[derive(Debug)]
pub(crate) struct Replacing {
    pub(super) conn: ConnKey,
    rank: u32,
    pid: u32,
    /// Servers that have not answered.
    waiting: BTreeSet<ConnKey>,
    /// The smallest clock answered so far.
    clock: u64,
    since_ms: u64,
}

/// Workers entering at barrier `seq`.
#[derive(Debug)]
pub(crate) struct Entering {
    seq: u64,
    /// Their connections.
    conns: Vec<ConnKey>,
    /// Servers that have not answered.
    waiting: BTreeSet<ConnKey>,
}

impl SchedulerCore {
    /// Keep the place of a worker that fails for up to `wait`, for a replacement
    /// (`pserv worker --replace RANK`) to take over its rank, shard and position.
    pub fn with_replacement(mut self, wait: Duration) -> Self {
        self.wk.replace_wait_ms = Some((wait.as_millis() as u64).max(1));
        self
    }

    /// Whether failed workers' places are kept for replacements.
    pub fn replaces_workers(&self) -> bool {
        self.wk.replace_wait_ms.is_some()
    }

    /// Ranks of failed workers whose places wait for a replacement.
    pub fn vacancies(&self) -> Vec<u32> {
        self.wk.vacant.keys().copied().collect()
    }

    /// Server connections still open, by rank.
    fn server_conns(&self) -> BTreeSet<ConnKey> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.role == Role::Server && !n.gone)
            .map(|(c, _)| *c)
            .collect()
    }

    /// Worker `rank` (its connection closed before it finished): keep its place when
    /// replacements are on. Returns whether it was kept (then the servers keep its slot
    /// and nobody is told it is gone).
    pub(super) fn worker_failed(
        &mut self,
        rank: u32,
        leaving: bool,
        out: &mut Vec<Output>,
    ) -> bool {
        let Some(wait) = self.wk.replace_wait_ms else {
            return false;
        };
        if leaving || self.finished {
            return false;
        }
        self.wk.vacant.insert(rank, self.now_ms);
        out.push(Output::Log(format!(
            "worker {rank} failed; its place is kept for a replacement for {:.0} s \
             (pserv worker --replace {rank}); the others wait for it at the clock gates",
            wait as f64 / 1000.0
        )));
        true
    }

    /// Give up vacancies nobody took in time, and replacements the servers did not
    /// answer for.
    pub(super) fn worker_changes_tick(&mut self, out: &mut Vec<Output>) {
        let now = self.now_ms;
        if let Some(r) = &self.wk.replacing {
            if now.saturating_sub(r.since_ms) > CLOCK_QUESTION_MS {
                let r = self.wk.replacing.take().expect("checked");
                self.refuse(
                    r.conn,
                    &format!(
                        "servers did not say within {} s which clock worker {} reached; try again",
                        CLOCK_QUESTION_MS / 1000,
                        r.rank
                    ),
                    out,
                );
            }
        }
        let Some(wait) = self.wk.replace_wait_ms else {
            return;
        };
        let expired: Vec<u32> = self
            .wk
            .vacant
            .iter()
            .filter(|(&rank, &since)| {
                now.saturating_sub(since) > wait
                    && self.wk.replacing.as_ref().is_none_or(|r| r.rank != rank)
            })
            .map(|(&r, _)| r)
            .collect();
        for rank in expired {
            self.wk.vacant.remove(&rank);
            out.push(Output::Log(format!(
                "no replacement took worker {rank}'s place within {:.0} s: it is retired, \
                 and its shard passes to the others from the next epoch",
                wait as f64 / 1000.0
            )));
            self.send_servers(&Control::WorkerGone { rank }, out);
            self.release_barriers(out);
            self.maybe_finish(out);
        }
    }

    fn send_servers(&self, msg: &Control, out: &mut Vec<Output>) {
        Self::send_each(self.server_conns(), msg, out);
    }

    /// A process asks to take over failed worker `rank`'s place.
    pub(super) fn on_replace(&mut self, conn: ConnKey, rank: u32, pid: u32, out: &mut Vec<Output>) {
        if self.recovering_until.is_some() {
            return self.refuse(conn, "the scheduler is rebuilding its view; try again", out);
        }
        if !self.welcomed || self.finished {
            return self.refuse(conn, "no job is running: nothing to replace", out);
        }
        if self.nodes.contains_key(&conn) {
            return self.refuse(conn, "this connection already registered", out);
        }
        if self.wk.replace_wait_ms.is_none() {
            return self.refuse(
                conn,
                &format!(
                    "this job keeps no places for replacements (start its scheduler with \
                     --replace-failed-workers): worker {rank} cannot be replaced"
                ),
                out,
            );
        }
        let alive = self
            .nodes
            .values()
            .any(|n| n.role == Role::Worker && n.rank == rank && !n.gone);
        if alive {
            return self.refuse(
                conn,
                &format!("worker {rank} is alive: only a failed worker's place can be taken"),
                out,
            );
        }
        if !self.wk.vacant.contains_key(&rank) {
            return self.refuse(
                conn,
                &format!(
                    "worker {rank} has no place to take (no such worker, it finished, left, \
                     or its place was given up)"
                ),
                out,
            );
        }
        if self.wk.replacing.is_some() {
            return self.refuse(
                conn,
                "another replacement is being set up; try again in a second",
                out,
            );
        }
        let waiting = self.server_conns();
        out.push(Output::Log(format!(
            "worker {rank}'s place is being taken over (pid {pid}); asking {} servers for its clock",
            waiting.len()
        )));
        self.send_servers(&Control::WorkerClock { rank }, out);
        self.wk.replacing = Some(Replacing {
            conn,
            rank,
            pid,
            waiting,
            clock: u64::MAX,
            since_ms: self.now_ms,
        });
        self.maybe_welcome_replacement(out);
    }

    /// A server says which clock failed worker `rank` reached there.
    pub(super) fn on_worker_clock(
        &mut self,
        conn: ConnKey,
        rank: u32,
        clock: u64,
        out: &mut Vec<Output>,
    ) {
        if let Some(r) = self.wk.replacing.as_mut().filter(|r| r.rank == rank) {
            if r.waiting.remove(&conn) {
                r.clock = r.clock.min(clock);
            }
        }
        self.maybe_welcome_replacement(out);
    }

    /// Every server answered: welcome the replacement.
    fn maybe_welcome_replacement(&mut self, out: &mut Vec<Output>) {
        if !self
            .wk
            .replacing
            .as_ref()
            .is_some_and(|r| r.waiting.is_empty())
        {
            return;
        }
        let r = self.wk.replacing.take().expect("checked");
        let clock = if r.clock == u64::MAX { 0 } else { r.clock };
        self.wk.vacant.remove(&r.rank);
        for n in self
            .nodes
            .values_mut()
            .filter(|n| n.role == Role::Worker && n.rank == r.rank && n.gone)
        {
            n.replaced = true;
        }
        let times = {
            let t = self.wk.replaced.entry(r.rank).or_default();
            *t += 1;
            *t
        };
        self.add_node(r.conn, Role::Worker, r.rank, None);
        if let Some(n) = self.nodes.get_mut(&r.conn) {
            n.shard = Some(crate::proto::WorkerShard {
                replaced: times,
                ..Default::default()
            });
        }
        let (live, barrier_clock) = self.wk.released.clone();
        let resume = Resume {
            barrier: self.last_barrier,
            live: if live.is_empty() {
                (0..self.spec.workers).collect()
            } else {
                live
            },
            barrier_clock,
            clock,
        };
        out.push(Output::Log(format!(
            "worker {} replaced (pid {}, replacement {times}): it resumes after clock {clock} \
             (barrier {}, clock {barrier_clock} there)",
            r.rank, r.pid, resume.barrier
        )));
        out.push(Output::Send {
            conn: r.conn,
            msg: Control::Welcome {
                node_id: self.node_id(Role::Worker, r.rank),
                rank: r.rank,
                cluster: Box::new(self.cluster()),
                resume: Some(Box::new(resume)),
            },
        });
        self.release_barriers(out);
    }

    /// Whether barrier `seq`, which every counting worker reached, must wait: a vacancy
    /// or a replacement being set up holds every barrier; workers that join and arrived
    /// at it enter first (the servers are told and must answer).
    pub(super) fn worker_changes_hold(&mut self, seq: u64, out: &mut Vec<Output>) -> bool {
        if !self.wk.vacant.is_empty() || self.wk.replacing.is_some() {
            return true;
        }
        if let Some(e) = &self.wk.entering {
            return e.seq <= seq;
        }
        let arrived = self.barriers.get(&seq).cloned().unwrap_or_default();
        let mut conns: Vec<(u32, ConnKey)> = arrived
            .iter()
            .filter_map(|c| {
                self.nodes
                    .get(c)
                    .filter(|n| n.role == Role::Worker && !n.gone && !n.entered)
                    .map(|n| (n.rank, *c))
            })
            .collect();
        if conns.is_empty() {
            return false;
        }
        conns.sort_unstable();
        let clock = self.wk.barrier_clocks.get(&seq).copied().unwrap_or(0);
        for &(rank, _) in &conns {
            out.push(Output::Log(format!(
                "worker {rank} enters the job at barrier {seq} (clock {clock}): the servers' \
                 clock gates count it from clock {}",
                clock + 1
            )));
            self.send_servers(&Control::WorkerEnters { rank, clock }, out);
        }
        self.wk.entering = Some(Entering {
            seq,
            conns: conns.into_iter().map(|(_, c)| c).collect(),
            waiting: self.server_conns(),
        });
        self.maybe_entered(out)
    }

    /// A server's clock gate counts worker `rank` now.
    pub(super) fn on_worker_entered(&mut self, conn: ConnKey, _rank: u32, out: &mut Vec<Output>) {
        if let Some(e) = self.wk.entering.as_mut() {
            e.waiting.remove(&conn);
        }
        if !self.maybe_entered(out) {
            self.release_barriers(out);
        }
    }

    /// Mark the entering workers entered once every server answered; returns whether
    /// the barrier still waits.
    fn maybe_entered(&mut self, _out: &mut Vec<Output>) -> bool {
        let Some(e) = &self.wk.entering else {
            return false;
        };
        if !e.waiting.is_empty() {
            return true;
        }
        let e = self.wk.entering.take().expect("checked");
        for c in e.conns {
            if let Some(n) = self.nodes.get_mut(&c) {
                n.entered = true;
            }
        }
        false
    }

    /// A server connection closed: it answers nothing more.
    pub(super) fn worker_changes_server_gone(&mut self, conn: ConnKey, out: &mut Vec<Output>) {
        if let Some(r) = self.wk.replacing.as_mut() {
            r.waiting.remove(&conn);
        }
        self.maybe_welcome_replacement(out);
        if let Some(e) = self.wk.entering.as_mut() {
            e.waiting.remove(&conn);
            if e.waiting.is_empty() && !self.maybe_entered(out) {
                self.release_barriers(out);
            }
        }
    }

    /// The operator asks worker `rank` to leave gracefully.
    pub(super) fn on_worker_leave(&mut self, conn: ConnKey, rank: u32, out: &mut Vec<Output>) {
        if !self.welcomed || self.finished {
            return self.refuse(conn, "leaves are taken while a job runs", out);
        }
        if rank == 0 {
            return self.refuse(
                conn,
                "worker 0 evaluates the model and reports the job's result: it cannot leave",
                out,
            );
        }
        let target = self
            .nodes
            .iter()
            .find(|(_, n)| n.role == Role::Worker && n.rank == rank && !n.gone && !n.done)
            .map(|(c, n)| (*c, n.leaving));
        let Some((wconn, leaving)) = target else {
            return self.refuse(
                conn,
                &format!("worker {rank} is not running (no such worker, or it finished or left)"),
                out,
            );
        };
        if leaving {
            return self.refuse(conn, &format!("worker {rank} is leaving already"), out);
        }
        out.push(Output::Log(format!(
            "worker {rank} was asked to leave: it finishes its clock, then the others take its shard"
        )));
        out.push(Output::Send {
            conn: wconn,
            msg: Control::PleaseLeave,
        });
        out.push(Output::Send {
            conn,
            msg: Control::Log {
                line: format!(
                    "worker {rank} leaves after its current clock; its shard passes to the \
                     others from the next epoch"
                ),
            },
        });
    }

    /// A worker leaves after clock `clock`: every push of it is acknowledged.
    pub(super) fn on_leaving(&mut self, conn: ConnKey, clock: u64, out: &mut Vec<Output>) {
        let Some(n) = self.nodes.get_mut(&conn).filter(|n| n.role == Role::Worker) else {
            return self.refuse(conn, "leaving from a node that is not a worker", out);
        };
        if n.leaving {
            return;
        }
        n.leaving = true;
        n.shard.get_or_insert_with(Default::default).left = true;
        let rank = n.rank;
        out.push(Output::Log(format!(
            "worker {rank} leaves after clock {clock}: retired from the clock gates; its \
             shard passes to the others from the next epoch"
        )));
        self.send_servers(&Control::WorkerGone { rank }, out);
        self.release_barriers(out);
    }
}
