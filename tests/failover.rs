//! Chain replication and recovery with real processes: a scheduler
//! and server processes on 127.0.0.1; a server is SIGKILLed (no goodbye) while workers
//! push, and no acknowledged push is lost, and none is applied twice.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, Scratch};
use pserv_engine::worker::Worker;

fn worker(c: &Cluster, rank: u32) -> Worker {
    common::worker(c, rank, Duration::from_secs(30))
}

fn workers(c: &Cluster, n: u32) -> Vec<Worker> {
    common::workers(c, n, Duration::from_secs(30))
}

fn spread_keys(n: u64) -> Vec<u64> {
    common::spread_keys(n, 11)
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
        let pid = common::kill(&mut c, "server 2");
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
    // A request routed with the old table is a redirect: the server sends its table,
    // then refuses (StaleEpoch), and changes nothing.
    redirect_carries_the_table(ws[0].cluster().servers[0].addr, keys[0], table.epoch());
    assert_all_at(&ws[0], &keys, (2 * PUSHES) as f32);
    for w in ws {
        w.finish(0).unwrap();
    }
}

/// Pull `keys` through `w` and assert every one reads exactly `want` (nothing lost,
/// nothing applied twice).
fn assert_all_at(w: &Worker, keys: &[u64], want: f32) {
    let got = w
        .wait_pull::<f32>(w.pull::<f32>(keys.to_vec()))
        .expect("pull")
        .to_vec();
    let wrong: Vec<(u64, f32)> = keys
        .iter()
        .zip(&got)
        .filter(|(_, &v)| v != want)
        .map(|(&k, &v)| (k, v))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "keys not at {want} (key, value): {wrong:?}"
    );
}

fn run_local(extra: &[String], dump: &Path) -> serde_json::Value {
    std::fs::create_dir_all(dump).unwrap();
    let mut args: Vec<String> = [
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
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    args.push(format!("--dump-model={}", dump.display()));
    common::local_summary(&args, &dump.join("summary.json"))
}

/// `pserv local` with sequential consistency: SIGKILL a server mid-training; training
/// completes, and the model (merged over the surviving servers, replicas agreeing) is the
/// model of the same run without the failure: the same keys, a relative L2 distance
/// below 1e-5 (a push lost or applied twice, or a pull answered before a push of its
/// clock was in, moves it far more: 1e-4 was seen while resent pieces moved clocks).
/// `..._bit_for_bit` below is the full claim.
#[test]
fn training_survives_a_sigkilled_server_and_ends_with_the_same_model() {
    let (same, total, rel) = failover_against_clean_run("failover-local", &[]);
    assert!(
        rel < 1e-5,
        "the models differ beyond rounding: relative L2 distance {rel:.2e} ({same} of {total} weights equal)"
    );
}

/// The full claim: bit for bit (pushes of each clock apply on every range in (clock,
/// rank) order after the pulls of their clock, on the new heads too).
#[test]
fn training_survives_a_sigkilled_server_and_ends_with_the_same_model_bit_for_bit() {
    let (same, total, rel) = failover_against_clean_run("failover-bitwise", &[]);
    assert_eq!(
        same, total,
        "the models differ: relative L2 distance {rel:.2e}"
    );
}

/// The traffic reducers that change no value (cached key lists, compressed values) keep
/// failover exact too: the run with them and a SIGKILLed server (whose keys move to new
/// heads with empty caches, which miss and are resent with their keys) ends with the
/// model of the clean run without them, up to rounding as above.
#[test]
fn key_caching_and_compression_survive_a_sigkilled_server_and_change_no_weight() {
    let (same, total, rel) = failover_against_clean_run(
        "failover-reducers",
        &["--key-cache".to_string(), "--compress=lz4".to_string()],
    );
    assert!(
        rel < 1e-5,
        "the models differ beyond rounding: relative L2 distance {rel:.2e} ({same} of {total} weights equal)"
    );
}

/// Run the job clean and with a server SIGKILLed (and `reducers`); returns (weights
/// bitwise equal, keys, relative L2 distance), after checking both trained the same keys.
fn failover_against_clean_run(name: &str, reducers: &[String]) -> (usize, usize, f64) {
    let dir = Scratch::new(name);
    let clean = run_local(&[], &dir.path("clean"));
    let mut killed = vec!["--kill-server-after=0.4".to_string()];
    killed.extend_from_slice(reducers);
    let failed = run_local(&killed, &dir.path("killed"));
    assert_eq!(failed["failovers"], 1, "one failover: {failed}");
    assert_eq!(clean["failovers"], 0);
    let (a, b) = (
        common::merged_model(&dir.path("clean")),
        common::merged_model(&dir.path("killed")),
    );
    assert!(a.len() > 5000, "only {} keys trained", a.len());
    assert_eq!(a.len(), b.len(), "the same keys are trained");
    let (mut same, mut diff2, mut norm2) = (0usize, 0f64, 0f64);
    for (k, w) in &a {
        let v = *b.get(k).expect("same keys");
        same += usize::from(v == *w);
        let (x, y) = (f64::from(f32::from_bits(*w)), f64::from(f32::from_bits(v)));
        diff2 += (x - y) * (x - y);
        norm2 += x * x;
    }
    let rel = (diff2 / norm2).sqrt();
    eprintln!(
        "{same} of {} weights bitwise equal to the run without the failure; relative L2 distance {rel:.2e}",
        a.len()
    );
    let (l0, l1) = (
        clean["test_logloss"].as_f64().unwrap(),
        failed["test_logloss"].as_f64().unwrap(),
    );
    assert!(
        (l0 - l1).abs() < 1e-5,
        "held-out logloss {l0} clean, {l1} with the failure"
    );
    (same, a.len(), rel)
}

fn wait_epoch(w: &Worker, epoch: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.table().epoch() < epoch {
        assert!(
            Instant::now() < deadline,
            "routing table stuck at epoch {}",
            w.table().epoch()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// While two workers push, a third server joins (`pserv server --join`: copy, then the
/// table flips) and then server 0 leaves on SIGTERM (hand-over, then it stops). Every
/// push is acknowledged and every key ends at exactly its count; the joiner heads a
/// share of the keys and the leaver none.
#[test]
fn a_server_joins_and_another_leaves_while_workers_push_and_nothing_is_lost() {
    let mut c = Cluster::start(2, 2, &["--update=sum", "--replicas=1"]);
    let ws = workers(&c, 2);
    let keys = spread_keys(3000);
    const PUSHES: u64 = 150;
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        for w in &ws {
            let keys = keys.clone();
            let done = &done;
            s.spawn(move || {
                let ones = vec![1.0f32; keys.len()];
                let mut inflight = std::collections::VecDeque::new();
                for _ in 0..PUSHES {
                    inflight.push_back(w.push(keys.clone(), ones.clone()));
                    if inflight.len() >= 4 {
                        w.wait(inflight.pop_front().unwrap())
                            .expect("every push is acknowledged");
                        done.fetch_add(1, Ordering::Relaxed);
                        // Pace the pushes so the changes happen while they flow.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                for ts in inflight {
                    w.wait(ts).expect("every push is acknowledged");
                }
            });
        }
        while done.load(Ordering::Relaxed) < 30 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut a = vec![
            "server".to_string(),
            format!("--scheduler={}", c.scheduler),
            "--join".into(),
        ];
        a.extend(common::net_flags());
        c.procs.spawn("server 2", &a);
        wait_epoch(&ws[0], 3);
        eprintln!(
            "joined at {} acknowledged pushes; table epoch {}",
            done.load(Ordering::Relaxed),
            ws[0].table().epoch()
        );
        common::signal(&c, "server 0", "-TERM");
        wait_epoch(&ws[0], 5);
        eprintln!(
            "server 0 left at {} acknowledged pushes",
            done.load(Ordering::Relaxed)
        );
    });
    let table = ws[0].table();
    assert!(
        table.owners().iter().all(|&o| o != 0),
        "the leaver heads nothing"
    );
    assert!(table.followers().iter().all(|f| !f.contains(&0)));
    let mut per_server = [0u64; 3];
    for &k in &keys {
        per_server[table.server_of(k)] += 1;
    }
    eprintln!("keys per server after the changes: {per_server:?}");
    assert_eq!(per_server[0], 0);
    assert!(per_server[1] > 0 && per_server[2] > 0, "{per_server:?}");
    assert_all_at(&ws[0], &keys, (2 * PUSHES) as f32);
    // The leaver stopped by itself, successfully.
    let (_, leaver) = c.procs.0.iter_mut().find(|(n, _)| n == "server 0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = leaver.try_wait().unwrap() {
            assert!(st.success(), "the leaving server exited with {st}");
            break;
        }
        assert!(Instant::now() < deadline, "the leaving server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in ws {
        w.finish(0).unwrap();
    }
}

/// `pserv local` with a worker SIGKILLed mid-training (elastic workers): training
/// completes; the departed worker's data shard is split over the two others from the next
/// epoch on (or skipped with `--skip-departed`), visible in the examples they trained.
#[test]
fn a_departed_workers_shard_passes_to_the_others() {
    let dir = Scratch::new("departed");
    let run = |extra: &[&str]| -> serde_json::Value {
        let summary = dir.path(&format!("s{}.json", extra.len()));
        let args: Vec<String> = [
            "--servers=2",
            "--workers=3",
            "--epochs=4",
            "--seed=9",
            "--threads=2",
            "--pin-cores=false",
            "--kill-worker-after=0.2",
            "--timeout-secs=60",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        common::local_summary(&args, &summary)
    };
    let moved = run(&[]);
    let skipped = run(&["--skip-departed"]);
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k}: {s}"));
    for s in [&moved, &skipped] {
        assert_eq!(n(s, "workers_finished"), 2, "{s}");
    }
    let train = n(&moved, "train_examples");
    // Worker 2's shard: rows [2T/3, T).
    let shard = train - train * 2 / 3;
    let own = (train - shard) * 4;
    assert_eq!(
        n(&skipped, "examples"),
        own,
        "skipped: only their own shards"
    );
    let extra = n(&moved, "examples") - own;
    assert!(
        extra > 0 && extra % shard == 0 && extra / shard <= 3,
        "the departed shard is trained once per epoch after the departure: {extra} extra examples, shard {shard}"
    );
    eprintln!(
        "departed shard trained by the others in {} of the 4 epochs",
        extra / shard
    );
    let baseline = 0.69;
    assert!(moved["test_logloss"].as_f64().unwrap() < baseline);
}

/// Bad membership requests get a clear answer and change nothing: a join with a rank
/// that is taken, a leave of a server that does not exist.
#[test]
fn a_duplicate_join_and_an_unknown_leave_are_refused() {
    let mut c = Cluster::start(2, 1, &["--update=sum", "--replicas=1"]);
    let w = worker(&c, 0);
    let before = w.table().epoch();
    let out = common::pserv_cmd()
        .args([
            "server",
            &format!("--scheduler={}", c.scheduler),
            "--join",
            "--rank=1",
            "--threads=1",
            "--pin-cores=false",
        ])
        .output()
        .expect("pserv runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already taken"), "{err}");
    let out = common::pserv_cmd()
        .args(["leave", &format!("--scheduler={}", c.scheduler), "--rank=7"])
        .output()
        .expect("pserv runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no ranges"), "{err}");
    // Nothing changed: same table, pushes still work.
    w.wait(w.push(vec![5u64], vec![1.0f32])).unwrap();
    assert_eq!(w.table().epoch(), before);
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// `pserv local` with a worker that joins mid-training (elastic workers, eventual
/// consistency): it takes part from the next epoch with an even share of the data; every
/// epoch still trains every example once.
#[test]
fn a_worker_that_joins_gets_a_share_of_the_data() {
    let dir = Scratch::new("joined-worker");
    let args = [
        "--servers=2",
        "--workers=2",
        "--epochs=5",
        "--seed=3",
        "--threads=2",
        "--pin-cores=false",
        "--add-worker-after=0.1",
        "--timeout-secs=60",
    ]
    .map(String::from);
    let s = common::local_summary(&args, &dir.path("s.json"));
    assert_eq!(s["workers_finished"], 3, "{s}");
    let train = s["train_examples"].as_u64().unwrap();
    assert_eq!(s["examples"].as_u64().unwrap(), train * 5, "{s}");
    let per: Vec<u64> = s["worker_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), 3);
    let joined = *per.iter().min().unwrap();
    assert!(joined > 0, "the joined worker trained nothing: {per:?}");
    // It trained whole epochs of a third of the data (a third rounded either way).
    let k = joined / (train / 3);
    assert!(
        (1..=4).contains(&k) && joined - k * (train / 3) <= k,
        "{per:?}"
    );
    eprintln!("examples per worker: {per:?}");
}

/// Send a push routed with epoch 1 to `server` (at `epoch` > 1): the answer is the current
/// table (a control frame), then a StaleEpoch refusal.
fn redirect_carries_the_table(server: std::net::SocketAddr, key: u64, epoch: u64) {
    use std::io::Write;
    let mut h = pserv_transport::Header::new(pserv_transport::MessageKind::Push, 1_000, 1);
    h.dtype = pserv_transport::DType::F32 as u8;
    h.value_len = 1;
    h.epoch = 1;
    let frame = pserv_transport::wire::encode(&h, &[key], &100.0f32.to_le_bytes());
    let mut s = common::raw_connect(server, h.sender);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame).unwrap();
    let mut read_frame = || common::read_frame(&mut s);
    let (h1, v1) = read_frame();
    assert_eq!(h1.kind, pserv_transport::MessageKind::Control as u8);
    match postcard::from_bytes::<pserv_engine::proto::Control>(&v1).unwrap() {
        pserv_engine::proto::Control::Table { partition } => assert_eq!(partition.epoch(), epoch),
        other => panic!("expected the table, got {other:?}"),
    }
    let (h2, v2) = read_frame();
    assert_eq!(h2.status, pserv_engine::proto::Status::StaleEpoch as u8);
    let text = String::from_utf8_lossy(&v2);
    assert!(text.contains("epoch 1"), "{text}");
}

/// The scheduler fails (SIGKILL) while two workers push; training data keeps flowing
/// (the data path does not need it); a scheduler restarted with `--recover` on the same
/// address rebuilds its view from the nodes' reports: barriers work again, `pserv status`
/// shows the routing table and every node, and it handles a server failure afterwards
/// with nothing lost.
#[test]
fn a_restarted_scheduler_rebuilds_its_view_from_the_nodes() {
    let mut c = Cluster::start(3, 2, &["--update=sum", "--replicas=1"]);
    let ws = workers(&c, 2);
    let keys = spread_keys(3000);
    let push_all = |n: u64| {
        std::thread::scope(|s| {
            for w in &ws {
                let keys = keys.clone();
                s.spawn(move || {
                    let ones = vec![1.0f32; keys.len()];
                    for _ in 0..n {
                        w.wait(w.push(keys.clone(), ones.clone()))
                            .expect("push acknowledged");
                    }
                });
            }
        })
    };
    let barrier_all = || {
        std::thread::scope(|s| {
            for w in &ws {
                s.spawn(move || w.barrier().expect("barrier"));
            }
        })
    };
    push_all(20);
    barrier_all();
    common::kill(&mut c, "scheduler");
    c.procs.0.retain(|(n, _)| n != "scheduler");
    // No scheduler: pushes still go.
    push_all(20);
    restart_scheduler(
        &mut c,
        &["--servers=3", "--workers=2", "--update=sum", "--replicas=1"],
    );
    // Barriers resume once the workers rejoined (they ask again).
    barrier_all();
    let out = common::pserv_cmd()
        .args(["status", &format!("--scheduler={}", c.scheduler)])
        .output()
        .expect("pserv status");
    let st = String::from_utf8_lossy(&out.stdout);
    assert!(st.contains("routing table epoch 1"), "{st}");
    for r in 0..3 {
        assert!(
            st.lines()
                .any(|l| l.contains(&format!("server {r} at")) && l.contains(": live")),
            "{st}"
        );
    }
    assert!(
        st.contains("server 2 -> ") || st.contains("-> server 2"),
        "{st}"
    );
    // It decides again: a server failure moves the ranges.
    common::kill(&mut c, "server 2");
    c.procs.0.retain(|(n, _)| n != "server 2");
    push_all(20);
    assert!(ws[0].table().epoch() >= 2);
    assert_all_at(&ws[0], &keys, (2 * 60) as f32);
    for w in ws {
        w.finish(0).unwrap();
    }
    c.procs.wait_all(Duration::from_secs(30));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.scratch.path("summary2.json")).unwrap())
            .unwrap();
    assert_eq!(summary["failovers"], 1, "{summary}");
}

/// Roles started by hand, as the reproduction did: a scheduler, 2 servers with
/// `--replicas 1` and 2 `pserv worker` processes training the LR job with sequential
/// consistency. Without a restart, and with the scheduler SIGKILLed mid-training and
/// restarted with `--recover` 0.5 s later: both workers ride the restart out (they
/// rejoin and resend what they had to tell it), the job finishes, and the model is the
/// model of the undisturbed run bit for bit.
#[test]
fn a_scheduler_sigkilled_mid_training_and_restarted_keeps_the_job_and_its_model() {
    let dir = Scratch::new("sched-restart");
    let clean = roles_job(&dir.path("clean"), false);
    let restarted = roles_job(&dir.path("restarted"), true);
    assert!(clean.len() > 5000, "only {} keys trained", clean.len());
    assert_eq!(clean.len(), restarted.len(), "the same keys are trained");
    let same = clean
        .iter()
        .filter(|(k, w)| restarted.get(k) == Some(w))
        .count();
    assert_eq!(
        same,
        clean.len(),
        "weights differ from the undisturbed run after the scheduler restart"
    );
}

/// Run the job of the test above (its model dumped under `dump`); `restart`: SIGKILL
/// the scheduler 1 s into training and start it again with `--recover` 0.5 s later.
fn roles_job(dump: &Path, restart: bool) -> BTreeMap<u64, u32> {
    std::fs::create_dir_all(dump).unwrap();
    let dump_flag = format!("--dump-model={}", dump.display());
    // The LR job's optimizer (adagrad, --lr 1) is the servers' update rule.
    const UPDATE: &str = "--update=adagrad:1:0.00000001";
    let mut c = Cluster::start_with(2, 2, &["--replicas=1", UPDATE], &[dump_flag.as_str()]);
    for r in 0..2 {
        let mut a: Vec<String> = vec![
            "worker".into(),
            format!("--scheduler={}", c.scheduler),
            format!("--rank={r}"),
        ];
        a.extend(
            [
                "--examples=120000",
                "--features=30000",
                "--epochs=6",
                "--seed=5",
                "--lr=1",
                "--consistency=sequential",
            ]
            .map(String::from),
        );
        a.extend(common::net_flags());
        c.procs.spawn(&format!("worker {r}"), &a);
    }
    if restart {
        std::thread::sleep(Duration::from_millis(1000));
        let sched = c
            .procs
            .0
            .iter_mut()
            .find(|(n, _)| n == "scheduler")
            .map(|(_, ch)| ch)
            .unwrap();
        assert!(
            sched.try_wait().unwrap().is_none(),
            "the job ended before the scheduler was killed: make it longer"
        );
        common::kill(&mut c, "scheduler");
        c.procs.0.retain(|(n, _)| n != "scheduler");
        std::thread::sleep(Duration::from_millis(500));
        restart_scheduler(
            &mut c,
            &["--servers=2", "--workers=2", "--replicas=1", UPDATE],
        );
    }
    // Every process ends by itself: the workers when trained, the scheduler when they
    // are done, the servers (dumping their ranges) when it stops them.
    c.procs.wait_all(Duration::from_secs(120));
    common::merged_model(dump)
}

/// `pserv local` restarts a scheduler that dies (`--kill-scheduler-after` SIGKILLs it
/// mid-training) with `--recover` on the same address; the servers and workers ride it
/// out, and the job ends with the model of the run without the restart, bit for bit
/// (sequential consistency).
#[test]
fn pserv_local_restarts_a_killed_scheduler_and_the_model_is_unchanged() {
    let dir = Scratch::new("local-sched-restart");
    let run = |name: &str, extra: &[&str]| -> (BTreeMap<u64, u32>, String) {
        let dump = dir.path(name);
        std::fs::create_dir_all(&dump).unwrap();
        let out = common::pserv_cmd()
            .arg("local")
            .args([
                "--servers=2",
                "--workers=2",
                "--examples=120000",
                "--features=30000",
                "--epochs=6",
                "--seed=5",
                "--lr=1",
                "--consistency=sequential",
                "--replicas=1",
                "--threads=2",
                "--pin-cores=false",
                "--timeout-secs=120",
            ])
            .args(extra)
            .arg(format!("--dump-model={}", dump.display()))
            .output()
            .expect("pserv runs");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "pserv local {extra:?} failed: {err}");
        (common::merged_model(&dump), err)
    };
    let (clean, _) = run("clean", &[]);
    let (restarted, err) = run("restarted", &["--kill-scheduler-after=0.8"]);
    assert!(
        err.contains("restarted it with --recover"),
        "the scheduler was not killed mid-job (make the job longer): {err}"
    );
    assert!(clean.len() > 5000, "only {} keys trained", clean.len());
    assert_eq!(clean.len(), restarted.len());
    let same = clean
        .iter()
        .filter(|(k, w)| restarted.get(k) == Some(w))
        .count();
    assert_eq!(
        same,
        clean.len(),
        "weights differ after the scheduler restart"
    );
}

/// Start "scheduler 2" on `c`'s scheduler address with `--recover` and the cluster flags
/// `flags` (its summary goes to summary2.json).
fn restart_scheduler(c: &mut Cluster, flags: &[&str]) {
    let mut a = vec!["scheduler".to_string(), format!("--listen={}", c.scheduler)];
    a.extend(flags.iter().map(|f| f.to_string()));
    a.push("--recover".into());
    a.push(format!(
        "--summary-json={}",
        c.scratch.path("summary2.json").display()
    ));
    a.extend(common::net_flags());
    c.procs.spawn("scheduler 2", &a);
}
