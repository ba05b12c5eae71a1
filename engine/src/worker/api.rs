//! The [`Worker`] handle and what it tells about itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use pserv_transport::TcpTransport;

use crate::consistency::Consistency;
use crate::onesided::ClientOneSided;
use crate::placement::Partition;
use crate::proto::{ClusterInfo, Control};

use super::retry::Retrier;
use super::state::Core;

/// A worker node: the handle training code pushes and pulls through.
pub struct Worker {
    pub(super) core: Arc<Core>,
    /// Resends failed segments; stops when the worker is dropped (before the transport,
    /// whose closing connections must not look like a failed scheduler).
    pub(super) _retrier: Retrier,
    pub(super) node_id: u32,
    pub(super) rank: u32,
    pub(super) cluster: ClusterInfo,
    pub(super) control: Receiver<Control>,
    pub(super) clock: AtomicU64,
    pub(super) consistency: Consistency,
    pub(super) barrier_seq: AtomicU64,
    pub(super) spin: Duration,
    pub(super) timeout: Duration,
    pub(super) transport: TcpTransport,
    pub(super) onesided: Option<ClientOneSided>,
    /// For a replacement: where it takes over from the failed worker.
    pub(super) resume: Option<Box<crate::proto::Resume>>,
}

impl Worker {
    /// This worker's rank among workers.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// For a worker that replaced a failed one (`WorkerConfig::replace`): the newest
    /// barrier released, its live workers and clock, and the clock up to which the
    /// failed worker's pushes are applied on every server.
    pub fn resume(&self) -> Option<&crate::proto::Resume> {
        self.resume.as_deref()
    }

    /// Whether this worker was asked to leave gracefully (`pserv leave --worker`, or
    /// [`leave_flag`](Self::leave_flag) set by a signal handler).
    pub fn leave_asked(&self) -> bool {
        self.core.leave.load(Ordering::Acquire)
    }

    /// The flag [`leave_asked`](Self::leave_asked) reads: a SIGTERM handler sets it.
    pub fn leave_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.core.leave.clone()
    }

    /// This worker's node id.
    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    /// The cluster table as the scheduler's welcome gave it (its `partition` is the
    /// first routing table; see [`table`](Self::table) for the current one).
    pub fn cluster(&self) -> &ClusterInfo {
        &self.cluster
    }

    /// The routing table requests are split by now: the welcome's, or a newer one the
    /// scheduler sent after a server failed, joined or left (requests routed with an
    /// older one are resent by this worker).
    pub fn table(&self) -> Arc<Partition> {
        self.core.table()
    }

    /// Number of workers in the cluster.
    pub fn num_workers(&self) -> u32 {
        self.cluster.workers
    }

    /// Values per key.
    pub fn value_len(&self) -> usize {
        self.cluster.value_len as usize
    }

    /// What key caching did so far (None: off; see [`crate::keycache`]).
    pub fn key_cache_stats(&self) -> Option<crate::keycache::SentStats> {
        self.core.sent_lists.as_ref().map(|l| l.stats())
    }

    /// The transport's counters: bytes, frames, and what value compression did.
    pub fn transport_stats(&self) -> &pserv_transport::tcp::Stats {
        self.transport.stats()
    }

    /// Bytes written to and read from sockets so far.
    pub fn traffic(&self) -> (u64, u64) {
        let s = self.transport.stats();
        (
            s.bytes_sent.load(Ordering::Relaxed),
            s.bytes_received.load(Ordering::Relaxed),
        )
    }
}
