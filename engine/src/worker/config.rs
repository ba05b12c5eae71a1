//! The configuration of a worker and the options of its tasks.

use std::net::SocketAddr;
use std::time::Duration;

use pserv_transport::compress::Codec;
use pserv_transport::TcpConfig;

use crate::base::security::Security;
use crate::consistency::Consistency;
use crate::onesided::TransportKind;

use super::Timestamp;

/// Configuration of a [`Worker`].
///
/// [`Worker`]: crate::worker::Worker
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The scheduler's address.
    pub scheduler: SocketAddr,
    /// The transport's event loops.
    pub tcp: TcpConfig,
    /// How this worker authenticates its connections (default: the secret file
    /// `PSERV_SECRET_FILE` names).
    pub security: Security,
    /// A requested rank (decides, for example, the data shard).
    pub rank: Option<u32>,
    /// Take over the place of this failed worker instead of registering (`pserv worker
    /// --replace RANK`): its rank, node id, shard and position ([`Worker::resume`]).
    ///
    /// [`Worker::resume`]: crate::worker::Worker::resume
    pub replace: Option<u32>,
    /// How long `wait` spins before parking.
    pub spin_us: u64,
    /// How long to wait for the scheduler's cluster table.
    pub register_timeout: Duration,
    /// The default consistency model of this worker's tasks (default: eventual).
    pub consistency: Consistency,
    /// How long `wait` and `barrier` block before they give up with
    /// [`EngineError::Timeout`] (a server or the scheduler that stopped answering).
    ///
    /// [`EngineError::Timeout`]: crate::EngineError::Timeout
    pub timeout: Duration,
    /// The data path of dense ranges in windows ([`Worker::open_window`]): auto, tcp, shm
    /// or rdma (see [`crate::onesided`]).
    ///
    /// [`Worker::open_window`]: crate::worker::Worker::open_window
    pub transport: TransportKind,
    /// When the scheduler's connection closes before it said the job is over, try this
    /// long to reach a restarted scheduler (`pserv scheduler --recover`) before giving up.
    pub scheduler_grace: Duration,
    /// Send repeated key lists by name once a server confirmed it cached them (see
    /// [`crate::keycache`]); default off.
    pub key_cache: bool,
    /// Compress the values of requests to servers when that makes them smaller (and,
    /// since a server answers in the codec a worker sends, of their answers); default
    /// none. See `pserv_transport::tcp` on how connections agree.
    pub compress: Codec,
}

impl WorkerConfig {
    /// Defaults for a scheduler at `scheduler`.
    pub fn new(scheduler: SocketAddr) -> Self {
        WorkerConfig {
            scheduler,
            tcp: TcpConfig::default(),
            security: Security::default(),
            rank: None,
            replace: None,
            spin_us: 100,
            register_timeout: Duration::from_secs(120),
            timeout: Duration::from_secs(600),
            consistency: Consistency::Eventual,
            transport: TransportKind::Tcp,
            scheduler_grace: Duration::from_secs(10),
            key_cache: false,
            compress: Codec::None,
        }
    }
}

/// Options of one task.
#[derive(Clone, Debug, Default)]
pub struct TaskOpts {
    /// Start only after these earlier tasks of this worker have finished
    /// (execute-after-finished dependencies).
    pub after: Vec<Timestamp>,
    /// The consistency model of this task (default: the worker's).
    pub consistency: Option<Consistency>,
    /// Update function id for pushes (0: the server's default); for pulls, the answer
    /// filter the servers run on the values before answering (0: none; see
    /// [`crate::filter::AnswerFilter`]).
    pub func: u16,
}
