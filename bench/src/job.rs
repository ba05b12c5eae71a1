//! The main job against the single-process baseline (`job`): the same SGD on the same
//! data trained in this process (no servers, no network: [`lr::train_single_process`]),
//! then `pserv local --servers 2 --workers 2` over `--transport tcp`, over shared
//! memory (`--transport shm`) and, where the bench is built with its `rdma` feature and a
//! device is usable, over RDMA verbs (`--transport rdma --rdma-messages=true`: every
//! message over queue pairs), each without replication (K=0, `--replicas=0`)
//! and with one replica (K=1), and once with `pserv local`'s own defaults. Without rdma
//! the table says in one line why (`rdma: not built`, `rdma: no device (why)`). Every
//! tcp, shm and rdma run checks from its summary (`traffic_worker_N`) that both workers'
//! messages went over its path, and fails otherwise; a run on the software device of
//! `sys/softrdma` writes its own section (`job-softrdma`), never `job`.
//!
//! Every distributed row but the last runs `--optimizer=sgd --shuffle=once`: the servers
//! apply `w -= lr * g`, the rows are shuffled once (by the job's seed) and not again per
//! epoch, exactly what the single-process trainer does, with the same data, epochs,
//! minibatch size and learning rate (the job's flags, parsed by the job's own parser), so
//! the held-out logloss and accuracy of every row can be read side by side. The last row
//! (`pserv local` defaults: AdaGrad, reshuffled per epoch) is the job as a user starts it.
//!
//! The rows run interleaved, `--reps` rounds of all of them, so drift on the shared
//! machine hits every row alike; each row reports the median and the spread. The
//! single-process time covers training only (the minibatches prepared and the epochs
//! run; no evaluation), the harder comparison for pserv, whose `examples_per_sec` (from
//! `--summary-json`) is over the workers' whole training loop, per-epoch barriers and the
//! held-out evaluation included.
//!
//! [`lr::train_single_process`]: pserv_engine::lr::train_single_process

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::Value;

use crate::error::BenchError;
use crate::machine::{load_average, wait_quiet, CpuTimes, Machine};
use crate::msgpath::{check_summary, section_name, MsgPath, RdmaAvailability};
use crate::report::publish_section;
use crate::traffic::local_summary;

/// Flags of `pserv-bench job`.
#[derive(Debug, Clone, Args)]
pub struct JobBenchArgs {
    /// A smaller job (`--examples=30000`), one round (a smoke run of under 30 s; the
    /// section is `job-quick`, or `job-softrdma-quick` on the software RDMA device).
    #[arg(long)]
    pub quick: bool,
    /// Rounds of every row (the median is kept; default 3, 1 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Flags passed to the job everywhere (single process and `pserv local`), e.g.
    /// `--examples=50000 --epochs=2`.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub extra: String,
    /// Before each run, wait up to this many seconds for the machine to be quiet.
    #[arg(long, default_value_t = 0)]
    pub wait_quiet: u64,
    /// Where to write the tables.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Do not write RESULTS.md.
    #[arg(long)]
    pub no_write: bool,
    /// The RESULTS.md section to write (default `job`, `job-quick`; on the software RDMA
    /// device `job-softrdma`, `job-softrdma-quick`).
    #[arg(long)]
    pub section: Option<String>,
}

impl JobBenchArgs {
    /// The job flags every row shares.
    fn job_flags(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if self.quick {
            v.push("--examples=30000".into());
        }
        v.extend(self.extra.split_whitespace().map(str::to_string));
        v
    }

    fn reps(&self) -> usize {
        self.reps.unwrap_or(if self.quick { 1 } else { 3 }).max(1)
    }
}

/// The flags that make `pserv local` run the single-process trainer's algorithm.
const SAME_SGD: [&str; 2] = ["--optimizer=sgd", "--shuffle=once"];

/// One distributed configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    /// `None`: `pserv local`'s default transport.
    transport: Option<&'static str>,
    /// `None`: `pserv local`'s default replication.
    replicas: Option<u32>,
    /// Whether the row runs [`SAME_SGD`] (else the job's defaults).
    same_sgd: bool,
}

impl Config {
    fn flags(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if self.same_sgd {
            v.extend(SAME_SGD.iter().map(|s| s.to_string()));
        }
        if let Some(t) = self.transport {
            v.push(format!("--transport={t}"));
            if t == "rdma" {
                // `pserv local`'s default, said: messages over queue pairs too.
                v.push("--rdma-messages=true".into());
            }
        }
        if let Some(k) = self.replicas {
            v.push(format!("--replicas={k}"));
        }
        v
    }

    fn label(&self) -> String {
        match (self.transport, self.replicas, self.same_sgd) {
            (Some(t), Some(k), true) => format!("{t}, K={k}"),
            _ if !self.same_sgd => "`pserv local` defaults".into(),
            _ => self.flags().join(" "),
        }
    }

    /// The message path a run of this row must show in its summary; `None` (the
    /// defaults row): not checked.
    fn path(&self) -> Option<MsgPath> {
        match self.transport? {
            "tcp" => Some(MsgPath::Tcp),
            "shm" => Some(MsgPath::Shm),
            "rdma" => Some(MsgPath::Rdma),
            _ => None,
        }
    }

    fn tag(&self) -> String {
        format!(
            "job-{}-k{}-{}",
            self.transport.unwrap_or("default"),
            self.replicas.map_or("d".into(), |k| k.to_string()),
            if self.same_sgd { "sgd" } else { "defaults" }
        )
    }
}

/// The distributed rows, in table order (the rdma ones when `rdma`).
fn configs(rdma: bool) -> Vec<Config> {
    let mut v = Vec::new();
    let transports: &[&'static str] = if rdma {
        &["tcp", "shm", "rdma"]
    } else {
        &["tcp", "shm"]
    };
    for &transport in transports {
        for replicas in [0, 1] {
            v.push(Config {
                transport: Some(transport),
                replicas: Some(replicas),
                same_sgd: true,
            });
        }
    }
    v.push(Config {
        transport: None,
        replicas: None,
        same_sgd: false,
    });
    v
}

/// One run of one row.
#[derive(Clone, Debug, Default)]
struct Run {
    examples_per_s: f64,
    logloss: Option<f64>,
    accuracy: Option<f64>,
    /// Share of the workers' time spent waiting for pulls.
    blocked_fraction: Option<f64>,
    /// The job's wall time (seconds of its training loop).
    seconds: f64,
    /// Sum over workers of their training-loop seconds.
    worker_seconds: Option<f64>,
    /// Examples trained (over all workers and epochs).
    examples: f64,
    /// Cores' worth of CPU this run used (its processes), and other processes used.
    cores_own: f64,
    cores_others: f64,
}

/// All runs of one row.
#[derive(Clone, Debug)]
struct Row {
    label: String,
    /// `(transport, replicas)` for the distributed rows.
    config: Option<Config>,
    runs: Vec<Run>,
}

impl Row {
    /// The run with the median examples per second.
    fn median(&self) -> &Run {
        let mut idx: Vec<usize> = (0..self.runs.len()).collect();
        idx.sort_by(|&a, &b| {
            self.runs[a]
                .examples_per_s
                .total_cmp(&self.runs[b].examples_per_s)
        });
        &self.runs[idx[idx.len() / 2]]
    }

    fn spread(&self) -> (f64, f64) {
        let it = self.runs.iter().map(|r| r.examples_per_s);
        (
            it.clone().fold(f64::INFINITY, f64::min),
            it.fold(0.0, f64::max),
        )
    }
}

/// Parse the job's flags with the job's own parser.
fn job_args(flags: &[String]) -> Result<pserv_engine::job::JobArgs, BenchError> {
    #[derive(clap::Parser)]
    struct J {
        #[command(flatten)]
        job: pserv_engine::job::JobArgs,
    }
    let argv = std::iter::once("job".to_string()).chain(flags.iter().cloned());
    <J as clap::Parser>::try_parse_from(argv)
        .map(|j| j.job)
        .map_err(|e| BenchError::Cluster(format!("the job's flags {flags:?}: {e}")))
}

/// The single-process SGD with the job's flags and [`SAME_SGD`].
fn single_process(flags: &[String]) -> Result<Run, BenchError> {
    let mut all: Vec<String> = SAME_SGD.iter().map(|s| s.to_string()).collect();
    all.extend(flags.iter().cloned());
    let job = job_args(&all)?;
    let (train, test) = job.load_data()?;
    let params = job.sgd_params();
    let cpu = CpuTimes::now();
    let t = Instant::now();
    let (model, _) = pserv_engine::lr::train_single_process(&train, &params, None);
    let secs = t.elapsed().as_secs_f64();
    let cpu_end = CpuTimes::now();
    let eval = model.evaluate(&test);
    let examples = (train.len() * params.epochs) as f64;
    Ok(Run {
        examples_per_s: examples / secs,
        logloss: Some(eval.logloss),
        accuracy: Some(eval.accuracy),
        blocked_fraction: None,
        seconds: secs,
        worker_seconds: None,
        examples,
        cores_own: own_cores(&cpu, &cpu_end),
        cores_others: cpu_end.others_since(&cpu),
    })
}

/// Cores' worth of CPU this process (and its reaped children) used between the readings.
fn own_cores(a: &CpuTimes, b: &CpuTimes) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    b.own.saturating_sub(a.own) as f64 / crate::machine::TICKS_PER_S / secs
}

/// One `pserv local` run of `config`.
fn distributed(config: Config, flags: &[String]) -> Result<Run, BenchError> {
    let mut args: Vec<String> = vec!["--servers=2".into(), "--workers=2".into()];
    args.extend(config.flags());
    args.extend(flags.iter().cloned());
    args.push("--timeout-secs=600".into());
    let cpu = CpuTimes::now();
    let v = local_summary(&args, &config.tag())?;
    let cpu_end = CpuTimes::now();
    if let Some(path) = config.path() {
        // The scheduler and both servers at least.
        check_summary(&v, 2, path, 3).map_err(|e| {
            BenchError::WrongAnswer(format!("the job {}: {e}", config.flags().join(" ")))
        })?;
    }
    Ok(run_from_summary(
        &v,
        own_cores(&cpu, &cpu_end),
        cpu_end.others_since(&cpu),
    ))
}

fn run_from_summary(v: &Value, cores_own: f64, cores_others: f64) -> Run {
    Run {
        examples_per_s: v["examples_per_sec"].as_f64().unwrap_or(0.0),
        logloss: v["test_logloss"].as_f64(),
        accuracy: v["test_accuracy"].as_f64(),
        blocked_fraction: v["blocked_fraction"].as_f64(),
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        worker_seconds: v["worker_seconds"].as_f64(),
        examples: v["examples"].as_f64().unwrap_or(0.0),
        cores_own,
        cores_others,
    }
}

/// Run every row `--reps` times, interleaved; print the table and (unless told not to)
/// write it.
pub fn job(a: &JobBenchArgs, command: String) -> Result<(), BenchError> {
    let machine = Machine::detect();
    let rdma = RdmaAvailability::detect();
    println!("{}", rdma.line());
    let started = Instant::now();
    let flags = a.job_flags();
    let mut rows: Vec<Row> = std::iter::once(Row {
        label: "single process (`lr::train_single_process`)".into(),
        config: None,
        runs: Vec::new(),
    })
    .chain(configs(rdma.usable()).into_iter().map(|c| Row {
        label: c.label(),
        config: Some(c),
        runs: Vec::new(),
    }))
    .collect();
    for rep in 0..a.reps() {
        for row in rows.iter_mut() {
            if a.wait_quiet > 0 {
                wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
            }
            let run = match row.config {
                None => single_process(&flags)?,
                Some(c) => distributed(c, &flags)?,
            };
            eprintln!(
                "  round {}: {}: {:.0} examples/s (logloss {})",
                rep + 1,
                row.label,
                run.examples_per_s,
                run.logloss.map_or("-".into(), |l| format!("{l:.4}"))
            );
            row.runs.push(run);
        }
    }
    let md = to_markdown(
        &rows,
        &flags,
        &rdma,
        &machine,
        &command,
        started.elapsed().as_secs(),
    );
    println!("{md}");
    if !a.no_write {
        let section = section_name("job", a.quick, rdma.software(), a.section.as_deref());
        publish_section(&a.results, &section, &md)?;
    }
    Ok(())
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn to_markdown(
    rows: &[Row],
    flags: &[String],
    rdma: &RdmaAvailability,
    machine: &Machine,
    command: &str,
    secs: u64,
) -> String {
    let reps = rows.first().map_or(0, |r| r.runs.len());
    let with_rdma = rows
        .iter()
        .any(|r| r.config.is_some_and(|c| c.transport == Some("rdma")));
    let mut md = String::from(
        "## The main job: `pserv local --servers 2 --workers 2` against the single-process SGD\n\n",
    );
    if with_rdma && rdma.software() {
        md.push_str(&format!(
            "### {}\n\nThe rdma rows ran on the software RDMA device of `sys/softrdma` \
             (`scripts/soft-rdma`): a replacement libibverbs whose NIC is a progress thread per \
             process moving data over Unix sockets. They show that the job runs with every \
             message over verbs queue pairs (its sparse pushes and pulls open no one-sided \
             window) and learns as over tcp and shm (held-out logloss and accuracy); their \
             examples per second say nothing about RDMA hardware, where the same command \
             prints the real table. (`pserv local` defaults: `--transport auto`, messages \
             over shared memory on one host, device or not.)\n\n",
            crate::msgpath::SOFTWARE_HEADING
        ));
    }
    md.push_str(&format!(
        "Command: `{command}` ({secs} s). Machine: {}. Load average at the end: {}.\n\n",
        machine.describe(),
        load_average()
    ));
    md.push_str(&format!(
        "The job's flags everywhere: `{}` (the job's defaults otherwise: its synthetic data, \
         3 epochs, minibatches of 100). The single process and every row but the last run \
         `{}` (the same updates, rows in the same order, the same learning rate); the last \
         row is `pserv local --servers 2 --workers 2` as a user starts it. {reps} round(s) \
         of all rows, interleaved; examples/s is the median (spread: min-max over the \
         rounds). The single-process time is training only; pserv's is its workers' whole \
         training loop (barriers and the held-out evaluation after each epoch included). \
         `seconds`: the timed span (median run). `blocked`: share of the workers' time spent waiting for pulls; `compute share`: \
         the time the single process needs for the same examples, over the workers' summed \
         time (the rest is waiting, messaging and the servers' share of the two cores). \
         CPU: cores' worth used by the run's processes / by other processes meanwhile. \
         Every tcp, shm{} run checked from its summary's `traffic_worker_N` that both \
         workers' messages took its path (tcp: no connection moved; otherwise at least the \
         scheduler's and both servers' connections moved, none refused).\n\n",
        if flags.is_empty() {
            "(none)".to_string()
        } else {
            flags.join(" ")
        },
        SAME_SGD.join(" "),
        if with_rdma {
            " and rdma (`--transport rdma --rdma-messages=true`: messages over verbs queue pairs)"
        } else {
            ""
        }
    ));
    md.push_str(
        "| run | examples/s | spread | x single process | K=1 / K=0 | held-out logloss | accuracy | seconds | blocked | compute share | CPU own / others |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let single = rows
        .iter()
        .find(|r| r.config.is_none())
        .map(|r| r.median().examples_per_s)
        .filter(|&e| e > 0.0);
    let eps_of = |transport: &str, k: u32| {
        rows.iter()
            .find(|r| {
                r.config.is_some_and(|c| {
                    c.same_sgd && c.transport == Some(transport) && c.replicas == Some(k)
                })
            })
            .map(|r| r.median().examples_per_s)
    };
    for r in rows {
        let m = r.median();
        let (lo, hi) = r.spread();
        let k_ratio = match r.config {
            Some(Config {
                transport: Some(t),
                replicas: Some(1),
                same_sgd: true,
            }) => eps_of(t, 0)
                .filter(|&e| e > 0.0)
                .map(|k0| format!("{:.2}x", m.examples_per_s / k0)),
            _ => None,
        };
        let compute_share = match (single, m.worker_seconds) {
            (Some(s), Some(w)) if w > 0.0 && r.config.is_some() => Some(m.examples / s / w * 100.0),
            _ => None,
        };
        md.push_str(&format!(
            "| {} | {:.0} | {:.0}-{:.0} | {} | {} | {} | {} | {:.2} | {} | {} | {:.2} / {:.2} |\n",
            r.label,
            m.examples_per_s,
            lo,
            hi,
            single.map_or("-".into(), |s| format!("{:.2}x", m.examples_per_s / s)),
            k_ratio.unwrap_or_else(|| "-".into()),
            opt(m.logloss, 4),
            opt(m.accuracy, 4),
            m.seconds,
            m.blocked_fraction
                .map_or("-".into(), |b| format!("{:.0}%", b * 100.0)),
            compute_share.map_or("-".into(), |c| format!("{c:.0}%")),
            m.cores_own,
            m.cores_others,
        ));
    }
    if !with_rdma {
        md.push_str(&format!("\n{}\n", rdma.line()));
    }
    if with_rdma && rdma.software() {
        // No speed goal is read off a run that shares its cores with the software device.
        md.push_str(
            "\nNo goal is read off this run (the software device's progress threads share the \
             cores with every row); the `job` section has them.\n",
        );
    } else {
        md.push_str(&goals(rows, single, &eps_of, with_rdma));
    }
    md
}

/// The goals against this run (the rdma one when `rdma`).
fn goals(
    rows: &[Row],
    single: Option<f64>,
    eps_of: &dyn Fn(&str, u32) -> Option<f64>,
    rdma: bool,
) -> String {
    let mut md = String::from("\n| goal | measured | met |\n|---|---:|---|\n");
    let verdict = |x: f64, goal: f64| {
        if x >= goal {
            "yes".to_string()
        } else {
            format!("**no** ({:.0}% of the goal)", x / goal * 100.0)
        }
    };
    let default = rows
        .iter()
        .find(|r| r.config.is_some_and(|c| !c.same_sgd))
        .map(|r| r.median().examples_per_s);
    if let (Some(d), Some(s)) = (default, single) {
        md.push_str(&format!(
            "| `pserv local` defaults >= 0.5x single process | {:.2}x | {} |\n",
            d / s,
            verdict(d / s, 0.5)
        ));
    }
    let transports: &[&str] = if rdma {
        &["tcp", "shm", "rdma"]
    } else {
        &["tcp", "shm"]
    };
    for &t in transports {
        if let (Some(k1), Some(k0)) = (eps_of(t, 1), eps_of(t, 0)) {
            if k0 > 0.0 {
                md.push_str(&format!(
                    "| {t}: K=1 >= 0.6x K=0 | {:.2}x | {} |\n",
                    k1 / k0,
                    verdict(k1 / k0, 0.6)
                ));
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(eps: f64) -> Run {
        Run {
            examples_per_s: eps,
            examples: 1000.0,
            worker_seconds: Some(2.0),
            ..Run::default()
        }
    }

    #[test]
    fn flags_match_the_single_process_and_parse() {
        let c = configs(false);
        assert_eq!(c.len(), 5);
        for cfg in &c[..4] {
            let f = cfg.flags();
            assert!(f.starts_with(&SAME_SGD.map(String::from)), "{f:?}");
            let j = job_args(&f[..SAME_SGD.len()]).unwrap();
            assert!(matches!(
                j.update_spec(),
                pserv_engine::update::UpdateSpec::Sgd { .. }
            ));
            assert!(matches!(j.shuffle, pserv_engine::job::Shuffle::Once));
        }
        assert!(c[4].flags().is_empty(), "the defaults row passes no flags");
        assert_eq!(c[4].path(), None);
        assert_eq!(c[0].path(), Some(MsgPath::Tcp));
        // With rdma: two more rows before the defaults, messages over verbs said.
        let c = configs(true);
        assert_eq!(c.len(), 7);
        assert_eq!(
            c.iter().map(Config::label).collect::<Vec<_>>(),
            [
                "tcp, K=0",
                "tcp, K=1",
                "shm, K=0",
                "shm, K=1",
                "rdma, K=0",
                "rdma, K=1",
                "`pserv local` defaults"
            ]
        );
        assert_eq!(c[5].path(), Some(MsgPath::Rdma));
        assert_eq!(
            c[5].flags(),
            [
                "--optimizer=sgd",
                "--shuffle=once",
                "--transport=rdma",
                "--rdma-messages=true",
                "--replicas=1"
            ]
        );
        let quick = JobBenchArgs {
            quick: true,
            reps: None,
            extra: "--epochs=2".into(),
            wait_quiet: 0,
            results: PathBuf::new(),
            no_write: true,
            section: None,
        };
        assert_eq!(quick.job_flags(), ["--examples=30000", "--epochs=2"]);
        assert_eq!(quick.reps(), 1);
        let j = job_args(&quick.job_flags()).unwrap();
        assert_eq!((j.epochs, j.examples), (2, Some(30000)));
    }

    #[test]
    fn summary_fields_and_table() {
        let v: Value = serde_json::json!({
            "examples_per_sec": 2000.0, "test_logloss": 0.5, "test_accuracy": 0.75,
            "blocked_fraction": 0.25, "seconds": 1.5, "worker_seconds": 3.0, "examples": 3000.0
        });
        let r = run_from_summary(&v, 1.5, 0.1);
        assert_eq!(r.examples_per_s, 2000.0);
        assert_eq!(r.blocked_fraction, Some(0.25));
        let mut rows = vec![Row {
            label: "single".into(),
            config: None,
            runs: vec![run(10_000.0), run(8_000.0), run(12_000.0)],
        }];
        let distributed = |rdma: bool, eps: &[f64]| -> Vec<Row> {
            configs(rdma)
                .into_iter()
                .zip(eps.iter().copied())
                .map(|(c, eps)| Row {
                    label: c.label(),
                    config: Some(c),
                    runs: vec![run(eps)],
                })
                .collect()
        };
        let single = rows.clone();
        rows.extend(distributed(
            false,
            &[4000.0, 3000.0, 5000.0, 2000.0, 6000.0],
        ));
        assert_eq!(rows[0].median().examples_per_s, 10_000.0);
        assert_eq!(rows[0].spread(), (8_000.0, 12_000.0));
        let not_built = RdmaAvailability::NotBuilt;
        let md = to_markdown(&rows, &[], &not_built, &Machine::detect(), "cmd", 1);
        assert!(
            md.contains("| tcp, K=1 | 3000 | 3000-3000 | 0.30x | 0.75x |"),
            "{md}"
        );
        assert!(
            md.contains("| shm, K=1 | 2000 | 2000-2000 | 0.20x | 0.40x |"),
            "{md}"
        );
        // 1000 examples / 10000 per s = 0.1 s of 2 s summed worker time.
        assert!(md.contains("| 5% |"), "{md}");
        assert!(md.contains("| `pserv local` defaults >= 0.5x single process | 0.60x | yes |"));
        assert!(md.contains("| shm: K=1 >= 0.6x K=0 | 0.40x | **no** (67% of the goal) |"));
        assert!(md.contains("\nrdma: not built (the bench was built without `--features rdma`)\n"));
        assert!(
            !md.contains("rdma, K=") && !md.contains("software RDMA"),
            "{md}"
        );

        // With the rdma rows, on the software device: its heading, no rdma goal.
        let mut rows = single;
        rows.extend(distributed(
            true,
            &[4000.0, 3000.0, 5000.0, 2000.0, 1000.0, 800.0, 6000.0],
        ));
        let soft = RdmaAvailability::Device {
            software: true,
            devices: vec!["soft0".into()],
        };
        let md = to_markdown(&rows, &[], &soft, &Machine::detect(), "cmd", 1);
        assert!(md.contains("### software RDMA device: correctness only, no speed claims"));
        assert!(
            md.contains("| rdma, K=0 | 1000 | 1000-1000 | 0.10x | - |"),
            "{md}"
        );
        assert!(
            md.contains("| rdma, K=1 | 800 | 800-800 | 0.08x | 0.80x |"),
            "{md}"
        );
        assert!(
            !md.contains("| goal |") && !md.contains("rdma: not"),
            "{md}"
        );
        assert!(md.contains("No goal is read off this run"), "{md}");
        // On hardware the rdma goal is read too, and there is no such heading.
        let hw = RdmaAvailability::Device {
            software: false,
            devices: vec!["mlx5_0".into()],
        };
        let md = to_markdown(&rows, &[], &hw, &Machine::detect(), "cmd", 1);
        assert!(
            md.contains("| rdma: K=1 >= 0.6x K=0 | 0.80x | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| tcp: K=1 >= 0.6x K=0 | 0.75x | yes |"),
            "{md}"
        );
        assert!(!md.contains("software RDMA"), "{md}");
    }
}
