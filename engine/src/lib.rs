//! `pserv-engine`: the parameter server itself (MISSION.md P1-P4).
//!
//! - [`keys`]: keys, key ranges and the partition of the key space over servers.
//! - [`value`]: the element types of parameter values.
//! - [`store`]: one server's parameters in pinned memory, sharded by key sub-range.
//! - [`update`]: server-side update functions (assign, sum, SGD, user functions).
//! - [`onesided`]: the one-sided data path for dense ranges (shm, RDMA verbs).
//! - [`proto`]: control messages, status codes, frame builders.
//! - [`scheduler`]: the scheduler's state machine and process.
//! - [`ring`]: the consistent-hashing ring with virtual nodes and its epochs (P9).
//! - [`chain`]: chain replication with replication after aggregation, per server (P10).
//! - [`manager`]: the server manager: membership, failure detection, ring flips (P11, P12).
//! - `sim` (tests only): deterministic simulation of the manager, chains and workers.
//! - [`status`]: `pserv status`, the operator's view from the scheduler.
//! - [`server`]: the server node, serving requests on the event loops.
//! - [`worker`]: the worker API training code calls.
//! - [`lr`] and [`job`]: the main job, sparse logistic regression.
//! - [`app`], [`local`] and [`cli`]: the `pserv` command line, its launcher and flags.
//!
//! The engine does no unsafe: memory comes from `pserv-sys`, bytes move through
//! `pserv-transport`.
#![forbid(unsafe_code)]

pub mod app;
pub mod chain;
pub mod cli;
pub mod clock;
pub mod consistency;
pub mod error;
pub mod job;
pub mod keys;
pub mod local;
pub mod lr;
pub mod manager;
pub mod onesided;
pub mod proto;
pub mod replicate;
pub mod ring;
pub mod scheduler;
pub mod server;
#[cfg(test)]
mod sim;
pub mod status;
pub mod store;
pub mod update;
pub mod value;
pub mod worker;

pub use error::EngineError;
pub use keys::{Key, KeyRange, Partition};
pub use value::Value;
pub use worker::{Pulled, Timestamp, Worker, WorkerConfig};
