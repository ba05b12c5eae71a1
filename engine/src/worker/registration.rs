//! Joining and leaving the job: registering with the scheduler, connecting to the
//! servers (also those that join later), rejoining a restarted scheduler, and reporting
//! the worker done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pserv_transport::{Conn, TcpTransport};

use crate::base::error::EngineError;
use crate::base::ids::{ConnTag, Holder, ServerRank};
use crate::node::register::{self, Hello, Registration, Welcome};
use crate::node::rejoin::{self, Report};
use crate::onesided::{ClientOneSided, TransportKind};
use crate::proto::{Control, Role, WorkerStats};

use super::config::WorkerConfig;
use super::handler::WorkerHandler;
use super::retry::Retrier;
use super::state::Core;
use super::Worker;

impl Core {
    /// Send to the scheduler over the current connection, once.
    fn to_scheduler_now(&self, msg: &Control, sender: u32) -> Result<(), EngineError> {
        let conn = self
            .sched
            .lock()
            .clone()
            .ok_or(EngineError::SchedulerGone)?;
        Ok(conn.send(msg.to_frame(sender))?)
    }

    /// Send to the scheduler; when the connection is gone, wait (up to the grace a
    /// restarted scheduler has, see [`scheduler_lost`](Self::scheduler_lost)) for a
    /// restarted scheduler's connection and send there.
    fn to_scheduler(&self, msg: &Control, sender: u32) -> Result<(), EngineError> {
        let gen = self.sched_gen.load(Ordering::Acquire);
        let err = match self.to_scheduler_now(msg, sender) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Some(&(addr, _, _, grace)) = self.sched_info.get() else {
            return Err(err);
        };
        // The rejoin thread starts when the handler sees the connection close, which
        // may come a moment after a failed send: wait for a newer connection.
        let deadline = Instant::now() + grace + Duration::from_secs(1);
        tracing::info!(scheduler = %addr, error = %err, "the scheduler is not reachable; waiting for it to come back");
        while Instant::now() < deadline && !self.stop.load(Ordering::Acquire) {
            if self.sched_gen.load(Ordering::Acquire) != gen {
                return self.to_scheduler_now(msg, sender);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(EngineError::Timeout(format!(
            "the scheduler at {addr} did not come back within {grace:?} ({err})"
        )))
    }

    /// The scheduler's connection closed before the job was over: look for a restarted
    /// scheduler for the grace period (on a thread of its own), report this worker to it
    /// and let a barrier in progress ask again; else stop as before.
    pub(super) fn scheduler_lost(self: &Arc<Self>) {
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        let (Some(connector), Some(&(addr, rank, node_id, grace))) =
            (self.connector.get().cloned(), self.sched_info.get())
        else {
            let _ = self.control.send(Control::Shutdown);
            return;
        };
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pserv-rejoin".into())
            .spawn(move || {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline && !core.stop.load(Ordering::Relaxed) {
                    let report = || Report {
                        role: Role::Worker,
                        rank,
                        node_id,
                        // Workers listen nowhere.
                        addr: None,
                        table: core.table().as_ref().clone(),
                        barriers: core.barriers_passed.load(Ordering::Acquire),
                    };
                    let connect = |addr, timeout| connector.connect(addr, timeout);
                    if let Some(conn) = rejoin::rejoin(connect, addr, Holder::Worker, report) {
                        *core.sched.lock() = Some(conn);
                        core.sched_gen.fetch_add(1, Ordering::AcqRel);
                        let _ = core.control.send(Control::SchedulerBack);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                tracing::warn!(scheduler = %addr, "the scheduler did not come back; stopping");
                let _ = core.control.send(Control::Shutdown);
            });
        if spawned.is_err() {
            let _ = self.control.send(Control::Shutdown);
        }
    }

    /// Connect (on a thread of its own: connecting blocks) to the servers not connected
    /// yet, then wake the resends waiting for them.
    pub(super) fn connect_new(self: &Arc<Self>, servers: Vec<crate::proto::ServerInfo>) {
        let Some(connector) = self.connector.get().cloned() else {
            return;
        };
        let core = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pserv-connect".into())
            .spawn(move || {
                for s in servers {
                    let have = core
                        .servers
                        .read()
                        .get(s.rank as usize)
                        .is_some_and(Option::is_some);
                    if have {
                        continue;
                    }
                    match connector.connect(s.addr, Duration::from_secs(5)) {
                        Ok(conn) => {
                            conn.set_tag(ConnTag::Server(ServerRank(s.rank)).to_u64(Holder::Worker));
                            let me = core.sched_info.get().map_or(0, |i| i.2);
                            offer_codec(&conn, core.codec, me);
                            let mut v = core.servers.write();
                            if v.len() <= s.rank as usize {
                                v.resize(s.rank as usize + 1, None);
                            }
                            v[s.rank as usize] = Some(conn);
                            tracing::info!(server = s.rank, addr = %s.addr, "connected to a server that joined");
                        }
                        Err(e) => tracing::warn!(server = s.rank, error = %e, "cannot reach a server"),
                    }
                }
                core.wake();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to connect to new servers");
        }
    }
}

impl Worker {
    /// Register with the scheduler, wait for the cluster table, connect to every server.
    pub fn connect(cfg: WorkerConfig) -> Result<Worker, EngineError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (wake_tx, wake_rx) = crossbeam_channel::unbounded();
        let core = Arc::new(
            Core::new(tx, wake_tx, cfg.timeout)
                .with_key_cache(cfg.key_cache)
                .with_codec(cfg.compress),
        );
        let mut tcp = cfg.tcp.clone();
        cfg.security.apply(&mut tcp, false)?;
        let transport = TcpTransport::start(tcp, |_| WorkerHandler { core: core.clone() })?;
        let scheduler = register::connect(&transport, cfg.scheduler, Holder::Worker)?;
        // Before the hello: the handler tells a closing current scheduler connection
        // from an old one by this.
        *core.sched.lock() = Some(scheduler.clone());
        let registration = Registration {
            hello: match cfg.replace {
                Some(rank) => Hello::Replace { rank },
                None => Hello::Register {
                    role: Role::Worker,
                    addr: None,
                    rank: cfg.rank,
                },
            },
            scheduler: cfg.scheduler,
            timeout: cfg.register_timeout,
            // The handler turns a closed scheduler connection into a `Shutdown` (nothing
            // to rejoin yet).
            shutdown_is_gone: true,
        };
        let Welcome {
            node_id,
            rank,
            cluster,
            resume,
        } = register::register(&scheduler, &rx, &registration)?;
        // A newer table may already have come (then the welcome's is not installed).
        core.install(cluster.partition.clone());
        // Connections from now on (to servers, to a restarted scheduler) speak as this id.
        transport.set_identity(node_id);
        transport.repin(node_id as usize);
        let _ = core.connector.set(transport.connector());
        let _ = core
            .sched_info
            .set((cfg.scheduler, rank, node_id, cfg.scheduler_grace));
        let mut servers: Vec<Option<Conn>> = Vec::with_capacity(cluster.servers.len());
        for s in &cluster.servers {
            if servers.len() <= s.rank as usize {
                servers.resize(s.rank as usize + 1, None);
            }
            match transport.connect(s.addr, Duration::from_secs(10)) {
                Ok(conn) => {
                    conn.set_tag(ConnTag::Server(ServerRank(s.rank)).to_u64(Holder::Worker));
                    offer_codec(&conn, cfg.compress, node_id);
                    servers[s.rank as usize] = Some(conn);
                }
                // A worker that joins late may find servers that failed since; the
                // routing table sends it nothing there.
                Err(e) if rank >= cluster.workers => {
                    tracing::warn!(server = s.rank, error = %e, "cannot reach a server")
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::debug!(node_id, rank, servers = servers.len(), "worker connected");
        *core.servers.write() = servers;
        let onesided = match ClientOneSided::new(cfg.transport) {
            Ok(o) => o,
            Err(e) if cfg.transport == TransportKind::Auto => {
                tracing::info!(error = %e, "transport auto: no one-sided backend, using tcp");
                None
            }
            Err(e) => return Err(e),
        };
        let retrier = Retrier::start(core.clone(), wake_rx)?;
        Ok(Worker {
            core,
            node_id,
            rank,
            cluster,
            control: rx,
            clock: AtomicU64::new(0),
            consistency: cfg.consistency,
            barrier_seq: AtomicU64::new(0),
            spin: Duration::from_micros(cfg.spin_us),
            timeout: cfg.timeout,
            transport,
            onesided,
            _retrier: retrier,
            resume,
        })
    }

    /// Send a control message to the scheduler (log lines, summaries); while a
    /// restarted scheduler is awaited, wait for it (bounded by the rejoin grace).
    pub fn tell_scheduler(&self, msg: Control) -> Result<(), EngineError> {
        self.core.to_scheduler(&msg, self.node_id)
    }

    /// [`tell_scheduler`](Self::tell_scheduler) without waiting: an error when the
    /// scheduler connection is down now (for messages worth no stall, like progress).
    pub fn tell_scheduler_now(&self, msg: Control) -> Result<(), EngineError> {
        self.core.to_scheduler_now(&msg, self.node_id)
    }

    /// Report that this worker is done and disconnect. Does not wait for the other
    /// workers (the scheduler ends the job when the last one is done).
    pub fn finish(self, examples: u64) -> Result<(), EngineError> {
        self.finish_with(examples, 0.0, 0.0)
    }

    /// [`finish`](Self::finish), reporting the seconds spent training and, of those, the
    /// seconds spent blocked on pulls.
    pub fn finish_with(
        self,
        examples: u64,
        seconds: f64,
        blocked_seconds: f64,
    ) -> Result<(), EngineError> {
        let (bytes_sent, bytes_received) = self.traffic();
        self.core.over.store(true, Ordering::Release);
        self.tell_scheduler(Control::Done {
            stats: WorkerStats {
                examples,
                bytes_sent,
                bytes_received,
                seconds,
                blocked_seconds,
            },
        })?;
        // Let the report leave before the sockets close.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .core
            .sched
            .lock()
            .as_ref()
            .is_some_and(|c| c.queued_bytes() > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.transport.shutdown();
        Ok(())
    }
}

/// Compress requests on a new server connection with `codec`, and ask the server to
/// compress its answers on it so (a server that never got this still answers in the
/// codec of the first compressed request it gets).
fn offer_codec(conn: &Conn, codec: pserv_transport::compress::Codec, node_id: u32) {
    if codec == pserv_transport::compress::Codec::None {
        return;
    }
    conn.set_codec(codec);
    let ask = Control::Compress {
        codec: codec.to_string(),
    };
    if let Err(e) = conn.send(ask.to_frame(node_id)) {
        tracing::debug!(error = %e, "could not ask a server to compress its answers");
    }
}
