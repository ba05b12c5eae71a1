//! `pserv local`: a whole cluster on this machine, each role its own OS process on
//! 127.0.0.1: one scheduler, S servers, W workers.
//!
//! The launcher starts the scheduler on port 0 and learns its address from a port file,
//! then starts the servers and workers, and waits. If any process fails, or the time limit
//! passes, every process it started is killed (by pid, through its `Child`), and the
//! error names the one that failed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::base::error::EngineError;

/// What `pserv local` starts.
#[derive(Clone, Debug)]
pub struct LocalPlan {
    /// The executable that runs the `pserv` command line.
    pub exe: PathBuf,
    /// Arguments before the role subcommand (empty for the `pserv` binary; see
    /// [`crate::cli::app::main`]).
    pub exe_prefix: Vec<String>,
    /// Arguments of the scheduler command (after `scheduler`), without the address flags.
    pub scheduler_args: Vec<String>,
    /// Arguments of every server command (after `server`), without the address flags.
    pub server_args: Vec<String>,
    /// Arguments of every worker command (after `worker`), without address and rank.
    pub worker_args: Vec<String>,
    /// Number of servers.
    pub servers: u32,
    /// Number of workers.
    pub workers: u32,
    /// Where the scheduler writes the summary.
    pub summary_json: Option<PathBuf>,
    /// Kill everything after this long.
    pub timeout: Duration,
    /// SIGKILL server `rank` this long after the workers started (`--kill-server-after`):
    /// the failure path on one machine. Its death does not fail the run.
    pub kill_server: Option<(u32, Duration)>,
    /// SIGKILL worker `rank` this long after the workers started (`--kill-worker-after`):
    /// its data shard passes to the others from the next epoch. Its death does not fail
    /// the run.
    pub kill_worker: Option<(u32, Duration)>,
    /// Start one more server (`server --join`) this long after the workers started
    /// (`--add-server-after`).
    pub add_server: Option<Duration>,
    /// Start one more worker this long after the workers started (`--add-worker-after`);
    /// it joins the running job and gets a share of the data from the next epoch.
    pub add_worker: Option<Duration>,
}

struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

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
    let child = Command::new(exe)
        .args(&plan.exe_prefix)
        .args(&args)
        .spawn()
        .map_err(|source| EngineError::Io {
            context: format!("starting {name} ({})", exe.display()),
            source,
        })?;
    Ok(Proc {
        name,
        child,
        status: None,
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

/// Run the cluster to the end. Returns the job summary the scheduler wrote.
pub fn run_local(plan: &LocalPlan) -> Result<serde_json::Value, EngineError> {
    let dir = scratch_dir()?;
    let result = run_in(plan, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(plan: &LocalPlan, dir: &Path) -> Result<serde_json::Value, EngineError> {
    let deadline = Instant::now() + plan.timeout;
    let port_file = dir.join("scheduler.addr");
    let summary = plan
        .summary_json
        .clone()
        .unwrap_or_else(|| dir.join("summary.json"));
    let mut procs = Procs(Vec::new());
    let mut args = vec![
        "scheduler".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--port-file={}", port_file.display()),
        format!("--summary-json={}", summary.display()),
    ];
    args.extend(plan.scheduler_args.iter().cloned());
    procs.0.push(spawn(plan, "scheduler".into(), args)?);

    // Wait for the scheduler's address.
    let addr = loop {
        if let Ok(s) = std::fs::read_to_string(&port_file) {
            break s.trim().to_string();
        }
        check(&mut procs, deadline)?;
        std::thread::sleep(Duration::from_millis(10));
    };
    for rank in 0..plan.servers {
        let mut a = vec![
            "server".to_string(),
            format!("--scheduler={addr}"),
            format!("--rank={rank}"),
        ];
        a.extend(plan.server_args.iter().cloned());
        procs.0.push(spawn(plan, format!("server {rank}"), a)?);
    }
    let workers_started = Instant::now();
    for rank in 0..plan.workers {
        let mut a = vec![
            "worker".to_string(),
            format!("--scheduler={addr}"),
            format!("--rank={rank}"),
        ];
        a.extend(plan.worker_args.iter().cloned());
        procs.0.push(spawn(plan, format!("worker {rank}"), a)?);
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
        .collect();
    let mut add = plan.add_server;
    let mut add_worker = plan.add_worker;
    while procs.0.iter().any(|p| p.status.is_none()) {
        if let Some(after) = add_worker {
            if workers_started.elapsed() >= after {
                add_worker = None;
                let mut a = vec!["worker".to_string(), format!("--scheduler={addr}")];
                a.extend(plan.worker_args.iter().cloned());
                procs.0.push(spawn(plan, "joining worker".into(), a)?);
                eprintln!(
                    "pserv local: started a worker that joins {:.2} s after the workers started",
                    after.as_secs_f64()
                );
            }
        }
        if let Some(after) = add {
            if workers_started.elapsed() >= after {
                add = None;
                let mut a = vec![
                    "server".to_string(),
                    format!("--scheduler={addr}"),
                    "--join".into(),
                ];
                a.extend(plan.server_args.iter().cloned());
                procs.0.push(spawn(plan, "joining server".into(), a)?);
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
                if p.status.is_none() {
                    let pid = p.child.id();
                    let _ = p.child.kill();
                    if let Ok(st) = p.child.wait() {
                        p.status = Some(st);
                    }
                    eprintln!(
                        "pserv local: killed {name} (pid {pid}) with SIGKILL {:.2} s after the workers started",
                        after.as_secs_f64()
                    );
                }
            }
        }
        check(&mut procs, deadline)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&summary).map_err(|source| EngineError::Io {
        context: format!("reading the job summary {}", summary.display()),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::Config(format!("malformed job summary: {e}")))
}

/// Reap exited processes; fail on the first failure or at the deadline.
fn check(procs: &mut Procs, deadline: Instant) -> Result<(), EngineError> {
    for p in &mut procs.0 {
        if p.status.is_none() {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.status = Some(st);
                if !st.success() {
                    return Err(EngineError::Config(format!(
                        "{} (pid {}) failed: {st}; stopping the cluster",
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
