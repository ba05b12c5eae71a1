//! The scheduler process: [`run_scheduler`] wires [`SchedulerCore`] to the TCP transport,
//! draws the progress bar and merges and writes the job summary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pserv_transport::{CloseReason, Conn, Handler, RecvFrame, TcpConfig, TcpTransport};

use super::core::{ConnKey, Input, Output, SchedulerCore};
use super::spec::ClusterSpec;
use crate::base::error::EngineError;
use crate::proto::{Control, SCHEDULER_ID};

/// Configuration of the scheduler process.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The cluster.
    pub spec: ClusterSpec,
    /// The transport.
    pub tcp: TcpConfig,
    /// How the scheduler authenticates its connections.
    pub security: crate::base::security::Security,
    /// Write the bound address here once listening (for launchers using port 0).
    pub port_file: Option<PathBuf>,
    /// Write the job summary (JSON) here at the end.
    pub summary_json: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Give up if the cluster is not complete after this long.
    pub register_timeout: Duration,
    /// Declare a server dead after this long without a heartbeat.
    pub heartbeat_timeout: Duration,
    /// A restart of a failed scheduler: rebuild the view from the nodes' reports, waiting
    /// at most this long after the first one (or until every node of the spec reported).
    pub recover: Option<Duration>,
    /// When and where to write checkpoints, and the epoch restored from.
    pub checkpoint: super::CheckpointPlan,
    /// Keep a failed worker's place this long for a replacement (`None`: no
    /// replacements).
    pub replace_workers: Option<Duration>,
}

/// How often the scheduler's loop feeds time to its state machine.
const TICK_EVERY: Duration = Duration::from_millis(200);

/// What the job reported, merged.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The merged summary object.
    pub summary: serde_json::Value,
}

struct SchedHandler {
    events: crossbeam_channel::Sender<(Conn, Option<Control>)>,
}

impl Handler for SchedHandler {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        match Control::from_frame(&frame.frame()) {
            Ok(msg) => {
                let _ = self.events.send((conn.clone(), Some(msg)));
            }
            Err(e) => {
                tracing::warn!(peer = %conn.peer_addr(), error = %e, "closing a connection that sent a bad control message");
                conn.close();
            }
        }
    }
    fn on_close(&mut self, conn: &Conn, _reason: &CloseReason) {
        let _ = self.events.send((conn.clone(), None));
    }
}

/// Run the scheduler until the job is over; returns the merged job summary.
pub fn run_scheduler(cfg: SchedulerConfig) -> Result<JobReport, EngineError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut tcp = cfg.tcp.clone();
    cfg.security.apply(&mut tcp, false)?;
    let transport = TcpTransport::start(tcp, |_| SchedHandler { events: tx.clone() })?;
    let addr = transport.listen(cfg.listen)?;
    if let Some(p) = &cfg.port_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|_| std::fs::rename(&tmp, p))
            .map_err(|source| EngineError::Io {
                context: format!("writing the port file {}", p.display()),
                source,
            })?;
    }
    tracing::info!(%addr, "scheduler listening");
    let mut core =
        SchedulerCore::new(cfg.spec.clone()).with_heartbeat_timeout(cfg.heartbeat_timeout);
    if let Some(wait) = cfg.recover {
        tracing::info!(%addr, "recovering: waiting for the nodes to rejoin");
        core = core.recovering(wait);
    }
    core = core.with_checkpoints(cfg.checkpoint.clone());
    if let Some(wait) = cfg.replace_workers {
        core = core.with_replacement(wait);
    }
    let conns: Arc<Mutex<HashMap<ConnKey, Conn>>> = Arc::default();
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} examples ({per_sec}, eta {eta})",
            )
            .expect("a valid template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut running_since: Option<Instant> = None;
    let mut finished_at: Option<Instant> = None;
    let mut seconds = 0.0;
    // Run until the job is over and every server has reported (or 10 s passed).
    while !(core.is_finished()
        && (core.servers_reported()
            || finished_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10))))
    {
        let timeout = if core.is_finished() {
            Duration::from_millis(100)
        } else if core.is_running() {
            TICK_EVERY
        } else {
            cfg.register_timeout
                .saturating_sub(started.elapsed())
                .min(TICK_EVERY)
        };
        let received = rx.recv_timeout(timeout);
        let now_ms = started.elapsed().as_millis() as u64;
        let mut outs = core.handle(Input::Tick { now_ms });
        match received {
            Ok((conn, msg)) => {
                let key = conn.id();
                let input = match msg {
                    Some(msg) => {
                        conns.lock().insert(key, conn);
                        Input::Message { conn: key, msg }
                    }
                    None => {
                        conns.lock().remove(&key);
                        Input::Closed { conn: key }
                    }
                };
                outs.extend(core.handle(input));
            }
            Err(_)
                if core.is_finished()
                    || core.is_running()
                    || started.elapsed() < cfg.register_timeout => {}
            Err(_) => {
                return Err(EngineError::Registration(format!(
                    "the cluster did not complete within {:?}",
                    cfg.register_timeout
                )))
            }
        }
        let mut outs: std::collections::VecDeque<Output> = outs.into();
        while let Some(o) = outs.pop_front() {
            match o {
                Output::Send { conn, msg } => {
                    if let Some(c) = conns.lock().get(&conn) {
                        if let Err(e) = c.send(msg.to_frame(SCHEDULER_ID)) {
                            tracing::debug!(error = %e, "scheduler send failed");
                        }
                    }
                }
                Output::Log(line) => {
                    tracing::info!("{line}");
                    if line.starts_with("epoch")
                        || line.starts_with("final")
                        || line.starts_with("checkpoint")
                    {
                        bar.suspend(|| println!("{line}"));
                    }
                }
                Output::Progress { done, total } => {
                    if bar.length() != Some(total) {
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                }
                Output::WriteCheckpoint { root, manifest } => {
                    let epoch = manifest.epoch;
                    let result =
                        crate::checkpoint::commit(&root, &manifest).map_err(|e| e.to_string());
                    outs.extend(core.handle(Input::CheckpointCommitted { epoch, result }));
                }
                Output::JobDone => {
                    finished_at = Some(Instant::now());
                    seconds = running_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                }
            }
        }
        if core.is_running() && running_since.is_none() {
            running_since = Some(Instant::now());
        }
    }
    bar.finish_and_clear();
    let summary = merge_summary(&core, seconds);
    if let Some(p) = &cfg.summary_json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&summary).expect("json encodes"),
        )
        .map_err(|source| EngineError::Io {
            context: format!("writing the summary {}", p.display()),
            source,
        })?;
    }
    // Let the shutdown messages leave before the loops stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while conns.lock().values().any(|c| c.queued_bytes() > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    transport.shutdown();
    // A worker that found the job's result unusable (a model that turned non-finite)
    // said why: the job failed, whatever else the summary holds.
    if let Some(why) = summary.get("error").and_then(|e| e.as_str()) {
        return Err(EngineError::JobFailed(why.to_string()));
    }
    Ok(JobReport { summary })
}

pub(super) fn merge_summary(core: &SchedulerCore, seconds: f64) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for s in &core.summaries {
        if let Some(m) = s.as_object() {
            for (k, v) in m {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    let examples: u64 = core.stats.iter().map(|s| s.examples).sum();
    // A scheduler restarted with --recover saw only the end of the job: the longest
    // worker's own training time bounds the job's from below.
    let seconds = core.stats.iter().map(|s| s.seconds).fold(seconds, f64::max);
    let sent: u64 = core.stats.iter().map(|s| s.bytes_sent).sum();
    let received: u64 = core.stats.iter().map(|s| s.bytes_received).sum();
    obj.insert("examples".into(), examples.into());
    obj.insert("seconds".into(), seconds.into());
    obj.insert(
        "examples_per_sec".into(),
        (if seconds > 0.0 {
            examples as f64 / seconds
        } else {
            0.0
        })
        .into(),
    );
    obj.insert("bytes_sent".into(), sent.into());
    obj.insert("bytes_received".into(), received.into());
    obj.insert("workers_finished".into(), (core.stats.len() as u64).into());
    obj.insert(
        "worker_examples".into(),
        core.stats
            .iter()
            .map(|s| s.examples)
            .collect::<Vec<u64>>()
            .into(),
    );
    let worked: f64 = core.stats.iter().map(|s| s.seconds).sum();
    let blocked: f64 = core.stats.iter().map(|s| s.blocked_seconds).sum();
    obj.insert("worker_seconds".into(), worked.into());
    if worked > 0.0 {
        // Share of the workers' time spent waiting for pulls: round trips plus any time
        // the consistency gates held them (gate_held_seconds, from the servers).
        obj.insert("blocked_fraction".into(), (blocked / worked).into());
    }
    if !core.server_stats.is_empty() {
        let nonzero: u64 = core.server_stats.iter().map(|s| s.nonzero).sum();
        let keys: u64 = core.server_stats.iter().map(|s| s.keys).sum();
        obj.insert("nonzero_weights".into(), nonzero.into());
        obj.insert("stored_keys".into(), keys.into());
        let held: u64 = core.server_stats.iter().map(|s| s.held_pulls).sum();
        let held_s: f64 = core.server_stats.iter().map(|s| s.held_pull_seconds).sum();
        obj.insert("gate_held_pulls".into(), held.into());
        obj.insert("gate_held_seconds".into(), held_s.into());
        let batches: u64 = core.server_stats.iter().map(|s| s.replica_batches).sum();
        let pushes: u64 = core.server_stats.iter().map(|s| s.replica_pushes).sum();
        let bytes: u64 = core.server_stats.iter().map(|s| s.replica_bytes).sum();
        obj.insert("replica_batches".into(), batches.into());
        obj.insert("replica_pushes".into(), pushes.into());
        obj.insert("replica_bytes".into(), bytes.into());
        let kc = |i: usize| -> u64 { core.server_stats.iter().map(|s| s.key_cache[i]).sum() };
        if kc(0) > 0 {
            obj.insert(
                "key_cache_servers".into(),
                serde_json::json!({
                    "stored": kc(0), "resolved": kc(1), "missed": kc(2), "evicted": kc(3),
                }),
            );
        }
    }
    obj.insert("failovers".into(), (core.failovers.len() as u64).into());
    obj.insert(
        "checkpoints".into(),
        core.checkpoints_written().to_vec().into(),
    );
    serde_json::Value::Object(obj)
}
