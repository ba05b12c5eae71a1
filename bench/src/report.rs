//! The results of a run as Markdown tables, and the section of `bench/RESULTS.md` they
//! replace.
//!
//! RESULTS.md is shared: each harness owns one section between two markers
//! (`<!-- bench:tcp:start -->` ... `<!-- bench:tcp:end -->` for this one; `tcp-quick` for
//! `--quick` runs) and replaces only that, so sections other harnesses add (tau sweep,
//! shm / RDMA transports) survive.

use std::fmt::Write as _;
use std::time::Duration;

use crate::baseline::Placement;
use crate::machine::Machine;
use crate::stats::Sample;
use crate::workload::{DenseCell, DenseOp, KeyPattern, SparseCell, SparseOp};

/// The name of this harness's section in RESULTS.md.
pub const SECTION: &str = "tcp";
/// The section `--quick` runs write, so a quick run never replaces a full run's tables.
pub const SECTION_QUICK: &str = "tcp-quick";

/// ps-lite on this machine kind, from the issue: 16 MiB push GB/s with 1 in flight.
pub const PSLITE_16M_PUSH_GBPS_1: f64 = 4.1;
/// ps-lite: 16 MiB push GB/s with 8 in flight.
pub const PSLITE_16M_PUSH_GBPS_8: f64 = 5.8;
/// ps-lite: 4 KiB push p50 in microseconds.
pub const PSLITE_4K_PUSH_US_P50: f64 = 116.0;

/// The raw-socket baselines of one size and thread placement.
#[derive(Clone, Debug)]
pub struct PlacedBaseline {
    /// Where the two threads ran.
    pub placement: Placement,
    /// Raw single-stream TCP transfer.
    pub stream: Sample,
    /// Raw TCP ping-pong.
    pub ping_pong: Sample,
}

/// The baselines of one size.
#[derive(Clone, Debug)]
pub struct BaselineRow {
    /// Transfer size in bytes.
    pub size_bytes: usize,
    /// Every placement measured.
    pub placed: Vec<PlacedBaseline>,
    /// The best raw single-stream TCP transfer (highest GB/s over the placements).
    pub stream: Sample,
    /// Where the best stream ran.
    pub stream_placement: Placement,
    /// The best raw TCP ping-pong (request of the size, 8-byte answer; lowest p50).
    pub ping_pong: Sample,
    /// Where the best ping-pong ran.
    pub ping_pong_placement: Placement,
    /// Single-thread memcpy.
    pub memcpy: Sample,
    /// Single-thread f32 `dst += src` (the server's sum update).
    pub sum: Sample,
}

/// One dense pserv measurement.
#[derive(Clone, Debug)]
pub struct DenseRow {
    /// Workers that ran it at the same time.
    pub workers: u32,
    /// What was measured.
    pub cell: DenseCell,
    /// All workers merged.
    pub sample: Sample,
}

/// One sparse pserv measurement.
#[derive(Clone, Debug)]
pub struct SparseRow {
    /// Workers that ran it at the same time.
    pub workers: u32,
    /// What was measured.
    pub cell: SparseCell,
    /// All workers merged.
    pub sample: Sample,
    /// The slowest worker's first push (which inserted the keys), for push cells.
    pub first_push: Option<Duration>,
}

/// One configuration of the knob sweep.
#[derive(Clone, Debug)]
pub struct KnobRow {
    /// What was varied, in words.
    pub label: String,
    /// The worker's `spin_us`.
    pub spin_us: u64,
    /// The loops' `busy_poll_us` (server and worker).
    pub busy_poll_us: u64,
    /// 4 KiB push, 1 in flight.
    pub push_4k: Sample,
    /// 4 KiB pull, 1 in flight.
    pub pull_4k: Sample,
    /// 16 MiB push, 1 in flight.
    pub push_16m: Sample,
    /// 16 MiB pull, 1 in flight.
    pub pull_16m: Sample,
}

/// Everything a run measured, and where.
#[derive(Clone, Debug)]
pub struct Report {
    /// The command as typed.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Load averages when the run ended.
    pub load_end: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// The cluster layout used for the main tables.
    pub config: String,
    /// Remarks: what was skipped, how figures are defined.
    pub notes: Vec<String>,
    /// Baselines per size.
    pub baselines: Vec<BaselineRow>,
    /// Dense pserv measurements.
    pub dense: Vec<DenseRow>,
    /// Sparse pserv measurements.
    pub sparse: Vec<SparseRow>,
    /// The knob sweep (empty when skipped).
    pub knobs: Vec<KnobRow>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

/// "4 KiB", "16 MiB".
pub fn size_name(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes & ((1 << 10) - 1) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// "10^6" for powers of ten, else the number.
pub fn count_name(n: usize) -> String {
    let mut p = 0;
    let mut x = n;
    while x >= 10 && x.checked_rem(10) == Some(0) {
        x /= 10;
        p += 1;
    }
    if x == 1 && p > 1 {
        format!("10^{p}")
    } else {
        n.to_string()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One target of the issue and how the run did against it.
#[derive(Clone, Debug)]
pub struct TargetCheck {
    /// What is measured.
    pub name: String,
    /// The measured figure, in words.
    pub measured: String,
    /// The goal, in words.
    pub goal: String,
    /// Whether it was met (None: not measured in this run).
    pub met: Option<bool>,
    /// The best configuration of the knob sweep for this figure, in words (half-length
    /// measurements; empty when the sweep did not run).
    pub best_knob: String,
}

impl Report {
    fn baseline(&self, size: usize) -> Option<&BaselineRow> {
        self.baselines.iter().find(|b| b.size_bytes == size)
    }

    /// The dense row for (op, size, workers, in flight).
    pub fn dense_row(
        &self,
        op: DenseOp,
        size: usize,
        workers: u32,
        in_flight: usize,
    ) -> Option<&DenseRow> {
        self.dense.iter().find(|r| {
            r.cell.op == op
                && r.cell.size_bytes == size
                && r.workers == workers
                && r.cell.in_flight == in_flight
        })
    }

    /// The sparse row for (op, keys, pattern, workers).
    pub fn sparse_row(
        &self,
        op: SparseOp,
        keys: usize,
        pattern: KeyPattern,
        workers: u32,
    ) -> Option<&SparseRow> {
        self.sparse.iter().find(|r| {
            r.cell.op == op
                && r.cell.keys == keys
                && r.cell.pattern == pattern
                && r.workers == workers
        })
    }

    /// The targets against this run.
    pub fn targets(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let m16 = 16 << 20;
        for op in [DenseOp::Push, DenseOp::Pull] {
            let row = self.dense_row(op, m16, 1, 1);
            let base = self.baseline(m16);
            let (measured, met) = match (row, base) {
                (Some(r), Some(b)) => {
                    let x = r.sample.gb_per_s() / b.stream.gb_per_s();
                    (
                        format!(
                            "{:.2} GB/s vs raw TCP {:.2} GB/s = {x:.2}x",
                            r.sample.gb_per_s(),
                            b.stream.gb_per_s()
                        ),
                        Some(x >= 0.8),
                    )
                }
                _ => ("not measured".into(), None),
            };
            let pick = |k: &KnobRow| match op {
                DenseOp::Pull => k.pull_16m.gb_per_s(),
                _ => k.push_16m.gb_per_s(),
            };
            let best_knob = match (
                self.knobs.iter().max_by(|a, b| pick(a).total_cmp(&pick(b))),
                base,
            ) {
                (Some(k), Some(b)) => format!(
                    "{:.2} GB/s = {:.2}x ({}, spin_us={}, busy_poll_us={})",
                    pick(k),
                    pick(k) / b.stream.gb_per_s(),
                    k.label,
                    k.spin_us,
                    k.busy_poll_us
                ),
                _ => String::new(),
            };
            out.push(TargetCheck {
                name: format!("dense 16 MiB {}, 1 worker, 1 in flight", op.name()),
                measured,
                goal: ">= 0.80x raw single-stream TCP".into(),
                met,
                best_knob,
            });
        }
        let k4 = 4 << 10;
        let (measured, met) = match (self.dense_row(DenseOp::Push, k4, 1, 1), self.baseline(k4)) {
            (Some(r), Some(b)) => {
                let x = r.sample.latency_us_p50() / b.ping_pong.latency_us_p50();
                (
                    format!(
                        "p50 {:.1} us vs raw ping-pong {:.1} us = {x:.2}x",
                        r.sample.latency_us_p50(),
                        b.ping_pong.latency_us_p50()
                    ),
                    Some(x <= 1.3),
                )
            }
            _ => ("not measured".into(), None),
        };
        let best_knob = match (
            self.knobs.iter().min_by(|a, b| {
                a.push_4k
                    .latency_us_p50()
                    .total_cmp(&b.push_4k.latency_us_p50())
            }),
            self.baseline(k4),
        ) {
            (Some(k), Some(b)) => format!(
                "p50 {:.1} us = {:.2}x ({}, spin_us={}, busy_poll_us={})",
                k.push_4k.latency_us_p50(),
                k.push_4k.latency_us_p50() / b.ping_pong.latency_us_p50(),
                k.label,
                k.spin_us,
                k.busy_poll_us
            ),
            _ => String::new(),
        };
        out.push(TargetCheck {
            name: "dense 4 KiB push round trip, 1 worker, 1 in flight".into(),
            measured,
            goal: "p50 <= 1.30x raw TCP ping-pong p50".into(),
            met,
            best_knob,
        });
        let (measured, met) =
            match self.sparse_row(SparseOp::Push, 1_000_000, KeyPattern::Random, 1) {
                Some(r) => {
                    let mk = r.sample.keys_per_s() / 1e6;
                    (format!("{mk:.1} M keys/s"), Some(mk >= 50.0))
                }
                None => ("not measured".into(), None),
            };
        out.push(TargetCheck {
            name: "sparse push of 10^6 random keys, 1 worker".into(),
            measured,
            goal: ">= 50 M keys/s end to end".into(),
            met,
            best_knob: String::new(),
        });
        out
    }

    /// The report as Markdown (the body of the RESULTS.md section).
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(
            w,
            "## pserv over TCP loopback vs raw sockets ({} run)\n",
            if self.quick { "quick" } else { "full" }
        );
        let _ = writeln!(w, "- Command: `{}`", self.command);
        let _ = writeln!(w, "- Machine: {}", self.machine.describe());
        let _ = writeln!(
            w,
            "- Load average at the end: {}; run took {:.0} s",
            self.load_end,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(w, "- Cluster: {}", self.config);
        for n in &self.notes {
            let _ = writeln!(w, "- {n}");
        }

        let _ = writeln!(w, "\n### Targets\n");
        let _ = writeln!(
            w,
            "| target | measured (main configuration) | goal | met | best configuration of the knob sweep |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|");
        for t in self.targets() {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            let best = if t.best_knob.is_empty() {
                "-"
            } else {
                &t.best_knob
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {met} | {best} |",
                t.name, t.measured, t.goal
            );
        }
        let refs = [
            (
                DenseOp::Push,
                16 << 20,
                1usize,
                "16 MiB push, 1 in flight",
                PSLITE_16M_PUSH_GBPS_1,
                true,
            ),
            (
                DenseOp::Push,
                16 << 20,
                8,
                "16 MiB push, 8 in flight",
                PSLITE_16M_PUSH_GBPS_8,
                true,
            ),
            (
                DenseOp::Push,
                4 << 10,
                1,
                "4 KiB push p50",
                PSLITE_4K_PUSH_US_P50,
                false,
            ),
        ];
        let _ = writeln!(
            w,
            "\n| vs ps-lite (issue's figures, same machine kind) | pserv | ps-lite | ratio |"
        );
        let _ = writeln!(w, "|---|---|---|---|");
        for (op, size, inflight, name, theirs, goodput) in refs {
            if let Some(r) = self.dense_row(op, size, 1, inflight) {
                let (ours, ratio_s) = if goodput {
                    (
                        format!("{:.2} GB/s", r.sample.gb_per_s()),
                        ratio(r.sample.gb_per_s(), theirs),
                    )
                } else {
                    (
                        format!("{:.1} us", r.sample.latency_us_p50()),
                        ratio(r.sample.latency_us_p50(), theirs),
                    )
                };
                let unit = if goodput { "GB/s" } else { "us" };
                let _ = writeln!(w, "| {name} | {ours} | {theirs} {unit} | {ratio_s} |");
            }
        }

        let _ = writeln!(
            w,
            "\n### Baselines (same run; the best thread placement of each)\n"
        );
        let _ = writeln!(
            w,
            "| size | raw TCP stream GB/s | placement | stream p50 us | stream p99 us | ping-pong p50 us | placement | ping-pong p99 us | memcpy GB/s | f32 sum GB/s |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|");
        for b in &self.baselines {
            let _ = writeln!(
                w,
                "| {} | {:.2} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
                size_name(b.size_bytes),
                b.stream.gb_per_s(),
                b.stream_placement.name(),
                us(b.stream.latency_us_p50()),
                us(b.stream.latency_us_p99()),
                us(b.ping_pong.latency_us_p50()),
                b.ping_pong_placement.name(),
                us(b.ping_pong.latency_us_p99()),
                b.memcpy.gb_per_s(),
                b.sum.gb_per_s()
            );
        }
        let _ = writeln!(
            w,
            "\nRaw TCP by thread placement (stream GB/s / ping-pong p50 us):\n"
        );
        let _ = write!(w, "| size |");
        for p in Placement::ALL {
            let _ = write!(w, " {} |", p.name());
        }
        let _ = writeln!(w, "\n|---|---|---|---|");
        for b in &self.baselines {
            let _ = write!(w, "| {} |", size_name(b.size_bytes));
            for p in Placement::ALL {
                match b.placed.iter().find(|x| x.placement == p) {
                    Some(x) => {
                        let _ = write!(
                            w,
                            " {:.2} / {} |",
                            x.stream.gb_per_s(),
                            us(x.ping_pong.latency_us_p50())
                        );
                    }
                    None => {
                        let _ = write!(w, " - |");
                    }
                }
            }
            let _ = writeln!(w);
        }

        let _ = writeln!(
            w,
            "\n### Dense (push_range / pull_range / push_pull_range, f32, value_len 1, 1 server)\n"
        );
        let _ = writeln!(
            w,
            "| op | size | workers | in flight | GB/s | x raw TCP | x memcpy | p50 us | p99 us | p50 x ping-pong | ops/s |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.dense {
            let b = self.baseline(r.cell.size_bytes);
            let (x_tcp, x_mem, x_pp) = match b {
                Some(b) => (
                    ratio(r.sample.gb_per_s(), b.stream.gb_per_s()),
                    ratio(r.sample.gb_per_s(), b.memcpy.gb_per_s()),
                    ratio(r.sample.latency_us_p50(), b.ping_pong.latency_us_p50()),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.2} | {x_tcp} | {x_mem} | {} | {} | {x_pp} | {:.0} |",
                r.cell.op.name(),
                size_name(r.cell.size_bytes),
                r.workers,
                r.cell.in_flight,
                r.sample.gb_per_s(),
                us(r.sample.latency_us_p50()),
                us(r.sample.latency_us_p99()),
                r.sample.ops_per_s()
            );
        }

        let _ = writeln!(w, "\n### Sparse (sorted u64 key lists, f32, one value per key, update = sum, 1 in flight)\n");
        let _ = writeln!(
            w,
            "| op | keys | pattern | workers | M keys/s | GB/s (values) | p50 us | p99 us | first push (insert) M keys/s |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
        for r in &self.sparse {
            let first = r.first_push.map_or("-".into(), |d| {
                let keys = r.cell.keys as f64 * f64::from(r.workers);
                format!("{:.1}", keys / d.as_secs_f64().max(1e-12) / 1e6)
            });
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.1} | {:.2} | {} | {} | {first} |",
                r.cell.op.name(),
                count_name(r.cell.keys),
                r.cell.pattern.name(),
                r.workers,
                r.sample.keys_per_s() / 1e6,
                r.sample.gb_per_s(),
                us(r.sample.latency_us_p50()),
                us(r.sample.latency_us_p99()),
            );
        }

        if !self.knobs.is_empty() {
            let _ = writeln!(w, "\n### Knobs: worker `spin_us`, loop `busy_poll_us`, loop placement (1 worker, 1 in flight)\n");
            let _ = writeln!(
                w,
                "| configuration | spin_us | busy_poll_us | 4 KiB push p50 us | p99 us | 4 KiB pull p50 us | p99 us | 16 MiB push GB/s | 16 MiB pull GB/s |"
            );
            let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
            for k in &self.knobs {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                    k.label,
                    k.spin_us,
                    k.busy_poll_us,
                    us(k.push_4k.latency_us_p50()),
                    us(k.push_4k.latency_us_p99()),
                    us(k.pull_4k.latency_us_p50()),
                    us(k.pull_4k.latency_us_p99()),
                    k.push_16m.gb_per_s(),
                    k.pull_16m.gb_per_s()
                );
            }
        }
        s
    }
}

/// The start marker of section `name`.
pub fn start_marker(name: &str) -> String {
    format!("<!-- bench:{name}:start -->")
}

/// The end marker of section `name`.
pub fn end_marker(name: &str) -> String {
    format!("<!-- bench:{name}:end -->")
}

/// `doc` with section `name` replaced by `body` (between its markers); the section is
/// appended when the markers are missing. Everything outside the markers is kept as is.
pub fn replace_section(doc: &str, name: &str, body: &str) -> String {
    let (start, end) = (start_marker(name), end_marker(name));
    let block = format!("{start}\n{}\n{end}", body.trim_end());
    if let Some(a) = doc.find(&start) {
        if let Some(rel) = doc[a..].find(&end) {
            let b = a + rel + end.len();
            return format!("{}{block}{}", &doc[..a], &doc[b..]);
        }
    }
    let mut out = doc.to_string();
    if out.is_empty() {
        out.push_str("# pserv bench results\n\nEach section is written by one harness between its markers; re-running a harness replaces only its own section.\n");
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&block);
    out.push('\n');
    out
}

/// Write `md` as section `name` of the results file at `path` and say so (what the
/// sweeps that take `--results`, `--no-write` and `--section` do with their table).
pub fn publish_section(
    path: &std::path::Path,
    name: &str,
    md: &str,
) -> Result<(), crate::error::BenchError> {
    write_section(path, name, md)
        .map_err(|e| crate::error::BenchError::io(format!("writing {}", path.display()), e))?;
    eprintln!("wrote section {name} of {}", path.display());
    Ok(())
}

/// Replace section `name` of the file at `path` (created if missing).
pub fn write_section(path: &std::path::Path, name: &str, body: &str) -> std::io::Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let new = replace_section(&doc, name, body);
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_section() {
        let doc = "# R\n\nintro\n<!-- bench:tau:start -->\ntau table\n<!-- bench:tau:end -->\n\
                   <!-- bench:tcp:start -->\nold\n<!-- bench:tcp:end -->\ntrailer\n";
        let new = replace_section(doc, "tcp", "new table\n");
        assert_eq!(
            new,
            "# R\n\nintro\n<!-- bench:tau:start -->\ntau table\n<!-- bench:tau:end -->\n\
             <!-- bench:tcp:start -->\nnew table\n<!-- bench:tcp:end -->\ntrailer\n"
        );
        // Idempotent.
        assert_eq!(replace_section(&new, "tcp", "new table"), new);
    }

    #[test]
    fn appends_when_missing() {
        let new = replace_section("", "tcp", "t");
        assert!(new.starts_with("# pserv bench results"));
        assert!(new.ends_with("<!-- bench:tcp:start -->\nt\n<!-- bench:tcp:end -->\n"));
        let other = "# R\n<!-- bench:tau:start -->\nx\n<!-- bench:tau:end -->";
        let new = replace_section(other, "tcp", "t");
        assert!(new.starts_with(other));
        assert_eq!(replace_section(&new, "tcp", "t"), new);
    }

    #[test]
    fn names() {
        assert_eq!(size_name(4096), "4 KiB");
        assert_eq!(size_name(16 << 20), "16 MiB");
        assert_eq!(size_name(100), "100 B");
        assert_eq!(count_name(1_000_000), "10^6");
        assert_eq!(count_name(1000), "10^3");
        assert_eq!(count_name(1234), "1234");
    }
}
