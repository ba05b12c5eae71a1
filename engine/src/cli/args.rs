//! Command-line and environment configuration shared by the `pserv` roles.
//!
//! Every flag can also be set by a `PSERV_*` environment variable (in the spirit of
//! ps-lite's `DMLC_*`), so a cluster manager can start identical commands everywhere.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use pserv_transport::{RdmaMessages, ShmMessages, TcpConfig};

use crate::base::error::EngineError;
use crate::base::security::Security;
use crate::proto::ValueType;
use crate::scheduler::ClusterSpec;
use crate::update::UpdateSpec;

/// Default scheduler address.
pub const DEFAULT_SCHEDULER: &str = "127.0.0.1:9190";

/// Transport flags.
#[derive(Args, Clone, Debug)]
pub struct NetArgs {
    /// Transport: `auto` (messages over shared memory between processes of one host,
    /// over RDMA queue pairs between hosts that both have a device (builds with the
    /// `rdma` feature), TCP otherwise; dense one-sided windows over RDMA when both ends
    /// have a device, shared memory on one host), `tcp` (everything over TCP), `shm`
    /// (messages and windows over shared memory on one host) or `rdma` (windows and
    /// messages over RDMA verbs, with every peer; TCP where a peer has no device).
    #[arg(long, env = "PSERV_TRANSPORT", default_value = "auto")]
    pub transport: crate::onesided::TransportKind,
    /// Move messages to RDMA queue pairs where `--transport` says so (`rdma`: every
    /// peer; `auto`: peers on other hosts). `false` keeps messages on TCP (and shared
    /// memory) while windows still use RDMA.
    #[arg(long, env = "PSERV_RDMA_MESSAGES", default_value_t = true, action = clap::ArgAction::Set)]
    pub rdma_messages: bool,
    /// Event-loop threads (default: one per core).
    #[arg(long, env = "PSERV_THREADS")]
    pub threads: Option<usize>,
    /// Pin event loops to cores.
    #[arg(long, env = "PSERV_PIN_CORES", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_cores: bool,
    /// After activity, event loops poll without sleeping for this many microseconds.
    #[arg(long, env = "PSERV_BUSY_POLL_US", default_value_t = 100)]
    pub busy_poll_us: u64,
    /// Largest accepted frame in MiB.
    #[arg(long, env = "PSERV_MAX_FRAME_MB", default_value_t = 512)]
    pub max_frame_mb: usize,
    /// Authentication (`--secret-file`, `--insecure`).
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Encryption (`--tls-cert`, `--tls-key`, `--tls-ca`).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS between nodes: all three files, or none (no TLS).
///
/// With them, every connection runs TLS 1.3 after the secret's exchange, certificates
/// checked both ways against the CA; its frames never move to shared memory or RDMA.
/// Every node's certificate must carry the DNS name `pserv` (nodes connect by address
/// and all verify that one name); `pserv tls-certs DIR` makes a CA and such a
/// certificate. Both ends must agree: a node with TLS and one without refuse each other.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// This node's certificate chain (PEM, its certificate first), signed by the cluster
    /// CA, with the DNS name `pserv`.
    #[arg(long, env = "PSERV_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM), a file only its owner can read.
    #[arg(long, env = "PSERV_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA's certificate (PEM) every peer's certificate is checked against.
    #[arg(long, env = "PSERV_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS configuration these flags name (files read and checked), or none.
    pub fn tls(&self) -> Result<Option<pserv_transport::TlsConfig>, EngineError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                pserv_transport::TlsConfig::from_pem_files(cert, key, ca)
                    .map(Some)
                    .map_err(|e| EngineError::Config(e.to_string()))
            }
            _ => Err(EngineError::Config(
                "TLS needs all three of --tls-cert, --tls-key and --tls-ca (or \
                 PSERV_TLS_CERT, PSERV_TLS_KEY, PSERV_TLS_CA), or none of them"
                    .into(),
            )),
        }
    }

    /// These flags as arguments for a child process (absolute paths: it may start
    /// elsewhere). The files are paths, not secrets; the key file's mode keeps it its
    /// owner's.
    pub fn to_args(&self) -> Vec<String> {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        let mut a = Vec::new();
        for (flag, p) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(p) = p {
                a.push(format!("{flag}={}", abs(p).display()));
            }
        }
        a
    }
}

/// How a node authenticates: a cluster secret (required unless `--insecure`).
#[derive(Args, Clone, Debug, Default)]
pub struct SecurityArgs {
    /// The cluster secret: a file of at least 16 bytes that only its owner can read
    /// (make one with `pserv secret FILE`). Every connection proves both ends hold it
    /// before anything else is said. `pserv local` makes one per job.
    #[arg(long, env = "PSERV_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Run without authentication: anyone who can reach this node's ports can read and
    /// change the model, register or make servers leave. Both ends must agree: a node
    /// with a secret and one without refuse each other.
    #[arg(long, env = "PSERV_INSECURE", conflicts_with = "secret_file")]
    pub insecure: bool,
}

impl SecurityArgs {
    /// What these flags say: the secret file read and checked, or no authentication.
    pub fn security(&self) -> Result<Security, EngineError> {
        match (&self.secret_file, self.insecure) {
            (_, true) => Ok(Security::Insecure),
            (Some(p), false) => Security::from_file(p),
            (None, false) => Security::FromEnv
                .resolve()
                .map(|s| Security::Secret(s.expect("FromEnv resolves to a secret or an error"))),
        }
    }
}

impl NetArgs {
    /// The TCP transport configuration these flags describe.
    pub fn tcp(&self) -> Result<TcpConfig, EngineError> {
        let mut cfg = TcpConfig::default();
        if let Some(t) = self.threads {
            if t == 0 {
                return Err(EngineError::Config("--threads must be at least 1".into()));
            }
            cfg.threads = t;
        }
        cfg.shm_messages = self.message_path();
        cfg.rdma_messages = self.rdma_message_path();
        tracing::info!(
            transport = %self.transport,
            messages = match (cfg.shm_messages, cfg.rdma_messages) {
                (ShmMessages::SameHost, RdmaMessages::Off) =>
                    "shared memory with peers on this host, TCP with others",
                (ShmMessages::SameHost, _) =>
                    "shared memory with peers on this host, RDMA with others that have a device, else TCP",
                (ShmMessages::Off, RdmaMessages::Off) => "TCP with every peer",
                (ShmMessages::Off, RdmaMessages::OtherHosts) =>
                    "RDMA with peers on other hosts that have a device, else TCP",
                (ShmMessages::Off, RdmaMessages::AllPeers) =>
                    "RDMA with every peer that has a device, else TCP",
            },
            "message path"
        );
        cfg.pin_cores = self.pin_cores;
        cfg.busy_poll_us = self.busy_poll_us;
        cfg.max_frame = self.max_frame_mb.max(1) << 20;
        cfg.tls = self.tls.tls()?;
        if cfg.tls.is_some() {
            tracing::info!(
                "TLS on: every connection runs TLS 1.3 with certificates checked both ways \
                 against the cluster CA (no shared-memory or RDMA messages)"
            );
        }
        Ok(cfg)
    }

    /// Where this node's messages travel to the peers on its host: shared memory with
    /// `auto` and `shm`, not with `tcp` nor with `rdma` (whose messages go over verbs,
    /// see [`rdma_message_path`](Self::rdma_message_path)).
    pub fn message_path(&self) -> ShmMessages {
        use crate::onesided::TransportKind;
        match self.transport {
            TransportKind::Auto | TransportKind::Shm => ShmMessages::SameHost,
            TransportKind::Tcp | TransportKind::Rdma => ShmMessages::Off,
        }
    }

    /// Which peers this node's messages travel to over RDMA queue pairs: every peer with
    /// `rdma`, peers on other hosts with `auto` (in builds with the `rdma` feature; a
    /// side without a device makes or takes no offer and stays on TCP), none with `tcp`,
    /// `shm` or `--rdma-messages=false`.
    pub fn rdma_message_path(&self) -> RdmaMessages {
        use crate::onesided::TransportKind;
        if !self.rdma_messages {
            return RdmaMessages::Off;
        }
        match self.transport {
            TransportKind::Rdma => RdmaMessages::AllPeers,
            TransportKind::Auto if cfg!(feature = "rdma") => RdmaMessages::OtherHosts,
            _ => RdmaMessages::Off,
        }
    }

    /// These flags as command-line arguments (to start child processes).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--transport={}", self.transport),
            format!("--rdma-messages={}", self.rdma_messages),
            format!("--pin-cores={}", self.pin_cores),
            format!("--busy-poll-us={}", self.busy_poll_us),
            format!("--max-frame-mb={}", self.max_frame_mb),
        ];
        if let Some(t) = self.threads {
            a.push(format!("--threads={t}"));
        }
        // The secret file travels in the environment (`PSERV_SECRET_FILE`), never on a
        // command line; only its absence is said here.
        if self.security.insecure {
            a.push("--insecure".into());
        }
        a.extend(self.tls.to_args());
        a
    }
}

/// Cluster shape flags (scheduler and `local`).
#[derive(Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Number of servers.
    #[arg(long, env = "PSERV_NUM_SERVERS", default_value_t = 1)]
    pub servers: u32,
    /// Number of workers.
    #[arg(long, env = "PSERV_NUM_WORKERS", default_value_t = 1)]
    pub workers: u32,
    /// Value element type: f32 or f64.
    #[arg(long, env = "PSERV_VALUE_TYPE", default_value = "f32")]
    pub value_type: ValueType,
    /// Values per key.
    #[arg(long, env = "PSERV_VALUE_LEN", default_value_t = 1)]
    pub value_len: u32,
    /// Virtual nodes per server on the consistent-hashing ring that places keys (0: an
    /// even split of the key space, one range per server).
    #[arg(long, env = "PSERV_VNODES", default_value_t = 64)]
    pub vnodes: u32,
    /// Replicas of every key range after its head (chain replication; a failed server's
    /// ranges pass to their replicas). Default: 1 with two or more servers on the ring,
    /// else 0.
    #[arg(long, env = "PSERV_REPLICAS")]
    pub replicas: Option<u32>,
}

impl ClusterArgs {
    /// Check the flags and build the spec, with the servers' default update function.
    pub fn spec(&self, update: UpdateSpec) -> Result<ClusterSpec, EngineError> {
        if self.servers == 0 || self.workers == 0 {
            return Err(EngineError::Config(
                "a cluster needs at least one server and one worker".into(),
            ));
        }
        if self.value_len == 0 {
            return Err(EngineError::Config("--value-len must be at least 1".into()));
        }
        let spec = ClusterSpec {
            servers: self.servers,
            workers: self.workers,
            value_type: self.value_type,
            value_len: self.value_len,
            update,
            vnodes: self.vnodes,
            replicas: self
                .replicas
                .unwrap_or(u32::from(self.servers >= 2 && self.vnodes > 0)),
        };
        spec.validate().map_err(EngineError::Config)?;
        Ok(spec)
    }
}

/// Where the scheduler is.
#[derive(Args, Clone, Debug)]
pub struct SchedulerAddr {
    /// The scheduler's address.
    #[arg(long, env = "PSERV_SCHEDULER", default_value = DEFAULT_SCHEDULER)]
    pub scheduler: SocketAddr,
}

/// Output flags of a job.
#[derive(Args, Clone, Debug)]
pub struct OutputArgs {
    /// Write the job summary as JSON here.
    #[arg(long, env = "PSERV_SUMMARY_JSON")]
    pub summary_json: Option<PathBuf>,
}
