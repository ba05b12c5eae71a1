//! The server store (being written).
