//! The server process: start-up (registration, the cluster table, the store), the
//! control loop (tables, joins, leaves, the scheduler), shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_channel::RecvTimeoutError;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use pserv_transport::{BufPool, Conn, TcpTransport};

use crate::base::error::EngineError;
use crate::base::ids::{ConnTag, Holder, NodeId, ServerRank};
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::consistency::clock::ClockGate;
use crate::keycache::KeyCache;
use crate::node::register::{self, Hello, Registration, Welcome};
use crate::node::rejoin::{self, Report};
use crate::onesided::{ServerOneSided, TransportKind};
use crate::placement::Partition;
use crate::proto::{self, ClusterInfo, Control, Role, ServerStats, Status, ValueType};
use crate::replication::Replicator;
use crate::store::{Store, StoreConfig, StoreError};
use crate::update::Sum;

use super::config::registry;
use super::config::{ServerConfig, UserRules};
use super::handler::{entries, refuse, run_actions};
use super::route::Refusal;
use super::switch::{switch_table, Switched};
use super::window::{apply_landed, heads_all};
use super::{AnyStore, Core, Ready, ServerHandler, Typed};
use crate::node::departed::{Departed, DEPARTED_GRACE};

/// A running server node.
pub struct Server {
    core: Arc<Core>,
    control: crossbeam_channel::Receiver<Control>,
    addr: SocketAddr,
    transport: TcpTransport,
    /// The scheduler connection (replaced when a restarted scheduler comes back).
    sched: Arc<Mutex<Conn>>,
    /// The scheduler's address.
    scheduler_addr: SocketAddr,
    /// How long the scheduler may stay unreachable before this server stops.
    scheduler_grace: Duration,
    dump_model: Option<std::path::PathBuf>,
    /// The thread applying one-sided pushes, if any.
    notices: Option<std::thread::JoinHandle<()>>,
    /// The replication window's thread and its stop flag.
    flusher: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
    /// Servers the newest table left out, since when ([`Server::drop_departed_peers`]).
    dropped: Departed,
}

impl Server {
    /// Start listening, register with the scheduler, and wait for the cluster table;
    /// from then on requests are served on the event loops.
    pub fn start(cfg: ServerConfig) -> Result<Server, EngineError> {
        // Refuse bad user rules before registering, not once the cluster is up.
        registry::<f32>(Arc::new(Sum), &cfg.rules.f32)?;
        registry::<f64>(Arc::new(Sum), &cfg.rules.f64)?;
        if cfg.join && cfg.restore.is_some() {
            return Err(EngineError::Config(
                "--restore with --join: a server that joins copies its ranges from the \
                 running servers, not from a checkpoint"
                    .into(),
            ));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let core = Arc::new(Core {
            ready: OnceLock::new(),
            control: tx,
            pool: BufPool::new(64),
            max_frame: cfg.tcp.max_frame,
            key_cache: KeyCache::new(cfg.key_cache_keys),
            allow_non_finite: cfg.allow_non_finite,
        });
        let mut tcp = cfg.tcp.clone();
        // A server takes requests from cluster nodes only: a connection must name its id.
        cfg.security.apply(&mut tcp, true)?;
        let transport = TcpTransport::start(tcp, |_| ServerHandler { core: core.clone() })?;
        let addr = transport.listen(cfg.listen)?;
        let scheduler = register::connect(&transport, cfg.scheduler, Holder::Server)?;
        let hello = if cfg.join {
            Hello::Join {
                addr,
                rank: cfg.rank,
            }
        } else {
            Hello::Register {
                role: Role::Server,
                addr: Some(addr),
                rank: cfg.rank,
            }
        };
        let registration = Registration {
            hello,
            scheduler: cfg.scheduler,
            timeout: cfg.register_timeout,
            // Nothing here turns a closed scheduler connection into a `Shutdown`: one
            // sent instead of the welcome is unexpected.
            shutdown_is_gone: false,
        };
        let Welcome {
            node_id,
            rank,
            cluster,
            ..
        } = register::register(&scheduler, &rx, &registration)?;
        transport.set_identity(node_id);
        transport.repin(node_id as usize);
        // Connections to the other servers, for chain replication (every server listens
        // before it registers, so all of them accept by now).
        let mut peers: Vec<Option<Conn>> = Vec::new();
        for s in &cluster.servers {
            if peers.len() <= s.rank as usize {
                peers.resize(s.rank as usize + 1, None);
            }
            if s.rank == rank {
                continue;
            }
            match transport.connect(s.addr, Duration::from_secs(5)) {
                Ok(c) => {
                    c.set_tag(ConnTag::Server(ServerRank(s.rank)).to_u64(Holder::Server));
                    peers[s.rank as usize] = Some(c);
                }
                // A server that failed earlier: nothing will be sent to it.
                Err(e) => tracing::warn!(peer = s.rank, error = %e, "no connection to a server"),
            }
        }
        let sched = Arc::new(Mutex::new(scheduler.clone()));
        let synced = {
            let sched = sched.clone();
            Box::new(move |epoch: u64| {
                let _ = sched
                    .lock()
                    .send(Control::Synced { epoch }.to_frame(node_id));
            })
        };
        let mut repl_cfg = cfg.replication;
        // Failed workers' places are kept: their replacements redo unacknowledged
        // pushes, which must apply once.
        repl_cfg.remember_all |= cluster.replace_workers;
        let repl = Replicator::new(rank, node_id, repl_cfg, peers, synced);
        let ready = make_ready(
            node_id,
            rank,
            &cluster,
            cfg.shards,
            (&cfg.rules, &cfg.answer_filters),
            cfg.transport,
            repl,
        )?;
        tracing::info!(
            node_id,
            rank,
            ranges = ready.table.read().ranges_of(rank as usize).len(),
            epoch = ready.table.read().epoch(),
            replicas = ready.table.read().replicas(),
            %addr,
            "server ready"
        );
        let _ = core.ready.set(ready);
        if let Some(dir) = &cfg.restore {
            let ready = core.ready.get().expect("set just above");
            let keys = super::checkpoint::restore(ready, dir, &cluster)?;
            tracing::info!(rank, keys, dir = %dir.display(), "restored from a checkpoint");
        }
        let notices = core.ready.get().and_then(|r| r.onesided.clone()).map(|os| {
            let core = core.clone();
            std::thread::Builder::new()
                .name("pserv-onesided".into())
                .spawn(move || {
                    let ready = core.ready.get().expect("set before the thread starts");
                    let allow_non_finite = core.allow_non_finite;
                    os.serve_notices(|push| apply_landed(ready, push, allow_non_finite))
                })
                .map_err(|source| EngineError::Io {
                    context: "starting the one-sided notice thread".into(),
                    source,
                })
        });
        let notices = notices.transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let core = core.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pserv-replicate".into())
                .spawn(move || {
                    let ready = core.ready.get().expect("set before the thread starts");
                    ready.repl.run_flusher(
                        entries(ready),
                        || ready.table.read().epoch(),
                        || stop.load(Ordering::Relaxed),
                    )
                })
                .map_err(|source| EngineError::Io {
                    context: "starting the replication thread".into(),
                    source,
                })?
        };
        scheduler.send(Control::Ready.to_frame(node_id))?;
        Ok(Server {
            flusher: Some((flusher, stop)),
            notices,
            core,
            control: rx,
            addr,
            transport,
            sched,
            scheduler_addr: cfg.scheduler,
            scheduler_grace: cfg.scheduler_grace,
            dump_model: cfg.dump_model.clone(),
            dropped: Departed::default(),
        })
    }

    /// The scheduler sent a new routing table: install it if it is newer, and move
    /// replication to the new chains.
    fn install_table(&self, new: Partition) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let new = Arc::new(new);
        // The clock gate is locked across the switch and the eviction: no request it
        // holds for the old table may be let through (and move a clock) in between.
        let mut gate = ready.clocks.lock();
        let switched = {
            let mut t = ready.table.write();
            let switched = switch_table(
                &mut gate,
                &mut t,
                new.clone(),
                |old, new| ready.repl.prepare_table(old, new),
                |p| p.frame.header().epoch,
            );
            // Windows of ranges this server no longer heads stop being used, before any
            // request of the new table is served (readers see them retired).
            if let (Some(_), Some(os)) = (&switched, &ready.onesided) {
                os.retire_unheaded(|r| heads_all(&t, ready.rank, r));
            }
            switched
        };
        let Some(Switched {
            old,
            stale,
            actions,
        }) = switched
        else {
            tracing::debug!(epoch = new.epoch(), "older routing table ignored");
            return;
        };
        // Clocked requests the gate held were routed with the old table: refused (with
        // the new table first), so the workers resend them; they moved no clock.
        let epoch = new.epoch();
        for p in stale {
            let h = *p.frame.header();
            let refusal = Refusal(
                Status::StaleEpoch,
                format!(
                    "the routing table changed to epoch {epoch} while this request waited \
                     for the workers' clocks: learn the table and resend"
                ),
            );
            refuse(ready, &p.conn, &h, refusal);
        }
        run_actions(&self.core, ready, &mut gate, actions);
        drop(gate);
        tracing::info!(
            rank = ready.rank,
            from = old.epoch(),
            to = new.epoch(),
            ranges = new.ranges_of(ready.rank as usize).len(),
            "routing table changed"
        );
        ready.repl.on_table(entries(ready), &old, &new);
        self.dropped.table_changed(&old, &new, Some(ready.rank));
    }

    /// Peers the table left out [`DEPARTED_GRACE`] ago whose connection is still
    /// open (a server declared dead behind a partition: its TCP connection does not close
    /// for many minutes, and replica batches sent to it would wait for an acknowledgement
    /// that never comes): close it, and regroup what waited on it, as when it closes.
    fn drop_departed_peers(&self) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        for s in self.dropped.take_due() {
            if let Some(c) = ready.repl.peer(s).filter(|c| !c.is_closed()) {
                tracing::warn!(
                    peer = s,
                    addr = %c.peer_addr(),
                    "server {s} left the routing table {DEPARTED_GRACE:?} ago and its connection is still open: closing it; replica batches waiting on it are regrouped"
                );
                c.close();
                let table = ready.table.read().clone();
                ready.repl.peer_lost(entries(ready), &table, s);
            }
        }
    }

    /// The scheduler's connection closed (it failed): try once to reach a restarted one
    /// (`pserv scheduler --recover` on the same address) and report this server to it. The
    /// data path goes on meanwhile; this is tried again at the next tick.
    fn reconnect_scheduler(&self) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let report = || Report {
            role: Role::Server,
            rank: ready.rank,
            node_id: ready.node_id,
            addr: Some(self.addr),
            table: ready.table.read().as_ref().clone(),
            // Barriers are the workers' business.
            barriers: 0,
        };
        let connect = |addr, timeout| self.transport.connect(addr, timeout);
        if let Some(conn) = rejoin::rejoin(connect, self.scheduler_addr, Holder::Server, report) {
            *self.sched.lock() = conn;
        }
    }

    /// Worker `rank` enters the job at `clock` (it joined): the clock gate counts it
    /// from `clock + 1` on. Answered to the scheduler, whose barrier waits for it.
    fn enter_worker(&self, rank: u32, clock: u64) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        {
            let mut gate = ready.clocks.lock();
            let actions = gate.add_worker(rank as usize, clock);
            ready.workers.fetch_max(rank + 1, Ordering::AcqRel);
            super::handler::run_actions(&self.core, ready, &mut gate, actions);
        }
        tracing::info!(
            worker = rank,
            clock,
            "a worker enters: the clock gate counts it"
        );
        let _ = self
            .sched
            .lock()
            .send(Control::WorkerEntered { rank }.to_frame(ready.node_id));
    }

    /// The scheduler asks which clock failed worker `rank` reached here: the smallest
    /// over the ranges this server heads (every push of it up to there is applied).
    fn tell_worker_clock(&self, rank: u32) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let clock = {
            let gate = ready.clocks.lock();
            let table = ready.table.read().clone();
            let c = gate.clock();
            if (rank as usize) < c.nodes() {
                table
                    .ranges_of(ready.rank as usize)
                    .iter()
                    .map(|r| c.clock_of(*r, rank as usize))
                    .min()
                    .unwrap_or(u64::MAX)
            } else {
                0
            }
        };
        tracing::info!(worker = rank, clock, "the clock of a failed worker here");
        let _ = self
            .sched
            .lock()
            .send(Control::WorkerClockIs { rank, clock }.to_frame(ready.node_id));
    }

    /// Worker `rank` left the job (the scheduler says so): the clock gate stops waiting
    /// for it, as when its connection to this server closes.
    fn retire_worker(&self, rank: u32) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let mut gate = ready.clocks.lock();
        let actions = gate.retire(rank as usize);
        super::handler::run_actions(&self.core, ready, &mut gate, actions);
    }

    /// The scheduler holds an epoch barrier for a checkpoint: write this server's file
    /// into `dir` and report it (or why it could not be written).
    fn write_checkpoint(&self, dir: &str, epoch: u64) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let msg = match super::checkpoint::write_part(ready, std::path::Path::new(dir), epoch) {
            Ok(file) => {
                tracing::info!(
                    rank = ready.rank,
                    epoch,
                    keys = file.keys,
                    dir,
                    "checkpoint file written"
                );
                Control::CheckpointWritten { epoch, file }
            }
            Err(reason) => {
                tracing::error!(rank = ready.rank, epoch, dir, %reason, "checkpoint file not written");
                Control::CheckpointFailed { epoch, reason }
            }
        };
        let _ = self.sched.lock().send(msg.to_frame(ready.node_id));
    }

    /// Connect to servers that joined.
    fn connect_peers(&self, servers: &[proto::ServerInfo]) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        for s in servers {
            if s.rank == ready.rank || ready.repl.has_peer(s.rank) {
                continue;
            }
            match self.transport.connect(s.addr, Duration::from_secs(5)) {
                Ok(c) => {
                    c.set_tag(ConnTag::Server(ServerRank(s.rank)).to_u64(Holder::Server));
                    ready.repl.add_peer(s.rank, c);
                    tracing::info!(peer = s.rank, addr = %s.addr, "connected to a server that joined");
                }
                Err(e) => tracing::warn!(peer = s.rank, error = %e, "no connection to a server"),
            }
        }
    }

    /// Where workers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until the scheduler says the job is over (or its connection closes); then
    /// report the store's counters to the scheduler and, if configured, dump the model.
    pub fn run(self) -> Result<(), EngineError> {
        // SIGTERM: leave gracefully (hand the ranges over first), then stop when told.
        let term = Arc::new(AtomicBool::new(false));
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()) {
            tracing::warn!(error = %e, "cannot catch SIGTERM; it will stop the server at once");
        }
        let mut leaving: Option<std::time::Instant> = None;
        // Since when the scheduler has been unreachable.
        let mut sched_lost: Option<std::time::Instant> = None;
        let mut failed = None;
        loop {
            if let Some(since) = leaving {
                // A leave needs the scheduler (it moves the ranges): without one, or
                // when it does not finish in time, stop now.
                if self.sched.lock().is_closed() {
                    tracing::warn!(scheduler = %self.scheduler_addr, "SIGTERM: the scheduler is gone, so no graceful leave; stopping now");
                    break;
                }
                if since.elapsed() > LEAVE_MAX {
                    tracing::warn!(scheduler = %self.scheduler_addr, "SIGTERM: the leave did not finish in {} s; stopping now", LEAVE_MAX.as_secs());
                    break;
                }
            }
            if term.load(Ordering::Relaxed) && leaving.is_none() {
                leaving = Some(std::time::Instant::now());
                if let Some(r) = self.core.ready.get() {
                    tracing::info!(
                        rank = r.rank,
                        "SIGTERM: asking the scheduler to let this server leave"
                    );
                    let _ = self
                        .sched
                        .lock()
                        .send(Control::Leave { rank: r.rank }.to_frame(r.node_id));
                } else {
                    break;
                }
            }
            match self
                .control
                .recv_timeout(Duration::from_millis(100).min(proto::HEARTBEAT_EVERY))
            {
                Ok(Control::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Control::Refused { reason }) if leaving.is_some() => {
                    tracing::warn!(%reason, "the scheduler refused the leave; stopping now");
                    break;
                }
                Ok(Control::Log { line }) => tracing::info!("{line}"),
                Ok(Control::Table { partition }) => self.install_table(partition),
                Ok(Control::Servers { servers }) => self.connect_peers(&servers),
                Ok(Control::WorkerGone { rank }) => self.retire_worker(rank),
                Ok(Control::WorkerEnters { rank, clock }) => self.enter_worker(rank, clock),
                Ok(Control::WorkerClock { rank }) => self.tell_worker_clock(rank),
                Ok(Control::CheckpointWrite { dir, epoch }) => self.write_checkpoint(&dir, epoch),
                Ok(other) => tracing::debug!(?other, "control message ignored by server"),
                Err(RecvTimeoutError::Timeout) => {
                    self.drop_departed_peers();
                    if self.sched.lock().is_closed() {
                        let since = *sched_lost.get_or_insert_with(std::time::Instant::now);
                        self.reconnect_scheduler();
                        if !self.sched.lock().is_closed() {
                            sched_lost = None;
                        } else if since.elapsed() > self.scheduler_grace {
                            let why = format!(
                                "the scheduler at {} has been unreachable for {:.0} s \
                                 (--scheduler-grace-secs {}): this server stops",
                                self.scheduler_addr,
                                since.elapsed().as_secs_f64(),
                                self.scheduler_grace.as_secs()
                            );
                            tracing::error!("{why}");
                            failed = Some(EngineError::Timeout(why));
                            break;
                        }
                    }
                    let id = self.core.ready.get().map_or(0, |r| r.node_id);
                    let _ = self.sched.lock().send(Control::Heartbeat.to_frame(id));
                    if let Some(r) = self.core.ready.get() {
                        let (batches, pushes, oldest) = r.repl.lag();
                        let lag = Control::ReplicationLag {
                            batches,
                            pushes,
                            oldest_us: oldest.as_micros() as u64,
                        };
                        let _ = self.sched.lock().send(lag.to_frame(id));
                    }
                }
            }
        }
        if let Some(r) = self.core.ready.get() {
            let stats = match &r.store {
                AnyStore::F32(t) => stats_of(r, &t.store),
                AnyStore::F64(t) => stats_of(r, &t.store),
            };
            let kc = self.core.key_cache.stats();
            let stats = ServerStats {
                key_cache: [kc.stored, kc.hits, kc.absent + kc.mismatches, kc.evicted],
                ..stats
            };
            tracing::info!(
                rank = r.rank,
                keys = stats.keys,
                nonzero = stats.nonzero,
                "server shutting down"
            );
            let _ = self
                .sched
                .lock()
                .send(Control::ServerDone { stats }.to_frame(r.node_id));
            if let Some(dir) = &self.dump_model {
                let path = dir.join(format!("model-{}.bin", r.rank));
                let written = match &r.store {
                    AnyStore::F32(t) => dump_model(&t.store, &path),
                    AnyStore::F64(t) => dump_model(&t.store, &path),
                };
                written.map_err(|source| EngineError::Io {
                    context: format!("writing the model to {}", path.display()),
                    source,
                })?;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.sched.lock().queued_bytes() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Some(r) = self.core.ready.get() {
            // Replication still on its way (a leaving server's last batches and hand-off
            // markers) goes out first.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !r.repl.idle() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if let Some(os) = self.core.ready.get().and_then(|r| r.onesided.as_ref()) {
            os.stop();
        }
        if let Some(t) = self.notices {
            let _ = t.join();
        }
        if let Some((t, stop)) = self.flusher {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
        self.transport.shutdown();
        failed.map_or(Ok(()), Err)
    }
}

/// The longest a server asked to leave (SIGTERM) waits for the scheduler to finish the
/// leave before it stops anyway.
const LEAVE_MAX: Duration = Duration::from_secs(60);

pub(super) fn stats_of<T: Value>(ready: &Ready, store: &Store<T>) -> ServerStats {
    let repl = ready.repl.stats();
    ServerStats {
        rank: ready.rank,
        keys: store.key_count(),
        nonzero: store.nonzero_count(),
        bytes: store.bytes(),
        held_pulls: ready.held.0.load(Ordering::Relaxed),
        held_pull_seconds: ready.held.1.load(Ordering::Relaxed) as f64 * 1e-9,
        replica_batches: repl.batches,
        replica_pushes: repl.pushes,
        replica_bytes: repl.bytes,
        key_cache: [0; 4],
    }
}

/// Write every stored key and its weights, in key order: per key the u64 key then the
/// weights, little-endian. Two runs that built the same model write the same bytes.
pub(super) fn dump_model<T: Value>(
    store: &Store<T>,
    path: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut result = Ok(());
    store.for_each(|key, weights| {
        if result.is_ok() {
            result = out
                .write_all(&key.to_le_bytes())
                .and_then(|_| out.write_all(bytemuck::cast_slice(weights)));
        }
    });
    result?;
    out.flush()
}

pub(super) fn make_ready(
    node_id: u32,
    rank: u32,
    cluster: &ClusterInfo,
    shards: usize,
    (rules, answers): (&UserRules, &crate::filter::AnswerFilterSet),
    transport: TransportKind,
    repl: Replicator,
) -> Result<Ready, EngineError> {
    // The store takes any key; which keys this server serves is the routing table's
    // business (checked per request, with its epoch).
    let range = KeyRange::FULL;
    // Enough state for the default rule and every user rule of the cluster's type.
    let user_state_len = match cluster.value_type {
        ValueType::F32 => rules.state_len_f32(),
        ValueType::F64 => rules.state_len_f64(),
    };
    let cfg = StoreConfig {
        shards,
        value_len: cluster.value_len as usize,
        state_len: cluster.update.state_len().max(user_state_len),
        ..StoreConfig::default()
    };
    let onesided = ServerOneSided::new(
        transport,
        cluster.value_len as usize,
        match cluster.value_type {
            ValueType::F32 => 4,
            ValueType::F64 => 8,
        },
    )?
    .map(Arc::new);
    let err = |e: StoreError| EngineError::Config(format!("creating the store: {e}"));
    let store = match cluster.value_type {
        ValueType::F32 => AnyStore::F32(Typed {
            updates: registry(cluster.update.build::<f32>(), &rules.f32)?,
            answers: answers.f32.clone(),
            store: Store::new(range, cfg).map_err(err)?,
        }),
        ValueType::F64 => AnyStore::F64(Typed {
            updates: registry(cluster.update.build::<f64>(), &rules.f64)?,
            answers: answers.f64.clone(),
            store: Store::new(range, cfg).map_err(err)?,
        }),
    };
    Ok(Ready {
        node_id,
        rank,
        store,
        // The servers of the first table (ids 1..=S); joiners have ids above the workers.
        servers: cluster
            .servers
            .iter()
            .filter(|s| NodeId(s.id) == NodeId::first_server(ServerRank(s.rank)))
            .count() as u32,
        workers: AtomicU32::new(cluster.workers),
        replace_workers: cluster.replace_workers,
        pulls_answered: Mutex::new(std::collections::HashMap::new()),
        clocks: Mutex::new({
            let mut gate = ClockGate::new(range, cluster.workers as usize);
            // Workers gone before this server joined: nothing held waits for them yet.
            for &w in &cluster.gone_workers {
                let held = gate.retire(w as usize);
                debug_assert!(held.is_empty(), "a new gate holds nothing");
            }
            gate
        }),
        table: RwLock::new(Arc::new(cluster.partition.clone())),
        repl,
        held: (AtomicU64::new(0), AtomicU64::new(0)),
        onesided,
    })
}
