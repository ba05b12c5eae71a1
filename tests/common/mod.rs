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
        let child = Command::new(pserv())
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

/// Common flags: two loops per process, unpinned (tests share two cores).
pub fn net_flags() -> Vec<String> {
    vec!["--threads=2".into(), "--pin-cores=false".into()]
}

impl Cluster {
    pub fn start(servers: u32, workers: u32, extra_scheduler: &[&str]) -> Cluster {
        let mut c = Cluster::scheduler_only(servers, workers, extra_scheduler);
        for r in 0..servers {
            let mut a = vec![
                "server".to_string(),
                format!("--scheduler={}", c.scheduler),
                format!("--rank={r}"),
            ];
            a.extend(net_flags());
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
