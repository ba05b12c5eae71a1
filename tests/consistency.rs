//! Consistency models and server-side optimizers end to end: `pserv
//! local` runs scheduler, servers and workers as separate processes on 127.0.0.1.
//!
//! - Sequential (tau = 0): two runs with the same seed give bitwise-identical models,
//!   whatever the timing (event-loop count, a slowed worker).
//! - Bounded delay: with one worker slowed down, no worker's pull is ever answered from a
//!   state more than tau clocks behind it (from the workers' recorded clocks), and the
//!   bound was binding.
//! - FTRL with L1 gives a sparse model; AdaGrad trains below the majority-class loss.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use std::time::Instant;

use common::Scratch;

/// A small job: 2 servers, 3 workers, 4800 training examples (16 minibatches per worker
/// and epoch), 2 epochs.
const SMALL: [&str; 6] = [
    "--servers=2",
    "--workers=3",
    "--examples=6000",
    "--features=20000",
    "--epochs=2",
    "--seed=23",
];

/// Run `pserv local` with the small job, `net` and `extra`; returns its summary.
fn run_local(net: &[String], extra: &[String], summary: &Path) -> serde_json::Value {
    let started = Instant::now();
    let out = common::pserv_cmd()
        .arg("local")
        .args(SMALL)
        .args(net)
        .args(extra)
        .arg(format!("--summary-json={}", summary.display()))
        .arg("--timeout-secs=50")
        .output()
        .expect("pserv runs");
    assert!(
        out.status.success(),
        "pserv local {extra:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "pserv local {extra:?}: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    serde_json::from_str(&std::fs::read_to_string(summary).expect("summary written")).unwrap()
}

fn flag(name: &str, value: impl std::fmt::Display) -> String {
    format!("--{name}={value}")
}

fn num(s: &serde_json::Value, key: &str) -> f64 {
    s[key]
        .as_f64()
        .unwrap_or_else(|| panic!("summary has no number {key:?}: {s}"))
}

/// The logloss of always predicting the majority rate: what a model that learned nothing
/// about the features scores.
fn baseline_logloss(majority_rate: f64) -> f64 {
    let p = majority_rate;
    -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
}

/// Every `model-*.bin` of a dump directory, by file name.
fn model_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dump directory") {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("model-") && name.ends_with(".bin") {
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// A dump file's (key, weight) pairs: per key the u64 key then one f32, little-endian.
fn parse_model(bytes: &[u8]) -> Vec<(u64, f32)> {
    assert_eq!(
        bytes.len() % 12,
        0,
        "a model file holds whole (key, weight) records"
    );
    bytes
        .chunks_exact(12)
        .map(|r| {
            (
                u64::from_le_bytes(r[..8].try_into().unwrap()),
                f32::from_le_bytes(r[8..].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn sequential_runs_with_the_same_seed_give_bitwise_identical_models() {
    let dir = Scratch::new("seq");
    let (a, b, c) = (dir.path("a"), dir.path("b"), dir.path("eventual"));
    for d in [&a, &b, &c] {
        std::fs::create_dir_all(d).unwrap();
    }
    // lr 1: with three workers' gradients applied per step, the default 4 overshoots.
    let job = |extra: &[String], dump: &Path| {
        let mut v = vec![flag("lr", 1), flag("dump-model", dump.display())];
        v.extend_from_slice(extra);
        v
    };
    let seq = flag("consistency", "sequential");
    // Run A with every message over TCP; run B over shared memory, with one event loop
    // per process and worker 1 slowed down, so the transport and the interleaving of
    // messages differ. Both at once, to vary it more. The models must be the same bits.
    let (sa, sb) = std::thread::scope(|s| {
        let ra = s.spawn(|| {
            let mut net = common::base_net_flags();
            net.push("--transport=tcp".into());
            run_local(
                &net,
                &job(std::slice::from_ref(&seq), &a),
                &dir.path("a.json"),
            )
        });
        let rb = s.spawn(|| {
            run_local(
                &[
                    "--threads=1".into(),
                    "--pin-cores=false".into(),
                    "--transport=shm".into(),
                ],
                &job(&[seq.clone(), flag("slow-worker", "1:1")], &b),
                &dir.path("b.json"),
            )
        });
        (ra.join().unwrap(), rb.join().unwrap())
    });
    let (ma, mb) = (model_files(&a), model_files(&b));
    assert_eq!(
        ma.keys().collect::<Vec<_>>(),
        ["model-0.bin", "model-1.bin"],
        "one model file per server"
    );
    assert_eq!(ma.keys().collect::<Vec<_>>(), mb.keys().collect::<Vec<_>>());
    let mut keys = 0;
    let mut nonzero = 0;
    for (name, bytes) in &ma {
        let other = &mb[name];
        assert_eq!(bytes.len(), other.len(), "{name}: sizes differ");
        if let Some(i) = bytes.iter().zip(other).position(|(x, y)| x != y) {
            let rec = i / 12;
            panic!(
                "{name} differs at byte {i} (record {rec}): {:?} vs {:?}",
                parse_model(&bytes[rec * 12..rec * 12 + 12]),
                parse_model(&other[rec * 12..rec * 12 + 12])
            );
        }
        let m = parse_model(bytes);
        assert!(!m.is_empty(), "{name} is empty");
        assert!(
            m.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: keys in order"
        );
        assert!(
            m.iter().all(|(_, w)| w.is_finite()),
            "{name}: finite weights"
        );
        keys += m.len();
        nonzero += m.iter().filter(|(_, w)| *w != 0.0).count();
    }
    // Non-trivial: thousands of features trained, most of them away from zero.
    assert!(keys > 5000, "only {keys} keys stored");
    assert!(
        nonzero > keys / 2,
        "{nonzero} of {keys} weights are non-zero"
    );
    // Run A's messages all went over TCP, run B's over shared memory (each worker to the
    // scheduler and both servers at least), and nothing was refused.
    for (run, s, want_shm) in [("A", &sa, false), ("B", &sb, true)] {
        for w in 0..3 {
            let t = &s[format!("traffic_worker_{w}")];
            let shm = t["shm_connections"].as_u64().expect("shm_connections");
            assert_eq!(t["shm_refused"], 0, "run {run}, worker {w}: {t}");
            if want_shm {
                assert!(shm >= 3, "run {run}, worker {w}: {shm} shm connections");
            } else {
                assert_eq!(shm, 0, "run {run}, worker {w}: shm with --transport=tcp");
            }
        }
    }
    // The same model evaluates the same.
    assert_eq!(sa["test_logloss"], sb["test_logloss"]);
    assert!(num(&sa, "test_logloss") < baseline_logloss(num(&sa, "majority_rate")));

    // Control: eventual consistency with the same seed may apply pushes in any order, so
    // its weights may differ; it still trains the same features.
    run_local(
        &common::net_flags(),
        &job(&[flag("consistency", "eventual")], &c),
        &dir.path("c.json"),
    );
    let mc = model_files(&c);
    let mut differ = false;
    for (name, bytes) in &ma {
        let (x, y) = (parse_model(bytes), parse_model(&mc[name]));
        let keys_of = |m: &[(u64, f32)]| m.iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(
            keys_of(&x),
            keys_of(&y),
            "{name}: the same features are trained"
        );
        differ |= x != y;
    }
    eprintln!(
        "eventual model {} the sequential one",
        if differ { "differs from" } else { "equals" }
    );
}

#[test]
fn bounded_delay_keeps_every_worker_within_tau_of_the_slowest() {
    const TAU: u64 = 2;
    let dir = Scratch::new("bounded");
    let trace = dir.path("trace");
    let s = run_local(
        &common::net_flags(),
        &[
            flag("consistency", format!("bounded:{TAU}")),
            flag("slow-worker", "2:8"),
            flag("trace", trace.display()),
            flag("lr", 1),
        ],
        &dir.path("summary.json"),
    );
    // 4800 examples over 3 workers in minibatches of 100: 16 steps per epoch, 2 epochs.
    let steps = 32;
    let mut binding_fast = 0;
    for rank in 0..3 {
        let path = format!("{}.{rank}", trace.display());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let lines: Vec<(u64, u64)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                (
                    v["clock"].as_u64().expect("clock"),
                    v["server_clock"].as_u64().expect("server_clock"),
                )
            })
            .collect();
        assert_eq!(
            lines.len(),
            steps,
            "rank {rank}: one line per training pull"
        );
        let clocks: Vec<u64> = lines.iter().map(|l| l.0).collect();
        assert_eq!(
            clocks,
            (1..=steps as u64).collect::<Vec<_>>(),
            "rank {rank}"
        );
        for &(c, sc) in &lines {
            // The pull at clock c saw every worker's pushes up to c - tau - 1.
            assert!(
                sc + TAU + 1 >= c,
                "rank {rank} pulled at clock {c} while the slowest worker was at {sc} (tau {TAU})"
            );
            assert!(
                sc <= c,
                "rank {rank}: server clock {sc} ahead of the worker's {c}"
            );
        }
        // The server clock never goes back for one worker.
        assert!(
            lines.windows(2).all(|w| w[0].1 <= w[1].1),
            "rank {rank}: {lines:?}"
        );
        if rank != 2 {
            // Held back: answered exactly when the slow worker let it through.
            binding_fast += lines
                .iter()
                .filter(|&&(c, sc)| c > TAU + 1 && sc + TAU + 1 == c)
                .count();
        }
    }
    assert!(
        binding_fast >= steps / 2,
        "the bound was binding on only {binding_fast} of the fast workers' pulls"
    );
    let loss = num(&s, "test_logloss");
    assert!(
        loss.is_finite() && loss < baseline_logloss(num(&s, "majority_rate")),
        "{s}"
    );
    assert_eq!(s["consistency"], format!("bounded:{TAU}"));
}

#[test]
fn ftrl_with_l1_gives_a_sparse_model() {
    let dir = Scratch::new("ftrl");
    let ftrl = |l1: f64, name: &str| {
        run_local(
            &common::net_flags(),
            &[flag("optimizer", "ftrl"), flag("l1", l1)],
            &dir.path(name),
        )
    };
    let dense = ftrl(0.0, "dense.json");
    let sparse = ftrl(0.1, "sparse.json");
    let (nz, keys) = (num(&sparse, "nonzero_weights"), num(&sparse, "stored_keys"));
    assert!(keys > 1000.0, "{sparse}");
    // L1 zeroes almost every weight; without it almost none is zero.
    assert!(
        nz > 0.0 && nz < keys * 0.05,
        "{nz} of {keys} weights non-zero"
    );
    let (dnz, dkeys) = (num(&dense, "nonzero_weights"), num(&dense, "stored_keys"));
    assert!(dnz > dkeys * 0.9, "without L1: {dnz} of {dkeys} non-zero");
    // The few weights left still predict better than the majority class.
    let baseline = baseline_logloss(num(&sparse, "majority_rate"));
    assert!(num(&sparse, "test_logloss") < baseline, "{sparse}");
    assert_eq!(sparse["optimizer"], "ftrl");
}

#[test]
fn adagrad_trains_below_the_majority_class_loss() {
    let dir = Scratch::new("adagrad");
    let s = run_local(
        &common::net_flags(),
        &[flag("optimizer", "adagrad"), flag("lr", 0.5)],
        &dir.path("summary.json"),
    );
    let baseline = baseline_logloss(num(&s, "majority_rate"));
    let loss = num(&s, "test_logloss");
    assert!(
        loss < baseline - 0.05,
        "adagrad logloss {loss}, majority class {baseline}"
    );
    assert!(num(&s, "test_accuracy") > num(&s, "majority_rate"), "{s}");
    assert_eq!(s["optimizer"], "adagrad");
    // AdaGrad keeps no exact zeros: every stored key has a weight.
    assert_eq!(s["nonzero_weights"], s["stored_keys"]);
}
