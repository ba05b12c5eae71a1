//! A pserv cluster on 127.0.0.1 for one measurement: the scheduler and the server run as
//! subprocesses of the bench binary (hidden subcommands `__scheduler` and `__server`), the
//! workers are [`Worker`]s on threads of the bench process, one thread each.
//!
//! Every subprocess is held by a [`Children`] guard that kills it by pid when dropped,
//! so a failing or panicking bench leaves nothing behind. The scheduler writes its address
//! to a port file; the bench waits for it, then starts the server, then connects the
//! workers (the scheduler welcomes everybody once all have registered).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pserv_engine::error::EngineError;
use pserv_engine::keys::KeyRange;
use pserv_engine::onesided::TransportKind;
use pserv_engine::proto::{Status, ValueType};
use pserv_engine::scheduler::{run_scheduler, ClusterSpec, SchedulerConfig};
use pserv_engine::server::{Server, ServerConfig};
use pserv_engine::update::UpdateSpec;
use pserv_engine::worker::{Worker, WorkerConfig};
use pserv_transport::{RdmaMessages, ShmMessages, TcpConfig};

use crate::error::BenchError;

/// How long nodes wait for the cluster to complete.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the bench waits for the scheduler's port file.
const PORT_FILE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the bench waits for subprocesses to exit after the job ends.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Event-loop settings of one node kind (the parts of [`TcpConfig`] the bench varies).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct LoopSetup {
    /// Event-loop threads (0: `TcpConfig`'s default, one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Do not pin the loops to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// First core the loops are pinned to (default: the engine's automatic placement, by
    /// node id, see `TcpTransport::repin`).
    #[arg(long)]
    pub core_offset: Option<usize>,
    /// Busy-poll the loops for this long after activity (0: block at once).
    #[arg(long, default_value_t = 0)]
    pub busy_poll_us: u64,
    /// Move messages to peers on this host through shared memory
    /// (`ShmMessages::SameHost`); without it every message goes over TCP (what the
    /// `tcp` sections measure).
    #[arg(long)]
    pub shm_messages: bool,
    /// Move messages to every peer over RDMA verbs queue pairs
    /// (`RdmaMessages::AllPeers`; needs the bench's `rdma` feature and a device, else the
    /// connections stay on TCP). Excludes `--shm-messages`.
    #[arg(long, conflicts_with = "shm_messages")]
    pub rdma_messages: bool,
}

impl LoopSetup {
    /// `TcpConfig::default()`: a loop per core, pinned by node id, no busy polling.
    pub fn tcp_default() -> Self {
        LoopSetup {
            threads: 0,
            no_pin: false,
            core_offset: None,
            busy_poll_us: 0,
            shm_messages: false,
            rdma_messages: false,
        }
    }

    /// One loop pinned to `core`.
    pub fn one_on(core: usize) -> Self {
        LoopSetup {
            threads: 1,
            no_pin: false,
            core_offset: Some(core),
            busy_poll_us: 0,
            shm_messages: false,
            rdma_messages: false,
        }
    }

    /// The transport configuration.
    pub fn tcp(&self) -> TcpConfig {
        let d = TcpConfig::default();
        TcpConfig {
            threads: if self.threads == 0 {
                d.threads
            } else {
                self.threads
            },
            pin_cores: !self.no_pin,
            core_offset: self.core_offset,
            busy_poll_us: self.busy_poll_us,
            // A connection that offers shared memory offers nothing else: rdma turns it off.
            shm_messages: if self.shm_messages && !self.rdma_messages {
                ShmMessages::SameHost
            } else {
                ShmMessages::Off
            },
            rdma_messages: if self.rdma_messages {
                RdmaMessages::AllPeers
            } else {
                RdmaMessages::Off
            },
            ..d
        }
    }

    /// The command-line arguments that make a subprocess use these settings.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--threads".into(),
            self.threads.to_string(),
            "--busy-poll-us".into(),
            self.busy_poll_us.to_string(),
        ];
        if let Some(c) = self.core_offset {
            a.extend(["--core-offset".into(), c.to_string()]);
        }
        if self.no_pin {
            a.push("--no-pin".into());
        }
        if self.shm_messages {
            a.push("--shm-messages".into());
        }
        if self.rdma_messages {
            a.push("--rdma-messages".into());
        }
        a
    }

    /// A short description, e.g. "1 loop pinned to core 1, busy_poll_us=0".
    pub fn describe(&self) -> String {
        let threads = self.tcp().threads;
        let loops = match (self.threads, threads) {
            (0, n) => format!("{n} loops (a loop per core, the default)"),
            (_, 1) => "1 loop".to_string(),
            (_, n) => format!("{n} loops"),
        };
        let place = if self.no_pin {
            "unpinned".to_string()
        } else {
            match (self.core_offset, threads) {
                (None, _) => "pinned by node id (engine default)".to_string(),
                (Some(c), 1) => format!("pinned to core {c}"),
                (Some(c), _) => format!("pinned from core {c}"),
            }
        };
        let path = if self.rdma_messages {
            ", messages over rdma"
        } else if self.shm_messages {
            ", messages over shm"
        } else {
            ""
        };
        format!("{loops} {place}, busy_poll_us={}{path}", self.busy_poll_us)
    }
}

/// Arguments of the hidden `__scheduler` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct SchedulerArgs {
    /// Where to write the scheduler's address.
    #[arg(long)]
    pub port_file: PathBuf,
    /// Number of servers.
    #[arg(long, default_value_t = 1)]
    pub servers: u32,
    /// Number of workers.
    #[arg(long)]
    pub workers: u32,
    /// The scheduler's event loops.
    #[command(flatten)]
    pub loops: LoopSetup,
}

/// Arguments of the hidden `__server` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerArgs {
    /// The scheduler's address.
    #[arg(long)]
    pub scheduler: SocketAddr,
    /// Store shards.
    #[arg(long, default_value_t = 16)]
    pub shards: usize,
    /// The server's event loops.
    #[command(flatten)]
    pub loops: LoopSetup,
    /// The data path the server offers for a dense one-sided window (`auto`, `tcp`,
    /// `shm` or `rdma`, as the `pserv` server's `--transport`).
    #[arg(long, default_value = "tcp")]
    pub transport: TransportKind,
}

/// Body of the `__scheduler` subprocess: f32 values, one per key, update = sum.
pub fn scheduler_main(args: &SchedulerArgs) -> Result<(), BenchError> {
    run_scheduler(SchedulerConfig {
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        spec: ClusterSpec {
            servers: args.servers,
            workers: args.workers,
            value_type: ValueType::F32,
            value_len: 1,
            update: UpdateSpec::Sum,
            // The bench lays its dense ranges out per server: an even split.
            vnodes: 0,
            replicas: 0,
        },
        tcp: args.loops.tcp(),
        security: pserv_engine::Security::default(),
        port_file: Some(args.port_file.clone()),
        summary_json: None,
        progress: false,
        register_timeout: REGISTER_TIMEOUT,
        heartbeat_timeout: Duration::from_secs(3),
        recover: None,
        replace_workers: None,
        checkpoint: Default::default(),
    })?;
    Ok(())
}

/// Body of the `__server` subprocess.
pub fn server_main(args: &ServerArgs) -> Result<(), BenchError> {
    let mut cfg = ServerConfig::new(args.scheduler);
    cfg.tcp = args.loops.tcp();
    cfg.shards = args.shards;
    cfg.register_timeout = REGISTER_TIMEOUT;
    cfg.transport = args.transport;
    Server::start(cfg)?.run()?;
    Ok(())
}

/// How a cluster is laid out on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSetup {
    /// Number of workers (threads of the bench process).
    pub workers: u32,
    /// The server's event loops.
    pub server: LoopSetup,
    /// The workers' event loops; worker `i` starts at core
    /// `core_offset + i * worker_core_stride`.
    pub worker: LoopSetup,
    /// How far apart (in cores) the workers' loops start.
    pub worker_core_stride: usize,
    /// How long a worker's `wait` spins before it parks.
    pub spin_us: u64,
    /// Pin worker `i`'s application thread (the one that pushes, pulls and waits) to
    /// core `app_core + i`; `None`: let the operating system place it.
    pub app_core: Option<usize>,
    /// The data path of dense one-sided windows, for the server (`--transport`) and the
    /// workers (`WorkerConfig::transport`); `Tcp`: no windows, the two-sided path only.
    pub transport: TransportKind,
}

impl ClusterSetup {
    /// The loops of worker `rank`.
    pub fn worker_loops(&self, rank: u32) -> LoopSetup {
        LoopSetup {
            core_offset: self
                .worker
                .core_offset
                .map(|c| c + rank as usize * self.worker_core_stride),
            ..self.worker.clone()
        }
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        let app = match self.app_core {
            Some(c) => format!("application thread pinned to core {c} + i"),
            None => "application thread unpinned".into(),
        };
        let transport = match self.transport {
            TransportKind::Tcp => String::new(),
            t => format!(", --transport={t}"),
        };
        format!(
            "1 server ({}{transport}); {} worker{} ({}{}; {app}), spin_us={}; scheduler: 1 loop unpinned",
            self.server.describe(),
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            self.worker.describe(),
            if self.worker_core_stride == 0 {
                String::new()
            } else {
                format!(", worker i from core +{}*i", self.worker_core_stride)
            },
            self.spin_us
        )
    }
}

/// Child processes, killed by pid when dropped (also while unwinding from a panic).
#[derive(Debug, Default)]
pub struct Children(Vec<(String, Child)>);

impl Children {
    fn spawn(&mut self, name: &str, exe: &Path, args: &[String]) -> Result<(), BenchError> {
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| BenchError::Io {
                context: format!("starting the {name} ({})", exe.display()),
                source,
            })?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    /// The first child that has exited, with its status.
    fn exited(&mut self) -> Option<String> {
        self.0.iter_mut().find_map(|(name, c)| match c.try_wait() {
            Ok(Some(status)) => Some(format!("the {name} exited early ({status})")),
            _ => None,
        })
    }

    /// Wait up to `timeout` for every child to exit; kill those that do not. Returns an
    /// error naming the first that failed or had to be killed.
    fn wait_all(&mut self, timeout: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        let mut failure = None;
        for (name, child) in self.0.drain(..) {
            let mut child = child;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() && failure.is_none() {
                            failure = Some(format!("the {name} failed ({status})"));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        if failure.is_none() {
                            failure = Some(format!("the {name} did not exit; killed it"));
                        }
                        break;
                    }
                }
            }
        }
        failure.map_or(Ok(()), |f| Err(BenchError::Cluster(f)))
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A rendezvous of the worker threads (like `std::sync::Barrier`) that a panicking or
/// failing worker breaks, so the others return an error instead of waiting forever.
#[derive(Debug)]
pub struct SyncPoint {
    parties: usize,
    /// (arrived in this generation, generation, broken)
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl SyncPoint {
    /// A rendezvous of `parties` threads.
    pub fn new(parties: usize) -> Self {
        SyncPoint {
            parties,
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        }
    }

    /// Wait until all parties arrive. Fails if the rendezvous was broken.
    pub fn wait(&self) -> Result<(), BenchError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.2 {
            return Err(BenchError::Cluster("another worker failed".into()));
        }
        st.0 += 1;
        if st.0 == self.parties {
            st.0 = 0;
            st.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = st.1;
        while st.1 == generation && !st.2 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.1 == generation {
            return Err(BenchError::Cluster("another worker failed".into()));
        }
        Ok(())
    }

    /// Break the rendezvous: every waiter (now and later) gets an error.
    pub fn break_it(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.2 = true;
        self.cv.notify_all();
    }
}

/// Breaks a [`SyncPoint`] when dropped unless disarmed (a worker thread that returns an
/// error or panics).
struct BreakOnDrop<'a>(&'a SyncPoint, bool);

impl Drop for BreakOnDrop<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.break_it();
        }
    }
}

fn port_file_path() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("pserv-bench-{}-{n}.addr", std::process::id()))
}

fn wait_port_file(path: &Path, children: &mut Children) -> Result<SocketAddr, BenchError> {
    let deadline = Instant::now() + PORT_FILE_TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            let _ = std::fs::remove_file(path);
            return s.trim().parse().map_err(|e| {
                BenchError::Cluster(format!("bad scheduler address {s:?} in the port file: {e}"))
            });
        }
        if let Some(why) = children.exited() {
            return Err(BenchError::Cluster(why));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Cluster(format!(
                "the scheduler wrote no port file {} within {PORT_FILE_TIMEOUT:?}",
                path.display()
            )));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Wait until every server serves requests.
///
/// The scheduler welcomes workers right after servers, and a server answers `NotReady`
/// until it has built its store from the cluster table, so a worker's first request can
/// race the servers' start. Probe with a one-key pull until every server answers.
fn wait_servers_ready(worker: &Worker) -> Result<(), BenchError> {
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    for range in worker.cluster().partition.ranges() {
        let probe = KeyRange::new(range.begin, range.begin + 1);
        loop {
            match worker.wait(worker.pull_range::<f32>(probe)) {
                Ok(()) => break,
                Err(EngineError::Server {
                    status: Status::NotReady,
                    ..
                }) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Start a cluster laid out as `setup`, run `work` on every worker (each on its own
/// thread, with its rank and a shared [`SyncPoint`]), end the job, and return what each
/// worker returned, in rank order.
pub fn with_cluster<R, F>(setup: &ClusterSetup, work: F) -> Result<Vec<R>, BenchError>
where
    R: Send,
    F: Fn(&Worker, u32, &SyncPoint) -> Result<R, BenchError> + Sync,
{
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        context: "finding the bench executable".into(),
        source,
    })?;
    let mut children = Children::default();
    let port_file = port_file_path();
    let scheduler_loops = LoopSetup {
        threads: 1,
        no_pin: true,
        core_offset: None,
        busy_poll_us: 0,
        shm_messages: setup.server.shm_messages,
        rdma_messages: setup.server.rdma_messages,
    };
    let mut args = vec![
        "__scheduler".to_string(),
        "--port-file".into(),
        port_file.display().to_string(),
        "--workers".into(),
        setup.workers.to_string(),
    ];
    args.extend(scheduler_loops.args());
    children.spawn("scheduler", &exe, &args)?;
    let scheduler = wait_port_file(&port_file, &mut children)?;
    let mut args = vec![
        "__server".to_string(),
        "--scheduler".into(),
        scheduler.to_string(),
    ];
    args.extend(setup.server.args());
    args.push(format!("--transport={}", setup.transport));
    children.spawn("server", &exe, &args)?;

    let sync = SyncPoint::new(setup.workers as usize);
    let results: Vec<Result<R, BenchError>> = thread::scope(|s| {
        let handles: Vec<_> = (0..setup.workers)
            .map(|rank| {
                let (sync, work) = (&sync, &work);
                let app_core = setup.app_core.map(|c| c + rank as usize);
                let mut cfg = WorkerConfig::new(scheduler);
                cfg.tcp = setup.worker_loops(rank).tcp();
                cfg.rank = Some(rank);
                cfg.spin_us = setup.spin_us;
                cfg.register_timeout = REGISTER_TIMEOUT;
                cfg.transport = setup.transport;
                thread::Builder::new()
                    .name(format!("bench-worker-{rank}"))
                    .spawn_scoped(s, move || -> Result<R, BenchError> {
                        let mut guard = BreakOnDrop(sync, true);
                        if let Some(core) = app_core {
                            if !pserv_sys::cpu::pin_current_thread(core) {
                                tracing::warn!(core, "could not pin a worker thread");
                            }
                        }
                        let worker = Worker::connect(cfg)?;
                        wait_servers_ready(&worker)?;
                        let out = work(&worker, rank, sync)?;
                        worker.finish(0)?;
                        guard.1 = false;
                        Ok(out)
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Cluster("a worker thread panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(v) => out.push(v),
            // A broken rendezvous is a consequence; keep the error that caused it.
            Err(e) => match (&first_err, &e) {
                (None, _) => first_err = Some(e),
                (Some(BenchError::Cluster(m)), _) if m == "another worker failed" => {
                    first_err = Some(e)
                }
                _ => {}
            },
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    children.wait_all(EXIT_TIMEOUT)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct L {
        #[command(flatten)]
        loops: LoopSetup,
    }

    fn parse(args: &[String]) -> Result<LoopSetup, clap::Error> {
        let argv = std::iter::once("x".to_string()).chain(args.iter().cloned());
        <L as clap::Parser>::try_parse_from(argv).map(|l| l.loops)
    }

    #[test]
    fn a_subprocess_gets_the_same_message_path() {
        for (shm, rdma) in [(false, false), (true, false), (false, true)] {
            let l = LoopSetup {
                shm_messages: shm,
                rdma_messages: rdma,
                ..LoopSetup::one_on(1)
            };
            assert_eq!(parse(&l.args()).unwrap(), l);
            let cfg = l.tcp();
            assert_eq!(cfg.shm_messages == ShmMessages::SameHost, shm);
            assert_eq!(cfg.rdma_messages == RdmaMessages::AllPeers, rdma);
        }
        let rdma = LoopSetup {
            rdma_messages: true,
            ..LoopSetup::tcp_default()
        };
        assert!(rdma.describe().ends_with(", messages over rdma"));
        // One path at a time.
        let both = ["--shm-messages".to_string(), "--rdma-messages".to_string()];
        assert!(parse(&both).is_err());
    }
}
