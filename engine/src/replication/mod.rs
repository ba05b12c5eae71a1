//! Chain replication between server processes, with replication after aggregation.
//!
//! The routing table ([`Partition`]) gives every key range a chain: its head (owner), then
//! `k` replicas. Workers push to the head only. The head applies a push to its store, then
//! remembers the touched keys (or dense ranges) in a *pending batch* per downstream chain;
//! the push's answer waits. A batch is sent when it holds `max_pushes` pushes or when its
//! oldest push waited `window` (0: at once; with `group_commit`, the servers' default, at
//! the end of the event loop's turn that applied it, so the pushes of one turn share a
//! batch and none waits for a timer): the head reads the *current values* of the
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
//!
//! Layout: [`core`] is the state machine (no I/O, no locks, no clock: the simulation
//! drives it as it is); [`driver`] runs it on a server (locks, connections, the window
//! flusher, push answers); [`batch`], [`memory`] and [`fresh`] are its parts;
//! [`entries`] reads and installs store entries as bytes.
//!
//! Invariant: a push is answered only once the tail of every chain it touched
//! acknowledged a batch listing it; a batch carries exactly the values of the pushes it
//! lists; a resent push is applied only where it is not held.

mod batch;
pub(crate) mod core;
mod driver;
pub(crate) mod entries;
mod fresh;
mod memory;

use std::time::Duration;

use crate::base::keys::{Key, KeyRange};

pub(crate) use driver::Replicator;
pub(crate) use entries::EntryStore;
pub use memory::SEEN_CAP;

/// How a head batches replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Send a batch once it holds this many pushes (1: no aggregation).
    pub max_pushes: usize,
    /// Send a batch once its oldest push waited this long (zero: at once).
    pub window: Duration,
    /// With a zero `window` (and `max_pushes` above 1): rather than each push's batch at
    /// once, send the pending batches when the last of the writes being applied on this
    /// server at the same time ends (group commit). Pushes applied together share one
    /// batch; none waits for a timer. The driver counts the writes; the core only stops
    /// calling a zero-window batch full.
    pub group_commit: bool,
    /// Remember every push applied (the exactly-once memory), also without replicas: a
    /// job that replaces failed workers redoes their unacknowledged pushes, and a server
    /// that holds one already must not apply it again.
    pub remember_all: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            max_pushes: 32,
            window: Duration::from_micros(200),
            group_commit: false,
            remember_all: false,
        }
    }
}

/// A push answer waiting for replication, as the core knows it (the driver keeps the
/// answer itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AnswerId(pub(crate) u64);

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

/// What a replica does with a [`Control::Replicate`](crate::proto::Control::Replicate)
/// batch from a peer, on `store` and a replication state of its own: the late-batch check
/// (against ranges it took over at table `taken_over.0`, with keys `taken_over.1` applied
/// in ranges `taken_over.2`, when given), installing every part, recording its pushes,
/// then forwarding it or acknowledging it. Returns the messages it would send, with the
/// rank of their receiver. The server's handler runs the same code on every batch it
/// receives; this entry is public for the fuzz target `replica_batch` (and tests): no
/// batch, however malformed, may panic it.
pub fn receive_batch<T: crate::value::Value>(
    store: &crate::store::Store<T>,
    batch: Box<crate::proto::ReplicaBatch>,
    taken_over: Option<(u64, &[Key], Vec<KeyRange>)>,
) -> Vec<(u32, crate::proto::Control)> {
    let mut core = core::ReplicationCore::new(0, ReplicationConfig::default(), Default::default());
    if let Some((epoch, keys, ranges)) = taken_over {
        core.set_taken_over(epoch, keys, ranges);
    }
    let mut out = Vec::new();
    core.on_batch(store, batch, &mut out);
    out.into_iter()
        .filter_map(|o| match o {
            core::Output::Send { to, msg } => Some((to, msg)),
            _ => None,
        })
        .collect()
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
