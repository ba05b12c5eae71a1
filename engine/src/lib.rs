//! `pserv-engine`: the parameter server itself.
#![forbid(unsafe_code)]
