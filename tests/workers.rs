//! Workers that join, leave and are replaced while the LR job trains, with real
//! processes on 127.0.0.1: a worker joins under bounded delay and under sequential
//! consistency (entering at a given epoch, the same model in two runs); a SIGKILLed
//! worker is replaced in place and the sequential model equals the run without the
//! failure bit for bit, also when the replacement itself dies; replacing a live rank is
//! refused and changes nothing; a worker asked to leave (`pserv leave --worker`, or
//! SIGTERM) finishes its clock and the job goes on without waiting for it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Cluster, Scratch};

/// How many weights of `b` equal `a`'s bit for bit (after checking the same keys).
fn same_weights(a: &BTreeMap<u64, u32>, b: &BTreeMap<u64, u32>) -> usize {
    assert!(a.len() > 5000, "only {} keys trained", a.len());
    assert_eq!(a.len(), b.len(), "the same keys are trained");
    a.iter().filter(|(k, w)| b.get(k) == Some(w)).count()
}

/// The job of these tests (`pserv local` flags).
const JOB: [&str; 6] = [
    "--examples=60000",
    "--features=30000",
    "--seed=5",
    "--lr=1",
    "--threads=2",
    "--pin-cores=false",
];

/// `pserv local` with the job above and `extra`, its model dumped under `dump`.
fn local(dump: &Path, extra: &[&str]) -> serde_json::Value {
    std::fs::create_dir_all(dump).unwrap();
    let mut args: Vec<String> = JOB.iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--timeout-secs=120".into());
    args.push(format!("--dump-model={}", dump.display()));
    common::local_summary(&args, &dump.join("summary.json"))
}

#[test]
fn a_sigkilled_worker_is_replaced_in_place_and_the_sequential_model_is_the_clean_runs_bit_for_bit()
{
    let dir = Scratch::new("replace-local");
    let base = [
        "--servers=2",
        "--workers=2",
        "--epochs=4",
        "--consistency=sequential",
    ];
    let clean = local(&dir.path("clean"), &base);
    // The kill must land mid-training: a loaded machine may still be setting up at the
    // first try (then the replacement resumes at clock 0, which proves less): later.
    let mut killed = serde_json::Value::Null;
    for after in ["0.4", "1.0", "2.0"] {
        let _ = std::fs::remove_dir_all(dir.path("killed"));
        let kill = format!("--kill-worker-after={after}");
        let mut killed_args = base.to_vec();
        killed_args.extend(["--replace-failed-workers", kill.as_str()]);
        killed = local(&dir.path("killed"), &killed_args);
        let r = &killed["replacement_worker_1"];
        assert!(r.is_object(), "no replacement reported: {killed}");
        let (kill_ms, ack_ms) = (
            killed["killed_worker_unix_ms"].as_u64().unwrap(),
            r["first_ack_unix_ms"].as_u64().expect("a first push"),
        );
        assert!(
            ack_ms >= kill_ms,
            "first push {ack_ms} before the kill {kill_ms}"
        );
        eprintln!(
            "kill after {after} s: the replacement resumed after clock {}, its first push acknowledged {} ms after the kill",
            r["resumed_after_clock"],
            ack_ms - kill_ms
        );
        if r["resumed_after_clock"].as_u64().unwrap() > 0 {
            break;
        }
    }
    assert!(
        killed["replacement_worker_1"]["resumed_after_clock"]
            .as_u64()
            .unwrap()
            > 0,
        "every kill came before any step: make the job longer ({killed})"
    );
    assert_eq!(killed["workers_finished"], 2);
    let (a, b) = (
        common::merged_model(&dir.path("clean")),
        common::merged_model(&dir.path("killed")),
    );
    let same = same_weights(&a, &b);
    assert_eq!(
        same,
        a.len(),
        "{same} of {} weights equal to the clean run",
        a.len()
    );
    assert_eq!(clean["test_logloss"], killed["test_logloss"]);
}

#[test]
fn a_worker_that_joins_under_bounded_delay_is_counted_by_the_gates_and_the_job_ends() {
    // The report: this ended the whole job ("joining worker ... failed").
    let dir = Scratch::new("join-bounded");
    let s = local(
        &dir.path("run"),
        &[
            "--servers=2",
            "--workers=2",
            "--epochs=4",
            "--consistency=bounded:4",
            "--add-worker-after=0.3",
        ],
    );
    assert_eq!(s["workers_finished"], 3, "{s}");
    let examples = s["worker_examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    assert!(
        examples.iter().all(|e| e.as_u64().unwrap() > 0),
        "every worker trained: {examples:?}"
    );
    let loss = s["test_logloss"].as_f64().unwrap();
    assert!(loss < 0.5, "held-out logloss {loss}");
}

#[test]
fn a_worker_that_joins_under_sequential_consistency_at_a_given_epoch_gives_the_same_model_twice() {
    let dir = Scratch::new("join-sequential");
    let args = [
        "--servers=2",
        "--workers=2",
        "--epochs=4",
        "--consistency=sequential",
        "--add-worker-after=0.05",
        "--join-at-epoch=3",
    ];
    let one = local(&dir.path("one"), &args);
    let two = local(&dir.path("two"), &args);
    for s in [&one, &two] {
        assert_eq!(s["workers_finished"], 3, "{s}");
    }
    let (a, b) = (
        common::merged_model(&dir.path("one")),
        common::merged_model(&dir.path("two")),
    );
    let same = same_weights(&a, &b);
    assert_eq!(
        same,
        a.len(),
        "{same} of {} weights equal in the two runs",
        a.len()
    );
    // The joiner trained epochs 3 and 4: a third of those epochs' rows.
    let joiner = one["worker_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_u64().unwrap())
        .min()
        .unwrap();
    assert!(joiner > 0, "the joiner trained nothing: {one}");
}

/// The LR job's optimizer (adagrad, --lr 1) is the servers' update rule.
const UPDATE: &str = "--update=adagrad:1:0.00000001";

/// `pserv worker` flags of the hand-started jobs below.
fn worker_args(c: &Cluster, who: &str, model: &str, epochs: u32) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "worker".into(),
        format!("--scheduler={}", c.scheduler),
        who.to_string(),
    ];
    a.extend(
        [
            "--examples=60000",
            "--features=30000",
            "--seed=5",
            "--lr=1",
            &format!("--epochs={epochs}"),
            &format!("--consistency={model}"),
        ]
        .map(String::from),
    );
    a.extend(common::net_flags());
    a
}

/// A hand-started sequential job (scheduler keeping places, 2 servers dumping into
/// `dump`, 2 workers); `faults`: SIGKILL worker 1, start a replacement, SIGKILL that one
/// too and start another, after a refused replacement of live worker 0.
fn replaced_twice(dump: &Path, faults: bool) -> BTreeMap<u64, u32> {
    std::fs::create_dir_all(dump).unwrap();
    let dump_flag = format!("--dump-model={}", dump.display());
    let mut c = Cluster::start_with(
        2,
        2,
        &[UPDATE, "--replace-failed-workers"],
        &[dump_flag.as_str()],
    );
    for r in 0..2 {
        let a = worker_args(&c, &format!("--rank={r}"), "sequential", 5);
        c.procs.spawn(&format!("worker {r}"), &a);
    }
    if faults {
        std::thread::sleep(Duration::from_millis(700));
        // Worker 0 is alive: a replacement for it is refused, saying why.
        let out = common::pserv_cmd()
            .args(worker_args(&c, "--replace=0", "sequential", 5))
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "a live rank was replaced");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("worker 0 is alive"), "{err}");
        let running = |c: &mut Cluster, name: &str| {
            c.procs
                .0
                .iter_mut()
                .find(|(n, _)| n == name)
                .is_some_and(|(_, ch)| ch.try_wait().unwrap().is_none())
        };
        assert!(running(&mut c, "worker 1"), "the job ended before the kill");
        common::kill(&mut c, "worker 1");
        c.procs.0.retain(|(n, _)| n != "worker 1");
        let a = worker_args(&c, "--replace=1", "sequential", 5);
        c.procs.spawn("replacement 1", &a);
        std::thread::sleep(Duration::from_millis(600));
        assert!(
            running(&mut c, "replacement 1"),
            "the job ended before the replacement was killed"
        );
        common::kill(&mut c, "replacement 1");
        c.procs.0.retain(|(n, _)| n != "replacement 1");
        c.procs.spawn("replacement 2", &a);
    }
    c.procs.wait_all(Duration::from_secs(120));
    common::merged_model(dump)
}

#[test]
fn a_replacement_that_dies_is_replaced_again_and_a_live_rank_cannot_be_replaced() {
    let dir = Scratch::new("replace-twice");
    let clean = replaced_twice(&dir.path("clean"), false);
    let faulty = replaced_twice(&dir.path("faulty"), true);
    let same = same_weights(&clean, &faulty);
    assert_eq!(
        same,
        clean.len(),
        "{same} of {} weights equal to the run without failures",
        clean.len()
    );
}

#[test]
fn workers_asked_to_leave_under_bounded_delay_finish_their_clock_and_nobody_waits_for_them() {
    let mut c = Cluster::start(2, 3, &[UPDATE]);
    for r in 0..3 {
        let a = worker_args(&c, &format!("--rank={r}"), "bounded:2", 8);
        c.procs.spawn(&format!("worker {r}"), &a);
    }
    // `pserv status` shows each worker's rows and clock once it trains.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = common::pserv_cmd()
            .args(["status", &format!("--scheduler={}", c.scheduler), "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let training = report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["role"] == "Worker")
            .filter(|n| n["shard"]["rows"].as_array().is_some_and(|r| !r.is_empty()))
            .count();
        if training == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers never reported their rows: {report}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    // Worker 0 evaluates the model: it cannot leave.
    let leave = |rank: u32| {
        common::pserv_cmd()
            .args([
                "leave",
                &format!("--scheduler={}", c.scheduler),
                &format!("--worker={rank}"),
            ])
            .output()
            .unwrap()
    };
    let refused = leave(0);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot leave"));
    let asked = leave(2);
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
    // Worker 1 leaves on SIGTERM.
    common::signal(&c, "worker 1", "-TERM");
    let started = Instant::now();
    c.procs.wait_all(Duration::from_secs(120));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.scratch.path("summary.json")).unwrap())
            .unwrap();
    let clock = |r: u32| {
        summary[format!("traffic_worker_{r}")]["clock"]
            .as_u64()
            .unwrap()
    };
    for r in [1, 2] {
        assert_eq!(
            summary[format!("traffic_worker_{r}")]["left"],
            true,
            "worker {r} left: {summary}"
        );
        assert!(clock(r) < clock(0), "worker {r} left early: {summary}");
    }
    assert_eq!(summary["traffic_worker_0"]["left"], false);
    let loss = summary["test_logloss"].as_f64().unwrap();
    assert!(loss < 0.5, "held-out logloss {loss}");
    eprintln!(
        "the job ended {:.1} s after the leaves; worker clocks {} / {} / {}",
        started.elapsed().as_secs_f64(),
        clock(0),
        clock(1),
        clock(2)
    );
}
