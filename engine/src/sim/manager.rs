//! The server manager (MISSION.md P11, P12): membership, heartbeats, failure detection,
//! the ring and the flips between rings, as a sans-I/O state machine that the scheduler
//! runs.
//!
//! Feed [`Manager::handle`] [`Event`]s (with the caller's `now`, in milliseconds); it
//! returns [`Cmd`]s for the caller to carry out. Decisions:
//!
//! - **Join**: a new id is queued; when no other join is in progress the manager computes
//!   the target ring (the current one plus the joiner) and asks the current head of every
//!   piece the joiner will hold to pre-copy it ([`Cmd::StartCopy`]). When every copy is
//!   done ([`Event::CopyDone`]) the epoch flips: [`Cmd::Broadcast`] of the target ring with
//!   its handover plan. A duplicate id is rejected and changes nothing.
//! - **Leave** (graceful): the ring without the server is broadcast at once; the leaver
//!   stays up until it has handed over (new heads are old chain members, so the plan is
//!   usually empty) and then goes.
//! - **Failure**: a server silent for `heartbeat_timeout_ms` is declared [`Cmd::Dead`] and
//!   the ring without it is broadcast. Its successor in each chain becomes head; the next
//!   distinct server joins each chain as a new tail and receives a full snapshot, so every
//!   range has k replicas again.
//! - **Restart**: [`Manager::recover`] starts without a ring; every node's
//!   [`Event::Report`] carries the ring it holds and its ranges. After one heartbeat timeout
//!   the manager adopts the newest reported ring (epochs keep growing), checks that every
//!   range of it has a synced holder ([`Cmd::Lost`] otherwise) and goes on; servers that
//!   did not report are then declared dead by the usual timeout.
//!
//! Bad input gets a [`Cmd::Reject`] and changes nothing. The server-side check of a data
//! message's epoch is [`Ring::route_check`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::base::keys::KeyRange;
use crate::placement::ring::{Ring, ServerId};
use crate::sim::chain::Handover;

/// Manager settings.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Replicas per range besides the head.
    pub k: usize,
    /// Virtual nodes per server.
    pub vnodes: u32,
    /// A server silent this long is dead.
    pub heartbeat_timeout_ms: u64,
}

/// Something the manager hears.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A server asks to join.
    Join {
        /// Its id.
        id: ServerId,
        /// Its data-plane address.
        addr: String,
        /// Now.
        now: u64,
    },
    /// A server is alive.
    Heartbeat {
        /// Its id.
        id: ServerId,
        /// Now.
        now: u64,
    },
    /// A server asks to leave gracefully.
    Leave {
        /// Its id.
        id: ServerId,
    },
    /// Time passed.
    Tick {
        /// Now.
        now: u64,
    },
    /// A pre-copy asked by [`Cmd::StartCopy`] is in.
    CopyDone {
        /// The joiner.
        id: ServerId,
        /// The target epoch.
        epoch: u64,
        /// The range.
        range: KeyRange,
    },
    /// A server's view, for a restarted manager.
    Report {
        /// The server.
        id: ServerId,
        /// Its address.
        addr: String,
        /// The ring it holds.
        ring: Option<Ring>,
        /// `(range, synced, last seq)` of every range it is in the chain of.
        ranges: Vec<HeldRange>,
        /// Now.
        now: u64,
    },
}

/// Why an event was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// A join with an id already in the cluster (or queued).
    DuplicateId,
    /// A heartbeat, leave or copy report from a node the manager does not know.
    UnknownNode,
    /// A leave that would leave no server.
    LastServer,
    /// A copy report for a join that is no longer in progress.
    StaleCopy,
}

/// What the manager decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Cmd {
    /// Send the new ring and its flip plan to every server (and workers, lazily).
    Broadcast {
        /// The ring.
        ring: Ring,
        /// Who hands which piece to which new head.
        plan: Vec<Handover>,
    },
    /// Ask `from` to pre-copy `range` to the joiner `to`, for the flip to `epoch`.
    StartCopy {
        /// The current holder (head).
        from: ServerId,
        /// The joiner.
        to: ServerId,
        /// The target epoch.
        epoch: u64,
        /// The range.
        range: KeyRange,
    },
    /// A server was declared dead (tell it to stop, if it is only slow).
    Dead {
        /// The server.
        id: ServerId,
    },
    /// An event was refused.
    Reject {
        /// The node.
        id: ServerId,
        /// Why.
        why: Rejection,
    },
    /// A restarted manager adopted this ring.
    Rebuilt {
        /// Its epoch.
        epoch: u64,
    },
    /// No live server reported holding this range: its data is lost.
    Lost {
        /// The range.
        range: KeyRange,
    },
}

/// `(range, synced, last seq)` as a node reports it.
pub type HeldRange = (KeyRange, bool, u64);

#[derive(Clone, Debug)]
struct Member {
    addr: String,
    last_seen: u64,
}

#[derive(Clone, Debug)]
struct PendingJoin {
    id: ServerId,
    addr: String,
    target: Ring,
    copies: BTreeSet<KeyRange>,
}

/// The server manager's state machine.
#[derive(Clone, Debug)]
pub struct Manager {
    cfg: ManagerConfig,
    ring: Option<Ring>,
    members: BTreeMap<ServerId, Member>,
    joins: VecDeque<(ServerId, String)>,
    pending: Option<PendingJoin>,
    /// While rebuilding after a restart: when it started, reports seen.
    recovering: Option<(u64, BTreeMap<ServerId, Vec<HeldRange>>)>,
    reported_ring: Option<Ring>,
}

impl Manager {
    /// A manager for a new cluster of `servers` (addresses), at `now`; returns the first
    /// broadcast too.
    pub fn new(cfg: ManagerConfig, servers: &[(ServerId, String)], now: u64) -> (Self, Cmd) {
        let ids: Vec<ServerId> = servers.iter().map(|s| s.0).collect();
        let ring = Ring::new(&ids, cfg.vnodes);
        let members = servers
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    Member {
                        addr: addr.clone(),
                        last_seen: now,
                    },
                )
            })
            .collect();
        let m = Manager {
            cfg,
            ring: Some(ring.clone()),
            members,
            joins: VecDeque::new(),
            pending: None,
            recovering: None,
            reported_ring: None,
        };
        (
            m,
            Cmd::Broadcast {
                ring,
                plan: Vec::new(),
            },
        )
    }

    /// A restarted manager: no ring until the nodes' reports are in.
    pub fn recover(cfg: ManagerConfig, now: u64) -> Self {
        Manager {
            cfg,
            ring: None,
            members: BTreeMap::new(),
            joins: VecDeque::new(),
            pending: None,
            recovering: Some((now, BTreeMap::new())),
            reported_ring: None,
        }
    }

    /// The current ring (none while rebuilding).
    pub fn ring(&self) -> Option<&Ring> {
        self.ring.as_ref()
    }

    /// Live members, sorted.
    pub fn members(&self) -> Vec<ServerId> {
        self.members.keys().copied().collect()
    }

    /// The address of a member.
    pub fn addr(&self, id: ServerId) -> Option<&str> {
        self.members.get(&id).map(|m| m.addr.as_str())
    }

    /// Whether a join is being copied or queued.
    pub fn is_changing(&self) -> bool {
        self.pending.is_some() || !self.joins.is_empty() || self.recovering.is_some()
    }

    /// The handover plan of a flip from `old` to `new`: for every piece whose new head did
    /// not hold it, the first old holder still alive hands it over.
    pub fn plan(
        old: &Ring,
        new: &Ring,
        k: usize,
        alive: &dyn Fn(ServerId) -> bool,
    ) -> Vec<Handover> {
        Ring::diff(old, new, k)
            .into_iter()
            .filter(|m| !m.old_chain.contains(&m.new_chain[0]))
            .filter_map(|m| {
                m.old_chain
                    .iter()
                    .copied()
                    .find(|&s| alive(s))
                    .map(|from| Handover {
                        range: m.range,
                        from,
                        to: m.new_chain[0],
                    })
            })
            .collect()
    }

    fn flip(&mut self, new: Ring, out: &mut Vec<Cmd>) {
        let old = self.ring.as_ref().expect("ring");
        assert!(new.epoch() > old.epoch(), "manager epoch would not grow");
        let members = &self.members;
        let plan = Self::plan(old, &new, self.cfg.k, &|s| members.contains_key(&s));
        self.ring = Some(new.clone());
        out.push(Cmd::Broadcast { ring: new, plan });
    }

    /// Start the next queued join, if none is in progress.
    fn next_join(&mut self, out: &mut Vec<Cmd>) {
        if self.pending.is_some() {
            return;
        }
        let Some((id, addr)) = self.joins.pop_front() else {
            return;
        };
        let ring = self.ring.as_ref().expect("ring");
        let target = ring.add_server(id);
        let mut copies = BTreeSet::new();
        for m in Ring::diff(ring, &target, self.cfg.k) {
            if m.new_chain.contains(&id) {
                copies.insert(m.range);
                out.push(Cmd::StartCopy {
                    from: m.old_chain[0],
                    to: id,
                    epoch: target.epoch(),
                    range: m.range,
                });
            }
        }
        let p = PendingJoin {
            id,
            addr,
            target,
            copies,
        };
        if p.copies.is_empty() {
            self.finish_join(p, out);
        } else {
            self.pending = Some(p);
        }
    }

    fn finish_join(&mut self, p: PendingJoin, out: &mut Vec<Cmd>) {
        let now = self
            .members
            .values()
            .map(|m| m.last_seen)
            .max()
            .unwrap_or(0);
        self.members.insert(
            p.id,
            Member {
                addr: p.addr,
                last_seen: now,
            },
        );
        self.flip(p.target, out);
        self.next_join(out);
    }

    /// Handle one event; the commands to carry out, in order.
    pub fn handle(&mut self, ev: Event) -> Vec<Cmd> {
        let mut out = Vec::new();
        if let Some((since, reports)) = &mut self.recovering {
            match ev {
                Event::Report {
                    id,
                    addr,
                    ring,
                    ranges,
                    now,
                } => {
                    reports.insert(id, ranges);
                    self.members.insert(
                        id,
                        Member {
                            addr,
                            last_seen: now,
                        },
                    );
                    if let Some(r) = ring {
                        if self
                            .reported_ring
                            .as_ref()
                            .is_none_or(|x| r.epoch() > x.epoch())
                        {
                            self.reported_ring = Some(r);
                        }
                    }
                }
                Event::Tick { now } if now >= *since + self.cfg.heartbeat_timeout_ms => {
                    let since = *since;
                    let reports = std::mem::take(reports);
                    self.recovering = None;
                    let ring = self.reported_ring.take().expect("no node reported a ring");
                    for (range, _) in ring.ranges(self.cfg.k) {
                        let held = reports
                            .values()
                            .flatten()
                            .any(|(r, synced, _)| *synced && r.covers(&range));
                        if !held {
                            out.push(Cmd::Lost { range });
                        }
                    }
                    out.push(Cmd::Rebuilt {
                        epoch: ring.epoch(),
                    });
                    // Ring members that did not report are timed out from `since`.
                    for &s in ring.servers() {
                        self.members.entry(s).or_insert(Member {
                            addr: String::new(),
                            last_seen: since,
                        });
                    }
                    self.ring = Some(ring);
                }
                Event::Heartbeat { id, now } => {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.last_seen = m.last_seen.max(now);
                    }
                }
                _ => {}
            }
            return out;
        }
        match ev {
            Event::Join { id, addr, now: _ } => {
                let known = self.members.contains_key(&id)
                    || self.joins.iter().any(|j| j.0 == id)
                    || self.pending.as_ref().is_some_and(|p| p.id == id);
                if known {
                    out.push(Cmd::Reject {
                        id,
                        why: Rejection::DuplicateId,
                    });
                } else {
                    self.joins.push_back((id, addr));
                    self.next_join(&mut out);
                }
            }
            Event::Heartbeat { id, now } => match self.members.get_mut(&id) {
                Some(m) => m.last_seen = m.last_seen.max(now),
                None if self.pending.as_ref().is_some_and(|p| p.id == id) => {}
                None => out.push(Cmd::Reject {
                    id,
                    why: Rejection::UnknownNode,
                }),
            },
            Event::Leave { id } => {
                if !self.members.contains_key(&id) {
                    out.push(Cmd::Reject {
                        id,
                        why: Rejection::UnknownNode,
                    });
                } else if self.members.len() == 1 {
                    out.push(Cmd::Reject {
                        id,
                        why: Rejection::LastServer,
                    });
                } else {
                    self.remove(id, &mut out);
                }
            }
            Event::Tick { now } => {
                let dead: Vec<ServerId> = self
                    .members
                    .iter()
                    .filter(|(_, m)| now > m.last_seen + self.cfg.heartbeat_timeout_ms)
                    .map(|(&id, _)| id)
                    .collect();
                for id in dead {
                    if self.members.len() > 1 {
                        out.push(Cmd::Dead { id });
                        self.remove(id, &mut out);
                    }
                }
            }
            Event::CopyDone { id, epoch, range } => {
                let ok = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.id == id && p.target.epoch() == epoch);
                if !ok {
                    out.push(Cmd::Reject {
                        id,
                        why: Rejection::StaleCopy,
                    });
                } else {
                    let p = self.pending.as_mut().expect("pending");
                    p.copies.remove(&range);
                    if p.copies.is_empty() {
                        let p = self.pending.take().expect("pending");
                        self.finish_join(p, &mut out);
                    }
                }
            }
            Event::Report { id, .. } => {
                if !self.members.contains_key(&id) {
                    out.push(Cmd::Reject {
                        id,
                        why: Rejection::UnknownNode,
                    });
                }
            }
        }
        out
    }

    /// Take `id` out of the ring (leave or death); a join in progress starts over against
    /// the new ring.
    fn remove(&mut self, id: ServerId, out: &mut Vec<Cmd>) {
        self.members.remove(&id);
        let new = self.ring.as_ref().expect("ring").remove_server(id);
        // The removal flip must keep `id` a possible handover source while it is leaving;
        // for a death it is gone already (members no longer holds it).
        self.flip(new, out);
        if let Some(p) = self.pending.take() {
            self.joins.push_front((p.id, p.addr));
            self.next_join(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ManagerConfig {
        ManagerConfig {
            k: 1,
            vnodes: 16,
            heartbeat_timeout_ms: 100,
        }
    }

    fn servers(n: u32) -> Vec<(ServerId, String)> {
        (0..n).map(|i| (i, format!("s{i}"))).collect()
    }

    #[test]
    fn bad_input_is_rejected_and_changes_nothing() {
        let (mut m, _) = Manager::new(cfg(), &servers(3), 0);
        let before = m.ring().cloned();
        assert_eq!(
            m.handle(Event::Heartbeat { id: 9, now: 1 }),
            vec![Cmd::Reject {
                id: 9,
                why: Rejection::UnknownNode
            }]
        );
        assert_eq!(
            m.handle(Event::Join {
                id: 1,
                addr: "x".into(),
                now: 1
            }),
            vec![Cmd::Reject {
                id: 1,
                why: Rejection::DuplicateId
            }]
        );
        assert_eq!(
            m.handle(Event::CopyDone {
                id: 1,
                epoch: 5,
                range: KeyRange::FULL
            }),
            vec![Cmd::Reject {
                id: 1,
                why: Rejection::StaleCopy
            }]
        );
        assert_eq!(m.ring().cloned(), before);
        assert_eq!(m.members(), vec![0, 1, 2]);
    }

    #[test]
    fn silence_is_death_and_the_ring_flips() {
        let (mut m, _) = Manager::new(cfg(), &servers(3), 0);
        for t in (0..300).step_by(50) {
            m.handle(Event::Heartbeat { id: 0, now: t });
            m.handle(Event::Heartbeat { id: 1, now: t });
            let out = m.handle(Event::Tick { now: t });
            if t <= 100 {
                assert!(out.is_empty(), "{t}: {out:?}");
            }
        }
        assert_eq!(m.members(), vec![0, 1]);
        assert_eq!(m.ring().unwrap().epoch(), 2);
        assert!(!m.ring().unwrap().has_server(2));
    }

    #[test]
    fn join_copies_then_flips() {
        let (mut m, _) = Manager::new(cfg(), &servers(3), 0);
        let out = m.handle(Event::Join {
            id: 7,
            addr: "s7".into(),
            now: 1,
        });
        let copies: Vec<(KeyRange, u64)> = out
            .iter()
            .map(|c| match c {
                Cmd::StartCopy {
                    to: 7,
                    epoch,
                    range,
                    ..
                } => (*range, *epoch),
                c => panic!("{c:?}"),
            })
            .collect();
        assert!(!copies.is_empty());
        assert_eq!(
            m.ring().unwrap().epoch(),
            1,
            "no flip before the copies are in"
        );
        let mut last = Vec::new();
        for (range, epoch) in copies {
            last = m.handle(Event::CopyDone {
                id: 7,
                epoch,
                range,
            });
        }
        match &last[..] {
            [Cmd::Broadcast { ring, plan }] => {
                assert_eq!(ring.epoch(), 2);
                assert!(ring.has_server(7));
                assert!(plan.iter().all(|h| h.to == 7));
                assert!(!plan.is_empty());
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn restart_rebuilds_from_reports() {
        let (m0, _) = Manager::new(cfg(), &servers(3), 0);
        let ring = m0.ring().unwrap().remove_server(2);
        let mut m = Manager::recover(cfg(), 1000);
        for id in [0, 1] {
            let ranges = ring
                .ranges_of(id, 1)
                .into_iter()
                .map(|(r, _, _)| (r, true, 3))
                .collect();
            m.handle(Event::Report {
                id,
                addr: format!("s{id}"),
                ring: Some(ring.clone()),
                ranges,
                now: 1000,
            });
        }
        let out = m.handle(Event::Tick { now: 1100 });
        assert_eq!(out, vec![Cmd::Rebuilt { epoch: 2 }]);
        assert_eq!(m.ring(), Some(&ring));
        assert_eq!(m.members(), vec![0, 1]);
    }
}
