//! The transport table: the same dense cells over tcp (two-sided) and over the one-sided
//! paths (shm, rdma where a device is present), each next to the single-thread memcpy of
//! the same run, with the targets. It is the `onesided` section of
//! `bench/RESULTS.md` (`onesided-quick` for `--quick` runs).

use std::fmt::Write as _;
use std::time::Duration;

use crate::machine::Machine;
use crate::onesided::Transport;
use crate::report::{count_name, size_name, SparseRow};
use crate::stats::Sample;
use crate::workload::DenseOp;

/// The section of RESULTS.md a full run writes.
pub const SECTION: &str = "onesided";
/// The section a `--quick` run writes.
pub const SECTION_QUICK: &str = "onesided-quick";
/// The sections a run whose rdma column used the software device writes (never the
/// sections above, which hold hardware or shm figures).
pub const SECTION_SOFT: &str = "onesided-softrdma";
/// See [`SECTION_SOFT`].
pub const SECTION_SOFT_QUICK: &str = "onesided-softrdma-quick";

/// Target: shm pull of 16 MiB at least this fraction of the memcpy of the same run.
pub const TARGET_PULL_16M_X_MEMCPY: f64 = 0.7;
/// Target: shm push of 16 MiB (landing plus the server's update) at least this fraction
/// of memcpy.
pub const TARGET_PUSH_16M_X_MEMCPY: f64 = 0.4;
/// Target: shm pull of 4 KiB, p50 below this many microseconds.
pub const TARGET_PULL_4K_P50_US: f64 = 5.0;

/// One dense cell over one transport, 1 request in flight per worker.
#[derive(Clone, Debug)]
pub struct TransportRow {
    /// The transport.
    pub transport: Transport,
    /// Workers that ran it at the same time.
    pub workers: u32,
    /// The operation.
    pub op: DenseOp,
    /// Value bytes per request.
    pub size_bytes: usize,
    /// All workers merged (GB/s summed, latencies merged).
    pub sample: Sample,
}

/// One of the targets against this run.
#[derive(Clone, Debug)]
pub struct TransportTarget {
    /// What is measured.
    pub name: String,
    /// The figure, in words.
    pub measured: String,
    /// The goal, in words.
    pub goal: String,
    /// Measured over goal, oriented so that 1.0 or more meets it (None: not measured).
    pub of_goal: Option<f64>,
    /// Whether it was met (None: not measured).
    pub met: Option<bool>,
}

/// Everything the transport comparison of a run measured.
#[derive(Clone, Debug)]
pub struct TransportReport {
    /// The command as typed.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Load averages when the run ended.
    pub load_end: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// The cluster of each measured transport, in words.
    pub configs: Vec<(Transport, String)>,
    /// Remarks.
    pub notes: Vec<String>,
    /// The measured columns, in report order.
    pub columns: Vec<Transport>,
    /// Columns asked for that could not run here, and why.
    pub unavailable: Vec<(Transport, String)>,
    /// Single-thread memcpy per size, from this run's baselines.
    pub memcpy: Vec<(usize, Sample)>,
    /// The dense cells of every column.
    pub rows: Vec<TransportRow>,
    /// The sparse cells (two-sided for every transport; measured once, over tcp).
    pub sparse: Vec<SparseRow>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Whether the rdma column ran on the software device of `sys/softrdma` (its
    /// figures are the emulation's; the column says so).
    pub soft_rdma: bool,
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn x(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}x"),
        _ => "-".into(),
    }
}

impl TransportReport {
    /// The section of RESULTS.md this report belongs in.
    pub fn section(&self) -> &'static str {
        match (self.soft_rdma, self.quick) {
            (true, true) => SECTION_SOFT_QUICK,
            (true, false) => SECTION_SOFT,
            (false, true) => SECTION_QUICK,
            (false, false) => SECTION,
        }
    }

    /// A column's name in the tables: `rdma (software device)` when it ran on
    /// `sys/softrdma`.
    pub fn label(&self, t: Transport) -> String {
        if t == Transport::Rdma && self.soft_rdma {
            "rdma (software device)".into()
        } else {
            t.name().into()
        }
    }

    /// The row of (transport, op, size, workers).
    pub fn row(
        &self,
        t: Transport,
        op: DenseOp,
        size: usize,
        workers: u32,
    ) -> Option<&TransportRow> {
        self.rows.iter().find(|r| {
            r.transport == t && r.op == op && r.size_bytes == size && r.workers == workers
        })
    }

    /// The memcpy GB/s of `size`.
    pub fn memcpy_gbps(&self, size: usize) -> Option<f64> {
        self.memcpy
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, m)| m.gb_per_s())
    }

    /// `t`'s GB/s over memcpy's for the cell.
    pub fn x_memcpy(&self, t: Transport, op: DenseOp, size: usize, workers: u32) -> Option<f64> {
        let r = self.row(t, op, size, workers)?;
        let m = self.memcpy_gbps(size).filter(|m| *m > 0.0)?;
        Some(r.sample.gb_per_s() / m)
    }

    /// `t`'s GB/s over tcp's for the cell.
    pub fn x_tcp(&self, t: Transport, op: DenseOp, size: usize, workers: u32) -> Option<f64> {
        let r = self.row(t, op, size, workers)?;
        let tcp = self.row(Transport::Tcp, op, size, workers)?;
        let b = tcp.sample.gb_per_s();
        (b > 0.0).then(|| r.sample.gb_per_s() / b)
    }

    /// The (workers, size, op) cells measured by any column, in report order.
    fn cells(&self) -> Vec<(u32, usize, DenseOp)> {
        let mut cells: Vec<(u32, usize, usize)> = self
            .rows
            .iter()
            .map(|r| {
                let op = DenseOp::ALL.iter().position(|o| *o == r.op).unwrap_or(0);
                (r.workers, r.size_bytes, op)
            })
            .collect();
        cells.sort_unstable();
        cells.dedup();
        cells
            .into_iter()
            .map(|(w, s, o)| (w, s, DenseOp::ALL[o]))
            .collect()
    }

    /// The shm targets against this run.
    pub fn targets(&self) -> Vec<TransportTarget> {
        let shm = Transport::Shm;
        let m16 = 16 << 20;
        let k4 = 4 << 10;
        let mut out = Vec::new();
        for (op, goal, what) in [
            (DenseOp::Pull, TARGET_PULL_16M_X_MEMCPY, "shm pull 16 MiB"),
            (
                DenseOp::Push,
                TARGET_PUSH_16M_X_MEMCPY,
                "shm push 16 MiB (landing + server apply)",
            ),
        ] {
            let ratio = self.x_memcpy(shm, op, m16, 1);
            let measured = match (self.row(shm, op, m16, 1), self.memcpy_gbps(m16), ratio) {
                (Some(r), Some(m), Some(v)) => format!(
                    "{:.2} GB/s vs memcpy {m:.2} GB/s = {v:.2}x",
                    r.sample.gb_per_s()
                ),
                _ => "not measured".into(),
            };
            out.push(TransportTarget {
                name: format!("{what}, 1 worker"),
                measured,
                goal: format!(">= {goal:.2}x single-thread memcpy"),
                of_goal: ratio.map(|v| v / goal),
                met: ratio.map(|v| v >= goal),
            });
        }
        let pull4 = self.row(shm, DenseOp::Pull, k4, 1);
        out.push(TransportTarget {
            name: "shm pull 4 KiB latency, 1 worker".into(),
            measured: pull4.map_or("not measured".into(), |r| {
                format!(
                    "p50 {:.2} us (p99 {:.2} us)",
                    r.sample.latency_us_p50(),
                    r.sample.latency_us_p99()
                )
            }),
            goal: format!("p50 < {TARGET_PULL_4K_P50_US:.0} us"),
            of_goal: pull4.map(|r| TARGET_PULL_4K_P50_US / r.sample.latency_us_p50().max(1e-9)),
            met: pull4.map(|r| r.sample.latency_us_p50() < TARGET_PULL_4K_P50_US),
        });
        let mut sizes: Vec<usize> = self.rows.iter().map(|r| r.size_bytes).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for size in sizes {
            let ratios: Vec<(f64, DenseOp, u32)> = self
                .cells()
                .into_iter()
                .filter(|(_, s, _)| *s == size)
                .filter_map(|(w, s, op)| self.x_tcp(shm, op, s, w).map(|v| (v, op, w)))
                .collect();
            let worst = ratios.iter().min_by(|a, b| a.0.total_cmp(&b.0));
            out.push(TransportTarget {
                name: format!("shm faster than tcp, {}", size_name(size)),
                measured: worst.map_or("not measured (needs both columns)".into(), |(v, op, w)| {
                    format!(
                        "slowest of {} cells: {v:.2}x tcp ({}, {w} worker{})",
                        ratios.len(),
                        op.name(),
                        if *w == 1 { "" } else { "s" }
                    )
                }),
                goal: "> 1.00x tcp GB/s in every cell (ops x workers)".into(),
                of_goal: worst.map(|w| w.0),
                met: worst.map(|w| w.0 > 1.0),
            });
        }
        out
    }

    /// The report as Markdown (the body of the RESULTS.md section).
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(
            w,
            "## Dense ranges by transport: tcp (two-sided) vs one-sided shm / rdma{} ({} run)\n",
            if self.soft_rdma {
                " on the software RDMA device"
            } else {
                ""
            },
            if self.quick { "quick" } else { "full" }
        );
        if self.soft_rdma {
            let _ = writeln!(
                w,
                "The rdma column ran on the software RDMA device of `sys/softrdma` (`scripts/soft-rdma`): a \
                 replacement libibverbs whose NIC is a progress thread per process moving data over Unix \
                 sockets. It shows that the verbs path runs and what it costs in software; it says nothing \
                 about RDMA hardware, whose figures come from `scripts/rdma-check` on a NIC.\n"
            );
        }
        let _ = writeln!(w, "- Command: `{}`", self.command);
        let _ = writeln!(w, "- Machine: {}", self.machine.describe());
        let _ = writeln!(
            w,
            "- Load average at the end: {}; run took {:.0} s",
            self.load_end,
            self.elapsed.as_secs_f64()
        );
        for (t, c) in &self.configs {
            let _ = writeln!(w, "- Cluster, {}: {c}", self.label(*t));
        }
        for (t, why) in &self.unavailable {
            let _ = writeln!(w, "- {}: {why}", self.label(*t));
        }
        for n in &self.notes {
            let _ = writeln!(w, "- {n}");
        }

        let targets = if self.columns.contains(&Transport::Shm) {
            self.targets()
        } else {
            Vec::new()
        };
        if !targets.is_empty() {
            let _ = writeln!(w, "\n### Targets (shm)\n");
            let _ = writeln!(w, "| target | measured | goal | x goal | result |");
            let _ = writeln!(w, "|---|---|---|---|---|");
        }
        for t in targets {
            let result = match t.met {
                Some(true) => "pass",
                Some(false) => "**short**",
                None => "-",
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {result} |",
                t.name,
                t.measured,
                t.goal,
                x(t.of_goal)
            );
        }

        let one_sided: Vec<Transport> = self
            .columns
            .iter()
            .copied()
            .filter(|t| t.one_sided())
            .collect();
        let _ = writeln!(
            w,
            "\n### Dense, 1 request at a time per worker (GB/s of value bytes; latency p50 / p99 in us)\n"
        );
        let mut head = String::from("| op | size | workers | memcpy GB/s |");
        let mut rule = String::from("|---|---|---|---|");
        for t in &self.columns {
            let _ = write!(head, " {} GB/s |", self.label(*t));
            rule.push_str("---|");
        }
        for t in &one_sided {
            let _ = write!(head, " {0} x memcpy | {0} x tcp |", self.label(*t));
            rule.push_str("---|---|");
        }
        for t in &self.columns {
            let _ = write!(head, " {} p50 / p99 us |", self.label(*t));
            rule.push_str("---|");
        }
        let _ = writeln!(w, "{head}\n{rule}");
        for (workers, size, op) in self.cells() {
            let _ = write!(
                w,
                "| {} | {} | {workers} | {} |",
                op.name(),
                size_name(size),
                self.memcpy_gbps(size)
                    .map_or("-".into(), |m| format!("{m:.2}"))
            );
            for t in &self.columns {
                let v = self.row(*t, op, size, workers);
                let _ = write!(
                    w,
                    " {} |",
                    v.map_or("-".into(), |r| format!("{:.2}", r.sample.gb_per_s()))
                );
            }
            for t in &one_sided {
                let _ = write!(
                    w,
                    " {} | {} |",
                    x(self.x_memcpy(*t, op, size, workers)),
                    x(self.x_tcp(*t, op, size, workers))
                );
            }
            for t in &self.columns {
                let v = self.row(*t, op, size, workers);
                let _ = write!(
                    w,
                    " {} |",
                    v.map_or("-".into(), |r| format!(
                        "{} / {}",
                        us(r.sample.latency_us_p50()),
                        us(r.sample.latency_us_p99())
                    ))
                );
            }
            let _ = writeln!(w);
        }

        let _ = writeln!(w, "\n### 4 KiB latency, 1 worker, 1 request at a time\n");
        let _ = writeln!(
            w,
            "| op | transport | p50 us | p99 us | p50 x tcp | ops/s |\n|---|---|---|---|---|---|"
        );
        for op in [DenseOp::Pull, DenseOp::Push] {
            let tcp = self
                .row(Transport::Tcp, op, 4 << 10, 1)
                .map(|r| r.sample.latency_us_p50());
            for t in &self.columns {
                if let Some(r) = self.row(*t, op, 4 << 10, 1) {
                    let p50 = r.sample.latency_us_p50();
                    let _ = writeln!(
                        w,
                        "| {} | {} | {:.2} | {:.2} | {} | {:.0} |",
                        op.name(),
                        self.label(*t),
                        p50,
                        r.sample.latency_us_p99(),
                        x(tcp.filter(|v| *v > 0.0).map(|v| p50 / v)),
                        r.sample.ops_per_s()
                    );
                }
            }
        }

        let _ = writeln!(
            w,
            "\n### Sparse (two-sided for every transport: measured once, over tcp)\n"
        );
        if self.sparse.is_empty() {
            let _ = writeln!(
                w,
                "Not measured in this run (it needs the tcp column and the sparse part)."
            );
        } else {
            let _ = writeln!(
                w,
                "| op | keys | pattern | workers | M keys/s | p50 us | p99 us |\n|---|---|---|---|---|---|---|"
            );
            for r in &self.sparse {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {:.1} | {} | {} |",
                    r.cell.op.name(),
                    count_name(r.cell.keys),
                    r.cell.pattern.name(),
                    r.workers,
                    r.sample.keys_per_s() / 1e6,
                    us(r.sample.latency_us_p50()),
                    us(r.sample.latency_us_p99())
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(gbps: f64, p50_us: u64) -> Sample {
        let mut s = Sample::new();
        s.ops = 1000;
        s.elapsed = Duration::from_secs(1);
        s.bytes = (gbps * 1e9) as u64;
        for _ in 0..1000 {
            s.record(Duration::from_micros(p50_us));
        }
        s
    }

    fn report(rows: Vec<TransportRow>) -> TransportReport {
        TransportReport {
            command: "bench".into(),
            machine: Machine::detect(),
            load_end: "0 0 0".into(),
            quick: true,
            configs: vec![],
            notes: vec![],
            columns: vec![Transport::Tcp, Transport::Shm],
            unavailable: vec![(Transport::Rdma, "no device (none here)".into())],
            memcpy: vec![(4 << 10, sample(80.0, 1)), (16 << 20, sample(20.0, 800))],
            rows,
            sparse: vec![],
            elapsed: Duration::from_secs(1),
            soft_rdma: false,
        }
    }

    fn row(t: Transport, op: DenseOp, size: usize, gbps: f64, p50: u64) -> TransportRow {
        TransportRow {
            transport: t,
            workers: 1,
            op,
            size_bytes: size,
            sample: sample(gbps, p50),
        }
    }

    #[test]
    fn a_software_device_column_says_so_and_goes_to_its_own_section() {
        let mut r = report(vec![
            row(Transport::Tcp, DenseOp::Pull, 4 << 10, 0.2, 16),
            row(Transport::Rdma, DenseOp::Pull, 4 << 10, 0.1, 40),
        ]);
        r.columns = vec![Transport::Tcp, Transport::Rdma];
        r.unavailable.clear();
        assert_eq!(r.section(), SECTION_QUICK);
        assert!(r.to_markdown().contains("| rdma GB/s |"));
        r.soft_rdma = true;
        assert_eq!(r.section(), SECTION_SOFT_QUICK);
        r.quick = false;
        assert_eq!(r.section(), SECTION_SOFT);
        let md = r.to_markdown();
        assert!(md.contains("| rdma (software device) GB/s |"), "{md}");
        assert!(md.contains("says nothing about RDMA hardware"), "{md}");
        assert!(md.contains("| pull | rdma (software device) |"), "{md}");
    }

    #[test]
    fn targets_pass_and_fall_short_with_ratios() {
        let m16 = 16 << 20;
        let r = report(vec![
            row(Transport::Tcp, DenseOp::Pull, m16, 4.0, 4000),
            row(Transport::Shm, DenseOp::Pull, m16, 16.0, 1000),
            row(Transport::Tcp, DenseOp::Push, m16, 3.0, 5000),
            row(Transport::Shm, DenseOp::Push, m16, 6.0, 2500),
            row(Transport::Tcp, DenseOp::Pull, 4 << 10, 0.2, 16),
            row(Transport::Shm, DenseOp::Pull, 4 << 10, 1.0, 3),
        ]);
        let t = r.targets();
        let by = |n: &str| t.iter().find(|x| x.name.starts_with(n)).unwrap();
        let pull = by("shm pull 16 MiB");
        assert_eq!(pull.met, Some(true));
        assert!((pull.of_goal.unwrap() - 0.8 / 0.7).abs() < 1e-3);
        let push = by("shm push 16 MiB");
        assert_eq!(push.met, Some(false));
        assert!((push.of_goal.unwrap() - 0.3 / 0.4).abs() < 1e-3);
        assert_eq!(by("shm pull 4 KiB").met, Some(true));
        let faster = by("shm faster than tcp, 16 MiB");
        assert_eq!(faster.met, Some(true));
        assert!((faster.of_goal.unwrap() - 2.0).abs() < 1e-3, "{faster:?}");
        let md = r.to_markdown();
        assert!(md.contains("rdma: no device (none here)"), "{md}");
        assert!(md.contains("| shm x memcpy | shm x tcp |"), "{md}");
        assert!(md.contains("**short**"), "{md}");
    }

    #[test]
    fn missing_columns_are_not_measured() {
        let r = report(vec![row(Transport::Shm, DenseOp::Pull, 4 << 10, 1.0, 3)]);
        let t = r.targets();
        let faster = t.iter().find(|x| x.name.contains("faster")).unwrap();
        assert_eq!(faster.met, None);
        assert!(t
            .iter()
            .any(|x| x.name.contains("16 MiB") && x.met.is_none()));
        assert!(r
            .to_markdown()
            .contains("| pull | 4 KiB | 1 | 80.00 | - | 1.00 |"));
    }
}
