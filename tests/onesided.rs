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
    cfg.security = common::security();
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
    // With chain replication (the default with two servers): one-sided pushes are
    // replicated like TCP pushes.
    let mut c = Cluster::start_with(2, 2, &["--update=sum", "--replicas=1"], server_flags);
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

    // Sparse keys straddling a window's edge apply to the store and show in the window.
    let edge = vec![r.begin - 1, r.begin];
    w1.wait(w1.push(edge.clone(), vec![100.0f32; 2])).unwrap();
    let mut want = want;
    want[0] += 100.0;
    w0.pull_range_into(r, &mut one_sided, &opts).unwrap();
    assert_eq!(one_sided, want);
    let got = w1.wait_pull::<f32>(w1.pull::<f32>(edge)).unwrap().to_vec();
    assert_eq!(got, vec![100.0, want[0]]);

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

    // A disjoint range gets a window of its own; one overlapping a window without being
    // it stays on TCP, with the reason.
    let other = KeyRange::new(r.begin - 100, r.begin - 50);
    let granted = w0.open_window(other).unwrap();
    assert!(granted.iter().all(|(_, ok, _)| *ok), "{granted:?}");
    w0.push_range_now(other, &[1.0f32; 50], &opts).unwrap();
    let mut o = vec![0f32; 50];
    w0.pull_range_into(other, &mut o, &opts).unwrap();
    assert_eq!(o, vec![1.0f32; 50]);
    // A one-sided push holding NaN is refused whole by the server it lands on, naming the
    // key, like a TCP push; nothing of it changes the window or the store.
    let mut poisoned = vec![5.0f32; 50];
    poisoned[7] = f32::NAN;
    let e = w0.push_range_now(other, &poisoned, &opts).unwrap_err();
    assert!(
        e.to_string().contains("non-finite")
            && e.to_string().contains(&(other.begin + 7).to_string()),
        "{e}"
    );
    w0.pull_range_into(other, &mut o, &opts).unwrap();
    assert_eq!(o, vec![1.0f32; 50]);
    let got = w1
        .wait_pull::<f32>(w1.pull::<f32>(vec![other.begin + 7]))
        .unwrap()
        .to_vec();
    assert_eq!(got, vec![1.0]);
    let overlapping = KeyRange::new(r.begin + 5, r.begin + 50);
    let refused = w0.open_window(overlapping).unwrap();
    assert!(
        refused
            .iter()
            .all(|(_, ok, why)| !ok && why.contains("overlaps")),
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
/// run by `pserv local` with `--transport`, sequential consistency and the default
/// replication (one replica per range); returns its summary.
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
    let out = common::pserv_cmd()
        .args([
            "local",
            "--servers=2",
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
        stderr.contains("go over TCP from now on"),
        "no window fell back: {stderr}"
    );
    assert_eq!(s["workers_finished"], 2, "{s}");
    let loss = s["test_logloss"].as_f64().unwrap();
    assert!(loss < 0.69, "the model still learns: {loss}");
}

/// Over shm the workers pull the model one-sidedly, over TCP two-sidedly; with
/// sequential consistency (and chain replication) both runs must build exactly the same
/// model.
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
    cfg.security = common::security();
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
        .env("PSERV_SECRET_FILE", common::secret_file())
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

/// Every range of the routing table (several per server with `--vnodes`): a window per
/// range, each pulled and pushed one-sidedly by one worker while another pushes and pulls
/// over TCP; both see the values a TCP-only run computes.
#[test]
fn windows_on_several_ranges_per_server_agree_with_tcp() {
    let mut c = Cluster::start_with(
        2,
        2,
        &["--update=sum", "--vnodes=8", "--replicas=1"],
        &["--transport=shm"],
    );
    let (w0, w1) = std::thread::scope(|s| {
        let a = s.spawn(|| worker(&c, 0, TransportKind::Shm));
        let b = s.spawn(|| worker(&c, 1, TransportKind::Tcp));
        (a.join().unwrap(), b.join().unwrap())
    });
    let table = w0.table();
    // A piece at the start of every range of the table, and one across the boundary of
    // two ranges of different servers.
    let mut ranges: Vec<KeyRange> = table
        .ranges()
        .iter()
        .map(|r| KeyRange::new(r.begin + 1, r.begin + 1 + 3000.min(r.len() - 1)))
        .collect();
    let cross = table
        .ranges()
        .windows(2)
        .zip(table.owners().windows(2))
        .find(|(_, o)| o[0] != o[1])
        .map(|(r, _)| KeyRange::new(r[1].begin - 500, r[1].begin + 500))
        .expect("two servers own neighbouring ranges");
    ranges.retain(|r| r.intersect(&cross).is_none());
    ranges.push(cross);
    ranges.sort_by_key(|r| r.begin);
    let mut per_server = std::collections::BTreeMap::<u32, usize>::new();
    for &r in &ranges {
        for (server, ok, why) in w0.open_window(r).unwrap() {
            assert!(ok, "{r}: {why}");
            *per_server.entry(server).or_default() += 1;
        }
    }
    assert!(
        per_server.len() == 2 && per_server.values().all(|&n| n >= 2),
        "several windows on each server: {per_server:?}"
    );
    let opts = TaskOpts::default();
    let mut want: Vec<Vec<f32>> = ranges.iter().map(|r| vec![0.0; r.len() as usize]).collect();
    for round in 0..5 {
        for (i, &r) in ranges.iter().enumerate() {
            let n = r.len() as usize;
            let ramp: Vec<f32> = (0..n).map(|k| (k % 97) as f32 + round as f32).collect();
            w0.push_range_now(r, &ramp, &opts).unwrap();
            w1.push_range_now(r, &vec![0.5f32; n], &opts).unwrap();
            for (w, (a, b)) in want[i].iter_mut().zip(ramp.iter().map(|v| (v, 0.5))) {
                *w += a + b;
            }
        }
        for (i, &r) in ranges.iter().enumerate() {
            let n = r.len() as usize;
            let mut one_sided = vec![0f32; n];
            w0.pull_range_into(r, &mut one_sided, &opts).unwrap();
            let mut over_tcp = vec![0f32; n];
            w1.pull_range_into(r, &mut over_tcp, &opts).unwrap();
            assert_eq!(one_sided, want[i], "{r} one-sided, round {round}");
            assert_eq!(over_tcp, want[i], "{r} over tcp, round {round}");
        }
    }
    w0.finish(0).unwrap();
    w1.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// One window per table range of `w`'s table: a piece of `n` keys at the start of each.
fn range_pieces(w: &Worker, n: u64) -> Vec<KeyRange> {
    w.table()
        .ranges()
        .iter()
        .map(|r| KeyRange::new(r.begin, r.begin + n.min(r.len())))
        .collect()
}

/// One-sided pushes with `--replicas 1` are replicated before they are acknowledged:
/// after pushes made one after the other by two workers (the model of the same pushes
/// over TCP), the head of the first range is SIGKILLed, and its replica, now its head,
/// serves exactly what the pushes made.
#[test]
fn one_sided_pushes_are_replicated_before_they_are_acknowledged() {
    let mut c = Cluster::start_with(
        3,
        2,
        &["--update=sum", "--vnodes=4", "--replicas=1"],
        &["--transport=shm"],
    );
    let (w0, w1) = std::thread::scope(|s| {
        let a = s.spawn(|| worker(&c, 0, TransportKind::Shm));
        let b = s.spawn(|| worker(&c, 1, TransportKind::Shm));
        (a.join().unwrap(), b.join().unwrap())
    });
    let ranges = range_pieces(&w0, 5000);
    for w in [&w0, &w1] {
        for &r in &ranges {
            assert!(w.open_window(r).unwrap().iter().all(|(_, ok, _)| *ok));
        }
    }
    let opts = TaskOpts::default();
    // Pushes one after the other (each acknowledged before the next): the model is the
    // same as that of the same pushes over TCP.
    for round in 0..4u32 {
        for (i, &r) in ranges.iter().enumerate() {
            let n = r.len() as usize;
            let w = if (round as usize + i).is_multiple_of(2) {
                &w0
            } else {
                &w1
            };
            let v: Vec<f32> = (0..n)
                .map(|k| (k % 13) as f32 * 0.25 + round as f32)
                .collect();
            w.push_range_now(r, &v, &opts).unwrap();
        }
    }
    let want = |r: &KeyRange| -> Vec<f32> {
        (0..r.len() as usize)
            .map(|k| {
                (0..4)
                    .map(|round| (k % 13) as f32 * 0.25 + round as f32)
                    .sum()
            })
            .collect()
    };
    // Kill the head of the first range: its replica must hold every acknowledged push.
    let victim = w0.table().server_of(ranges[0].begin);
    common::kill(&mut c, &format!("server {victim}"));
    c.procs.0.retain(|(n, _)| *n != format!("server {victim}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while w0.table().server_of(ranges[0].begin) == victim {
        assert!(std::time::Instant::now() < deadline, "no failover");
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in &ranges {
        let mut got = vec![0f32; r.len() as usize];
        w0.pull_range_into(*r, &mut got, &opts).unwrap();
        assert_eq!(got, want(r), "{r} after the head {victim} was killed");
    }
    w0.finish(0).unwrap();
    w1.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// Two workers push ones one-sidedly into a window on every range of every server, with
/// `--replicas 1`; a head server is SIGKILLed mid-job. Every push must end acknowledged
/// (the ones to the dead head are resent over TCP to its replica, which applies each
/// only if the chain does not hold it already), and every key must read exactly the
/// number of pushes: nothing lost, nothing applied twice. Windows attached again after
/// the failover read the same.
#[test]
fn sigkill_of_a_head_mid_one_sided_job_loses_no_acknowledged_push() {
    let mut c = Cluster::start_with(
        3,
        2,
        &["--update=sum", "--vnodes=4", "--replicas=1"],
        &["--transport=shm"],
    );
    let ws: Vec<Worker> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let c = &c;
                s.spawn(move || worker(c, r, TransportKind::Shm))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ranges = range_pieces(&ws[0], 20_000);
    for w in &ws {
        for &r in &ranges {
            assert!(w.open_window(r).unwrap().iter().all(|(_, ok, _)| *ok));
        }
    }
    const ROUNDS: usize = 40;
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in &ws {
            let ranges = &ranges;
            let done = &done;
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    for &r in ranges {
                        let ones = vec![1.0f32; r.len() as usize];
                        w.push_range_now(r, &ones, &TaskOpts::default())
                            .expect("every push is acknowledged in the end");
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        while done.load(std::sync::atomic::Ordering::Relaxed) < ROUNDS / 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = common::kill(&mut c, "server 1");
        c.procs.0.retain(|(n, _)| n != "server 1");
        eprintln!(
            "killed server 1 (pid {pid}) after {} rounds",
            done.load(std::sync::atomic::Ordering::Relaxed)
        );
    });
    let want = 2.0 * ROUNDS as f32;
    let check = |w: &Worker, how: &str| {
        for &r in &ranges {
            let mut got = vec![0f32; r.len() as usize];
            w.pull_range_into(r, &mut got, &TaskOpts::default())
                .unwrap();
            let bad = got.iter().position(|&v| v != want);
            assert!(
                bad.is_none(),
                "{how}: {r}: key {:?} reads {:?}, want {want}",
                bad,
                bad.map(|i| got[i])
            );
        }
    };
    // Worker 1 still has the windows of the servers alive (the dead one's were
    // detached): those parts one-sided, the rest over TCP.
    check(&ws[1], "surviving windows and tcp");
    for &r in &ranges {
        ws[0].open_window(r).unwrap();
    }
    check(&ws[0], "windows attached after the failover");
    for w in ws {
        w.finish(0).unwrap();
    }
    c.procs.wait_all(Duration::from_secs(30));
}
