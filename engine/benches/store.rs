//! Store micro benches (being written).
fn main() {}
