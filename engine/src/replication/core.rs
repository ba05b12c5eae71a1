//! The replication state machine of one server, without I/O: batches, acknowledgements,
//! exactly-once memory, late-batch rules, hand-off markers and regrouping. The driver
//! ([`super::Replicator`]) holds it under a lock and carries out its outputs; the
//! simulation drives the same code over a simulated network.
//!
//! Every method says when it must be called. Time is an input (`now`, the time since
//! any fixed origin); values are read from and installed into an [`EntryStore`]; what
//! goes to other servers, and which push answers may go out, come back as [`Output`]s,
//! in the order they must be carried out (sends to one server are in order on its
//! connection: batches of one chain must arrive in the order they were made).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::base::keys::{Key, KeyRange};
use crate::placement::Partition;
use crate::proto::{Control, PushRecord, ReplicaBatch, ReplicaPart};

use super::batch::{group, merge_ranges, Batch, Sent};
use super::entries::{pod_vec, EntryStore};
use super::fresh::Fresh;
use super::memory::Seen;
use super::{trace_key, AnswerId, HeldPart, KeysRef, ReplicationConfig, ReplicationStats};

/// What the driver must do after a call, in this order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Output {
    /// Send `msg` to server `to` (sends to one server keep their order).
    Send {
        /// The receiving server's rank.
        to: u32,
        /// The message.
        msg: Control,
    },
    /// Every replica of the ranges a push touched holds it: its answer may go out.
    Answer(AnswerId),
    /// Every copy started by the table change to `epoch` is acknowledged (tell the
    /// scheduler).
    Synced(u64),
}

/// What [`ReplicationCore::after_apply`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Queued {
    /// Chains whose batch is full: flush them ([`ReplicationCore::flush_chains`]).
    pub(crate) full: Vec<Vec<u32>>,
    /// A batch started waiting for the window: the timer must run
    /// ([`ReplicationCore::poll_timeout`]).
    pub(crate) armed: bool,
}

/// The replication side of one server, as a state machine.
pub(crate) struct ReplicationCore {
    rank: u32,
    cfg: ReplicationConfig,
    seq: u64,
    /// Pending batches by downstream chain (the replicas after this head, in order).
    pending: BTreeMap<Vec<u32>, Batch>,
    /// Batches sent, by sequence number, waiting for their tail's acknowledgement.
    in_flight: BTreeMap<u64, Sent>,
    stats: ReplicationStats,
    seen: Seen,
    fresh: Fresh,
    /// Hand-off markers received: (origin head, chain) -> the newest table epoch it sent
    /// one for on that chain.
    markers: HashMap<(u32, Vec<u32>), u64>,
    /// Copies started by the last table change, not yet acknowledged: (epoch, batches).
    sync: Option<(u64, BTreeSet<u64>)>,
    /// Servers this one has an open connection to.
    reachable: BTreeSet<u32>,
    /// Push answers waiting, with how many batches still hold each.
    answers: HashMap<AnswerId, usize>,
}

impl ReplicationCore {
    /// The core of server `rank`, with connections to the servers in `reachable`.
    pub(crate) fn new(rank: u32, cfg: ReplicationConfig, reachable: BTreeSet<u32>) -> Self {
        ReplicationCore {
            rank,
            cfg,
            seq: 0,
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            stats: ReplicationStats::default(),
            seen: Seen::default(),
            fresh: Fresh::default(),
            markers: HashMap::new(),
            sync: None,
            reachable,
            answers: HashMap::new(),
        }
    }

    /// As if this server had taken `ranges` (and applied `keys` in them) over at table
    /// `epoch`: batches of older tables that touch them are late.
    pub(crate) fn set_taken_over(&mut self, epoch: u64, keys: &[Key], ranges: Vec<KeyRange>) {
        self.fresh = Fresh {
            epoch,
            inherited: ranges.clone(),
            keys: keys.iter().copied().collect(),
            ranges,
            ..Fresh::default()
        };
    }

    /// Counters.
    pub(crate) fn stats(&self) -> ReplicationStats {
        ReplicationStats {
            in_flight: self.in_flight.len() as u64,
            ..self.stats
        }
    }

    /// A connection to server `rank` is open (at start, or it joined).
    pub(crate) fn peer_up(&mut self, rank: u32) {
        self.reachable.insert(rank);
    }

    /// How much of push (sender, ts) with these keys was applied here already (as head or
    /// replica): what is held must not be applied again. Call before applying a push.
    pub(crate) fn held(&self, sender: u32, ts: u64, keys: KeysRef<'_>) -> HeldPart {
        match self.seen.map.get(&(sender, ts)) {
            None => HeldPart::Nothing,
            Some(_) if self.seen.covers((sender, ts), keys) => HeldPart::All,
            Some(ranges) => HeldPart::Part(ranges.clone()),
        }
    }

    /// A push (sender, ts) on `keys` was applied (or found a duplicate) under `table`;
    /// `answer` may go out once every replica of the touched ranges holds it (at once,
    /// as an [`Output::Answer`], when none has replicas). Call after the store update,
    /// before the table can change (the driver holds the table and its apply gate).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn after_apply(
        &mut self,
        table: &Partition,
        sender: u32,
        ts: u64,
        keys: KeysRef<'_>,
        answer: AnswerId,
        now: Duration,
        out: &mut Vec<Output>,
    ) -> Queued {
        let g = group(table, keys);
        if table.replicas() > 0 || self.cfg.remember_all {
            self.seen.record((sender, ts), &g.touched);
        }
        let mut q = Queued::default();
        if g.groups.is_empty() {
            out.push(Output::Answer(answer));
            return q;
        }
        debug_assert!(!self.answers.contains_key(&answer), "answer ids are unique");
        self.answers.insert(answer, 0);
        for (followers, ks, rs) in g.groups {
            debug_assert!(
                !followers.contains(&self.rank),
                "a head is not its own replica"
            );
            let touched: Vec<KeyRange> = g
                .touched
                .iter()
                .copied()
                .filter(|r| table.followers()[table.index_of(r.begin)] == followers)
                .collect();
            let b = self.pending.entry(followers.clone()).or_default();
            if b.since.is_none() {
                b.since = Some(now);
                q.armed = true;
            }
            b.keys.extend_from_slice(&ks);
            b.ranges.extend_from_slice(&rs);
            *self.answers.get_mut(&answer).expect("inserted above") += 1;
            b.answers.push(answer);
            b.pushes.push(PushRecord {
                sender,
                ts,
                ranges: touched,
            });
            if b.pushes.len() >= self.cfg.max_pushes
                || (self.cfg.window.is_zero() && !self.cfg.group_commit)
            {
                q.full.push(followers);
            }
        }
        q
    }

    /// Send the batches of these chains now (what [`after_apply`](Self::after_apply)
    /// returned as full). The driver holds the apply gate exclusively: the values read
    /// are exactly those of the pushes the batches list.
    pub(crate) fn flush_chains(
        &mut self,
        store: &dyn EntryStore,
        epoch: u64,
        chains: Vec<Vec<u32>>,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        for f in chains {
            self.flush_chain(store, epoch, &f, now, out);
        }
    }

    /// When the next pending batch is due (its oldest push waited the window), if any.
    pub(crate) fn poll_timeout(&self) -> Option<Duration> {
        self.pending
            .values()
            .filter(|b| !b.is_empty())
            .filter_map(|b| b.since)
            .min()
            .map(|t| t + self.cfg.window)
    }

    /// Send every pending batch whose oldest push waited the window (all with `all`).
    /// Call when [`poll_timeout`](Self::poll_timeout) is due (with the apply gate held
    /// exclusively). Returns how long until the next one is due, if any waits.
    pub(crate) fn flush_due(
        &mut self,
        store: &dyn EntryStore,
        epoch: u64,
        all: bool,
        now: Duration,
        out: &mut Vec<Output>,
    ) -> Option<Duration> {
        let window = self.cfg.window;
        let due: Vec<Vec<u32>> = self
            .pending
            .iter()
            .filter(|(_, b)| {
                !b.is_empty() && (all || b.since.is_some_and(|t| now.saturating_sub(t) >= window))
            })
            .map(|(f, _)| f.clone())
            .collect();
        for f in due {
            self.flush_chain(store, epoch, &f, now, out);
        }
        self.poll_timeout().map(|t| t.saturating_sub(now))
    }

    fn flush_chain(
        &mut self,
        store: &dyn EntryStore,
        epoch: u64,
        followers: &[u32],
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        let Some(mut b) = self.pending.remove(followers) else {
            return;
        };
        if b.is_empty() {
            return;
        }
        b.keys.sort_unstable();
        b.keys.dedup();
        let ranges = merge_ranges(std::mem::take(&mut b.ranges));
        let snapshots = merge_ranges(std::mem::take(&mut b.snapshots));
        let mut parts = Vec::new();
        let mut bytes = 0u64;
        if !snapshots.is_empty() {
            let keys = store.stored_keys(&snapshots);
            if !keys.is_empty() {
                let (weights, state) = store.read_keys(&keys);
                bytes += (weights.len() + state.len()) as u64;
                parts.push(ReplicaPart::Keys {
                    keys: bytemuck::cast_slice(&keys).to_vec(),
                    weights,
                    state,
                });
            }
        }
        if !b.keys.is_empty() {
            let (weights, state) = store.read_keys(&b.keys);
            bytes += (weights.len() + state.len()) as u64;
            parts.push(ReplicaPart::Keys {
                keys: bytemuck::cast_slice(&b.keys).to_vec(),
                weights,
                state,
            });
        }
        for r in &ranges {
            let (weights, state) = store.read_range(*r);
            bytes += (weights.len() + state.len()) as u64;
            parts.push(ReplicaPart::Range {
                range: *r,
                weights,
                state,
            });
        }
        self.seq += 1;
        let seq = self.seq;
        self.stats.batches += 1;
        self.stats.pushes += b.answers.len() as u64;
        self.stats.bytes += bytes;
        let pushes = std::mem::take(&mut b.pushes);
        let batch = ReplicaBatch {
            origin: self.rank,
            seq,
            epoch,
            path: followers.to_vec(),
            rest: followers[1..].to_vec(),
            pushes: pushes.clone(),
            parts,
        };
        if !self.reachable.contains(&followers[0]) {
            tracing::debug!(
                to = followers[0],
                seq,
                "replica unreachable; the batch waits for a new table"
            );
        }
        out.push(Output::Send {
            to: followers[0],
            msg: Control::Replicate {
                batch: Box::new(batch),
            },
        });
        let previous = self.in_flight.insert(
            seq,
            Sent {
                since: b.since.unwrap_or(now),
                chain: followers.to_vec(),
                keys: b.keys,
                ranges,
                snapshots,
                answers: b.answers,
                pushes,
            },
        );
        debug_assert!(previous.is_none(), "batch sequence numbers only grow");
    }

    /// Replication not yet acknowledged at `now`: (batches, pushes waiting, age of the
    /// oldest).
    pub(crate) fn lag(&self, now: Duration) -> (u64, u64, Duration) {
        let mut batches = 0u64;
        let mut pushes = 0u64;
        let mut oldest = Duration::ZERO;
        for s in self.in_flight.values() {
            batches += 1;
            pushes += s.answers.len() as u64;
            oldest = oldest.max(now.saturating_sub(s.since));
        }
        for b in self.pending.values().filter(|b| !b.is_empty()) {
            batches += 1;
            pushes += b.answers.len() as u64;
            if let Some(t) = b.since {
                oldest = oldest.max(now.saturating_sub(t));
            }
        }
        (batches, pushes, oldest)
    }

    /// Whether nothing waits for replication.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.pending.values().all(Batch::is_empty)
    }

    /// One batch holding `answer` left (acknowledged, or regrouped into others first).
    fn answer_done(&mut self, answer: AnswerId, out: &mut Vec<Output>) {
        let Some(n) = self.answers.get_mut(&answer) else {
            debug_assert!(
                false,
                "answer {answer:?} counted down without being counted"
            );
            return;
        };
        debug_assert!(*n > 0, "answer {answer:?} counted down below zero");
        *n -= 1;
        if *n == 0 {
            self.answers.remove(&answer);
            out.push(Output::Answer(answer));
        }
    }

    /// The tail acknowledged batch `seq`. Call when a `ReplicaAck` arrives.
    pub(crate) fn on_ack(&mut self, seq: u64, out: &mut Vec<Output>) {
        if let Some(s) = self.in_flight.remove(&seq) {
            for a in s.answers {
                self.answer_done(a, out);
            }
        }
        let finished = match self.sync.as_mut() {
            Some((epoch, seqs)) => (seqs.remove(&seq) && seqs.is_empty()).then_some(*epoch),
            None => None,
        };
        if let Some(e) = finished {
            self.sync = None;
            tracing::debug!(epoch = e, "copies of the table change acknowledged");
            out.push(Output::Synced(e));
        }
    }

    /// A batch from a head (or the replica before this one): install it, remember its
    /// pushes, and forward it down the chain or, as the tail, acknowledge it to the
    /// head. Call when a `Replicate` message arrives from a server.
    pub(crate) fn on_batch(
        &mut self,
        store: &dyn EntryStore,
        mut batch: Box<ReplicaBatch>,
        out: &mut Vec<Output>,
    ) {
        if self.fresh.is_late(batch.epoch, batch.origin, &batch.parts) {
            // This server applied some of these keys as the new head already (resent
            // pushes), so installing the rest would mix two orders of the same pushes,
            // and recording its pushes would drop their resends where the values were not
            // installed. Drop it whole: its pushes were never acknowledged (it never
            // reached the tail), so their workers resend them, and they apply here in
            // their turn. Later late batches of the same head hold values built on this
            // one's: they are dropped too.
            self.fresh.dropped.insert(batch.origin);
            tracing::info!(
                origin = batch.origin,
                seq = batch.seq,
                pushes = batch.pushes.len(),
                "late batch of an older table dropped (it overlaps keys applied here since, or follows one that did); its pushes are resent"
            );
            return;
        }
        for p in &batch.parts {
            trace_install(store, &batch, self.fresh.epoch, p);
            if let Err(e) = store.install(p) {
                tracing::warn!(origin = batch.origin, seq = batch.seq, error = %e, "could not install a replica batch part");
            }
        }
        for p in &batch.pushes {
            self.seen.record((p.sender, p.ts), &p.ranges);
        }
        tracing::debug!(origin = batch.origin, seq = batch.seq, rest = ?batch.rest, parts = batch.parts.len(), "replica batch installed");
        let marker = batch.seq == 0 && batch.parts.is_empty();
        if marker {
            let e = self
                .markers
                .entry((batch.origin, batch.path.clone()))
                .or_default();
            *e = (*e).max(batch.epoch);
        }
        if marker && batch.rest.is_empty() {
            // A hand-off marker ends at the tail: nothing to acknowledge.
        } else if batch.rest.is_empty() {
            out.push(Output::Send {
                to: batch.origin,
                msg: Control::ReplicaAck { seq: batch.seq },
            });
        } else {
            let next = batch.rest.remove(0);
            out.push(Output::Send {
                to: next,
                msg: Control::Replicate { batch },
            });
        }
    }

    /// Before the table switches from `old` to `new` (no push of the new epoch is
    /// applied yet): start noting the keys this server applies in the ranges it takes
    /// over, and which previous heads' hand-off markers it waits for. Returns (whether it
    /// takes ranges over, whether it waits for markers): the driver's fast paths.
    pub(crate) fn prepare_table(&mut self, old: &Partition, new: &Partition) -> (bool, bool) {
        debug_assert!(new.epoch() > old.epoch(), "tables only move forward");
        let me = self.rank;
        let mut inherited = Vec::new();
        for (i, r) in new.ranges().iter().enumerate() {
            if new.owners()[i] != me {
                continue;
            }
            let mut b = r.begin;
            while b < r.end {
                let oi = old.index_of(b);
                let e = old.ranges()[oi].end.min(r.end);
                if old.owners()[oi] != me {
                    inherited.push(KeyRange::new(b, e));
                }
                b = e;
            }
        }
        let inherited = merge_ranges(inherited);
        // The previous heads of those ranges: wait for their hand-off markers (those
        // still reachable; a failed head sends none, and its late batches are filtered).
        let mut awaiting: Vec<(u32, Vec<u32>)> = Vec::new();
        for r in &inherited {
            let mut b = r.begin;
            while b < r.end {
                let oi = old.index_of(b);
                let o = old.owners()[oi];
                let path = old.followers()[oi].clone();
                if o != me
                    && !path.is_empty()
                    && !awaiting.iter().any(|(x, p)| *x == o && *p == path)
                {
                    awaiting.push((o, path));
                }
                b = old.ranges()[oi].end.min(r.end);
            }
        }
        let flags = (!inherited.is_empty(), !awaiting.is_empty());
        self.fresh = Fresh {
            epoch: new.epoch(),
            inherited,
            awaiting,
            ..Fresh::default()
        };
        flags
    }

    /// Whether a request on `keys` must wait: they lie in ranges this server took over
    /// at the current epoch, and a previous head of those (still reachable) has not
    /// handed over yet. Returns that head's rank, and whether anything is still awaited
    /// at all (the driver's fast path). Call before serving a request.
    pub(crate) fn handoff_pending(&mut self, keys: KeysRef<'_>) -> (Option<u32>, bool) {
        let epoch = self.fresh.epoch;
        let (markers, reachable) = (&self.markers, &self.reachable);
        // A head that stopped (it waited for its last batches to be acknowledged first,
        // or it failed) has nothing more to hand over.
        self.fresh.awaiting.retain(|(o, path)| {
            let handed = markers
                .get(&(*o, path.clone()))
                .is_some_and(|&e| e >= epoch);
            !handed && reachable.contains(o)
        });
        if self.fresh.awaiting.is_empty() {
            return (None, false);
        }
        let f = &self.fresh;
        let touches = match keys {
            KeysRef::List(ks) => ks
                .iter()
                .any(|&k| f.inherited.iter().any(|r| r.contains(k))),
            KeysRef::Range(r) => f.inherited.iter().any(|i| i.intersect(&r).is_some()),
        };
        (touches.then(|| f.awaiting[0].0), true)
    }

    /// A push of routing epoch `epoch` on `keys` is about to be applied here as head:
    /// note the keys inside ranges taken over at this epoch. Call before the store
    /// update.
    pub(crate) fn note_apply(&mut self, epoch: u64, keys: KeysRef<'_>) {
        let f = &mut self.fresh;
        if f.epoch != epoch || f.inherited.is_empty() {
            return;
        }
        match keys {
            KeysRef::List(ks) => {
                for &k in ks {
                    if f.inherited.iter().any(|r| r.contains(k)) {
                        f.keys.insert(k);
                    }
                }
            }
            KeysRef::Range(r) => {
                let parts: Vec<KeyRange> =
                    f.inherited.iter().filter_map(|i| i.intersect(&r)).collect();
                f.ranges.extend(parts);
            }
        }
    }

    /// The routing table changed from `old` to `new` (after
    /// [`prepare_table`](Self::prepare_table) and the switch): re-queue everything not
    /// yet acknowledged under the new chains (their answers wait for the new replicas),
    /// copy whole ranges to replicas that are new in a chain this server heads, and send
    /// hand-off markers behind everything on the chains it headed. [`Output::Synced`]
    /// reports when the copies are in (at once when there are none).
    pub(crate) fn on_table(
        &mut self,
        store: &dyn EntryStore,
        old: &Partition,
        new: &Partition,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        let first_seq = self.seq + 1;
        self.requeue(store, old, new, now, out);
        // The copies (and re-queued batches) of this change: report when all are in.
        let seqs: BTreeSet<u64> = self.in_flight.range(first_seq..).map(|(s, _)| *s).collect();
        if seqs.is_empty() {
            self.sync = None;
            out.push(Output::Synced(new.epoch()));
        } else {
            self.sync = Some((new.epoch(), seqs));
        }
    }

    fn requeue(
        &mut self,
        store: &dyn EntryStore,
        old: &Partition,
        new: &Partition,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        // Pending batches go out now on their old chains while every replica of those
        // is reachable (a join or a leave: the new heads wait for the old heads' hand-off
        // markers, which follow these batches); the others are regrouped below.
        let mut redo: Vec<Sent> = Vec::new();
        let pending: Vec<(Vec<u32>, Batch)> =
            std::mem::take(&mut self.pending).into_iter().collect();
        for (f, b) in pending {
            if self.chain_alive(&f) {
                self.pending.insert(f.clone(), b);
                self.flush_chain(store, old.epoch(), &f, now, out);
            } else {
                redo.push(b.into_sent(f, now));
            }
        }
        let dead: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, s)| !self.chain_alive(&s.chain))
            .map(|(q, _)| *q)
            .collect();
        for q in dead {
            redo.extend(self.in_flight.remove(&q));
        }
        let me = self.rank;
        // New replicas in chains this server heads get the whole range first.
        let mut snapshots = Vec::new();
        for (i, r) in new.ranges().iter().enumerate() {
            if new.owners()[i] != me || new.followers()[i].is_empty() {
                continue;
            }
            for (oi, or) in old.ranges().iter().enumerate() {
                let Some(part) = or.intersect(r) else {
                    continue;
                };
                let had: Vec<u32> = std::iter::once(old.owners()[oi])
                    .chain(old.followers()[oi].iter().copied())
                    .collect();
                if new.followers()[i].iter().any(|f| !had.contains(f)) {
                    snapshots.push(part);
                }
            }
        }
        self.regroup(store, new, redo, snapshots, now, out);
        // Hand-off markers down every chain this server headed under the old table,
        // behind everything it sent on them: a new head of those ranges serves them once
        // the marker arrived (no older value of this head can arrive after it).
        let mut chains: Vec<Vec<u32>> = old
            .owners()
            .iter()
            .zip(old.followers())
            .filter(|(&o, f)| o == me && !f.is_empty())
            .map(|(_, f)| f.clone())
            .collect();
        chains.sort();
        chains.dedup();
        for f in chains {
            let marker = ReplicaBatch {
                origin: me,
                seq: 0,
                epoch: new.epoch(),
                path: f.clone(),
                rest: f[1..].to_vec(),
                pushes: Vec::new(),
                parts: Vec::new(),
            };
            out.push(Output::Send {
                to: f[0],
                msg: Control::Replicate {
                    batch: Box::new(marker),
                },
            });
        }
    }

    /// Whether every server of `chain` is reachable.
    fn chain_alive(&self, chain: &[u32]) -> bool {
        chain.iter().all(|r| self.reachable.contains(r))
    }

    /// The connection to server `rank` closed: batches on chains through it are
    /// regrouped under `table` (its replacement gets them once the table says who).
    /// Call when the connection closes.
    pub(crate) fn peer_lost(
        &mut self,
        store: &dyn EntryStore,
        table: &Partition,
        rank: u32,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        self.reachable.remove(&rank);
        let mut redo = Vec::new();
        let pending: Vec<Vec<u32>> = self
            .pending
            .keys()
            .filter(|f| f.contains(&rank))
            .cloned()
            .collect();
        for f in pending {
            if let Some(b) = self.pending.remove(&f) {
                redo.push(b.into_sent(f, now));
            }
        }
        let gone: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, s)| s.chain.contains(&rank))
            .map(|(q, _)| *q)
            .collect();
        for q in gone {
            redo.extend(self.in_flight.remove(&q));
        }
        if !redo.is_empty() {
            tracing::info!(
                peer = rank,
                batches = redo.len(),
                "replica connection lost; its batches are regrouped"
            );
            self.regroup(store, table, redo, Vec::new(), now, out);
        }
    }

    /// Regroup batches (sent on chains that no longer work) and whole-range copies under
    /// `table`: only what this server heads there; their answers wait for the new chains
    /// (at once when nothing is left to replicate).
    fn regroup(
        &mut self,
        store: &dyn EntryStore,
        table: &Partition,
        redo: Vec<Sent>,
        snapshots: Vec<KeyRange>,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        let me = self.rank;
        let mut keys = Vec::new();
        let mut ranges = Vec::new();
        let mut snaps = snapshots;
        let mut pushes = Vec::new();
        // Every answer, once per batch it leaves; and the distinct answers.
        let mut leaving: Vec<AnswerId> = Vec::new();
        let mut answers: Vec<AnswerId> = Vec::new();
        for s in redo {
            keys.extend(s.keys);
            ranges.extend(s.ranges);
            snaps.extend(s.snapshots);
            pushes.extend(s.pushes);
            for a in s.answers {
                if !answers.contains(&a) {
                    answers.push(a);
                }
                leaving.push(a);
            }
        }
        let mut regroup: BTreeMap<Vec<u32>, Batch> = BTreeMap::new();
        keys.sort_unstable();
        keys.dedup();
        keys.retain(|&k| table.owners()[table.index_of(k)] == me);
        let g = group(table, KeysRef::List(&keys));
        for (f, ks, _) in g.groups {
            regroup.entry(f).or_default().keys = ks;
        }
        let mine = |r: &KeyRange| table.owners()[table.index_of(r.begin)] == me;
        for (list, is_snapshot) in [(merge_ranges(ranges), false), (merge_ranges(snaps), true)] {
            for r in list {
                let g = group(table, KeysRef::Range(r));
                for (f, _, rs) in g.groups {
                    for part in rs {
                        if !mine(&part) {
                            continue;
                        }
                        let b = regroup.entry(f.clone()).or_default();
                        if is_snapshot {
                            b.snapshots.push(part);
                        } else {
                            b.ranges.push(part);
                        }
                    }
                }
            }
        }
        regroup.retain(|f, _| !f.contains(&me));
        let n = regroup.len();
        let mut due = Vec::new();
        for (f, b) in regroup {
            let slot = self.pending.entry(f.clone()).or_default();
            slot.since.get_or_insert(now);
            slot.keys.extend(b.keys);
            slot.ranges.extend(b.ranges);
            slot.snapshots.extend(b.snapshots);
            slot.pushes.extend(pushes.iter().cloned());
            for a in &answers {
                *self.answers.entry(*a).or_default() += 1;
                slot.answers.push(*a);
            }
            due.push(f);
        }
        // Counted on the new batches first, so an answer never goes out in between.
        for a in leaving {
            self.answer_done(a, out);
        }
        if n > 0 || !answers.is_empty() {
            tracing::info!(
                epoch = table.epoch(),
                batches = n,
                answers = answers.len(),
                "re-queued replication under the current table"
            );
        }
        for f in due {
            self.flush_chain(store, table.epoch(), &f, now, out);
        }
    }
}

/// Log an install of the traced key (`PSERV_TRACE_KEY`), for debugging replication.
fn trace_install(store: &dyn EntryStore, batch: &ReplicaBatch, my_epoch: u64, p: &ReplicaPart) {
    let (Some(k), ReplicaPart::Keys { keys, weights, .. }) = (trace_key(), p) else {
        return;
    };
    if !keys.len().is_multiple_of(8) {
        return; // not whole keys: `install` refuses the part
    }
    let ks: Vec<Key> = pod_vec(keys);
    if let Some(i) = ks.iter().position(|&x| x == k) {
        let (vl, _, elem) = store.shape();
        let at = i * vl * elem;
        let first = weights.get(at..at + elem).unwrap_or(&[]);
        let w: Vec<f64> = match elem {
            4 => pod_vec::<f32>(first).into_iter().map(f64::from).collect(),
            _ => pod_vec(first),
        };
        tracing::info!(
            origin = batch.origin,
            seq = batch.seq,
            epoch = batch.epoch,
            my_epoch,
            value = ?w.first(),
            pushes = batch.pushes.len(),
            "TRACE install"
        );
    }
}
