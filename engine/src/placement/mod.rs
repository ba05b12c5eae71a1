//! Where keys live: the consistent-hashing ring with virtual nodes and the routing
//! table it produces ([`Partition`]: ranges, their heads and chains, an epoch).
//!
//! Invariant: pure data and functions, no I/O; a partition covers the key space without
//! gaps and its epoch only grows.

pub mod partition;
pub mod ring;

pub use partition::Partition;
