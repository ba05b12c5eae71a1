//! `pserv-bench`: pserv push / pull over TCP loopback and over the one-sided transports
//! (shm, rdma) against raw sockets and memcpy.
//!
//! `cargo run --release -p pserv-bench -- [--quick] [--transport tcp,shm,rdma]` (default:
//! all three; rdma needs `--features rdma` and a device, else the report says why it is
//! missing); `... -- tau-sweep [--quick]` runs the bounded-delay experiment;
//! `... -- replication [--quick]` the chain-replication throughput and recovery tables;
//! `... -- messages [--quick]` the two-sided cells over tcp, shm and rdma (messages over
//! queue pairs, where built and a device is usable; on the software device of
//! `sys/softrdma` into the `messages-softrdma` section);
//! `... -- traffic [--data FILE]` the traffic reducers (push filters, key caching,
//! compression) on the main job; `... -- job [--quick]` the main job against the same SGD
//! in one process; `... -- replace [--reps N]` a failed worker replaced in place (the time
//! to the replacement's first acknowledged push, the job's extra time, the same model).
//! The hidden subcommands `__scheduler` and `__server`, and
//! `pserv ...` (the whole `pserv` command line), are how the bench starts the cluster's
//! other processes (it re-executes itself).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

use pserv_bench::cluster::{scheduler_main, server_main, SchedulerArgs, ServerArgs};
use pserv_bench::job::{job, JobBenchArgs};
use pserv_bench::messages::{messages, MessagesArgs};
use pserv_bench::repl::{replication, ReplArgs};
use pserv_bench::replace::{replace, ReplaceArgs};
use pserv_bench::run::{run, RunArgs};
use pserv_bench::tau::{tau_sweep, TauArgs};
use pserv_bench::traffic::{traffic, TrafficArgs};

/// pserv bench harness: push / pull goodput and latency over tcp / shm / rdma vs raw TCP
/// and memcpy.
#[derive(Debug, Parser)]
#[command(name = "pserv-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// The cluster's scheduler (started by the bench itself).
    #[command(name = "__scheduler", hide = true)]
    Scheduler(SchedulerArgs),
    /// The cluster's server (started by the bench itself).
    #[command(name = "__server", hide = true)]
    Server(ServerArgs),
    /// The bounded-delay experiment: time to a target logloss for a range of tau.
    TauSweep(TauArgs),
    /// Chain replication: push throughput for 0, 1, 2 replicas with and without
    /// aggregation, and recovery time after a SIGKILLed server.
    Replication(ReplArgs),
    /// The message path: two-sided cells with every message over TCP, over shared
    /// memory and (with `--features rdma` and a device) over RDMA queue pairs, and the
    /// main job over each against the single-process SGD.
    Messages(MessagesArgs),
    /// The main job against the single-process SGD: `pserv local` over tcp and shm (and
    /// rdma with `--features rdma` and a device), with 0 and 1 replicas, examples per
    /// second and the ratios the goals name.
    Job(JobBenchArgs),
    /// Traffic reducers on the main job: push filters, key caching and value compression,
    /// bytes and time per epoch against a baseline, and where each pays on 10 Gb/s.
    Traffic(TrafficArgs),
    /// A failed worker replaced in place: `pserv local --replace-failed-workers` clean and
    /// with a SIGKILLed worker, alternating; the time to the replacement's first
    /// acknowledged push, the extra job time, and whether the model is the clean run's.
    Replace(ReplaceArgs),
}

/// The run's cluster secret file, removed when dropped.
struct BenchSecret(Option<std::path::PathBuf>);

impl BenchSecret {
    fn make() -> BenchSecret {
        let given = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
        if given("PSERV_SECRET_FILE") || given("PSERV_INSECURE") {
            return BenchSecret(None);
        }
        let p = std::env::temp_dir().join(format!("pserv-bench-secret-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        if let Err(e) = pserv_transport::Secret::create_file(&p) {
            eprintln!("pserv-bench: {e}");
            std::process::exit(1);
        }
        std::env::set_var("PSERV_SECRET_FILE", &p);
        BenchSecret(Some(p))
    }
}

impl Drop for BenchSecret {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The command that reproduces this run, as the sections record it: `cargo run
/// --release -p pserv-bench`, with `--features rdma` when this build has it, under
/// `scripts/soft-rdma` when the software RDMA device is loaded (it sets
/// `PSERV_SOFT_RDMA=1`), then `-- ARGS`.
fn command_line(args: &[String]) -> String {
    let mut c = String::new();
    if std::env::var_os("PSERV_SOFT_RDMA").is_some_and(|v| v == "1") {
        c.push_str("scripts/soft-rdma ");
    }
    c.push_str("cargo run --release -p pserv-bench");
    if cfg!(feature = "rdma") {
        c.push_str(" --features rdma");
    }
    if !args.is_empty() {
        c.push_str(" -- ");
        c.push_str(&args.join(" "));
    }
    c
}

fn main() {
    // `pserv-bench pserv ...` is the `pserv` binary (how tau-sweep starts its clusters).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "pserv") {
        std::process::exit(
            match pserv_engine::cli::app::main(args[1..].to_vec(), vec!["pserv".into()]) {
                c if c == std::process::ExitCode::SUCCESS => 0,
                _ => 1,
            },
        );
    }
    // Every cluster the bench starts authenticates as a real one does: with a secret of
    // this run (unless the caller gave one, or said --insecure through PSERV_INSECURE),
    // handed to the subprocesses and the in-process nodes in PSERV_SECRET_FILE. Set
    // before any thread exists.
    let _secret = BenchSecret::make();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.role {
        Some(Role::Scheduler(a)) => scheduler_main(a),
        Some(Role::Server(a)) => server_main(a),
        Some(Role::TauSweep(a)) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            tau_sweep(a, command_line(&args))
        }
        Some(Role::Replication(a)) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            replication(a, command_line(&args))
        }
        Some(Role::Messages(a)) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            messages(a, command_line(&args))
        }
        Some(Role::Job(a)) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            job(a, command_line(&args))
        }
        Some(Role::Replace(a)) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            replace(a, command_line(&args))
        }
        Some(Role::Traffic(a)) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            traffic(a, command_line(&args))
        }
        None => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let command = command_line(&args);
            run(&cli.run, command).map(|_| ())
        }
    };
    if let Err(e) = result {
        drop(_secret);
        let mut msg = format!("pserv-bench: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        eprintln!("{msg}");
        std::process::exit(1);
    }
}
