//! Chain replication with replication after aggregation (MISSION.md P10, P12), as a
//! sans-I/O state machine per server.
//!
//! Every owned range of the [`Ring`] has a chain: head, middles, tail
//! ([`Ring::chain`]). Following van Renesse and Schneider, worker pushes enter at the head,
//! flow down the chain, and are acknowledged to the worker only once the tail has them; the
//! tail's ack flows back up. **Replication after aggregation**: the head applies pushes to
//! its store at once but buffers them per range, and forwards ONE aggregated update per
//! range when `agg_max_pushes` pushes are in or `agg_window_ms` has passed since the first,
//! so n pushes to a range cost one replication message (and one value per distinct key).
//!
//! **What travels: values, not gradients.** An update carries the *resulting values* of
//! the touched keys (plus the ids of the pushes folded in). Values are exact for any update
//! function (SGD, AdaGrad, user functions, not only `Sum`), they are idempotent (applying
//! one twice, or a snapshot over an update, changes nothing), and a full snapshot of a
//! range has the same form as an update, which is what re-syncs a chain after a change. A
//! summed gradient would be smaller for `Sum` only and would need exactly-once delivery.
//!
//! **Streams and sequence numbers.** Updates of a range form a stream per `(epoch, range)`
//! with sequence numbers 1, 2, ...; a replica applies them strictly in order, parks a
//! bounded number that arrive early (a gap), and ignores duplicates (re-acking at the
//! tail). A node keeps every update it forwarded until the ack from below comes back.
//!
//! **Epoch changes** ([`ChainNode::install_ring`]). Messages of an older epoch are dropped;
//! those of a newer epoch are parked until the node learns that ring. At a flip every new
//! head that already held the range (it was in its old chain) is ready at once; one that
//! did not (a joining server) waits for a `Handover` of each piece from its old holder,
//! which the manager names in the flip's plan. A ready head then starts the new stream with
//! seq 1 = a *full snapshot* of the range if its chain changed, else the values of the keys
//! with updates still unacknowledged (only those can differ down the chain). Because
//! survivors keep their order in a chain, a head's history contains every survivor's, so
//! the snapshot loses nothing acknowledged. Pushes buffered or unacknowledged at a flip are
//! not acked by the new stream: workers retry unacknowledged pushes, the head recognises a
//! push it already holds (by id, per key) and acks it with its next update.
//!
//! The node does no I/O: feed it [`ChainNode::push`], [`ChainNode::handle`],
//! [`ChainNode::tick`] and [`ChainNode::install_ring`]; drain [`ChainNode::poll_command`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::base::keys::{Key, KeyRange};
use crate::placement::ring::{Ring, Route, ServerId};

/// A push, named by its worker and the worker's push number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PushId {
    /// The worker.
    pub worker: u32,
    /// The worker's push number (1, 2, ...).
    pub id: u64,
}

/// One key's state as replicated: its value and the pushes it reflects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: Key,
    /// Its value after the update.
    pub value: f32,
    /// Pushes folded into `value` (new ones in an update, all of them in a snapshot).
    pub pushes: Vec<PushId>,
}

/// A tiny in-memory store with the `Sum` rule: key -> value plus the set of pushes applied
/// (for deduplicating retried pushes and for the simulation's checkers). A real store keeps
/// a per-worker high-water mark instead of a set per key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelStore {
    slots: BTreeMap<Key, (f32, BTreeSet<PushId>)>,
}

impl ModelStore {
    /// Apply `delta` of `push` to `key` unless that push is already in; whether it was new.
    pub fn apply_push(&mut self, push: PushId, key: Key, delta: f32) -> bool {
        let slot = self.slots.entry(key).or_default();
        if slot.1.insert(push) {
            slot.0 += delta;
            true
        } else {
            false
        }
    }

    /// Install a replicated entry: take its value, add its pushes.
    pub fn install(&mut self, e: &Entry) {
        let slot = self.slots.entry(e.key).or_default();
        slot.0 = e.value;
        slot.1.extend(e.pushes.iter().copied());
    }

    /// The value of `key` (0 if never written).
    pub fn value(&self, key: Key) -> f32 {
        self.slots.get(&key).map_or(0.0, |s| s.0)
    }

    /// Whether `push` is applied at `key`.
    pub fn has(&self, key: Key, push: PushId) -> bool {
        self.slots.get(&key).is_some_and(|s| s.1.contains(&push))
    }

    /// The pushes applied at `key`.
    pub fn pushes(&self, key: Key) -> Option<&BTreeSet<PushId>> {
        self.slots.get(&key).map(|s| &s.1)
    }

    /// Full entries (all pushes) for the given keys.
    pub fn entries<'a>(&self, keys: impl IntoIterator<Item = &'a Key>) -> Vec<Entry> {
        keys.into_iter()
            .filter_map(|k| {
                self.slots.get(k).map(|s| Entry {
                    key: *k,
                    value: s.0,
                    pushes: s.1.iter().copied().collect(),
                })
            })
            .collect()
    }

    /// Full entries of every key in `range`.
    pub fn snapshot(&self, range: KeyRange) -> Vec<Entry> {
        self.slots
            .range(range.begin..range.end)
            .map(|(k, s)| Entry {
                key: *k,
                value: s.0,
                pushes: s.1.iter().copied().collect(),
            })
            .collect()
    }

    /// Every key held.
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.slots.keys().copied()
    }
}

/// What one stream update carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// The values of the touched keys (or of the whole range, for a snapshot).
    pub entries: Vec<Entry>,
    /// The pushes this update completes: acked to their workers when it is acked.
    pub pushes: Vec<PushId>,
}

impl Payload {
    /// Bytes on the wire of the values part: key and value per entry, push ids.
    pub fn value_bytes(&self) -> usize {
        self.entries.len() * 12 + self.pushes.len() * 12
    }
}

/// Server-to-server messages of the replication protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ChainMsg {
    /// Update `seq` of the stream `(epoch, range)`, from the predecessor.
    Forward {
        /// Ring epoch of the stream.
        epoch: u64,
        /// The range.
        range: KeyRange,
        /// Sequence number (1, 2, ...).
        seq: u64,
        /// The update.
        payload: Payload,
    },
    /// Everything up to `seq` of the stream `(epoch, range)` is at the tail.
    AckUp {
        /// Ring epoch of the stream.
        epoch: u64,
        /// The range.
        range: KeyRange,
        /// Highest sequence number the tail has.
        seq: u64,
    },
    /// At a flip to `epoch`: the old holder's full state of `range`, for its new head.
    Handover {
        /// The epoch of the flip.
        epoch: u64,
        /// The piece handed over.
        range: KeyRange,
        /// Full entries.
        entries: Vec<Entry>,
    },
    /// Pre-copy for a joining server before the flip to `epoch` (an optimisation: the
    /// flip's handover and snapshot are what make the joiner correct).
    CopyData {
        /// The epoch the copy prepares.
        epoch: u64,
        /// The range copied.
        range: KeyRange,
        /// Full entries.
        entries: Vec<Entry>,
    },
}

impl ChainMsg {
    /// The epoch the message belongs to.
    pub fn epoch(&self) -> u64 {
        match self {
            ChainMsg::Forward { epoch, .. }
            | ChainMsg::AckUp { epoch, .. }
            | ChainMsg::Handover { epoch, .. }
            | ChainMsg::CopyData { epoch, .. } => *epoch,
        }
    }
}

/// A handover named in a flip's plan (computed by the manager, [`crate::sim::manager`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The piece of key space.
    pub range: KeyRange,
    /// The old holder that sends it.
    pub from: ServerId,
    /// The new head that waits for it.
    pub to: ServerId,
}

/// The answer to a worker push that was not taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PushReply {
    /// Routed with a stale epoch or to the wrong server: route again with this ring.
    Redirect(Box<Ring>),
    /// This server has not yet heard of the push's epoch, or is still taking over the
    /// range: retry a little later.
    Busy,
}

/// What a [`ChainNode`] asks its caller to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Send a replication message to another server.
    Send {
        /// The server.
        to: ServerId,
        /// The message.
        msg: ChainMsg,
    },
    /// The push's keys in `range` are at the tail: tell the worker.
    AckToWorker {
        /// The push.
        push: PushId,
        /// The range it is complete on.
        range: KeyRange,
    },
    /// The push was not taken: tell the worker why.
    Reply {
        /// The push.
        push: PushId,
        /// Why.
        reply: PushReply,
    },
    /// A pre-copy for the flip to `epoch` is in: tell the manager.
    CopyDone {
        /// The target epoch.
        epoch: u64,
        /// The range copied.
        range: KeyRange,
    },
}

/// Settings of a [`ChainNode`].
#[derive(Clone, Debug)]
pub struct ChainConfig {
    /// Replicas per range besides the head (`--replicas`).
    pub k: usize,
    /// Forward once this many pushes are buffered for a range (`--agg-max-pushes`; 1 turns
    /// aggregation off).
    pub agg_max_pushes: usize,
    /// Forward at the latest this long after the first buffered push (`--agg-window-ms`).
    pub agg_window_ms: u64,
    /// Bound on parked messages (early sequence numbers, newer epochs).
    pub park_max: usize,
}

impl Default for ChainConfig {
    fn default() -> Self {
        ChainConfig {
            k: 1,
            agg_max_pushes: 16,
            agg_window_ms: 2,
            park_max: 65_536,
        }
    }
}

/// Counters, for the replication-saving measurements.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainStats {
    /// Pushes taken by this node as head (new or retried).
    pub pushes: u64,
    /// Forward messages sent (as head or middle).
    pub forwards: u64,
    /// Value bytes in those forwards.
    pub forward_bytes: u64,
    /// Messages dropped for carrying an old epoch.
    pub stale: u64,
    /// Duplicate updates ignored.
    pub duplicates: u64,
}

/// One stream: a range this node is in the chain of, at the current epoch.
#[derive(Clone, Debug)]
struct Stream {
    range: KeyRange,
    chain: Vec<ServerId>,
    pos: usize,
    /// Head: may take pushes (has the range's state).
    ready: bool,
    /// Head: handovers still awaited.
    waiting: usize,
    /// Head: the first update is a full snapshot (chain changed or head is new).
    full: bool,
    /// Head: next sequence number to send.
    next_seq: u64,
    /// Head: buffered pushes per key since the last forward.
    agg: BTreeMap<Key, Vec<PushId>>,
    agg_pushes: Vec<PushId>,
    agg_since: Option<u64>,
    /// Non-tail: sent, not yet acked from below: seq -> (keys, pushes).
    unacked: BTreeMap<u64, (Vec<Key>, Vec<PushId>)>,
    /// Highest seq acked from below.
    acked: u64,
    /// Non-head: highest seq applied in order.
    applied: u64,
    /// Non-head: updates that arrived early.
    parked: BTreeMap<u64, Payload>,
    /// Holds the range's state (head ready, or non-head whose chain is unchanged or that
    /// applied the first update).
    synced: bool,
}

impl Stream {
    fn is_head(&self) -> bool {
        self.pos == 0
    }
    fn is_tail(&self) -> bool {
        self.pos + 1 == self.chain.len()
    }
}

/// One server's replication state machine.
#[derive(Clone, Debug)]
pub struct ChainNode {
    id: ServerId,
    cfg: ChainConfig,
    ring: Option<Ring>,
    /// The store (the caller may read it; the node writes it).
    pub store: ModelStore,
    streams: BTreeMap<Key, Stream>,
    parked: VecDeque<(ServerId, ChainMsg)>,
    out: VecDeque<Command>,
    /// Counters.
    pub stats: ChainStats,
}

impl ChainNode {
    /// A node with no ring yet (it takes pushes once [`ChainNode::install_ring`] ran).
    pub fn new(id: ServerId, cfg: ChainConfig) -> Self {
        assert!(cfg.agg_max_pushes >= 1);
        ChainNode {
            id,
            cfg,
            ring: None,
            store: ModelStore::default(),
            streams: BTreeMap::new(),
            parked: VecDeque::new(),
            out: VecDeque::new(),
            stats: ChainStats::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> ServerId {
        self.id
    }

    /// The ring it holds.
    pub fn ring(&self) -> Option<&Ring> {
        self.ring.as_ref()
    }

    /// The ring epoch it holds (0 before the first).
    pub fn epoch(&self) -> u64 {
        self.ring.as_ref().map_or(0, Ring::epoch)
    }

    /// Whether it takes pushes for `key` now: head at its epoch and ready.
    pub fn is_ready_head(&self, key: Key) -> bool {
        self.stream_of(key).is_some_and(|s| s.is_head() && s.ready)
    }

    /// Whether it holds `key`'s range at its epoch (in the chain, and synced).
    pub fn holds(&self, key: Key) -> bool {
        self.stream_of(key).is_some_and(|s| s.synced)
    }

    /// Whether nothing is buffered, unacked or parked (the chain is settled here).
    pub fn is_quiet(&self) -> bool {
        self.parked.is_empty()
            && self.out.is_empty()
            && self.streams.values().all(|s| {
                s.agg_pushes.is_empty()
                    && s.unacked.is_empty()
                    && s.parked.is_empty()
                    && (!s.is_head() || s.ready)
                    && s.synced
            })
    }

    /// `(range, chain, synced, last seq)` for every stream: what the node reports to a
    /// restarted manager.
    pub fn report(&self) -> Vec<(KeyRange, Vec<ServerId>, bool, u64)> {
        self.streams
            .values()
            .map(|s| {
                let seq = if s.is_head() {
                    s.next_seq - 1
                } else {
                    s.applied
                };
                (s.range, s.chain.clone(), s.synced, seq)
            })
            .collect()
    }

    fn stream_of(&self, key: Key) -> Option<&Stream> {
        self.streams
            .range(..=key)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| s.range.contains(key))
    }

    fn stream_mut(&mut self, range: KeyRange) -> Option<&mut Stream> {
        self.streams
            .get_mut(&range.begin)
            .filter(|s| s.range == range)
    }

    /// Next command for the caller, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// When [`ChainNode::tick`] must run next (an aggregation window closes), if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.streams
            .values()
            .filter_map(|s| s.agg_since.map(|t| t + self.cfg.agg_window_ms))
            .min()
    }

    /// Install a newer ring, with the flip's handover plan (from the manager). The first
    /// ring is the bootstrap: every node starts empty and every chain is in sync.
    ///
    /// # Panics
    /// If `ring` is not newer than the ring held (epochs only grow).
    pub fn install_ring(&mut self, ring: Ring, plan: &[Handover]) {
        let old = self.ring.take();
        if let Some(o) = &old {
            assert!(
                ring.epoch() > o.epoch(),
                "server {}: ring epoch would go from {} to {}",
                self.id,
                o.epoch(),
                ring.epoch()
            );
        }
        let epoch = ring.epoch();
        // Keys whose updates may not have reached the whole old chain.
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        for s in self.streams.values() {
            dirty.extend(s.agg.keys().copied());
            for (keys, _) in s.unacked.values() {
                dirty.extend(keys.iter().copied());
            }
        }
        let moved = old
            .as_ref()
            .map(|o| Ring::diff(o, &ring, self.cfg.k))
            .unwrap_or_default();
        self.streams.clear();
        for (range, chain, pos) in ring.ranges_of(self.id, self.cfg.k) {
            let changed = moved.iter().any(|m| m.range.intersect(&range).is_some());
            let waiting = plan
                .iter()
                .filter(|h| h.to == self.id && range.covers(&h.range))
                .count();
            debug_assert!(pos > 0 || waiting == 0 || changed);
            let bootstrap = old.is_none();
            self.streams.insert(
                range.begin,
                Stream {
                    range,
                    chain,
                    pos,
                    ready: pos == 0 && waiting == 0,
                    waiting,
                    full: changed,
                    next_seq: 1,
                    agg: BTreeMap::new(),
                    agg_pushes: Vec::new(),
                    agg_since: None,
                    unacked: BTreeMap::new(),
                    acked: 0,
                    applied: 0,
                    parked: BTreeMap::new(),
                    synced: bootstrap || (pos == 0 && waiting == 0) || (pos > 0 && !changed),
                },
            );
        }
        self.ring = Some(ring);
        // Old holders hand pieces to new heads.
        for h in plan.iter().filter(|h| h.from == self.id) {
            let entries = self.store.snapshot(h.range);
            self.out.push_back(Command::Send {
                to: h.to,
                msg: ChainMsg::Handover {
                    epoch,
                    range: h.range,
                    entries,
                },
            });
        }
        // Ready heads start their streams.
        let ready: Vec<KeyRange> = self
            .streams
            .values()
            .filter(|s| s.is_head() && s.ready)
            .map(|s| s.range)
            .collect();
        for r in ready {
            self.start_stream(r, &dirty);
        }
        // Messages that came early for this epoch.
        let parked = std::mem::take(&mut self.parked);
        for (from, msg) in parked {
            self.handle(from, msg);
        }
    }

    /// A ready head sends the first update of its stream: a full snapshot when the chain
    /// changed, else the unacked keys (nothing at all when there are none).
    fn start_stream(&mut self, range: KeyRange, dirty: &BTreeSet<Key>) {
        let s = self.streams.get(&range.begin).expect("stream");
        debug_assert!(s.is_head() && s.ready && s.next_seq == 1);
        if s.chain.len() == 1 {
            return;
        }
        let entries = if s.full {
            self.store.snapshot(range)
        } else {
            let keys: Vec<Key> = dirty.range(range.begin..range.end).copied().collect();
            if keys.is_empty() {
                return;
            }
            self.store.entries(&keys)
        };
        self.send_update(
            range,
            Payload {
                entries,
                pushes: Vec::new(),
            },
        );
    }

    fn send_update(&mut self, range: KeyRange, payload: Payload) {
        let epoch = self.epoch();
        let s = self.streams.get_mut(&range.begin).expect("stream");
        assert!(s.is_head() && s.chain.len() > 1);
        let seq = s.next_seq;
        s.next_seq += 1;
        let keys = payload.entries.iter().map(|e| e.key).collect();
        let prev = s.unacked.insert(seq, (keys, payload.pushes.clone()));
        assert!(prev.is_none(), "seq {seq} sent twice on {range}");
        self.stats.forwards += 1;
        self.stats.forward_bytes += payload.value_bytes() as u64;
        self.out.push_back(Command::Send {
            to: s.chain[1],
            msg: ChainMsg::Forward {
                epoch,
                range,
                seq,
                payload,
            },
        });
    }

    /// A worker push of `deltas` to `keys` (sorted, all in one owned range), routed with
    /// `epoch`. Taken (applied, buffered, acked later through [`Command::AckToWorker`]) or
    /// answered with [`Command::Reply`].
    pub fn push(&mut self, now: u64, push: PushId, epoch: u64, keys: &[Key], deltas: &[f32]) {
        assert_eq!(keys.len(), deltas.len());
        let Some(ring) = &self.ring else {
            self.out.push_back(Command::Reply {
                push,
                reply: PushReply::Busy,
            });
            return;
        };
        let (Some(&first), Some(&last)) = (keys.first(), keys.last()) else {
            return;
        };
        match ring.route_check(self.id, epoch, first) {
            Route::Ok => {}
            Route::Redirect(r) => {
                self.out.push_back(Command::Reply {
                    push,
                    reply: PushReply::Redirect(r),
                });
                return;
            }
            Route::Behind { .. } => {
                self.out.push_back(Command::Reply {
                    push,
                    reply: PushReply::Busy,
                });
                return;
            }
        }
        let range = ring.range_of(first);
        if !range.contains(last) {
            // Spans two owned ranges: the worker split it with another ring.
            let r = Box::new(ring.clone());
            self.out.push_back(Command::Reply {
                push,
                reply: PushReply::Redirect(r),
            });
            return;
        }
        let s = self.streams.get(&range.begin).expect("head has a stream");
        if !s.ready {
            self.out.push_back(Command::Reply {
                push,
                reply: PushReply::Busy,
            });
            return;
        }
        self.stats.pushes += 1;
        let single = s.chain.len() == 1;
        let mut fresh = Vec::new();
        for (&k, &d) in keys.iter().zip(deltas) {
            debug_assert!(range.contains(k));
            if self.store.apply_push(push, k, d) {
                fresh.push(k);
            }
        }
        if single {
            self.out.push_back(Command::AckToWorker { push, range });
            return;
        }
        let s = self.streams.get_mut(&range.begin).expect("stream");
        for k in fresh {
            s.agg.entry(k).or_default().push(push);
        }
        s.agg_pushes.push(push);
        s.agg_since.get_or_insert(now);
        if s.agg_pushes.len() >= self.cfg.agg_max_pushes {
            self.flush(range);
        }
    }

    fn flush(&mut self, range: KeyRange) {
        let s = self.streams.get_mut(&range.begin).expect("stream");
        if s.agg_pushes.is_empty() {
            return;
        }
        let agg = std::mem::take(&mut s.agg);
        let pushes = std::mem::take(&mut s.agg_pushes);
        s.agg_since = None;
        let entries = agg
            .into_iter()
            .map(|(key, pushes)| Entry {
                key,
                value: self.store.value(key),
                pushes,
            })
            .collect();
        self.send_update(range, Payload { entries, pushes });
    }

    /// Time passed: forward every range whose aggregation window closed.
    pub fn tick(&mut self, now: u64) {
        let due: Vec<KeyRange> = self
            .streams
            .values()
            .filter(|s| {
                s.agg_since
                    .is_some_and(|t| now >= t + self.cfg.agg_window_ms)
            })
            .map(|s| s.range)
            .collect();
        for r in due {
            self.flush(r);
        }
    }

    /// Forward everything buffered now (e.g. before a graceful leave).
    pub fn flush_all(&mut self) {
        let all: Vec<KeyRange> = self.streams.values().map(|s| s.range).collect();
        for r in all {
            self.flush(r);
        }
    }

    /// A replication message from server `from`.
    pub fn handle(&mut self, from: ServerId, msg: ChainMsg) {
        let epoch = self.epoch();
        if msg.epoch() < epoch {
            self.stats.stale += 1;
            return;
        }
        if msg.epoch() > epoch {
            assert!(
                self.parked.len() < self.cfg.park_max,
                "server {}: more than {} messages parked for future epochs",
                self.id,
                self.cfg.park_max
            );
            self.parked.push_back((from, msg));
            return;
        }
        match msg {
            ChainMsg::Forward {
                range,
                seq,
                payload,
                ..
            } => self.on_forward(from, range, seq, payload),
            ChainMsg::AckUp { range, seq, .. } => self.on_ack(from, range, seq),
            ChainMsg::Handover { range, entries, .. } => {
                let Some(s) = self.streams.values_mut().find(|s| s.range.covers(&range)) else {
                    return;
                };
                if !s.is_head() || s.ready || s.waiting == 0 {
                    return;
                }
                for e in &entries {
                    debug_assert!(range.contains(e.key));
                    self.store.install(e);
                }
                let s = self
                    .streams
                    .values_mut()
                    .find(|s| s.range.covers(&range))
                    .expect("stream");
                s.waiting -= 1;
                if s.waiting == 0 {
                    s.ready = true;
                    s.synced = true;
                    let r = s.range;
                    self.start_stream(r, &BTreeSet::new());
                }
            }
            ChainMsg::CopyData { .. } => unreachable!("pre-copies target a newer epoch"),
        }
    }

    /// A pre-copy for the flip to `epoch`, sent by `from` (see [`ChainNode::start_copy`]).
    /// Taken only while this node is still before that epoch.
    pub fn handle_copy(&mut self, epoch: u64, range: KeyRange, entries: &[Entry]) {
        if self.epoch() >= epoch {
            return;
        }
        for e in entries {
            self.store.install(e);
        }
        self.out.push_back(Command::CopyDone { epoch, range });
    }

    /// The manager asks this node to pre-copy `range` to `to` for the flip to `epoch`.
    pub fn start_copy(&mut self, to: ServerId, epoch: u64, range: KeyRange) {
        let entries = self.store.snapshot(range);
        self.out.push_back(Command::Send {
            to,
            msg: ChainMsg::CopyData {
                epoch,
                range,
                entries,
            },
        });
    }

    fn on_forward(&mut self, from: ServerId, range: KeyRange, seq: u64, payload: Payload) {
        let epoch = self.epoch();
        let park_max = self.cfg.park_max;
        let Some(s) = self.stream_mut(range) else {
            return;
        };
        if s.pos == 0 || s.chain[s.pos - 1] != from {
            return; // not our predecessor: a confused peer; ignore
        }
        if seq <= s.applied {
            let tail_ack = s.is_tail().then(|| (s.chain[s.pos - 1], s.applied));
            self.stats.duplicates += 1;
            if let Some((to, applied)) = tail_ack {
                self.out.push_back(Command::Send {
                    to,
                    msg: ChainMsg::AckUp {
                        epoch,
                        range,
                        seq: applied,
                    },
                });
            }
            return;
        }
        if seq > s.applied + 1 {
            assert!(
                s.parked.len() < park_max,
                "too many early updates on {range}"
            );
            s.parked.insert(seq, payload);
            return;
        }
        let mut next = Some(payload);
        while let Some(p) = next {
            let s = self.stream_mut(range).expect("stream");
            s.applied += 1;
            s.synced = true;
            let seq = s.applied;
            for e in &p.entries {
                debug_assert!(range.contains(e.key));
                self.store.install(e);
            }
            let s = self.stream_mut(range).expect("stream");
            if s.is_tail() {
                let to = s.chain[s.pos - 1];
                self.out.push_back(Command::Send {
                    to,
                    msg: ChainMsg::AckUp { epoch, range, seq },
                });
            } else {
                let to = s.chain[s.pos + 1];
                let keys = p.entries.iter().map(|e| e.key).collect();
                s.unacked.insert(seq, (keys, p.pushes.clone()));
                self.stats.forwards += 1;
                self.stats.forward_bytes += p.value_bytes() as u64;
                self.out.push_back(Command::Send {
                    to,
                    msg: ChainMsg::Forward {
                        epoch,
                        range,
                        seq,
                        payload: p,
                    },
                });
            }
            let s = self.stream_mut(range).expect("stream");
            next = s.parked.remove(&(seq + 1));
        }
    }

    fn on_ack(&mut self, from: ServerId, range: KeyRange, seq: u64) {
        let epoch = self.epoch();
        let Some(s) = self.stream_mut(range) else {
            return;
        };
        if s.is_tail() || s.chain[s.pos + 1] != from || seq <= s.acked {
            return;
        }
        assert!(
            seq <= s.unacked.keys().next_back().copied().unwrap_or(0),
            "ack of seq {seq} never sent on {range}"
        );
        s.acked = seq;
        let rest = s.unacked.split_off(&(seq + 1));
        let done = std::mem::replace(&mut s.unacked, rest);
        if s.is_head() {
            for (_, (_, pushes)) in done {
                for push in pushes {
                    self.out.push_back(Command::AckToWorker { push, range });
                }
            }
        } else {
            let to = s.chain[s.pos - 1];
            self.out.push_back(Command::Send {
                to,
                msg: ChainMsg::AckUp { epoch, range, seq },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deliver every command between nodes until nothing moves; returns worker acks.
    fn settle(nodes: &mut [ChainNode]) -> Vec<(PushId, KeyRange)> {
        let mut acks = Vec::new();
        loop {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some(c) = nodes[i].poll_command() {
                    moved = true;
                    let from = nodes[i].id();
                    match c {
                        Command::Send { to, msg } => {
                            let n = nodes.iter_mut().find(|n| n.id() == to).unwrap();
                            match msg {
                                ChainMsg::CopyData {
                                    epoch,
                                    range,
                                    entries,
                                } => n.handle_copy(epoch, range, &entries),
                                m => n.handle(from, m),
                            }
                        }
                        Command::AckToWorker { push, range } => acks.push((push, range)),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            if !moved {
                return acks;
            }
        }
    }

    fn cluster(n: u32, k: usize, agg: usize) -> (Ring, Vec<ChainNode>) {
        let ids: Vec<u32> = (0..n).collect();
        let ring = Ring::new(&ids, 8);
        let cfg = ChainConfig {
            k,
            agg_max_pushes: agg,
            agg_window_ms: 5,
            ..ChainConfig::default()
        };
        let mut nodes: Vec<ChainNode> = ids
            .iter()
            .map(|&i| ChainNode::new(i, cfg.clone()))
            .collect();
        for n in &mut nodes {
            n.install_ring(ring.clone(), &[]);
        }
        (ring, nodes)
    }

    #[test]
    fn push_is_acked_only_after_the_tail_has_it() {
        let (ring, mut nodes) = cluster(3, 2, 1);
        let key = 42;
        let chain = ring.chain(key, 2);
        let head = chain[0] as usize;
        let p = PushId { worker: 0, id: 1 };
        nodes[head].push(0, p, 1, &[key], &[1.5]);
        // Step by step: the ack appears only once the forward went all the way down.
        let c = nodes[head].poll_command().unwrap();
        assert!(matches!(
            c,
            Command::Send {
                msg: ChainMsg::Forward { seq: 1, .. },
                ..
            }
        ));
        nodes[head].out.push_front(c);
        let acks = settle(&mut nodes);
        assert_eq!(acks, vec![(p, ring.range_of(key))]);
        for &s in &chain {
            assert_eq!(nodes[s as usize].store.value(key), 1.5);
            assert!(nodes[s as usize].store.has(key, p));
        }
        // A retried push is recognised and acked again without a second apply.
        nodes[head].push(1, p, 1, &[key], &[1.5]);
        assert_eq!(settle(&mut nodes).len(), 1);
        assert_eq!(nodes[chain[2] as usize].store.value(key), 1.5);
    }

    #[test]
    fn stale_epoch_and_wrong_head_are_redirected() {
        let (ring, mut nodes) = cluster(3, 1, 1);
        let key = 7;
        let head = ring.owner(key);
        let other = (head + 1) % 3;
        let p = PushId { worker: 1, id: 1 };
        nodes[other as usize].push(0, p, 1, &[key], &[1.0]);
        assert!(matches!(
            nodes[other as usize].poll_command(),
            Some(Command::Reply {
                reply: PushReply::Redirect(_),
                ..
            })
        ));
        nodes[head as usize].push(0, p, 9, &[key], &[1.0]);
        assert_eq!(
            nodes[head as usize].poll_command(),
            Some(Command::Reply {
                push: p,
                reply: PushReply::Busy
            })
        );
        assert_eq!(nodes[head as usize].store.value(key), 0.0);
    }

    #[test]
    fn duplicates_and_gaps_are_handled_in_order() {
        let (ring, mut nodes) = cluster(2, 1, 1);
        let key = 99;
        let chain = ring.chain(key, 1);
        let (h, t) = (chain[0] as usize, chain[1] as usize);
        let mut fwd = Vec::new();
        for i in 1..=3 {
            nodes[h].push(0, PushId { worker: 0, id: i }, 1, &[key], &[1.0]);
            match nodes[h].poll_command().unwrap() {
                Command::Send { msg, .. } => fwd.push(msg),
                c => panic!("{c:?}"),
            }
        }
        // Deliver 3, 1, 1 (duplicate), 2.
        let from = chain[0];
        nodes[t].handle(from, fwd[2].clone());
        assert_eq!(
            nodes[t].store.value(key),
            0.0,
            "seq 3 applied before 1 and 2"
        );
        nodes[t].handle(from, fwd[0].clone());
        nodes[t].handle(from, fwd[0].clone());
        assert_eq!(nodes[t].stats.duplicates, 1);
        nodes[t].handle(from, fwd[1].clone());
        assert_eq!(nodes[t].store.value(key), 3.0);
        let acks = settle(&mut nodes);
        assert_eq!(acks.len(), 3);
    }

    /// Replication saving: n workers pushing to the same range; with and without
    /// aggregation. Prints the figures.
    #[test]
    fn aggregation_saving() {
        let mut figures = Vec::new();
        for agg in [1usize, 4, 16, 64] {
            let (ring, mut nodes) = cluster(3, 2, agg);
            let range = ring.ranges(2)[3].0;
            let head = ring.owner(range.begin) as usize;
            let keys: Vec<Key> = (0..32).map(|i| range.begin + i).collect();
            let pushes = 256u64;
            for i in 0..pushes {
                let w = (i % 8) as u32;
                // Each push touches 8 of the 32 keys.
                let off = (i as usize * 5) % 24;
                let ks = &keys[off..off + 8];
                nodes[head].push(i, PushId { worker: w, id: i }, 1, ks, &[1.0; 8]);
                settle(&mut nodes);
            }
            nodes[head].tick(u64::MAX / 2);
            let acks = settle(&mut nodes);
            let _ = acks;
            let s = &nodes[head].stats;
            let per_push_msgs = s.forwards as f64 / pushes as f64;
            let per_push_bytes = s.forward_bytes as f64 / pushes as f64;
            println!(
                "aggregation saving: agg_max_pushes={agg:3} head forwards/push={per_push_msgs:.3} value bytes/push={per_push_bytes:.1} (k=2: x2 along the chain)"
            );
            figures.push((agg, per_push_msgs, per_push_bytes));
            let tail = ring.chain(range.begin, 2)[2] as usize;
            for &k in &keys {
                assert_eq!(nodes[tail].store.value(k), nodes[head].store.value(k));
            }
        }
        assert!(figures[2].1 < figures[0].1 / 8.0);
        assert!(figures[2].2 < figures[0].2);
    }
}
