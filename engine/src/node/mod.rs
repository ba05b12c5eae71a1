//! What servers and workers both do with the scheduler: connect to it and register (or
//! join a running job) and wait for the welcome (`register`), and report themselves to
//! a scheduler restarted with `--recover` (`rejoin`), and remember the servers a routing
//! table left out until their connections are closed (`departed`). The loops around these (when to
//! try again, what to do meanwhile, heartbeats) stay with each role.
//!
//! Invariant: knows only the scheduler conversation (the transport, `proto`, `base`);
//! never a server's store or a worker's tasks, and where the two roles differ the
//! difference is a parameter here, not a second copy.

pub(crate) mod departed;
pub(crate) mod register;
pub(crate) mod rejoin;
