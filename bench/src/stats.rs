//! Timing a workload and summarising it: operations, bytes, elapsed time and a latency
//! histogram (hdrhistogram, nanoseconds).
//!
//! [`run_pipelined`] drives any issue/complete pair with a fixed number of operations in
//! flight: it issues that many, then waits for the oldest before issuing the next, so
//! `in_flight = 1` is a plain request/answer loop. Latency is measured per operation from
//! its issue to the return of its completion, so with 8 in flight it includes the time an
//! operation queues behind the 7 before it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long a measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Time spent running the workload before anything is recorded (pages populated,
    /// buffers pooled, connections warm).
    pub warmup: Duration,
    /// Time the recorded part runs for (issuing stops after it; started ops complete).
    pub measure: Duration,
    /// Fewest operations recorded, even if that takes longer than `measure`.
    pub min_ops: u64,
    /// Most operations recorded, even if `measure` has not passed.
    pub max_ops: u64,
}

impl Budget {
    /// The budget of a full run.
    pub fn full() -> Self {
        Budget {
            warmup: Duration::from_millis(200),
            measure: Duration::from_millis(1000),
            min_ops: 10,
            max_ops: 2_000_000,
        }
    }

    /// The budget of a `--quick` run.
    pub fn quick() -> Self {
        Budget {
            warmup: Duration::from_millis(40),
            measure: Duration::from_millis(160),
            min_ops: 5,
            max_ops: 500_000,
        }
    }

    /// The same budget with the time parts scaled by `factor`.
    pub fn scaled(self, factor: f64) -> Self {
        Budget {
            warmup: self.warmup.mul_f64(factor),
            measure: self.measure.mul_f64(factor),
            ..self
        }
    }
}

/// The outcome of one measurement: how much moved in how long, and how long each
/// operation took.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Operations recorded.
    pub ops: u64,
    /// Payload bytes those operations moved (value bytes for pserv, the transfer for raw
    /// sockets, the copy for memcpy).
    pub bytes: u64,
    /// Keys those operations carried (sparse pushes and pulls; 0 elsewhere).
    pub keys: u64,
    /// Wall-clock time of the recorded part.
    pub elapsed: Duration,
    /// Latency of each recorded operation, in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl Default for Sample {
    fn default() -> Self {
        Self::new()
    }
}

impl Sample {
    /// An empty sample.
    pub fn new() -> Self {
        Sample {
            ops: 0,
            bytes: 0,
            keys: 0,
            elapsed: Duration::ZERO,
            // 1 ns to 100 s with 3 significant digits: about 40 KiB of counters.
            latency_ns: Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    /// Record one operation that took `latency`.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_ns.saturating_record(ns.max(1));
    }

    /// Fold in a sample taken at the same time by another thread: operations, bytes and
    /// keys add up, the elapsed time is the longer of the two, the histograms merge.
    pub fn merge_concurrent(&mut self, other: &Sample) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.keys += other.keys;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.latency_ns
            .add(&other.latency_ns)
            .expect("histograms with equal bounds merge");
    }

    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-12)
    }

    /// Goodput in GB/s (10^9 bytes per second).
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs() / 1e9
    }

    /// Operations per second.
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.secs()
    }

    /// Keys per second.
    pub fn keys_per_s(&self) -> f64 {
        self.keys as f64 / self.secs()
    }

    /// Median latency in microseconds.
    pub fn latency_us_p50(&self) -> f64 {
        self.latency_ns.value_at_quantile(0.50) as f64 / 1e3
    }

    /// 99th-percentile latency in microseconds.
    pub fn latency_us_p99(&self) -> f64 {
        self.latency_ns.value_at_quantile(0.99) as f64 / 1e3
    }

    /// Of two samples of the same workload, the one with the higher goodput.
    pub fn higher_goodput(a: Sample, b: Sample) -> Sample {
        if a.gb_per_s() >= b.gb_per_s() {
            a
        } else {
            b
        }
    }

    /// Of two samples of the same workload, the one with the lower median latency.
    pub fn lower_p50(a: Sample, b: Sample) -> Sample {
        if a.latency_us_p50() <= b.latency_us_p50() {
            a
        } else {
            b
        }
    }
}

/// Run a workload with `in_flight` operations outstanding, first for `budget.warmup`
/// unrecorded, then for `budget.measure` recorded.
///
/// `issue` starts one operation and returns a handle, `complete` waits for the handle's
/// operation to finish. Operations complete in issue order (the oldest is waited for
/// first). Each recorded operation counts `bytes_per_op` bytes and `keys_per_op` keys.
///
/// # Panics
/// If `in_flight` is 0.
pub fn run_pipelined<H>(
    budget: &Budget,
    in_flight: usize,
    bytes_per_op: u64,
    keys_per_op: u64,
    mut issue: impl FnMut() -> H,
    mut complete: impl FnMut(H),
) -> Sample {
    assert!(in_flight > 0, "at least one operation must be in flight");
    let mut queue: VecDeque<(H, Instant)> = VecDeque::with_capacity(in_flight);
    // Warm-up: the same loop, nothing recorded.
    let start = Instant::now();
    while start.elapsed() < budget.warmup {
        while queue.len() < in_flight {
            let t0 = Instant::now();
            queue.push_back((issue(), t0));
        }
        let (h, _) = queue.pop_front().expect("queue is full");
        complete(h);
    }
    for (h, _) in queue.drain(..) {
        complete(h);
    }
    let mut sample = Sample::new();
    let start = Instant::now();
    let mut issued = 0u64;
    let keep_issuing = |issued: u64| {
        issued < budget.min_ops || (issued < budget.max_ops && start.elapsed() < budget.measure)
    };
    loop {
        while queue.len() < in_flight && keep_issuing(issued) {
            // The clock starts before `issue`: for blocking operations (the raw-socket
            // baselines) the whole operation happens inside it.
            let t0 = Instant::now();
            queue.push_back((issue(), t0));
            issued += 1;
        }
        let Some((h, t0)) = queue.pop_front() else {
            break;
        };
        complete(h);
        sample.record(t0.elapsed());
        sample.ops += 1;
    }
    sample.elapsed = start.elapsed();
    sample.bytes = sample.ops * bytes_per_op;
    sample.keys = sample.ops * keys_per_op;
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Budget {
        Budget {
            warmup: Duration::from_millis(1),
            measure: Duration::from_millis(5),
            min_ops: 3,
            max_ops: 1000,
        }
    }

    #[test]
    fn pipelined_keeps_the_window_and_completes_in_order() {
        let mut next = 0u64;
        let mut outstanding = 0usize;
        let mut max_outstanding = 0usize;
        let mut last_done: Option<u64> = None;
        let cell = std::cell::RefCell::new((&mut outstanding, &mut max_outstanding));
        let s = run_pipelined(
            &tiny(),
            8,
            100,
            2,
            || {
                let mut c = cell.borrow_mut();
                *c.0 += 1;
                *c.1 = (*c.1).max(*c.0);
                next += 1;
                next
            },
            |h| {
                *cell.borrow_mut().0 -= 1;
                if let Some(prev) = last_done {
                    assert_eq!(h, prev + 1, "completions must come in issue order");
                }
                last_done = Some(h);
            },
        );
        assert_eq!(max_outstanding, 8);
        assert_eq!(outstanding, 0, "every issued operation completes");
        assert!(s.ops >= 3 && s.ops <= 1000);
        assert_eq!(s.bytes, s.ops * 100);
        assert_eq!(s.keys, s.ops * 2);
        assert_eq!(s.latency_ns.len(), s.ops);
    }

    #[test]
    fn min_and_max_ops_bound_the_count() {
        let slow = Budget {
            measure: Duration::ZERO,
            ..tiny()
        };
        let s = run_pipelined(&slow, 1, 1, 0, || (), |()| {});
        assert_eq!(s.ops, 3, "min_ops is reached even with no time");
        let capped = Budget {
            measure: Duration::from_secs(60),
            max_ops: 50,
            ..tiny()
        };
        let s = run_pipelined(&capped, 4, 1, 0, || (), |()| {});
        assert_eq!(s.ops, 50);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_longer_time() {
        let mut a = Sample::new();
        a.ops = 2;
        a.bytes = 2_000;
        a.elapsed = Duration::from_millis(10);
        a.record(Duration::from_micros(10));
        a.record(Duration::from_micros(10));
        let mut b = Sample::new();
        b.ops = 1;
        b.bytes = 1_000;
        b.elapsed = Duration::from_millis(20);
        b.record(Duration::from_micros(30));
        a.merge_concurrent(&b);
        assert_eq!(a.ops, 3);
        assert_eq!(a.bytes, 3_000);
        assert_eq!(a.elapsed, Duration::from_millis(20));
        assert!((a.gb_per_s() - 3_000.0 / 0.02 / 1e9).abs() < 1e-12);
        assert!((a.latency_us_p50() - 10.0).abs() < 0.1);
        assert!((a.latency_us_p99() - 30.0).abs() < 0.1);
    }
}
