//! The `pserv` command line: `local` runs a whole cluster on this machine; `scheduler`,
//! `server` and `worker` run one role each. The `pserv` binary is a call to [`main`];
//! other binaries (the bench harness) embed the same command line and re-execute
//! themselves with a prefix argument for each role (see [`main`]).

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::base::error::EngineError;
use crate::cli::args::{ClusterArgs, NetArgs, OutputArgs, SchedulerAddr, SecurityArgs, TlsArgs};
use crate::cli::launch::{run_launch, LaunchArgs};
use crate::cli::local::{run_local, LocalPlan};
use crate::cli::roles::{SchedulerArgs, ServerArgs, WorkerArgs};
use crate::cli::status::Access;
use crate::job::JobArgs;
use crate::proto::Control;
use crate::scheduler::{run_scheduler, SchedulerConfig};
use crate::server::{Server, ServerConfig};
use crate::update::UpdateSpec;
use crate::worker::{Worker, WorkerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "pserv",
    version,
    about = "A parameter server: scheduler, servers and workers over TCP"
)]
pub(super) struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `pserv_engine=debug`.
    #[arg(long, global = true, env = "PSERV_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    pub(super) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(super) enum Cmd {
    /// Run a whole cluster on this machine (scheduler, servers and workers as separate
    /// processes on 127.0.0.1) training sparse logistic regression.
    Local(LocalArgs),
    /// Run the scheduler.
    Scheduler(SchedulerArgs),
    /// Print the cluster as the scheduler sees it: routing-table epoch, each key range
    /// with the servers holding it, node liveness, replication lag.
    Status {
        #[command(flatten)]
        sched: SchedulerAddr,
        #[command(flatten)]
        security: SecurityArgs,
        #[command(flatten)]
        tls: TlsArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a server.
    Server(ServerArgs),
    /// Ask the scheduler to let a server leave gracefully (its ranges are handed over
    /// first; then it stops), or, with --worker, a worker (it finishes its clock, then
    /// the others take its shard; nobody waits for it). A server and a worker also leave
    /// this way on SIGTERM.
    Leave {
        #[command(flatten)]
        sched: SchedulerAddr,
        #[command(flatten)]
        security: SecurityArgs,
        #[command(flatten)]
        tls: TlsArgs,
        /// The server's rank.
        #[arg(long, required_unless_present = "worker", conflicts_with = "worker")]
        rank: Option<u32>,
        /// The worker's rank (a worker leaves instead of a server).
        #[arg(long, value_name = "RANK")]
        worker: Option<u32>,
    },
    /// Ask the scheduler for a checkpoint into DIR at the next epoch barrier: every
    /// server writes its ranges (values and optimizer state), then the manifest and
    /// DIR/latest are written; waits until it is written (or refused).
    Checkpoint {
        #[command(flatten)]
        sched: SchedulerAddr,
        #[command(flatten)]
        security: SecurityArgs,
        #[command(flatten)]
        tls: TlsArgs,
        /// The checkpoint folder (DIR/epoch-E/..., DIR/latest).
        dir: std::path::PathBuf,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Run a worker training sparse logistic regression.
    Worker(WorkerArgs),
    /// Write a new random cluster secret to FILE (which must not exist), readable by its
    /// owner only, for `--secret-file` / `PSERV_SECRET_FILE`.
    Secret {
        /// The file to create.
        file: std::path::PathBuf,
    },
    /// Make a cluster CA and one node certificate for TLS in DIR (created if needed;
    /// no file is overwritten): ca.pem, ca.key, node.pem, node.key (keys readable by
    /// their owner only). The node certificate carries the DNS name `pserv` every node
    /// verifies; give every node --tls-cert DIR/node.pem --tls-key DIR/node.key
    /// --tls-ca DIR/ca.pem (or PSERV_TLS_CERT, PSERV_TLS_KEY, PSERV_TLS_CA).
    TlsCerts {
        /// The folder to write them to.
        dir: std::path::PathBuf,
    },
    /// Run this process's role in a cluster a cluster manager started (Slurm, MPI/PMI,
    /// torchrun-style, Kubernetes or plain PSERV_* variables): global rank 0 is the
    /// scheduler, ranks 1..=S servers, the rest workers (the built-in LR worker, or CMD).
    Launch(LaunchArgs),
}

/// Flags of `pserv local`.
#[derive(clap::Args, Debug)]
pub(super) struct LocalArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// Server update function (default: `sgd:<lr>`).
    #[arg(long, env = "PSERV_UPDATE")]
    update: Option<UpdateSpec>,
    /// Kill the cluster if it has not finished after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
    /// At the end, every server writes its part of the model to DIR/model-RANK.bin.
    #[arg(long, env = "PSERV_DUMP_MODEL")]
    dump_model: Option<std::path::PathBuf>,
    /// SIGKILL one server this many seconds after the workers started (the failure
    /// path: with --replicas its ranges pass to their replicas and training goes on).
    #[arg(long)]
    kill_server_after: Option<f64>,
    /// Which server --kill-server-after kills (default: the last).
    #[arg(long)]
    kill_server: Option<u32>,
    /// SIGKILL the last worker this many seconds after the workers started (elastic
    /// workers: its data shard passes to the others from the next epoch, unless
    /// --skip-departed).
    #[arg(long)]
    kill_worker_after: Option<f64>,
    /// SIGKILL the scheduler this many seconds after the workers started (the launcher
    /// restarts it with --recover on the same address, and the job goes on).
    #[arg(long)]
    kill_scheduler_after: Option<f64>,
    /// Start one more server this many seconds after the workers started; it joins
    /// the running cluster (`pserv server --join`).
    #[arg(long)]
    add_server_after: Option<f64>,
    /// Start one more worker this many seconds after the workers started; it joins
    /// the running job and gets a share of the data from the next epoch
    /// (under every consistency model: it enters at the next barrier, or at the start of
    /// the epoch `--join-at-epoch` names).
    #[arg(long)]
    add_worker_after: Option<f64>,
    /// Replace failed workers: the scheduler keeps a failed worker's place and the
    /// launcher starts `pserv worker --replace RANK` for it (up to 3 times per rank).
    #[command(flatten)]
    replace: crate::cli::roles::ReplaceArgs,
    #[command(flatten)]
    repl: ReplArgs,
    #[command(flatten)]
    checkpoint: crate::checkpoint::CheckpointArgs,
    /// Servers apply pushes that hold NaN or infinite values (by default such a push is
    /// refused whole, and the job fails with the reason).
    #[arg(long, env = "PSERV_ALLOW_NON_FINITE")]
    allow_non_finite: bool,
}

impl LocalArgs {
    /// Check the flags and plan the cluster (`exe_prefix`: see [`main`]).
    pub(super) fn plan(self, exe_prefix: Vec<String>) -> Result<LocalPlan, EngineError> {
        let LocalArgs {
            mut cluster,
            job,
            net,
            output,
            update,
            timeout_secs,
            dump_model,
            kill_server_after,
            kill_server,
            kill_worker_after,
            kill_scheduler_after,
            add_server_after,
            add_worker_after,
            replace,
            repl,
            checkpoint,
            allow_non_finite,
        } = self;
        net.tcp()?;
        job.check()?;
        checkpoint.check()?;
        // Children start elsewhere: give them absolute folders.
        let abs = |d: std::path::PathBuf| std::path::absolute(&d).unwrap_or(d);
        let checkpoint = crate::checkpoint::CheckpointArgs {
            checkpoint_dir: checkpoint.checkpoint_dir.map(abs),
            ..checkpoint
        };
        let mut job = job;
        job.restore = job.restore.map(abs);
        let update = update.unwrap_or(job.update_spec());
        // The scheduler gets the replicas resolved.
        cluster.replicas = Some(cluster.spec(update)?.replicas);
        // A host that the OS cannot restart by its own path plus a prefix (an interpreter
        // whose current_exe is the system's, not the environment's) names itself.
        let exe = match std::env::var_os("PSERV_SELF_EXE") {
            Some(exe) if !exe.is_empty() => std::path::PathBuf::from(exe),
            _ => std::env::current_exe().map_err(|source| EngineError::Io {
                context: "finding the pserv executable".into(),
                source,
            })?,
        };
        Ok(LocalPlan {
            exe,
            exe_prefix,
            kill_server: match after("--kill-server-after", kill_server_after)? {
                Some(d) => {
                    let rank = kill_server.unwrap_or(cluster.servers - 1);
                    if rank >= cluster.servers {
                        return Err(EngineError::Config(format!(
                            "--kill-server {rank}: there are {} servers",
                            cluster.servers
                        )));
                    }
                    Some((rank, d))
                }
                None => None,
            },
            kill_worker: after("--kill-worker-after", kill_worker_after)?
                .map(|d| (cluster.workers - 1, d)),
            kill_scheduler: after("--kill-scheduler-after", kill_scheduler_after)?,
            add_worker: after("--add-worker-after", add_worker_after)?,
            add_server: after("--add-server-after", add_server_after)?,
            replace,
            cluster,
            update,
            net,
            repl,
            job,
            dump_model,
            summary_json: output.summary_json,
            allow_non_finite,
            timeout: Duration::from_secs(timeout_secs),
            checkpoint,
        })
    }
}

/// Run the `pserv` command line on `args` (the first is the program name) and return the
/// exit code. `exe_prefix` are the arguments the current executable needs before a
/// `pserv` subcommand: empty for the `pserv` binary; e.g. `["pserv"]` for a binary that
/// dispatches `BIN pserv ...` here. `local` starts its processes as
/// `current_exe exe_prefix... ROLE ...` (`$PSERV_SELF_EXE` instead of `current_exe` when
/// set: the Python package's `python -m pserv` sets its interpreter there).
pub fn main(args: Vec<OsString>, exe_prefix: Vec<String>) -> ExitCode {
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            // A `local` run asked for a summary file: it says why there is no result
            // (a caller reading it must not find an old run's metrics).
            if e.use_stderr() {
                if let Some(p) = summary_json_of(&args) {
                    let failed = serde_json::json!({ "error": e.render().to_string().trim() });
                    let _ = std::fs::write(p, failed.to_string());
                }
            }
            e.exit()
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A host binary may have set a subscriber already; keep it then.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.cmd {
        Cmd::Launch(launch) => run_launch(launch),
        cmd => run(cmd, exe_prefix).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pserv: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// How `status`, `leave` and `checkpoint` reach the scheduler, from their flags.
fn access(security: &SecurityArgs, tls: &TlsArgs) -> Result<Access, EngineError> {
    Ok(Access {
        security: security.security()?,
        tls: tls.tls()?,
    })
}

/// The `--summary-json` file of a `pserv local` command line clap refused (the flag's
/// value, else `PSERV_SUMMARY_JSON`); `None` for other subcommands.
fn summary_json_of(args: &[OsString]) -> Option<std::path::PathBuf> {
    let args: Vec<&str> = args.iter().skip(1).filter_map(|a| a.to_str()).collect();
    if !args.contains(&"local") {
        return None;
    }
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--summary-json=") {
            return Some(v.into());
        }
        if *a == "--summary-json" {
            return args.get(i + 1).map(|v| v.into());
        }
    }
    std::env::var_os("PSERV_SUMMARY_JSON").map(Into::into)
}

/// Run one subcommand (`launch` runs its role through here too).
pub(super) fn run(cmd: Cmd, exe_prefix: Vec<String>) -> Result<(), EngineError> {
    match cmd {
        // `main` runs it (it has an exit status of its own); a role it derives never is.
        Cmd::Launch(_) => Err(EngineError::Config(
            "pserv launch runs only as the command itself".into(),
        )),
        Cmd::Local(local) => {
            // A flag refused while planning: the summary says so too (no stale metrics).
            let summary_path = local.output.summary_json.clone();
            let plan = local.plan(exe_prefix).inspect_err(|e| {
                if let Some(p) = &summary_path {
                    crate::cli::local::write_failed_summary(p, e);
                }
            })?;
            let summary = run_local(&plan)?;
            println!(
                "summary: {}",
                serde_json::to_string(&summary).expect("json encodes")
            );
            Ok(())
        }
        Cmd::Scheduler(SchedulerArgs {
            listen,
            cluster,
            net,
            output,
            update,
            port_file,
            progress,
            register_timeout_secs,
            heartbeat_timeout_ms,
            recover,
            recover_wait_ms,
            checkpoint,
            restore,
            replace,
        }) => {
            checkpoint.check()?;
            let spec = cluster.spec(update)?;
            let restored = match &restore.restore {
                Some(dir) => {
                    let ck = crate::checkpoint::Checkpoint::open_manifest(dir)?;
                    ck.check_cluster(spec.value_type, spec.value_len, &spec.update)?;
                    tracing::info!(
                        epoch = ck.manifest.epoch,
                        dir = %ck.dir.display(),
                        "restoring the job from a checkpoint"
                    );
                    Some((ck.manifest.epoch, ck.manifest.job))
                }
                None => None,
            };
            let (restored_epoch, restored_job) = restored.unwrap_or_default();
            run_scheduler(SchedulerConfig {
                checkpoint: crate::scheduler::CheckpointPlan {
                    every: checkpoint.checkpoint_every,
                    dir: checkpoint
                        .checkpoint_dir
                        .map(|d| std::path::absolute(&d).unwrap_or(d)),
                    restored_epoch,
                    restored_job,
                },
                listen,
                spec,
                tcp: net.tcp()?,
                security: net.security.security()?,
                port_file,
                summary_json: output.summary_json,
                progress,
                register_timeout: Duration::from_secs(register_timeout_secs),
                heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms.max(1)),
                recover: recover.then(|| Duration::from_millis(recover_wait_ms)),
                replace_workers: replace.wait(),
            })?;
            Ok(())
        }
        Cmd::Status {
            sched,
            security,
            tls,
            json,
        } => {
            let report = crate::cli::status::fetch(
                sched.scheduler,
                &access(&security, &tls)?,
                Duration::from_secs(5),
            )?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("json encodes")
                );
            } else {
                print!("{}", crate::cli::status::render(&report));
            }
            Ok(())
        }
        Cmd::Server(ServerArgs {
            sched,
            listen,
            rank,
            shards,
            dump_model,
            net,
            repl,
            join,
            key_cache_keys,
            allow_non_finite,
            scheduler_grace_secs,
            restore,
        }) => {
            let mut cfg = ServerConfig::new(sched.scheduler);
            cfg.restore = restore.restore;
            cfg.allow_non_finite = allow_non_finite;
            cfg.scheduler_grace = Duration::from_secs(scheduler_grace_secs);
            cfg.key_cache_keys = key_cache_keys;
            cfg.replication = repl.config();
            cfg.join = join;
            cfg.listen = listen;
            cfg.rank = rank;
            cfg.shards = shards.max(1);
            cfg.dump_model = dump_model;
            cfg.tcp = net.tcp()?;
            cfg.security = net.security.security()?;
            cfg.transport = net.transport;
            Server::start(cfg)?.run()
        }
        Cmd::Leave {
            sched,
            security,
            tls,
            rank,
            worker,
        } => {
            let msg = match (rank, worker) {
                (_, Some(rank)) => Control::WorkerLeave { rank },
                (Some(rank), None) => Control::Leave { rank },
                (None, None) => unreachable!("clap requires --rank or --worker"),
            };
            crate::cli::status::leave(sched.scheduler, &access(&security, &tls)?, msg)
        }
        Cmd::Checkpoint {
            sched,
            security,
            tls,
            dir,
            timeout_secs,
        } => crate::cli::status::checkpoint(
            sched.scheduler,
            &access(&security, &tls)?,
            &dir,
            Duration::from_secs(timeout_secs.max(1)),
        ),
        Cmd::TlsCerts { dir } => {
            crate::cli::tls_certs::write(&dir)?;
            println!(
                "wrote a cluster CA ({0}/ca.pem, key {0}/ca.key) and a node certificate ({0}/node.pem, key {0}/node.key, DNS name `pserv`); start every node with --tls-cert {0}/node.pem --tls-key {0}/node.key --tls-ca {0}/ca.pem",
                dir.display()
            );
            Ok(())
        }
        Cmd::Secret { file } => {
            pserv_transport::Secret::create_file(&file)
                .map_err(|e| EngineError::Config(e.to_string()))?;
            println!(
                "wrote a new cluster secret to {} (readable by its owner only); give it to every node with --secret-file or PSERV_SECRET_FILE",
                file.display()
            );
            Ok(())
        }
        Cmd::Worker(WorkerArgs {
            sched,
            rank,
            replace,
            spin_us,
            job,
            net,
        }) => {
            job.check()?;
            let mut cfg = WorkerConfig::new(sched.scheduler);
            cfg.rank = rank;
            cfg.replace = replace;
            cfg.spin_us = spin_us;
            cfg.consistency = job.consistency;
            cfg.tcp = net.tcp()?;
            cfg.security = net.security.security()?;
            cfg.transport = net.transport;
            cfg.key_cache = job.key_cache;
            cfg.compress = job.compress;
            let worker = Worker::connect(cfg)?;
            // SIGTERM: leave gracefully (finish the clock, hand the shard back).
            if let Err(e) =
                signal_hook::flag::register(signal_hook::consts::SIGTERM, worker.leave_flag())
            {
                tracing::warn!(error = %e, "cannot catch SIGTERM; it will stop the worker at once");
            }
            crate::job::run_lr_worker(worker, &job)
        }
    }
}

/// How a chain's head batches replication (replication after aggregation).
#[derive(clap::Args, Clone, Debug)]
pub struct ReplArgs {
    /// Send a replication batch once it holds this many pushes (1: no aggregation).
    #[arg(long, env = "PSERV_REPLICATION_BATCH", default_value_t = 32)]
    pub replication_batch: usize,
    /// Send a replication batch once its oldest push waited this many microseconds; 0
    /// (the default): wait for no timer, send the pending batches as soon as no other
    /// push is being applied on this server (pushes applied at the same time share a
    /// batch: group commit).
    #[arg(long, env = "PSERV_REPLICATION_WINDOW_US", default_value_t = 0)]
    pub replication_window_us: u64,
}

impl ReplArgs {
    /// The server's replication settings.
    pub fn config(&self) -> crate::replication::ReplicationConfig {
        crate::replication::ReplicationConfig {
            max_pushes: self.replication_batch.max(1),
            window: Duration::from_micros(self.replication_window_us),
            group_commit: true,
            remember_all: false,
        }
    }

    /// The same flags for a server command line.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--replication-batch={}", self.replication_batch),
            format!("--replication-window-us={}", self.replication_window_us),
        ]
    }
}

/// A `--...-after SECS` flag as a duration (0 or more seconds).
fn after(flag: &str, secs: Option<f64>) -> Result<Option<Duration>, EngineError> {
    match secs {
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(EngineError::Config(format!(
            "{flag} {s}: expected seconds, 0 or more"
        ))),
        None => Ok(None),
    }
}
