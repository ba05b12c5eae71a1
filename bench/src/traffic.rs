//! The paper's traffic reducers on the main job (`traffic`): push filters
//! (`--filter significant:T`, `--filter kkt`), key caching (`--key-cache`) and value
//! compression (`--compress lz4|zstd|zeros`), alone and together, against a baseline
//! without any, for SGD and for FTRL with L1, on the synthetic data and on a real libsvm
//! file (`--data FILE`, e.g. the one `scripts/real-data` builds).
//!
//! Every row is a whole `pserv local --servers 2 --workers 2` cluster started by
//! re-executing this binary as `pserv-bench pserv local ...` (the `pserv` command line is
//! embedded, see `pserv_engine::cli::app`); its `--summary-json` gives the bytes the
//! workers sent and received, the held-out logloss and accuracy, the job time, and per
//! worker the key-cache, compression and filter counters. The table shows, per row, bytes
//! and time per epoch against the baseline's; the text after it reads the key-caching
//! saving, the KKT filter's skipped share and the compression ratio off the measured
//! numbers, and whether each reducer pays on a 10 Gb/s link (the wire time it saves there
//! against the extra time it took here).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Args;
use serde_json::Value;

use crate::error::BenchError;
use crate::machine::{load_average, wait_quiet, CpuTimes, Machine};
use crate::report::publish_section;

/// Flags of `pserv-bench traffic`.
#[derive(Debug, Clone, Args)]
pub struct TrafficArgs {
    /// A real data set in libsvm format (`scripts/real-data` builds one from the
    /// handwritten digits shipped with scikit-learn); without it only the synthetic rows
    /// run and the section says so.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Epochs of the synthetic rows.
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    /// Examples of the synthetic data (training plus the held-out 20%).
    #[arg(long, default_value_t = 100_000)]
    pub examples: usize,
    /// Epochs of the `--data` rows (a small real file needs many to run long enough to
    /// time and to repeat key lists).
    #[arg(long, default_value_t = 100)]
    pub data_epochs: u32,
    /// SGD learning rate of the `--data` SGD rows (pserv's default, 4, is tuned for the
    /// synthetic data and diverges on the digits); 0 keeps pserv's default.
    #[arg(long, default_value_t = 0.25)]
    pub data_lr: f64,
    /// Runs per row; with more than one the table shows medians (of the time and of every
    /// other figure).
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// Servers.
    #[arg(long, default_value_t = 2)]
    pub servers: u32,
    /// Workers.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Before every run, wait up to this many seconds for the machine to be quiet (other
    /// processes using under 0.25 cores for 3 s in a row); 0 does not wait.
    #[arg(long, default_value_t = 0)]
    pub wait_quiet: u64,
    /// Extra arguments for every `pserv local`, space-separated.
    #[arg(long, default_value = "")]
    pub extra: String,
    /// A smoke test: 20 000 synthetic examples, 2 epochs, 10 epochs of `--data`.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the tables (section `traffic`, or `traffic-quick`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Do not write RESULTS.md.
    #[arg(long)]
    pub no_write: bool,
    /// The RESULTS.md section to write (default `traffic`, or `traffic-quick`).
    #[arg(long)]
    pub section: Option<String>,
}

/// A 10 Gb/s link in bytes per second.
const LINK_BYTES_PER_S: f64 = 1.25e9;

/// The FTRL rows' optimizer flags (as the hand-run table before this harness used).
const FTRL: &[&str] = &["--optimizer=ftrl", "--l1=1", "--lr=0.1"];

/// What a row turns on, besides its optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reducer {
    Baseline,
    Filter,
    KeyCache,
    Compress,
    All,
}

/// One row: a name and the flags it adds to its optimizer's.
#[derive(Clone, Copy, Debug)]
struct Config {
    reducer: Reducer,
    flags: &'static [&'static str],
}

const SGD_ROWS: &[Config] = &[
    Config {
        reducer: Reducer::Baseline,
        flags: &[],
    },
    Config {
        reducer: Reducer::Filter,
        flags: &["--filter=significant:0.001"],
    },
    Config {
        reducer: Reducer::KeyCache,
        flags: &["--key-cache"],
    },
    Config {
        reducer: Reducer::Compress,
        flags: &["--compress=lz4"],
    },
    Config {
        reducer: Reducer::Compress,
        flags: &["--compress=zstd"],
    },
    Config {
        reducer: Reducer::Filter,
        flags: &["--filter=quantize:8", "--compress=zstd"],
    },
    Config {
        reducer: Reducer::Filter,
        flags: &["--pull-filter=bf16", "--compress=zstd"],
    },
    Config {
        reducer: Reducer::All,
        flags: &[
            "--filter=significant:0.001",
            "--key-cache",
            "--compress=zstd",
        ],
    },
];

const FTRL_ROWS: &[Config] = &[
    Config {
        reducer: Reducer::Baseline,
        flags: &[],
    },
    Config {
        reducer: Reducer::Filter,
        flags: &["--filter=kkt"],
    },
    Config {
        reducer: Reducer::KeyCache,
        flags: &["--key-cache"],
    },
    Config {
        reducer: Reducer::Compress,
        flags: &["--compress=zeros"],
    },
    Config {
        reducer: Reducer::Compress,
        flags: &["--compress=zstd"],
    },
    Config {
        reducer: Reducer::All,
        flags: &["--filter=kkt", "--key-cache", "--compress=zstd"],
    },
];

/// The optimizer of a group of rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Optimizer {
    Sgd,
    Ftrl,
}

impl Optimizer {
    fn rows(self) -> &'static [Config] {
        match self {
            Optimizer::Sgd => SGD_ROWS,
            Optimizer::Ftrl => FTRL_ROWS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Optimizer::Sgd => "SGD",
            Optimizer::Ftrl => "FTRL + L1",
        }
    }
}

/// One filter's counters, summed over the workers.
#[derive(Clone, Debug, PartialEq)]
struct FilterCount {
    name: String,
    offered: f64,
    sent: f64,
}

/// What one run's summary says (or, over several runs, the median of each figure). Every
/// figure is optional: a summary without it prints "-".
#[derive(Clone, Debug, Default, PartialEq)]
struct Measure {
    bytes_sent: Option<f64>,
    bytes_received: Option<f64>,
    seconds: Option<f64>,
    epochs: Option<f64>,
    logloss: Option<f64>,
    accuracy: Option<f64>,
    examples: Option<f64>,
    /// Keys the servers hold with a nonzero weight at the end (replicas included).
    nonzero: Option<f64>,
    /// Key cache, summed over the workers: messages eligible, sent by name, key bytes
    /// saved.
    cache_eligible: Option<f64>,
    cache_by_name: Option<f64>,
    cache_saved: Option<f64>,
    /// Compression, summed over the workers and both directions: value bytes before
    /// compression and as sent, over the frames that were candidates.
    values_raw: Option<f64>,
    values_wire: Option<f64>,
    codec: Option<String>,
    /// The filter chain in order, summed over the workers.
    filters: Vec<FilterCount>,
    /// Cores' worth of CPU other processes (not this run's) used while it ran.
    others_cores: Option<f64>,
}

/// Sum `f` over the worker objects `prefix{N}` of a summary, `None` when no worker has it.
fn sum_workers(v: &Value, prefix: &str, f: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    let obj = v.as_object()?;
    obj.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .filter_map(|(_, w)| f(w))
        .fold(None, |acc, x| Some(acc.unwrap_or(0.0) + x))
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

impl Measure {
    /// Read a `pserv local --summary-json` object.
    fn from_summary(v: &Value) -> Measure {
        let tw = "traffic_worker_";
        let cache = |k: &'static str| move |w: &Value| num(w, &["key_cache", k]);
        let comp = |a: &'static str, b: &'static str| {
            move |w: &Value| {
                let c = w.get("compression")?;
                Some(num(c, &[a]).unwrap_or(0.0) + num(c, &[b]).unwrap_or(0.0))
            }
        };
        let codec = v
            .as_object()
            .and_then(|o| {
                o.iter()
                    .filter(|(k, _)| k.starts_with(tw))
                    .find_map(|(_, w)| w.get("compression")?.get("codec")?.as_str())
            })
            .map(str::to_string);
        let mut filters: Vec<FilterCount> = Vec::new();
        if let Some(o) = v.as_object() {
            for (_, list) in o.iter().filter(|(k, _)| k.starts_with("filters_worker_")) {
                for (i, f) in list.as_array().into_iter().flatten().enumerate() {
                    let name = f
                        .get("filter")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string();
                    let (offered, sent) = (
                        num(f, &["offered"]).unwrap_or(0.0),
                        num(f, &["sent"]).unwrap_or(0.0),
                    );
                    match filters.get_mut(i) {
                        Some(c) => {
                            c.offered += offered;
                            c.sent += sent;
                        }
                        None => filters.push(FilterCount {
                            name,
                            offered,
                            sent,
                        }),
                    }
                }
            }
        }
        let examples = match (num(v, &["train_examples"]), num(v, &["test_examples"])) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        Measure {
            bytes_sent: num(v, &["bytes_sent"]),
            bytes_received: num(v, &["bytes_received"]),
            seconds: num(v, &["seconds"]),
            epochs: num(v, &["epochs"]),
            logloss: num(v, &["test_logloss"]),
            accuracy: num(v, &["test_accuracy"]),
            examples,
            nonzero: num(v, &["nonzero_weights"]),
            cache_eligible: sum_workers(v, tw, cache("eligible")),
            cache_by_name: sum_workers(v, tw, cache("by_name")),
            cache_saved: sum_workers(v, tw, cache("key_bytes_saved")),
            values_raw: sum_workers(v, tw, comp("values_raw_out", "values_raw_in")),
            values_wire: sum_workers(v, tw, comp("values_wire_out", "values_wire_in")),
            codec,
            filters,
            others_cores: None,
        }
    }

    /// The median of each figure over several runs of one row.
    fn median(runs: &[Measure]) -> Measure {
        let med = |f: &dyn Fn(&Measure) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let first = runs.first().cloned().unwrap_or_default();
        let filters = first
            .filters
            .iter()
            .enumerate()
            .map(|(i, f)| FilterCount {
                name: f.name.clone(),
                offered: median(
                    runs.iter()
                        .filter_map(|r| r.filters.get(i).map(|f| f.offered))
                        .collect(),
                )
                .unwrap_or(0.0),
                sent: median(
                    runs.iter()
                        .filter_map(|r| r.filters.get(i).map(|f| f.sent))
                        .collect(),
                )
                .unwrap_or(0.0),
            })
            .collect();
        Measure {
            bytes_sent: med(&|m| m.bytes_sent),
            bytes_received: med(&|m| m.bytes_received),
            seconds: med(&|m| m.seconds),
            epochs: med(&|m| m.epochs),
            logloss: med(&|m| m.logloss),
            accuracy: med(&|m| m.accuracy),
            examples: med(&|m| m.examples),
            nonzero: med(&|m| m.nonzero),
            cache_eligible: med(&|m| m.cache_eligible),
            cache_by_name: med(&|m| m.cache_by_name),
            cache_saved: med(&|m| m.cache_saved),
            values_raw: med(&|m| m.values_raw),
            values_wire: med(&|m| m.values_wire),
            codec: first.codec,
            filters,
            others_cores: med(&|m| m.others_cores),
        }
    }

    fn bytes(&self) -> Option<f64> {
        Some(self.bytes_sent? + self.bytes_received?)
    }

    fn per_epoch(&self, x: Option<f64>) -> Option<f64> {
        let e = self.epochs.filter(|&e| e > 0.0)?;
        Some(x? / e)
    }

    /// Bytes sent plus received over all workers, per epoch.
    fn bytes_per_epoch(&self) -> Option<f64> {
        self.per_epoch(self.bytes())
    }

    /// Job seconds per epoch.
    fn seconds_per_epoch(&self) -> Option<f64> {
        self.per_epoch(self.seconds)
    }

    /// The share of eligible messages whose key list went by name.
    fn hit_rate(&self) -> Option<f64> {
        let e = self.cache_eligible.filter(|&e| e > 0.0)?;
        Some(self.cache_by_name? / e)
    }

    /// Value bytes before compression over value bytes as sent.
    fn compression_ratio(&self) -> Option<f64> {
        let w = self.values_wire.filter(|&w| w > 0.0)?;
        Some(self.values_raw? / w)
    }

    /// The share of pushed entries the whole filter chain did not send.
    fn filtered(&self) -> Option<f64> {
        let (first, last) = (self.filters.first()?, self.filters.last()?);
        (first.offered > 0.0).then(|| 1.0 - last.sent / first.offered)
    }
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

/// What a reducer saves on a 10 Gb/s link against what it cost here, per epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Payoff {
    /// Wire time of this row's bytes at 10 Gb/s.
    wire_s: f64,
    /// The baseline's wire time minus this row's.
    saved_wire_s: f64,
    /// This row's measured time minus the baseline's (on this loopback machine).
    extra_s: f64,
}

impl Payoff {
    fn new(row: &Measure, base: &Measure) -> Option<Payoff> {
        let (b, bb) = (row.bytes_per_epoch()?, base.bytes_per_epoch()?);
        let (t, tb) = (row.seconds_per_epoch()?, base.seconds_per_epoch()?);
        Some(Payoff {
            wire_s: b / LINK_BYTES_PER_S,
            saved_wire_s: (bb - b) / LINK_BYTES_PER_S,
            extra_s: t - tb,
        })
    }

    /// Whether the wire time saved exceeds the extra time spent.
    fn pays(&self) -> bool {
        self.saved_wire_s > self.extra_s
    }

    /// The verdict for a row that has `bytes_ratio` of its baseline's bytes, with `noise`
    /// the baseline's run-to-run spread of the time per epoch (when measured).
    fn verdict(&self, bytes_ratio: f64, noise: Option<f64>) -> Verdict {
        let within_noise = noise.is_some_and(|n| (self.saved_wire_s - self.extra_s).abs() < n);
        if bytes_ratio > 1.0 - NO_SAVING {
            Verdict::NoSaving
        } else if self.pays() {
            Verdict::Pays {
                faster_here: self.extra_s <= 0.0,
                within_noise,
            }
        } else {
            Verdict::Costs {
                times_the_saving: self.extra_s / self.saved_wire_s,
                within_noise,
            }
        }
    }
}

/// A row whose bytes are within this share of its baseline's saves nothing.
const NO_SAVING: f64 = 0.01;

/// Whether a reducer pays on the 10 Gb/s link.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    /// It saves (next to) no bytes.
    NoSaving,
    /// The wire time it saves exceeds the extra time it took here.
    Pays {
        /// It was not even slower here.
        faster_here: bool,
        /// The margin is below the baseline's run-to-run spread.
        within_noise: bool,
    },
    /// It took more extra time here than it saves on the wire.
    Costs {
        /// Extra time over wire time saved.
        times_the_saving: f64,
        /// The margin is below the baseline's run-to-run spread.
        within_noise: bool,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let noise = |n: bool| if n { ", within noise" } else { "" };
        match *self {
            Verdict::NoSaving => write!(f, "no: saves no bytes"),
            Verdict::Pays {
                faster_here,
                within_noise,
            } => write!(
                f,
                "yes{}{}",
                if faster_here {
                    " (faster here too)"
                } else {
                    ""
                },
                noise(within_noise)
            ),
            Verdict::Costs {
                times_the_saving,
                within_noise,
            } => write!(
                f,
                "no: costs {times_the_saving:.1}x what it saves{}",
                noise(within_noise)
            ),
        }
    }
}

/// A data set the rows run on.
#[derive(Clone, Debug)]
enum DataSet {
    Synthetic { examples: usize, epochs: u32 },
    File { path: PathBuf, epochs: u32, lr: f64 },
}

impl DataSet {
    fn name(&self) -> String {
        match self {
            DataSet::Synthetic { .. } => "synthetic".into(),
            DataSet::File { path, .. } => path.file_name().map_or_else(
                || path.display().to_string(),
                |f| f.to_string_lossy().into(),
            ),
        }
    }

    fn epochs(&self) -> u32 {
        match self {
            DataSet::Synthetic { epochs, .. } | DataSet::File { epochs, .. } => *epochs,
        }
    }

    /// The data set's flags, and those of its optimizer.
    fn flags(&self, opt: Optimizer) -> Vec<String> {
        // A fixed data order: a per-epoch shuffle (the job's default) changes every
        // minibatch's key list each epoch, which the key cache cannot reuse.
        let mut f = vec![
            format!("--epochs={}", self.epochs()),
            "--shuffle=once".into(),
        ];
        if opt == Optimizer::Sgd {
            // The job's default optimizer is AdaGrad; these rows are plain SGD.
            f.push("--optimizer=sgd".into());
        }
        match self {
            DataSet::Synthetic { examples, .. } => f.push(format!("--examples={examples}")),
            DataSet::File { path, lr, .. } => {
                f.push(format!("--data={}", path.display()));
                if opt == Optimizer::Sgd && *lr > 0.0 {
                    f.push(format!("--lr={lr}"));
                }
            }
        }
        if opt == Optimizer::Ftrl {
            f.extend(FTRL.iter().map(|s| s.to_string()));
        }
        f
    }
}

/// A measured row.
#[derive(Clone, Debug)]
struct Row {
    opt: Optimizer,
    config: Config,
    m: Measure,
    /// Largest minus smallest time per epoch over the row's runs (with more than one).
    spread_s: Option<f64>,
    /// Largest minus smallest held-out logloss over the row's runs (with more than one).
    spread_logloss: Option<f64>,
}

/// Largest minus smallest of the figures present, with at least two of them.
fn spread(xs: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let xs: Vec<f64> = xs.into_iter().flatten().collect();
    (xs.len() > 1).then(|| {
        xs.iter().copied().fold(f64::MIN, f64::max) - xs.iter().copied().fold(f64::MAX, f64::min)
    })
}

impl Row {
    /// This row's verdict against its baseline, and the payoff it rests on.
    fn verdict(&self, base: &Row) -> Option<(Payoff, Verdict)> {
        let p = Payoff::new(&self.m, &base.m)?;
        let bytes = ratio(self.m.bytes_per_epoch(), base.m.bytes_per_epoch())?;
        Some((p, p.verdict(bytes, base.spread_s)))
    }

    fn label(&self) -> String {
        match self.config.reducer {
            Reducer::Baseline => "baseline".into(),
            _ => self
                .config
                .flags
                .iter()
                .map(|f| format!("`{}`", f.replacen('=', " ", 1)))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// Run `pserv local ARGS --summary-json=...` (this binary re-executed as `pserv`) and
/// return its summary; `tag` names the scratch directory. A failed run is an error with
/// its stderr.
pub(crate) fn local_summary(args: &[String], tag: &str) -> Result<Value, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::io("finding the bench binary", e))?;
    let dir = std::env::temp_dir().join(format!("pserv-bench-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("creating a scratch dir", e))?;
    let summary = dir.join("summary.json");
    let out = Command::new(&exe)
        .arg("pserv")
        .arg("local")
        .args(args)
        .arg(format!("--summary-json={}", summary.display()))
        .output()
        .map_err(|e| BenchError::io("running pserv local", e));
    let text = std::fs::read_to_string(&summary);
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        return Err(BenchError::Cluster(format!(
            "pserv local {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = text.map_err(|e| BenchError::io(format!("reading {}", summary.display()), e))?;
    serde_json::from_str(&text).map_err(|e| BenchError::Cluster(format!("bad summary JSON: {e}")))
}

/// Run one `pserv local`, return its summary.
fn run_one(a: &TrafficArgs, flags: &[String], tag: &str) -> Result<Measure, BenchError> {
    if a.wait_quiet > 0 {
        wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
    }
    let cpu = CpuTimes::now();
    let mut args = vec![
        format!("--servers={}", a.servers),
        format!("--workers={}", a.workers),
    ];
    args.extend(flags.iter().cloned());
    args.push("--timeout-secs=600".into());
    args.extend(a.extra.split_whitespace().map(str::to_string));
    let v = local_summary(&args, &format!("traffic-{tag}"))?;
    Ok(Measure {
        others_cores: Some(CpuTimes::now().others_since(&cpu)),
        ..Measure::from_summary(&v)
    })
}

/// Run every row of one data set.
fn run_data_set(a: &TrafficArgs, ds: &DataSet, reps: usize) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for opt in [Optimizer::Sgd, Optimizer::Ftrl] {
        for (i, &config) in opt.rows().iter().enumerate() {
            let mut flags = ds.flags(opt);
            flags.extend(config.flags.iter().map(|s| s.to_string()));
            let mut runs = Vec::new();
            // The baseline runs at least twice: its spread is the noise the verdicts name.
            let n = if config.reducer == Reducer::Baseline {
                reps.max(2)
            } else {
                reps
            };
            for rep in 0..n {
                let m = run_one(a, &flags, &format!("{opt:?}-{i}-{rep}"))?;
                eprintln!(
                    "{} {} {}: {} per epoch, {} per epoch, logloss {}",
                    ds.name(),
                    opt.name(),
                    config.flags.join(" "),
                    fmt_bytes(m.bytes_per_epoch()),
                    fmt_ms(m.seconds_per_epoch()),
                    fmt_f(m.logloss, 4)
                );
                runs.push(m);
            }
            rows.push(Row {
                opt,
                config,
                m: Measure::median(&runs),
                spread_s: spread(runs.iter().map(Measure::seconds_per_epoch)),
                spread_logloss: spread(runs.iter().map(|m| m.logloss)),
            });
        }
    }
    Ok(rows)
}

fn fmt_f(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn fmt_bytes(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(b) if b.abs() >= 1e6 => format!("{:.2} MB", b / 1e6),
        Some(b) => format!("{:.1} kB", b / 1e3),
    }
}

fn fmt_ms(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(s) if s.abs() >= 0.1 => format!("{:.0} ms", s * 1e3),
        Some(s) if s.abs() >= 1e-3 => format!("{:.2} ms", s * 1e3),
        Some(s) => format!("{:.1} us", s * 1e6),
    }
}

/// `+0.0123`.
fn fmt_signed(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |x| format!("{x:+.digits$}"))
}

/// `2.50x`.
fn fmt_times(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

fn fmt_pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    let b = b.filter(|&b| b != 0.0)?;
    Some(a? / b)
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

/// `value (+delta)`.
fn with_delta(x: Option<f64>, base: Option<f64>, is_base: bool) -> String {
    match (x, diff(x, base)) {
        (Some(x), Some(d)) if !is_base => format!("{x:.4} ({d:+.4})"),
        (x, _) => fmt_f(x, 4),
    }
}

fn baseline_of(rows: &[Row], opt: Optimizer) -> Option<&Row> {
    rows.iter()
        .find(|r| r.opt == opt && r.config.reducer == Reducer::Baseline)
}

fn find<'a>(
    rows: &'a [Row],
    opt: Optimizer,
    reducer: Reducer,
    flag: Option<&str>,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.opt == opt
            && r.config.reducer == reducer
            && flag.is_none_or(|f| r.config.flags.contains(&f))
    })
}

/// The filters' column: `kkt 98.9%`, or the whole chain's share and each filter's.
fn filters_cell(m: &Measure) -> String {
    match m.filters.len() {
        0 => "-".into(),
        1 => format!("{} {}", m.filters[0].name, fmt_pct(m.filtered())),
        _ => format!(
            "{} ({})",
            fmt_pct(m.filtered()),
            m.filters
                .iter()
                .map(|f| format!(
                    "{} {}",
                    f.name,
                    fmt_pct((f.offered > 0.0).then(|| 1.0 - f.sent / f.offered))
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The main table of one data set.
fn table(rows: &[Row]) -> String {
    let mut md = String::from("| optimizer | reducer | bytes / epoch | vs baseline | sent | received | time / epoch | vs baseline | held-out logloss (vs baseline) | accuracy (vs baseline) | key-cache hit rate | compression ratio | entries filtered |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let Some(base) = baseline_of(rows, r.opt) else {
            continue;
        };
        let b = &base.m;
        let is_base = r.config.reducer == Reducer::Baseline;
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.opt.name(),
            r.label(),
            fmt_bytes(r.m.bytes_per_epoch()),
            fmt_times(ratio(r.m.bytes_per_epoch(), b.bytes_per_epoch())),
            fmt_bytes(r.m.per_epoch(r.m.bytes_sent)),
            fmt_bytes(r.m.per_epoch(r.m.bytes_received)),
            fmt_ms(r.m.seconds_per_epoch()),
            fmt_times(ratio(r.m.seconds_per_epoch(), b.seconds_per_epoch())),
            with_delta(r.m.logloss, b.logloss, is_base),
            with_delta(r.m.accuracy, b.accuracy, is_base),
            fmt_pct(r.m.hit_rate()),
            fmt_times(r.m.compression_ratio()),
            filters_cell(&r.m),
        ));
    }
    md
}

/// The 10 Gb/s table of one data set.
fn link_table(rows: &[Row]) -> String {
    let mut md = String::from("| optimizer | reducer | bytes / epoch | wire time / epoch at 10 Gb/s | wire time saved | extra time measured here | pays on 10 Gb/s | other processes' CPU during the row (cores) |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let Some(base) = baseline_of(rows, r.opt) else {
            continue;
        };
        let cells = match r.verdict(base) {
            _ if r.config.reducer == Reducer::Baseline => ["-".to_string(), "-".into(), "-".into()],
            None => ["-".into(), "-".into(), "-".into()],
            Some((p, v)) => [
                fmt_ms(Some(p.saved_wire_s)),
                fmt_ms(Some(p.extra_s)),
                v.to_string(),
            ],
        };
        let [saved, extra, verdict] = cells;
        md.push_str(&format!(
            "| {} | {} | {} | {} | {saved} | {extra} | {verdict} | {} |\n",
            r.opt.name(),
            r.label(),
            fmt_bytes(r.m.bytes_per_epoch()),
            fmt_ms(r.m.bytes_per_epoch().map(|b| b / LINK_BYTES_PER_S)),
            fmt_f(r.m.others_cores, 2),
        ));
    }
    md
}

/// The findings (a)-(c) of one data set, from its rows.
fn findings(name: &str, rows: &[Row]) -> String {
    let mut out = String::new();
    // (a) key caching.
    let mut cache = Vec::new();
    for opt in [Optimizer::Sgd, Optimizer::Ftrl] {
        if let (Some(b), Some(k)) = (
            baseline_of(rows, opt),
            find(rows, opt, Reducer::KeyCache, None),
        ) {
            let saved = ratio(k.m.bytes_per_epoch(), b.m.bytes_per_epoch()).map(|r| 1.0 - r);
            let keys = ratio(k.m.per_epoch(k.m.cache_saved), b.m.bytes_per_epoch());
            cache.push((
                opt.name(),
                format!(
                    "{} of all bytes (hit rate {}; key bytes not sent, by the cache's counters: {} of the baseline's bytes)",
                    fmt_pct(saved),
                    fmt_pct(k.m.hit_rate()),
                    fmt_pct(keys)
                ),
            ));
        }
    }
    let alike = cache.len() > 1 && cache.iter().all(|(_, t)| *t == cache[0].1);
    let text = if alike {
        format!(
            "{}, alike: {}",
            cache
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" and "),
            cache[0].1
        )
    } else {
        cache
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !cache.is_empty() {
        out.push_str(&format!(
            "- (a) {name}: key caching saved {text} (the paper: about 50%).\n"
        ));
    }
    // (b) the KKT filter.
    if let Some(k) = find(rows, Optimizer::Ftrl, Reducer::Filter, Some("--filter=kkt")) {
        let bytes = baseline_of(rows, Optimizer::Ftrl)
            .and_then(|b| ratio(k.m.bytes_per_epoch(), b.m.bytes_per_epoch()));
        out.push_str(&format!(
            "- (b) {name}: the KKT filter skipped {} of the pushed features (the paper: more than 93%); that left {} of the baseline's bytes and {} nonzero weights (baseline {}; replicas included), at {} held-out logloss.\n",
            fmt_pct(k.m.filtered()),
            fmt_times(bytes),
            fmt_f(k.m.nonzero, 0),
            fmt_f(baseline_of(rows, Optimizer::Ftrl).and_then(|b| b.m.nonzero), 0),
            fmt_signed(
                baseline_of(rows, Optimizer::Ftrl).and_then(|b| diff(k.m.logloss, b.m.logloss)),
                4
            )
        ));
    }
    // (c) compression of the filtered values.
    let mut comp = Vec::new();
    for opt in [Optimizer::Sgd, Optimizer::Ftrl] {
        if let Some(all) = find(rows, opt, Reducer::All, None) {
            let alone = find(rows, opt, Reducer::Compress, Some("--compress=zstd"));
            comp.push(format!(
                "{} {} on the values left after `{}` (zstd on unfiltered values: {})",
                opt.name(),
                fmt_times(all.m.compression_ratio()),
                all.config.flags[0].replacen('=', " ", 1),
                fmt_times(alone.and_then(|a| a.m.compression_ratio())),
            ));
        }
    }
    let any_ratio = rows.iter().any(|r| r.m.compression_ratio().is_some());
    if !comp.is_empty() && any_ratio {
        out.push_str(&format!(
            "- (c) {name}: compression ratio (value bytes before / after) {}.\n",
            comp.join("; ")
        ));
    }
    let compressing = || {
        rows.iter()
            .filter(|r| matches!(r.config.reducer, Reducer::Compress | Reducer::All))
    };
    if compressing().all(|r| r.m.values_raw.is_none()) {
        out.push_str(&format!(
            "- {name}: **no summary holds compression counters**: this pserv build does not compress yet (`--compress` is parsed but not wired into the transport), so the compress rows are the baseline again and their ratios are missing.\n"
        ));
    } else if compressing().all(|r| r.m.values_raw.unwrap_or(0.0) == 0.0) {
        out.push_str(&format!(
            "- {name}: no frame was a candidate for compression (the transport compresses only frames with enough values, and these frames carry too few), so the compress rows are the baseline again.\n"
        ));
    }
    out
}

/// The reading (d) of one data set: which reducers pay on 10 Gb/s, and the noise.
fn pays_summary(name: &str, rows: &[Row]) -> String {
    let (mut yes, mut no, mut nothing) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows
        .iter()
        .filter(|r| r.config.reducer != Reducer::Baseline)
    {
        let Some((_, v)) = baseline_of(rows, r.opt).and_then(|b| r.verdict(b)) else {
            continue;
        };
        let s = format!("{} {}", r.opt.name(), r.label());
        match v {
            Verdict::NoSaving => nothing.push(s),
            Verdict::Pays { within_noise, .. } => {
                yes.push(s + if within_noise { " (within noise)" } else { "" })
            }
            Verdict::Costs { within_noise, .. } => {
                no.push(s + if within_noise { " (within noise)" } else { "" })
            }
        }
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let mut out = format!(
        "- (d) {name}, on a 10 Gb/s link: pays: {}; does not pay: {}",
        list(&yes),
        list(&no)
    );
    if !nothing.is_empty() {
        out.push_str(&format!("; saves no bytes: {}", list(&nothing)));
    }
    out.push('.');
    let noise: Vec<String> = [Optimizer::Sgd, Optimizer::Ftrl]
        .into_iter()
        .filter_map(|opt| {
            let b = baseline_of(rows, opt)?;
            let spread = b.spread_s?;
            Some(format!(
                "{} by {} per epoch ({} of its time) and {} in held-out logloss",
                opt.name(),
                fmt_ms(Some(spread)),
                fmt_pct(ratio(Some(spread), b.m.seconds_per_epoch())),
                fmt_f(b.spread_logloss, 4)
            ))
        })
        .collect();
    if !noise.is_empty() {
        out.push_str(&format!(
            " Run-to-run noise: the baselines' runs differ, {}; a verdict whose margin (wire time saved minus extra time) is below the time spread says \"within noise\".",
            noise.join("; ")
        ));
    }
    let share = |opt| {
        let b = baseline_of(rows, opt)?;
        ratio(
            b.m.bytes_per_epoch().map(|x| x / LINK_BYTES_PER_S),
            b.m.seconds_per_epoch(),
        )
    };
    if let Some(max) = [share(Optimizer::Sgd), share(Optimizer::Ftrl)]
        .into_iter()
        .flatten()
        .reduce(f64::max)
    {
        out.push_str(&format!(
            " At 10 Gb/s the baselines' bytes would take at most {} of their measured time per epoch, the most any reducer could save there{}.",
            fmt_pct(Some(max)),
            if max < 0.01 {
                ": this job is not limited by the link at all"
            } else {
                ""
            }
        ));
    }
    out.push('\n');
    out
}

/// Run the rows, print the tables and (unless told not to) write them to RESULTS.md.
pub fn traffic(a: &TrafficArgs, command: String) -> Result<(), BenchError> {
    let machine = Machine::detect();
    let started = Instant::now();
    let (examples, epochs, data_epochs) = if a.quick {
        (20_000, 2, 10)
    } else {
        (a.examples, a.epochs, a.data_epochs)
    };
    let reps = a.reps.max(1);
    let mut sets = vec![DataSet::Synthetic { examples, epochs }];
    if let Some(path) = &a.data {
        if !path.is_file() {
            return Err(BenchError::Cluster(format!(
                "--data {}: no such file (scripts/real-data builds one)",
                path.display()
            )));
        }
        sets.push(DataSet::File {
            path: path.clone(),
            epochs: data_epochs,
            lr: a.data_lr,
        });
    }
    let mut results = Vec::new();
    for ds in &sets {
        results.push((ds.clone(), run_data_set(a, ds, reps)?));
    }
    let md = render(
        a,
        &machine,
        &command,
        reps,
        started.elapsed().as_secs_f64(),
        &results,
    );
    println!("{md}");
    if !a.no_write {
        let default = if a.quick { "traffic-quick" } else { "traffic" };
        publish_section(&a.results, a.section.as_deref().unwrap_or(default), &md)?;
    }
    Ok(())
}

fn describe(ds: &DataSet, rows: &[Row]) -> String {
    let n = rows.first().and_then(|r| r.m.examples);
    match ds {
        DataSet::Synthetic { examples, epochs } => format!(
            "pserv's synthetic data (`--examples={examples}`: {} examples, 20% held out), {epochs} epochs",
            n.map_or("?".into(), |n| format!("{n:.0}"))
        ),
        DataSet::File { path, epochs, lr } => format!(
            "`{}` ({} examples, 20% held out), {epochs} epochs, SGD rows at {}",
            path.display(),
            n.map_or("?".into(), |n| format!("{n:.0}")),
            if *lr > 0.0 { format!("`--lr={lr}`") } else { "pserv's default lr".into() }
        ),
    }
}

fn render(
    a: &TrafficArgs,
    machine: &Machine,
    command: &str,
    reps: usize,
    took_s: f64,
    results: &[(DataSet, Vec<Row>)],
) -> String {
    let mut md = String::new();
    let title = if a.quick { " (quick run)" } else { "" };
    md.push_str(&format!(
        "## Traffic: push filters, key caching and value compression on the main job{title}\n\n"
    ));
    md.push_str(&format!("Command: `{command}` (took {took_s:.0} s)  \n"));
    md.push_str(&format!(
        "Machine: {} cores, {}, kernel {}, {} (load {}, load at the end {})  \n",
        machine.cores,
        machine.cpu_model,
        machine.kernel,
        machine.date,
        machine.load,
        load_average()
    ));
    md.push_str(&format!(
        "Job: `pserv local --servers {} --workers {} [FLAGS]{}` (scheduler, servers and workers as processes on this machine's {} cores, over TCP loopback), sparse logistic regression, batch 100; SGD rows at pserv's defaults (eventual consistency), FTRL rows with `{}`. {} run(s) per row{}, the baselines at least 2 (medians: with two runs, their mean){}.\n\n",
        a.servers,
        a.workers,
        if a.extra.is_empty() { String::new() } else { format!(" {}", a.extra) },
        machine.cores,
        FTRL.join(" "),
        reps,
        if reps > 1 { ", medians shown" } else { "" },
        if a.wait_quiet > 0 {
            format!(
                "; before each run the bench waited up to {} s for a quiet machine",
                a.wait_quiet
            )
        } else {
            String::new()
        }
    ));
    for (ds, rows) in results {
        md.push_str(&format!("### {}: {}\n\n", ds.name(), describe(ds, rows)));
        md.push_str(&table(rows));
        md.push('\n');
    }
    if a.data.is_none() {
        md.push_str("### Real data\n\nSkipped: no `--data FILE` given (`scripts/real-data` builds `target/data/digits.libsvm`).\n\n");
    }
    md.push_str("Bytes are what the workers wrote to (sent) and read from (received) their sockets over the whole job, summed over the workers, divided by the epochs; time is the job's (from the cluster running to the last worker done) per epoch. Key-cache hit rate: the share of eligible key lists (pulls and pushes, per server) sent by name. Compression ratio: value bytes before compression over value bytes as sent, both directions, over the frames that were candidates. Entries filtered: the share of pushed entries the filters did not send.\n\n");
    md.push_str("### Reading\n\n");
    for (ds, rows) in results {
        md.push_str(&findings(&ds.name(), rows));
    }
    for (ds, rows) in results {
        md.push_str(&pays_summary(&ds.name(), rows));
    }
    md.push_str("\n### Where it pays on a 10 Gb/s link\n\nWire time = bytes per epoch / 1.25 GB/s. Wire time saved: the baseline's minus the row's. Extra time: the row's measured time per epoch minus the baseline's on this loopback machine (the reducer's CPU cost, less the loopback copying it spared; negative when the row was faster). A reducer pays where the wire time it saves exceeds that extra time. Other processes' CPU: cores' worth of CPU the rest of the machine (other processes, and steal) used while the row ran; where it is high the row's time says little.\n\n");
    for (ds, rows) in results {
        md.push_str(&format!("{}:\n\n", ds.name()));
        md.push_str(&link_table(rows));
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = r#"{
        "bytes_sent": 600, "bytes_received": 400, "seconds": 2.0, "epochs": 2,
        "test_logloss": 0.5, "test_accuracy": 0.75, "test_auc": 0.8,
        "train_examples": 80, "test_examples": 20,
        "traffic_worker_0": {"bytes_sent": 300, "bytes_received": 200,
            "key_cache": {"eligible": 10, "by_name": 8, "key_bytes_saved": 100,
                          "confirmed": 2, "misses": 0, "hit_rate": 0.8},
            "compression": {"codec": "zstd", "frames_out": 4, "values_raw_out": 100,
                            "values_wire_out": 40, "frames_in": 4,
                            "values_raw_in": 100, "values_wire_in": 60}},
        "traffic_worker_1": {"bytes_sent": 300, "bytes_received": 200,
            "key_cache": {"eligible": 10, "by_name": 6, "key_bytes_saved": 50}},
        "filters_worker_0": [{"filter": "kkt", "offered": 100, "sent": 10, "skipped_fraction": 0.9}],
        "filters_worker_1": [{"filter": "kkt", "offered": 100, "sent": 30, "skipped_fraction": 0.7}]
    }"#;

    fn parsed(s: &str) -> Measure {
        Measure::from_summary(&serde_json::from_str(s).unwrap())
    }

    #[test]
    fn parses_a_summary_into_a_row() {
        let m = parsed(SUMMARY);
        assert_eq!(m.bytes_per_epoch(), Some(500.0));
        assert_eq!(m.seconds_per_epoch(), Some(1.0));
        assert_eq!(m.logloss, Some(0.5));
        assert_eq!(m.examples, Some(100.0));
        assert_eq!(m.hit_rate(), Some(14.0 / 20.0));
        assert_eq!(m.cache_saved, Some(150.0));
        assert_eq!(m.compression_ratio(), Some(2.0));
        assert_eq!(m.codec.as_deref(), Some("zstd"));
        assert_eq!(m.filters.len(), 1);
        assert_eq!(m.filtered(), Some(0.8));
        assert_eq!(filters_cell(&m), "kkt 80.0%");
    }

    #[test]
    fn missing_keys_print_dashes() {
        let m = parsed(r#"{"bytes_sent": 10, "traffic_worker_0": {"bytes_sent": 10}}"#);
        assert_eq!(m.bytes_per_epoch(), None);
        assert_eq!(m.hit_rate(), None);
        assert_eq!(m.compression_ratio(), None);
        assert_eq!(m.filtered(), None);
        assert_eq!(fmt_bytes(m.bytes_per_epoch()), "-");
        assert_eq!(fmt_pct(m.hit_rate()), "-");
        assert_eq!(filters_cell(&m), "-");
        assert_eq!(with_delta(m.logloss, Some(0.5), false), "-");
        let none = Measure::from_summary(&Value::Null);
        assert_eq!(none, Measure::default());
    }

    #[test]
    fn ratios_and_the_10_gbps_link() {
        let base = Measure {
            bytes_sent: Some(2.0e9),
            bytes_received: Some(0.5e9),
            seconds: Some(4.0),
            epochs: Some(2.0),
            ..Measure::default()
        };
        // Half the bytes, 0.3 s slower per epoch: saves 0.5 s of wire per epoch.
        let row = Measure {
            bytes_sent: Some(0.75e9),
            bytes_received: Some(0.5e9),
            seconds: Some(4.6),
            epochs: Some(2.0),
            ..Measure::default()
        };
        assert_eq!(
            ratio(row.bytes_per_epoch(), base.bytes_per_epoch()),
            Some(0.5)
        );
        let p = Payoff::new(&row, &base).unwrap();
        assert!((p.wire_s - 0.5).abs() < 1e-12);
        assert!((p.saved_wire_s - 0.5).abs() < 1e-12);
        assert!((p.extra_s - 0.3).abs() < 1e-12);
        assert!(p.pays());
        // 0.7 s slower: does not pay.
        let slow = Measure {
            seconds: Some(5.4),
            ..row.clone()
        };
        assert!(!Payoff::new(&slow, &base).unwrap().pays());
        assert!(Payoff::new(&Measure::default(), &base).is_none());
        // Verdicts: the same bytes save nothing; a margin under the noise says so.
        assert_eq!(p.verdict(1.0, None), Verdict::NoSaving);
        assert_eq!(
            p.verdict(0.5, None),
            Verdict::Pays {
                faster_here: false,
                within_noise: false
            }
        );
        assert_eq!(p.verdict(0.5, Some(0.5)).to_string(), "yes, within noise");
        let v = Payoff::new(&slow, &base).unwrap().verdict(0.5, Some(0.01));
        assert_eq!(v.to_string(), "no: costs 1.4x what it saves");
    }

    #[test]
    fn medians_over_reps() {
        let mut a = parsed(SUMMARY);
        let mut b = a.clone();
        let c = a.clone();
        a.seconds = Some(1.0);
        b.seconds = Some(9.0);
        let m = Measure::median(&[a, b, c]);
        assert_eq!(m.seconds, Some(2.0));
        assert_eq!(m.filters, parsed(SUMMARY).filters);
        assert_eq!(median(vec![1.0, 3.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
        assert_eq!(spread([Some(1.0), None, Some(4.0)]), Some(3.0));
        assert_eq!(spread([Some(1.0), None]), None);
    }

    #[test]
    fn tables_render_with_and_without_counters() {
        let base = parsed(SUMMARY);
        let rows: Vec<Row> = FTRL_ROWS
            .iter()
            .map(|&config| Row {
                opt: Optimizer::Ftrl,
                config,
                m: base.clone(),
                spread_s: None,
                spread_logloss: None,
            })
            .collect();
        let t = table(&rows);
        assert_eq!(t.lines().count(), 2 + FTRL_ROWS.len());
        assert!(t.contains("| FTRL + L1 | `--filter kkt` |"));
        assert!(link_table(&rows).contains("no: saves no bytes"));
        let f = findings("x", &rows);
        assert!(f.contains("skipped 80.0%"), "{f}");
        assert!(!f.contains("no summary holds compression counters"));
        let both: Vec<Row> = rows
            .iter()
            .cloned()
            .chain(rows.iter().map(|r| Row {
                opt: Optimizer::Sgd,
                ..r.clone()
            }))
            .collect();
        assert!(findings("x", &both)
            .contains("SGD and FTRL + L1, alike: 0.0% of all bytes (hit rate 70.0%"));
        let bare: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                m: Measure {
                    values_raw: None,
                    values_wire: None,
                    ..r.m.clone()
                },
                ..r.clone()
            })
            .collect();
        assert!(findings("x", &bare).contains("no summary holds compression counters"));
    }
}
