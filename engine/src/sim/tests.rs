//! The simulation's seeds: many per run, in parallel; a failure names its replay line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::*;

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("PSERV_SIM_SEED") {
        return vec![s.parse().expect("PSERV_SIM_SEED is a number")];
    }
    let n = std::env::var("PSERV_SIM_SEEDS")
        .ok()
        .map(|v| v.parse().expect("PSERV_SIM_SEEDS is a number"))
        .unwrap_or(default);
    let first = std::env::var("PSERV_SIM_FIRST")
        .ok()
        .map(|v| v.parse().expect("PSERV_SIM_FIRST is a number"))
        .unwrap_or(1);
    (first..first + n).collect()
}

/// Run `list` on every core; returns the failures.
fn run_all(list: &[u64], mix: Mix) -> (Vec<String>, u64, u64) {
    let next = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let acked = AtomicU64::new(0);
    let faults = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&seed) = list.get(i) else {
                    return;
                };
                let run = std::panic::catch_unwind(|| run_seed(seed, mix));
                let run = run.unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(format!(
                        "seed {seed}: panicked: {what}\n  replay: {}",
                        super::replay_line(seed, mix)
                    ))
                });
                match run {
                    Ok(r) => {
                        acked.fetch_add(r.acked as u64, Ordering::Relaxed);
                        faults.fetch_add(r.faults.len() as u64, Ordering::Relaxed);
                        if list.len() == 1 {
                            eprintln!("seed {seed}: {r:?}");
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            });
        }
    });
    (
        failures.into_inner().unwrap(),
        acked.into_inner(),
        faults.into_inner(),
    )
}

/// Seeds of the checked mix that still fail: open findings, each with what it shows.
/// The run fails on any other failing seed, and on a seed listed here that passes
/// (fixed: take it off). All but 8090 start with a server cut off from the scheduler
/// (declared dead while it runs, then back) or with a scheduler restart.
const KNOWN_OPEN: &[(u64, &str)] = &[
    (
        1425,
        "a task fails for good on StaleEpoch: keys passed to a server whose hand-off never came (isolate, join, scheduler restart)",
    ),
    (
        1976,
        "an acknowledged push lost at a server that held it (leave twice, worker crash, isolate; a group-commit seed since 2026-12-08)",
    ),
    (
        2072,
        "at the end a settled head's replica lacks a push (worker crash, isolate, crash, split)",
    ),
    (
        2139,
        "at the end a settled head's replica lacks pushes (isolate, crash)",
    ),
    (
        3023,
        "at the end a settled head's replica lacks a push (isolate, crash, leave)",
    ),
    (
        3228,
        "an acknowledged push is missing on its key's final head (isolate, crash)",
    ),
    (
        4652,
        "a key's final chain has no live server (isolate twice, leave)",
    ),
    (
        5819,
        "at the end a settled head's replica lacks pushes (a group-commit seed since 2026-12-08)",
    ),
    (
        7617,
        "an acknowledged push lost at a server that held it (join, leave, late worker, scheduler restart)",
    ),
    (
        8090,
        "an acknowledged push missing on a replica of its acknowledged batch (leave, crash)",
    ),
];

/// The seed a failure report names.
fn seed_of(failure: &str) -> Option<u64> {
    failure
        .strip_prefix("seed ")?
        .split(':')
        .next()?
        .parse()
        .ok()
}

/// Run `n` seeds (unless the environment says otherwise) of `mix`; panics with the
/// failures not in `known`, and with the seeds of `known` that ran and passed.
fn run_mix(default: u64, mix: Mix, known: &[(u64, &str)]) {
    let list = seeds(default);
    let t = std::time::Instant::now();
    let (failures, acked, faults) = run_all(&list, mix);
    eprintln!(
        "{} seeds ({mix:?} faults) in {:?}: {acked} pushes acknowledged, {faults} faults injected, {} failed",
        list.len(),
        t.elapsed(),
        failures.len()
    );
    if std::env::var_os("PSERV_SIM_LIST").is_some() {
        for f in &failures {
            let config = f.lines().nth(1).unwrap_or("");
            let faults = config.split("faults: ").nth(1).unwrap_or("");
            let model = config
                .split("model: ")
                .nth(1)
                .and_then(|m| m.split(',').next())
                .unwrap_or("");
            eprintln!(
                "FAILED {} | {model} | {faults}",
                f.lines().next().unwrap_or("")
            );
        }
    }
    let is_known = |f: &String| seed_of(f).is_some_and(|s| known.iter().any(|(k, _)| *k == s));
    let (expected, unexpected): (Vec<&String>, Vec<&String>) =
        failures.iter().partition(|f| is_known(f));
    for (seed, what) in known {
        if list.contains(seed) && !expected.iter().any(|f| seed_of(f) == Some(*seed)) {
            panic!(
                "seed {seed} passes now (it was an open finding: {what}): take it off KNOWN_OPEN"
            );
        }
    }
    if !expected.is_empty() {
        eprintln!(
            "{} seeds failed as known open findings (KNOWN_OPEN)",
            expected.len()
        );
    }
    if let Some(first) = unexpected.first() {
        for f in unexpected.iter().take(5) {
            eprintln!("{f}");
        }
        panic!(
            "{} of {} seeds failed; the first: {first}",
            unexpected.len(),
            list.len()
        );
    }
    assert!(acked > 0, "the seeds acknowledged pushes");
}

/// 10,000 seeds of the checked fault mix: what CI runs.
#[test]
fn sim_seeds() {
    run_mix(10_000, Mix::Checked, KNOWN_OPEN);
}

/// Every fault under every consistency model. Ignored: it fails on the open finding
/// that a range changing head loses its clock-gate state (see [`Mix`]); run it with
/// `cargo test --release -p pserv-engine --lib sim::tests::sim_seeds_all_faults --
/// --ignored`.
#[test]
#[ignore = "open finding: the clock gate's state does not move with a range (see sim::Mix)"]
fn sim_seeds_all_faults() {
    run_mix(10_000, Mix::All, &[]);
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(7, Mix::All).unwrap();
    let b = run_seed(7, Mix::All).unwrap();
    assert_eq!(a.events, b.events);
    assert_eq!(a.finals, b.finals);
    assert_eq!(a.faults, b.faults);
}

#[test]
fn a_failure_free_run_acknowledges_every_push() {
    let cfg = SimConfig {
        faults: Vec::new(),
        ..SimConfig::draw(3, None)
    };
    let r = world::World::new(3, cfg.clone()).run().unwrap();
    let pushes = u64::from(cfg.workers) * cfg.iterations;
    assert_eq!(r.acked as u64, pushes, "{r:?}");
}
