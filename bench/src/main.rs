//! pserv bench harness.
fn main() {}
