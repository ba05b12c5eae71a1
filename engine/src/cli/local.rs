//! `pserv local`: a whole cluster on this machine, each role its own OS process on
//! 127.0.0.1: one scheduler, S servers, W workers.
//!
//! The launcher starts the scheduler on port 0 and learns its address from a port file,
//! then starts the servers and workers, and waits. If any process fails, or the time limit
//! passes, every process it started is killed (by pid, through its `Child`), and the
//! error names the one that failed.
//!
//! Authentication: unless `--secret-file` names one or `--insecure` turns it off, the
//! launcher writes a fresh cluster secret into its run folder (readable by its owner only)
//! and hands its path to every child in `PSERV_SECRET_FILE`.
//!
//! Lifecycles: every child is started with [`pserv_sys::process::die_with_parent`], so
//! it gets SIGKILL when the launcher dies, however it dies (SIGKILL included). SIGTERM,
//! SIGINT, SIGHUP or SIGQUIT sent to the launcher alone (a service manager, `kill PID`, a
//! CI timeout) is forwarded to every child as the same signal; the children get
//! [`STOP_GRACE`] to exit, what is left is killed, the run folder is removed, and the
//! launcher fails with an error naming the signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::base::error::EngineError;
use crate::base::security::SECRET_ENV;
use crate::cli::app::ReplArgs;
use crate::cli::args::{ClusterArgs, NetArgs};
use crate::cli::roles::{SchedulerLaunch, ServerLaunch, WorkerLaunch};
use crate::job::JobArgs;
use crate::update::UpdateSpec;

/// What `pserv local` starts: typed flags of the whole cluster, from which each child's
/// config is built ([`LocalPlan::scheduler`], [`LocalPlan::server`], [`LocalPlan::worker`]).
#[derive(Clone, Debug)]
pub struct LocalPlan {
    /// The executable that runs the `pserv` command line.
    pub exe: PathBuf,
    /// Arguments before the role subcommand (empty for the `pserv` binary; see
    /// [`crate::cli::app::main`]).
    pub exe_prefix: Vec<String>,
    /// The cluster's shape (the scheduler's flags; `replicas` as the scheduler gets it).
    pub cluster: ClusterArgs,
    /// The servers' default update function.
    pub update: UpdateSpec,
    /// Transport flags of every process.
    pub net: NetArgs,
    /// Replication flags of every server.
    pub repl: ReplArgs,
    /// The job's flags, given to every worker.
    pub job: JobArgs,
    /// At the end, every server writes its part of the model to DIR/model-RANK.bin.
    pub dump_model: Option<PathBuf>,
    /// Where the scheduler writes the summary.
    pub summary_json: Option<PathBuf>,
    /// Servers apply pushes with non-finite values (`--allow-non-finite`).
    pub allow_non_finite: bool,
    /// Kill everything after this long.
    pub timeout: Duration,
    /// SIGKILL server `rank` this long after the workers started (`--kill-server-after`):
    /// the failure path on one machine. Its death does not fail the run.
    pub kill_server: Option<(u32, Duration)>,
    /// SIGKILL worker `rank` this long after the workers started (`--kill-worker-after`):
    /// its data shard passes to the others from the next epoch. Its death does not fail
    /// the run.
    pub kill_worker: Option<(u32, Duration)>,
    /// SIGKILL the scheduler this long after the workers started
    /// (`--kill-scheduler-after`): the launcher restarts it with `--recover`.
    pub kill_scheduler: Option<Duration>,
    /// Start one more server (`server --join`) this long after the workers started
    /// (`--add-server-after`).
    pub add_server: Option<Duration>,
    /// Start one more worker this long after the workers started (`--add-worker-after`);
    /// it joins the running job and gets a share of the data from the next epoch.
    pub add_worker: Option<Duration>,
    /// The scheduler's `--checkpoint-every` and `--checkpoint-dir` (the job's `--restore`
    /// goes to the scheduler and every server as well as to the workers).
    pub checkpoint: crate::checkpoint::CheckpointArgs,
    /// `--replace-failed-workers`: the scheduler keeps a failed worker's place and the
    /// launcher starts a replacement for it (at most [`MAX_REPLACEMENTS`] per rank).
    pub replace: crate::cli::roles::ReplaceArgs,
}

/// How many replacements `pserv local --replace-failed-workers` starts for one rank.
pub const MAX_REPLACEMENTS: u32 = 3;

impl LocalPlan {
    /// The scheduler's config: on port 0 of 127.0.0.1, writing its address to
    /// `port_file` and the job summary to `summary`, drawing the progress bar.
    pub fn scheduler(&self, port_file: &Path, summary: &Path) -> SchedulerLaunch {
        SchedulerLaunch {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            port_file: Some(port_file.to_path_buf()),
            summary_json: Some(summary.to_path_buf()),
            cluster: self.cluster.clone(),
            update: self.update,
            progress: true,
            recover: false,
            net: self.net.clone(),
            checkpoint: self.checkpoint.clone(),
            restore: self.job.restore.clone(),
            replace: self.replace,
        }
    }

    /// Server `rank`'s config; with no rank, a server that joins the running cluster.
    pub fn server(&self, scheduler: SocketAddr, rank: Option<u32>) -> ServerLaunch {
        ServerLaunch {
            scheduler,
            rank,
            join: rank.is_none(),
            net: self.net.clone(),
            repl: self.repl.clone(),
            dump_model: self.dump_model.clone(),
            allow_non_finite: self.allow_non_finite,
            // A server that joins copies its ranges from the running ones.
            restore: self.job.restore.clone().filter(|_| rank.is_some()),
        }
    }

    /// With `--restore`: refuse, before any process starts, a checkpoint that fails
    /// verification or does not fit this cluster and job (every role checks again).
    pub fn check_restore(&self) -> Result<(), EngineError> {
        let Some(ck) = self.job.restored()? else {
            return Ok(());
        };
        // Every file's length and checksum too.
        let ck = crate::checkpoint::Checkpoint::open(&ck.dir)?;
        ck.check_cluster(
            self.cluster.value_type,
            self.cluster.value_len,
            &self.update,
        )?;
        eprintln!(
            "pserv local: restoring from {} (after epoch {}, written by {} server(s)); \
             training resumes at epoch {}",
            ck.dir.display(),
            ck.manifest.epoch,
            ck.manifest.files.len(),
            ck.manifest.epoch + 1
        );
        Ok(())
    }

    /// Worker `rank`'s config; with no rank, a worker that joins the running job.
    pub fn worker(&self, scheduler: SocketAddr, rank: Option<u32>) -> WorkerLaunch {
        WorkerLaunch {
            scheduler,
            rank,
            replace: None,
            job: self.job.clone(),
            net: self.net.clone(),
        }
    }

    /// The config of a worker that takes over failed worker `rank`'s place.
    pub fn replacement(&self, scheduler: SocketAddr, rank: u32) -> WorkerLaunch {
        WorkerLaunch {
            replace: Some(rank),
            ..self.worker(scheduler, None)
        }
    }
}

struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    /// The end of what the child wrote to stderr (servers and workers), forwarded to the
    /// launcher's stderr as it comes: a failure names its reason.
    stderr: Option<StderrTail>,
}

/// The last bytes a child wrote to stderr, kept by the thread that forwards them.
struct StderrTail {
    tail: std::sync::Arc<parking_lot::Mutex<Vec<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

/// Bytes of a child's stderr kept for its failure message.
const STDERR_TAIL: usize = 8 << 10;

impl StderrTail {
    /// Forward `from` to this process's stderr on a thread, keeping its last bytes.
    fn start(name: &str, mut from: std::process::ChildStderr) -> Option<StderrTail> {
        use std::io::{Read, Write};
        let tail = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let keep = tail.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pserv-local-{}", name.replace(' ', "-")))
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match from.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let _ = std::io::stderr().write_all(&buf[..n]);
                            let mut t = keep.lock();
                            t.extend_from_slice(&buf[..n]);
                            let extra = t.len().saturating_sub(STDERR_TAIL);
                            t.drain(..extra);
                        }
                    }
                }
            })
            .ok()?;
        Some(StderrTail { tail, thread })
    }

    /// The child's last error line (the `pserv: error:` line and its causes, else its
    /// last non-empty line), once its stderr ended (waited for at most 1 s).
    fn last_words(&self) -> Option<String> {
        let until = Instant::now() + Duration::from_secs(1);
        while !self.thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = self.tail.lock();
        let text = strip_ansi(&String::from_utf8_lossy(&t));
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        match lines.iter().rposition(|l| l.starts_with("pserv: error:")) {
            Some(i) => Some(lines[i..].join(" ")),
            None => lines.last().map(|l| l.to_string()),
        }
    }
}

/// `s` without ANSI escape sequences (colours of a child's log).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How long children get to exit after a signal was forwarded to them, before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// The signals the launcher forwards to its children (then stops).
const FORWARDED: [i32; 4] = [
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGQUIT,
];

/// Kills (by pid) every process still running when dropped.
struct Procs(Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if p.status.is_none() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

fn spawn(plan: &LocalPlan, name: String, args: Vec<String>) -> Result<Proc, EngineError> {
    tracing::debug!(%name, ?args, "starting");
    let exe = &plan.exe;
    let mut cmd = Command::new(exe);
    cmd.args(&plan.exe_prefix).args(&args);
    // The secret file's path goes in the environment, not on the command line.
    cmd.env_remove(SECRET_ENV);
    if let Some(p) = &plan.net.security.secret_file {
        cmd.env(SECRET_ENV, p);
    }
    // The scheduler keeps the terminal (its progress bar); the others' stderr passes
    // through the launcher, which keeps its end for a failure message.
    let piped = name != "scheduler";
    if piped {
        cmd.stderr(std::process::Stdio::piped());
    }
    let mut child = pserv_sys::process::die_with_parent(&mut cmd)
        .spawn()
        .map_err(|source| EngineError::Io {
            context: format!("starting {name} ({})", exe.display()),
            source,
        })?;
    let stderr = child
        .stderr
        .take()
        .and_then(|e| StderrTail::start(&name, e));
    Ok(Proc {
        name,
        child,
        status: None,
        stderr,
    })
}

fn scratch_dir() -> Result<PathBuf, EngineError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("pserv-local-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| EngineError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// Run the cluster to the end. Returns the job summary the scheduler wrote. The data
/// files are checked first (before any process starts); on any failure the summary file,
/// if one was asked for, holds only the error ([`write_failed_summary`]).
pub fn run_local(plan: &LocalPlan) -> Result<serde_json::Value, EngineError> {
    let result = plan
        .job
        .check_files()
        .and_then(|()| plan.check_restore())
        .and_then(|()| {
        if let (Some(data), Some(test)) = (&plan.job.data, &plan.job.test_data) {
            eprintln!(
                "pserv local: training on all of {}, evaluating on {} (--test-fraction is not used)",
                data.display(),
                test.display()
            );
        }
        // Caught before any child exists, so no signal is lost in between.
        let mut signals =
            signal_hook::iterator::Signals::new(FORWARDED).map_err(|source| EngineError::Io {
                context: "catching SIGTERM, SIGINT, SIGHUP, SIGQUIT".into(),
                source,
            })?;
        let dir = scratch_dir()?;
        let result = run_in(plan, &dir, &mut signals);
        signals.handle().close();
        let _ = std::fs::remove_dir_all(&dir);
        result
    });
    if let (Err(e), Some(path)) = (&result, &plan.summary_json) {
        write_failed_summary(path, e);
    }
    result
}

/// Write a failed run's summary to `path`: only `{"error": ...}`, no metric that could be
/// taken for a result (a warning in the log if the file cannot be written).
pub fn write_failed_summary(path: &Path, error: &EngineError) {
    let failed = serde_json::json!({ "error": error.to_string() });
    if let Err(w) = std::fs::write(path, failed.to_string()) {
        tracing::warn!(path = %path.display(), error = %w, "could not write the failed run's summary");
    }
}

fn run_in(
    plan: &LocalPlan,
    dir: &Path,
    signals: &mut signal_hook::iterator::Signals,
) -> Result<serde_json::Value, EngineError> {
    let deadline = Instant::now() + plan.timeout;
    // A cluster secret for this job, unless one was given or authentication is off; it
    // lives in the run folder (owner-only) and goes when the folder does.
    let mut with_secret;
    let plan = if !plan.net.security.insecure && plan.net.security.secret_file.is_none() {
        let path = dir.join("secret");
        pserv_transport::Secret::create_file(&path)
            .map_err(|e| EngineError::Config(e.to_string()))?;
        with_secret = plan.clone();
        with_secret.net.security.secret_file = Some(path);
        &with_secret
    } else {
        plan
    };
    let port_file = dir.join("scheduler.addr");
    let summary = plan
        .summary_json
        .clone()
        .unwrap_or_else(|| dir.join("summary.json"));
    let mut procs = Procs(Vec::new());
    let args = plan.scheduler(&port_file, &summary).to_args();
    procs.0.push(spawn(plan, "scheduler".into(), args)?);

    // Wait for the scheduler's address.
    let addr: SocketAddr = loop {
        if let Ok(s) = std::fs::read_to_string(&port_file) {
            break s.trim().parse().map_err(|e| {
                EngineError::Config(format!(
                    "the scheduler wrote {s:?} to {}: {e}",
                    port_file.display()
                ))
            })?;
        }
        check(&mut procs, deadline, signals)?;
        std::thread::sleep(Duration::from_millis(10));
    };
    for rank in 0..plan.cluster.servers {
        let args = plan.server(addr, Some(rank)).to_args();
        procs.0.push(spawn(plan, format!("server {rank}"), args)?);
    }
    let workers_started = Instant::now();
    for rank in 0..plan.cluster.workers {
        let args = plan.worker(addr, Some(rank)).to_args();
        procs.0.push(spawn(plan, format!("worker {rank}"), args)?);
    }
    // Wait for every process to exit successfully.
    let mut kills: Vec<(String, Duration)> = plan
        .kill_server
        .iter()
        .map(|(r, d)| (format!("server {r}"), *d))
        .chain(
            plan.kill_worker
                .iter()
                .map(|(r, d)| (format!("worker {r}"), *d)),
        )
        .chain(plan.kill_scheduler.map(|d| ("scheduler".to_string(), d)))
        .collect();
    let mut restarts = 0u32;
    let mut replaced: std::collections::BTreeMap<u32, u32> = Default::default();
    let mut killed_worker_ms: Option<u64> = None;
    let mut add = plan.add_server;
    let mut add_worker = plan.add_worker;
    while procs.0.iter().any(|p| p.status.is_none()) {
        if let Some(after) = add_worker {
            if workers_started.elapsed() >= after {
                add_worker = None;
                let args = plan.worker(addr, None).to_args();
                procs.0.push(spawn(plan, "joining worker".into(), args)?);
                eprintln!(
                    "pserv local: started a worker that joins {:.2} s after the workers started",
                    after.as_secs_f64()
                );
            }
        }
        if let Some(after) = add {
            if workers_started.elapsed() >= after {
                add = None;
                let args = plan.server(addr, None).to_args();
                procs.0.push(spawn(plan, "joining server".into(), args)?);
                eprintln!(
                    "pserv local: started a server that joins {:.2} s after the workers started",
                    after.as_secs_f64()
                );
            }
        }
        let due: Vec<(String, Duration)> = kills
            .iter()
            .filter(|(_, after)| workers_started.elapsed() >= *after)
            .cloned()
            .collect();
        kills.retain(|(_, after)| workers_started.elapsed() < *after);
        for (name, after) in due {
            if let Some(p) = procs.0.iter_mut().find(|p| p.name == name) {
                if p.status.is_none() && name == "scheduler" {
                    // Reaped (and restarted) below, as any scheduler that dies.
                    let _ = p.child.kill();
                    eprintln!(
                        "pserv local: killed the scheduler (pid {}) with SIGKILL {:.2} s after the workers started",
                        p.child.id(),
                        after.as_secs_f64()
                    );
                } else if p.status.is_none() {
                    let pid = p.child.id();
                    let _ = p.child.kill();
                    if let Ok(st) = p.child.wait() {
                        p.status = Some(st);
                    }
                    eprintln!(
                        "pserv local: killed {name} (pid {pid}) with SIGKILL {:.2} s after the workers started",
                        after.as_secs_f64()
                    );
                    if name.starts_with("worker") {
                        killed_worker_ms = Some(crate::job::unix_ms());
                    }
                    if let Some(rank) =
                        worker_rank_of(&name).filter(|_| plan.replace.replace_failed_workers)
                    {
                        replace_worker(plan, &mut procs, addr, rank, &mut replaced)?;
                    }
                }
            }
        }
        if plan.replace.replace_failed_workers {
            // A worker (or a replacement) that died: start a replacement for its rank.
            let mut failed = Vec::new();
            for p in procs.0.iter_mut().filter(|p| p.status.is_none()) {
                let Some(rank) = worker_rank_of(&p.name) else {
                    continue;
                };
                if let Ok(Some(st)) = p.child.try_wait() {
                    if !st.success() {
                        p.status = Some(st);
                        eprintln!(
                            "pserv local: {} (pid {}) failed: {st}",
                            p.name,
                            p.child.id()
                        );
                        failed.push(rank);
                    }
                }
            }
            for rank in failed {
                replace_worker(plan, &mut procs, addr, rank, &mut replaced)?;
            }
        }
        restart_dead_scheduler(
            plan,
            &mut procs,
            addr,
            (&port_file, &summary),
            &mut restarts,
        )?;
        check(&mut procs, deadline, signals)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&summary).map_err(|source| EngineError::Io {
        context: format!("reading the job summary {}", summary.display()),
        source,
    })?;
    let mut summary: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Config(format!("malformed job summary: {e}")))?;
    if let (Some(ms), Some(obj)) = (killed_worker_ms, summary.as_object_mut()) {
        // When --kill-worker-after struck (ms since the Unix epoch): with
        // --replace-failed-workers, `replacement_worker_N.first_ack_unix_ms` minus this is
        // the time to the replacement's first acknowledged push.
        obj.insert("killed_worker_unix_ms".into(), ms.into());
        let _ = std::fs::write(summary_path_of(plan, dir), summary.to_string());
    }
    Ok(summary)
}

/// Where the scheduler of a run in `dir` writes the summary.
fn summary_path_of(plan: &LocalPlan, dir: &Path) -> PathBuf {
    plan.summary_json
        .clone()
        .unwrap_or_else(|| dir.join("summary.json"))
}

/// The worker rank a child's name speaks of (`worker 3`, `worker 3 (replacement 1)`).
fn worker_rank_of(name: &str) -> Option<u32> {
    name.strip_prefix("worker ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Start a replacement for failed worker `rank` (`pserv worker --replace RANK`), at most
/// [`MAX_REPLACEMENTS`] per rank.
fn replace_worker(
    plan: &LocalPlan,
    procs: &mut Procs,
    addr: SocketAddr,
    rank: u32,
    replaced: &mut std::collections::BTreeMap<u32, u32>,
) -> Result<(), EngineError> {
    let n = replaced.entry(rank).or_default();
    if *n >= MAX_REPLACEMENTS {
        return Err(EngineError::Config(format!(
            "worker {rank} failed again after {MAX_REPLACEMENTS} replacements; stopping the cluster"
        )));
    }
    *n += 1;
    let args = plan.replacement(addr, rank).to_args();
    procs.0.push(spawn(
        plan,
        format!("worker {rank} (replacement {n})"),
        args,
    )?);
    eprintln!(
        "pserv local: started a replacement for worker {rank} (pserv worker --replace {rank})"
    );
    Ok(())
}

/// How many times one run restarts a scheduler that died.
pub const MAX_SCHEDULER_RESTARTS: u32 = 3;

/// A scheduler that died by a signal (SIGKILL, a crash) while the job runs is started
/// again on its address with `--recover` (up to [`MAX_SCHEDULER_RESTARTS`] times): the
/// servers and workers ride its absence out (they look for it for 10 s) and report
/// themselves to the new one. A scheduler that exits with a status (the job failed, a
/// bad flag) is left to [`check`].
fn restart_dead_scheduler(
    plan: &LocalPlan,
    procs: &mut Procs,
    addr: SocketAddr,
    (port_file, summary): (&Path, &Path),
    restarts: &mut u32,
) -> Result<(), EngineError> {
    use std::os::unix::process::ExitStatusExt;
    let Some(p) = procs
        .0
        .iter_mut()
        .find(|p| p.name.starts_with("scheduler") && p.status.is_none())
    else {
        return Ok(());
    };
    let Ok(Some(st)) = p.child.try_wait() else {
        return Ok(());
    };
    let Some(sig) = st.signal() else {
        // An exit status: `check` reaps and judges it.
        return Ok(());
    };
    p.status = Some(st);
    let pid = p.child.id();
    if *restarts >= MAX_SCHEDULER_RESTARTS {
        return Err(EngineError::Config(format!(
            "the scheduler (pid {pid}) died (signal {sig}) after {restarts} restarts; stopping the cluster"
        )));
    }
    *restarts += 1;
    let mut launch = plan.scheduler(port_file, summary);
    launch.listen = addr;
    launch.recover = true;
    procs.0.push(spawn(
        plan,
        format!("scheduler (restart {restarts})"),
        launch.to_args(),
    )?);
    eprintln!(
        "pserv local: the scheduler (pid {pid}) died (signal {sig}); restarted it with --recover on {addr}"
    );
    Ok(())
}

/// Reap exited processes; fail on the first failure, at the deadline, or on a signal
/// (forwarded to every child first, see [`stop_on_signal`]).
fn check(
    procs: &mut Procs,
    deadline: Instant,
    signals: &mut signal_hook::iterator::Signals,
) -> Result<(), EngineError> {
    if let Some(sig) = signals.pending().next() {
        return Err(stop_on_signal(procs, sig));
    }
    for p in &mut procs.0 {
        if p.status.is_none() {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.status = Some(st);
                if !st.success() {
                    let why = p
                        .stderr
                        .as_ref()
                        .and_then(StderrTail::last_words)
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default();
                    return Err(EngineError::Config(format!(
                        "{} (pid {}) failed: {st}{why}; stopping the cluster",
                        p.name,
                        p.child.id()
                    )));
                }
            }
        }
    }
    if Instant::now() > deadline {
        let running: Vec<&str> = procs
            .0
            .iter()
            .filter(|p| p.status.is_none())
            .map(|p| p.name.as_str())
            .collect();
        return Err(EngineError::Config(format!(
            "time limit reached; still running: {running:?}; stopping the cluster"
        )));
    }
    Ok(())
}

/// Forward `sig` to every running child, give them [`STOP_GRACE`] to exit, SIGKILL the
/// rest; the error to fail with.
fn stop_on_signal(procs: &mut Procs, sig: i32) -> EngineError {
    let name = signal_name(sig);
    let running: Vec<String> = procs
        .0
        .iter()
        .filter(|p| p.status.is_none())
        .map(|p| format!("{} (pid {})", p.name, p.child.id()))
        .collect();
    eprintln!(
        "pserv local: {name}: forwarding it to {}",
        running.join(", ")
    );
    let signal = rustix::process::Signal::from_named_raw(sig);
    for p in procs.0.iter().filter(|p| p.status.is_none()) {
        if let Some(s) = signal {
            let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&p.child), s);
        }
    }
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until && procs.0.iter().any(|p| p.status.is_none()) {
        for p in procs.0.iter_mut().filter(|p| p.status.is_none()) {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.status = Some(st);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut killed = Vec::new();
    for p in procs.0.iter_mut().filter(|p| p.status.is_none()) {
        let _ = p.child.kill();
        if let Ok(st) = p.child.wait() {
            p.status = Some(st);
        }
        killed.push(p.name.clone());
    }
    if !killed.is_empty() {
        eprintln!(
            "pserv local: SIGKILLed {} (still running {} s after {name})",
            killed.join(", "),
            STOP_GRACE.as_secs()
        );
    }
    EngineError::JobFailed(format!(
        "stopped by {name}: every process of the cluster was stopped and the run folder removed"
    ))
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGHUP => "SIGHUP",
        signal_hook::consts::SIGQUIT => "SIGQUIT",
        _ => "a signal",
    }
}
