//! The dense cells over the engine's one-sided path (`shm`, `rdma`): each worker opens
//! the server's window once, on one key range that holds every worker's dense ranges,
//! then pushes with [`Worker::push_range_now`] (a write into its landing area plus a
//! notice; the server applies it and publishes) and pulls with
//! [`Worker::pull_range_into`] (a one-sided read of the server's versioned blocks into
//! the worker's buffer).
//!
//! Both calls return when the operation is complete, so one request is in flight per
//! worker; the TCP figures they are compared with are the `tcp` cells with 1 in flight.

use pserv_engine::keys::{Key, KeyRange};
use pserv_engine::onesided::{TransportKind, BLOCK_PAYLOAD, WINDOW_MAX_BYTES};
use pserv_engine::worker::{TaskOpts, Worker};

use crate::cluster::SyncPoint;
use crate::error::BenchError;
use crate::stats::{run_pipelined, Budget, Sample};
use crate::workload::DenseOp;

/// A column of the transport table (`--transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Transport {
    /// The two-sided TCP path (`push_range` / `pull_range`, the `tcp` section's cells).
    Tcp,
    /// One-sided shared memory (server `--transport shm`).
    Shm,
    /// One-sided RDMA verbs (server `--transport rdma`; needs a device and the bench's
    /// `rdma` feature).
    Rdma,
}

impl Transport {
    /// All columns, in report order.
    pub const ALL: [Transport; 3] = [Transport::Tcp, Transport::Shm, Transport::Rdma];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
            Transport::Rdma => "rdma",
        }
    }

    /// Whether this is a one-sided path.
    pub fn one_sided(self) -> bool {
        self != Transport::Tcp
    }

    /// The engine's transport for the server's `--transport` and the workers' config.
    pub fn kind(self) -> TransportKind {
        match self {
            Transport::Tcp => TransportKind::Tcp,
            Transport::Shm => TransportKind::Shm,
            Transport::Rdma => TransportKind::Rdma,
        }
    }
}

/// First key of the window (well below the sparse keys of [`crate::workload`]).
const WINDOW_BEGIN: Key = 1 << 40;

/// Where every worker's dense ranges lie inside the one window a server allows: worker
/// `rank` gets a slot of consecutive ranges, one per size, each starting on a block
/// boundary of the window (so a range covers as few versioned blocks as it can).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowPlan {
    /// Dense sizes in bytes, in slot order.
    sizes: Vec<usize>,
    /// Keys of each worker's slot.
    slot_keys: u64,
    /// Workers.
    workers: u32,
}

/// f32 keys per versioned block of a window.
fn block_keys() -> u64 {
    (BLOCK_PAYLOAD / std::mem::size_of::<f32>()) as u64
}

fn keys_of(size_bytes: usize) -> u64 {
    (size_bytes / std::mem::size_of::<f32>()) as u64
}

impl WindowPlan {
    /// The plan for `workers` workers and dense `sizes` (bytes of f32 values). Refuses a
    /// window larger than the engine allows.
    pub fn new(workers: u32, sizes: &[usize]) -> Result<Self, BenchError> {
        let bk = block_keys();
        let slot_keys = sizes.iter().map(|&s| keys_of(s).div_ceil(bk) * bk).sum();
        let plan = WindowPlan {
            sizes: sizes.to_vec(),
            slot_keys,
            workers: workers.max(1),
        };
        let bytes = plan.window().len() as u128 * std::mem::size_of::<f32>() as u128;
        if bytes > WINDOW_MAX_BYTES as u128 {
            return Err(BenchError::Cluster(format!(
                "a window for {workers} workers and sizes {sizes:?} needs {bytes} bytes, more than the engine's {WINDOW_MAX_BYTES}"
            )));
        }
        Ok(plan)
    }

    /// The window every worker opens.
    pub fn window(&self) -> KeyRange {
        let end = WINDOW_BEGIN + u64::from(self.workers) * self.slot_keys;
        KeyRange::new(WINDOW_BEGIN, end.max(WINDOW_BEGIN + 1))
    }

    /// The range worker `rank` pushes and pulls for requests of `size_bytes`.
    ///
    /// Panics if `size_bytes` is not one of the plan's sizes or `rank` is out of range.
    pub fn range(&self, rank: u32, size_bytes: usize) -> KeyRange {
        assert!(rank < self.workers, "rank {rank} of {}", self.workers);
        let bk = block_keys();
        let mut at = WINDOW_BEGIN + u64::from(rank) * self.slot_keys;
        for &s in &self.sizes {
            if s == size_bytes {
                return KeyRange::new(at, at + keys_of(s));
            }
            at += keys_of(s).div_ceil(bk) * bk;
        }
        panic!(
            "size {size_bytes} is not in the window plan {:?}",
            self.sizes
        )
    }
}

/// Open the window of `plan` on `worker` and check that every server granted it
/// one-sidedly (otherwise the cells would quietly measure TCP).
pub fn open_window(worker: &Worker, plan: &WindowPlan) -> Result<String, BenchError> {
    let granted = worker.open_window(plan.window())?;
    if let Some((server, _, why)) = granted.iter().find(|(_, one_sided, _)| !one_sided) {
        return Err(BenchError::Cluster(format!(
            "server {server} refused the one-sided window {}: {why}",
            plan.window()
        )));
    }
    Ok(granted
        .into_iter()
        .map(|(_, _, why)| why)
        .collect::<Vec<_>>()
        .join("; "))
}

/// Every value of a range that only ever got whole pushes of the same value must be
/// equal: a torn read or a partly applied push shows up as a difference.
fn check_uniform(values: &[f32]) -> Result<(), BenchError> {
    let first = values.first().copied().unwrap_or_default();
    match values.iter().position(|&v| v != first) {
        None => Ok(()),
        Some(i) => Err(BenchError::WrongAnswer(format!(
            "one-sided pull: value {i} is {} where value 0 is {first} (every push adds the same to every key)",
            values[i]
        ))),
    }
}

/// Run one dense cell over the one-sided path on `worker` (whose window is open), on
/// `range`, after `sync` so concurrent workers start together. Push adds 1.0 to every
/// key; push+pull is a push followed by a pull (value bytes count both ways). After the
/// measurement the range is pulled once more and checked (every key holds the same sum).
pub fn run_onesided(
    worker: &Worker,
    range: KeyRange,
    op: DenseOp,
    budget: &Budget,
    sync: &SyncPoint,
) -> Result<Sample, BenchError> {
    let keys = range.len() as usize;
    let size_bytes = keys * std::mem::size_of::<f32>();
    let values = vec![1.0f32; keys];
    let mut out = vec![0.0f32; keys];
    let opts = TaskOpts::default();
    // Warm the landing area and the pages of `out` outside the measurement.
    worker.push_range_now(range, &values, &opts)?;
    worker.pull_range_into(range, &mut out, &opts)?;
    sync.wait()?;
    let mut err: Option<BenchError> = None;
    let mut once = |r: Result<(), pserv_engine::EngineError>| {
        if let Err(e) = r {
            err.get_or_insert(e.into());
        }
    };
    let bytes = match op {
        DenseOp::PushPull => 2 * size_bytes,
        _ => size_bytes,
    };
    let sample = run_pipelined(
        budget,
        1,
        bytes as u64,
        0,
        || match op {
            DenseOp::Push => once(worker.push_range_now(range, &values, &opts)),
            DenseOp::Pull => once(worker.pull_range_into(range, &mut out, &opts)),
            DenseOp::PushPull => {
                once(worker.push_range_now(range, &values, &opts));
                once(worker.pull_range_into(range, &mut out, &opts));
            }
        },
        |()| {},
    );
    if let Some(e) = err {
        return Err(e);
    }
    worker.pull_range_into(range, &mut out, &opts)?;
    check_uniform(&out)?;
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_ranges_are_disjoint_block_aligned_and_inside_the_window() {
        let sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 1000];
        let plan = WindowPlan::new(2, &sizes).unwrap();
        let w = plan.window();
        let mut ranges: Vec<KeyRange> = (0..2)
            .flat_map(|r| sizes.iter().map(|&s| (r, s)).collect::<Vec<_>>())
            .map(|(r, s)| plan.range(r, s))
            .collect();
        for (r, s) in ranges.iter().zip(sizes.iter().cycle()) {
            assert_eq!(r.len(), keys_of(*s));
            assert!(w.covers(r), "{r} outside {w}");
            assert_eq!((r.begin - w.begin) % block_keys(), 0, "{r} not aligned");
        }
        ranges.sort_by_key(|r| r.begin);
        for p in ranges.windows(2) {
            assert!(p[0].end <= p[1].begin, "{} overlaps {}", p[0], p[1]);
        }
        assert!(w.end < 1 << 52, "below the sparse keys");
    }

    #[test]
    fn plan_refuses_a_window_too_large() {
        assert!(WindowPlan::new(2, &[WINDOW_MAX_BYTES]).is_err());
        assert!(WindowPlan::new(1, &[WINDOW_MAX_BYTES]).is_ok());
    }

    #[test]
    fn uniform_check_finds_a_torn_value() {
        assert!(check_uniform(&[2.0, 2.0, 2.0]).is_ok());
        assert!(check_uniform(&[]).is_ok());
        let e = check_uniform(&[2.0, 2.0, 3.0]).unwrap_err().to_string();
        assert!(e.contains("value 2"), "{e}");
    }

    #[test]
    fn transports_map_to_engine_kinds() {
        for t in Transport::ALL {
            assert_eq!(t.kind().to_string(), t.name());
        }
        assert!(!Transport::Tcp.one_sided() && Transport::Shm.one_sided());
    }
}
