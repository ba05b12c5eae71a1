//! The server node: holds one partition of the parameters and answers pushes and pulls
//! on the transport's event-loop threads.
//!
//! A request is served where it arrives: the loop that read it looks its keys up in the
//! [`Store`] (sharded by key sub-range, one lock per shard, so loops rarely contend),
//! applies the update function, and writes the answer on the same thread. No request
//! crosses threads.
//!
//! Bad requests (wrong value type, unsorted keys, keys outside this server's range,
//! unknown update function, wrong value lengths) get an error answer with a
//! [`Status`] and a text; the store is left as it was and the connection stays open.

pub(crate) mod admit;
mod checkpoint;
mod config;
mod handler;
mod keys;
mod node;
pub(crate) mod route;
mod serve;
pub(crate) mod switch;
mod window;

pub use config::{ServerConfig, UserRules};
pub use node::Server;

use handler::Held;

use std::sync::atomic::{AtomicU32, AtomicU64};

use std::sync::{Arc, OnceLock};

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use pserv_transport::BufPool;

use crate::base::value::Value;
use crate::consistency::clock::ClockGate;
use crate::keycache::KeyCache;
use crate::onesided::ServerOneSided;
use crate::placement::Partition;
use crate::proto::Control;
use crate::replication::Replicator;
use crate::store::Store;
use crate::update::UpdateRegistry;

/// A typed store plus its update functions.
pub(crate) struct Typed<T: Value> {
    pub(crate) store: Store<T>,
    pub(crate) updates: UpdateRegistry<T>,
    /// The filters pulls may name for their answers.
    pub(crate) answers: crate::filter::AnswerFilters<T>,
}

/// The store in the cluster's value type.
pub(crate) enum AnyStore {
    F32(Typed<f32>),
    F64(Typed<f64>),
}

/// What a server knows once the cluster table arrived.
pub(crate) struct Ready {
    pub(crate) node_id: u32,
    pub(crate) rank: u32,
    pub(crate) store: AnyStore,
    /// Number of servers (worker node ids follow theirs).
    servers: u32,
    /// Worker slots of the clock gate (the first workers, then those that entered).
    workers: AtomicU32,
    /// Failed workers' places are kept for replacements: their slots stay when their
    /// connections close, and sequential pulls asked again get their first answer.
    replace_workers: bool,
    /// The answers of the latest sequential pulls per worker (node id), kept when
    /// `replace_workers`: a replacement asking the same pull again (same task and
    /// keys) gets the values the failed worker got, not values that moved on since.
    pulls_answered: Mutex<std::collections::HashMap<u32, PullAnswers>>,
    /// Worker clocks and the clocked requests waiting on them (bounded delay).
    clocks: Mutex<ClockGate<Held>>,
    /// The routing table: which keys this server serves (heads), the chains, the epoch.
    table: RwLock<Arc<Partition>>,
    /// Chain replication (a no-op where the table has no replicas).
    repl: Replicator,
    /// The one-sided window side (none over plain TCP).
    onesided: Option<Arc<ServerOneSided>>,
    /// Requests (pulls, and ordered pushes) the gate held, and their total wait in
    /// nanoseconds.
    held: (AtomicU64, AtomicU64),
}

/// A worker's latest sequential pull answers: (task and origin, keys, value bytes),
/// newest last, at most [`PULLS_KEPT`].
type PullAnswers = std::collections::VecDeque<(u64, Vec<u64>, Vec<u8>)>;

/// Sequential pull answers kept per worker for its replacement.
const PULLS_KEPT: usize = 4;

struct Core {
    ready: OnceLock<Ready>,
    control: Sender<Control>,
    pool: Arc<BufPool>,
    max_frame: usize,
    /// The key lists workers asked this server to cache.
    key_cache: KeyCache,
    /// Apply pushes with non-finite values ([`ServerConfig::allow_non_finite`]).
    allow_non_finite: bool,
}

struct ServerHandler {
    core: Arc<Core>,
}
