//! Each role's flags, both ways: the flags `pserv scheduler`, `pserv server` and
//! `pserv worker` parse ([`SchedulerArgs`], [`ServerArgs`], [`WorkerArgs`]), and the typed
//! config a launcher (`pserv local`) passes to a child of each role ([`SchedulerLaunch`],
//! [`ServerLaunch`], [`WorkerLaunch`]).
//!
//! Invariant: a launcher never formats a flag itself. Each launch config has one
//! `to_args`, the only place its role's command line is written; the child parses it back
//! with the subcommand's own parser (unit-tested as a round trip for every flag passed on).
//! A flag a launch config does not hold is not passed: the child takes it from its
//! `PSERV_*` environment (inherited) or its default.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::cli::app::ReplArgs;
use crate::cli::args::{ClusterArgs, NetArgs, OutputArgs, SchedulerAddr};
use crate::job::JobArgs;
use crate::proto::ValueType;
use crate::update::UpdateSpec;

/// Flags of `pserv scheduler`.
#[derive(Args, Clone, Debug)]
pub struct SchedulerArgs {
    /// Address to listen on.
    #[arg(long, env = "PSERV_SCHEDULER_LISTEN", default_value = crate::cli::args::DEFAULT_SCHEDULER)]
    pub listen: std::net::SocketAddr,
    /// The cluster's shape.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Transport flags.
    #[command(flatten)]
    pub net: NetArgs,
    /// Where the job summary goes.
    #[command(flatten)]
    pub output: OutputArgs,
    /// Server update function: assign, sum, sgd[:LR], adagrad[:LR[:EPS]] or
    /// ftrl[:ALPHA:BETA:L1:L2]. The LR job (`pserv worker`) needs its optimizer's
    /// rule (for example adagrad:0.5:0.00000001 for --lr 0.5) and refuses another.
    #[arg(long, env = "PSERV_UPDATE", default_value = "sum")]
    pub update: UpdateSpec,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    pub port_file: Option<std::path::PathBuf>,
    /// Draw a progress bar.
    #[arg(long)]
    pub progress: bool,
    /// Give up if not every node registered within this many seconds.
    #[arg(long, default_value_t = 120)]
    pub register_timeout_secs: u64,
    /// Declare a server dead after this many milliseconds without a heartbeat
    /// (servers send one every 300 ms).
    #[arg(long, env = "PSERV_HEARTBEAT_TIMEOUT_MS", default_value_t = 3000)]
    pub heartbeat_timeout_ms: u64,
    /// Restart a failed scheduler of a running job (same address and cluster flags):
    /// rebuild the view (nodes, routing table, ring, barriers) from the nodes, which
    /// reconnect and report.
    #[arg(long)]
    pub recover: bool,
    /// With --recover: wait at most this long for the nodes after the first one
    /// rejoined (less when every node of the cluster flags did).
    #[arg(long, default_value_t = 3000)]
    pub recover_wait_ms: u64,
    /// Checkpoints: --checkpoint-every, --checkpoint-dir.
    #[command(flatten)]
    pub checkpoint: crate::checkpoint::CheckpointArgs,
    /// Start from a checkpoint (--restore).
    #[command(flatten)]
    pub restore: crate::checkpoint::RestoreArgs,
    /// Replacements of failed workers.
    #[command(flatten)]
    pub replace: ReplaceArgs,
}

/// Replacement of failed workers (`pserv scheduler` and `pserv local`).
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct ReplaceArgs {
    /// Keep a failed worker's place (rank, data shard, clock) for a replacement, `pserv
    /// worker --replace RANK` (pserv local starts one): the others wait for it at the
    /// servers' clock gates; under sequential consistency the model equals the run
    /// without the failure, bit for bit. Workers then number their pushes by clock and
    /// servers remember every push (exactly-once redos).
    #[arg(long, env = "PSERV_REPLACE_FAILED_WORKERS")]
    pub replace_failed_workers: bool,
    /// With --replace-failed-workers: give a place up when no replacement took it within
    /// this many seconds (its shard then passes to the others from the next epoch).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub replace_wait_secs: u64,
}

impl ReplaceArgs {
    /// How long a failed worker's place is kept (`None`: no replacements).
    pub fn wait(&self) -> Option<std::time::Duration> {
        self.replace_failed_workers
            .then(|| std::time::Duration::from_secs(self.replace_wait_secs))
    }

    /// The flags for a scheduler command line.
    pub fn to_args(&self) -> Vec<String> {
        if self.replace_failed_workers {
            vec![
                "--replace-failed-workers".into(),
                format!("--replace-wait-secs={}", self.replace_wait_secs),
            ]
        } else {
            Vec::new()
        }
    }
}

/// Flags of `pserv server`.
#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Where the scheduler is.
    #[command(flatten)]
    pub sched: SchedulerAddr,
    /// Address to listen on for workers (port 0: any).
    #[arg(long, env = "PSERV_SERVER_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Requested rank.
    #[arg(long, env = "PSERV_RANK")]
    pub rank: Option<u32>,
    /// Store shards (one lock each).
    #[arg(long, env = "PSERV_SHARDS", default_value_t = 16)]
    pub shards: usize,
    /// At the end, write this server's part of the model to DIR/model-RANK.bin.
    #[arg(long, env = "PSERV_DUMP_MODEL")]
    pub dump_model: Option<std::path::PathBuf>,
    /// Transport flags.
    #[command(flatten)]
    pub net: NetArgs,
    /// How this server batches replication when it heads a chain.
    #[command(flatten)]
    pub repl: ReplArgs,
    /// Join a running cluster: the scheduler gives this server a rank and a share of
    /// the ring; it copies its ranges while training goes on, then the table flips.
    #[arg(long)]
    pub join: bool,
    /// Bound of this server's cache of workers' key lists (`--key-cache` on workers), in
    /// keys over all lists, 8 bytes each (0: cache nothing).
    #[arg(long, env = "PSERV_KEY_CACHE_KEYS", default_value_t = crate::keycache::DEFAULT_SERVER_KEYS)]
    pub key_cache_keys: usize,
    /// Apply pushes that hold NaN or infinite values (by default such a push is refused
    /// whole and nothing of it is applied).
    #[arg(long, env = "PSERV_ALLOW_NON_FINITE")]
    pub allow_non_finite: bool,
    /// Stop (with an error naming the scheduler) when the scheduler has been unreachable
    /// this long: its connection closed and no restarted scheduler (`--recover`) came
    /// back at its address.
    #[arg(long, env = "PSERV_SCHEDULER_GRACE_SECS", default_value_t = 60)]
    pub scheduler_grace_secs: u64,
    /// Start from a checkpoint (--restore): load the keys of the ranges this server
    /// holds under the new routing table from every server file of the checkpoint.
    #[command(flatten)]
    pub restore: crate::checkpoint::RestoreArgs,
}

/// Flags of `pserv worker`.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Where the scheduler is.
    #[command(flatten)]
    pub sched: SchedulerAddr,
    /// Requested rank (decides the data shard).
    #[arg(long, env = "PSERV_RANK")]
    pub rank: Option<u32>,
    /// Take over the place of failed worker RANK (its rank, data shard and position) in
    /// a job whose scheduler keeps places for replacements (--replace-failed-workers).
    #[arg(long, value_name = "RANK", conflicts_with = "rank")]
    pub replace: Option<u32>,
    /// Microseconds `wait` spins before parking.
    #[arg(long, env = "PSERV_SPIN_US", default_value_t = 100)]
    pub spin_us: u64,
    /// The job's flags.
    #[command(flatten)]
    pub job: JobArgs,
    /// Transport flags.
    #[command(flatten)]
    pub net: NetArgs,
}

/// What a launcher passes to a scheduler it starts: the `pserv scheduler` flags it sets.
/// `--register-timeout-secs`, `--heartbeat-timeout-ms` and `--recover-wait-ms` are not
/// passed.
#[derive(Clone, Debug)]
pub struct SchedulerLaunch {
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--port-file`, if any.
    pub port_file: Option<PathBuf>,
    /// `--summary-json`, if any.
    pub summary_json: Option<PathBuf>,
    /// `--servers`, `--workers`, `--value-type`, `--value-len`, `--vnodes` and, if set,
    /// `--replicas`.
    pub cluster: ClusterArgs,
    /// `--update`.
    pub update: UpdateSpec,
    /// `--progress`.
    pub progress: bool,
    /// `--recover`: take over a running job (a launcher restarting a scheduler that died).
    pub recover: bool,
    /// The transport flags ([`NetArgs::to_args`]).
    pub net: NetArgs,
    /// `--checkpoint-every`, `--checkpoint-dir`.
    pub checkpoint: crate::checkpoint::CheckpointArgs,
    /// `--restore`, if any.
    pub restore: Option<PathBuf>,
    /// `--replace-failed-workers`, `--replace-wait-secs`.
    pub replace: ReplaceArgs,
}

impl SchedulerLaunch {
    /// The child's command line after the executable's prefix: `scheduler` and its flags.
    pub fn to_args(&self) -> Vec<String> {
        let c = &self.cluster;
        let mut a = vec!["scheduler".to_string(), format!("--listen={}", self.listen)];
        if let Some(p) = &self.port_file {
            a.push(format!("--port-file={}", p.display()));
        }
        if let Some(p) = &self.summary_json {
            a.push(format!("--summary-json={}", p.display()));
        }
        a.extend([
            format!("--servers={}", c.servers),
            format!("--workers={}", c.workers),
            format!(
                "--value-type={}",
                match c.value_type {
                    ValueType::F32 => "f32",
                    ValueType::F64 => "f64",
                }
            ),
            format!("--value-len={}", c.value_len),
            format!("--vnodes={}", c.vnodes),
            format!("--update={}", self.update),
        ]);
        if let Some(r) = c.replicas {
            a.push(format!("--replicas={r}"));
        }
        if self.progress {
            a.push("--progress".into());
        }
        if self.recover {
            a.push("--recover".into());
        }
        a.extend(self.net.to_args());
        a.extend(self.checkpoint.to_args());
        if let Some(d) = &self.restore {
            a.push(format!("--restore={}", d.display()));
        }
        a.extend(self.replace.to_args());
        a
    }
}

/// What a launcher passes to a server it starts: the `pserv server` flags it sets.
/// `--listen` and `--shards` are not passed.
#[derive(Clone, Debug)]
pub struct ServerLaunch {
    /// `--scheduler`.
    pub scheduler: SocketAddr,
    /// `--rank`, if any.
    pub rank: Option<u32>,
    /// `--join`: a server that joins the running cluster.
    pub join: bool,
    /// The transport flags ([`NetArgs::to_args`]).
    pub net: NetArgs,
    /// The replication flags ([`ReplArgs::to_args`]).
    pub repl: ReplArgs,
    /// `--dump-model`, if any.
    pub dump_model: Option<PathBuf>,
    /// `--allow-non-finite`.
    pub allow_non_finite: bool,
    /// `--restore`, if any.
    pub restore: Option<PathBuf>,
}

impl ServerLaunch {
    /// The child's command line after the executable's prefix: `server` and its flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "server".to_string(),
            format!("--scheduler={}", self.scheduler),
        ];
        if let Some(r) = self.rank {
            a.push(format!("--rank={r}"));
        }
        if self.join {
            a.push("--join".into());
        }
        a.extend(self.net.to_args());
        a.extend(self.repl.to_args());
        if let Some(d) = &self.dump_model {
            a.push(format!("--dump-model={}", d.display()));
        }
        if self.allow_non_finite {
            a.push("--allow-non-finite".into());
        }
        if let Some(d) = &self.restore {
            a.push(format!("--restore={}", d.display()));
        }
        a
    }
}

/// What a launcher passes to a worker it starts: the `pserv worker` flags it sets.
/// `--spin-us` is not passed.
#[derive(Clone, Debug)]
pub struct WorkerLaunch {
    /// `--scheduler`.
    pub scheduler: SocketAddr,
    /// `--rank`, if any (none: a worker that joins the running job).
    pub rank: Option<u32>,
    /// `--replace RANK`: a worker that takes over failed worker RANK's place.
    pub replace: Option<u32>,
    /// The job's flags ([`JobArgs::to_args`]).
    pub job: JobArgs,
    /// The transport flags ([`NetArgs::to_args`]).
    pub net: NetArgs,
}

impl WorkerLaunch {
    /// The child's command line after the executable's prefix: `worker` and its flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "worker".to_string(),
            format!("--scheduler={}", self.scheduler),
        ];
        if let Some(r) = self.rank {
            a.push(format!("--rank={r}"));
        }
        if let Some(r) = self.replace {
            a.push(format!("--replace={r}"));
        }
        a.extend(self.job.to_args());
        a.extend(self.net.to_args());
        a
    }
}
