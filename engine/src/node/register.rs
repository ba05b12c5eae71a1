//! Registering with the scheduler: connect, say hello, wait (bounded) for the welcome.

use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_channel::Receiver;
use pserv_transport::{Conn, TcpTransport};

use crate::base::error::EngineError;
use crate::base::ids::{ConnTag, Holder};
use crate::proto::{ClusterInfo, Control, Role};

/// How long connecting to the scheduler may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a registration that waits looks whether its connection closed.
const REGISTER_TICK: Duration = Duration::from_millis(100);

/// The first message to the scheduler.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hello {
    /// Register: for the job about to start (a worker may also join a running job so).
    Register {
        /// Server or worker.
        role: Role,
        /// Where the node listens (servers).
        addr: Option<SocketAddr>,
        /// The rank asked for, if any.
        rank: Option<u32>,
    },
    /// A worker takes over the place of failed worker `rank`.
    Replace {
        /// The failed worker's rank.
        rank: u32,
    },
    /// A server joins a running job.
    Join {
        /// Where the server listens.
        addr: SocketAddr,
        /// The rank asked for, if any.
        rank: Option<u32>,
    },
}

impl Hello {
    /// The control message, with this process's id.
    fn to_control(self) -> Control {
        let pid = std::process::id();
        match self {
            Hello::Register { role, addr, rank } => Control::Register {
                role,
                addr,
                rank,
                pid,
            },
            Hello::Join { addr, rank } => Control::Join { addr, rank, pid },
            Hello::Replace { rank } => Control::Replace { rank, pid },
        }
    }
}

/// How to register.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Registration {
    /// What to say.
    pub(crate) hello: Hello,
    /// The scheduler's address (named in the error when it does not answer).
    pub(crate) scheduler: SocketAddr,
    /// How long to wait for the welcome.
    pub(crate) timeout: Duration,
    /// Whether a `Shutdown` in place of the welcome means the scheduler is gone
    /// (a registration error naming the address; a worker's handler turns a closed scheduler
    /// connection into one) or is an unexpected answer like any other (a server).
    pub(crate) shutdown_is_gone: bool,
}

/// What the scheduler's welcome says.
#[derive(Debug)]
pub(crate) struct Welcome {
    /// This node's id: the sender of every frame it sends from now on.
    pub(crate) node_id: u32,
    /// This node's rank.
    pub(crate) rank: u32,
    /// The cluster table.
    pub(crate) cluster: ClusterInfo,
    /// For a replacement: where it takes over.
    pub(crate) resume: Option<Box<crate::proto::Resume>>,
}

/// Connect to the scheduler (within [`CONNECT_TIMEOUT`]) and tag the connection as the
/// scheduler's, in a process of kind `holder`.
pub(crate) fn connect(
    transport: &TcpTransport,
    scheduler: SocketAddr,
    holder: Holder,
) -> Result<Conn, EngineError> {
    let conn = transport.connect(scheduler, CONNECT_TIMEOUT)?;
    conn.set_tag(ConnTag::Scheduler.to_u64(holder));
    Ok(conn)
}

/// Send the hello over `conn` and wait up to `how.timeout` for the answer on `answers`
/// (where the node's handler puts the scheduler's control messages): the welcome, or
/// [`EngineError::Registration`] with the scheduler's reason, the unexpected answer, or
/// the timeout.
pub(crate) fn register(
    conn: &Conn,
    answers: &Receiver<Control>,
    how: &Registration,
) -> Result<Welcome, EngineError> {
    let closed = || {
        EngineError::Registration(format!(
            "the connection to {} closed before it answered the registration (is a pserv \
             scheduler listening there? the log above says why the connection closed)",
            how.scheduler
        ))
    };
    // No node id yet: the hello goes out as 0. A peer that is no scheduler may have
    // made the connection close already (its first bytes were no frame): the same error.
    if conn.send(how.hello.to_control().to_frame(0)).is_err() {
        return Err(closed());
    }
    let deadline = std::time::Instant::now() + how.timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Looked at every tick, so a closed connection (a peer that is not a scheduler,
        // a scheduler that died) fails the registration at once, not at the timeout.
        return match answers.recv_timeout(left.min(REGISTER_TICK)) {
            Ok(Control::Welcome {
                node_id,
                rank,
                cluster,
                resume,
            }) => Ok(Welcome {
                node_id,
                rank,
                cluster: *cluster,
                resume,
            }),
            Ok(Control::Refused { reason }) => Err(EngineError::Registration(reason)),
            Ok(Control::Shutdown) if how.shutdown_is_gone => Err(closed()),
            Ok(other) => Err(EngineError::Registration(format!(
                "unexpected answer {other:?} from {}",
                how.scheduler
            ))),
            Err(_) if conn.is_closed() && answers.is_empty() => Err(closed()),
            Err(_) if !left.is_zero() => continue,
            Err(_) => Err(EngineError::Registration(format!(
                "no cluster table from the scheduler at {} within {:?}",
                how.scheduler, how.timeout
            ))),
        };
    }
}
