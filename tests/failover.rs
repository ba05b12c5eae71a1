//! Chain replication and recovery with real processes (MISSION.md P10, P12): a scheduler
//! and server processes on 127.0.0.1; a server is SIGKILLed (no goodbye) while workers
//! push, and no acknowledged push is lost, and none is applied twice.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{pserv, Cluster, Scratch};
use pserv_engine::keys::KEY_END;
use pserv_engine::worker::{Worker, WorkerConfig};
use pserv_transport::TcpConfig;

fn worker(c: &Cluster, rank: u32) -> Worker {
    let mut cfg = WorkerConfig::new(c.scheduler);
    cfg.rank = Some(rank);
    cfg.tcp = TcpConfig {
        threads: 1,
        pin_cores: false,
        ..TcpConfig::default()
    };
    cfg.register_timeout = Duration::from_secs(30);
    cfg.timeout = Duration::from_secs(30);
    Worker::connect(cfg).expect("worker connects")
}

fn workers(c: &Cluster, n: u32) -> Vec<Worker> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n).map(|r| s.spawn(move || worker(c, r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Keys spread over the whole key space (so every server heads some).
fn spread_keys(n: u64) -> Vec<u64> {
    (0..n).map(|i| (KEY_END / n) * i + 11).collect()
}

fn kill(c: &mut Cluster, name: &str) -> u32 {
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

/// Two workers push +1 to 3000 keys (all servers) 120 times each, four pushes in flight;
/// server 2 is SIGKILLed after the first 40 pushes. Every push must end acknowledged, and
/// every key must then read exactly 2 x 120: nothing lost, nothing applied twice.
#[test]
fn sigkill_of_a_server_loses_no_acknowledged_push_and_applies_none_twice() {
    let mut c = Cluster::start(3, 2, &["--update=sum", "--replicas=1"]);
    let ws = workers(&c, 2);
    let keys = spread_keys(3000);
    const PUSHES: u64 = 120;
    let done = AtomicU64::new(0);
    let killed = AtomicBool::new(false);
    let stalls: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = ws
            .iter()
            .map(|w| {
                let keys = keys.clone();
                let done = &done;
                let killed = &killed;
                s.spawn(move || {
                    let ones = vec![1.0f32; keys.len()];
                    let mut inflight = std::collections::VecDeque::new();
                    let mut last_ack = Instant::now();
                    let mut worst = Duration::ZERO;
                    for _ in 0..PUSHES {
                        inflight.push_back(w.push(keys.clone(), ones.clone()));
                        if inflight.len() >= 4 {
                            let ts = inflight.pop_front().unwrap();
                            w.wait(ts).expect("every push is acknowledged in the end");
                            if killed.load(Ordering::Relaxed) {
                                worst = worst.max(last_ack.elapsed());
                            }
                            last_ack = Instant::now();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    for ts in inflight {
                        w.wait(ts).expect("every push is acknowledged in the end");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    worst
                })
            })
            .collect();
        while done.load(Ordering::Relaxed) < 40 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = kill(&mut c, "server 2");
        killed.store(true, Ordering::Relaxed);
        eprintln!(
            "killed server 2 (pid {pid}) after {} acknowledged pushes",
            done.load(Ordering::Relaxed)
        );
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("longest wait for an acknowledgement after the kill: {stalls:?}");
    // The routing table moved on: server 2 heads nothing and is in no chain.
    let table = ws[0].table();
    assert!(table.epoch() >= 2, "epoch {}", table.epoch());
    assert!(table.owners().iter().all(|&o| o != 2));
    assert!(table.followers().iter().all(|f| !f.contains(&2)));
    let p = ws[0]
        .wait_pull::<f32>(ws[0].pull::<f32>(keys.clone()))
        .expect("pull after the failover");
    let got = p.to_vec();
    let want = (2 * PUSHES) as f32;
    let wrong: Vec<(u64, f32)> = keys
        .iter()
        .zip(&got)
        .filter(|(_, &v)| v != want)
        .map(|(&k, &v)| (k, v))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "keys not at {want} after the failover (key, value): {wrong:?}"
    );
    for w in ws {
        w.finish(0).unwrap();
    }
}

/// Every `model-*.bin` of a dump directory merged: replicas of a key must agree.
fn merged_model(dir: &Path) -> BTreeMap<u64, u32> {
    let mut out: BTreeMap<u64, u32> = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dump directory") {
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

fn run_local(extra: &[String], dump: &Path) -> serde_json::Value {
    std::fs::create_dir_all(dump).unwrap();
    let summary = dump.join("summary.json");
    let out = Command::new(pserv())
        .args([
            "local",
            "--servers=3",
            "--workers=2",
            "--examples=60000",
            "--features=30000",
            "--epochs=3",
            "--seed=5",
            "--lr=1",
            "--consistency=sequential",
            "--replicas=1",
            "--threads=2",
            "--pin-cores=false",
            "--timeout-secs=60",
        ])
        .args(extra)
        .arg(format!("--dump-model={}", dump.display()))
        .arg(format!("--summary-json={}", summary.display()))
        .output()
        .expect("pserv runs");
    assert!(
        out.status.success(),
        "pserv local {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap()
}

/// `pserv local` with sequential consistency: SIGKILL a server mid-training; training
/// completes, and the model (merged over the surviving servers, replicas agreeing) equals
/// the model of the same run without the failure, bit for bit.
#[test]
fn training_survives_a_sigkilled_server_and_ends_with_the_same_model() {
    let dir = Scratch::new("failover-local");
    let clean = run_local(&[], &dir.path("clean"));
    let failed = run_local(
        &["--kill-server-after=0.4".to_string()],
        &dir.path("killed"),
    );
    assert_eq!(failed["failovers"], 1, "one failover: {failed}");
    assert_eq!(clean["failovers"], 0);
    let (a, b) = (
        merged_model(&dir.path("clean")),
        merged_model(&dir.path("killed")),
    );
    assert!(a.len() > 5000, "only {} keys trained", a.len());
    assert_eq!(a.len(), b.len(), "the same keys are trained");
    let differ: Vec<_> = a
        .iter()
        .filter(|(k, w)| b.get(k) != Some(w))
        .take(5)
        .map(|(k, w)| (*k, f32::from_bits(*w), b.get(k).map(|x| f32::from_bits(*x))))
        .collect();
    assert!(
        differ.is_empty(),
        "weights differ (key, clean, killed): {differ:?}"
    );
    assert_eq!(clean["test_logloss"], failed["test_logloss"]);
}
