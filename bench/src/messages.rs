//! The message path (`messages`): the same two-sided cells with every message over TCP,
//! with messages over shared memory (the rings of `pserv_transport::shmpipe`) and, where
//! the bench is built with its `rdma` feature and a device is usable, with messages over
//! RDMA verbs queue pairs (`RdmaMessages::AllPeers`, `pserv_transport::rdmapipe`), in the
//! same run, alternating; and the main job as a whole: the single-process SGD, then
//! `pserv local --servers 2 --workers 2` over `--transport tcp`, over shared memory
//! (`--transport shm`) and over verbs (`--transport rdma`), with replication (K=1, the
//! default) and without (K=0). Without rdma the tables keep two paths and say in one
//! line why (`rdma: not built`, `rdma: no device (why)`).
//!
//! The cells run on the bench's cluster (a scheduler and a server as subprocesses,
//! workers as threads of this process: every message crosses processes). Each cell is
//! measured `--reps` times per path, the paths alternating, and the best run is kept
//! (what a quiet machine gives; the spread between runs is noise on a shared 2-core VM).
//! Every cell and job row checks from the workers' transport counters that its messages
//! went over its path, and fails otherwise. A run whose rdma path is the software device
//! of `sys/softrdma` writes its own section (`messages-softrdma`), never `messages`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::cluster::{with_cluster, ClusterSetup, LoopSetup};
use crate::error::BenchError;
use crate::machine::{load_average, wait_quiet, Machine};
use crate::msgpath::{check_summary, section_name, MsgPath, PathCounts, RdmaAvailability};
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
    /// `messages-quick`, or `messages-softrdma-quick` on the software RDMA device).
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
    /// The RESULTS.md section to write (default `messages`, `messages-quick`; on the
    /// software RDMA device `messages-softrdma`, `messages-softrdma-quick`).
    #[arg(long)]
    pub section: Option<String>,
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

fn setup(workers: u32, path: MsgPath) -> ClusterSetup {
    // The engine's defaults (a loop per core, 100 us of busy polling after activity),
    // so every path runs as a default `pserv` node does.
    let loops = LoopSetup {
        shm_messages: path == MsgPath::Shm,
        rdma_messages: path == MsgPath::Rdma,
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

/// The peers of a worker of the bench's cluster whose connections must have taken the
/// path: the scheduler and the server.
const CELL_PEERS: u64 = 2;

/// The peers of a worker of `pserv local --servers 2`: the scheduler and both servers.
const JOB_PEERS: u64 = 3;

/// Measure `cell` once on a fresh cluster whose messages go over `path`; every worker
/// checks that its connections took it. Returns the sample and worker 0's counters.
fn measure(cell: Cell, path: MsgPath, budget: &Budget) -> Result<(Sample, PathCounts), BenchError> {
    let per_worker = with_cluster(&setup(cell.workers(), path), |worker, rank, sync| {
        let s = match cell {
            Cell::Dense(c, _) => run_dense(worker, rank, c, budget, sync)?,
            Cell::Sparse(c) => {
                let keys = Arc::new(sparse_keys(rank, c.keys, c.pattern));
                run_sparse(worker, &keys, c, budget, sync)?.sample
            }
        };
        let counts = PathCounts::of(worker.transport_stats());
        path.check(&counts, CELL_PEERS).map_err(|e| {
            BenchError::WrongAnswer(format!(
                "{} over {}, worker {rank}: {e}",
                cell.label(),
                path.name()
            ))
        })?;
        Ok((s, counts))
    })?;
    let mut m = Sample::new();
    for (s, _) in &per_worker {
        m.merge_concurrent(s);
    }
    Ok((m, per_worker.first().map(|w| w.1).unwrap_or_default()))
}

/// The paths of this run, in table order: tcp, shm, and rdma when it can run.
fn paths(rdma: &RdmaAvailability) -> Vec<MsgPath> {
    let mut v = vec![MsgPath::Tcp, MsgPath::Shm];
    if rdma.usable() {
        v.push(MsgPath::Rdma);
    }
    v
}

/// `paths` in the order of round `rep`: rotated by one each round, so drift hits every
/// path alike.
fn round_order(paths: &[MsgPath], rep: usize) -> Vec<MsgPath> {
    let mut v = paths.to_vec();
    if !v.is_empty() {
        let n = rep % v.len();
        v.rotate_left(n);
    }
    v
}

struct CellRow {
    cell: Cell,
    tcp: f64,
    shm: f64,
    /// `None`: the rdma path did not run.
    rdma: Option<f64>,
}

impl CellRow {
    /// `other` against tcp, > 1 when `other` is better.
    fn gain(&self, other: f64) -> f64 {
        if self.cell.lower_is_better() {
            self.tcp / other
        } else {
            other / self.tcp
        }
    }
}

/// One job row's measure.
struct JobRow {
    label: String,
    /// The message path and replicas of a `pserv local` row; `None`: the single process.
    config: Option<(MsgPath, u32)>,
    examples_per_s: f64,
    accuracy: Option<f64>,
}

/// The `pserv local` rows: (flags, path, replicas), K=1 first, then K=0.
fn job_configs(paths: &[MsgPath]) -> Vec<(Vec<String>, MsgPath, u32)> {
    let mut v = Vec::new();
    for k in [1, 0] {
        for &p in paths {
            let mut flags = vec![format!("--transport={}", p.name())];
            if p == MsgPath::Rdma {
                // `pserv local`'s default, said: messages over queue pairs too.
                flags.push("--rdma-messages=true".into());
            }
            if k == 0 {
                flags.push("--replicas=0".into());
            }
            v.push((flags, p, k));
        }
    }
    v
}

fn run_job(
    a: &MessagesArgs,
    flags: &[String],
    path: MsgPath,
    replicas: u32,
) -> Result<JobRow, BenchError> {
    let mut args: Vec<String> = vec!["--servers=2".into(), "--workers=2".into()];
    args.extend(flags.iter().cloned());
    args.push("--timeout-secs=600".into());
    if a.quick {
        args.push("--examples=30000".into());
    }
    let tag = format!("{}-k{replicas}", path.name());
    let mut runs = Vec::new();
    for _ in 0..a.job_reps.max(1) {
        if a.wait_quiet > 0 {
            wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
        }
        let v = local_summary(&args, &format!("messages-{tag}"))?;
        check_summary(&v, 2, path, JOB_PEERS)
            .map_err(|e| BenchError::WrongAnswer(format!("the job {}: {e}", flags.join(" "))))?;
        let eps = v["examples_per_sec"].as_f64().unwrap_or(0.0);
        eprintln!(
            "  job {}: {:.0} examples/s (worker 0's connections: {})",
            flags.join(" "),
            eps,
            PathCounts::from_summary(&v["traffic_worker_0"])
                .unwrap_or_default()
                .describe()
        );
        runs.push((eps, v["test_accuracy"].as_f64()));
    }
    runs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (eps, acc) = runs[runs.len() / 2];
    Ok(JobRow {
        label: flags.join(" "),
        config: Some((path, replicas)),
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
        config: None,
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
    let rdma = RdmaAvailability::detect();
    println!("{}", rdma.line());
    let paths = paths(&rdma);
    let started = Instant::now();
    let mut rows = Vec::new();
    for cell in cells() {
        let mut best: Vec<Option<f64>> = vec![None; paths.len()];
        let better = |old: Option<f64>, new: f64| match old {
            None => Some(new),
            Some(o) if cell.lower_is_better() => Some(o.min(new)),
            Some(o) => Some(o.max(new)),
        };
        for rep in 0..a.reps.max(1) {
            for path in round_order(&paths, rep) {
                if a.wait_quiet > 0 {
                    wait_quiet(std::time::Duration::from_secs(a.wait_quiet), 0.25);
                }
                let (s, counts) = measure(cell, path, &budget)?;
                let f = cell.figure(&s);
                eprintln!(
                    "  {} over {}: {f:.2} {} (worker 0's connections: {})",
                    cell.label(),
                    path.name(),
                    cell.unit(),
                    counts.describe()
                );
                let i = paths.iter().position(|&p| p == path).expect("a path");
                best[i] = better(best[i], f);
            }
        }
        let of = |p: MsgPath| paths.iter().position(|&q| q == p).and_then(|i| best[i]);
        rows.push(CellRow {
            cell,
            tcp: of(MsgPath::Tcp).expect("measured"),
            shm: of(MsgPath::Shm).expect("measured"),
            rdma: of(MsgPath::Rdma),
        });
    }
    let mut jobs = Vec::new();
    if !a.no_job {
        jobs.push(single_process(a.quick)?);
        for (flags, path, k) in job_configs(&paths) {
            jobs.push(run_job(a, &flags, path, k)?);
        }
    }
    let md = to_markdown(
        &rows,
        &jobs,
        &rdma,
        &machine,
        &command,
        started.elapsed().as_secs(),
    );
    println!("{md}");
    if !a.no_write {
        let section = section_name("messages", a.quick, rdma.software(), a.section.as_deref());
        publish_section(&a.results, &section, &md)?;
    }
    Ok(())
}

fn to_markdown(
    rows: &[CellRow],
    jobs: &[JobRow],
    rdma: &RdmaAvailability,
    machine: &Machine,
    command: &str,
    secs: u64,
) -> String {
    let with_rdma = rows.iter().any(|r| r.rdma.is_some());
    let mut md = if with_rdma {
        String::from(
            "## The message path: every message over TCP vs over the shared-memory rings vs over RDMA queue pairs; the main job\n\n",
        )
    } else {
        String::from(
            "## The message path: every message over TCP vs over the shared-memory rings; the main job\n\n",
        )
    };
    if with_rdma && rdma.software() {
        md.push_str(&format!(
            "### {}\n\nThe rdma column ran on the software RDMA device of `sys/softrdma` \
             (`scripts/soft-rdma`): a replacement libibverbs whose NIC is a progress thread per \
             process moving data over Unix sockets. Its figures show that every message of \
             every cell went over verbs queue pairs and what that costs in software; they say \
             nothing about RDMA hardware, where the same command prints the real table.\n\n",
            crate::msgpath::SOFTWARE_HEADING
        ));
    }
    md.push_str(&format!(
        "Command: `{command}` ({secs} s). Machine: {}. Load average at the end: {}.\n\n",
        machine.describe(),
        load_average()
    ));
    if with_rdma {
        md.push_str(
            "Two-sided cells (push / pull / push+pull of dense ranges, sparse key lists) on one \
             server process and worker threads, every message over TCP (`tcp`), over the \
             shared-memory rings (`shm`) and over RDMA verbs queue pairs (`rdma`, \
             `RdmaMessages::AllPeers`), alternating, best of the runs. `shm gain`, `rdma gain`: \
             against tcp (> 1: better than tcp). Every cell checked its workers' transport \
             counters: tcp no connection moved, shm (rdma) at least the scheduler's and the \
             server's connections moved to shared memory (queue pairs), none refused.\n\n",
        );
        md.push_str(
            "| cell | unit | tcp | shm | shm gain | rdma | rdma gain |\n\
             |---|---|---:|---:|---:|---:|---:|\n",
        );
    } else {
        md.push_str(
            "Two-sided cells (push / pull / push+pull of dense ranges, sparse key lists) on one \
             server process and worker threads, every message over TCP (`tcp`) and over the \
             shared-memory rings (`shm`), alternating, best of the runs. `gain`: shm against \
             tcp (> 1: shm better). Every cell checked its workers' transport counters: tcp \
             no connection moved, shm at least the scheduler's and the server's connections \
             moved to shared memory, none refused.\n\n",
        );
        md.push_str("| cell | unit | tcp | shm | gain |\n|---|---|---:|---:|---:|\n");
    }
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2}x |",
            r.cell.label(),
            r.cell.unit(),
            r.tcp,
            r.shm,
            r.gain(r.shm)
        ));
        if with_rdma {
            md.push_str(&match r.rdma {
                Some(x) => format!(" {x:.2} | {:.2}x |", r.gain(x)),
                None => " - | - |".into(),
            });
        }
        md.push('\n');
    }
    if !with_rdma {
        md.push_str(&format!("\n{}\n", rdma.line()));
    }
    if !jobs.is_empty() {
        md.push_str(
            "\nThe main job: `pserv local --servers 2 --workers 2` (default synthetic data), \
             examples per second over the whole job (median of the runs), against the \
             single-process SGD on the same data. Every row checked from the summary's \
             `traffic_worker_N` that both workers' messages took its path (at least the \
             scheduler and both servers).\n\n",
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
        let eps = |path: MsgPath, k: u32| {
            jobs.iter()
                .find(|j| j.config == Some((path, k)))
                .map(|j| j.examples_per_s)
        };
        for k in [1, 0] {
            for other in [MsgPath::Shm, MsgPath::Rdma] {
                if let (Some(t), Some(o)) = (eps(MsgPath::Tcp, k), eps(other, k)) {
                    if t > 0.0 {
                        md.push_str(&format!(
                            "\n{} against tcp, K={k}: {:.2}x the examples per second.",
                            other.name(),
                            o / t
                        ));
                    }
                }
            }
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cell: Cell, rdma: Option<f64>) -> CellRow {
        CellRow {
            cell,
            tcp: 20.0,
            shm: 5.0,
            rdma,
        }
    }

    fn job(label: &str, config: Option<(MsgPath, u32)>, eps: f64) -> JobRow {
        JobRow {
            label: label.into(),
            config,
            examples_per_s: eps,
            accuracy: Some(0.75),
        }
    }

    #[test]
    fn paths_and_their_rounds() {
        let none = RdmaAvailability::NotBuilt;
        assert_eq!(paths(&none), [MsgPath::Tcp, MsgPath::Shm]);
        let soft = RdmaAvailability::Device {
            software: true,
            devices: vec![],
        };
        let all = paths(&soft);
        assert_eq!(all, [MsgPath::Tcp, MsgPath::Shm, MsgPath::Rdma]);
        // Two paths alternate as before; three rotate, each first once in three rounds.
        assert_eq!(round_order(&paths(&none), 1), [MsgPath::Shm, MsgPath::Tcp]);
        assert_eq!(round_order(&all, 0), all);
        assert_eq!(
            round_order(&all, 2),
            [MsgPath::Rdma, MsgPath::Tcp, MsgPath::Shm]
        );
        assert_eq!(round_order(&all, 3), all);
    }

    #[test]
    fn job_rows_per_path_parse_as_pserv_local_flags() {
        let rows = job_configs(&[MsgPath::Tcp, MsgPath::Shm, MsgPath::Rdma]);
        assert_eq!(rows.len(), 6);
        let (flags, path, k) = &rows[2];
        assert_eq!((*path, *k), (MsgPath::Rdma, 1));
        assert_eq!(flags, &["--transport=rdma", "--rdma-messages=true"]);
        let (flags, path, k) = &rows[5];
        assert_eq!((*path, *k), (MsgPath::Rdma, 0));
        assert_eq!(flags.last().map(String::as_str), Some("--replicas=0"));
        assert_eq!(job_configs(&[MsgPath::Tcp, MsgPath::Shm]).len(), 4);
        #[derive(clap::Parser)]
        struct N {
            #[command(flatten)]
            net: pserv_engine::cli::args::NetArgs,
        }
        let mut argv = vec!["x".to_string()];
        argv.extend(rows[2].0.iter().cloned());
        let n = <N as clap::Parser>::try_parse_from(argv).unwrap();
        assert_eq!(
            n.net.rdma_message_path(),
            pserv_transport::RdmaMessages::AllPeers
        );
    }

    #[test]
    fn the_table_has_an_rdma_column_only_when_rdma_ran() {
        let small = cells()[0];
        let big = cells()[4];
        let m = Machine::detect();
        let why = RdmaAvailability::NoDevice("no RDMA device found".into());
        let md = to_markdown(&[row(small, None), row(big, None)], &[], &why, &m, "cmd", 1);
        assert!(md.contains("| cell | unit | tcp | shm | gain |\n"), "{md}");
        assert!(md.contains("| push 4 KiB x1, 1 worker | p50 us | 20.00 | 5.00 | 4.00x |\n"));
        assert!(md.contains("| push 16 MiB x1, 1 worker | GB/s | 20.00 | 5.00 | 0.25x |\n"));
        assert!(
            md.contains("\nrdma: no device (no RDMA device found)\n"),
            "{md}"
        );
        assert!(!md.contains("rdma gain") && !md.contains("software RDMA"));
        let md = to_markdown(
            &[row(small, None)],
            &[],
            &RdmaAvailability::NotBuilt,
            &m,
            "c",
            1,
        );
        assert!(md.contains("rdma: not built"), "{md}");

        let soft = RdmaAvailability::Device {
            software: true,
            devices: vec!["soft0".into()],
        };
        let jobs = [
            job("single", None, 1000.0),
            job("--transport=tcp", Some((MsgPath::Tcp, 1)), 100.0),
            job("--transport=rdma", Some((MsgPath::Rdma, 1)), 50.0),
        ];
        let md = to_markdown(
            &[row(small, Some(40.0)), row(big, Some(10.0))],
            &jobs,
            &soft,
            &m,
            "cmd",
            1,
        );
        assert!(
            md.contains("| cell | unit | tcp | shm | shm gain | rdma | rdma gain |\n|---|---|---:|---:|---:|---:|---:|\n"),
            "{md}"
        );
        assert!(
            md.contains(
                "| push 4 KiB x1, 1 worker | p50 us | 20.00 | 5.00 | 4.00x | 40.00 | 0.50x |\n"
            ),
            "{md}"
        );
        assert!(md.contains(
            "| push 16 MiB x1, 1 worker | GB/s | 20.00 | 5.00 | 0.25x | 10.00 | 0.50x |\n"
        ));
        assert!(md.contains("### software RDMA device: correctness only, no speed claims"));
        assert!(
            !md.contains("rdma: "),
            "no absence line when rdma ran: {md}"
        );
        assert!(
            md.contains("| --transport=rdma | 50 | 0.05x | 0.7500 |"),
            "{md}"
        );
        assert!(md.contains("rdma against tcp, K=1: 0.50x"), "{md}");
        // On hardware the same table, without the software device's heading.
        let hw = RdmaAvailability::Device {
            software: false,
            devices: vec!["mlx5_0".into()],
        };
        let md = to_markdown(&[row(small, Some(4.0))], &[], &hw, &m, "cmd", 1);
        assert!(
            md.contains("| rdma gain |") && !md.contains("software RDMA"),
            "{md}"
        );
    }
}
