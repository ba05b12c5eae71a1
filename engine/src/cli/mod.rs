//! The `pserv` command line: subcommands ([`app`]), shared flags ([`args`]), the `local`
//! launcher ([`local`]) and the operator's `status` / `leave` commands ([`status`]).
//!
//! Invariant: only parses, launches and prints; the roles themselves live in
//! `scheduler`, `server`, `worker` and `job`.

pub mod app;
pub mod args;
pub mod local;
pub mod status;
