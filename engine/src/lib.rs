//! `pserv-engine`: the parameter server itself (the OSDI 2014 parameter server on top of the
//! transports).
//!
//! One folder per concern (see ARCHITECTURE.md for the map and each folder's invariant):
//!
//! - [`base`]: keys, key ranges, value types, status codes, the error type, node ids,
//!   ranks and connection tags.
//! - [`placement`]: the consistent-hashing ring and the routing table ([`Partition`]).
//! - [`proto`]: control messages and frame builders.
//! - [`store`]: one server's parameters in pinned memory, sharded by key sub-range.
//! - [`update`]: server-side update functions (assign, sum, SGD, AdaGrad, FTRL, user rules).
//! - [`consistency`]: the worker's task gate and the servers' range vector clocks.
//! - [`filter`]: what a worker sends of a push (significantly-modified, KKT, random
//!   skip, and the user's own).
//! - [`replication`]: chain replication between servers, after aggregation.
//! - [`scheduler`]: the scheduler's state machine and process.
//! - [`server`]: the server node, serving requests on the event loops.
//! - [`worker`]: the worker API training code calls.
//! - `node` (crate-internal): what servers and workers both do with the scheduler
//!   (register, rejoin a restarted one).
//! - [`onesided`]: the one-sided data path for dense ranges (shm, RDMA verbs).
//! - [`lr`] and [`job`]: the main job, sparse logistic regression.
//! - [`checkpoint`]: checkpoint files and manifests, writing them atomically, verifying
//!   and restoring them.
//! - [`cli`]: the `pserv` command line, its launcher and the operator's commands.
//! - `sim` (tests only): the deterministic simulation.
//!
//! The engine does no unsafe: memory comes from `pserv-sys`, bytes move through
//! `pserv-transport`.
#![forbid(unsafe_code)]

pub mod base;
pub mod checkpoint;
pub mod cli;
pub mod consistency;
pub mod filter;
pub mod job;
pub mod keycache;
pub mod lr;
pub(crate) mod node;
pub mod onesided;
pub mod placement;
pub mod proto;
pub mod replication;
pub mod scheduler;
pub mod server;
#[cfg(test)]
mod sim;
pub mod store;
pub mod update;
pub mod worker;

pub use base::security::Security;
pub use base::{error, keys, value};
pub use error::EngineError;
pub use keys::{Key, KeyRange};
pub use placement::Partition;
pub use value::Value;
pub use worker::{Pulled, Timestamp, Worker, WorkerConfig};
