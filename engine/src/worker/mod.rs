//! The worker API: what training code calls.
//!
//! A [`Worker`] registers with the scheduler, learns the cluster table, connects to every
//! server, and then offers asynchronous range push and pull:
//!
//! - [`push`](Worker::push), [`pull`](Worker::pull), [`push_pull`](Worker::push_pull) take a
//!   sorted key list; [`push_range`](Worker::push_range) and
//!   [`pull_range`](Worker::pull_range) take a [`KeyRange`] whose values are dense.
//! - Each returns a [`Timestamp`] at once. [`wait`](Worker::wait) blocks until that task is
//!   done; [`wait_pull`](Worker::wait_pull) also hands over the pulled values.
//! - A request is split by the server partition and sent as one message per server,
//!   never one per key. Keys and values are sent straight from the caller's buffers
//!   (moved or shared into the request, not copied) with one vectored write.
//! - Invalid requests (unsorted keys, lengths that do not fit) do not panic: the task
//!   completes at once with the error, which `wait` returns.
//! - The routing table can change (a server failed, joined or left): the scheduler sends
//!   a newer one ([`Worker::table`]). A message lost with its server, or refused as routed
//!   with another table (`StaleEpoch`, `NotOwner`), is resent: its keys are split again
//!   by the newest table (servers apply a resent push once). A message that finds no
//!   taker within the worker's `timeout` since it first failed fails its task.
//!
//! Waiting spins for `spin_us` before it parks the thread: an answer on loopback usually
//! arrives within tens of microseconds, and waking a parked thread costs about 25 us on
//! these machines. Set `spin_us` to 0 on oversubscribed hosts.
//!
//! [`KeyRange`]: crate::KeyRange

mod api;
mod config;
mod filtered;
mod handler;
mod pulled;
pub(crate) mod push_pull;
mod registration;
pub(crate) mod request;
pub(crate) mod retry;
pub(crate) mod shared;
pub(crate) mod state;
mod sync;
pub(crate) mod tasks;
#[cfg(test)]
mod tests;
mod windows;

pub use api::Worker;
pub use config::{TaskOpts, WorkerConfig};
pub use pulled::Pulled;
pub use shared::Shared;
pub use tasks::Timestamp;
