//! The message path (`messages`): the same two-sided cells with every message over TCP
//! and with messages over shared memory (the rings of `pserv_transport::shmpipe`),
//! in the same run, alternating; and the main job as a whole: the single-process SGD,
//! then `pserv local --servers 2 --workers 2` over `--transport tcp` and over shared
//! memory (`--transport shm`), with replication (K=1, the default) and without (K=0).
//!
//! The cells run on the bench's cluster (a scheduler and a server as subprocesses,
//! workers as threads of this process: every message crosses processes). Each cell is
//! measured `--reps` times per path, the paths alternating, and the best run is kept
//! (what a quiet machine gives; the spread between runs is noise on a shared 2-core VM).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::cluster::{with_cluster, ClusterSetup, LoopSetup};
use crate::error::BenchError;
use crate::machine::{load_average, wait_quiet, Machine};
use crate::report::{publish_section, size_name};
use crate::stats::{Budget, Sample};
use crate::traffic::local_summary;
use crate::workload::{
    run_dense, run_sparse, sparse_keys, DenseCell, DenseOp, KeyPattern, SparseCell, SparseOp,
};

/// Flags of `pserv-bench messages`.
#[derive(Debug, Clone, Args)]
pub struct MessagesArgs {
    /// Shorter measurements and a smaller job (a smoke run; the section is
    /// `messages-quick`).
    #[arg(long)]
    pub quick: bool,
    /// Measurements per cell and path (the best is kept).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Runs of each job row (the median is kept).
    #[arg(long, default_value_t = 1)]
    pub job_reps: usize,
    /// Skip the job rows.
    #[arg(long)]
    pub no_job: bool,
    /// Before each measurement, wait up to this many seconds for the machine to be quiet.
    #[arg(long, default_value_t = 0)]
    pub wait_quiet: u64,
    /// Where to write the tables.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Do not write RESULTS.md.
    #[arg(long)]
    pub no_write: bool,
}

/// One cell of the table.
#[derive(Clone, Copy, Debug)]
enum Cell {
    Dense(DenseCell, u32),
    Sparse(SparseCell),
}

impl Cell {
    fn label(&self) -> String {
        match self {
            Cell::Dense(c, w) => format!(
                "{} {} x{}, {w} worker{}",
                c.op.name(),
                size_name(c.size_bytes),
                c.in_flight,
                if *w == 1 { "" } else { "s" }
            ),
            Cell::Sparse(c) => format!(
                "sparse {} {} keys ({})",
                c.op.name(),
                c.keys,
                c.pattern.name()
            ),
        }
    }

    fn workers(&self) -> u32 {
        match self {
            Cell::Dense(_, w) => *w,
            Cell::Sparse(_) => 1,
        }
    }

    /// The figure that matters for this cell: p50 latency for small dense cells, else
    /// goodput (GB/s) or keys per second.
    fn figure(&self, s: &Sample) -> f64 {
        match self {
            Cell::Dense(c, _) if c.size_bytes <= 64 << 10 => s.latency_us_p50(),
            Cell::Dense(..) => s.gb_per_s(),
            Cell::Sparse(_) => s.keys_per_s() / 1e6,
        }
    }

    fn unit(&self) -> &'static str {
        match self {
            Cell::Dense(c, _) if c.size_bytes <= 64 << 10 => "p50 us",
            Cell::Dense(..) => "GB/s",
            Cell::Sparse(_) => "M keys/s",
        }
    }

    fn lower_is_better(&self) -> bool {
        matches!(self, Cell::Dense(c, _) if c.size_bytes <= 64 << 10)
    }
}

fn cells() -> Vec<Cell> {
    let d = |op, size_bytes, in_flight, w| {
        Cell::Dense(
            DenseCell {
                op,
                size_bytes,
                in_flight,
            },
            w,
        )
    };
    vec![
        d(DenseOp::Push, 4 << 10, 1, 1),
        d(DenseOp::Pull, 4 << 10, 1, 1),
        d(DenseOp::Push, 1 << 20, 1, 1),
        d(DenseOp::PushPull, 1 << 20, 1, 2),
        d(DenseOp::Push, 16 << 20, 1, 1),
        d(DenseOp::Push, 16 << 20, 8, 1),
        d(DenseOp::Pull, 16 << 20, 1, 1),
        d(DenseOp::Pull, 16 << 20, 1, 2),
        Cell::Sparse(SparseCell {
            op: SparseOp::Push,
            keys: 1_000_000,
            pattern: KeyPattern::Random,
        }),
        Cell::Sparse(SparseCell {
            op: SparseOp::Pull,
            keys: 1_000_000,
            pattern: KeyPattern::Random,
        }),
    ]
}

fn setup(workers: u32, shm: bool) -> ClusterSetup {
    // The engine's defaults (a loop per core, 100 us of busy polling after activity),
    // so both paths run as a default `pserv` node does.
    let loops = LoopSetup {
        shm_messages: shm,
        busy_poll_us: pserv_transport::TcpConfig::default().busy_poll_us,
        ..LoopSetup::tcp_default()
    };
    ClusterSetup {
        workers,
        server: loops.clone(),
        worker: loops,
        worker_core_stride: 0,
        spin_us: crate::run::DEFAULT_SPIN_US,
        app_core: None,
        transport: pserv_engine::onesided::TransportKind::Tcp,
    }
}

/// Measure `cell` once on a fresh cluster whose messages go over shm or TCP.
fn measure(cell: Cell, shm: bool, budget: &Budget) -> Result<Sample, BenchError> {
    let per_worker = with_cluster(
        &setup(cell.workers(), shm),
        |worker, rank, sync| match cell {
            Cell::Dense(c, _) => run_dense(worker, rank, c, budget, sync),
            Cell::Sparse(c) => {
                let keys = Arc::new(sparse_keys(rank, c.keys, c.pattern));
                Ok(run_sparse(worker, &keys, c, budget, sync)?.sample)
            }
        },
    )?;
    let mut m = Sample::new();
    for s in &per_worker {
        m.merge_concurrent(s);
    }
    Ok(m)
}

struct CellRow {
    cell: Cell,
    tcp: f64,
    shm: f64,
}

impl CellRow {
    /// shm against tcp, > 1 when shm is better.
    fn gain(&self) -> f64 {
        if self.cell.lower_is_better() {
            self.tcp / self.shm
        } else {
            self.shm / self.tcp
        }
    }
}

/// One job row's measure.
struct JobRow {
    label: String,
    examples_per_s: f64,
    accuracy: Option<f64>,
}

fn run_job(a: &MessagesArgs, flags: &[&str], tag: &str) -> Result<JobRow, BenchError> {
    let mut args: Vec<String> = vec!["--servers=2".into(), "--workers=2".into()];
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push("--timeout-secs=600".into());
    if a.quick {
        args.push("--examples=30000".into());
    }
    let mut runs = Vec::new();
    for _ in 0..a.job_reps.max(1) {
        if a.wait_quiet > 0 {
            wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
        }
        let v = local_summary(&args, &format!("messages-{tag}"))?;
        let eps = v["examples_per_sec"].as_f64().unwrap_or(0.0);
        eprintln!("  job {}: {:.0} examples/s", flags.join(" "), eps);
        runs.push((eps, v["test_accuracy"].as_f64()));
    }
    runs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (eps, acc) = runs[runs.len() / 2];
    Ok(JobRow {
        label: flags.join(" "),
        examples_per_s: eps,
        accuracy: acc,
    })
}

/// The single-process SGD on the job's default data: examples per second of training
/// (the same minibatches and update, no evaluation), and its held-out accuracy.
fn single_process(quick: bool) -> Result<JobRow, BenchError> {
    #[derive(clap::Parser)]
    struct J {
        #[command(flatten)]
        job: pserv_engine::job::JobArgs,
    }
    let args: Vec<&str> = if quick {
        vec!["job", "--examples=30000"]
    } else {
        vec!["job"]
    };
    let j = <J as clap::Parser>::try_parse_from(args)
        .map_err(|e| BenchError::Cluster(format!("the job's default flags: {e}")))?;
    let (train, test) = j.job.load_data()?;
    let params = j.job.sgd_params();
    let t = Instant::now();
    let (model, _) = pserv_engine::lr::train_single_process(&train, &params, None);
    let secs = t.elapsed().as_secs_f64();
    let eval = model.evaluate(&test);
    let eps = train.len() as f64 * params.epochs as f64 / secs;
    eprintln!("  job single process: {eps:.0} examples/s");
    Ok(JobRow {
        label: "single process (`lr::train_single_process`)".into(),
        examples_per_s: eps,
        accuracy: Some(eval.accuracy),
    })
}

/// Run the cells and the job rows, print the tables and (unless told not to) write them.
pub fn messages(a: &MessagesArgs, command: String) -> Result<(), BenchError> {
    let budget = if a.quick {
        Budget::quick()
    } else {
        Budget::full()
    };
    let machine = Machine::detect();
    let started = Instant::now();
    let mut rows = Vec::new();
    for cell in cells() {
        let (mut tcp, mut shm): (Option<f64>, Option<f64>) = (None, None);
        let better = |old: Option<f64>, new: f64| match old {
            None => Some(new),
            Some(o) if cell.lower_is_better() => Some(o.min(new)),
            Some(o) => Some(o.max(new)),
        };
        for rep in 0..a.reps.max(1) {
            // Alternate which path goes first, so drift hits both alike.
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on_shm in order {
                if a.wait_quiet > 0 {
                    wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
                }
                let s = measure(cell, on_shm, &budget)?;
                let f = cell.figure(&s);
                eprintln!(
                    "  {} over {}: {f:.2} {}",
                    cell.label(),
                    if on_shm { "shm" } else { "tcp" },
                    cell.unit()
                );
                if on_shm {
                    shm = better(shm, f);
                } else {
                    tcp = better(tcp, f);
                }
            }
        }
        rows.push(CellRow {
            cell,
            tcp: tcp.expect("measured"),
            shm: shm.expect("measured"),
        });
    }
    let mut jobs = Vec::new();
    if !a.no_job {
        jobs.push(single_process(a.quick)?);
        for (flags, tag) in [
            (&["--transport=tcp"][..], "tcp-k1"),
            (&["--transport=shm"][..], "shm-k1"),
            (&["--transport=tcp", "--replicas=0"][..], "tcp-k0"),
            (&["--transport=shm", "--replicas=0"][..], "shm-k0"),
        ] {
            jobs.push(run_job(a, flags, tag)?);
        }
    }
    let md = to_markdown(
        &rows,
        &jobs,
        &machine,
        &command,
        started.elapsed().as_secs(),
    );
    println!("{md}");
    if !a.no_write {
        let section = if a.quick {
            "messages-quick"
        } else {
            "messages"
        };
        publish_section(&a.results, section, &md)?;
    }
    Ok(())
}

fn to_markdown(
    rows: &[CellRow],
    jobs: &[JobRow],
    machine: &Machine,
    command: &str,
    secs: u64,
) -> String {
    let mut md = String::from(
        "## The message path: every message over TCP vs over the shared-memory rings; the main job\n\n",
    );
    md.push_str(&format!(
        "Command: `{command}` ({secs} s). Machine: {}. Load average at the end: {}.\n\n",
        machine.describe(),
        load_average()
    ));
    md.push_str(
        "Two-sided cells (push / pull / push+pull of dense ranges, sparse key lists) on one \
         server process and worker threads, every message over TCP (`tcp`) and over the \
         shared-memory rings (`shm`), alternating, best of the runs. `gain`: shm against \
         tcp (> 1: shm better).\n\n",
    );
    md.push_str("| cell | unit | tcp | shm | gain |\n|---|---|---:|---:|---:|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2}x |\n",
            r.cell.label(),
            r.cell.unit(),
            r.tcp,
            r.shm,
            r.gain()
        ));
    }
    if !jobs.is_empty() {
        md.push_str(
            "\nThe main job: `pserv local --servers 2 --workers 2` (default synthetic data), \
             examples per second over the whole job (median of the runs), against the \
             single-process SGD on the same data.\n\n",
        );
        md.push_str("| run | examples/s | x single process | accuracy |\n|---|---:|---:|---:|\n");
        let single = jobs.first().map(|j| j.examples_per_s).filter(|&e| e > 0.0);
        for j in jobs {
            md.push_str(&format!(
                "| {} | {:.0} | {} | {} |\n",
                j.label,
                j.examples_per_s,
                single.map_or("-".into(), |s| format!("{:.2}x", j.examples_per_s / s)),
                j.accuracy.map_or("-".into(), |a| format!("{a:.4}"))
            ));
        }
        let eps = |label: &str| {
            jobs.iter()
                .find(|j| j.label == label)
                .map(|j| j.examples_per_s)
        };
        for (k, tcp, shm) in [
            ("K=1", "--transport=tcp", "--transport=shm"),
            (
                "K=0",
                "--transport=tcp --replicas=0",
                "--transport=shm --replicas=0",
            ),
        ] {
            if let (Some(t), Some(s)) = (eps(tcp), eps(shm)) {
                if t > 0.0 {
                    md.push_str(&format!(
                        "\nshm against tcp, {k}: {:.2}x the examples per second.",
                        s / t
                    ));
                }
            }
        }
        md.push('\n');
    }
    md
}
