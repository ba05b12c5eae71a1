//! The scheduler: registration, the cluster table, barriers, the job's end.
//!
//! [`SchedulerCore`] is the decision logic as a plain state machine: it is fed
//! [`Input`]s (a control message from a connection, a connection closed) and returns
//! [`Output`]s (messages to send, lines for the operator). It does no I/O, so it is tested
//! without sockets. [`run_scheduler`] wires it to the TCP transport, draws the progress bar
//! and writes the job summary.
//!
//! Files: `spec` ([`ClusterSpec`]), `core` (the state machine's state, its inputs and
//! outputs, [`SchedulerCore::handle`]), `membership` (registration, the welcome, barriers,
//! heartbeats and failover, joins and leaves, the job's end), `recovery` (a restart with
//! `--recover`: the view rebuilt from the nodes' `Rejoin` reports), `run` (the process:
//! transport, handler, summary merge) and `tests`.

mod checkpoint;
mod core;
mod membership;
mod recovery;
mod run;
mod spec;
#[cfg(test)]
mod tests;
mod workers;

pub use self::checkpoint::CheckpointPlan;
pub use self::core::{ConnKey, Input, Output, SchedulerCore};
pub use run::{run_scheduler, JobReport, SchedulerConfig};
pub use spec::ClusterSpec;
