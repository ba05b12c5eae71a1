//! Consistency models and the worker-local gate (being written).
