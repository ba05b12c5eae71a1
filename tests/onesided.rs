//! The one-sided data path end to end: real scheduler and server processes on
//! 127.0.0.1, in-test workers, dense windows read and written over shared memory while
//! TCP workers and sparse requests see the same values.

mod common;

use std::time::Duration;

use common::Cluster;
use pserv_engine::keys::KeyRange;
use pserv_engine::onesided::TransportKind;
use pserv_engine::worker::{TaskOpts, Worker, WorkerConfig};
use pserv_engine::EngineError;
use pserv_transport::TcpConfig;

fn worker(c: &Cluster, rank: u32, transport: TransportKind) -> Worker {
    let mut cfg = WorkerConfig::new(c.scheduler);
    cfg.rank = Some(rank);
    cfg.tcp = TcpConfig {
        threads: 1,
        pin_cores: false,
        ..TcpConfig::default()
    };
    cfg.register_timeout = Duration::from_secs(30);
    cfg.timeout = Duration::from_secs(30);
    cfg.transport = transport;
    Worker::connect(cfg).expect("worker connects")
}

/// A range straddling the first boundary between two servers of `w`'s routing table.
fn straddling(w: &Worker, n: u64) -> KeyRange {
    let mid = w.cluster().partition.ranges()[1].begin;
    KeyRange::new(mid - n / 2, mid + n / 2)
}

#[test]
fn dense_windows_are_one_sided_and_agree_with_tcp_and_sparse_requests() {
    dense_windows(TransportKind::Shm, &["--transport=shm"]);
}

/// The same over RDMA verbs (needs a device: `scripts/soft-rdma` or a NIC).
#[cfg(feature = "rdma")]
#[test]
#[ignore = "needs an RDMA device (scripts/soft-rdma, or a NIC): pass --ignored"]
fn dense_windows_over_rdma_are_one_sided_and_agree_with_tcp_and_sparse_requests() {
    dense_windows(TransportKind::Rdma, &["--transport=rdma"]);
}

/// The reason a window's grant gives for the path `transport` takes.
fn grant_reason(transport: TransportKind) -> &'static str {
    match transport {
        TransportKind::Rdma => "RDMA device",
        _ => "same host",
    }
}

fn dense_windows(transport: TransportKind, server_flags: &[&str]) {
    // One-sided pushes bypass chain replication: windows need --replicas 0.
    let mut c = Cluster::start_with(2, 2, &["--update=sum", "--replicas=0"], server_flags);
    let (w0, w1) = std::thread::scope(|s| {
        let a = s.spawn(|| worker(&c, 0, transport));
        let b = s.spawn(|| worker(&c, 1, TransportKind::Tcp));
        (a.join().unwrap(), b.join().unwrap())
    });
    let r = straddling(&w0, 20_000);
    let n = r.len() as usize;
    let opts = TaskOpts::default();

    // Values pushed over TCP before the window exists are carried into it.
    w1.wait(w1.push_range(r, vec![0.5f32; n])).unwrap();

    let granted = w0.open_window(r).unwrap();
    assert_eq!(granted.len(), 2, "{granted:?}");
    assert!(
        granted
            .iter()
            .all(|(_, one_sided, why)| *one_sided && why.contains(grant_reason(transport))),
        "{granted:?}"
    );
    let tcp_only = w1.open_window(r).unwrap();
    assert!(
        tcp_only.iter().all(|(_, one_sided, _)| !*one_sided),
        "{tcp_only:?}"
    );

    // One-sided push (worker 0) and TCP push (worker 1) land in the same values.
    let ramp: Vec<f32> = (0..n).map(|i| i as f32).collect();
    w0.push_range_now(r, &ramp, &opts).unwrap();
    w1.push_range_now(r, &vec![2.0f32; n], &opts).unwrap();
    let want: Vec<f32> = (0..n).map(|i| i as f32 + 2.5).collect();

    let mut one_sided = vec![0f32; n];
    w0.pull_range_into(r, &mut one_sided, &opts).unwrap();
    assert_eq!(one_sided, want);
    let mut over_tcp = vec![0f32; n];
    w1.pull_range_into(r, &mut over_tcp, &opts).unwrap();
    assert_eq!(over_tcp, want);

    // A sub-range, and sparse keys inside one window, served from the window.
    let sub = KeyRange::new(r.begin + 10, r.begin + 20);
    let mut part = vec![0f32; 10];
    w0.pull_range_into(sub, &mut part, &opts).unwrap();
    assert_eq!(part, want[10..20]);
    let keys = vec![r.begin + 3, r.begin + 99];
    let got = w1.wait_pull::<f32>(w1.pull::<f32>(keys)).unwrap().to_vec();
    assert_eq!(got, vec![want[3], want[99]]);

    // Sparse keys straddling a window's edge are refused clearly, and change nothing.
    let edge = vec![r.begin - 1, r.begin];
    let e = w1
        .wait(w1.push(edge.clone(), vec![100.0f32; 2]))
        .unwrap_err();
    assert!(e.to_string().contains("straddle"), "{e}");
    w0.pull_range_into(r, &mut one_sided, &opts).unwrap();
    assert_eq!(one_sided, want);

    // A one-sided push naming an unknown function gets a clear error; nothing changes.
    let bad = TaskOpts {
        func: 999,
        ..TaskOpts::default()
    };
    let e = w0.push_range_now(r, &ramp, &bad).unwrap_err();
    assert!(
        matches!(&e, EngineError::InvalidRequest(m) if m.contains("no update function with id 999")),
        "{e}"
    );
    w0.pull_range_into(r, &mut one_sided, &opts).unwrap();
    assert_eq!(one_sided, want);

    // One window per server: a different range stays on TCP, with the reason.
    let other = KeyRange::new(r.begin - 100, r.begin - 50);
    let refused = w0.open_window(other).unwrap();
    assert!(
        refused
            .iter()
            .all(|(_, ok, why)| !ok && why.contains("one window")),
        "{refused:?}"
    );

    // Wrong lengths are refused before anything moves.
    assert!(w0.push_range_now(r, &ramp[..10], &opts).is_err());

    w0.finish(0).unwrap();
    w1.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn concurrent_one_sided_pushes_from_two_workers_all_apply() {
    concurrent_pushes(TransportKind::Shm, &["--transport=shm"]);
}

#[cfg(feature = "rdma")]
#[test]
#[ignore = "needs an RDMA device (scripts/soft-rdma, or a NIC): pass --ignored"]
fn concurrent_rdma_pushes_from_two_workers_all_apply() {
    concurrent_pushes(TransportKind::Rdma, &["--transport=rdma"]);
}

fn concurrent_pushes(transport: TransportKind, server_flags: &[&str]) {
    let mut c = Cluster::start_with(1, 2, &["--update=sum"], server_flags);
    let ws: Vec<Worker> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let c = &c;
                s.spawn(move || worker(c, r, transport))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let r = KeyRange::new(1000, 1000 + 300_000); // several blocks
    let n = r.len() as usize;
    for w in &ws {
        assert!(w.open_window(r).unwrap().iter().all(|(_, ok, _)| *ok));
    }
    let rounds = 20;
    std::thread::scope(|s| {
        for w in &ws {
            s.spawn(move || {
                let ones = vec![1.0f32; n];
                let mut seen = vec![0f32; n];
                for _ in 0..rounds {
                    w.push_range_now(r, &ones, &TaskOpts::default()).unwrap();
                    // Reads while the other worker writes: every block is a state that
                    // existed, so within a block all values are equal.
                    w.pull_range_into(r, &mut seen, &TaskOpts::default())
                        .unwrap();
                    for block in seen.chunks(4096) {
                        assert!(block.iter().all(|&v| v == block[0]), "torn block");
                    }
                }
            });
        }
    });
    let mut all = vec![0f32; n];
    ws[0]
        .pull_range_into(r, &mut all, &TaskOpts::default())
        .unwrap();
    assert!(
        all.iter().all(|&v| v == 2.0 * rounds as f32),
        "{:?}",
        &all[..4]
    );
    for w in ws {
        w.finish(0).unwrap();
    }
    c.procs.wait_all(Duration::from_secs(30));
}

/// The sparse LR job with its features folded into dense buckets (`--hash-buckets`),
/// run by `pserv local` with `--transport` and sequential consistency; returns its
/// summary.
fn lr_folded(dir: &common::Scratch, transport: &str) -> serde_json::Value {
    lr_folded_with(dir, transport, &[]).0
}

/// [`lr_folded`] with extra environment for every process; returns the summary and the
/// job's stderr.
fn lr_folded_with(
    dir: &common::Scratch,
    transport: &str,
    env: &[(&str, &str)],
) -> (serde_json::Value, String) {
    let tag: String = env.iter().map(|(k, v)| format!("-{k}-{v}")).collect();
    let summary = dir.path(&format!("{transport}{}.json", tag.replace([',', '='], "-")));
    let out = std::process::Command::new(common::pserv())
        .args([
            "local",
            "--servers=2",
            "--replicas=0",
            "--workers=2",
            "--examples=8000",
            "--features=30000",
            "--hash-buckets=8192",
            "--epochs=2",
            "--lr=1",
            "--consistency=sequential",
            &format!("--transport={transport}"),
            &format!("--summary-json={}", summary.display()),
            "--timeout-secs=120",
        ])
        .args(common::base_net_flags())
        .envs(env.iter().copied())
        .output()
        .expect("pserv runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{transport} {env:?}: {stderr}");
    let s = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    (s, stderr)
}

/// A queue pair that fails (here: forced into the error state by the software device
/// after a number of work requests, as a NIC's fatal error or a link flap would) does
/// not end the job: the worker's pulls of that window fall back to TCP, which serves
/// the same values, and training goes on.
#[cfg(feature = "rdma")]
#[test]
#[ignore = "needs the software RDMA device (scripts/soft-rdma): pass --ignored"]
fn lr_job_over_rdma_goes_on_over_tcp_when_a_queue_pair_fails() {
    if std::env::var_os("PSERV_SOFT_RDMA").is_none() {
        eprintln!("skipped: fault injection needs the software device (scripts/soft-rdma)");
        return;
    }
    let dir = common::Scratch::new("lr-rdma-faults");
    // Messages stay on TCP: the fault hits whichever queue pair starts the 40th work
    // request, and a message connection whose queue pair fails closes (a window's falls
    // back to TCP).
    let env = [
        ("SOFTRDMA_FAULTS", "qp_error_after=40"),
        ("PSERV_LOG", "warn"),
        ("PSERV_RDMA_MESSAGES", "false"),
    ];
    let (s, stderr) = lr_folded_with(&dir, "rdma", &env);
    assert!(
        stderr.contains("goes over TCP from now on"),
        "no window fell back: {stderr}"
    );
    assert_eq!(s["workers_finished"], 2, "{s}");
    let loss = s["test_logloss"].as_f64().unwrap();
    assert!(loss < 0.69, "the model still learns: {loss}");
}

/// Over shm the workers pull the model one-sidedly, over TCP two-sidedly; with
/// sequential consistency both runs must build exactly the same model.
#[test]
fn lr_job_over_shm_builds_the_same_model_as_over_tcp() {
    let dir = common::Scratch::new("lr-shm");
    let tcp = lr_folded(&dir, "tcp");
    let shm = lr_folded(&dir, "shm");
    assert_eq!(tcp["one_sided_windows"], 0);
    assert_eq!(
        shm["one_sided_windows"], 2,
        "both servers' windows attached"
    );
    for k in ["test_logloss", "test_accuracy", "test_auc"] {
        let (a, b) = (tcp[k].as_f64().unwrap(), shm[k].as_f64().unwrap());
        assert_eq!(a.to_bits(), b.to_bits(), "{k}: tcp {a} vs shm {b}");
    }
    assert!(
        tcp["test_logloss"].as_f64().unwrap() < 0.69,
        "the folded model learns: {}",
        tcp["test_logloss"]
    );
}

/// Over RDMA verbs (servers and workers in separate processes, each with its own
/// emulated or real NIC) the same job builds exactly the model of shm and TCP.
#[cfg(feature = "rdma")]
#[test]
#[ignore = "needs an RDMA device (scripts/soft-rdma, or a NIC): pass --ignored"]
fn lr_job_over_rdma_builds_the_same_model_as_over_shm_and_tcp() {
    let dir = common::Scratch::new("lr-rdma");
    let rdma = lr_folded(&dir, "rdma");
    assert_eq!(
        rdma["one_sided_windows"], 2,
        "both servers' windows over rdma"
    );
    for other in ["shm", "tcp"] {
        let o = lr_folded(&dir, other);
        for k in ["test_logloss", "test_accuracy", "test_auc"] {
            let (a, b) = (rdma[k].as_f64().unwrap(), o[k].as_f64().unwrap());
            assert_eq!(a.to_bits(), b.to_bits(), "{k}: rdma {a} vs {other} {b}");
        }
    }
}

/// The child side of `a_worker_killed_mid_push_leaves_the_window_consistent`: a worker
/// process that attaches the window and pushes ones into it until it is killed.
#[test]
fn child_pusher() {
    let Ok(addr) = std::env::var("PSERV_TEST_CHILD_SCHEDULER") else {
        return; // only runs as the child
    };
    let mut cfg = WorkerConfig::new(addr.parse().unwrap());
    cfg.rank = Some(1);
    cfg.tcp = TcpConfig {
        threads: 1,
        pin_cores: false,
        ..TcpConfig::default()
    };
    cfg.transport = match std::env::var("PSERV_TEST_CHILD_TRANSPORT").as_deref() {
        Ok("rdma") => TransportKind::Rdma,
        _ => TransportKind::Shm,
    };
    let w = Worker::connect(cfg).unwrap();
    let r = killed_range();
    assert!(w.open_window(r).unwrap().iter().all(|(_, ok, _)| *ok));
    let ones = vec![1.0f32; r.len() as usize];
    w.push_range_now(r, &ones, &TaskOpts::default()).unwrap();
    println!("pushing");
    loop {
        w.push_range_now(r, &ones, &TaskOpts::default()).unwrap();
    }
}

fn killed_range() -> KeyRange {
    KeyRange::new(4096, 4096 + 3 * (1 << 20)) // 12 MiB of f32: 12 chunks, 768 blocks
}

#[test]
fn a_worker_killed_mid_push_leaves_the_window_consistent() {
    killed_mid_push(TransportKind::Shm, &["--transport=shm"]);
}

#[cfg(feature = "rdma")]
#[test]
#[ignore = "needs an RDMA device (scripts/soft-rdma, or a NIC): pass --ignored"]
fn a_worker_killed_mid_rdma_push_leaves_the_window_consistent() {
    killed_mid_push(TransportKind::Rdma, &["--transport=rdma"]);
}

fn killed_mid_push(transport: TransportKind, server_flags: &[&str]) {
    use std::io::BufRead;
    let mut c = Cluster::start_with(1, 2, &["--update=sum"], server_flags);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_pusher", "--nocapture", "--test-threads=1"])
        .env("PSERV_TEST_CHILD_SCHEDULER", c.scheduler.to_string())
        .env("PSERV_TEST_CHILD_TRANSPORT", transport.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let w = worker(&c, 0, transport);
    let r = killed_range();
    let n = r.len() as usize;
    assert!(w.open_window(r).unwrap().iter().all(|(_, ok, _)| *ok));
    // Wait until the child pushes, let it run into the middle of some push, kill it.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("pushing") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
    }
    std::thread::sleep(Duration::from_millis(30));
    child.kill().unwrap(); // SIGKILL, by pid
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(50));

    // Every block is a state some sequence of whole chunks made: within a block all
    // values are equal; across blocks they differ by at most one (the push in flight).
    let mut before = vec![0f32; n];
    w.pull_range_into(r, &mut before, &TaskOpts::default())
        .unwrap();
    let (lo, hi) = before
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(lo >= 1.0 && hi - lo <= 1.0, "values from {lo} to {hi}");
    for block in before.chunks(4096) {
        assert!(block.iter().all(|&v| v == block[0]), "torn block");
    }
    // The server goes on serving: a push from the survivor lands exactly once.
    w.push_range_now(r, &vec![1.0f32; n], &TaskOpts::default())
        .unwrap();
    let mut after = vec![0f32; n];
    w.pull_range_into(r, &mut after, &TaskOpts::default())
        .unwrap();
    assert!(before.iter().zip(&after).all(|(b, a)| *a == b + 1.0));
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}
