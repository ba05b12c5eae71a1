//! The driver of the replication core on a server: locks, connections, the clock, the
//! window flusher thread and the push answers. All decisions are the core's
//! ([`ReplicationCore`]); this file only feeds it and carries out its [`Output`]s.
//!
//! Lock order (take them in this order, never the other way round):
//!
//! 1. the server's routing table (`Ready::table`, read or write)
//! 2. [`Replicator::apply_gate`] (shared by applies, exclusive by flushes and table
//!    changes)
//! 3. [`Replicator::core`]
//! 4. `peers` (read to send; written only by `add_peer`, which takes nothing else)
//! 5. `undelivered`, then `answers` (leaf locks: nothing is taken while holding them)
//!
//! Sends to other servers are made while the core is locked, so that batches of one
//! chain leave in the order the core made them; push answers go out after it is
//! unlocked. Debug builds check the order of 2 and 3 ([`LockOrder`]).

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use pserv_transport::{Conn, OutFrame};

use crate::placement::Partition;
use crate::proto::{Control, ReplicaBatch};

use super::core::{Output, ReplicationCore};
use super::entries::EntryStore;
use super::{AnswerId, HeldPart, KeysRef, ReplicationConfig, ReplicationStats};

thread_local! {
    /// Whether this thread holds the core lock (debug builds check the lock order).
    static HOLDS_CORE: Cell<bool> = const { Cell::new(false) };
}

/// Debug-build check of the lock order: the apply gate is never taken while the core
/// is held.
struct LockOrder;

impl LockOrder {
    fn gate() {
        debug_assert!(
            !HOLDS_CORE.with(Cell::get),
            "lock order: the apply gate is taken before the replication core, never after"
        );
    }
}

/// The core, locked; clears the lock-order mark when dropped.
struct CoreGuard<'a>(MutexGuard<'a, ReplicationCore>);

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        HOLDS_CORE.with(|h| h.set(false));
    }
}

impl std::ops::Deref for CoreGuard<'_> {
    type Target = ReplicationCore;
    fn deref(&self) -> &ReplicationCore {
        &self.0
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut ReplicationCore {
        &mut self.0
    }
}

/// A push's answer, waiting for replication.
enum Waiting {
    /// A frame for the worker's connection (a push over TCP).
    Frame(Conn, OutFrame),
    /// A call that acknowledges it (a one-sided push: its done word).
    Call(Box<dyn FnOnce() + Send>),
}

/// A write being applied on this server (see [`Replicator::begin_write`]): under group
/// commit the last one to end sends every pending batch, so pushes applied at the same
/// time share a batch and none waits for the window's timer.
pub(crate) struct Writing<'a> {
    repl: &'a Replicator,
    open: bool,
}

impl Writing<'_> {
    /// Stop counting this write. Under group commit on a loop, mark the turn's batches for
    /// its end (they were queued before the flag is set, so the turn's end that sees it
    /// sends them). Returns whether the caller sends the pending batches itself: under
    /// group commit off a loop, when this was the last write in progress.
    fn leave(&mut self) -> bool {
        self.open = false;
        let last = self.repl.writers.fetch_sub(1, Ordering::AcqRel) == 1;
        if !self.repl.group_commit {
            return false;
        }
        if pserv_transport::tcp::on_loop_thread() {
            self.repl.turn_pending.store(true, Ordering::Release);
            return false;
        }
        last
    }

    /// The write's `applying` guard is dropped: send the batches it found full and, when
    /// [`leave`](Self::leave) says so, every pending batch (what the writes that ended
    /// meanwhile queued, this one's included).
    pub(crate) fn end(mut self, store: &dyn EntryStore, epoch: u64, full: Vec<Vec<u32>>) {
        let send_pending = self.leave();
        self.repl.flush_chains(store, epoch, full);
        if send_pending {
            self.repl.flush_due(store, epoch, true);
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        // A write that ended without `end` (refused): what the others queued while it ran
        // is sent at the end of this loop's turn, or (off a loop, if it was the last) by
        // the flusher (a zero window makes it all due).
        if self.open && self.leave() {
            let _ = self.repl.kick.send(());
        }
    }
}

/// The replication side of one server.
pub(crate) struct Replicator {
    /// This server's node id (the sender of its messages).
    node_id: u32,
    core: Mutex<ReplicationCore>,
    /// Applies hold it shared from the store update until their push is queued; a flush
    /// holds it exclusively while it reads values: the values a batch carries are then
    /// exactly those of the pushes it lists (a push applied but not listed would be
    /// applied again when resent after a failover).
    apply_gate: RwLock<()>,
    /// Outgoing connections to the other servers, by rank.
    peers: RwLock<Vec<Option<Conn>>>,
    /// Messages for servers not connected yet (a server that joined: its address comes
    /// with a control message that may arrive after a batch to forward to it).
    undelivered: Mutex<HashMap<u32, Vec<Control>>>,
    /// Answers waiting for replication, by id.
    answers: Mutex<HashMap<AnswerId, Waiting>>,
    next_answer: AtomicU64,
    /// Whether ranges taken over at the current epoch exist (a fast path for every push).
    has_inherited: AtomicBool,
    /// Whether ranges taken over still wait for a previous head's hand-off (a fast path
    /// for every request).
    gated: AtomicBool,
    /// Called with the epoch once a table change's copies are all acknowledged.
    synced: Box<dyn Fn(u64) + Send + Sync>,
    /// Writes (pushes) being applied now, counted by [`Writing`] (group commit).
    writers: AtomicUsize,
    /// [`ReplicationConfig::group_commit`] with a zero window: a write on an event loop
    /// leaves its batch to the end of the loop's turn ([`end_of_turn`](Self::end_of_turn));
    /// elsewhere the last write to end sends the pending batches.
    group_commit: bool,
    /// A write on a loop queued a push since the last end of a turn (group commit).
    turn_pending: AtomicBool,
    /// Wakes the window flusher when a batch starts waiting.
    kick: crossbeam_channel::Sender<()>,
    kicked: crossbeam_channel::Receiver<()>,
    /// The origin of the core's clock.
    epoch_of_time: Instant,
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
        let reachable: BTreeSet<u32> = peers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| !c.is_closed()))
            .map(|(r, _)| r as u32)
            .collect();
        Replicator {
            node_id,
            writers: AtomicUsize::new(0),
            turn_pending: AtomicBool::new(false),
            group_commit: cfg.group_commit && cfg.window.is_zero() && cfg.max_pushes > 1,
            core: Mutex::new(ReplicationCore::new(rank, cfg, reachable)),
            apply_gate: RwLock::new(()),
            peers: RwLock::new(peers),
            undelivered: Mutex::new(HashMap::new()),
            answers: Mutex::new(HashMap::new()),
            next_answer: AtomicU64::new(1),
            has_inherited: AtomicBool::new(false),
            gated: AtomicBool::new(false),
            synced,
            kick,
            kicked,
            epoch_of_time: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.epoch_of_time.elapsed()
    }

    fn lock(&self) -> CoreGuard<'_> {
        let g = self.core.lock();
        HOLDS_CORE.with(|h| h.set(true));
        CoreGuard(g)
    }

    fn gate_write(&self) -> RwLockWriteGuard<'_, ()> {
        LockOrder::gate();
        self.apply_gate.write()
    }

    /// Carry out the sends now (the core is locked, so they leave in order); keep the
    /// rest for [`finish`](Self::finish).
    fn send_now(&self, out: &mut Vec<Output>) {
        out.retain(|o| match o {
            Output::Send { to, msg } => {
                self.send_to(*to, msg);
                false
            }
            _ => true,
        });
    }

    /// Carry out answers and sync reports (after the core is unlocked).
    fn finish(&self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Answer(id) => {
                    let answer = self.answers.lock().remove(&id);
                    if let Some(Waiting::Frame(conn, frame)) = answer {
                        // A failed send: the worker is gone; it will resend to whoever
                        // heads then.
                        let _ = conn.send(frame);
                    } else if let Some(Waiting::Call(done)) = answer {
                        done();
                    } else {
                        debug_assert!(false, "answer {id:?} released twice or never queued");
                    }
                }
                Output::Synced(epoch) => (self.synced)(epoch),
                Output::Send { .. } => unreachable!("sends are carried out under the lock"),
            }
        }
    }

    /// Run `f` on the locked core, then carry out what it asked for.
    fn drive<R>(&self, f: impl FnOnce(&mut ReplicationCore, &mut Vec<Output>) -> R) -> R {
        let mut out = Vec::new();
        let r = {
            let mut core = self.lock();
            let r = f(&mut core, &mut out);
            self.send_now(&mut out);
            r
        };
        self.finish(out);
        r
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

    /// Counters.
    pub(crate) fn stats(&self) -> ReplicationStats {
        self.lock().stats()
    }

    /// How much of push (sender, ts) with these keys was applied here already (as head or
    /// replica): what is held must not be applied again.
    pub(crate) fn held(&self, sender: u32, ts: u64, keys: KeysRef<'_>) -> HeldPart {
        self.lock().held(sender, ts, keys)
    }

    /// A write begins: take this before [`applying`](Self::applying) and end it with
    /// [`Writing::end`] once that guard is dropped (dropped unended, on a refusal, it only
    /// stops counting).
    pub(crate) fn begin_write(&self) -> Writing<'_> {
        self.writers.fetch_add(1, Ordering::AcqRel);
        Writing {
            repl: self,
            open: true,
        }
    }

    /// An event loop ended a turn: under group commit, send every pending batch if a write
    /// of a loop queued a push since the last time (`epoch`: the routing table's, read
    /// only then).
    pub(crate) fn end_of_turn(&self, store: &dyn EntryStore, epoch: impl FnOnce() -> u64) {
        if self.group_commit && self.turn_pending.swap(false, Ordering::AcqRel) {
            let epoch = epoch();
            self.flush_due(store, epoch, true);
        }
    }

    /// Hold while applying a push and queueing it ([`after_apply`](Self::after_apply)).
    pub(crate) fn applying(&self) -> RwLockReadGuard<'_, ()> {
        LockOrder::gate();
        self.apply_gate.read()
    }

    /// Send the batches of these chains now (what [`after_apply`](Self::after_apply)
    /// returned), after the `applying` guard was dropped.
    pub(crate) fn flush_chains(&self, store: &dyn EntryStore, epoch: u64, chains: Vec<Vec<u32>>) {
        if chains.is_empty() {
            return;
        }
        let _gate = self.gate_write();
        let now = self.now();
        self.drive(|core, out| core.flush_chains(store, epoch, chains, now, out));
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
        self.queue_answer(
            table,
            sender,
            ts,
            keys,
            Waiting::Frame(conn.clone(), answer),
        )
    }

    /// [`after_apply`](Self::after_apply) for a push answered by a call (a one-sided
    /// push: `done` writes its done word) rather than a frame.
    pub(crate) fn after_apply_with(
        &self,
        table: &Partition,
        sender: u32,
        ts: u64,
        keys: KeysRef<'_>,
        done: Box<dyn FnOnce() + Send>,
    ) -> Vec<Vec<u32>> {
        self.queue_answer(table, sender, ts, keys, Waiting::Call(done))
    }

    fn queue_answer(
        &self,
        table: &Partition,
        sender: u32,
        ts: u64,
        keys: KeysRef<'_>,
        answer: Waiting,
    ) -> Vec<Vec<u32>> {
        let id = AnswerId(self.next_answer.fetch_add(1, Ordering::Relaxed));
        self.answers.lock().insert(id, answer);
        let now = self.now();
        let q = self.drive(|core, out| core.after_apply(table, sender, ts, keys, id, now, out));
        if q.armed && !self.group_commit {
            let _ = self.kick.send(());
        }
        q.full
    }

    /// Send every pending batch whose oldest push waited the window (all with `all`).
    /// Returns how long until the next one is due, if any waits.
    pub(crate) fn flush_due(
        &self,
        store: &dyn EntryStore,
        epoch: u64,
        all: bool,
    ) -> Option<Duration> {
        let _gate = self.gate_write();
        let now = self.now();
        self.drive(|core, out| core.flush_due(store, epoch, all, now, out))
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

    /// Replication not yet acknowledged: (batches, pushes waiting, age of the oldest).
    pub(crate) fn lag(&self) -> (u64, u64, Duration) {
        let now = self.now();
        self.lock().lag(now)
    }

    /// Whether nothing waits for replication and every message to the other servers
    /// left (a server that stops waits for this).
    pub(crate) fn idle(&self) -> bool {
        self.lock().idle()
            && self
                .peers
                .read()
                .iter()
                .flatten()
                .all(|c| c.is_closed() || c.queued_bytes() == 0)
    }

    /// The connection to server `rank`, if any.
    pub(crate) fn peer(&self, rank: u32) -> Option<Conn> {
        self.peers.read().get(rank as usize).and_then(Option::clone)
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
        {
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
        self.lock().peer_up(rank);
    }

    /// The tail acknowledged batch `seq`.
    pub(crate) fn on_ack(&self, seq: u64) {
        self.drive(|core, out| core.on_ack(seq, out));
    }

    /// A batch from a head (or the replica before this one): install it, remember its
    /// pushes, and forward it down the chain or, as the tail, acknowledge it to the head.
    pub(crate) fn on_batch(&self, store: &dyn EntryStore, batch: Box<ReplicaBatch>) {
        self.drive(|core, out| core.on_batch(store, batch, out));
    }

    /// Before the table switches from `old` to `new` (under the table's write lock, so
    /// no push of the new epoch is applied yet): start noting the keys this server applies
    /// in the ranges it takes over.
    pub(crate) fn prepare_table(&self, old: &Partition, new: &Partition) {
        let (inherited, gated) = self.lock().prepare_table(old, new);
        self.has_inherited.store(inherited, Ordering::Release);
        self.gated.store(gated, Ordering::Release);
    }

    /// Whether a request on `keys` must wait: they lie in ranges this server took over
    /// at the current epoch, and a previous head of those (still reachable) has not
    /// handed over yet. Returns that head's rank.
    pub(crate) fn handoff_pending(&self, keys: KeysRef<'_>) -> Option<u32> {
        if !self.gated.load(Ordering::Acquire) {
            return None;
        }
        let (pending, still) = self.lock().handoff_pending(keys);
        if !still {
            self.gated.store(false, Ordering::Release);
        }
        pending
    }

    /// A push of routing epoch `epoch` on `keys` is about to be applied here as head:
    /// note the keys inside ranges taken over at this epoch.
    pub(crate) fn note_apply(&self, epoch: u64, keys: KeysRef<'_>) {
        if !self.has_inherited.load(Ordering::Acquire) {
            return;
        }
        self.lock().note_apply(epoch, keys);
    }

    /// The routing table changed from `old` to `new`: re-queue everything not yet
    /// acknowledged under the new chains (their answers wait for the new replicas), and
    /// copy whole ranges to replicas that are new in a chain this server heads.
    pub(crate) fn on_table(&self, store: &dyn EntryStore, old: &Partition, new: &Partition) {
        let _gate = self.gate_write();
        let now = self.now();
        self.drive(|core, out| core.on_table(store, old, new, now, out));
    }

    /// The connection to server `rank` closed: batches on chains through it are
    /// regrouped under `table` (its replacement gets them once the table says who).
    pub(crate) fn peer_lost(&self, store: &dyn EntryStore, table: &Partition, rank: u32) {
        let _gate = self.gate_write();
        let now = self.now();
        self.drive(|core, out| core.peer_lost(store, table, rank, now, out));
    }
}
