//! Server-side update functions (being written).
