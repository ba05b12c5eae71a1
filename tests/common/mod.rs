//! Helpers for whole-cluster tests: real `pserv` processes on 127.0.0.1, cleaned up by pid.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `pserv` binary cargo built for these tests.
pub fn pserv() -> &'static str {
    env!("CARGO_BIN_EXE_pserv")
}

/// This test process's cluster secret file (made once, owner-only, in cargo's scratch
/// folder for tests): every role a test starts gets it in `PSERV_SECRET_FILE`.
pub fn secret_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        // A test process started by another test gets its parent's.
        if let Some(p) = std::env::var_os("PSERV_SECRET_FILE") {
            return PathBuf::from(p);
        }
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-secret-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        pserv_transport::Secret::create_file(&p).expect("a test cluster secret");
        p
    })
}

/// The security every in-process node of a test uses: [`secret_file`]'s secret.
pub fn security() -> pserv_engine::base::security::Security {
    pserv_engine::base::security::Security::from_file(secret_file()).expect("the test secret")
}

/// `Command::new(pserv())` with the test's secret in its environment.
pub fn pserv_cmd() -> Command {
    let mut c = Command::new(pserv());
    c.env("PSERV_SECRET_FILE", secret_file());
    c
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("pserv-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Child processes killed (by pid) when dropped.
#[derive(Default)]
pub struct Procs(pub Vec<(String, Child)>);

impl Procs {
    pub fn spawn(&mut self, name: &str, args: &[String]) {
        let child = pserv_cmd()
            .args(args)
            .env(
                "PSERV_LOG",
                std::env::var("PSERV_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.0.push((name.to_string(), child));
    }

    /// Wait for every process to exit; panics on failure or after `limit`.
    pub fn wait_all(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for (name, child) in &mut self.0 {
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    assert!(st.success(), "{name} exited with {st}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} did not exit within {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait for a file to appear and return its contents.
pub fn wait_file(p: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.is_empty() {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A scheduler and `servers` server processes; workers are the test's to start.
pub struct Cluster {
    pub procs: Procs,
    pub scheduler: SocketAddr,
    pub scratch: Scratch,
}

/// The transport the whole-cluster tests run over: `PSERV_TEST_TRANSPORT` (`auto`, the
/// default: messages over shared memory between these processes of one host; `tcp`:
/// every message over TCP; `shm`; `rdma` on the software device). `scripts/test` runs
/// these tests over `auto` and again over `tcp`.
pub fn transport() -> String {
    std::env::var("PSERV_TEST_TRANSPORT").unwrap_or_else(|_| "auto".into())
}

/// Whether the test processes' messages travel over shared memory.
pub fn shm_messages() -> pserv_transport::ShmMessages {
    match transport().as_str() {
        "auto" | "shm" => pserv_transport::ShmMessages::SameHost,
        _ => pserv_transport::ShmMessages::Off,
    }
}

/// Common flags: two loops per process, unpinned (tests share two cores), the tests'
/// transport.
pub fn net_flags() -> Vec<String> {
    let mut v = base_net_flags();
    v.push(format!("--transport={}", transport()));
    v
}

/// [`net_flags`] without the transport (for a test that names its own).
pub fn base_net_flags() -> Vec<String> {
    vec!["--threads=2".into(), "--pin-cores=false".into()]
}

impl Cluster {
    pub fn start(servers: u32, workers: u32, extra_scheduler: &[&str]) -> Cluster {
        Cluster::start_with(servers, workers, extra_scheduler, &[])
    }

    /// Like [`Cluster::start`], with `extra_server` flags for every server.
    pub fn start_with(
        servers: u32,
        workers: u32,
        extra_scheduler: &[&str],
        extra_server: &[&str],
    ) -> Cluster {
        let mut c = Cluster::scheduler_only(servers, workers, extra_scheduler);
        for r in 0..servers {
            let mut a = vec![
                "server".to_string(),
                format!("--scheduler={}", c.scheduler),
                format!("--rank={r}"),
            ];
            a.extend(extra_server.iter().map(|s| s.to_string()));
            if extra_server.iter().any(|f| f.starts_with("--transport")) {
                a.extend(base_net_flags());
            } else {
                a.extend(net_flags());
            }
            c.procs.spawn(&format!("server {r}"), &a);
        }
        c
    }

    /// Only the scheduler process, expecting `servers` servers and `workers` workers that
    /// the test starts itself (for example in-process `Server`s with user rules).
    pub fn scheduler_only(servers: u32, workers: u32, extra_scheduler: &[&str]) -> Cluster {
        let scratch = Scratch::new("cluster");
        let port = scratch.path("sched.addr");
        let mut procs = Procs::default();
        let mut args = vec![
            "scheduler".to_string(),
            "--listen=127.0.0.1:0".into(),
            format!("--port-file={}", port.display()),
            format!("--servers={servers}"),
            format!("--workers={workers}"),
            format!("--summary-json={}", scratch.path("summary.json").display()),
        ];
        args.extend(extra_scheduler.iter().map(|s| s.to_string()));
        args.extend(net_flags());
        procs.spawn("scheduler", &args);
        let scheduler: SocketAddr = wait_file(&port, Duration::from_secs(20))
            .trim()
            .parse()
            .unwrap();
        Cluster {
            procs,
            scheduler,
            scratch,
        }
    }
}

/// A worker of `c` with rank `rank`: one event loop, unpinned; tasks fail after `timeout`
/// (a failed assertion in one worker thread must not leave the others blocked forever).
pub fn worker(c: &Cluster, rank: u32, timeout: Duration) -> pserv_engine::worker::Worker {
    let mut cfg = pserv_engine::worker::WorkerConfig::new(c.scheduler);
    cfg.security = security();
    cfg.rank = Some(rank);
    cfg.tcp = pserv_transport::TcpConfig {
        threads: 1,
        pin_cores: false,
        shm_messages: shm_messages(),
        ..pserv_transport::TcpConfig::default()
    };
    cfg.register_timeout = Duration::from_secs(30);
    cfg.timeout = timeout;
    pserv_engine::worker::Worker::connect(cfg).expect("worker connects")
}

/// Start `n` workers concurrently (registration completes only when all have joined).
pub fn workers(c: &Cluster, n: u32, timeout: Duration) -> Vec<pserv_engine::worker::Worker> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| s.spawn(move || worker(c, r, timeout)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `n` keys spread over the whole key space (so every server gets some), each `offset`
/// above its slot's start.
pub fn spread_keys(n: u64, offset: u64) -> Vec<u64> {
    (0..n)
        .map(|i| (pserv_engine::keys::KEY_END / n) * i + offset)
        .collect()
}

/// Send signal `sig` (as `kill` takes it, e.g. `-STOP`) to the process named `name`.
pub fn signal(c: &Cluster, name: &str, sig: &str) {
    let pid = c
        .procs
        .0
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, child)| child.id())
        .expect("process started");
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// SIGKILL the process named `name` and reap it; returns its pid.
pub fn kill(c: &mut Cluster, name: &str) -> u32 {
    let (_, child) = c
        .procs
        .0
        .iter_mut()
        .find(|(n, _)| n == name)
        .expect("process exists");
    let pid = child.id();
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    pid
}

/// A raw TCP connection to a node of the test's cluster, authenticated with the test's
/// secret as node `id` (the sender of the frames the test will write on it).
pub fn raw_connect(addr: SocketAddr, id: u32) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    let secret = pserv_transport::Secret::from_file(secret_file()).unwrap();
    pserv_transport::auth::connect_side(&s, &pserv_transport::AuthConfig::new(secret), id, false)
        .unwrap_or_else(|e| panic!("authenticating a raw connection: {e}"));
    s
}

/// Read one frame from `s`: its header and its values.
pub fn read_frame(s: &mut std::net::TcpStream) -> (pserv_transport::Header, Vec<u8>) {
    use std::io::Read;
    let mut buf = vec![0u8; pserv_transport::wire::HEADER_LEN];
    s.read_exact(&mut buf).unwrap();
    let h: pserv_transport::Header = *bytemuck::from_bytes(&buf);
    let body = pserv_transport::wire::pad8(
        pserv_transport::wire::HEADER_LEN + h.key_count as usize * 8 + h.value_bytes as usize,
    ) - pserv_transport::wire::HEADER_LEN;
    let mut rest = vec![0u8; body];
    s.read_exact(&mut rest).unwrap();
    let v = h.key_count as usize * 8;
    (h, rest[v..v + h.value_bytes as usize].to_vec())
}

/// Run `pserv local` with `args` and `--summary-json=summary`; asserts it succeeded and
/// returns the summary.
pub fn local_summary(args: &[String], summary: &Path) -> serde_json::Value {
    let out = Command::new(pserv())
        .arg("local")
        .args(args)
        .arg(format!("--summary-json={}", summary.display()))
        .output()
        .expect("pserv runs");
    assert!(
        out.status.success(),
        "pserv local {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap()
}

/// Every `model-*.bin` of a dump folder (`--dump-model`) merged: key to weight bits;
/// replicas of a key must agree.
pub fn merged_model(dir: &Path) -> std::collections::BTreeMap<u64, u32> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dump folder") {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("model-") && name.ends_with(".bin")) {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        assert_eq!(bytes.len() % 12, 0);
        for r in bytes.chunks_exact(12) {
            let k = u64::from_le_bytes(r[..8].try_into().unwrap());
            let w = u32::from_le_bytes(r[8..].try_into().unwrap());
            if let Some(prev) = out.insert(k, w) {
                assert_eq!(
                    prev,
                    w,
                    "key {k:#x}: replicas disagree ({} vs {})",
                    f32::from_bits(prev),
                    f32::from_bits(w)
                );
            }
        }
    }
    out
}
