//! The `pserv` binary.
fn main() {}
