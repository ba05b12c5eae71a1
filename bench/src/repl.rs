//! Chain replication (`replication`): what replicas cost in push throughput and latency,
//! what aggregation of replication saves, and how long a SIGKILLed server stalls a worker.
//!
//! Every configuration is a fresh cluster: the scheduler and the servers are `pserv`
//! processes (this binary re-executed as `pserv-bench pserv scheduler|server ...`, see
//! `pserv_engine::cli::app`), the workers are [`Worker`]s on threads of this process. Child
//! processes are held by a guard that kills them by pid when dropped.
//!
//! Every push also adds 1 to a small fixed set of check keys spread over the key space;
//! at the end of a configuration they must read exactly the number of acknowledged pushes
//! (nothing lost, nothing applied twice), or the bench fails.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use pserv_engine::keys::KEY_END;
use pserv_engine::worker::{Timestamp, Worker, WorkerConfig};
use pserv_transport::TcpConfig;

use crate::cluster::SyncPoint;
use crate::error::BenchError;
use crate::machine::Machine;
use crate::report::publish_section;

/// Flags of `pserv-bench replication`.
#[derive(Debug, Clone, Args)]
pub struct ReplArgs {
    /// Servers (processes).
    #[arg(long, default_value_t = 3)]
    pub servers: u32,
    /// Workers (threads of the bench) in the throughput table.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Keys per push (random, sorted, distinct, spread over the whole key space).
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Pushes in flight per worker in the throughput table.
    #[arg(long, default_value_t = 8)]
    pub inflight: usize,
    /// Measured seconds per throughput configuration.
    #[arg(long, default_value_t = 2.0)]
    pub secs: f64,
    /// Fresh clusters (each with one SIGKILLed server) in the recovery table.
    #[arg(long, default_value_t = 10)]
    pub recovery_runs: usize,
    /// Event-loop busy polling (`--busy-poll-us`) of every process and worker; 0 (the
    /// bench's default) blocks at once, which suits a machine where all processes share a
    /// few cores.
    #[arg(long, default_value_t = 0)]
    pub busy_poll_us: u64,
    /// A smoke test: 0.5 s per configuration, 3 recovery runs.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the tables (section `replication`, or `replication-quick`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Do not write RESULTS.md.
    #[arg(long)]
    pub no_write: bool,
    /// The RESULTS.md section to write (default `replication`, or `replication-quick`).
    #[arg(long)]
    pub section: Option<String>,
}

/// Check keys every push adds 1 to.
const CHECK_KEYS: u64 = 16;
/// Pre-generated random key sets the pushes cycle through (bounds the store's size).
const KEY_SETS: usize = 32;
/// Warm-up before a throughput measurement.
const WARMUP: Duration = Duration::from_millis(300);
/// How long nodes wait for each other / for answers.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long the recovery runs' worker waits for an answer before the run counts as
/// failed (recovery itself takes milliseconds).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The check keys: spread over the key space, so every server heads some.
fn check_keys() -> Vec<u64> {
    (0..CHECK_KEYS)
        .map(|i| (KEY_END / CHECK_KEYS) * i + 7)
        .collect()
}

/// The pushes' key sets: `keys` random keys each, plus the check keys, sorted, distinct.
fn key_sets(keys: usize) -> Vec<Arc<Vec<u64>>> {
    let mut rng = StdRng::seed_from_u64(42);
    let check = check_keys();
    (0..KEY_SETS)
        .map(|_| {
            let mut ks: Vec<u64> = check.clone();
            while ks.len() < keys + check.len() {
                ks.push(rng.random::<u64>());
                if ks.len() == keys + check.len() {
                    ks.sort_unstable();
                    ks.dedup();
                }
            }
            Arc::new(ks)
        })
        .collect()
}

/// Child processes, killed by pid when dropped.
#[derive(Debug, Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    fn spawn(&mut self, name: &str, args: &[String]) -> Result<(), BenchError> {
        let exe =
            std::env::current_exe().map_err(|e| BenchError::io("finding the bench binary", e))?;
        let child = Command::new(exe)
            .arg("pserv")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| BenchError::io(format!("starting the {name}"), e))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    /// SIGKILL the named process and reap it.
    fn kill(&mut self, name: &str) -> Result<(), BenchError> {
        let (_, c) = self
            .0
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| BenchError::Cluster(format!("no process {name}")))?;
        c.kill()
            .map_err(|e| BenchError::io(format!("killing the {name}"), e))?;
        let _ = c.wait();
        Ok(())
    }

    /// Wait up to `limit` for the named process to exit successfully.
    fn wait_for(&mut self, name: &str, limit: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + limit;
        let (_, c) = self
            .0
            .iter_mut()
            .find(|(n, _)| n == name)
            .ok_or_else(|| BenchError::Cluster(format!("no process {name}")))?;
        loop {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(BenchError::Cluster(format!("the {name} failed ({st})")))
                }
                _ if Instant::now() >= deadline => {
                    return Err(BenchError::Cluster(format!(
                        "the {name} did not exit within {limit:?}"
                    )))
                }
                _ => thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, BenchError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "pserv-repl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).map_err(|e| BenchError::io("creating a scratch dir", e))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One cluster: scheduler and server processes, in-process workers.
struct Cluster {
    procs: Procs,
    workers: Vec<Worker>,
    summary: PathBuf,
    _scratch: Scratch,
}

/// How a cluster replicates.
#[derive(Clone, Copy, Debug)]
struct Repl {
    /// Replicas after the head.
    k: u32,
    /// Aggregation on (32 pushes a batch at most, `window_us`) or off (1 / 0).
    aggregate: bool,
    /// With aggregation: the batch window; 0 (the servers' default) is group commit,
    /// pushes applied at the same time share a batch and none waits for a timer.
    window_us: u64,
}

impl Repl {
    fn aggregation(&self) -> String {
        match (self.aggregate, self.window_us) {
            (false, _) => "off".into(),
            (true, 0) => "on (32, group commit: the default)".into(),
            (true, w) => format!("on (32 / {w} us)"),
        }
    }
}

impl Cluster {
    fn start(
        a: &ReplArgs,
        workers: u32,
        repl: Repl,
        timeout: Duration,
    ) -> Result<Cluster, BenchError> {
        let scratch = Scratch::new()?;
        let port = scratch.0.join("sched.addr");
        let summary = scratch.0.join("summary.json");
        let net = [
            "--threads=1".to_string(),
            "--pin-cores=false".into(),
            format!("--busy-poll-us={}", a.busy_poll_us),
        ];
        let mut procs = Procs::default();
        let mut sched = vec![
            "scheduler".to_string(),
            "--listen=127.0.0.1:0".into(),
            format!("--port-file={}", port.display()),
            format!("--servers={}", a.servers),
            format!("--workers={workers}"),
            "--update=sum".into(),
            "--vnodes=64".into(),
            format!("--replicas={}", repl.k),
            format!("--summary-json={}", summary.display()),
        ];
        sched.extend(net.iter().cloned());
        procs.spawn("scheduler", &sched)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr: SocketAddr = loop {
            if let Ok(s) = std::fs::read_to_string(&port) {
                if let Ok(a) = s.trim().parse() {
                    break a;
                }
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Cluster(
                    "the scheduler wrote no port file".into(),
                ));
            }
            thread::sleep(Duration::from_millis(5));
        };
        let (batch, window) = if repl.aggregate {
            (32, repl.window_us)
        } else {
            (1, 0)
        };
        for r in 0..a.servers {
            let mut s = vec![
                "server".to_string(),
                format!("--scheduler={addr}"),
                format!("--rank={r}"),
                format!("--replication-batch={batch}"),
                format!("--replication-window-us={window}"),
            ];
            s.extend(net.iter().cloned());
            procs.spawn(&format!("server {r}"), &s)?;
        }
        let busy = a.busy_poll_us;
        let connected: Vec<Result<Worker, BenchError>> = thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|r| {
                    s.spawn(move || {
                        let mut cfg = WorkerConfig::new(addr);
                        cfg.rank = Some(r);
                        cfg.tcp = TcpConfig {
                            threads: 1,
                            pin_cores: false,
                            busy_poll_us: busy,
                            ..TcpConfig::default()
                        };
                        cfg.register_timeout = TIMEOUT;
                        cfg.timeout = timeout;
                        Worker::connect(cfg).map_err(BenchError::from)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BenchError::Cluster("a worker panicked connecting".into()))
                    })
                })
                .collect()
        });
        let workers = connected.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Cluster {
            procs,
            workers,
            summary,
            _scratch: scratch,
        })
    }

    /// Pull the check keys through worker 0 and compare them with `want`.
    fn check(&self, want: u64, what: &str) -> Result<(), BenchError> {
        let w = &self.workers[0];
        let keys = check_keys();
        let got = w.wait_pull::<f32>(w.pull::<f32>(keys.clone()))?.to_vec();
        let wrong: Vec<(u64, f32)> = keys
            .iter()
            .zip(&got)
            .filter(|(_, &v)| v != want as f32)
            .map(|(&k, &v)| (k, v))
            .take(4)
            .collect();
        if wrong.is_empty() {
            return Ok(());
        }
        // Stale or lost? Read again a second later.
        thread::sleep(Duration::from_secs(1));
        let again = match w.wait_pull::<f32>(w.pull::<f32>(keys.clone())) {
            Ok(p) => {
                let v = p.to_vec();
                let bad = v.iter().filter(|&&x| x != want as f32).count();
                format!("{bad} of {} still wrong, values {v:?}", keys.len())
            }
            Err(e) => format!("the re-read failed: {e}"),
        };
        Err(BenchError::WrongAnswer(format!(
            "{what}: check keys should read {want} (acknowledged pushes), got (key, value) {wrong:?}; re-read 1 s later: {again}"
        )))
    }

    /// Finish every worker, wait for the scheduler to shut the cluster down, return its
    /// summary JSON.
    fn finish(mut self) -> Result<serde_json::Value, BenchError> {
        for w in self.workers.drain(..) {
            w.finish(0)?;
        }
        self.procs.wait_for("scheduler", Duration::from_secs(20))?;
        let text = std::fs::read_to_string(&self.summary)
            .map_err(|e| BenchError::io(format!("reading {}", self.summary.display()), e))?;
        serde_json::from_str(&text)
            .map_err(|e| BenchError::Cluster(format!("bad summary JSON: {e}")))
    }
}

/// One row of the throughput table.
#[derive(Clone, Debug)]
struct ThroughputRow {
    repl: Repl,
    pushes_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Pushes over the cluster's life (warm-up included), for the per-push figures.
    total_pushes: u64,
    batches: u64,
    replica_pushes: u64,
    replica_bytes: u64,
}

/// What one worker measured.
#[derive(Default)]
struct WorkerMeasure {
    pushes: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

/// Push with `inflight` outstanding until `until`, then drain; returns (pushes, latencies).
fn push_loop(
    w: &Worker,
    sets: &[Arc<Vec<u64>>],
    vals: &Arc<Vec<f32>>,
    next: &mut usize,
    inflight: usize,
    until: Instant,
    latencies: Option<&mut Vec<u32>>,
) -> Result<u64, BenchError> {
    let mut q: VecDeque<(Timestamp, Instant)> = VecDeque::with_capacity(inflight);
    let mut lat = latencies;
    let mut done = 0u64;
    loop {
        let issuing = Instant::now() < until;
        if issuing && q.len() < inflight {
            let ks = Arc::clone(&sets[*next % sets.len()]);
            *next += 1;
            q.push_back((w.push::<f32>(ks, Arc::clone(vals)), Instant::now()));
            continue;
        }
        let Some((ts, at)) = q.pop_front() else {
            return Ok(done);
        };
        w.wait(ts)?;
        if let Some(l) = lat.as_deref_mut() {
            l.push(at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        done += 1;
    }
}

fn percentile_us(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i])
}

fn throughput(
    a: &ReplArgs,
    secs: f64,
    sets: &[Arc<Vec<u64>>],
    repl: Repl,
) -> Result<ThroughputRow, BenchError> {
    let cluster = Cluster::start(a, a.workers, repl, TIMEOUT)?;
    let vals = Arc::new(vec![1.0f32; sets[0].len()]);
    let total = AtomicU64::new(0);
    let sync = SyncPoint::new(cluster.workers.len());
    let measures: Vec<Result<WorkerMeasure, BenchError>> = thread::scope(|s| {
        let hs: Vec<_> = cluster
            .workers
            .iter()
            .enumerate()
            .map(|(rank, w)| {
                let (vals, total, sync) = (&vals, &total, &sync);
                s.spawn(move || {
                    let run = || -> Result<WorkerMeasure, BenchError> {
                        let mut next = rank * 7;
                        let warm = push_loop(
                            w,
                            sets,
                            vals,
                            &mut next,
                            a.inflight,
                            Instant::now() + WARMUP,
                            None,
                        )?;
                        total.fetch_add(warm, Ordering::Relaxed);
                        sync.wait()?;
                        let mut m = WorkerMeasure::default();
                        let start = Instant::now();
                        let until = start + Duration::from_secs_f64(secs);
                        m.pushes = push_loop(
                            w,
                            sets,
                            vals,
                            &mut next,
                            a.inflight,
                            until,
                            Some(&mut m.latencies_us),
                        )?;
                        m.elapsed = start.elapsed();
                        total.fetch_add(m.pushes, Ordering::Relaxed);
                        Ok(m)
                    };
                    let r = run();
                    if r.is_err() {
                        sync.break_it();
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(BenchError::Cluster("a worker panicked".into())))
            })
            .collect()
    });
    let measures = measures.into_iter().collect::<Result<Vec<_>, _>>()?;
    let total = total.load(Ordering::Relaxed);
    let label = format!("K={} aggregation {}", repl.k, repl.aggregation());
    cluster.check(total, &label)?;
    let summary = cluster.finish()?;
    let num = |k: &str| summary.get(k).and_then(serde_json::Value::as_u64);
    let mut lat: Vec<u32> = measures
        .iter()
        .flat_map(|m| m.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    Ok(ThroughputRow {
        repl,
        pushes_per_s: measures
            .iter()
            .map(|m| m.pushes as f64 / m.elapsed.as_secs_f64().max(1e-9))
            .sum(),
        p50_us: percentile_us(&lat, 0.5),
        p99_us: percentile_us(&lat, 0.99),
        total_pushes: total,
        batches: num("replica_batches").unwrap_or(0),
        replica_pushes: num("replica_pushes").unwrap_or(0),
        replica_bytes: num("replica_bytes").unwrap_or(0),
    })
}

/// One recovery run.
#[derive(Clone, Debug)]
struct Recovery {
    /// Kill to the acknowledgement of the first push issued after it.
    recovery: Duration,
    /// Longest gap between consecutive acknowledgements, the later one after the kill.
    stall: Duration,
    /// Median push latency before the kill.
    before_p50: Duration,
    /// Pushes acknowledged in the run.
    pushes: u64,
    /// The worker's routing-table epoch at the end.
    epoch: u64,
}

fn recovery_run(a: &ReplArgs, sets: &[Arc<Vec<u64>>]) -> Result<Recovery, BenchError> {
    let mut cluster = Cluster::start(
        a,
        1,
        Repl {
            k: 1,
            aggregate: true,
            window_us: 0,
        },
        RECOVERY_TIMEOUT,
    )?;
    let vals = Arc::new(vec![1.0f32; sets[0].len()]);
    let victim = format!("server {}", a.servers - 1);
    let stop = AtomicBool::new(false);
    let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
    let acked_after_kill = AtomicU64::new(0);
    // (issued, acknowledged) of every push.
    let w = &cluster.workers[0];
    let (records, kill_result) = thread::scope(|s| {
        let pusher = s.spawn(|| -> Result<Vec<(Instant, Instant)>, BenchError> {
            let mut recs = Vec::new();
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let ks = Arc::clone(&sets[next % sets.len()]);
                next += 1;
                let issued = Instant::now();
                let ts = w.push::<f32>(ks, Arc::clone(&vals));
                if let Err(e) = w.wait(ts) {
                    let k = *killed_at.lock().unwrap_or_else(|e| e.into_inner());
                    return Err(BenchError::Cluster(format!(
                        "push {} ({}) not acknowledged: {e}",
                        recs.len() + 1,
                        match k {
                            Some(k) if issued > k => {
                                format!("issued {:.1} ms after the kill", ms(issued - k))
                            }
                            Some(k) => format!("issued {:.1} ms before the kill", ms(k - issued)),
                            None => "issued before the kill".into(),
                        }
                    )));
                }
                let acked = Instant::now();
                recs.push((issued, acked));
                let k = *killed_at.lock().unwrap_or_else(|e| e.into_inner());
                if k.is_some_and(|k| issued > k) {
                    acked_after_kill.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(recs)
        });
        let kill = (|| -> Result<(), BenchError> {
            thread::sleep(Duration::from_millis(500));
            if pusher.is_finished() {
                return Ok(());
            }
            {
                let mut k = killed_at.lock().unwrap_or_else(|e| e.into_inner());
                *k = Some(Instant::now());
                cluster.procs.kill(&victim)?;
            }
            let deadline = Instant::now() + TIMEOUT;
            while acked_after_kill.load(Ordering::Relaxed) == 0 && !pusher.is_finished() {
                if Instant::now() >= deadline {
                    return Err(BenchError::Cluster(
                        "no push acknowledged within 30 s of the kill".into(),
                    ));
                }
                thread::sleep(Duration::from_millis(1));
            }
            thread::sleep(Duration::from_millis(200));
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let recs = pusher
            .join()
            .unwrap_or_else(|_| Err(BenchError::Cluster("the pusher panicked".into())));
        (recs, kill)
    });
    kill_result?;
    let records = records?;
    let kill = killed_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or_else(|| BenchError::Cluster("the pusher stopped before the kill".into()))?;
    let first_after = records
        .iter()
        .find(|(i, _)| *i > kill)
        .ok_or_else(|| BenchError::Cluster("no push issued after the kill".into()))?;
    let stall = records
        .windows(2)
        .filter(|p| p[1].1 > kill)
        .map(|p| p[1].1 - p[0].1)
        .max()
        .unwrap_or_default();
    let mut before: Vec<Duration> = records
        .iter()
        .filter(|(_, ack)| *ack < kill)
        .map(|(i, ack)| *ack - *i)
        .collect();
    before.sort_unstable();
    let epoch = cluster.workers[0].table().epoch();
    if epoch < 2 {
        return Err(BenchError::WrongAnswer(format!(
            "routing table epoch {epoch} after the kill (want >= 2)"
        )));
    }
    let pushes = records.len() as u64;
    cluster.check(pushes, "recovery run")?;
    cluster.finish()?;
    Ok(Recovery {
        recovery: first_after.1 - kill,
        stall,
        before_p50: before.get(before.len() / 2).copied().unwrap_or_default(),
        pushes,
        epoch,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_max(mut xs: Vec<Duration>) -> (Duration, Duration) {
    xs.sort_unstable();
    (
        xs.get(xs.len() / 2).copied().unwrap_or_default(),
        xs.last().copied().unwrap_or_default(),
    )
}

/// Run both tables, print them and (unless told not to) write them to RESULTS.md.
pub fn replication(a: &ReplArgs, command: String) -> Result<(), BenchError> {
    if a.servers < 3 {
        return Err(BenchError::Cluster(
            "--servers must be at least 3 (K = 2 needs three servers)".into(),
        ));
    }
    if a.workers == 0 || a.keys == 0 || a.inflight == 0 {
        return Err(BenchError::Cluster(
            "--workers, --keys and --inflight must be positive".into(),
        ));
    }
    let machine = Machine::detect();
    let secs = if a.quick { 0.5 } else { a.secs };
    let runs = if a.quick { 3 } else { a.recovery_runs.max(1) };
    let sets = key_sets(a.keys);
    let repl = |k, aggregate, window_us| Repl {
        k,
        aggregate,
        window_us,
    };
    let configs = [
        repl(0, false, 0),
        repl(1, false, 0),
        repl(1, true, 200),
        repl(1, true, 0),
        repl(2, false, 0),
        repl(2, true, 0),
    ];
    let mut rows = Vec::new();
    for repl in configs {
        let r = throughput(a, secs, &sets, repl)?;
        eprintln!(
            "K={} aggregation {}: {:.0} pushes/s, p50 {:.0} us, p99 {:.0} us, {} batches, {} pushes replicated",
            repl.k,
            repl.aggregation(),
            r.pushes_per_s,
            r.p50_us,
            r.p99_us,
            r.batches,
            r.replica_pushes
        );
        rows.push(r);
    }
    let mut recs = Vec::new();
    let mut failures = Vec::new();
    for i in 0..runs {
        let r = match recovery_run(a, &sets) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("recovery run {}: FAILED: {e}", i + 1);
                failures.push(format!("run {}: {e}", i + 1));
                continue;
            }
        };
        eprintln!(
            "recovery run {}: recovery {:.1} ms, stall {:.1} ms, p50 before {:.2} ms, {} pushes, epoch {}",
            i + 1,
            ms(r.recovery),
            ms(r.stall),
            ms(r.before_p50),
            r.pushes,
            r.epoch
        );
        recs.push(r);
    }
    let md = render(
        a,
        &machine,
        &command,
        (secs, runs),
        (&rows, &recs, &failures),
    );
    println!("{md}");
    if !a.no_write {
        let default = if a.quick {
            "replication-quick"
        } else {
            "replication"
        };
        publish_section(&a.results, a.section.as_deref().unwrap_or(default), &md)?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(BenchError::WrongAnswer(format!(
            "{} of {runs} recovery runs failed: {}",
            failures.len(),
            failures.join("; ")
        )))
    }
}

fn render(
    a: &ReplArgs,
    machine: &Machine,
    command: &str,
    (secs, runs): (f64, usize),
    (rows, recs, failures): (&[ThroughputRow], &[Recovery], &[String]),
) -> String {
    let mut md = String::new();
    let title = if a.quick { " (quick run)" } else { "" };
    md.push_str(&format!(
        "## Chain replication: push throughput and recovery{title}\n\n"
    ));
    md.push_str(&format!("Command: `{command}`  \n"));
    md.push_str(&format!(
        "Machine: {} cores, {}, kernel {}, {} (load {}, load at the end {})  \n",
        machine.cores,
        machine.cpu_model,
        machine.kernel,
        machine.date,
        machine.load,
        crate::machine::load_average()
    ));
    md.push_str(&format!(
        "Cluster: scheduler and {} servers as `pserv` processes (1 event loop each, unpinned, busy_poll_us={}, `--vnodes=64`, update sum), workers as threads of the bench (1 loop each, unpinned). A fresh cluster per row and per recovery run. All processes share the machine's {} cores.\n\n",
        a.servers, a.busy_poll_us, machine.cores
    ));
    md.push_str(&format!(
        "### Push throughput\n\n{} workers, {} pushes in flight each, {} random keys per push (sorted, distinct, over the whole key space, cycling through {} fixed sets) plus {} check keys; {:.0} ms warm-up, then {} s measured. Aggregation off: `--replication-batch=1 --replication-window-us=0`; on: 32 pushes a batch at most, sent after a 200 us window (`--replication-window-us=200`, the default until 2026-12-08) or by group commit (`--replication-window-us=0`, the default: the pending batches leave as soon as no other push is being applied on the server).\n\n",
        a.workers,
        a.inflight,
        a.keys,
        KEY_SETS,
        CHECK_KEYS,
        WARMUP.as_secs_f64() * 1e3,
        secs
    ));
    md.push_str("| replicas K | aggregation | pushes/s | key updates/s | vs K=0 | push p50 (us) | push p99 (us) | replication batches | pushes per batch | replicated MB | replicated bytes per push |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    let base = rows
        .iter()
        .find(|r| r.repl.k == 0)
        .map(|r| r.pushes_per_s)
        .unwrap_or(f64::NAN);
    let keys = (a.keys as u64 + CHECK_KEYS) as f64;
    for r in rows {
        let (agg, batches, per_batch, mb, per_push) = if r.repl.k == 0 {
            (
                "-".to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            )
        } else {
            (
                r.repl.aggregation(),
                r.batches.to_string(),
                if r.batches == 0 {
                    "-".into()
                } else {
                    format!("{:.1}", r.replica_pushes as f64 / r.batches as f64)
                },
                format!("{:.1}", r.replica_bytes as f64 / 1e6),
                format!(
                    "{:.0}",
                    r.replica_bytes as f64 / (r.total_pushes.max(1)) as f64
                ),
            )
        };
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.2}M | {:.2} | {:.0} | {:.0} | {} | {} | {} | {} |\n",
            r.repl.k,
            agg,
            r.pushes_per_s,
            r.pushes_per_s * keys / 1e6,
            r.pushes_per_s / base,
            r.p50_us,
            r.p99_us,
            batches,
            per_batch,
            mb,
            per_push
        ));
    }
    md.push_str("\nKey updates/s = pushes/s x keys per push (check keys included). Push latency: from issuing the push to the worker seeing its acknowledgement (pushes are waited for in order, so a push acknowledged early is counted when its predecessors are). Replication batches, pushes and bytes come from the scheduler's summary (summed over the servers as chain heads, warm-up included; with K=2 the middle replica passes each batch on to the tail, and that second hop is not in these figures); a push that spans every server counts once per head it reaches, so pushes per batch is segments per batch. Bytes per push = replicated value bytes / worker pushes. After every row, the check keys read exactly the number of acknowledged pushes.\n\n");
    let (rec_med, rec_max) = median_max(recs.iter().map(|r| r.recovery).collect());
    let (stall_med, stall_max) = median_max(recs.iter().map(|r| r.stall).collect());
    let (before_med, _) = median_max(recs.iter().map(|r| r.before_p50).collect());
    md.push_str(&format!(
        "### Recovery after a SIGKILLed server\n\nK=1 (aggregation on: group commit), {} servers, 1 worker pushing {} random keys (plus the check keys) with 1 push in flight; 0.5 s in, server {} is SIGKILLed. Recovery = from just before the kill to the acknowledgement of the first push issued after it (that push needs the new routing table and the new heads). Stall = the longest gap between consecutive acknowledgements, the later one after the kill. {} run(s), each on a fresh cluster; after each, the worker's routing-table epoch must be >= 2 and the check keys must read exactly the number of acknowledged pushes, or the run counts as failed (a push unanswered for {} s fails it too). Times are over the runs that passed.\n\n",
        a.servers,
        a.keys,
        a.servers - 1,
        runs,
        RECOVERY_TIMEOUT.as_secs()
    ));
    md.push_str("| runs passed | recovery median (ms) | recovery max (ms) | stall median (ms) | stall max (ms) | push latency before the kill, median (ms) |\n|---|---|---|---|---|---|\n");
    md.push_str(&format!(
        "| {}/{runs} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n\n",
        recs.len(),
        ms(rec_med),
        ms(rec_max),
        ms(stall_med),
        ms(stall_max),
        ms(before_med)
    ));
    md.push_str(&format!(
        "Per run (recovery / stall, ms): {}\n\n",
        recs.iter()
            .map(|r| format!("{:.1} / {:.1}", ms(r.recovery), ms(r.stall)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if !failures.is_empty() {
        md.push_str(&format!(
            "**{} of {runs} recovery runs FAILED** (the bench exits with an error):\n\n",
            failures.len()
        ));
        for f in failures {
            md.push_str(&format!("- {f}\n"));
        }
        md.push('\n');
    }
    md.push_str(&reading(rows, recs));
    md
}

/// A short reading of the numbers, from the numbers.
fn reading(rows: &[ThroughputRow], recs: &[Recovery]) -> String {
    let find = |k: u32, agg: bool| {
        rows.iter().find(|r| {
            r.repl.k == k && (k == 0 || (r.repl.aggregate == agg && r.repl.window_us == 0))
        })
    };
    let mut out = String::from("Reading: ");
    let mut first = true;
    if let Some(base) = find(0, false) {
        for k in [1, 2] {
            if let (Some(off), Some(on)) = (find(k, false), find(k, true)) {
                let per = |r: &ThroughputRow| {
                    if r.batches == 0 {
                        f64::NAN
                    } else {
                        r.replica_pushes as f64 / r.batches as f64
                    }
                };
                out.push_str(if first { "with" } else { "With" });
                first = false;
                out.push_str(&format!(
                    " K={k}, pushes/s is {:.0}% of K=0 without aggregation and {:.0}% with it; aggregation carries {:.1} push segments per replication batch instead of {:.1} (that many times fewer replication messages), while replicated bytes per push only go from {:.0} to {:.0}: a batch sends the current value of every key it touched once, and random keys rarely repeat within a batch (only the check keys do), so the saving is in messages and per-message work, not in bytes. ",
                    100.0 * off.pushes_per_s / base.pushes_per_s,
                    100.0 * on.pushes_per_s / base.pushes_per_s,
                    per(on),
                    per(off),
                    off.replica_bytes as f64 / off.total_pushes.max(1) as f64,
                    on.replica_bytes as f64 / on.total_pushes.max(1) as f64,
                ));
            }
        }
    }
    out.push_str("On this machine every process (scheduler, servers, the bench's workers) shares the same few cores, so the cost of replication here is mostly CPU: each replica applies every update again and each chain hop is another loopback send and receive, taken from the same cores the head and the workers need, so these ratios overstate what a replica costs on machines of its own. ");
    let (rec_med, _) = median_max(recs.iter().map(|r| r.recovery).collect());
    let (before_med, _) = median_max(recs.iter().map(|r| r.before_p50).collect());
    if recs.is_empty() {
        out.push_str("No recovery run passed, so there is no recovery time to read.\n");
        return out;
    }
    let how = if rec_med < Duration::from_secs(1) {
        "well under the scheduler's 3 s heartbeat timeout, so it is the closed connection that triggers the failover: the scheduler takes the server off the ring, sends the new table, and the worker resends its unanswered push to the new head"
    } else {
        "of the order of the scheduler's 3 s heartbeat timeout, so the failover waited for missed heartbeats rather than the closed connection"
    };
    out.push_str(&format!(
        "After a SIGKILL the first new push is acknowledged {:.1} ms (median) after the kill, against {:.2} ms per push before it: {how}.\n",
        ms(rec_med),
        ms(before_med)
    ));
    out
}
