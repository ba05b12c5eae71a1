//! `pserv-bench`: the cluster bench harness.
//!
//! It measures pserv push / pull goodput and latency over TCP on 127.0.0.1 (dense ranges
//! of 4 KiB to 16 MiB, 1 and 8 requests in flight, 1 and 2 workers; sparse key lists of
//! 10^3 to 10^6 keys) side by side with baselines taken in the same run: a raw
//! single-stream TCP transfer, a raw TCP ping-pong and a memcpy of the same sizes. Every
//! pserv figure is printed with its ratio to the matching baseline, and the tables replace
//! the `tcp` section of `bench/RESULTS.md`. The same dense cells also run over the
//! engine's one-sided transports (`--transport tcp,shm[,rdma]`), side by side with the
//! TCP cells and memcpy, into the `onesided` section.
//!
//! - [`stats`]: the measurement loop (N in flight) and its summary (hdrhistogram).
//! - [`baseline`]: raw sockets and memcpy.
//! - [`cluster`]: scheduler and server as subprocesses, workers as threads.
//! - [`workload`]: the dense and sparse cells a worker runs.
//! - [`report`]: Markdown tables and the RESULTS.md section.
//! - [`onesided`]: the same dense cells over the engine's one-sided path (shm, rdma):
//!   one window per cluster, `push_range_now` / `pull_range_into`.
//! - [`onesided_report`]: the transport table (tcp / shm / rdma next to memcpy, with the
//!   one-sided targets), the `onesided` section of `bench/RESULTS.md`.
//! - [`run`]: one whole run.
//! - [`tau`]: the bounded-delay sweep (`tau-sweep`): time to a target logloss vs tau.
//! - [`repl`]: chain replication (`replication`): push throughput with 0, 1, 2 replicas,
//!   with and without aggregation, and recovery time after a SIGKILLed server.
//! - [`messages`]: the message path (`messages`): the two-sided cells over TCP, over the
//!   shared-memory rings and (where a device is usable) over RDMA queue pairs in one run,
//!   and the main job against the single-process SGD.
//! - [`job`]: the main job (`job`): `pserv local` over tcp and shm (and rdma where a
//!   device is usable), K=0 and K=1, against the same SGD trained in one process, with
//!   the goals of examples per second.
//! - [`msgpath`]: the message paths (tcp, shm, rdma) of `messages` and `job`: whether
//!   rdma can run here (or the line that says why not), the check that a run's messages
//!   took their path, the section a software-device run writes.
//! - [`traffic`]: the traffic reducers on the main job (`traffic`): push filters, key
//!   caching and value compression against a baseline, and where each pays on 10 Gb/s.
//! - [`replace`]: a failed worker replaced in place (`replace`): the time from the SIGKILL
//!   to the replacement's first acknowledged push, the extra job time, the same model.
#![forbid(unsafe_code)]

pub mod baseline;
pub mod cluster;
pub mod error;
pub mod job;
pub mod machine;
pub mod messages;
pub mod msgpath;
pub mod onesided;
pub mod onesided_report;
pub mod repl;
pub mod replace;
pub mod report;
pub mod run;
pub mod stats;
pub mod tau;
pub mod traffic;
pub mod workload;

pub use error::BenchError;
