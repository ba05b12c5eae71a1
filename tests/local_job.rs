//! The main job end to end: `pserv local` starts a scheduler, servers and workers as
//! separate processes on 127.0.0.1 and trains sparse logistic regression.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Scratch;
use pserv_engine::job::JobArgs;
use pserv_engine::lr::train_single_process;

const SMALL: [&str; 4] = [
    "--examples=8000",
    "--features=30000",
    "--epochs=3",
    "--seed=7",
];

/// What [`train_single_process`] trains: plain SGD over the training rows in one fixed
/// order (`--shuffle once`: the order `JobArgs::load_data` gives them).
const REFERENCE: [&str; 2] = ["--optimizer=sgd", "--shuffle=once"];

fn run_local(args: &[String]) -> std::process::Output {
    let out = common::pserv_cmd()
        .arg("local")
        .args(args)
        .args(common::net_flags())
        .arg("--timeout-secs=120")
        .output()
        .expect("pserv runs");
    out
}

fn job_args(summary: &std::path::Path, servers: u32, workers: u32) -> Vec<String> {
    let mut a: Vec<String> = SMALL.iter().map(|s| s.to_string()).collect();
    a.push(format!("--servers={servers}"));
    a.push(format!("--workers={workers}"));
    a.push(format!("--summary-json={}", summary.display()));
    a
}

fn summary(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("summary written")).unwrap()
}

/// `pserv local` with 2 servers and 2 workers on the small job, FTRL with L1 under
/// sequential consistency (deterministic), with `extra` flags and `env` set for every
/// process; its summary, after checking the run succeeded.
fn sequential_l1_run(
    dir: &Scratch,
    name: &str,
    extra: &[&str],
    env: Option<(&str, &str)>,
) -> serde_json::Value {
    let path = dir.path(name);
    let mut a = job_args(&path, 2, 2);
    a.extend(
        [
            "--optimizer=ftrl",
            "--l1=1",
            "--lr=0.1",
            "--consistency=sequential",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string()),
    );
    let mut cmd = common::pserv_cmd();
    cmd.arg("local")
        .args(&a)
        .args(common::net_flags())
        .arg("--timeout-secs=120");
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("pserv runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    summary(&path)
}

/// The same job in one process, with the same data and hyper-parameters (`extra` added).
fn single_process_logloss(extra: &[&str]) -> (f64, f64) {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        job: JobArgs,
    }
    let p = P::parse_from(
        std::iter::once("x")
            .chain(SMALL)
            .chain(extra.iter().copied()),
    );
    let (train, test) = p.job.load_data().unwrap();
    let (model, _) = train_single_process(&train, &p.job.sgd_params(), None);
    let e = model.evaluate(&test);
    (e.logloss, e.accuracy)
}

#[test]
fn local_cluster_trains_to_the_single_process_loss() {
    let dir = Scratch::new("local");
    let path = dir.path("summary.json");
    // Plain SGD in one fixed order, as the single-process reference trains. lr 1: with
    // SGD's default lr 4 two asynchronous workers overshoot by an amount that depends on
    // timing (logloss 0.57 to 0.65 on a loaded 2-core machine); at lr 1 the run is stable
    // and comparable with the single-process run.
    let mut args = job_args(&path, 2, 2);
    args.extend(REFERENCE.iter().map(|s| s.to_string()));
    args.push("--lr=1".into());
    let out = run_local(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pserv local failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("epoch 3: held-out logloss"), "{stdout}");
    let s = summary(&path);
    let (logloss, acc, majority) = (
        s["test_logloss"].as_f64().unwrap(),
        s["test_accuracy"].as_f64().unwrap(),
        s["majority_rate"].as_f64().unwrap(),
    );
    assert!(
        acc > majority + 0.05,
        "accuracy {acc} does not beat the majority class {majority}"
    );
    assert_eq!(s["epochs"], 3);
    assert_eq!(s["examples"], 3 * 6400);
    assert!(s["examples_per_sec"].as_f64().unwrap() > 0.0);
    assert!(s["bytes_sent"].as_u64().unwrap() > 0 && s["bytes_received"].as_u64().unwrap() > 0);
    let (single, single_acc) = single_process_logloss(&["--lr=1", REFERENCE[0], REFERENCE[1]]);
    // Two asynchronous workers apply each other's gradients a few steps late, in an order
    // the timing decides: close to the single-process loss, not bit for bit (the
    // one-worker test below checks the exact match).
    assert!(
        (logloss - single).abs() < 0.02,
        "distributed logloss {logloss} vs single-process {single} (accuracy {acc} vs {single_acc})"
    );
}

#[test]
fn one_worker_one_server_matches_the_single_process_run_exactly() {
    // One worker pulls, computes and pushes in the same order as the reference; the server
    // applies the same SGD step, so the models agree to float rounding.
    let dir = Scratch::new("local1");
    let path = dir.path("summary.json");
    let mut args = job_args(&path, 1, 1);
    args.extend(REFERENCE.iter().map(|s| s.to_string()));
    let out = run_local(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logloss = summary(&path)["test_logloss"].as_f64().unwrap();
    let (single, _) = single_process_logloss(&REFERENCE);
    assert!((logloss - single).abs() < 1e-4, "{logloss} vs {single}");
}

#[test]
fn libsvm_data_trains_too() {
    let dir = Scratch::new("libsvm");
    let data = dir.path("data.svm");
    // Separable by feature 1 vs feature 2, with noise features.
    let mut text = String::new();
    for i in 0..2000 {
        let y = i % 2;
        let f = if y == 1 { 1 } else { 2 };
        text.push_str(&format!(
            "{} {f}:1 {}:0.5 {}:1\n",
            if y == 1 { "+1" } else { "-1" },
            10 + i % 37,
            100 + i % 11
        ));
    }
    std::fs::write(&data, text).unwrap();
    let path = dir.path("summary.json");
    let out = run_local(&[
        format!("--data={}", data.display()),
        "--epochs=2".into(),
        "--batch-size=50".into(),
        "--lr=0.5".into(),
        format!("--summary-json={}", path.display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&path);
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.95, "{s}");
}

#[test]
fn wrong_configurations_fail_fast_with_a_clear_message() {
    let cases: [(&[&str], &str); 11] = [
        (&["--filter=nope"], "unknown filter"),
        (&["--compress=brotli"], "unknown codec `brotli`"),
        (&["--pull-filter=fp8"], "invalid value 'fp8'"),
        (&["--filter=kkt"], "--filter kkt needs --l1"),
        (&["--workers=0"], "at least one server and one worker"),
        (&["--data=/nonexistent/pserv.svm"], "no such file"),
        (&["--epochs=0"], "--epochs"),
        (&["--epochs", "-1"], "must be >= 1"),
        (&["--data=/dev/null"], "/dev/null: is not a regular file"),
        (&["--test-data=/tmp/x.svm"], "--test-data needs --data"),
        (
            &["--transport=carrier-pigeon"],
            "expected auto, tcp, shm or rdma",
        ),
    ];
    for (args, want) in cases {
        let started = std::time::Instant::now();
        let out = common::pserv_cmd()
            .arg("local")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // A malformed data file: the workers fail, the launcher stops the cluster and says so.
    let dir = Scratch::new("bad");
    let data = dir.path("bad.svm");
    std::fs::write(&data, "+1 1:1 2:1\nthis is not libsvm\n").unwrap();
    let path = dir.path("failed.json");
    std::fs::write(&path, "{\"test_logloss\": 0.1}").unwrap();
    let out = run_local(&[
        format!("--data={}", data.display()),
        format!("--summary-json={}", path.display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") || err.contains(":2:"), "{err}");
    // The summary says it failed, why, and holds no metric.
    let s = summary(&path);
    let e = s["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("failed") && (e.contains("line 2") || e.contains(":2:")),
        "{s}"
    );
    assert!(s.get("test_logloss").is_none(), "{s}");
    // A held-out file that is no file: refused before any process starts, and the
    // summary holds only the error.
    std::fs::write(&path, "{\"test_logloss\": 0.1}").unwrap();
    let started = std::time::Instant::now();
    let out = run_local(&[
        format!("--data={}", data.display()),
        "--test-data=/dev/null".into(),
        format!("--summary-json={}", path.display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--test-data /dev/null: is not a regular file"),
        "{err}"
    );
    let s = summary(&path);
    assert_eq!(s.as_object().map(|o| o.len()), Some(1), "{s}");
    assert!(s["error"].as_str().unwrap().contains("/dev/null"), "{s}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A flag refused while planning the cluster: the same.
    std::fs::write(&path, "{\"test_logloss\": 0.1}").unwrap();
    let out = run_local(&[
        "--lr=-1".into(),
        format!("--summary-json={}", path.display()),
    ]);
    assert!(!out.status.success());
    let s = summary(&path);
    assert_eq!(s.as_object().map(|o| o.len()), Some(1), "{s}");
    assert!(s["error"].as_str().unwrap().contains("--lr"), "{s}");
    // A flag the command line itself refuses (clap): the same.
    std::fs::write(&path, "{\"test_logloss\": 0.1}").unwrap();
    let out = run_local(&[
        "--epochs=-1".into(),
        format!("--summary-json={}", path.display()),
    ]);
    assert!(!out.status.success());
    let s = summary(&path);
    assert_eq!(s.as_object().map(|o| o.len()), Some(1), "{s}");
    assert!(s["error"].as_str().unwrap().contains("epochs"), "{s}");
}

/// Rows like a9a (UCI Adult in libsvm form): 14 categorical fields with a9a's level
/// counts, one-hot (123 binary features, 14 ones a row), skewed level frequencies, the
/// label drawn from a hidden logistic model over the levels (about a quarter positive).
/// Generated from `seed`, as `scripts/real-data` writes `adult_like`; `(label, ids)`.
fn adult_like(rows: usize, seed: u64) -> Vec<(u8, Vec<u64>)> {
    use pserv_engine::lr::rng::{approx_normal, SplitMix64};
    const SIZES: [u64; 14] = [5, 8, 5, 16, 7, 14, 6, 5, 2, 2, 2, 5, 41, 5];
    // The hidden model is the same for every seed: training and held-out rows agree.
    let mut model = SplitMix64::new(0xad17);
    let mut base = 1;
    let fields: Vec<(u64, Vec<f64>, Vec<f64>)> = SIZES
        .iter()
        .map(|&n| {
            let freq: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(1.2)).collect();
            let mut w: Vec<f64> = (0..n)
                .map(|_| 0.9 * approx_normal(model.next_u64()))
                .collect();
            // Centred (frequency-weighted): the bias below sets the positive rate.
            let mean =
                w.iter().zip(&freq).map(|(w, f)| w * f).sum::<f64>() / freq.iter().sum::<f64>();
            w.iter_mut().for_each(|x| *x -= mean);
            base += n;
            (base - n, freq, w)
        })
        .collect();
    let mut rng = SplitMix64::new(seed);
    (0..rows)
        .map(|_| {
            let (mut margin, mut ids) = (-1.6, Vec::new());
            for (first, freq, w) in &fields {
                let mut u = rng.next_f64() * freq.iter().sum::<f64>();
                let mut k = 0;
                while k + 1 < freq.len() && u >= freq[k] {
                    u -= freq[k];
                    k += 1;
                }
                ids.push(first + k as u64);
                margin += w[k];
            }
            let y = rng.next_f64() < 1.0 / (1.0 + (-margin).exp());
            (u8::from(y), ids)
        })
        .collect()
}

fn write_libsvm(path: &std::path::Path, rows: &[(u8, Vec<u64>)]) {
    let mut text = String::new();
    for (y, ids) in rows {
        text.push_str(&y.to_string());
        for i in ids {
            text.push_str(&format!(" {i}:1"));
        }
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A realistic file sorted by label (all 0s, then all 1s), trained with the defaults and
/// evaluated on a given held-out file: well above the majority class, the logloss well
/// below the constant predictor's (both computed from the data here). The old defaults
/// (plain SGD at lr 4, in file order) do clearly worse on the same files.
#[test]
fn a_label_sorted_file_trains_with_the_defaults() {
    let dir = Scratch::new("sorted");
    let mut train = adult_like(6000, 1);
    train.sort_by_key(|r| r.0);
    let test = adult_like(3000, 2);
    let (train_path, test_path) = (dir.path("train.svm"), dir.path("test.svm"));
    write_libsvm(&train_path, &train);
    write_libsvm(&test_path, &test);
    let positives = |rows: &[(u8, Vec<u64>)]| {
        rows.iter().filter(|r| r.0 == 1).count() as f64 / rows.len() as f64
    };
    let (p, q) = (positives(&train), positives(&test));
    let majority = q.max(1.0 - q);
    // Always predicting the training set's positive rate, scored on the held-out rows.
    let constant = -(q * p.ln() + (1.0 - q) * (1.0 - p).ln());
    let run = |name: &str, extra: &[&str]| {
        let path = dir.path(name);
        let mut args = vec![
            format!("--data={}", train_path.display()),
            format!("--test-data={}", test_path.display()),
            "--servers=2".into(),
            "--workers=2".into(),
            format!("--summary-json={}", path.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = run_local(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            summary(&path),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (s, stderr) = run("defaults.json", &[]);
    assert!(stderr.contains("--test-fraction is not used"), "{stderr}");
    assert_eq!(s["train_examples"], 6000, "all of --data trains: {s}");
    assert_eq!(s["test_examples"], 3000, "{s}");
    assert_eq!(
        (s["optimizer"].as_str(), s["shuffle"].as_str()),
        (Some("adagrad"), Some("epoch"))
    );
    let (loss, acc) = (
        s["test_logloss"].as_f64().unwrap(),
        s["test_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (s["majority_rate"].as_f64().unwrap() - majority).abs() < 1e-9,
        "{s}"
    );
    assert!(
        acc > majority + 0.05,
        "accuracy {acc}, majority class {majority}"
    );
    assert!(
        loss < constant * 0.8,
        "logloss {loss}, constant predictor {constant}"
    );
    let (old, _) = run("old.json", &["--optimizer=sgd", "--lr=4", "--shuffle=none"]);
    let old_loss = old["test_logloss"].as_f64().unwrap();
    assert!(
        old_loss > loss + 0.02,
        "SGD at lr 4 in file order: logloss {old_loss}, the defaults {loss}"
    );
}

/// The KKT filter on an L1 problem: most gradients are not sent, and the model is close
/// to the unfiltered one (same seed, sequential consistency: both runs deterministic).
#[test]
fn the_kkt_filter_skips_most_gradients_and_keeps_the_model() {
    let dir = Scratch::new("kkt");
    let run = |name: &str, extra: &[&str]| sequential_l1_run(&dir, name, extra, None);
    let plain = run("plain.json", &[]);
    let kkt = run("kkt.json", &["--filter=kkt"]);
    for w in ["filters_worker_0", "filters_worker_1"] {
        let f = &kkt[w][0];
        assert_eq!(f["filter"], "kkt");
        assert!(f["skipped_fraction"].as_f64().unwrap() > 0.5, "{kkt}");
    }
    let (a, b) = (
        plain["test_logloss"].as_f64().unwrap(),
        kkt["test_logloss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 0.05,
        "logloss {a} unfiltered, {b} with the KKT filter"
    );
    assert!(kkt["bytes_sent"].as_u64().unwrap() < plain["bytes_sent"].as_u64().unwrap());
}

/// The reducers that change no value: cached key lists and compressed values. Under
/// sequential consistency (deterministic runs) the model is the same to the last bit as
/// without them, with less traffic; the summary says how much each did. An answer filter
/// that rounds (bf16) costs little accuracy.
#[test]
fn key_caching_and_compression_cut_traffic_and_change_no_weight() {
    let dir = Scratch::new("reducers");
    // The same minibatches every epoch (`--shuffle once`), so key lists repeat: with the
    // default per-epoch order only a batch's push repeats its pull's list (hit rate 0.5).
    let run = |name: &str, extra: &[&str]| {
        let mut flags = vec!["--shuffle=once"];
        flags.extend_from_slice(extra);
        sequential_l1_run(&dir, name, &flags, None)
    };
    let plain = run("plain.json", &[]);
    let reduced = run("reduced.json", &["--key-cache", "--compress=zstd"]);
    assert_eq!(
        plain["test_logloss"], reduced["test_logloss"],
        "the same model: {plain} vs {reduced}"
    );
    assert_eq!(plain["nonzero_weights"], reduced["nonzero_weights"]);
    let total = |s: &serde_json::Value| {
        s["bytes_sent"].as_u64().unwrap() + s["bytes_received"].as_u64().unwrap()
    };
    assert!(
        total(&reduced) * 2 < total(&plain),
        "less than half the traffic: {} vs {}",
        total(&reduced),
        total(&plain)
    );
    for w in ["traffic_worker_0", "traffic_worker_1"] {
        let t = &reduced[w];
        let hit = t["key_cache"]["hit_rate"].as_f64().unwrap();
        assert!(hit > 0.5, "{w}: key cache hit rate {hit}");
        assert_eq!(t["key_cache"]["misses"], 0);
        let ratio = t["compression"]["ratio"].as_f64().unwrap();
        // An L1 model's weights are mostly 0: the pulled values shrink several-fold.
        assert!(ratio > 2.0, "{w}: compression ratio {ratio}");
        assert_eq!(t["compression"]["codec"], "zstd:3");
    }
    assert!(plain["traffic_worker_0"].get("key_cache").is_none());
    let bf16 = run("bf16.json", &["--pull-filter=bf16", "--compress=zstd"]);
    let (a, b) = (
        plain["test_logloss"].as_f64().unwrap(),
        bf16["test_logloss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 0.01,
        "logloss {a} exact, {b} with bf16 pulls"
    );
}

/// Key-cache misses under sequential consistency: servers that cache only 2000 keys
/// evict lists all the time, so named requests miss and are resent with their keys
/// (before the clock gate sees them); the model is still the model of the run without a
/// cache, to the last bit.
#[test]
fn key_cache_misses_under_sequential_consistency_change_no_weight() {
    let dir = Scratch::new("kc-misses");
    // The servers read their cache bound from the environment they inherit.
    let run = |name: &str, cache: Option<&str>| match cache {
        Some(keys) => sequential_l1_run(
            &dir,
            name,
            &["--key-cache"],
            Some(("PSERV_KEY_CACHE_KEYS", keys)),
        ),
        None => sequential_l1_run(&dir, name, &[], None),
    };
    let plain = run("plain.json", None);
    let small = run("small.json", Some("2000"));
    let kc = &small["traffic_worker_0"]["key_cache"];
    assert!(kc["misses"].as_u64().unwrap() > 0, "{kc}");
    assert!(kc["by_name"].as_u64().unwrap() > 0, "{kc}");
    assert!(
        small["key_cache_servers"]["evicted"].as_u64().unwrap() > 0,
        "{small}"
    );
    assert_eq!(plain["test_logloss"], small["test_logloss"]);
    assert_eq!(plain["nonzero_weights"], small["nonzero_weights"]);
}

/// The pids of `pid`'s children (those its main thread started).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: it runs no more).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Start a long `pserv local` (1 scheduler, 2 servers, 2 workers) and wait until all
/// five children run; returns the launcher (the caller waits for it) and their pids.
#[allow(clippy::zombie_processes)]
fn long_local_job() -> (std::process::Child, Vec<u32>) {
    let mut child = common::pserv_cmd()
        .arg("local")
        .args(["--examples=8000", "--features=30000", "--epochs=100000"])
        .args(["--servers=2", "--workers=2", "--timeout-secs=120"])
        .args(common::net_flags())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pserv runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let kids = children_of(child.id());
        if kids.len() >= 5 {
            // Let the workers register and start training.
            std::thread::sleep(Duration::from_millis(500));
            return (child, kids);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pserv local started {} of 5 processes in 30 s", kids.len());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_dead(pids: &[u32], limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while !pids.iter().all(|&p| is_dead(p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running {limit:?} after the launcher stopped: {:?}",
            pids.iter().filter(|&&p| !is_dead(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_signal_to_the_launcher_stops_every_child_and_removes_its_run_folder() {
    for (sig, name) in [("-TERM", "SIGTERM"), ("-INT", "SIGINT")] {
        let (mut launcher, kids) = long_local_job();
        let pid = launcher.id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = launcher.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = launcher.kill();
                panic!("pserv local still runs 20 s after {name}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        use std::io::Read;
        launcher
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success(), "{name}: exited with {status}");
        assert!(err.contains(&format!("stopped by {name}")), "{err}");
        // Every child had stopped by the time the launcher exited.
        wait_dead(&kids, Duration::from_millis(1));
        // And its run folder is gone.
        let prefix = format!("pserv-local-{pid}-");
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
    }
}

#[test]
fn children_die_with_a_launcher_that_is_sigkilled() {
    let (mut launcher, kids) = long_local_job();
    let pid = launcher.id();
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    wait_dead(&kids, Duration::from_secs(10));
    // A SIGKILLed launcher cannot remove its run folder: the test does.
    let prefix = format!("pserv-local-{pid}-");
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
