//! The bench's error type.

/// Why a bench run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A pserv operation failed (connecting, a push or pull, the job's end).
    #[error(transparent)]
    Engine(#[from] pserv_engine::error::EngineError),
    /// A local I/O operation failed (sockets of the baselines, subprocesses, files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The cluster did not come up or go down as it should.
    #[error("cluster: {0}")]
    Cluster(String),
    /// An answer did not hold what was asked for.
    #[error("wrong answer: {0}")]
    WrongAnswer(String),
}

impl BenchError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io {
            context: context.into(),
            source,
        }
    }
}
