//! Chain replication between server processes, with replication after aggregation
//! (MISSION.md P10).
//!
//! The routing table ([`Partition`]) gives every key range a chain: its head (owner), then
//! `k` replicas. Workers push to the head only. The head applies a push to its store, then
//! remembers the touched keys (or dense ranges) in a *pending batch* per downstream chain;
//! the push's answer waits. A batch is sent when it holds `max_pushes` pushes or when its
//! oldest push waited `window` (0: at once): the head reads the *current values* of the
//! batch's keys (weights and the update function's state) and sends them, once, to the
//! first replica, which installs them and forwards them to the next; the tail answers
//! [`Control::ReplicaAck`] to the head, which then answers every push of the batch. So n
//! pushes of one window cost one replication, and a push is acknowledged only once every
//! replica of its range holds its effect: a failover loses no acknowledged push.
//!
//! Replicas install values, not gradients: installing a batch twice changes nothing, and a
//! later batch of the same key carries a later value (one connection per head and replica,
//! so batches arrive in order).
//!
//! Exactly-once pushes: every server remembers, per (worker, task timestamp), the ranges of
//! the routing table whose keys of that push it holds (as head, or as replica through
//! [`PushRecord`]s in the batches). A worker that resends a push after a failover (it never
//! got the answer) finds it applied on the new head, which then only re-replicates it and
//! answers. The memory is bounded (the last [`SEEN_CAP`] pushes).
//!
//! When the table changes (a server failed), the head re-queues everything not yet
//! acknowledged under the new chains, and copies whole ranges to replicas that are new in a
//! chain (a snapshot batch), before anything else is sent to them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use pserv_transport::{Conn, OutFrame};

use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;
use crate::placement::Partition;
use crate::proto::{Control, PushRecord, ReplicaBatch, ReplicaPart};
use crate::store::Store;
use crate::update::UpdateFn;

/// How many pushes every server remembers for exactly-once retries.
pub const SEEN_CAP: usize = 1 << 16;

/// How a head batches replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Send a batch once it holds this many pushes (1: no aggregation).
    pub max_pushes: usize,
    /// Send a batch once its oldest push waited this long (zero: at once).
    pub window: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            max_pushes: 32,
            window: Duration::from_micros(200),
        }
    }
}

/// A push answer that waits for replication: sent when every batch holding it is
/// acknowledged by its tail.
pub(crate) struct Ack {
    remaining: AtomicUsize,
    answer: Mutex<Option<(Conn, OutFrame)>>,
}

impl Ack {
    fn new(conn: Conn, frame: OutFrame) -> Arc<Ack> {
        Arc::new(Ack {
            remaining: AtomicUsize::new(0),
            answer: Mutex::new(Some((conn, frame))),
        })
    }

    fn add(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// One batch holding it is acknowledged.
    fn done_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.send();
        }
    }

    fn send(&self) {
        if let Some((conn, frame)) = self.answer.lock().take() {
            // A failed send: the worker is gone; it will resend to whoever heads then.
            let _ = conn.send(frame);
        }
    }
}

/// What a batch carries (before its values are read).
#[derive(Default)]
struct Batch {
    keys: Vec<Key>,
    ranges: Vec<KeyRange>,
    /// Whole ranges to copy (every stored key), for a replica new in the chain.
    snapshots: Vec<KeyRange>,
    acks: Vec<Arc<Ack>>,
    pushes: Vec<PushRecord>,
    since: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.ranges.is_empty()
            && self.snapshots.is_empty()
            && self.acks.is_empty()
            && self.pushes.is_empty()
    }
}

impl Batch {
    /// This batch as if sent on `chain` (to be regrouped with the sent ones).
    fn into_sent(self, chain: Vec<u32>) -> Sent {
        Sent {
            since: self.since.unwrap_or_else(Instant::now),
            chain,
            keys: self.keys,
            ranges: self.ranges,
            snapshots: self.snapshots,
            acks: self.acks,
            pushes: self.pushes,
        }
    }
}

/// A batch sent and not yet acknowledged.
struct Sent {
    /// The replicas it went to, in chain order.
    chain: Vec<u32>,
    /// When it was queued first (its oldest push).
    since: Instant,
    keys: Vec<Key>,
    ranges: Vec<KeyRange>,
    snapshots: Vec<KeyRange>,
    acks: Vec<Arc<Ack>>,
    pushes: Vec<PushRecord>,
}

/// Counters for the operator and the bench.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicationStats {
    /// Batches sent by this head.
    pub batches: u64,
    /// Pushes those batches carried.
    pub pushes: u64,
    /// Value bytes those batches carried.
    pub bytes: u64,
    /// Batches sent and not acknowledged yet.
    pub in_flight: u64,
}

struct State {
    seq: u64,
    /// Pending batches by downstream chain (the replicas after this head, in order).
    pending: HashMap<Vec<u32>, Batch>,
    in_flight: BTreeMap<u64, Sent>,
    stats: ReplicationStats,
}

/// Exactly-once memory: (worker node id, task timestamp) -> ranges held.
#[derive(Default)]
struct Seen {
    map: HashMap<(u32, u64), Vec<KeyRange>>,
    order: VecDeque<(u32, u64)>,
}

impl Seen {
    fn record(&mut self, id: (u32, u64), ranges: &[KeyRange]) {
        if ranges.is_empty() {
            return;
        }
        let e = self.map.entry(id).or_insert_with(|| {
            self.order.push_back(id);
            Vec::new()
        });
        for r in ranges {
            if !e.contains(r) {
                e.push(*r);
            }
        }
        while self.order.len() > SEEN_CAP {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn covers(&self, id: (u32, u64), keys: KeysRef<'_>) -> bool {
        let Some(held) = self.map.get(&id) else {
            return false;
        };
        let inside = |k: Key| held.iter().any(|r| r.contains(k));
        match keys {
            KeysRef::List(ks) => !ks.is_empty() && ks.iter().all(|&k| inside(k)),
            KeysRef::Range(r) => {
                !r.is_empty() && {
                    // Covered when the held ranges tile it.
                    let mut pos = r.begin;
                    let mut sorted = held.clone();
                    sorted.sort_by_key(|x| x.begin);
                    for h in sorted {
                        if h.begin <= pos && h.end > pos {
                            pos = h.end;
                        }
                    }
                    pos >= r.end
                }
            }
        }
    }
}

/// How much of a push a server holds already (see [`Replicator::held`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeldPart {
    /// None of it: apply it.
    Nothing,
    /// All of its keys: apply nothing.
    All,
    /// The keys inside these ranges: apply the others.
    Part(Vec<KeyRange>),
}

/// The keys of a request.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeysRef<'a> {
    /// A sorted key list.
    List(&'a [Key]),
    /// A dense range.
    Range(KeyRange),
}

/// The keys of a request grouped by the downstream chain of their ranges, with the
/// table's ranges they touch.
struct Groups {
    /// (followers, keys, ranges) for ranges with replicas.
    groups: Vec<(Vec<u32>, Vec<Key>, Vec<KeyRange>)>,
    /// Every table range touched (replicated or not), clipped to the request.
    touched: Vec<KeyRange>,
}

fn group(table: &Partition, keys: KeysRef<'_>) -> Groups {
    let mut map: BTreeMap<Vec<u32>, (Vec<Key>, Vec<KeyRange>)> = BTreeMap::new();
    let mut touched = Vec::new();
    match keys {
        KeysRef::List(ks) => {
            let mut start = 0;
            while start < ks.len() {
                let i = table.index_of(ks[start]);
                let r = table.ranges()[i];
                let end = start + ks[start..].partition_point(|&k| k < r.end);
                touched.push(r);
                let f = &table.followers()[i];
                if !f.is_empty() {
                    map.entry(f.clone())
                        .or_default()
                        .0
                        .extend_from_slice(&ks[start..end]);
                }
                start = end;
            }
        }
        KeysRef::Range(range) => {
            if !range.is_empty() {
                let first = table.index_of(range.begin);
                for i in first..table.ranges().len() {
                    let Some(part) = table.ranges()[i].intersect(&range) else {
                        break;
                    };
                    touched.push(table.ranges()[i]);
                    let f = &table.followers()[i];
                    if !f.is_empty() {
                        map.entry(f.clone()).or_default().1.push(part);
                    }
                }
            }
        }
    }
    Groups {
        groups: map.into_iter().map(|(f, (k, r))| (f, k, r)).collect(),
        touched,
    }
}

/// The replication side of one server.
pub(crate) struct Replicator {
    rank: u32,
    /// This server's node id (the sender of its messages).
    node_id: u32,
    cfg: ReplicationConfig,
    state: Mutex<State>,
    seen: Mutex<Seen>,
    /// Outgoing connections to the other servers, by rank.
    peers: parking_lot::RwLock<Vec<Option<Conn>>>,
    /// What this server applied as a new head since the last table change.
    fresh: Mutex<Fresh>,
    /// Whether `fresh` has inherited ranges (a fast path for every push).
    has_inherited: std::sync::atomic::AtomicBool,
    /// Applies hold it shared from the store update until their push is queued; a flush
    /// holds it exclusively while it reads values: the values a batch carries are then
    /// exactly those of the pushes it lists (a push applied but not listed would be
    /// applied again when resent after a failover).
    apply_gate: parking_lot::RwLock<()>,
    /// Hand-off markers received: (origin head, chain) -> the newest table epoch it sent
    /// one for on that chain.
    markers: Mutex<HashMap<(u32, Vec<u32>), u64>>,
    /// Whether ranges taken over at the current epoch still wait for a previous head's
    /// hand-off (a fast path for every request).
    gated: std::sync::atomic::AtomicBool,
    /// Messages for servers not connected yet (a server that joined: its address comes
    /// with a control message that may arrive after a batch to forward to it).
    undelivered: Mutex<HashMap<u32, Vec<Control>>>,
    /// Copies started by the last table change, not yet acknowledged: (epoch, batches).
    sync: Mutex<Option<(u64, std::collections::BTreeSet<u64>)>>,
    /// Called with the epoch once they are all acknowledged (tells the scheduler).
    synced: Box<dyn Fn(u64) + Send + Sync>,
    /// Wakes the window flusher when a batch starts waiting.
    kick: crossbeam_channel::Sender<()>,
    kicked: crossbeam_channel::Receiver<()>,
}

/// Reads and writes whole store entries for replication.
pub(crate) trait EntryStore: Send + Sync {
    /// Read the weights and state of sorted `keys` as bytes.
    fn read_keys(&self, keys: &[Key]) -> (Vec<u8>, Vec<u8>);
    /// Read the weights and state of every key of `range` as bytes.
    fn read_range(&self, range: KeyRange) -> (Vec<u8>, Vec<u8>);
    /// Install one part of a batch.
    fn install(&self, part: &ReplicaPart) -> Result<(), String>;
    /// Every stored key inside any of `ranges` (sorted, disjoint), sorted.
    fn stored_keys(&self, ranges: &[KeyRange]) -> Vec<Key>;
    /// Weights per key, state elements per key, bytes per element.
    fn shape(&self) -> (usize, usize, usize);
}

/// Keys this server applied as the head of ranges it took over under the current table:
/// a batch made under an older table (a late batch of the previous head, still in flight
/// when the table changed) that holds any of them is dropped whole (its pushes were never
/// acknowledged and come again).
#[derive(Default)]
struct Fresh {
    epoch: u64,
    /// Ranges this server heads now and did not head under the previous table.
    inherited: Vec<KeyRange>,
    /// Previous heads of those, with the chain their batches travelled, whose hand-off
    /// marker has not come yet.
    awaiting: Vec<(u32, Vec<u32>)>,
    keys: std::collections::HashSet<Key>,
    ranges: Vec<KeyRange>,
    /// Previous heads one of whose late batches was dropped: their later late batches are
    /// dropped too (their values build on the dropped one's).
    dropped: std::collections::HashSet<u32>,
}

impl Fresh {
    /// Whether a fresh key or range is in `part`.
    fn touches(&self, part: &ReplicaPart) -> bool {
        let fresh = |k: Key| self.keys.contains(&k) || self.ranges.iter().any(|r| r.contains(k));
        match part {
            ReplicaPart::Keys { keys, .. } => pod_vec::<Key>(keys).into_iter().any(fresh),
            ReplicaPart::Range { range, .. } => {
                self.ranges.iter().any(|r| r.intersect(range).is_some())
                    || self.keys.iter().any(|&k| range.contains(k))
            }
        }
    }
}

impl Replicator {
    /// The replicator of server `rank` with connections to its peers.
    pub(crate) fn new(
        rank: u32,
        node_id: u32,
        cfg: ReplicationConfig,
        peers: Vec<Option<Conn>>,
        synced: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Self {
        let (kick, kicked) = crossbeam_channel::unbounded();
        Replicator {
            rank,
            node_id,
            sync: Mutex::new(None),
            fresh: Mutex::new(Fresh::default()),
            has_inherited: std::sync::atomic::AtomicBool::new(false),
            markers: Mutex::new(HashMap::new()),
            apply_gate: parking_lot::RwLock::new(()),
            gated: std::sync::atomic::AtomicBool::new(false),
            undelivered: Mutex::new(HashMap::new()),
            synced,
            cfg,
            state: Mutex::new(State {
                seq: 0,
                pending: HashMap::new(),
                in_flight: BTreeMap::new(),
                stats: ReplicationStats::default(),
            }),
            seen: Mutex::new(Seen::default()),
            peers: parking_lot::RwLock::new(peers),
            kick,
            kicked,
        }
    }

    /// Counters.
    pub(crate) fn stats(&self) -> ReplicationStats {
        let s = self.state.lock();
        ReplicationStats {
            in_flight: s.in_flight.len() as u64,
            ..s.stats
        }
    }

    /// How much of push (sender, ts) with these keys was applied here already (as head or
    /// replica): what is held must not be applied again.
    pub(crate) fn held(&self, sender: u32, ts: u64, keys: KeysRef<'_>) -> HeldPart {
        let seen = self.seen.lock();
        match seen.map.get(&(sender, ts)) {
            None => HeldPart::Nothing,
            Some(_) if seen.covers((sender, ts), keys) => HeldPart::All,
            Some(ranges) => HeldPart::Part(ranges.clone()),
        }
    }

    /// Hold while applying a push and queueing it ([`after_apply`](Self::after_apply)).
    pub(crate) fn applying(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.apply_gate.read()
    }

    /// Send the batches of these chains now (what [`after_apply`](Self::after_apply)
    /// returned), after the `applying` guard was dropped.
    pub(crate) fn flush_chains(&self, store: &dyn EntryStore, epoch: u64, chains: Vec<Vec<u32>>) {
        if chains.is_empty() {
            return;
        }
        let _gate = self.apply_gate.write();
        let mut st = self.state.lock();
        for f in chains {
            self.flush_chain(&mut st, store, epoch, &f);
        }
    }

    /// A push (sender, ts) on `keys` was applied (or found a duplicate) under `table`;
    /// `answer` goes to `conn` once every replica of the touched ranges holds it (at once
    /// when none has replicas). Returns the chains whose batch is full: the caller drops
    /// its `applying` guard and calls [`flush_chains`](Self::flush_chains).
    pub(crate) fn after_apply(
        &self,
        table: &Partition,
        sender: u32,
        ts: u64,
        keys: KeysRef<'_>,
        conn: &Conn,
        answer: OutFrame,
    ) -> Vec<Vec<u32>> {
        let g = group(table, keys);
        if table.replicas() > 0 {
            self.seen.lock().record((sender, ts), &g.touched);
        }
        if g.groups.is_empty() {
            let _ = conn.send(answer);
            return Vec::new();
        }
        let ack = Ack::new(conn.clone(), answer);
        let mut st = self.state.lock();
        let mut full = Vec::new();
        for (followers, ks, rs) in g.groups {
            let touched: Vec<KeyRange> = g
                .touched
                .iter()
                .copied()
                .filter(|r| {
                    let i = table.index_of(r.begin);
                    table.followers()[i] == followers
                })
                .collect();
            let b = st.pending.entry(followers.clone()).or_default();
            if b.since.is_none() {
                b.since = Some(Instant::now());
                let _ = self.kick.send(());
            }
            b.keys.extend_from_slice(&ks);
            b.ranges.extend_from_slice(&rs);
            ack.add();
            b.acks.push(ack.clone());
            b.pushes.push(PushRecord {
                sender,
                ts,
                ranges: touched,
            });
            if b.pushes.len() >= self.cfg.max_pushes || self.cfg.window.is_zero() {
                full.push(followers);
            }
        }
        full
    }

    /// Send every pending batch whose oldest push waited the window (all with `all`).
    /// Returns how long until the next one is due, if any waits.
    pub(crate) fn flush_due(
        &self,
        store: &dyn EntryStore,
        epoch: u64,
        all: bool,
    ) -> Option<Duration> {
        let _gate = self.apply_gate.write();
        let mut st = self.state.lock();
        let now = Instant::now();
        let due: Vec<Vec<u32>> = st
            .pending
            .iter()
            .filter(|(_, b)| {
                !b.is_empty()
                    && (all
                        || b.since
                            .is_some_and(|t| now.duration_since(t) >= self.cfg.window))
            })
            .map(|(f, _)| f.clone())
            .collect();
        for f in due {
            self.flush_chain(&mut st, store, epoch, &f);
        }
        st.pending
            .values()
            .filter_map(|b| b.since)
            .min()
            .map(|t| (t + self.cfg.window).saturating_duration_since(now))
    }

    /// Run the window flusher until `stop` says so (a thread of its own).
    pub(crate) fn run_flusher(
        &self,
        store: &dyn EntryStore,
        epoch: impl Fn() -> u64,
        stop: impl Fn() -> bool,
    ) {
        while !stop() {
            match self.kicked.recv_timeout(Duration::from_millis(100)) {
                Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            while self.kicked.try_recv().is_ok() {}
            loop {
                match self.flush_due(store, epoch(), false) {
                    Some(wait) if !stop() => {
                        std::thread::sleep(wait.max(Duration::from_micros(20)))
                    }
                    _ => break,
                }
            }
        }
    }

    fn flush_chain(&self, st: &mut State, store: &dyn EntryStore, epoch: u64, followers: &[u32]) {
        let Some(mut b) = st.pending.remove(followers) else {
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
        st.seq += 1;
        let seq = st.seq;
        st.stats.batches += 1;
        st.stats.pushes += b.acks.len() as u64;
        st.stats.bytes += bytes;
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
        let sent = self.send_to(
            followers[0],
            &Control::Replicate {
                batch: Box::new(batch),
            },
        );
        if !sent {
            tracing::debug!(
                to = followers[0],
                seq,
                "replica unreachable; the batch waits for a new table"
            );
        }
        st.in_flight.insert(
            seq,
            Sent {
                since: b.since.unwrap_or_else(Instant::now),
                chain: followers.to_vec(),
                keys: b.keys,
                ranges,
                snapshots,
                acks: b.acks,
                pushes,
            },
        );
    }

    fn send_to(&self, rank: u32, msg: &Control) -> bool {
        let peers = self.peers.read();
        match peers.get(rank as usize).and_then(Option::as_ref) {
            Some(c) => c.send(msg.to_frame(self.node_id)).is_ok(),
            None => {
                // Not connected yet: kept until `add_peer` (bounded: a rank that never
                // connects keeps at most this many).
                let mut u = self.undelivered.lock();
                let q = u.entry(rank).or_default();
                if q.len() < 4096 {
                    q.push(msg.clone());
                }
                false
            }
        }
    }

    /// Replication not yet acknowledged: (batches, pushes waiting, age of the oldest).
    pub(crate) fn lag(&self) -> (u64, u64, Duration) {
        let st = self.state.lock();
        let now = Instant::now();
        let mut batches = 0u64;
        let mut pushes = 0u64;
        let mut oldest = Duration::ZERO;
        for s in st.in_flight.values() {
            batches += 1;
            pushes += s.acks.len() as u64;
            oldest = oldest.max(now.saturating_duration_since(s.since));
        }
        for b in st.pending.values().filter(|b| !b.is_empty()) {
            batches += 1;
            pushes += b.acks.len() as u64;
            if let Some(t) = b.since {
                oldest = oldest.max(now.saturating_duration_since(t));
            }
        }
        (batches, pushes, oldest)
    }

    /// Whether nothing waits for replication and every message to the other servers
    /// left (a server that stops waits for this).
    pub(crate) fn idle(&self) -> bool {
        let st = self.state.lock();
        st.in_flight.is_empty()
            && st.pending.values().all(Batch::is_empty)
            && self
                .peers
                .read()
                .iter()
                .flatten()
                .all(|c| c.is_closed() || c.queued_bytes() == 0)
    }

    /// Whether there is a connection to server `rank`.
    pub(crate) fn has_peer(&self, rank: u32) -> bool {
        self.peers
            .read()
            .get(rank as usize)
            .is_some_and(Option::is_some)
    }

    /// A connection to server `rank` (a server that joined).
    pub(crate) fn add_peer(&self, rank: u32, conn: Conn) {
        let mut p = self.peers.write();
        if p.len() <= rank as usize {
            p.resize(rank as usize + 1, None);
        }
        let queued = self.undelivered.lock().remove(&rank).unwrap_or_default();
        for m in &queued {
            let _ = conn.send(m.to_frame(self.node_id));
        }
        p[rank as usize] = Some(conn);
    }

    /// The tail acknowledged batch `seq`.
    pub(crate) fn on_ack(&self, seq: u64) {
        let sent = self.state.lock().in_flight.remove(&seq);
        if let Some(s) = sent {
            for a in s.acks {
                a.done_one();
            }
        }
        let done = {
            let mut sync = self.sync.lock();
            let finished = match sync.as_mut() {
                Some((epoch, seqs)) => (seqs.remove(&seq) && seqs.is_empty()).then_some(*epoch),
                None => None,
            };
            if finished.is_some() {
                *sync = None;
            }
            finished
        };
        if let Some(e) = done {
            tracing::debug!(epoch = e, "copies of the table change acknowledged");
            (self.synced)(e);
        }
    }

    /// A batch from a head (or the replica before this one): install it, remember its
    /// pushes, and forward it down the chain or, as the tail, acknowledge it to the head.
    pub(crate) fn on_batch(&self, store: &dyn EntryStore, batch: Box<ReplicaBatch>) {
        {
            // Under the lock a head takes to note what it applies: a late batch of an
            // older table never overwrites a newer apply (see `Fresh`).
            let mut fresh = self.fresh.lock();
            let stale =
                batch.epoch < fresh.epoch && (!fresh.keys.is_empty() || !fresh.ranges.is_empty());
            if stale
                && !batch.parts.is_empty()
                && (fresh.dropped.contains(&batch.origin)
                    || batch.parts.iter().any(|p| fresh.touches(p)))
            {
                // This server applied some of these keys as the new head already (resent
                // pushes), so installing the rest would mix two orders of the same
                // pushes, and recording its pushes would drop their resends where the
                // values were not installed. Drop it whole: its pushes were never
                // acknowledged (it never reached the tail), so their workers resend them,
                // and they apply here in their turn. Later late batches of the same head
                // hold values built on this one's: they are dropped too.
                fresh.dropped.insert(batch.origin);
                tracing::info!(
                    origin = batch.origin,
                    seq = batch.seq,
                    pushes = batch.pushes.len(),
                    "late batch of an older table dropped (it overlaps keys applied here since, or follows one that did); its pushes are resent"
                );
                return;
            }
            for p in &batch.parts {
                if let (Some(k), ReplicaPart::Keys { keys, weights, .. }) = (trace_key(), p) {
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
                            my_epoch = fresh.epoch,
                            value = ?w.first(),
                            pushes = batch.pushes.len(),
                            "TRACE install"
                        );
                    }
                }
                if let Err(e) = store.install(p) {
                    tracing::warn!(origin = batch.origin, seq = batch.seq, error = %e, "could not install a replica batch part");
                }
            }
        }
        {
            let mut seen = self.seen.lock();
            for p in &batch.pushes {
                seen.record((p.sender, p.ts), &p.ranges);
            }
        }
        let mut batch = batch;
        tracing::debug!(origin = batch.origin, seq = batch.seq, rest = ?batch.rest, parts = batch.parts.len(), "replica batch installed");
        let marker = batch.seq == 0 && batch.parts.is_empty();
        if marker {
            let mut m = self.markers.lock();
            let e = m.entry((batch.origin, batch.path.clone())).or_default();
            *e = (*e).max(batch.epoch);
        }
        if marker && batch.rest.is_empty() {
            // A hand-off marker ends at the tail: nothing to acknowledge.
        } else if batch.rest.is_empty() {
            let (origin, seq) = (batch.origin, batch.seq);
            if !self.send_to(origin, &Control::ReplicaAck { seq }) {
                tracing::debug!(origin, seq, "head unreachable for a replica ack");
            }
        } else {
            let next = batch.rest.remove(0);
            if !self.send_to(next, &Control::Replicate { batch }) {
                tracing::debug!(
                    next,
                    "next replica unreachable; the head resends after a new table"
                );
            }
        }
    }

    /// Before the table switches from `old` to `new` (under the table's write lock, so
    /// no push of the new epoch is applied yet): start noting the keys this server applies
    /// in the ranges it takes over.
    pub(crate) fn prepare_table(&self, old: &Partition, new: &Partition) {
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
        self.has_inherited
            .store(!inherited.is_empty(), Ordering::Release);
        self.gated.store(!awaiting.is_empty(), Ordering::Release);
        *self.fresh.lock() = Fresh {
            epoch: new.epoch(),
            inherited,
            awaiting,
            ..Fresh::default()
        };
    }

    /// Whether a request on `keys` must wait: they lie in ranges this server took over
    /// at the current epoch, and a previous head of those (still reachable) has not
    /// handed over yet. Returns that head's rank.
    pub(crate) fn handoff_pending(&self, keys: KeysRef<'_>) -> Option<u32> {
        if !self.gated.load(Ordering::Acquire) {
            return None;
        }
        let mut f = self.fresh.lock();
        let epoch = f.epoch;
        {
            let markers = self.markers.lock();
            let peers = self.peers.read();
            // A head that stopped (it waited for its last batches to be acknowledged
            // first, or it failed) has nothing more to hand over.
            f.awaiting.retain(|(o, path)| {
                let handed = markers
                    .get(&(*o, path.clone()))
                    .is_some_and(|&e| e >= epoch);
                let reachable = peers
                    .get(*o as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| !c.is_closed());
                !handed && reachable
            });
        }
        if f.awaiting.is_empty() {
            self.gated.store(false, Ordering::Release);
            return None;
        }
        let touches = match keys {
            KeysRef::List(ks) => ks
                .iter()
                .any(|&k| f.inherited.iter().any(|r| r.contains(k))),
            KeysRef::Range(r) => f.inherited.iter().any(|i| i.intersect(&r).is_some()),
        };
        touches.then(|| f.awaiting[0].0)
    }

    /// A push of routing epoch `epoch` on `keys` is about to be applied here as head:
    /// note the keys inside ranges taken over at this epoch.
    pub(crate) fn note_apply(&self, epoch: u64, keys: KeysRef<'_>) {
        if !self.has_inherited.load(Ordering::Acquire) {
            return;
        }
        let mut f = self.fresh.lock();
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

    /// The routing table changed from `old` to `new`: re-queue everything not yet
    /// acknowledged under the new chains (their answers wait for the new replicas), and
    /// copy whole ranges to replicas that are new in a chain this server heads.
    pub(crate) fn on_table(&self, store: &dyn EntryStore, old: &Partition, new: &Partition) {
        let _gate = self.apply_gate.write();
        let mut st = self.state.lock();
        let first_seq = st.seq + 1;
        self.requeue(&mut st, store, old, new);
        // The copies (and re-queued batches) of this change: report when all are in.
        let seqs: std::collections::BTreeSet<u64> =
            st.in_flight.range(first_seq..).map(|(s, _)| *s).collect();
        // Set while the state is locked: an ack of these batches (which takes the state
        // lock first) then always finds them.
        let now_done = seqs.is_empty();
        *self.sync.lock() = (!now_done).then(|| (new.epoch(), seqs));
        drop(st);
        if now_done {
            (self.synced)(new.epoch());
        }
    }

    fn requeue(&self, st: &mut State, store: &dyn EntryStore, old: &Partition, new: &Partition) {
        // Pending batches go out now on their old chains while every replica of those
        // is reachable (a join or a leave: the new heads wait for the old heads' hand-off
        // markers, which follow these batches); the others are regrouped below.
        let mut redo: Vec<Sent> = Vec::new();
        let pending: Vec<(Vec<u32>, Batch)> = st.pending.drain().collect();
        for (f, b) in pending {
            if self.chain_alive(&f) {
                st.pending.insert(f.clone(), b);
                self.flush_chain(st, store, old.epoch(), &f);
            } else {
                redo.push(b.into_sent(f));
            }
        }
        let dead: Vec<u64> = st
            .in_flight
            .iter()
            .filter(|(_, s)| !self.chain_alive(&s.chain))
            .map(|(q, _)| *q)
            .collect();
        for q in dead {
            redo.extend(st.in_flight.remove(&q));
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
        self.regroup(st, store, new, redo, snapshots);
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
            self.send_to(
                f[0],
                &Control::Replicate {
                    batch: Box::new(marker),
                },
            );
        }
    }

    /// Whether every server of `chain` has an open connection from here.
    fn chain_alive(&self, chain: &[u32]) -> bool {
        let peers = self.peers.read();
        chain.iter().all(|&r| {
            peers
                .get(r as usize)
                .and_then(Option::as_ref)
                .is_some_and(|c| !c.is_closed())
        })
    }

    /// The connection to server `rank` closed: batches on chains through it are
    /// regrouped under `table` (its replacement gets them once the table says who).
    pub(crate) fn peer_lost(&self, store: &dyn EntryStore, table: &Partition, rank: u32) {
        let _gate = self.apply_gate.write();
        let mut st = self.state.lock();
        let mut redo = Vec::new();
        let pending: Vec<Vec<u32>> = st
            .pending
            .keys()
            .filter(|f| f.contains(&rank))
            .cloned()
            .collect();
        for f in pending {
            if let Some(b) = st.pending.remove(&f) {
                redo.push(b.into_sent(f));
            }
        }
        let gone: Vec<u64> = st
            .in_flight
            .iter()
            .filter(|(_, s)| s.chain.contains(&rank))
            .map(|(q, _)| *q)
            .collect();
        for q in gone {
            redo.extend(st.in_flight.remove(&q));
        }
        if !redo.is_empty() {
            tracing::info!(
                peer = rank,
                batches = redo.len(),
                "replica connection lost; its batches are regrouped"
            );
            self.regroup(&mut st, store, table, redo, Vec::new());
        }
    }

    /// Regroup batches (sent on chains that no longer work) and whole-range copies under
    /// `table`: only what this server heads there; their answers wait for the new chains
    /// (at once when nothing is left to replicate).
    fn regroup(
        &self,
        st: &mut State,
        store: &dyn EntryStore,
        table: &Partition,
        redo: Vec<Sent>,
        snapshots: Vec<KeyRange>,
    ) {
        let me = self.rank;
        let mut keys = Vec::new();
        let mut ranges = Vec::new();
        let mut snaps = snapshots;
        let mut pushes = Vec::new();
        // Every answer, once per batch it leaves.
        let mut leaving: Vec<Arc<Ack>> = Vec::new();
        let mut acks: Vec<Arc<Ack>> = Vec::new();
        for s in redo {
            keys.extend(s.keys);
            ranges.extend(s.ranges);
            snaps.extend(s.snapshots);
            pushes.extend(s.pushes);
            for x in s.acks {
                if !acks.iter().any(|y| Arc::ptr_eq(&x, y)) {
                    acks.push(x.clone());
                }
                leaving.push(x);
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
        let now = Instant::now();
        let n = regroup.len();
        let mut due = Vec::new();
        for (f, b) in regroup {
            let slot = st.pending.entry(f.clone()).or_default();
            slot.since.get_or_insert(now);
            slot.keys.extend(b.keys);
            slot.ranges.extend(b.ranges);
            slot.snapshots.extend(b.snapshots);
            slot.pushes.extend(pushes.iter().cloned());
            for a in &acks {
                a.add();
                slot.acks.push(a.clone());
            }
            due.push(f);
        }
        // Counted on the new batches first, so an answer never goes out in between.
        for a in leaving {
            a.done_one();
        }
        if n > 0 || !acks.is_empty() {
            tracing::info!(
                epoch = table.epoch(),
                batches = n,
                acks = acks.len(),
                "re-queued replication under the current table"
            );
        }
        for f in due {
            self.flush_chain(st, store, table.epoch(), &f);
        }
    }
}

/// A key to trace (env `PSERV_TRACE_KEY`), for debugging replication.
pub(crate) fn trace_key() -> Option<Key> {
    static K: std::sync::OnceLock<Option<Key>> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        std::env::var("PSERV_TRACE_KEY")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// Sort and merge overlapping or touching ranges.
fn merge_ranges(mut v: Vec<KeyRange>) -> Vec<KeyRange> {
    v.retain(|r| !r.is_empty());
    v.sort_by_key(|r| r.begin);
    let mut out: Vec<KeyRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.begin <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Reads a store's entries: a rule that copies weights and state out and changes nothing.
struct Capture<T> {
    state_len: usize,
    out: Mutex<(Vec<T>, Vec<T>)>,
}

impl<T: Value> UpdateFn<T> for Capture<T> {
    fn name(&self) -> &str {
        "replica-read"
    }
    fn state_len(&self) -> usize {
        self.state_len
    }
    fn apply(&self, weights: &mut [T], state: &mut [T], _grads: &[T]) {
        let mut o = self.out.lock();
        o.0.extend_from_slice(weights);
        o.1.extend_from_slice(state);
    }
}

/// Installs entries: a rule that sets the weights to the pushed values and the state to
/// the next elements of `state`.
struct Install<T> {
    state_len: usize,
    state: Vec<T>,
    at: AtomicUsize,
}

impl<T: Value> UpdateFn<T> for Install<T> {
    fn name(&self) -> &str {
        "replica-install"
    }
    fn state_len(&self) -> usize {
        self.state_len
    }
    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]) {
        weights.copy_from_slice(grads);
        if !state.is_empty() {
            let at = self.at.fetch_add(state.len(), Ordering::Relaxed);
            state.copy_from_slice(&self.state[at..at + state.len()]);
        }
    }
}

fn to_values<T: Value>(bytes: &[u8]) -> Result<Vec<T>, String> {
    if !bytes.len().is_multiple_of(std::mem::size_of::<T>()) {
        return Err(format!("{} value bytes are not whole values", bytes.len()));
    }
    Ok(pod_vec(bytes))
}

/// Copy bytes (a whole number of `P`s) into a vector of `P`.
fn pod_vec<P: bytemuck::Pod>(bytes: &[u8]) -> Vec<P> {
    let mut v = vec![P::zeroed(); bytes.len() / std::mem::size_of::<P>()];
    bytemuck::cast_slice_mut::<P, u8>(&mut v).copy_from_slice(bytes);
    v
}

impl<T: Value> EntryStore for Store<T> {
    fn read_keys(&self, keys: &[Key]) -> (Vec<u8>, Vec<u8>) {
        let vl = self.value_len();
        let cap = Capture {
            state_len: self.state_len(),
            out: Mutex::new((
                Vec::with_capacity(keys.len() * vl),
                Vec::with_capacity(keys.len() * vl * self.state_len()),
            )),
        };
        // The store applies rules in key order: the capture sees the keys in order.
        let zeros = vec![T::default(); keys.len() * vl];
        if let Err(e) = self.push(keys, &zeros, &cap) {
            tracing::warn!(error = %e, "reading entries for replication");
        }
        let (w, s) = cap.out.into_inner();
        (
            bytemuck::cast_slice(&w).to_vec(),
            bytemuck::cast_slice(&s).to_vec(),
        )
    }

    fn read_range(&self, range: KeyRange) -> (Vec<u8>, Vec<u8>) {
        let vl = self.value_len();
        let n = range.len() as usize;
        let cap = Capture {
            state_len: self.state_len(),
            out: Mutex::new((
                Vec::with_capacity(n * vl),
                Vec::with_capacity(n * vl * self.state_len()),
            )),
        };
        let zeros = vec![T::default(); n * vl];
        if let Err(e) = self.push_range(range, &zeros, &cap) {
            tracing::warn!(error = %e, "reading a range for replication");
        }
        let (w, s) = cap.out.into_inner();
        (
            bytemuck::cast_slice(&w).to_vec(),
            bytemuck::cast_slice(&s).to_vec(),
        )
    }

    fn install(&self, part: &ReplicaPart) -> Result<(), String> {
        let sl = self.state_len();
        let vl = self.value_len();
        match part {
            ReplicaPart::Keys {
                keys,
                weights,
                state,
            } => {
                if !keys.len().is_multiple_of(8) {
                    return Err("key bytes are not whole keys".into());
                }
                let ks: Vec<Key> = pod_vec(keys);
                let w = to_values::<T>(weights)?;
                let s = to_values::<T>(state)?;
                if w.len() != ks.len() * vl || s.len() != ks.len() * vl * sl {
                    return Err(format!(
                        "{} keys with {} weights and {} state elements",
                        ks.len(),
                        w.len(),
                        s.len()
                    ));
                }
                let rule = Install {
                    state_len: sl,
                    state: s,
                    at: AtomicUsize::new(0),
                };
                self.push(&ks, &w, &rule).map_err(|e| e.to_string())
            }
            ReplicaPart::Range {
                range,
                weights,
                state,
            } => {
                let n = range.len() as usize;
                let w = to_values::<T>(weights)?;
                let s = to_values::<T>(state)?;
                if w.len() != n * vl || s.len() != n * vl * sl {
                    return Err(format!(
                        "range {range} with {} weights and {} state elements",
                        w.len(),
                        s.len()
                    ));
                }
                let rule = Install {
                    state_len: sl,
                    state: s,
                    at: AtomicUsize::new(0),
                };
                self.push_range(*range, &w, &rule)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn shape(&self) -> (usize, usize, usize) {
        (
            self.value_len(),
            self.value_len() * self.state_len(),
            std::mem::size_of::<T>(),
        )
    }

    fn stored_keys(&self, ranges: &[KeyRange]) -> Vec<Key> {
        let mut keys = Vec::new();
        self.for_each(|k, _| {
            let i = ranges.partition_point(|r| r.end <= k);
            if ranges.get(i).is_some_and(|r| r.contains(k)) {
                keys.push(k);
            }
        });
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;
    use crate::update::{Adagrad, Sum};

    fn store(state_len: usize) -> Store<f32> {
        Store::new(
            KeyRange::FULL,
            StoreConfig {
                shards: 4,
                value_len: 2,
                state_len,
                ..StoreConfig::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn entries_read_from_one_store_install_the_same_state_in_another() {
        let a = store(1);
        let rule = Adagrad { lr: 0.5, eps: 1e-6 };
        let keys = [3u64, 9, 1 << 40, u64::MAX - 7];
        a.push(&keys, &[1.0, -2.0, 0.5, 0.25, 3.0, 1.0, -1.0, 2.0], &rule)
            .unwrap();
        a.push_range(KeyRange::new(100, 104), &[1.0; 8], &rule)
            .unwrap();
        let b = store(1);
        let (w, s) = a.read_keys(&keys);
        b.install(&ReplicaPart::Keys {
            keys: bytemuck::cast_slice(&keys).to_vec(),
            weights: w,
            state: s,
        })
        .unwrap();
        let (w, s) = a.read_range(KeyRange::new(100, 104));
        b.install(&ReplicaPart::Range {
            range: KeyRange::new(100, 104),
            weights: w,
            state: s,
        })
        .unwrap();
        // Same weights, and the same state: one more identical push gives the same result.
        let more = [0.5f32; 8];
        a.push(&keys, &more, &rule).unwrap();
        b.push(&keys, &more, &rule).unwrap();
        a.push_range(KeyRange::new(100, 104), &more, &rule).unwrap();
        b.push_range(KeyRange::new(100, 104), &more, &rule).unwrap();
        let mut dump_a = Vec::new();
        a.for_each(|k, w| dump_a.push((k, w.to_vec())));
        let mut dump_b = Vec::new();
        b.for_each(|k, w| dump_b.push((k, w.to_vec())));
        assert_eq!(dump_a, dump_b);
        assert_eq!(b.stored_keys(&[KeyRange::new(0, 4)]), vec![3]);
        assert_eq!(
            b.stored_keys(&[KeyRange::new(0, 4), KeyRange::new(9, 101)]),
            vec![3, 9, 100]
        );
    }

    #[test]
    fn malformed_parts_are_refused_and_change_nothing() {
        let b = store(0);
        let bad = ReplicaPart::Keys {
            keys: vec![1, 2, 3],
            weights: vec![],
            state: vec![],
        };
        assert!(b.install(&bad).is_err());
        let bad = ReplicaPart::Keys {
            keys: bytemuck::cast_slice(&[1u64, 2]).to_vec(),
            weights: bytemuck::cast_slice(&[1.0f32; 3]).to_vec(),
            state: vec![],
        };
        assert!(b.install(&bad).is_err());
        let bad = ReplicaPart::Range {
            range: KeyRange::new(0, 4),
            weights: vec![0; 5],
            state: vec![],
        };
        assert!(b.install(&bad).is_err());
        assert_eq!(b.key_count(), 0);
        // Sum rule untouched by the internal rules.
        b.push(&[5], &[1.0, 1.0], &Sum).unwrap();
        assert_eq!(b.key_count(), 1);
    }

    #[test]
    fn seen_covers_keys_only_inside_recorded_ranges() {
        let mut s = Seen::default();
        s.record((7, 1), &[KeyRange::new(10, 20), KeyRange::new(30, 40)]);
        assert!(s.covers((7, 1), KeysRef::List(&[10, 19, 35])));
        assert!(!s.covers((7, 1), KeysRef::List(&[10, 25])));
        assert!(!s.covers((7, 2), KeysRef::List(&[10])));
        assert!(!s.covers((8, 1), KeysRef::List(&[10])));
        assert!(s.covers((7, 1), KeysRef::Range(KeyRange::new(12, 18))));
        assert!(!s.covers((7, 1), KeysRef::Range(KeyRange::new(12, 32))));
        s.record((7, 1), &[KeyRange::new(20, 30)]);
        assert!(s.covers((7, 1), KeysRef::Range(KeyRange::new(12, 32))));
        for i in 0..(SEEN_CAP as u64 + 10) {
            s.record((1, 100 + i), &[KeyRange::new(0, 1)]);
        }
        assert!(!s.covers((7, 1), KeysRef::List(&[10])), "oldest forgotten");
        assert!(s.map.len() <= SEEN_CAP);
    }

    #[test]
    fn a_late_batch_is_recognised_when_it_holds_keys_the_new_head_applied_since() {
        let mut f = Fresh {
            epoch: 3,
            ..Fresh::default()
        };
        f.keys.insert(5);
        f.ranges.push(KeyRange::new(20, 22));
        let bytes = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let keys = |ks: &[u64]| ReplicaPart::Keys {
            keys: bytemuck::cast_slice(ks).to_vec(),
            weights: bytes(&vec![1.0; ks.len()]),
            state: bytes(&vec![0.0; ks.len()]),
        };
        let range = |b: u64, e: u64| ReplicaPart::Range {
            range: KeyRange::new(b, e),
            weights: bytes(&vec![1.0; (e - b) as usize]),
            state: bytes(&vec![0.0; (e - b) as usize]),
        };
        assert!(f.touches(&keys(&[4, 5, 6])), "a fresh key");
        assert!(f.touches(&keys(&[21])), "a key in a fresh range");
        assert!(!f.touches(&keys(&[4, 6, 19, 22])));
        assert!(f.touches(&range(3, 6)), "holds key 5");
        assert!(f.touches(&range(21, 30)), "overlaps a fresh range");
        assert!(!f.touches(&range(6, 20)));
        assert!(!f.touches(&range(22, 40)));
    }

    #[test]
    fn merge_ranges_merges_overlaps_and_neighbours() {
        let m = merge_ranges(vec![
            KeyRange::new(5, 8),
            KeyRange::new(0, 2),
            KeyRange::new(2, 3),
            KeyRange::new(6, 10),
            KeyRange::new(20, 20),
        ]);
        assert_eq!(m, vec![KeyRange::new(0, 3), KeyRange::new(5, 10)]);
    }
}
