//! `pserv launch`: one process of a cluster that a cluster manager started (Slurm's
//! `srun`, `mpirun`, a torchrun-style launcher, Kubernetes, or anything that sets plain
//! `PSERV_*` variables). It derives this process's role, rank, the cluster's size and the
//! scheduler's address from the environment ([`detect`], a pure function), then runs the
//! role: the scheduler or a server in this process (the same code as `pserv scheduler` /
//! `pserv server`), a worker as the built-in LR worker or as `-- CMD ...`.
//!
//! Role layout, for the launchers that give one global rank `r` of `n` processes:
//!
//! | global rank | role | role rank |
//! |---|---|---|
//! | 0 | scheduler | - |
//! | 1 ..= S | server | r - 1 |
//! | S+1 .. n | worker | r - 1 - S |
//!
//! S comes from `--servers`, else `PSERV_NUM_SERVERS`, else 1; W = n - 1 - S (an explicit
//! `--workers` / `PSERV_NUM_WORKERS` must agree). With `PSERV_ROLE` the role is named
//! and `PSERV_RANK` (or the ordinal of a StatefulSet pod's name) is the role rank.
//!
//! Detection order (`--launcher auto`; the first that applies wins, and the choice and
//! the variables behind it are printed):
//! 1. `PSERV_ROLE` (plain `PSERV_*`; Kubernetes when the rank is a pod ordinal),
//! 2. Slurm (`SLURM_PROCID`), unless an MPI rank variable is set too and disagrees
//!    (`mpirun` inside an allocation: `SLURM_PROCID` is then a daemon's),
//! 3. MPI: Open MPI (`OMPI_COMM_WORLD_RANK`), PMI (`PMI_RANK`: MPICH, Intel MPI),
//!    PMIx (`PMIX_RANK`),
//! 4. torchrun-style (`RANK`, `WORLD_SIZE`).
//!
//! The scheduler's address: `PSERV_SCHEDULER` (host:port) whenever it is set; else, for
//! Slurm, the first host of the node list (then `MASTER_ADDR`), for MPI and torchrun-style
//! launchers `MASTER_ADDR` (MPI then the Slurm node list, if in an allocation); the port
//! `--scheduler-port`, else (MPI, torchrun-style) `MASTER_PORT`, else 9190.
//!
//! Invariant: every wait is bounded (the scheduler's name resolving and accepting, CMD
//! running); a CMD child is stopped on every signal this process gets (forwarded to its
//! process group, SIGKILL after a grace period) and never outlives it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

use crate::base::error::EngineError;
use crate::cli::app::{Cli, ReplArgs};
use crate::cli::args::NetArgs;
use crate::cli::roles::{ServerLaunch, WorkerLaunch};
use crate::job::JobArgs;
use crate::update::UpdateSpec;

/// The environment as [`detect`] reads it.
pub type Env = BTreeMap<String, String>;

/// The scheduler's port when nothing names one.
pub const DEFAULT_SCHEDULER_PORT: u16 = 9190;

/// Most hosts a node list may expand to (a typo such as `node[0-999999999]` is refused
/// instead of filling memory).
pub const MAX_NODELIST_HOSTS: usize = 1 << 20;

/// Which environment [`detect`] reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LauncherChoice {
    /// The first that applies, in the documented order.
    #[default]
    Auto,
    /// `PSERV_ROLE` with `PSERV_RANK` or a pod ordinal (Kubernetes).
    Pserv,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_JOB_NODELIST`.
    Slurm,
    /// `OMPI_COMM_WORLD_RANK`, `PMI_RANK` or `PMIX_RANK`.
    Mpi,
    /// `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`.
    Torchrun,
}

/// The flags [`detect`] reads besides the environment.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct LaunchFlags {
    /// Servers in the cluster (default: PSERV_NUM_SERVERS, else 1).
    #[arg(long)]
    pub servers: Option<u32>,
    /// Workers in the cluster (default: the world size - 1 - servers; with PSERV_ROLE:
    /// PSERV_NUM_WORKERS). When the world size is known this must agree with it.
    #[arg(long)]
    pub workers: Option<u32>,
    /// The scheduler's port (default: PSERV_SCHEDULER's, else MASTER_PORT under MPI and
    /// torchrun-style launchers, else 9190).
    #[arg(long)]
    pub scheduler_port: Option<u16>,
    /// Where role and rank come from (auto: PSERV_ROLE, then Slurm, then MPI/PMI, then
    /// torchrun-style).
    #[arg(long, value_enum, default_value_t = LauncherChoice::Auto)]
    pub launcher: LauncherChoice,
}

/// Flags of `pserv launch`: its own, and the roles' (each also from its `PSERV_*`
/// variable, so identical commands can run everywhere). The scheduler's other flags
/// (`--value-type`, `--vnodes`, `--replicas`, `--summary-json`, ...) and a server's
/// `--shards` / `--key-cache-keys` reach them through their `PSERV_*` variables only.
#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    /// What detection reads besides the environment.
    #[command(flatten)]
    pub flags: LaunchFlags,
    /// The job's flags (the built-in LR worker; the scheduler's default update rule).
    #[command(flatten)]
    pub job: JobArgs,
    /// Transport flags of every role.
    #[command(flatten)]
    pub net: NetArgs,
    /// Replication flags of a server.
    #[command(flatten)]
    pub repl: ReplArgs,
    /// The servers' update function (default: the job's, e.g. `sgd:<lr>`).
    #[arg(long, env = "PSERV_UPDATE")]
    pub update: Option<UpdateSpec>,
    /// At the end, a server writes its part of the model to DIR/model-RANK.bin.
    #[arg(long, env = "PSERV_DUMP_MODEL")]
    pub dump_model: Option<std::path::PathBuf>,
    /// This host's address, which a server listens on (default: the local address that
    /// routes to the scheduler).
    #[arg(long, env = "PSERV_HOST_IP")]
    pub host_ip: Option<IpAddr>,
    /// Wait at most this long for the scheduler's host name to resolve and (servers and
    /// workers) for the scheduler to accept connections.
    #[arg(long, default_value_t = 120)]
    pub wait_scheduler_secs: u64,
    /// Stop CMD after this many seconds (SIGTERM, then SIGKILL after --grace-secs).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub timeout_secs: u64,
    /// After forwarding a signal to CMD, or at the time limit, wait this long before
    /// SIGKILL.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Print the plan (role, ranks, sizes, scheduler, source) as JSON and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// A worker runs CMD (with PSERV_SCHEDULER, PSERV_RANK, PSERV_NUM_WORKERS,
    /// PSERV_NUM_SERVERS and PSERV_ROLE=worker set) instead of the built-in LR worker;
    /// scheduler and server ranks ignore it.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// Where a plan came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `PSERV_ROLE` and `PSERV_RANK`.
    Pserv,
    /// `PSERV_ROLE` and the ordinal of a StatefulSet pod's name.
    Kubernetes,
    /// `SLURM_PROCID`.
    Slurm,
    /// `OMPI_COMM_WORLD_RANK`.
    OpenMpi,
    /// `PMI_RANK` (MPICH, Intel MPI).
    Pmi,
    /// `PMIX_RANK`.
    Pmix,
    /// `RANK` and `WORLD_SIZE`.
    Torchrun,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Pserv => "PSERV_* variables",
            Source::Kubernetes => "Kubernetes (PSERV_ROLE and the pod ordinal)",
            Source::Slurm => "Slurm",
            Source::OpenMpi => "Open MPI",
            Source::Pmi => "PMI",
            Source::Pmix => "PMIx",
            Source::Torchrun => "torchrun-style variables",
        })
    }
}

/// A process's role in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleKind {
    /// The one scheduler (global rank 0).
    Scheduler,
    /// A server (global ranks 1 ..= S).
    Server,
    /// A worker (the remaining ranks).
    Worker,
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleKind::Scheduler => "scheduler",
            RoleKind::Server => "server",
            RoleKind::Worker => "worker",
        })
    }
}

/// A host (name or address, IPv6 without brackets) and a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostPort {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// Parse `host:port` or `[v6]:port`; `var` names where it came from, for the error.
    pub fn parse(var: &str, s: &str) -> Result<HostPort, EngineError> {
        let bad = |why: &str| EngineError::Config(format!("{var}={s:?}: {why}"));
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad("the host is empty (expected HOST:PORT)"));
        }
        if host.contains(':') && !s.starts_with('[') {
            return Err(bad("an IPv6 address needs brackets: [ADDR]:PORT"));
        }
        let port = parse_port(var, port)?;
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

/// What this process is, as derived from its environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaunchPlan {
    /// The environment it came from.
    pub source: Source,
    /// The variables behind the choice, for the log.
    pub reason: String,
    /// This process's role.
    pub role: RoleKind,
    /// The rank within the role (server rank, worker rank; 0 for the scheduler).
    pub rank: u32,
    /// The global rank, where the launcher gives one.
    pub global_rank: Option<u32>,
    /// The rank on this host, where the launcher gives one.
    pub local_rank: Option<u32>,
    /// Servers in the cluster.
    pub servers: u32,
    /// Workers in the cluster.
    pub workers: u32,
    /// Where the scheduler listens.
    pub scheduler: HostPort,
}

fn config(msg: String) -> EngineError {
    EngineError::Config(msg)
}

/// The value of `name`, if set and not blank.
fn var<'a>(env: &'a Env, name: &str) -> Option<&'a str> {
    env.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// `name` as a number, if set.
fn num(env: &Env, name: &str) -> Result<Option<u32>, EngineError> {
    var(env, name)
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| config(format!("{name}={s:?}: expected a non-negative integer")))
        })
        .transpose()
}

fn parse_port(var: &str, s: &str) -> Result<u16, EngineError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(config(format!(
            "{var}: port {s:?} is not a port number (1 to 65535)"
        ))),
    }
}

/// Expand a Slurm node list (`node[01-03,7],gpu-a[1-2]`) into host names, in order.
/// Zero padding is kept (the width of a range's lower bound); several bracket groups in
/// one name expand as a product, the last fastest (`r[1-2]n[1-2]`: r1n1 r1n2 r2n1 r2n2).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let list = list.trim();
    if list.is_empty() {
        return Err("the node list is empty".into());
    }
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unmatched ']' at byte {i} of {list:?}"))?;
            }
            ',' if depth == 0 => {
                expand_name(list[start..i].trim(), &mut out)?;
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unclosed '[' in {list:?}"));
    }
    expand_name(list[start..].trim(), &mut out)?;
    Ok(out)
}

/// Expand one name with bracket groups into `out`.
fn expand_name(name: &str, out: &mut Vec<String>) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty host name in the node list".into());
    }
    let Some(open) = name.find('[') else {
        if name.contains(']') {
            return Err(format!("unmatched ']' in {name:?}"));
        }
        if out.len() >= MAX_NODELIST_HOSTS {
            return Err(format!("more than {MAX_NODELIST_HOSTS} hosts"));
        }
        out.push(name.to_string());
        return Ok(());
    };
    let close = name[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or_else(|| format!("unclosed '[' in {name:?}"))?;
    let body = &name[open + 1..close];
    if body.contains('[') {
        return Err(format!("nested '[' in {name:?}"));
    }
    let (prefix, rest) = (&name[..open], &name[close + 1..]);
    for part in body.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!(
                "{part:?} in {name:?}: expected N or N-M (decimal numbers)"
            ));
        }
        let (a, b): (u64, u64) = (lo.parse().expect("digits"), hi.parse().expect("digits"));
        if a > b {
            return Err(format!("{part:?} in {name:?}: the range goes down"));
        }
        if b - a >= MAX_NODELIST_HOSTS as u64 {
            return Err(format!(
                "{part:?} in {name:?}: more than {MAX_NODELIST_HOSTS} hosts"
            ));
        }
        for n in a..=b {
            // The rest may hold more groups: expand it per value, in order.
            expand_name(&format!("{prefix}{n:0width$}{rest}", width = lo.len()), out)?;
        }
    }
    Ok(())
}

/// The ordinal at the end of a StatefulSet pod's name (`pserv-server-3` -> 3).
pub fn pod_ordinal(name: &str) -> Option<u32> {
    let (base, ord) = name.rsplit_once('-')?;
    if base.is_empty() || ord.is_empty() || !ord.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ord.parse().ok()
}

/// Derive this process's plan from its environment and flags (pure: reads only its
/// arguments). See the module docs for the layout, the order and the address rules.
pub fn detect(env: &Env, flags: &LaunchFlags) -> Result<LaunchPlan, EngineError> {
    match flags.launcher {
        LauncherChoice::Pserv => return from_pserv(env, flags),
        LauncherChoice::Slurm => return from_slurm(env, flags),
        LauncherChoice::Mpi => {
            return from_mpi(env, flags)?.ok_or_else(|| {
                config(
                    "--launcher mpi: none of OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK is set"
                        .into(),
                )
            })
        }
        LauncherChoice::Torchrun => return from_torchrun(env, flags),
        LauncherChoice::Auto => {}
    }
    if var(env, "PSERV_ROLE").is_some() {
        return from_pserv(env, flags);
    }
    if var(env, "SLURM_PROCID").is_some() {
        // mpirun inside an allocation: the processes inherit a daemon's SLURM_PROCID.
        if let Some((mpi_var, mpi_rank)) = mpi_rank_var(env)? {
            let slurm = num(env, "SLURM_PROCID")?;
            if slurm != Some(mpi_rank) {
                let mut plan = from_mpi(env, flags)?.expect("an MPI rank is set");
                plan.reason = format!(
                    "{}; SLURM_PROCID={} disagrees with {mpi_var}={mpi_rank} (mpirun inside a Slurm allocation)",
                    plan.reason,
                    slurm.map_or("?".into(), |s| s.to_string())
                );
                return Ok(plan);
            }
        }
        return from_slurm(env, flags);
    }
    if let Some(plan) = from_mpi(env, flags)? {
        return Ok(plan);
    }
    if var(env, "RANK").is_some() || var(env, "WORLD_SIZE").is_some() {
        return from_torchrun(env, flags);
    }
    let hint = if var(env, "PSERV_RANK").is_some() {
        " (PSERV_RANK is set: set PSERV_ROLE=scheduler|server|worker with it)"
    } else {
        ""
    };
    Err(config(format!(
        "found no launcher in the environment{hint}: set PSERV_ROLE (with PSERV_RANK, \
         PSERV_NUM_SERVERS, PSERV_NUM_WORKERS, PSERV_SCHEDULER), or run it under srun \
         (SLURM_PROCID), mpirun (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK) or a \
         torchrun-style launcher (RANK, WORLD_SIZE, MASTER_ADDR)"
    )))
}

/// The first MPI rank variable set, and its value.
fn mpi_rank_var(env: &Env) -> Result<Option<(&'static str, u32)>, EngineError> {
    for name in ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"] {
        if let Some(r) = num(env, name)? {
            return Ok(Some((name, r)));
        }
    }
    Ok(None)
}

/// S, and W if given explicitly.
fn shape(env: &Env, flags: &LaunchFlags) -> Result<(u32, Option<u32>), EngineError> {
    let servers = match flags.servers {
        Some(s) => s,
        None => num(env, "PSERV_NUM_SERVERS")?.unwrap_or(1),
    };
    if servers == 0 {
        return Err(config(
            "--servers / PSERV_NUM_SERVERS is 0: a cluster needs at least one server".into(),
        ));
    }
    let workers = match flags.workers {
        Some(w) => Some(w),
        None => num(env, "PSERV_NUM_WORKERS")?,
    };
    Ok((servers, workers))
}

/// Place global rank `rank` of `size` (named by `rank_var` and `size_var`) in the layout.
fn layout(
    env: &Env,
    flags: &LaunchFlags,
    (rank_var, rank): (&str, u32),
    (size_var, size): (&str, u32),
) -> Result<(RoleKind, u32, u32, u32), EngineError> {
    let (servers, explicit_workers) = shape(env, flags)?;
    if rank >= size {
        return Err(config(format!(
            "{rank_var}={rank} is not below {size_var}={size}"
        )));
    }
    let needed = u64::from(servers) + 2;
    if u64::from(size) < needed {
        return Err(config(format!(
            "{size_var}={size} does not fit 1 scheduler + {servers} server(s) (--servers / \
             PSERV_NUM_SERVERS) + at least 1 worker: start at least {needed} processes"
        )));
    }
    let workers = size - 1 - servers;
    if let Some(w) = explicit_workers {
        if w != workers {
            return Err(config(format!(
                "--workers / PSERV_NUM_WORKERS is {w}, but {size_var}={size} with {servers} \
                 server(s) leaves {workers} worker(s) (1 scheduler + servers + workers)"
            )));
        }
    }
    Ok(match rank {
        0 => (RoleKind::Scheduler, 0, servers, workers),
        r if r <= servers => (RoleKind::Server, r - 1, servers, workers),
        r => (RoleKind::Worker, r - 1 - servers, servers, workers),
    })
}

/// The scheduler's address: `PSERV_SCHEDULER`, else the first of `hosts` that is set
/// (name of its origin, host); the port from `--scheduler-port`, `MASTER_PORT` (when
/// `master_port`), or the default. `missing` says what to set when nothing is.
fn scheduler_addr(
    env: &Env,
    flags: &LaunchFlags,
    hosts: &[(&str, Option<String>)],
    master_port: bool,
    missing: &str,
) -> Result<(HostPort, String), EngineError> {
    if let Some(s) = var(env, "PSERV_SCHEDULER") {
        let hp = HostPort::parse("PSERV_SCHEDULER", s)?;
        if let Some(p) = flags.scheduler_port.filter(|p| *p != hp.port) {
            return Err(config(format!(
                "--scheduler-port {p} disagrees with PSERV_SCHEDULER={s}"
            )));
        }
        return Ok((hp, "PSERV_SCHEDULER".into()));
    }
    let Some((origin, host)) = hosts
        .iter()
        .find_map(|(o, h)| h.as_ref().map(|h| (*o, h.clone())))
    else {
        return Err(config(missing.to_string()));
    };
    let (port, port_origin) = match (flags.scheduler_port, var(env, "MASTER_PORT")) {
        (Some(p), _) => (p, "--scheduler-port"),
        (None, Some(p)) if master_port => (parse_port("MASTER_PORT", p)?, "MASTER_PORT"),
        _ => (DEFAULT_SCHEDULER_PORT, "the default port"),
    };
    Ok((HostPort { host, port }, format!("{origin}, {port_origin}")))
}

fn from_pserv(env: &Env, flags: &LaunchFlags) -> Result<LaunchPlan, EngineError> {
    let role_s = var(env, "PSERV_ROLE")
        .ok_or_else(|| config("--launcher pserv: PSERV_ROLE is not set".into()))?;
    let role = match role_s.to_ascii_lowercase().as_str() {
        "scheduler" => RoleKind::Scheduler,
        "server" => RoleKind::Server,
        "worker" => RoleKind::Worker,
        _ => {
            return Err(config(format!(
                "PSERV_ROLE={role_s:?}: expected scheduler, server or worker"
            )))
        }
    };
    let (servers, workers) = shape(env, flags)?;
    let workers = workers.ok_or_else(|| {
        config(format!(
            "PSERV_ROLE={role}: set PSERV_NUM_WORKERS (or --workers); with PSERV_ROLE there \
             is no world size to derive it from"
        ))
    })?;
    if workers == 0 {
        return Err(config(
            "PSERV_NUM_WORKERS / --workers is 0: a cluster needs at least one worker".into(),
        ));
    }
    // The rank: PSERV_RANK, else a StatefulSet pod's ordinal.
    let pod = ["POD_NAME", "HOSTNAME"]
        .into_iter()
        .find_map(|v| var(env, v).map(|name| (v, name)));
    let (rank, source, why) = match (num(env, "PSERV_RANK")?, pod) {
        (Some(r), _) => (r, Source::Pserv, format!("PSERV_RANK={r}")),
        (None, _) if role == RoleKind::Scheduler => (0, Source::Pserv, String::new()),
        (None, Some((v, name))) => match pod_ordinal(name) {
            Some(r) => (r, Source::Kubernetes, format!("rank {r} from {v}={name}")),
            None => {
                return Err(config(format!(
                    "PSERV_ROLE={role} without PSERV_RANK: {v}={name:?} does not end in -ORDINAL \
                     (a StatefulSet pod's name); set PSERV_RANK"
                )))
            }
        },
        (None, None) => {
            return Err(config(format!(
                "PSERV_ROLE={role} needs PSERV_RANK, or POD_NAME / HOSTNAME ending in \
                 -ORDINAL (a StatefulSet pod)"
            )))
        }
    };
    let limit = match role {
        RoleKind::Scheduler => 1,
        RoleKind::Server => servers,
        RoleKind::Worker => workers,
    };
    if rank >= limit {
        return Err(config(format!(
            "{role} rank {rank} ({why}) is not below the {role} count {limit} \
             (PSERV_NUM_SERVERS={servers}, PSERV_NUM_WORKERS={workers})"
        )));
    }
    let (scheduler, addr_why) = if role == RoleKind::Scheduler {
        // The scheduler itself may go without: it listens on every interface.
        let none = [("every interface", Some("0.0.0.0".to_string()))];
        scheduler_addr(env, flags, &none, false, "")?
    } else {
        scheduler_addr(
            env,
            flags,
            &[],
            false,
            &format!("PSERV_ROLE={role}: set PSERV_SCHEDULER=HOST:PORT (the scheduler's address)"),
        )?
    };
    let reason = [
        format!("PSERV_ROLE={role_s}"),
        why,
        format!("scheduler from {addr_why}"),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(", ");
    Ok(LaunchPlan {
        source,
        reason,
        role,
        rank,
        global_rank: None,
        local_rank: None,
        servers,
        workers,
        scheduler,
    })
}

fn from_slurm(env: &Env, flags: &LaunchFlags) -> Result<LaunchPlan, EngineError> {
    let rank = num(env, "SLURM_PROCID")?.ok_or_else(|| {
        config("--launcher slurm: SLURM_PROCID is not set (run under srun)".into())
    })?;
    let (size_var, size) = ["SLURM_NTASKS", "SLURM_NPROCS"]
        .into_iter()
        .find_map(|v| num(env, v).transpose().map(|n| n.map(|n| (v, n))))
        .transpose()?
        .ok_or_else(|| config("SLURM_PROCID is set but SLURM_NTASKS is not".into()))?;
    let (role, role_rank, servers, workers) =
        layout(env, flags, ("SLURM_PROCID", rank), (size_var, size))?;
    let list = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
        .into_iter()
        .find_map(|v| var(env, v).map(|l| (v, l)));
    let first = match list {
        Some((v, l)) => Some((
            v,
            expand_nodelist(l)
                .map_err(|e| config(format!("{v}={l:?}: {e}")))?
                .swap_remove(0),
        )),
        None => None,
    };
    let origin = first.as_ref().map_or(String::new(), |(v, h)| {
        format!("the first host of {v} ({h})")
    });
    let (scheduler, addr_why) = scheduler_addr(
        env,
        flags,
        &[
            (origin.as_str(), first.map(|(_, h)| h)),
            ("MASTER_ADDR", var(env, "MASTER_ADDR").map(str::to_string)),
        ],
        false,
        "Slurm: neither SLURM_JOB_NODELIST nor SLURM_NODELIST is set; set PSERV_SCHEDULER=HOST:PORT",
    )?;
    Ok(LaunchPlan {
        source: Source::Slurm,
        reason: format!("SLURM_PROCID={rank}, {size_var}={size}, scheduler from {addr_why}"),
        role,
        rank: role_rank,
        global_rank: Some(rank),
        local_rank: num(env, "SLURM_LOCALID")?,
        servers,
        workers,
        scheduler,
    })
}

/// The MPI plan, or `None` when no MPI rank variable is set.
fn from_mpi(env: &Env, flags: &LaunchFlags) -> Result<Option<LaunchPlan>, EngineError> {
    let Some((rank_var, rank)) = mpi_rank_var(env)? else {
        return Ok(None);
    };
    let (source, size_vars, local_var): (Source, &[&str], &str) = match rank_var {
        "OMPI_COMM_WORLD_RANK" => (
            Source::OpenMpi,
            &["OMPI_COMM_WORLD_SIZE"],
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ),
        "PMI_RANK" => (Source::Pmi, &["PMI_SIZE"], "MPI_LOCALRANKID"),
        _ => (
            Source::Pmix,
            &["PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"],
            "PMIX_LOCAL_RANK",
        ),
    };
    let size = size_vars
        .iter()
        .find_map(|v| num(env, v).transpose().map(|n| n.map(|n| (*v, n))))
        .transpose()?;
    let (size_var, size) = match size {
        Some(s) => s,
        None => {
            // PMIx exports no size: take it from an explicit shape.
            let (servers, workers) = shape(env, flags)?;
            match workers {
                Some(w) => ("1 + servers + workers", 1 + servers + w),
                None => {
                    return Err(config(format!(
                        "{rank_var}={rank} but no world size ({}): pass --workers (or set \
                         PSERV_NUM_WORKERS)",
                        size_vars.join(", ")
                    )))
                }
            }
        }
    };
    let (role, role_rank, servers, workers) =
        layout(env, flags, (rank_var, rank), (size_var, size))?;
    // Inside a Slurm allocation the node list still names rank 0's host.
    let first = match var(env, "SLURM_JOB_NODELIST").or(var(env, "SLURM_NODELIST")) {
        Some(l) => expand_nodelist(l).ok().map(|mut h| h.swap_remove(0)),
        None => None,
    };
    let (scheduler, addr_why) = scheduler_addr(
        env,
        flags,
        &[
            ("MASTER_ADDR", var(env, "MASTER_ADDR").map(str::to_string)),
            ("the first host of the Slurm node list", first),
        ],
        true,
        &format!(
            "{source} ({rank_var}) gives no host list: set PSERV_SCHEDULER=HOST:PORT, or \
             MASTER_ADDR (and MASTER_PORT), to the address of rank 0 (the scheduler)"
        ),
    )?;
    Ok(Some(LaunchPlan {
        source,
        reason: format!("{rank_var}={rank}, {size_var}={size}, scheduler from {addr_why}"),
        role,
        rank: role_rank,
        global_rank: Some(rank),
        local_rank: num(env, local_var)?,
        servers,
        workers,
        scheduler,
    }))
}

fn from_torchrun(env: &Env, flags: &LaunchFlags) -> Result<LaunchPlan, EngineError> {
    let rank =
        num(env, "RANK")?.ok_or_else(|| config("torchrun-style launch: RANK is not set".into()))?;
    let size = num(env, "WORLD_SIZE")?
        .ok_or_else(|| config("torchrun-style launch: WORLD_SIZE is not set".into()))?;
    let (role, role_rank, servers, workers) =
        layout(env, flags, ("RANK", rank), ("WORLD_SIZE", size))?;
    let (scheduler, addr_why) = scheduler_addr(
        env,
        flags,
        &[("MASTER_ADDR", var(env, "MASTER_ADDR").map(str::to_string))],
        true,
        "torchrun-style launch: MASTER_ADDR is not set; set it (and MASTER_PORT), or \
         PSERV_SCHEDULER=HOST:PORT, to the address of rank 0 (the scheduler)",
    )?;
    Ok(LaunchPlan {
        source: Source::Torchrun,
        reason: format!("RANK={rank}, WORLD_SIZE={size}, scheduler from {addr_why}"),
        role,
        rank: role_rank,
        global_rank: Some(rank),
        local_rank: num(env, "LOCAL_RANK")?,
        servers,
        workers,
        scheduler,
    })
}

impl fmt::Display for LaunchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            RoleKind::Scheduler => write!(f, "scheduler")?,
            r => write!(f, "{r} {}", self.rank)?,
        }
        write!(
            f,
            " of {} server(s) and {} worker(s), scheduler at {}; from {} ({})",
            self.servers, self.workers, self.scheduler, self.source, self.reason
        )
    }
}

/// Run `pserv launch`: detect, print the plan, run the role. A detection error is printed
/// and exits with status 2; a CMD's exit status is this process's.
pub(super) fn run_launch(args: LaunchArgs) -> Result<ExitCode, EngineError> {
    let env: Env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let plan = match detect(&env, &args.flags) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pserv launch: error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    eprintln!("pserv launch: {plan}");
    // Slurm places task 0 on the first node of the list unless told otherwise.
    if let (Source::Slurm, RoleKind::Scheduler, None, Some(node)) = (
        plan.source,
        plan.role,
        var(&env, "PSERV_SCHEDULER"),
        var(&env, "SLURMD_NODENAME"),
    ) {
        if node != plan.scheduler.host {
            eprintln!(
                "pserv launch: warning: task 0 runs on {node} (SLURMD_NODENAME), not on {} \
                 where the others look for the scheduler (a --distribution or --nodelist \
                 order?); set PSERV_SCHEDULER=HOST:PORT",
                plan.scheduler.host
            );
        }
    }
    if args.dry_run {
        println!("{}", serde_json::to_string(&plan).expect("json encodes"));
        return Ok(ExitCode::SUCCESS);
    }
    let wait = Duration::from_secs(args.wait_scheduler_secs);
    let deadline = Instant::now() + wait;
    let scheduler = resolve(&plan.scheduler, deadline, wait)?;
    let role_args: Vec<String> = match plan.role {
        RoleKind::Scheduler => {
            let update = args.update.unwrap_or(args.job.update_spec());
            let mut a = vec![
                "scheduler".to_string(),
                format!("--servers={}", plan.servers),
                format!("--workers={}", plan.workers),
                format!("--update={update}"),
            ];
            if var(&env, "PSERV_SCHEDULER_LISTEN").is_none() {
                a.push(format!("--listen={}", scheduler_listen(scheduler)));
            }
            a.extend(args.net.to_args());
            // The job's --restore is the whole cluster's (PSERV_CHECKPOINT_EVERY and
            // PSERV_CHECKPOINT_DIR reach the scheduler from the environment).
            if let Some(d) = &args.job.restore {
                a.push(format!("--restore={}", d.display()));
            }
            a
        }
        RoleKind::Server => {
            wait_for_scheduler(scheduler, deadline, wait)?;
            let mut a = ServerLaunch {
                scheduler,
                rank: Some(plan.rank),
                join: false,
                net: args.net.clone(),
                repl: args.repl.clone(),
                dump_model: args.dump_model.clone(),
                // PSERV_ALLOW_NON_FINITE in the environment still reaches the server.
                allow_non_finite: false,
                restore: args.job.restore.clone(),
            }
            .to_args();
            if var(&env, "PSERV_SERVER_LISTEN").is_none() {
                let ip = match args.host_ip {
                    Some(ip) => ip,
                    None => route_ip(scheduler)?,
                };
                a.push(format!("--listen={}", SocketAddr::new(ip, 0)));
            }
            a
        }
        RoleKind::Worker => {
            wait_for_scheduler(scheduler, deadline, wait)?;
            if !args.cmd.is_empty() {
                return run_cmd(&args, &plan, scheduler);
            }
            WorkerLaunch {
                scheduler,
                rank: Some(plan.rank),
                replace: None,
                job: args.job.clone(),
                net: args.net.clone(),
            }
            .to_args()
        }
    };
    if !args.cmd.is_empty() {
        eprintln!(
            "pserv launch: the {} rank ignores CMD (workers run it)",
            plan.role
        );
    }
    tracing::info!(?role_args, "running the role in this process");
    let cli = Cli::try_parse_from(std::iter::once("pserv".to_string()).chain(role_args))
        .map_err(|e| config(format!("the {} role's flags: {e}", plan.role)))?;
    crate::cli::app::run(cli.cmd, Vec::new())?;
    Ok(ExitCode::SUCCESS)
}

/// Resolve `hp`, IPv4 first, retrying until `deadline` (a cluster's DNS may name a pod
/// only once it runs).
fn resolve(hp: &HostPort, deadline: Instant, wait: Duration) -> Result<SocketAddr, EngineError> {
    loop {
        let last = match (hp.host.as_str(), hp.port).to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if let Some(a) = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) {
                    return Ok(*a);
                }
                "no addresses".to_string()
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(EngineError::Timeout(format!(
                "the scheduler's host {} did not resolve within {wait:?} (--wait-scheduler-secs): {last}",
                hp.host
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Where the scheduler listens: a loopback or unspecified address as it is (one host),
/// else every interface on its port (the name may resolve elsewhere than on this host).
fn scheduler_listen(addr: SocketAddr) -> SocketAddr {
    let ip = addr.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        addr
    } else if ip.is_ipv4() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port())
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port())
    }
}

/// This host's address on the route to `to` (no packet is sent).
fn route_ip(to: SocketAddr) -> Result<IpAddr, EngineError> {
    let io = |source| EngineError::Io {
        context: format!("finding this host's address on the route to {to} (or pass --host-ip)"),
        source,
    };
    let any = if to.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let s = UdpSocket::bind(SocketAddr::new(any, 0)).map_err(io)?;
    s.connect(to).map_err(io)?;
    Ok(s.local_addr().map_err(io)?.ip())
}

/// Wait until the scheduler accepts a connection (its rank may start later than this one).
fn wait_for_scheduler(
    addr: SocketAddr,
    deadline: Instant,
    wait: Duration,
) -> Result<(), EngineError> {
    loop {
        let last = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(EngineError::Timeout(format!(
                "the scheduler at {addr} did not accept a connection within {wait:?} \
                 (--wait-scheduler-secs; is global rank 0 running?): {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A CMD child: SIGKILLed with its process group unless reaped.
struct Guard {
    child: Child,
    status: Option<ExitStatus>,
}

impl Guard {
    fn signal(&self, sig: rustix::process::Signal) {
        if self.status.is_none() {
            let pgid = rustix::process::Pid::from_child(&self.child);
            let _ = rustix::process::kill_process_group(pgid, sig);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(rustix::process::Signal::KILL);
            let _ = self.child.wait();
        }
    }
}

/// The signals a launch process forwards to CMD.
const FORWARDED: [i32; 4] = [
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGQUIT,
];

/// Run CMD as this worker, with its rank and the scheduler in its environment; forward
/// every signal; exit with its status.
fn run_cmd(
    args: &LaunchArgs,
    plan: &LaunchPlan,
    scheduler: SocketAddr,
) -> Result<ExitCode, EngineError> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let io = |context: String| move |source| EngineError::Io { context, source };
    // Catch the signals before the child exists, so none is lost in between.
    let mut signals = signal_hook::iterator::Signals::new(FORWARDED)
        .map_err(io("catching SIGTERM, SIGINT, SIGHUP, SIGQUIT".into()))?;
    let mut cmd = Command::new(&args.cmd[0]);
    cmd.args(&args.cmd[1..])
        .env("PSERV_SCHEDULER", scheduler.to_string())
        .env("PSERV_RANK", plan.rank.to_string())
        .env("PSERV_NUM_WORKERS", plan.workers.to_string())
        .env("PSERV_NUM_SERVERS", plan.servers.to_string())
        .env("PSERV_ROLE", "worker")
        // Its own process group: signals reach it (and what it starts) from here only.
        .process_group(0);
    if let Some(l) = plan.local_rank {
        cmd.env("PSERV_LOCAL_RANK", l.to_string());
    }
    // And it dies with this process, however this one dies.
    let child = pserv_sys::process::die_with_parent(&mut cmd)
        .spawn()
        .map_err(io(format!("starting CMD {:?}", args.cmd)))?;
    let pid = child.id();
    eprintln!(
        "pserv launch: worker {} runs {:?} (pid {pid})",
        plan.rank, args.cmd
    );
    let mut guard = Guard {
        child,
        status: None,
    };
    let limit = Duration::from_secs(args.timeout_secs);
    let grace = Duration::from_secs(args.grace_secs);
    let deadline = Instant::now() + limit;
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    let wait_err = |source| EngineError::Io {
        context: format!("waiting for CMD (pid {pid})"),
        source,
    };
    let st = loop {
        for sig in signals.pending() {
            eprintln!("pserv launch: signal {sig}: forwarding it to CMD (pid {pid})");
            if let Some(s) = rustix::process::Signal::from_named_raw(sig) {
                guard.signal(s);
            }
            kill_at.get_or_insert(Instant::now() + grace);
        }
        if let Some(st) = guard.child.try_wait().map_err(&wait_err)? {
            break st;
        }
        let now = Instant::now();
        if now >= deadline && !timed_out {
            timed_out = true;
            eprintln!(
                "pserv launch: CMD (pid {pid}) still runs after --timeout-secs {}: SIGTERM",
                args.timeout_secs
            );
            guard.signal(rustix::process::Signal::TERM);
            kill_at.get_or_insert(now + grace);
        }
        if kill_at.is_some_and(|k| now >= k) {
            eprintln!(
                "pserv launch: CMD (pid {pid}) did not stop within {grace:?} (--grace-secs): SIGKILL"
            );
            guard.signal(rustix::process::Signal::KILL);
            // SIGKILL cannot be caught: this wait ends.
            break guard.child.wait().map_err(&wait_err)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    guard.status = Some(st);
    // What it left running in its group goes with it (the group outlives its leader only
    // while a member runs, so this reaches no other process).
    let _ = rustix::process::kill_process_group(
        rustix::process::Pid::from_child(&guard.child),
        rustix::process::Signal::KILL,
    );
    if timed_out {
        return Err(EngineError::Timeout(format!(
            "CMD {:?} ran past --timeout-secs {} and was stopped ({st})",
            args.cmd, args.timeout_secs
        )));
    }
    eprintln!("pserv launch: CMD (pid {pid}) exited: {st}");
    let code = match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

#[cfg(test)]
mod tests;
