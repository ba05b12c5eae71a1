//! The `pserv` command line: subcommands ([`app`]), shared flags ([`args`]), each role's
//! flags and the typed config a launcher passes to a child of that role ([`roles`]), the
//! `local` launcher ([`local`]), `launch` for processes a cluster manager starts
//! ([`launch`]), the operator's `status` / `leave` commands ([`status`]) and
//! `tls-certs` ([`tls_certs`]).
//!
//! Invariant: only parses, launches and prints; the roles themselves live in
//! `scheduler`, `server`, `worker` and `job`.

pub mod app;
pub mod args;
pub mod launch;
pub mod local;
pub mod roles;
pub mod status;
#[cfg(test)]
mod tests;
pub mod tls_certs;
