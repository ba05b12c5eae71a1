//! The engine's error type.

use pserv_transport::TransportError;

use crate::base::status::Status;

/// Errors of engine operations, each with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A transport operation failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A server answered a request with an error.
    #[error("server {server} refused the request ({status}): {message}")]
    Server {
        /// Rank of the server.
        server: u32,
        /// The status code.
        status: Status,
        /// The server's explanation.
        message: String,
    },
    /// The connection to a server closed before it answered.
    #[error("server {server} disconnected before answering")]
    Disconnected {
        /// Rank of the server.
        server: u32,
    },
    /// A request was refused before it was sent (for example unsorted keys).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// `wait` on a timestamp that was never issued or whose result was already taken.
    #[error("unknown or already collected timestamp {0}")]
    UnknownTimestamp(u64),
    /// The scheduler refused or never answered a registration.
    #[error("registration failed: {0}")]
    Registration(String),
    /// A wait or barrier gave up.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The scheduler connection closed.
    #[error("lost the connection to the scheduler")]
    SchedulerGone,
    /// A one-sided (shm / rdma) operation failed.
    #[error("one-sided transport: {0}")]
    OneSided(String),
    /// The job cannot give a result (for example its model turned non-finite).
    #[error("the job failed: {0}")]
    JobFailed(String),
    /// A configuration error.
    #[error("configuration: {0}")]
    Config(String),
    /// A local I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
