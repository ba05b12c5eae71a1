//! The simulation's checkers. Processes report what they do (tables installed, pushes
//! applied, batches sent and acknowledged, answers released, pulls answered); the world
//! calls [`Checker::after_step`] after every event with every server's store, and
//! [`Checker::at_end`] once the run is quiet.
//!
//! Invariants:
//! - **acknowledged means replicated**: when a head releases a push's answer, it holds
//!   the push on every key of it, and so does every live server on every chain whose
//!   tail acknowledged a batch listing the push;
//! - **never lost**: from then on, each live server that held it keeps it, and some live
//!   server always holds it;
//! - **exactly once**: no server applies a push to a key that holds it already;
//! - **one table per epoch**, and every process's epochs only grow (so one head per key
//!   range per epoch);
//! - **bounded delay**: a clocked pull is answered only with every push of clock up to
//!   its clock from every live worker, on every key it reads;
//! - at the end: the job finished; on every key, the live servers of its chain hold the
//!   same history, which holds every acknowledged push, and only pushes that were made.

use std::collections::{BTreeMap, BTreeSet};

use crate::base::keys::Key;
use crate::placement::Partition;
use crate::proto::{Control, ReplicaPart};
use crate::replication::entries::pod_vec;

use super::net::Addr;
use super::store::{clock_of, PushId, SimStore};

/// A batch a head sent: its chain, the pushes it lists, its keys.
struct Batch {
    path: Vec<u32>,
    pushes: Vec<(u32, u64)>,
    keys: BTreeSet<Key>,
    acked: bool,
}

/// What the checkers know.
#[derive(Default)]
pub(crate) struct Checker {
    /// The first violation, and any after it.
    pub(crate) violations: Vec<String>,
    tables: BTreeMap<u64, Partition>,
    epochs: BTreeMap<Addr, u64>,
    /// Pushes made: id -> (worker, keys).
    pushes: BTreeMap<PushId, (u32, Vec<Key>)>,
    /// Per (worker, key): the clocked pushes (clock, id).
    by_worker_key: BTreeMap<(u32, Key), Vec<(u64, PushId)>>,
    /// Batches by (origin, seq).
    batches: BTreeMap<(u32, u64), Batch>,
    /// Answers released and not yet checked: (head, sender node, push, id, keys).
    released: Vec<(u32, u32, u64, PushId, Vec<Key>)>,
    /// Per key, the acknowledged pushes and the servers that held each then.
    acked: BTreeMap<Key, BTreeMap<PushId, BTreeSet<u32>>>,
    /// Pushes acknowledged to workers (answers received).
    pub(crate) acks_received: u64,
    /// Pulls checked against the clocks.
    pub(crate) pulls_checked: u64,
    /// A crash happened in this step: every key is checked.
    crashed: bool,
}

impl Checker {
    /// Record a violation.
    pub(crate) fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Process `at` installed `table`.
    pub(crate) fn table_seen(&mut self, at: Addr, table: &Partition) {
        let e = table.epoch();
        match self.tables.get(&e) {
            Some(t) if t != table => self.violation(format!(
                "two different routing tables with epoch {e} (seen at {at:?})"
            )),
            Some(_) => {}
            None => {
                self.tables.insert(e, table.clone());
            }
        }
        let last = self.epochs.insert(at, e).unwrap_or(0);
        if e < last {
            self.violation(format!("{at:?} went back from epoch {last} to {e}"));
        }
    }

    /// Process `at` restarted (a new process: its epochs start again).
    pub(crate) fn forget(&mut self, at: Addr) {
        self.epochs.remove(&at);
    }

    /// Worker `worker` made push `id` (task `ts`) on `keys`.
    pub(crate) fn pushed(&mut self, worker: u32, _ts: u64, id: PushId, keys: &[Key]) {
        self.pushes.insert(id, (worker, keys.to_vec()));
        let c = clock_of(id);
        if c > 0 {
            for &k in keys {
                self.by_worker_key
                    .entry((worker, k))
                    .or_default()
                    .push((c, id));
            }
        }
    }

    /// Server `rank` applied push `id` to `key` (`fresh`: the key did not hold it).
    pub(crate) fn applied(&mut self, rank: u32, key: Key, id: PushId, fresh: bool) {
        if !fresh {
            self.violation(format!(
                "server {rank} applied push {id:#x} to key {key:#x} a second time"
            ));
        }
    }

    /// Server `rank` answers a pull of clock `clock` on `keys` from `store`: every push of
    /// a clock up to it, from every worker the gate does not count as retired, is there.
    pub(crate) fn pulled(
        &mut self,
        rank: u32,
        clock: u64,
        keys: &[Key],
        store: &SimStore,
        retired: &dyn Fn(usize) -> bool,
        workers: u32,
    ) {
        self.pulls_checked += 1;
        for &k in keys {
            for w in 0..workers {
                if retired(w as usize) {
                    continue;
                }
                let Some(list) = self.by_worker_key.get(&(w, k)) else {
                    continue;
                };
                for &(c, id) in list {
                    if c <= clock && !store.holds(k, id) {
                        self.violations.push(format!(
                            "server {rank} answered a pull of clock {clock} on key {k:#x} without worker {w}'s push of clock {c} ({id:#x})"
                        ));
                        return;
                    }
                }
            }
        }
    }

    /// Server `from` sends `msg` to server `to` (replication).
    pub(crate) fn replication_sent(&mut self, from: u32, _to: u32, msg: &Control) {
        let Control::Replicate { batch } = msg else {
            return;
        };
        if batch.origin != from || batch.seq == 0 {
            return;
        }
        let mut keys = BTreeSet::new();
        for p in &batch.parts {
            if let ReplicaPart::Keys { keys: k, .. } = p {
                keys.extend(pod_vec::<Key>(k));
            }
        }
        self.batches.insert(
            (from, batch.seq),
            Batch {
                path: batch.path.clone(),
                pushes: batch.pushes.iter().map(|p| (p.sender, p.ts)).collect(),
                keys,
                acked: false,
            },
        );
    }

    /// Server `origin` got the acknowledgement of its batch `seq`.
    pub(crate) fn ack_received(&mut self, origin: u32, seq: u64) {
        if let Some(b) = self.batches.get_mut(&(origin, seq)) {
            b.acked = true;
        }
    }

    /// Server `head` released the answer of push `id` (request `push` from node
    /// `sender`) on `keys`; `store` is the head's store at that moment (a leaving server
    /// may release its last answers in the step it exits).
    pub(crate) fn released(
        &mut self,
        head: u32,
        sender: u32,
        push: u64,
        id: PushId,
        keys: Vec<Key>,
        store: &SimStore,
    ) {
        for &k in &keys {
            if !store.holds(k, id) {
                self.violations.push(format!(
                    "server {head} acknowledged push {id:#x} without holding it on key {k:#x}"
                ));
            }
        }
        self.released.push((head, sender, push, id, keys));
    }

    /// A process crashed in this step.
    pub(crate) fn crashed(&mut self) {
        self.crashed = true;
    }

    /// After every event: the released answers, then the durability of what was
    /// acknowledged on the keys that changed (all keys after a crash).
    pub(crate) fn after_step(&mut self, servers: &BTreeMap<u32, (bool, Option<&SimStore>)>) {
        let holds = |r: u32, k: Key, id: PushId| {
            servers
                .get(&r)
                .is_some_and(|(alive, s)| *alive && s.is_some_and(|s| s.holds(k, id)))
        };
        let live_holders = |k: Key, id: PushId| -> BTreeSet<u32> {
            servers
                .iter()
                .filter(|(_, (alive, s))| *alive && s.is_some_and(|s| s.holds(k, id)))
                .map(|(r, _)| *r)
                .collect()
        };
        for (head, sender, push, id, keys) in std::mem::take(&mut self.released) {
            for ((origin, seq), b) in &self.batches {
                if *origin != head || !b.acked || !b.pushes.contains(&(sender, push)) {
                    continue;
                }
                for &k in keys.iter().filter(|k| b.keys.contains(k)) {
                    for &r in &b.path {
                        let alive = servers.get(&r).is_some_and(|(a, _)| *a);
                        if alive && !holds(r, k, id) {
                            self.violations.push(format!(
                                "server {head} acknowledged push {id:#x}, but replica {r} of acknowledged batch {seq} does not hold key {k:#x}"
                            ));
                        }
                    }
                }
            }
            for &k in &keys {
                let h = live_holders(k, id);
                self.acked.entry(k).or_default().insert(id, h);
            }
        }
        let all = std::mem::take(&mut self.crashed);
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        for (_, s) in servers.values() {
            if let Some(s) = s {
                dirty.extend(s.take_dirty());
            }
        }
        let keys: Vec<Key> = if all {
            self.acked.keys().copied().collect()
        } else {
            dirty
                .into_iter()
                .filter(|k| self.acked.contains_key(k))
                .collect()
        };
        for k in keys {
            for (id, had) in &self.acked[&k] {
                for &r in had {
                    let alive = servers.get(&r).is_some_and(|(a, _)| *a);
                    if alive && !holds(r, k, *id) {
                        self.violations.push(format!(
                            "acknowledged push {id:#x} lost on key {k:#x} at server {r}, which held it"
                        ));
                    }
                }
                if !servers.keys().any(|&r| holds(r, k, *id)) {
                    self.violations.push(format!(
                        "acknowledged push {id:#x} on key {k:#x} is on no live server"
                    ));
                }
            }
        }
    }

    /// Once the run is quiet: the chains agree, and hold what was acknowledged and
    /// nothing that was not made.
    ///
    /// The replicas of a chain must agree only where its head settled: it had the final
    /// table and nothing of its replication waited (a head cut off from the scheduler
    /// when the job ended never learnt its new replicas, so never copied to them).
    pub(crate) fn at_end(
        &mut self,
        table: &Partition,
        servers: &BTreeMap<u32, (bool, Option<&SimStore>)>,
        settled: &BTreeSet<u32>,
    ) -> BTreeMap<Key, Vec<PushId>> {
        let mut finals = BTreeMap::new();
        let mut keys: BTreeSet<Key> = self.acked.keys().copied().collect();
        for (_, s) in servers.values() {
            if let Some(s) = s {
                keys.extend(s.keys());
            }
        }
        for k in keys {
            let chain = table.chain_of(k);
            let mut first: Option<(u32, Vec<PushId>)> = None;
            for r in chain {
                let Some((true, Some(s))) = servers.get(&r) else {
                    continue;
                };
                let h = s.history(k);
                match &first {
                    None => first = Some((r, h)),
                    Some((r0, h0)) if *h0 != h && settled.contains(r0) => {
                        self.violations.push(format!(
                            "key {k:#x}: server {r0} holds {} pushes, server {r} {} (or another order): {h0:x?} vs {h:x?}",
                            h0.len(),
                            h.len()
                        ));
                    }
                    Some(_) => {}
                }
            }
            let Some((head, h)) = first else {
                if self.acked.contains_key(&k) {
                    self.violations
                        .push(format!("key {k:#x}: no live server of its chain"));
                }
                continue;
            };
            let held: BTreeSet<PushId> = h.iter().copied().collect();
            if let Some(a) = self.acked.get(&k) {
                for id in a.keys() {
                    if !held.contains(id) {
                        self.violations.push(format!(
                            "key {k:#x}: acknowledged push {id:#x} missing at server {head}"
                        ));
                    }
                }
            }
            for id in &held {
                if !self.pushes.get(id).is_some_and(|(_, ks)| ks.contains(&k)) {
                    self.violations.push(format!(
                        "key {k:#x}: server {head} holds push {id:#x}, which never touched it"
                    ));
                }
            }
            finals.insert(k, h);
        }
        finals
    }

    /// Pushes acknowledged (answers released) so far, over all keys.
    pub(crate) fn acked_pushes(&self) -> usize {
        let ids: BTreeSet<PushId> = self
            .acked
            .values()
            .flat_map(|m| m.keys().copied())
            .collect();
        ids.len()
    }
}
