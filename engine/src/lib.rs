//! `pserv-engine`: the parameter server itself.
#![forbid(unsafe_code)]

pub mod keys;
pub mod lr;
pub mod store;
pub mod update;
pub mod value;

pub use keys::{Key, KeyRange, Partition};
pub use value::Value;
