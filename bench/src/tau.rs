//! The paper's bounded-delay experiment (OSDI'14, section 5.1, figure 13): the sparse
//! logistic-regression job for a range of maximal delays tau, several workers, one of them
//! slowed down, and for each tau the wall time to a target held-out logloss, the final
//! logloss and the time workers spent blocked.
//!
//! Every run is a whole `pserv local` cluster (scheduler, servers and workers as separate
//! processes), started by re-executing this binary as `pserv-bench pserv local ...` (the
//! `pserv` command line is embedded, see `pserv_engine::cli::app`). Each tau runs `reps` times;
//! the table shows medians.

use std::path::PathBuf;
use std::process::Command;

use clap::Args;

use crate::error::BenchError;
use crate::machine::Machine;
use crate::report::publish_section;

/// Flags of `pserv-bench tau-sweep`.
#[derive(Debug, Clone, Args)]
pub struct TauArgs {
    /// Maximal delays to run, comma-separated; `inf` is eventual consistency.
    #[arg(long, default_value = "0,1,2,4,8,16,inf")]
    pub taus: String,
    /// Servers.
    #[arg(long, default_value_t = 2)]
    pub servers: u32,
    /// Workers.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// Who is slowed down, as `pserv local --slow-worker` takes it: `RANK:MS` (that worker
    /// sleeps MS ms before every minibatch), `RANK:MS:P` (before a random share P of
    /// them), `*` for every worker, comma-separated.
    #[arg(long, default_value = "3:20:0.25")]
    pub slow: String,
    /// Epochs per run.
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// SGD learning rate of the servers' update rule.
    #[arg(long, default_value_t = 1.0)]
    pub lr: f64,
    /// The held-out logloss a run must reach ("time to target").
    #[arg(long, default_value_t = 0.55)]
    pub target: f64,
    /// Rank 0 evaluates the held-out logloss every this many minibatches.
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Runs per tau (the table shows medians).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Extra arguments for `pserv local` (e.g. `--examples=50000`), space-separated.
    #[arg(long, default_value = "")]
    pub extra: String,
    /// Fewer taus, one run each, one epoch: a smoke test of the sweep.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the table (section `tau-sweep`, or `tau-sweep-quick`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Do not write RESULTS.md.
    #[arg(long)]
    pub no_write: bool,
    /// The RESULTS.md section to write (default `tau-sweep`, or `tau-sweep-quick`).
    #[arg(long)]
    pub section: Option<String>,
}

/// One run's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    to_target: Option<f64>,
    final_logloss: f64,
    seconds: f64,
    pull_wait: f64,
    gate_held: f64,
    examples_per_sec: f64,
}

/// A consistency flag for tau.
fn consistency(tau: Option<u64>) -> String {
    match tau {
        None => "eventual".into(),
        Some(0) => "sequential".into(),
        Some(t) => format!("bounded:{t}"),
    }
}

fn parse_taus(s: &str) -> Result<Vec<Option<u64>>, BenchError> {
    s.split(',')
        .map(|t| match t.trim() {
            "inf" | "infinity" => Ok(None),
            n => n.parse().map(Some).map_err(|_| {
                BenchError::Cluster(format!("--taus: {n:?} is not a whole number or inf"))
            }),
        })
        .collect()
}

fn run_one(a: &TauArgs, tau: Option<u64>, rep: usize) -> Result<Outcome, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding the bench binary", e))?;
    let dir = std::env::temp_dir().join(format!("pserv-tau-{}-{rep}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("creating a scratch dir", e))?;
    let summary = dir.join("summary.json");
    let _ = std::fs::remove_file(&summary);
    let epochs = if a.quick { 1 } else { a.epochs };
    let mut cmd = Command::new(&exe);
    cmd.arg("pserv")
        .arg("local")
        .arg(format!("--servers={}", a.servers))
        .arg(format!("--workers={}", a.workers))
        .arg(format!("--epochs={epochs}"))
        // Plain SGD on the servers and a fixed data order, as the recorded tables were
        // measured (the job's defaults are AdaGrad and a per-epoch shuffle).
        .arg("--optimizer=sgd")
        .arg("--shuffle=once")
        .arg(format!("--lr={}", a.lr))
        .arg(format!("--consistency={}", consistency(tau)))
        .arg(format!("--slow-worker={}", a.slow))
        .arg(format!("--eval-every={}", a.eval_every))
        .arg(format!("--target-logloss={}", a.target))
        .arg(format!("--summary-json={}", summary.display()))
        .arg("--timeout-secs=600")
        .args(a.extra.split_whitespace());
    let out = cmd
        .output()
        .map_err(|e| BenchError::io("running pserv local", e))?;
    if !out.status.success() {
        return Err(BenchError::Cluster(format!(
            "pserv local with tau {} failed: {}",
            consistency(tau),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = std::fs::read_to_string(&summary)
        .map_err(|e| BenchError::io(format!("reading {}", summary.display()), e))?;
    let _ = std::fs::remove_dir_all(&dir);
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| BenchError::Cluster(format!("bad summary JSON: {e}")))?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let worker_seconds = num("worker_seconds").unwrap_or(0.0).max(1e-9);
    Ok(Outcome {
        to_target: num("seconds_to_target"),
        final_logloss: num("test_logloss")
            .ok_or_else(|| BenchError::Cluster("summary without test_logloss".into()))?,
        seconds: num("seconds").unwrap_or(0.0),
        pull_wait: num("blocked_fraction").unwrap_or(0.0),
        // Each pull is split over the servers and held on each in parallel.
        gate_held: num("gate_held_seconds").unwrap_or(0.0)
            / f64::from(a.servers.max(1))
            / worker_seconds,
        examples_per_sec: num("examples_per_sec").unwrap_or(0.0),
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        f64::NAN
    } else {
        xs[xs.len() / 2]
    }
}

/// Run the sweep, print the table and (unless told not to) write it to RESULTS.md.
pub fn tau_sweep(a: &TauArgs, command: String) -> Result<(), BenchError> {
    if a.workers < 2 {
        return Err(BenchError::Cluster(
            "--workers must be at least 2 (one of them is slowed)".into(),
        ));
    }
    let machine = Machine::detect();
    let mut taus = parse_taus(&a.taus)?;
    if a.quick {
        taus.retain(|t| matches!(t, Some(0) | Some(4) | None));
    }
    let reps = if a.quick { 1 } else { a.reps.max(1) };
    let mut rows = Vec::new();
    for &tau in &taus {
        let mut outs = Vec::new();
        for rep in 0..reps {
            let o = run_one(a, tau, rep)?;
            eprintln!(
                "tau {:>10} run {}: to target {}, final logloss {:.4}, {:.2} s, pull wait {:.0}%, gate held {:.0}%",
                consistency(tau),
                rep + 1,
                o.to_target.map_or("-".into(), |t| format!("{t:.2} s")),
                o.final_logloss,
                o.seconds,
                100.0 * o.pull_wait,
                100.0 * o.gate_held
            );
            outs.push(o);
        }
        rows.push((tau, outs));
    }
    let mut md = String::new();
    let title = if a.quick { " (quick run)" } else { "" };
    md.push_str(&format!(
        "## Bounded delay: time to a target logloss vs tau{title}\n\n"
    ));
    md.push_str(&format!("Command: `{command}`  \n"));
    md.push_str(&format!(
        "Machine: {} cores, {}, kernel {}, {} (load {})  \n",
        machine.cores, machine.cpu_model, machine.kernel, machine.date, machine.load
    ));
    md.push_str(&format!(
        "Job: sparse logistic regression (`pserv local` defaults for the data), {} servers, {} workers, slowed by `--slow-worker {}`, {} epoch(s), server SGD lr {}, target held-out logloss {}, rank 0 evaluates every {} minibatches; {} run(s) per tau, medians shown (time to target: median over the runs that reached it).\n\n",
        a.servers,
        a.workers,
        a.slow,
        if a.quick { 1 } else { a.epochs },
        a.lr,
        a.target,
        a.eval_every,
        reps
    ));
    md.push_str("| tau | reached target | time to target (s) | final logloss | run time (s) | examples/s | pull wait (share of worker time) | held by the clock gate (share) |\n");
    md.push_str("|---|---|---|---|---|---|---|---|\n");
    for (tau, outs) in &rows {
        let reached: Vec<f64> = outs.iter().filter_map(|o| o.to_target).collect();
        let n = outs.len();
        md.push_str(&format!(
            "| {} | {}/{} | {} | {:.4} | {:.2} | {:.0} | {:.0}% | {:.0}% |\n",
            tau.map_or("inf (eventual)".into(), |t| if t == 0 {
                "0 (sequential)".into()
            } else {
                t.to_string()
            }),
            reached.len(),
            n,
            if reached.is_empty() {
                "not reached".into()
            } else {
                format!("{:.2}", median(reached.clone()))
            },
            median(outs.iter().map(|o| o.final_logloss).collect()),
            median(outs.iter().map(|o| o.seconds).collect()),
            median(outs.iter().map(|o| o.examples_per_sec).collect()),
            100.0 * median(outs.iter().map(|o| o.pull_wait).collect()),
            100.0 * median(outs.iter().map(|o| o.gate_held).collect()),
        ));
    }
    md.push_str("\n\"Pull wait\" is the share of the workers' time spent waiting for pull answers (round trips included; the eventual row is the round-trip floor). \"Held by the clock gate\" is the time the servers held requests (pulls until the slowest worker's clock allowed them; under sequential consistency also pushes until their turn in (clock, rank) order on their key ranges), per server, as a share of the workers' time.\n");
    println!("{md}");
    if !a.no_write {
        let default = if a.quick {
            "tau-sweep-quick"
        } else {
            "tau-sweep"
        };
        publish_section(&a.results, a.section.as_deref().unwrap_or(default), &md)?;
    }
    Ok(())
}
