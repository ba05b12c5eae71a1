//! What every other part of the engine builds on: keys and key ranges, the value types,
//! the status codes of answers, the engine's error type, node ids, ranks and connection
//! tags, and how a node authenticates (`security`).
//!
//! Invariant: depends on nothing else in the engine.

pub mod error;
pub mod ids;
pub mod keys;
pub mod security;
pub mod status;
pub mod value;
