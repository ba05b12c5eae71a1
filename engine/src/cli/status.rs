//! `pserv status`: ask the scheduler for its view of the cluster and print it.

use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_channel::Sender;
use pserv_transport::{CloseReason, Conn, Handler, RecvFrame, TcpConfig, TcpTransport};

use crate::base::error::EngineError;
use crate::base::security::Security;

/// How a command that talks to the scheduler (`status`, `leave`, `checkpoint`) reaches
/// it: the cluster secret (or none), and TLS where the cluster runs it.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The cluster secret, or `Insecure`.
    pub security: Security,
    /// The cluster's TLS files, when it runs TLS.
    pub tls: Option<pserv_transport::TlsConfig>,
}

impl Access {
    fn apply(&self, cfg: &mut TcpConfig) -> Result<(), EngineError> {
        self.security.apply(cfg, false)?;
        cfg.tls = self.tls.clone();
        Ok(())
    }
}
use crate::proto::{Control, Role, StatusReport};

struct StatusHandler {
    tx: Sender<Control>,
}

impl Handler for StatusHandler {
    fn on_frame(&mut self, _conn: &Conn, frame: RecvFrame<'_>) {
        if let Ok(msg) = Control::from_frame(&frame.frame()) {
            let _ = self.tx.send(msg);
        }
    }

    fn on_close(&mut self, _conn: &Conn, _reason: &CloseReason) {}
}

/// Send `request` to the scheduler at `addr` on a connection of its own (made within
/// `connect`) and wait at most `timeout` for its first answer (`Err(())` when none came).
fn ask(
    addr: SocketAddr,
    access: &Access,
    request: Control,
    connect: Duration,
    timeout: Duration,
) -> Result<Result<Control, ()>, EngineError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut cfg = TcpConfig {
        threads: 1,
        pin_cores: false,
        ..TcpConfig::default()
    };
    access.apply(&mut cfg)?;
    let transport = TcpTransport::start(cfg, |_| StatusHandler { tx: tx.clone() })?;
    let conn = transport.connect(addr, connect)?;
    conn.send(request.to_frame(0))?;
    let answer = rx.recv_timeout(timeout).map_err(|_| ());
    transport.shutdown();
    Ok(answer)
}

/// `pserv leave`: send the scheduler at `addr` a leave `request` (`Control::Leave` for
/// a server, `Control::WorkerLeave` for a worker); prints the scheduler's answer. Fails
/// when the scheduler refuses (the rank holds no ranges, it is the last server, another
/// change is in progress, the worker is not running).
pub fn leave(addr: SocketAddr, access: &Access, request: Control) -> Result<(), EngineError> {
    let timeout = Duration::from_secs(10);
    match ask(addr, access, request, timeout, timeout)? {
        Ok(Control::Log { line }) => {
            println!("{line}");
            Ok(())
        }
        Ok(Control::Refused { reason }) => Err(EngineError::InvalidRequest(format!(
            "the scheduler refused: {reason}"
        ))),
        Ok(other) => Err(EngineError::InvalidRequest(format!(
            "unexpected answer from the scheduler: {other:?}"
        ))),
        Err(_) => Err(EngineError::Timeout(format!(
            "no answer from the scheduler at {addr} within {timeout:?}"
        ))),
    }
}

/// `pserv checkpoint`: ask the scheduler at `addr` for a checkpoint into `dir` at the
/// next epoch barrier and wait (at most `timeout`) until it is written; prints the
/// scheduler's answer. Fails when the scheduler refuses (the job ended first, a server
/// could not write its file).
pub fn checkpoint(
    addr: SocketAddr,
    access: &Access,
    dir: &std::path::Path,
    timeout: Duration,
) -> Result<(), EngineError> {
    let dir = std::path::absolute(dir).map_err(|source| EngineError::Io {
        context: format!("resolving {}", dir.display()),
        source,
    })?;
    let dir_s = dir.display().to_string();
    let request = Control::CheckpointRequest { dir: dir_s.clone() };
    match ask(
        addr,
        access,
        request,
        Duration::from_secs(10).min(timeout),
        timeout,
    )? {
        Ok(Control::Log { line }) => {
            println!("{line}");
            Ok(())
        }
        Ok(Control::Refused { reason }) => Err(EngineError::InvalidRequest(format!(
            "the scheduler refused: {reason}"
        ))),
        Ok(other) => Err(EngineError::InvalidRequest(format!(
            "unexpected answer from the scheduler: {other:?}"
        ))),
        Err(_) => Err(EngineError::Timeout(format!(
            "no checkpoint into {dir_s} from the scheduler at {addr} within {timeout:?} \
             (it is taken at the next epoch barrier)"
        ))),
    }
}

/// Connect to the scheduler at `addr` (authenticated as `security` says), ask for its
/// status, and return the report.
pub fn fetch(
    addr: SocketAddr,
    access: &Access,
    timeout: Duration,
) -> Result<StatusReport, EngineError> {
    match ask(addr, access, Control::StatusRequest, timeout, timeout)? {
        Ok(Control::Status { report }) => Ok(report),
        Ok(Control::Refused { reason }) => Err(EngineError::Registration(reason)),
        Ok(other) => Err(EngineError::InvalidRequest(format!(
            "unexpected answer from the scheduler: {other:?}"
        ))),
        Err(_) => Err(EngineError::Timeout(format!(
            "no status from the scheduler at {addr} within {timeout:?}"
        ))),
    }
}

/// The report as the text `pserv status` prints.
pub fn render(r: &StatusReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "routing table epoch {}, {} replica(s) per range beyond the head; job {}\n",
        r.epoch,
        r.replicas,
        if r.finished {
            "finished"
        } else if r.running {
            "running"
        } else {
            "waiting for nodes"
        }
    ));
    s.push_str("\nranges (head first):\n");
    for rs in &r.ranges {
        let chain: Vec<String> = rs.chain.iter().map(|c| format!("server {c}")).collect();
        s.push_str(&format!("  {}  {}\n", rs.range, chain.join(" -> ")));
    }
    s.push_str("\nnodes:\n");
    for n in &r.nodes {
        let hb = n
            .heartbeat_ms_ago
            .map(|ms| format!(", last heartbeat {ms} ms ago"))
            .unwrap_or_default();
        let addr = n.addr.map(|a| format!(" at {a}")).unwrap_or_default();
        let role = match n.role {
            Role::Server => "server",
            Role::Worker => "worker",
        };
        let repl = n
            .replication
            .map(|(b, p, us)| {
                format!(
                    "; replication: {b} batch(es) with {p} push(es) waiting for their tail, oldest {:.1} ms",
                    us as f64 / 1e3
                )
            })
            .unwrap_or_default();
        let shard = n
            .shard
            .as_ref()
            .map(|sh| {
                let rows: Vec<String> = sh.rows.iter().map(|(a, b)| format!("{a}..{b}")).collect();
                let mut t = format!(
                    "; rows {} in epoch {} from clock {}",
                    if rows.is_empty() {
                        "none".to_string()
                    } else {
                        rows.join(", ")
                    },
                    sh.epoch,
                    sh.clock
                );
                if sh.replaced > 0 {
                    t.push_str(&format!(", replacement {}", sh.replaced));
                }
                if sh.left {
                    t.push_str(", left");
                }
                t
            })
            .unwrap_or_default();
        s.push_str(&format!(
            "  {role} {}{addr}: {}{hb}{repl}{shard}\n",
            n.rank, n.state
        ));
    }
    s.push_str("\nreplication lag: ");
    let reports: Vec<(u64, u64, u64)> = r.nodes.iter().filter_map(|n| n.replication).collect();
    if reports.is_empty() {
        s.push_str("no server reported yet\n");
    } else {
        let batches: u64 = reports.iter().map(|x| x.0).sum();
        let pushes: u64 = reports.iter().map(|x| x.1).sum();
        let oldest = reports.iter().map(|x| x.2).max().unwrap_or(0);
        s.push_str(&format!(
            "{batches} batch(es) with {pushes} push(es) not yet acknowledged by their tails, \
             oldest {:.1} ms (a head answers a push once every replica of its range holds it)\n",
            oldest as f64 / 1e3
        ));
    }
    for (range, lag) in &r.replication_lag {
        s.push_str(&format!("  {range}: {lag} updates behind\n"));
    }
    s
}
