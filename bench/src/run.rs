//! One bench run: baselines, pserv dense and sparse cells with 1 and 2 workers over TCP,
//! the same dense cells over the one-sided transports (shm, rdma where a device is
//! present), the knob sweep, then the reports: the `tcp` section and the transport
//! table (`onesided` section).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::baseline::{self, Placement};
use crate::cluster::{with_cluster, ClusterSetup, LoopSetup};
use crate::error::BenchError;
use crate::machine::{load_average, wait_quiet, CpuTimes, Machine};
use crate::onesided::{open_window, run_onesided, Transport, WindowPlan};
use crate::onesided_report::{TransportReport, TransportRow};
use crate::report::{
    size_name, write_section, BaselineRow, DenseRow, KnobRow, PlacedBaseline, Report, SparseRow,
    SECTION, SECTION_QUICK,
};
use crate::stats::{Budget, Sample};
use crate::workload::{
    run_dense, run_sparse, sparse_keys, DenseCell, DenseOp, KeyPattern, SparseCell, SparseOp,
};

/// Dense request sizes in bytes.
pub const DENSE_SIZES: [usize; 4] = [4 << 10, 64 << 10, 1 << 20, 16 << 20];
/// Requests in flight measured for dense cells.
pub const IN_FLIGHT: [usize; 2] = [1, 8];
/// Keys per sparse request.
pub const SPARSE_KEYS: [usize; 3] = [1_000, 100_000, 1_000_000];

/// Default `spin_us` of the bench's workers (see the knob table in RESULTS.md).
pub const DEFAULT_SPIN_US: u64 = 100;
/// Default `busy_poll_us` of the bench's event loops.
pub const DEFAULT_BUSY_POLL_US: u64 = 100;
/// Default event loops per node: 0 = `TcpConfig::default()`, a loop per core.
pub const DEFAULT_LOOP_THREADS: usize = 0;
/// Default distance between the workers' first cores.
pub const DEFAULT_WORKER_CORE_STRIDE: usize = 0;

/// What to run, from the command line.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Short run (under a minute): shorter measurements, no knob sweep, baselines once.
    #[arg(long)]
    pub quick: bool,
    /// The results file whose `tcp` and `onesided` sections (`tcp-quick` and
    /// `onesided-quick` for --quick) this run replaces.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    pub results: PathBuf,
    /// Print the tables but do not touch the results file.
    #[arg(long)]
    pub no_write: bool,
    /// Parts to run (default: all; the knob sweep is left out of --quick runs).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Part>,
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 2])]
    pub workers: Vec<u32>,
    /// Worker `wait` spin before parking, in microseconds.
    #[arg(long, default_value_t = DEFAULT_SPIN_US)]
    pub spin_us: u64,
    /// Event-loop busy polling (server and workers), in microseconds.
    #[arg(long, default_value_t = DEFAULT_BUSY_POLL_US)]
    pub busy_poll_us: u64,
    /// Event-loop threads per server and per worker (0: `TcpConfig`'s default, a loop
    /// per core).
    #[arg(long, default_value_t = DEFAULT_LOOP_THREADS)]
    pub loop_threads: usize,
    /// Core the server's loops are pinned from (default: the engine's placement by node id).
    #[arg(long)]
    pub server_core: Option<usize>,
    /// Core worker 0's loops are pinned from (default: the engine's placement by node id).
    #[arg(long)]
    pub worker_core: Option<usize>,
    /// Worker i's loops are pinned from `worker_core + i * worker_core_stride`.
    #[arg(long, default_value_t = DEFAULT_WORKER_CORE_STRIDE)]
    pub worker_core_stride: usize,
    /// Do not pin event loops.
    #[arg(long)]
    pub no_pin: bool,
    /// Move the two-sided cells' messages through shared-memory rings
    /// (`ShmMessages::SameHost`, a `pserv` node's default between processes of one host)
    /// instead of TCP. The `tcp` section measures TCP, so this needs --no-write.
    #[arg(long, requires = "no_write")]
    pub shm_messages: bool,
    /// Pin worker i's application thread to this core + i (default: the OS places it).
    #[arg(long)]
    pub app_core: Option<usize>,
    /// Only these dense sizes, in bytes (default: 4 KiB, 64 KiB, 1 MiB, 16 MiB).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Only these dense operations.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub ops: Vec<DenseOp>,
    /// Only these numbers of dense requests in flight (default: 1 and 8).
    #[arg(long, value_delimiter = ',')]
    pub in_flight: Vec<usize>,
    /// Only these sparse key counts (default: 10^3, 10^5, 10^6).
    #[arg(long, value_delimiter = ',')]
    pub keys: Vec<usize>,
    /// Before starting, wait up to this many seconds for the machine to be quiet (other
    /// processes using under --quiet-threshold cores for 3 s in a row).
    #[arg(long, default_value_t = 0)]
    pub wait_quiet: u64,
    /// Cores' worth of CPU other processes may use for the machine to count as quiet.
    #[arg(long, default_value_t = 0.25)]
    pub quiet_threshold: f64,
    /// Scale every measurement time by this factor.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Columns of the transport table: `tcp` (the two-sided path; also the `tcp`
    /// section's tables), `shm` (one-sided shared memory), `rdma` (one-sided verbs; needs
    /// a device and `--features rdma`, else the report says "rdma: no device (why)" and
    /// the run goes on without it). Default: all three.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Transport::Tcp, Transport::Shm, Transport::Rdma])]
    pub transport: Vec<Transport>,
}

/// A part of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Raw TCP stream, ping-pong and memcpy.
    Baselines,
    /// Dense push / pull / push-pull.
    Dense,
    /// Sparse push / pull.
    Sparse,
    /// The spin_us / busy_poll_us / placement sweep.
    Knobs,
}

impl RunArgs {
    fn runs(&self, part: Part) -> bool {
        if self.only.is_empty() {
            part != Part::Knobs || !self.quick
        } else {
            self.only.contains(&part)
        }
    }

    fn setup(&self, workers: u32) -> ClusterSetup {
        ClusterSetup {
            workers,
            server: LoopSetup {
                threads: self.loop_threads,
                no_pin: self.no_pin,
                core_offset: self.server_core,
                busy_poll_us: self.busy_poll_us,
                shm_messages: self.shm_messages,
                rdma_messages: false,
            },
            worker: LoopSetup {
                threads: self.loop_threads,
                no_pin: self.no_pin,
                core_offset: self.worker_core,
                busy_poll_us: self.busy_poll_us,
                shm_messages: self.shm_messages,
                rdma_messages: false,
            },
            worker_core_stride: self.worker_core_stride,
            spin_us: self.spin_us,
            app_core: self.app_core,
            transport: Transport::Tcp.kind(),
        }
    }

    /// Whether `t` is a column of this run.
    fn has(&self, t: Transport) -> bool {
        self.transport.contains(&t)
    }

    /// Whether the run is cut down by a filter (then the report says so).
    fn filtered(&self) -> bool {
        !(self.sizes.is_empty()
            && self.ops.is_empty()
            && self.in_flight.is_empty()
            && self.keys.is_empty()
            && self.only.is_empty()
            && self.workers == [1, 2])
    }

    fn sizes(&self) -> Vec<usize> {
        pick(&self.sizes, &DENSE_SIZES)
    }
}

fn pick<T: Clone>(chosen: &[T], all: &[T]) -> Vec<T> {
    if chosen.is_empty() {
        all.to_vec()
    } else {
        chosen.to_vec()
    }
}

fn budget(args: &RunArgs) -> Budget {
    let b = if args.quick {
        Budget::quick()
    } else {
        Budget::full()
    };
    b.scaled(args.time_scale)
}

fn baselines(sizes: &[usize], budget: &Budget) -> Result<Vec<BaselineRow>, BenchError> {
    // Three placements per size: each gets half the time of a pserv cell.
    let placed_budget = budget.scaled(0.5);
    sizes
        .iter()
        .map(|&size| {
            let placed = Placement::ALL
                .iter()
                .map(|&placement| {
                    let stream = baseline::tcp_stream(size, &placed_budget, placement)
                        .map_err(|e| BenchError::io("raw TCP stream baseline", e))?;
                    let ping_pong = baseline::tcp_ping_pong(size, &placed_budget, placement)
                        .map_err(|e| BenchError::io("raw TCP ping-pong baseline", e))?;
                    Ok(PlacedBaseline {
                        placement,
                        stream,
                        ping_pong,
                    })
                })
                .collect::<Result<Vec<_>, BenchError>>()?;
            let memcpy = baseline::memcpy(size, budget);
            let sum = baseline::sum_f32(size, budget);
            let row = best_placements(size, placed, memcpy, sum);
            eprintln!(
                "  baseline {:>7}: raw TCP {:6.2} GB/s ({}, p50 {:8.1} us), ping-pong p50 {:8.1} us ({}), memcpy {:6.1} GB/s, f32 sum {:6.1} GB/s",
                size_name(size),
                row.stream.gb_per_s(),
                row.stream_placement.name(),
                row.stream.latency_us_p50(),
                row.ping_pong.latency_us_p50(),
                row.ping_pong_placement.name(),
                row.memcpy.gb_per_s(),
                row.sum.gb_per_s()
            );
            Ok(row)
        })
        .collect()
}

/// The row of one size: the fastest stream and the lowest-latency ping-pong over the
/// placements.
fn best_placements(
    size_bytes: usize,
    placed: Vec<PlacedBaseline>,
    memcpy: Sample,
    sum: Sample,
) -> BaselineRow {
    let s = placed
        .iter()
        .max_by(|a, b| a.stream.gb_per_s().total_cmp(&b.stream.gb_per_s()))
        .expect("at least one placement");
    let p = placed
        .iter()
        .min_by(|a, b| {
            a.ping_pong
                .latency_us_p50()
                .total_cmp(&b.ping_pong.latency_us_p50())
        })
        .expect("at least one placement");
    BaselineRow {
        size_bytes,
        stream: s.stream.clone(),
        stream_placement: s.placement,
        ping_pong: p.ping_pong.clone(),
        ping_pong_placement: p.placement,
        placed,
        memcpy,
        sum,
    }
}

/// Two passes of the same baselines merged: per placement the better stream and the
/// better ping-pong, then the best placements again.
fn merge_baselines(a: Vec<BaselineRow>, b: Vec<BaselineRow>) -> Vec<BaselineRow> {
    a.into_iter()
        .zip(b)
        .map(|(a, b)| {
            let placed = a
                .placed
                .into_iter()
                .zip(b.placed)
                .map(|(x, y)| PlacedBaseline {
                    placement: x.placement,
                    stream: Sample::higher_goodput(x.stream, y.stream),
                    ping_pong: Sample::lower_p50(x.ping_pong, y.ping_pong),
                })
                .collect();
            best_placements(
                a.size_bytes,
                placed,
                Sample::higher_goodput(a.memcpy, b.memcpy),
                Sample::higher_goodput(a.sum, b.sum),
            )
        })
        .collect()
}

fn dense_cells(args: &RunArgs) -> Vec<DenseCell> {
    let mut cells = Vec::new();
    for size_bytes in args.sizes() {
        for op in pick(&args.ops, &DenseOp::ALL) {
            for in_flight in pick(&args.in_flight, &IN_FLIGHT) {
                cells.push(DenseCell {
                    op,
                    size_bytes,
                    in_flight,
                });
            }
        }
    }
    cells
}

fn sparse_cells(args: &RunArgs) -> Vec<SparseCell> {
    let mut cells = Vec::new();
    for keys in pick(&args.keys, &SPARSE_KEYS) {
        for pattern in [KeyPattern::Random, KeyPattern::Sequential] {
            for op in [SparseOp::Push, SparseOp::Pull] {
                cells.push(SparseCell { op, keys, pattern });
            }
        }
    }
    cells
}

type WorkerOut = (Vec<Sample>, Vec<(Sample, Option<std::time::Duration>)>);

/// Run the dense and sparse cells on a cluster of `workers` workers.
fn pserv_cells(
    args: &RunArgs,
    workers: u32,
    budget: &Budget,
) -> Result<(Vec<DenseRow>, Vec<SparseRow>), BenchError> {
    let dense = if args.runs(Part::Dense) {
        dense_cells(args)
    } else {
        Vec::new()
    };
    let sparse = if args.runs(Part::Sparse) {
        sparse_cells(args)
    } else {
        Vec::new()
    };
    let setup = args.setup(workers);
    let per_worker: Vec<WorkerOut> = with_cluster(&setup, |worker, rank, sync| {
        let mut d = Vec::with_capacity(dense.len());
        for cell in &dense {
            let s = run_dense(worker, rank, *cell, budget, sync)?;
            if rank == 0 {
                eprintln!(
                    "  {workers}w {:>9} {:>7} x{}: {:7.2} GB/s, p50 {:8.1} us, p99 {:8.1} us (worker 0)",
                    cell.op.name(),
                    size_name(cell.size_bytes),
                    cell.in_flight,
                    s.gb_per_s(),
                    s.latency_us_p50(),
                    s.latency_us_p99()
                );
            }
            d.push(s);
        }
        let mut sp = Vec::with_capacity(sparse.len());
        let mut keys: Option<(usize, KeyPattern, Arc<Vec<u64>>)> = None;
        for cell in &sparse {
            let ks = match &keys {
                Some((n, p, k)) if *n == cell.keys && *p == cell.pattern => k.clone(),
                _ => {
                    let k = Arc::new(sparse_keys(rank, cell.keys, cell.pattern));
                    keys = Some((cell.keys, cell.pattern, k.clone()));
                    k
                }
            };
            let out = run_sparse(worker, &ks, *cell, budget, sync)?;
            if rank == 0 {
                eprintln!(
                    "  {workers}w sparse {} {:>7} {:>10}: {:7.1} M keys/s, p50 {:8.1} us (worker 0)",
                    cell.op.name(),
                    cell.keys,
                    cell.pattern.name(),
                    out.sample.keys_per_s() / 1e6,
                    out.sample.latency_us_p50()
                );
            }
            sp.push((out.sample, out.first_push));
        }
        Ok((d, sp))
    })?;
    let merge = |pick: &dyn Fn(&WorkerOut) -> Sample| {
        let mut m = Sample::new();
        for w in &per_worker {
            m.merge_concurrent(&pick(w));
        }
        m
    };
    let dense_rows = dense
        .iter()
        .enumerate()
        .map(|(i, cell)| DenseRow {
            workers,
            cell: *cell,
            sample: merge(&|w| w.0[i].clone()),
        })
        .collect();
    let sparse_rows = sparse
        .iter()
        .enumerate()
        .map(|(i, cell)| SparseRow {
            workers,
            cell: *cell,
            sample: merge(&|w| w.1[i].0.clone()),
            first_push: per_worker.iter().filter_map(|w| w.1[i].1).max(),
        })
        .collect();
    Ok((dense_rows, sparse_rows))
}

/// The sweep's configurations: (label, setup) for 1 worker.
fn knob_setups(args: &RunArgs) -> Vec<(String, ClusterSetup)> {
    let base = args.setup(1);
    let with = |server: LoopSetup,
                worker: LoopSetup,
                app_core: Option<usize>,
                spin_us: u64,
                busy_poll_us: u64| {
        let mut s = base.clone();
        s.server = LoopSetup {
            busy_poll_us,
            ..server
        };
        s.worker = LoopSetup {
            busy_poll_us,
            ..worker
        };
        s.app_core = app_core;
        s.spin_us = spin_us;
        s
    };
    let one = LoopSetup::one_on;
    let default = LoopSetup::tcp_default;
    let mut out = Vec::new();
    for (spin, bp) in [(0, 0), (50, 0), (200, 0), (0, 50), (50, 50)] {
        out.push((
            "TcpConfig::default() (a loop per core), app unpinned".to_string(),
            with(default(), default(), None, spin, bp),
        ));
    }
    for spin in [0, 50] {
        out.push((
            "1 loop each: server core 1; worker loop + app core 0".into(),
            with(one(1), one(0), Some(0), spin, 0),
        ));
    }
    out.push((
        "1 loop each: server core 1; worker core 0, app unpinned".into(),
        with(one(1), one(0), None, DEFAULT_SPIN_US, 0),
    ));
    out.push((
        "1 loop each: everything on core 0".into(),
        with(one(0), one(0), Some(0), 0, 0),
    ));
    out
}

fn knobs(args: &RunArgs, budget: &Budget) -> Result<Vec<KnobRow>, BenchError> {
    let budget = budget.scaled(0.5);
    let cells = [
        DenseCell {
            op: DenseOp::Push,
            size_bytes: 4 << 10,
            in_flight: 1,
        },
        DenseCell {
            op: DenseOp::Pull,
            size_bytes: 16 << 20,
            in_flight: 1,
        },
        DenseCell {
            op: DenseOp::Pull,
            size_bytes: 4 << 10,
            in_flight: 1,
        },
        DenseCell {
            op: DenseOp::Push,
            size_bytes: 16 << 20,
            in_flight: 1,
        },
    ];
    let mut rows = Vec::new();
    for (label, setup) in knob_setups(args) {
        let mut out = with_cluster(&setup, |worker, rank, sync| {
            cells
                .iter()
                .map(|c| run_dense(worker, rank, *c, &budget, sync))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut s = out.pop().expect("one worker").into_iter();
        let row = KnobRow {
            label,
            spin_us: setup.spin_us,
            busy_poll_us: setup.server.busy_poll_us,
            push_4k: s.next().expect("four cells"),
            pull_16m: s.next().expect("four cells"),
            pull_4k: s.next().expect("four cells"),
            push_16m: s.next().expect("four cells"),
        };
        eprintln!(
            "  knobs {} spin {} busy_poll {}: 4 KiB push p50 {:.1} us, pull p50 {:.1} us, 16 MiB push {:.2} GB/s, pull {:.2} GB/s",
            row.label,
            row.spin_us,
            row.busy_poll_us,
            row.push_4k.latency_us_p50(),
            row.pull_4k.latency_us_p50(),
            row.push_16m.gb_per_s(),
            row.pull_16m.gb_per_s()
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Run the dense cells over the one-sided transport `t` on a cluster of `workers`
/// workers whose server runs with `--transport t`: every worker opens the window of the
/// run's [`WindowPlan`] once, then runs each (size, op) cell. Returns the merged rows and
/// what the workers were told about the window.
fn onesided_cells(
    args: &RunArgs,
    workers: u32,
    t: Transport,
    budget: &Budget,
) -> Result<(Vec<TransportRow>, String), BenchError> {
    let sizes = args.sizes();
    let ops = pick(&args.ops, &DenseOp::ALL);
    let plan = WindowPlan::new(workers, &sizes)?;
    let mut setup = args.setup(workers);
    setup.transport = t.kind();
    let per_worker = with_cluster(&setup, |worker, rank, sync| {
        let why = open_window(worker, &plan)?;
        let mut out = Vec::with_capacity(sizes.len() * ops.len());
        for &size in &sizes {
            for &op in &ops {
                let s = run_onesided(worker, plan.range(rank, size), op, budget, sync)?;
                if rank == 0 {
                    eprintln!(
                        "  {workers}w {} {:>9} {:>7}: {:7.2} GB/s, p50 {:8.2} us, p99 {:8.2} us (worker 0)",
                        t.name(),
                        op.name(),
                        size_name(size),
                        s.gb_per_s(),
                        s.latency_us_p50(),
                        s.latency_us_p99()
                    );
                }
                out.push(s);
            }
        }
        Ok((why, out))
    })?;
    let why = per_worker.first().map(|w| w.0.clone()).unwrap_or_default();
    let mut rows = Vec::new();
    let mut i = 0;
    for &size in &sizes {
        for &op in &ops {
            let mut sample = Sample::new();
            for w in &per_worker {
                sample.merge_concurrent(&w.1[i]);
            }
            rows.push(TransportRow {
                transport: t,
                workers,
                op,
                size_bytes: size,
                sample,
            });
            i += 1;
        }
    }
    Ok((rows, why))
}

/// Single-thread memcpy of each size (the baseline of the transport table when the raw
/// TCP baselines do not run).
fn memcpy_only(sizes: &[usize], budget: &Budget) -> Vec<(usize, Sample)> {
    sizes
        .iter()
        .map(|&size| {
            let m = baseline::memcpy(size, budget);
            eprintln!(
                "  baseline {:>7}: memcpy {:6.1} GB/s",
                size_name(size),
                m.gb_per_s()
            );
            (size, m)
        })
        .collect()
}

/// What a run produced: the `tcp` section's report (when the tcp column ran) and the
/// transport table (when a one-sided column was asked for).
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The TCP tables (the `tcp` / `tcp-quick` section).
    pub tcp: Option<Report>,
    /// The transport table (the `onesided` / `onesided-quick` section).
    pub transports: Option<TransportReport>,
}

/// Run the bench as `args` says; `command` is the command line to print.
pub fn run(args: &RunArgs, command: String) -> Result<RunOutcome, BenchError> {
    let mut notes = Vec::new();
    if args.wait_quiet > 0 {
        eprintln!(
            "waiting up to {} s for other processes to use under {} cores...",
            args.wait_quiet, args.quiet_threshold
        );
        let (others, quiet) = wait_quiet(
            std::time::Duration::from_secs(args.wait_quiet),
            args.quiet_threshold,
        );
        let line = if quiet {
            format!("Started once other processes used under {} cores for 3 s (last second: {others:.2} cores).", args.quiet_threshold)
        } else {
            format!("Waited {} s for a quiet machine and gave up (other processes used {others:.2} cores in the last second).", args.wait_quiet)
        };
        eprintln!("{line}");
        notes.push(line);
    }
    let started = Instant::now();
    let cpu_start = CpuTimes::now();
    let mut disturbance: Vec<(String, f64)> = Vec::new();
    let machine = Machine::detect();
    let budget = budget(args);
    println!("command: {command}");
    println!("machine: {}", machine.describe());
    let tcp = args.has(Transport::Tcp);
    // The one-sided columns that can run here; the others say why not.
    let mut one_sided = Vec::new();
    let mut unavailable = Vec::new();
    for t in Transport::ALL
        .into_iter()
        .filter(|t| t.one_sided() && args.has(*t))
    {
        if t == Transport::Rdma {
            if let Err(why) = pserv_engine::onesided::rdma_available() {
                let line = format!("no device ({why})");
                println!("rdma: {line}");
                unavailable.push((t, line));
                continue;
            }
        }
        one_sided.push(t);
    }
    let soft_rdma =
        one_sided.contains(&Transport::Rdma) && pserv_engine::onesided::rdma_is_software_device();
    if one_sided.contains(&Transport::Rdma) {
        let devs = pserv_engine::onesided::rdma_devices_described().unwrap_or_default();
        println!("rdma: {}", devs.join(", "));
    }
    notes.extend([
        format!(
            "Each figure: {:.2} s warm-up, then {:.2} s measured (at least {} operations); value bytes in GB/s = 10^9 B/s; push+pull counts its value bytes both ways; with 2 workers, GB/s and keys/s are the sum over both workers and latencies are merged.",
            budget.warmup.as_secs_f64(),
            budget.measure.as_secs_f64(),
            budget.min_ops
        ),
        "Latency = issue to `wait` return per request; with 8 in flight it includes queueing behind the 7 before it. Ratios: dense GB/s vs the raw TCP stream of the same size, p50 vs the raw ping-pong p50 of the same size.".into(),
        "Raw TCP stream: one std::net connection, 1 MiB writes, receiver reads into a reused buffer of the transfer size and answers 1 byte; ping-pong: N-byte request, 8-byte answer, blocking, TCP_NODELAY; both ends are threads of the bench process, measured OS-placed, both pinned to core 0 and pinned to cores 0 and 1; ratios use the best placement (highest GB/s, lowest p50). memcpy: one thread into a pre-populated buffer; f32 sum: one thread `dst[i] += src[i]` (the server's update, without the store).".into(),
    ]);
    if args.filtered() {
        notes.push("A filtered run (--only / --sizes / --ops / --in-flight / --keys / --workers): not every cell was measured.".into());
    }
    if args.quick {
        notes.push(
            "--quick: shorter measurements, baselines measured once, knob sweep skipped.".into(),
        );
    }
    let mut baseline_rows = Vec::new();
    let mut memcpy_rows = Vec::new();
    if args.runs(Part::Baselines) {
        eprintln!("baselines (before the pserv cells):");
        let t = CpuTimes::now();
        if tcp {
            baseline_rows = baselines(&args.sizes(), &budget)?;
        } else if !one_sided.is_empty() {
            memcpy_rows = memcpy_only(&args.sizes(), &budget);
        }
        disturbance.push(("baselines".into(), CpuTimes::now().others_since(&t)));
    }
    let mut dense = Vec::new();
    let mut sparse = Vec::new();
    let mut transport_rows = Vec::new();
    let mut configs: Vec<(Transport, String)> = Vec::new();
    let mut granted = Vec::new();
    let mut onesided_disturbance: Vec<(String, f64)> = Vec::new();
    for &w in &args.workers {
        // Each worker count measures tcp, then the one-sided columns, back to back.
        if tcp && (args.runs(Part::Dense) || args.runs(Part::Sparse)) {
            eprintln!("pserv, {w} worker(s): {}", args.setup(w).describe());
            let t = CpuTimes::now();
            let (d, s) = pserv_cells(args, w, &budget)?;
            let others = CpuTimes::now().others_since(&t);
            disturbance.push((format!("pserv, {w} worker(s)"), others));
            onesided_disturbance.push((format!("tcp, {w} worker(s)"), others));
            dense.extend(d);
            sparse.extend(s);
            if !configs.iter().any(|(t, _)| *t == Transport::Tcp) {
                configs.push((Transport::Tcp, args.setup(w).describe()));
            }
        }
        if args.runs(Part::Dense) {
            for &t in &one_sided {
                let mut setup = args.setup(w);
                setup.transport = t.kind();
                eprintln!("pserv {}, {w} worker(s): {}", t.name(), setup.describe());
                let cpu = CpuTimes::now();
                let (rows, why) = onesided_cells(args, w, t, &budget)?;
                let others = CpuTimes::now().others_since(&cpu);
                disturbance.push((format!("pserv {}, {w} worker(s)", t.name()), others));
                onesided_disturbance.push((format!("{}, {w} worker(s)", t.name()), others));
                transport_rows.extend(rows);
                if !configs.iter().any(|(c, _)| *c == t) {
                    configs.push((t, setup.describe()));
                    granted.push(format!("{} window: {why}", t.name()));
                }
            }
        }
    }
    let mut knob_rows = Vec::new();
    if tcp && args.runs(Part::Knobs) {
        eprintln!("knob sweep (1 worker, half-length measurements):");
        let t = CpuTimes::now();
        knob_rows = knobs(args, &budget)?;
        disturbance.push(("knob sweep".into(), CpuTimes::now().others_since(&t)));
    } else {
        notes.push("Knob sweep not run (run without --quick, or with --only knobs).".into());
    }
    if !args.quick && args.runs(Part::Baselines) {
        eprintln!("baselines (after the pserv cells):");
        let t = CpuTimes::now();
        if !baseline_rows.is_empty() {
            let again = baselines(&args.sizes(), &budget)?;
            baseline_rows = merge_baselines(baseline_rows, again);
            notes.push("Baselines were measured before and after the pserv cells; the tables keep the better of the two (the harder comparison for pserv).".into());
        }
        if !memcpy_rows.is_empty() {
            let again = memcpy_only(&args.sizes(), &budget);
            memcpy_rows = memcpy_rows
                .into_iter()
                .zip(again)
                .map(|((s, a), (_, b))| (s, Sample::higher_goodput(a, b)))
                .collect();
        }
        disturbance.push(("baselines again".into(), CpuTimes::now().others_since(&t)));
    }
    disturbance.push(("whole run".into(), CpuTimes::now().others_since(&cpu_start)));
    let cpu_note = |d: &[(String, f64)]| {
        format!(
            "CPU used by other processes (cores, average; {} cores in all): {}.",
            pserv_sys::cpu::core_count(),
            d.iter()
                .map(|(what, c)| format!("{what} {c:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    notes.push(cpu_note(&disturbance));
    let elapsed = started.elapsed();
    let load_end = load_average();
    if memcpy_rows.is_empty() {
        memcpy_rows = baseline_rows
            .iter()
            .map(|b| (b.size_bytes, b.memcpy.clone()))
            .collect();
    }
    let tcp_report = tcp.then(|| {
        let report = Report {
            command: command.clone(),
            machine: machine.clone(),
            load_end: load_end.clone(),
            quick: args.quick,
            config: args.setup(1).describe(),
            notes,
            baselines: baseline_rows,
            dense: dense.clone(),
            sparse: sparse.clone(),
            knobs: knob_rows,
            elapsed,
        };
        let md = report.to_markdown();
        println!("\n{md}");
        report
    });
    if let Some(report) = &tcp_report {
        if !args.no_write {
            let section = if args.quick { SECTION_QUICK } else { SECTION };
            write_section(&args.results, section, &report.to_markdown())
                .map_err(|e| BenchError::io(format!("writing {}", args.results.display()), e))?;
            println!("wrote section `{section}` of {}", args.results.display());
        }
    }
    let transports = (!one_sided.is_empty() || !unavailable.is_empty()).then(|| {
        let mut columns: Vec<Transport> = Vec::new();
        if tcp {
            columns.push(Transport::Tcp);
        }
        columns.extend(one_sided.iter().copied());
        let mut rows: Vec<TransportRow> = dense
            .iter()
            .filter(|r| r.cell.in_flight == 1)
            .map(|r| TransportRow {
                transport: Transport::Tcp,
                workers: r.workers,
                op: r.cell.op,
                size_bytes: r.cell.size_bytes,
                sample: r.sample.clone(),
            })
            .collect();
        rows.extend(transport_rows);
        let mut tnotes = vec![
            format!(
                "Each figure: {:.2} s warm-up, then {:.2} s measured (at least {} operations), one request at a time per worker; value bytes in GB/s = 10^9 B/s; push+pull counts its value bytes both ways; with 2 workers GB/s is the sum over both workers (so x memcpy can pass 1) and latencies are merged.",
                budget.warmup.as_secs_f64(),
                budget.measure.as_secs_f64(),
                budget.min_ops
            ),
            "tcp: measured in this run, the same cells as the `tcp` section's with 1 in flight (`push_range` / `pull_range` / `push_pull_range`, then `wait`; server `--transport tcp`).".into(),
            "shm / rdma: server `--transport shm` / `rdma`, workers `WorkerConfig::transport` the same; each worker opens the server's one window once (`open_window`) on a range holding every worker's dense ranges (each starting on a 16 KiB block boundary). push = `push_range_now` (values written into the worker's landing area + a notice; returns once the server applied the sum and published the blocks); pull = `pull_range_into` (seqlock-validated one-sided read of the server's blocks into the worker's buffer); push+pull = `push_range_now` then `pull_range_into` (two calls, where tcp sends one `push_pull_range` request). After each cell a pull checks that every key holds the same sum.".into(),
            "x memcpy: GB/s over the single-thread memcpy of the same size in this run's baselines; x tcp: over the tcp GB/s of the same cell; latency is the call (or issue to `wait`) per request.".into(),
            "Sparse key lists take the two-sided path for every transport (the server serves them the same way whatever `--transport` says), so they are measured once, over tcp, and reported once.".into(),
        ];
        tnotes.push(format!(
            "Worker counts {:?}: a fresh cluster per transport and worker count (the cluster lines above show the first); per worker count, tcp runs first, then the one-sided columns.",
            args.workers
        ));
        tnotes.extend(granted.iter().cloned());
        if one_sided.contains(&Transport::Rdma) {
            let devs = pserv_engine::onesided::rdma_devices_described().unwrap_or_default();
            tnotes.push(format!("rdma devices: {}.", devs.join(", ")));
        }
        if args.filtered() {
            tnotes.push("A filtered run (--only / --sizes / --ops / --in-flight / --keys / --workers): not every cell was measured.".into());
        }
        if !tcp {
            tnotes.push("No tcp column in this run (--transport without tcp): no x tcp ratios, no sparse cells.".into());
        }
        onesided_disturbance.push(("whole run".into(), CpuTimes::now().others_since(&cpu_start)));
        tnotes.push(cpu_note(&onesided_disturbance));
        TransportReport {
            command: command.clone(),
            machine: machine.clone(),
            load_end: load_end.clone(),
            quick: args.quick,
            configs,
            notes: tnotes,
            columns,
            unavailable,
            memcpy: memcpy_rows,
            rows,
            sparse: if tcp { sparse.clone() } else { Vec::new() },
            elapsed,
            soft_rdma,
        }
    });
    if let Some(report) = &transports {
        let md = report.to_markdown();
        println!("\n{md}");
        if one_sided.is_empty() {
            println!(
                "no one-sided column could run; section `{}` left as it is",
                report.section()
            );
        } else if !args.no_write {
            let section = report.section();
            write_section(&args.results, section, &md)
                .map_err(|e| BenchError::io(format!("writing {}", args.results.display()), e))?;
            println!("wrote section `{section}` of {}", args.results.display());
        }
    }
    Ok(RunOutcome {
        tcp: tcp_report,
        transports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("valid arguments")
            .run
    }

    #[test]
    fn transport_columns_default_to_all_three() {
        let a = parse(&[]);
        assert_eq!(a.transport, Transport::ALL);
        let a = parse(&["--transport", "tcp,shm"]);
        assert!(a.has(Transport::Tcp) && !a.has(Transport::Rdma));
        let a = parse(&["--transport", "shm,rdma"]);
        assert_eq!(a.transport, [Transport::Shm, Transport::Rdma]);
        assert!(!a.has(Transport::Tcp));
        assert!(Cli::try_parse_from(["bench", "--transport", "udp"]).is_err());
    }

    #[test]
    fn the_tcp_cluster_keeps_the_two_sided_server() {
        let a = parse(&["--quick"]);
        assert_eq!(
            a.setup(1).transport,
            pserv_engine::onesided::TransportKind::Tcp
        );
        assert!(!a.setup(1).describe().contains("--transport"));
    }
}
