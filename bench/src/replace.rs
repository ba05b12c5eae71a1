//! A failed worker replaced in place (`replace`): how long after a SIGKILL the
//! replacement's first push is acknowledged, what the failure adds to the job's time, and
//! whether the model is the clean run's.
//!
//! Every run is `pserv local --servers 2 --workers 2 --consistency sequential
//! --replace-failed-workers` with the same job (this binary re-executed as `pserv`, see
//! [`local_summary`]). The runs alternate: a clean run, then a run with
//! `--kill-worker-after X` (the launcher SIGKILLs the last worker X seconds after the
//! workers started and starts `pserv worker --replace RANK` in its place), `--reps` pairs.
//! X is `--kill-after`, by default a third of the first clean run's training time
//! (`seconds`), so the kill lands mid-training.
//!
//! From each killed run's summary: `killed_worker_unix_ms` (when the kill struck) and
//! `replacement_worker_N.first_ack_unix_ms` (when the replacement's first push was
//! acknowledged); their difference is the replacement latency. The wall time of every
//! run is taken here (an [`Instant`] around the command); a killed run's extra time is its
//! wall time minus the median clean wall time. Under sequential consistency the
//! replacement redoes the failed worker's clocks exactly, so the held-out logloss must
//! equal the clean run's bit for bit. A run that fails (nonzero exit, a summary without
//! the keys) is counted and listed in the table with its reason, not dropped silently.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::Value;

use crate::error::BenchError;
use crate::machine::{load_average, wait_quiet, CpuTimes, Machine};
use crate::report::publish_section;
use crate::traffic::local_summary;

/// Flags of `pserv-bench replace`.
#[derive(Debug, Clone, Args)]
pub struct ReplaceArgs {
    /// Pairs of runs (one clean, one with a killed worker).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Seconds after the workers started at which the last worker is SIGKILLed (default:
    /// a third of the first clean run's training time).
    #[arg(long)]
    pub kill_after: Option<f64>,
    /// The job's flags (every run).
    #[arg(
        long,
        default_value = "--examples=120000 --epochs=4",
        allow_hyphen_values = true
    )]
    pub job: String,
    /// Before each run, wait up to this many seconds for the machine to be quiet.
    #[arg(long, default_value_t = 0)]
    pub wait_quiet: u64,
    /// Where to write the table.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Do not write RESULTS.md.
    #[arg(long)]
    pub no_write: bool,
}

/// The flags every run shares (before the job's own).
const BASE: [&str; 5] = [
    "--servers=2",
    "--workers=2",
    "--consistency=sequential",
    "--replace-failed-workers",
    "--timeout-secs=300",
];

/// The worker `--kill-worker-after` kills: the last of [`BASE`]'s two.
const KILLED_RANK: u32 = 1;

/// The kill time used when neither `--kill-after` nor a clean run gave one.
const FALLBACK_KILL_AFTER_S: f64 = 1.0;

/// What a killed run's summary adds.
#[derive(Clone, Debug, PartialEq)]
struct Replacement {
    /// `first_ack_unix_ms - killed_worker_unix_ms`.
    latency_ms: f64,
    /// The clock the replacement resumed after (0: the kill came before any step).
    resumed_after_clock: Option<u64>,
}

/// The figures of one successful run.
#[derive(Clone, Debug, PartialEq)]
struct Figures {
    /// The job's training time (`seconds`).
    seconds: f64,
    /// Held-out logloss (`test_logloss`).
    logloss: f64,
    /// Killed runs only.
    replacement: Option<Replacement>,
}

/// One run.
#[derive(Clone, Debug)]
struct Run {
    /// Seconds around the whole `pserv local` command.
    wall_s: f64,
    /// Cores' worth of CPU other processes used meanwhile.
    others_cores: f64,
    /// The figures, or why the run failed.
    result: Result<Figures, String>,
}

/// The figures of a summary; `killed`: the run had `--kill-worker-after`, so the kill and
/// the replacement's first acknowledged push must be there.
fn figures(v: &Value, killed: bool) -> Result<Figures, String> {
    let num = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("the summary has no `{k}`"))
    };
    let seconds = num("seconds")?;
    let logloss = num("test_logloss")?;
    let replacement = if killed {
        let kill_ms = v["killed_worker_unix_ms"]
            .as_u64()
            .ok_or("the summary has no `killed_worker_unix_ms` (the job ended before the kill?)")?;
        let key = format!("replacement_worker_{KILLED_RANK}");
        let r = &v[&key];
        if !r.is_object() {
            return Err(format!("the summary has no `{key}`"));
        }
        let ack_ms = r["first_ack_unix_ms"]
            .as_u64()
            .ok_or_else(|| format!("`{key}` has no `first_ack_unix_ms`"))?;
        Some(Replacement {
            latency_ms: ack_ms as f64 - kill_ms as f64,
            resumed_after_clock: r["resumed_after_clock"].as_u64(),
        })
    } else {
        None
    };
    Ok(Figures {
        seconds,
        logloss,
        replacement,
    })
}

/// One line of a failed command's error, fit for a table cell: its last non-empty line,
/// without terminal colours or pipes, at most 200 characters.
fn reason(e: &BenchError) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("failed");
    let mut out = pserv_engine::cli::local::strip_ansi(line).replace('|', "/");
    if out.chars().count() > 200 {
        out = out.chars().take(200).collect::<String>() + "...";
    }
    out
}

/// Run the job once, with the kill after `kill_after` seconds when given.
fn run_once(a: &ReplaceArgs, kill_after: Option<f64>, tag: &str) -> Run {
    if a.wait_quiet > 0 {
        wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
    }
    let mut args: Vec<String> = BASE.iter().map(|s| s.to_string()).collect();
    args.extend(a.job.split_whitespace().map(str::to_string));
    if let Some(x) = kill_after {
        args.push(format!("--kill-worker-after={x}"));
    }
    let cpu = CpuTimes::now();
    let t = Instant::now();
    let out = local_summary(&args, tag);
    let wall_s = t.elapsed().as_secs_f64();
    let others_cores = CpuTimes::now().others_since(&cpu);
    Run {
        wall_s,
        others_cores,
        result: out
            .map_err(|e| reason(&e))
            .and_then(|v| figures(&v, kill_after.is_some())),
    }
}

/// Median, max and min of `xs` (`None` when empty).
fn stats(xs: &[f64]) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[n - 1], v[0]))
}

/// The clean and killed runs, in pairs, and the kill time used.
struct Measured {
    clean: Vec<Run>,
    killed: Vec<Run>,
    kill_after: f64,
    /// Whether the kill time came from neither `--kill-after` nor a clean run.
    kill_after_fallback: bool,
}

/// Run `--reps` pairs (clean, killed), print the table and (unless told not to) write it
/// as section `replace`.
pub fn replace(a: &ReplaceArgs, command: String) -> Result<(), BenchError> {
    let machine = Machine::detect();
    let started = Instant::now();
    let reps = a.reps.max(1);
    let mut m = Measured {
        clean: Vec::new(),
        killed: Vec::new(),
        kill_after: a.kill_after.unwrap_or(FALLBACK_KILL_AFTER_S),
        kill_after_fallback: false,
    };
    for rep in 0..reps {
        let clean = run_once(a, None, &format!("replace-clean-{rep}"));
        match &clean.result {
            Ok(f) => eprintln!(
                "  pair {}: clean: {:.2} s wall, {:.2} s training, logloss {:.6}",
                rep + 1,
                clean.wall_s,
                f.seconds,
                f.logloss
            ),
            Err(e) => eprintln!("  pair {}: clean run failed: {e}", rep + 1),
        }
        if rep == 0 && a.kill_after.is_none() {
            match &clean.result {
                Ok(f) => m.kill_after = (f.seconds / 3.0 * 100.0).round() / 100.0,
                Err(_) => m.kill_after_fallback = true,
            }
        }
        m.clean.push(clean);
        let killed = run_once(a, Some(m.kill_after), &format!("replace-killed-{rep}"));
        match &killed.result {
            Ok(f) => eprintln!(
                "  pair {}: killed after {} s: {:.2} s wall, replacement's first push acknowledged {} ms after the kill, logloss {:.6}",
                rep + 1,
                m.kill_after,
                killed.wall_s,
                f.replacement.as_ref().map_or(0.0, |r| r.latency_ms),
                f.logloss
            ),
            Err(e) => eprintln!("  pair {}: killed run failed: {e}", rep + 1),
        }
        m.killed.push(killed);
    }
    let md = to_markdown(
        a,
        &m,
        &machine,
        &command,
        started.elapsed().as_secs(),
        &load_average(),
    );
    println!("{md}");
    if !a.no_write {
        publish_section(&a.results, "replace", &md)?;
    }
    Ok(())
}

fn fmt(x: f64, digits: usize) -> String {
    format!("{x:.digits$}")
}

/// One table row: `label | median | max | min | runs`.
fn row(label: &str, xs: &[f64], digits: usize, of: usize) -> String {
    match stats(xs) {
        Some((med, max, min)) => format!(
            "| {label} | {} | {} | {} | {} of {of} |\n",
            fmt(med, digits),
            fmt(max, digits),
            fmt(min, digits),
            xs.len()
        ),
        None => format!("| {label} | - | - | - | 0 of {of} |\n"),
    }
}

fn to_markdown(
    a: &ReplaceArgs,
    m: &Measured,
    machine: &Machine,
    command: &str,
    secs: u64,
    load_end: &str,
) -> String {
    let ok = |runs: &[Run]| -> Vec<(f64, Figures)> {
        runs.iter()
            .filter_map(|r| r.result.as_ref().ok().map(|f| (r.wall_s, f.clone())))
            .collect()
    };
    let (clean, killed) = (ok(&m.clean), ok(&m.killed));
    let n = m.killed.len();
    let clean_wall: Vec<f64> = clean.iter().map(|(w, _)| *w).collect();
    let killed_wall: Vec<f64> = killed.iter().map(|(w, _)| *w).collect();
    let clean_median = stats(&clean_wall).map(|s| s.0);
    let extra: Vec<f64> = match clean_median {
        Some(c) => killed_wall.iter().map(|w| w - c).collect(),
        None => Vec::new(),
    };
    let latency: Vec<f64> = killed
        .iter()
        .filter_map(|(_, f)| f.replacement.as_ref().map(|r| r.latency_ms))
        .collect();
    let resumed: Vec<f64> = killed
        .iter()
        .filter_map(|(_, f)| f.replacement.as_ref()?.resumed_after_clock)
        .map(|c| c as f64)
        .collect();
    // Each killed run against the clean run of its pair (or, where that one failed, the
    // first clean run that succeeded).
    let first_clean = clean.first().map(|(_, f)| f.logloss);
    let mut equal = 0;
    let mut compared = 0;
    for (i, k) in m.killed.iter().enumerate() {
        let Ok(k) = &k.result else { continue };
        let reference = m
            .clean
            .get(i)
            .and_then(|c| c.result.as_ref().ok())
            .map(|f| f.logloss)
            .or(first_clean);
        if let Some(c) = reference {
            compared += 1;
            if k.logloss.to_bits() == c.to_bits() {
                equal += 1;
            }
        }
    }
    let clean_agree = clean
        .iter()
        .all(|(_, f)| Some(f.logloss.to_bits()) == first_clean.map(f64::to_bits));
    let others: Vec<f64> = m
        .clean
        .iter()
        .chain(&m.killed)
        .map(|r| r.others_cores)
        .collect();

    let mut md = String::from(
        "## A failed worker replaced in place: `pserv local --replace-failed-workers`\n\n",
    );
    md.push_str(&format!(
        "Command: `{command}` ({secs} s). Machine: {}. Load average at the end: {load_end}; \
         other processes used a median {:.2} cores' worth of CPU during the runs.\n\n",
        machine.describe(),
        stats(&others).map_or(0.0, |s| s.0),
    ));
    md.push_str(&format!(
        "Every run: `pserv local {} {}`. {n} pair(s), alternating: a clean run, then the \
         same with `--kill-worker-after {}` ({}), which SIGKILLs worker {KILLED_RANK} that \
         long after the workers started; the launcher then starts `pserv worker --replace \
         {KILLED_RANK}` in its place. Wall time: the whole command, taken by the bench; \
         extra job time: a killed run's wall time minus the median clean wall time. The \
         latency is `replacement_worker_{KILLED_RANK}.first_ack_unix_ms - \
         killed_worker_unix_ms` from the job summary: the replacement's process start, its \
         registration with the scheduler, the scheduler asking each server for the failed \
         worker's clock (the resume point), connecting to the servers, loading the job's \
         data, and the first step's pull and push, acknowledged. Under sequential \
         consistency the replacement redoes the failed worker's clocks exactly, so the \
         held-out logloss must equal the clean run's bit for bit. The clock the \
         replacement resumed after is the failed worker's steps done when it died (0: the \
         kill came before any step).\n\n",
        BASE.join(" "),
        a.job,
        m.kill_after,
        if a.kill_after.is_some() {
            "given"
        } else if m.kill_after_fallback {
            "the first clean run failed, so a fixed value"
        } else {
            "a third of the first clean run's training time"
        },
    ));
    md.push_str("| figure | median | max | min | runs |\n|---|---:|---:|---:|---:|\n");
    md.push_str(&row(
        "kill -> replacement's first acknowledged push (ms)",
        &latency,
        0,
        n,
    ));
    md.push_str(&row(
        "extra job time vs the median clean wall time (s)",
        &extra,
        2,
        n,
    ));
    md.push_str(&row("clean wall time (s)", &clean_wall, 2, m.clean.len()));
    md.push_str(&row("killed wall time (s)", &killed_wall, 2, n));
    let secs_of = |runs: &[(f64, Figures)]| runs.iter().map(|(_, f)| f.seconds).collect::<Vec<_>>();
    md.push_str(&row(
        "clean training time, `seconds` (s)",
        &secs_of(&clean),
        2,
        m.clean.len(),
    ));
    md.push_str(&row(
        "killed training time, `seconds` (s)",
        &secs_of(&killed),
        2,
        n,
    ));
    md.push_str(&row("clock the replacement resumed after", &resumed, 0, n));
    md.push_str(&format!(
        "| held-out logloss equal to the clean run's | {equal} of {n} | | | {compared} compared |\n"
    ));
    md.push_str(&format!(
        "\nClean runs: {} of {} succeeded, logloss {}{}. Killed runs: {} of {n} succeeded; \
         in {} of them the kill came before the failed worker's first step (resumed after \
         clock 0: the workers were still starting).\n",
        clean.len(),
        m.clean.len(),
        first_clean.map_or("-".into(), |l| format!("{l:.6}")),
        if clean.len() > 1 {
            if clean_agree {
                " in every one"
            } else {
                " in the first (**the clean runs disagree**)"
            }
        } else {
            ""
        },
        killed.len(),
        resumed.iter().filter(|&&c| c == 0.0).count(),
    ));
    let failures: Vec<String> = m
        .clean
        .iter()
        .map(|r| ("clean", r))
        .zip(m.killed.iter().map(|r| ("killed", r)))
        .enumerate()
        .flat_map(|(i, (c, k))| [(i, c), (i, k)])
        .filter_map(|(i, (kind, r))| {
            r.result.as_ref().err().map(|e| {
                format!(
                    "- pair {}, {kind} run ({:.2} s): **failed**: {e}\n",
                    i + 1,
                    r.wall_s
                )
            })
        })
        .collect();
    if !failures.is_empty() {
        md.push_str("\nFailed runs:\n\n");
        for f in failures {
            md.push_str(&f);
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ReplaceArgs {
        ReplaceArgs {
            reps: 2,
            kill_after: None,
            job: "--examples=120000 --epochs=4".into(),
            wait_quiet: 0,
            results: PathBuf::new(),
            no_write: true,
        }
    }

    fn summary(killed: bool) -> Value {
        let mut v = serde_json::json!({"seconds": 3.0, "test_logloss": 0.4493329792924329});
        if killed {
            v["killed_worker_unix_ms"] = 1_000_000.into();
            v["replacement_worker_1"] = serde_json::json!({
                "resumed_after_clock": 256, "barrier": 0, "first_ack_unix_ms": 1_000_450
            });
        }
        v
    }

    #[test]
    fn summaries_parse_and_missing_keys_fail() {
        let f = figures(&summary(true), true).unwrap();
        assert_eq!(
            f.replacement,
            Some(Replacement {
                latency_ms: 450.0,
                resumed_after_clock: Some(256)
            })
        );
        assert!(figures(&summary(false), false)
            .unwrap()
            .replacement
            .is_none());
        let e = figures(&summary(false), true).unwrap_err();
        assert!(e.contains("killed_worker_unix_ms"), "{e}");
        let mut v = summary(true);
        v["replacement_worker_1"] = Value::Null;
        assert!(figures(&v, true)
            .unwrap_err()
            .contains("replacement_worker_1"));
        let mut v = summary(false);
        v.as_object_mut().unwrap().remove("test_logloss");
        assert!(figures(&v, false).is_err());
    }

    #[test]
    fn stats_and_reasons() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 3.0, 1.0)));
        assert_eq!(stats(&[4.0, 1.0]), Some((2.5, 4.0, 1.0)));
        assert_eq!(stats(&[]), None);
        let e =
            BenchError::Cluster("pserv local failed: x\n\u{1b}[2mError\u{1b}[0m: a | b\n\n".into());
        assert_eq!(reason(&e), "Error: a / b");
    }

    #[test]
    fn table_counts_failures_and_equal_loglosses() {
        let run = |wall_s, result| Run {
            wall_s,
            others_cores: 0.1,
            result,
        };
        let clean = figures(&summary(false), false).unwrap();
        let killed = figures(&summary(true), true).unwrap();
        let mut other = killed.clone();
        other.logloss += 1e-12;
        let m = Measured {
            clean: vec![
                run(3.0, Ok(clean.clone())),
                run(4.0, Ok(clean.clone())),
                run(0.5, Err("exit status 1".into())),
            ],
            killed: vec![
                run(4.0, Ok(killed.clone())),
                run(5.0, Ok(other)),
                run(4.5, Ok(killed)),
            ],
            kill_after: 1.0,
            kill_after_fallback: false,
        };
        let md = to_markdown(&args(), &m, &Machine::detect(), "cmd", 1, "0 0 0");
        assert!(
            md.contains(
                "| kill -> replacement's first acknowledged push (ms) | 450 | 450 | 450 | 3 of 3 |"
            ),
            "{md}"
        );
        // Median clean wall time 3.5 s.
        assert!(
            md.contains("| extra job time vs the median clean wall time (s) | 1.00 | 1.50 | 0.50 | 3 of 3 |"),
            "{md}"
        );
        assert!(
            md.contains("| clean wall time (s) | 3.50 | 4.00 | 3.00 | 2 of 3 |"),
            "{md}"
        );
        assert!(
            md.contains("| held-out logloss equal to the clean run's | 2 of 3 | | | 3 compared |"),
            "{md}"
        );
        assert!(
            md.contains("- pair 3, clean run (0.50 s): **failed**: exit status 1"),
            "{md}"
        );
    }
}
