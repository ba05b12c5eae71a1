//! The pserv workloads a worker runs: dense range push / pull / push-pull of one size with
//! a number of requests in flight, and sparse key-list push / pull.
//!
//! Value buffers are made once per cell and shared with every request (`Arc<Vec<f32>>`:
//! the worker sends straight from it), so the bench measures the system, not allocation.
//! Each worker uses its own key ranges and key sets, so two workers never push the same
//! keys (they do share the server's store shard locks, as real workers would).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use pserv_engine::keys::{Key, KeyRange};
use pserv_engine::worker::{Timestamp, Worker};

use crate::error::BenchError;
use crate::stats::{run_pipelined, Budget, Sample};

/// A dense operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum DenseOp {
    /// `push_range`, then `wait`.
    Push,
    /// `pull_range`, then `wait_pull`.
    Pull,
    /// `push_pull_range`, then `wait_pull`: value bytes count both ways.
    #[value(name = "push-pull")]
    PushPull,
}

impl DenseOp {
    /// All dense operations, in report order.
    pub const ALL: [DenseOp; 3] = [DenseOp::Push, DenseOp::Pull, DenseOp::PushPull];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            DenseOp::Push => "push",
            DenseOp::Pull => "pull",
            DenseOp::PushPull => "push+pull",
        }
    }
}

/// One dense measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DenseCell {
    /// The operation.
    pub op: DenseOp,
    /// Value bytes per request (f32 values, one per key).
    pub size_bytes: usize,
    /// Requests in flight.
    pub in_flight: usize,
}

/// A sparse operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SparseOp {
    /// `push` of a sorted key list, then `wait`.
    Push,
    /// `pull` of a sorted key list, then `wait_pull`.
    Pull,
}

impl SparseOp {
    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            SparseOp::Push => "push",
            SparseOp::Pull => "pull",
        }
    }
}

/// How the keys of a sparse request are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyPattern {
    /// Uniformly random u64 keys (hashed features), sorted.
    Random,
    /// Consecutive keys.
    Sequential,
}

impl KeyPattern {
    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            KeyPattern::Random => "random",
            KeyPattern::Sequential => "sequential",
        }
    }
}

/// One sparse measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SparseCell {
    /// The operation.
    pub op: SparseOp,
    /// Keys per request.
    pub keys: usize,
    /// How the keys are drawn.
    pub pattern: KeyPattern,
}

/// Keys below this are reserved for dense ranges; sparse keys lie above.
const SPARSE_KEYS_FROM: Key = 1 << 52;

/// The dense range worker `rank` uses for requests of `keys` keys: disjoint per worker and
/// per size, so every cell works on its own dense block.
pub fn dense_range(rank: u32, keys: usize) -> KeyRange {
    let begin = (u64::from(rank) + 1) << 40 | u64::from(keys.trailing_zeros()) << 33;
    KeyRange::new(begin, begin + keys as u64)
}

/// The sorted, distinct keys worker `rank` pushes and pulls in sparse cells.
pub fn sparse_keys(rank: u32, n: usize, pattern: KeyPattern) -> Vec<Key> {
    match pattern {
        KeyPattern::Sequential => {
            let begin = SPARSE_KEYS_FROM + (u64::from(rank) << 44);
            (begin..begin + n as u64).collect()
        }
        KeyPattern::Random => {
            let mut rng = StdRng::seed_from_u64(0x5eed_0000 + u64::from(rank) * 7919 + n as u64);
            let mut keys: Vec<Key> = Vec::with_capacity(n);
            while keys.len() < n {
                let missing = n - keys.len();
                keys.extend(
                    (0..missing)
                        .map(|_| rng.random_range(SPARSE_KEYS_FROM..pserv_engine::keys::KEY_END)),
                );
                keys.sort_unstable();
                keys.dedup();
            }
            keys
        }
    }
}

/// Keeps the first error of a closure-driven loop.
#[derive(Default)]
struct FirstError(Option<BenchError>);

impl FirstError {
    fn keep<T>(&mut self, r: Result<T, BenchError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.get_or_insert(e);
                None
            }
        }
    }

    fn into_result<T>(self, v: T) -> Result<T, BenchError> {
        self.0.map_or(Ok(v), Err)
    }
}

fn check_len(got: usize, want: usize) -> Result<(), BenchError> {
    if got == want {
        Ok(())
    } else {
        Err(BenchError::WrongAnswer(format!(
            "pulled {got} values, expected {want}"
        )))
    }
}

/// Run one dense cell on `worker` (after `sync`, so concurrent workers start together).
pub fn run_dense(
    worker: &Worker,
    rank: u32,
    cell: DenseCell,
    budget: &Budget,
    sync: &crate::cluster::SyncPoint,
) -> Result<Sample, BenchError> {
    let keys = cell.size_bytes / std::mem::size_of::<f32>();
    let range = dense_range(rank, keys);
    let values: Arc<Vec<f32>> = Arc::new(vec![1.0; keys]);
    // The first push creates the range's dense block; pulls then read it.
    worker.wait(worker.push_range(range, values.clone()))?;
    sync.wait()?;
    let mut err = FirstError::default();
    let (bytes, sample) = match cell.op {
        DenseOp::Push => {
            let s = run_pipelined(
                budget,
                cell.in_flight,
                cell.size_bytes as u64,
                0,
                || worker.push_range(range, values.clone()),
                |ts: Timestamp| {
                    err.keep(worker.wait(ts).map_err(BenchError::from));
                },
            );
            (cell.size_bytes, s)
        }
        DenseOp::Pull => {
            let s = run_pipelined(
                budget,
                cell.in_flight,
                cell.size_bytes as u64,
                0,
                || worker.pull_range::<f32>(range),
                |ts| {
                    let pulled = err.keep(worker.wait_pull::<f32>(ts).map_err(BenchError::from));
                    if let Some(p) = pulled {
                        err.keep(check_len(p.len(), keys));
                    }
                },
            );
            (cell.size_bytes, s)
        }
        DenseOp::PushPull => {
            let s = run_pipelined(
                budget,
                cell.in_flight,
                2 * cell.size_bytes as u64,
                0,
                || worker.push_pull_range(range, values.clone()),
                |ts| {
                    let pulled = err.keep(worker.wait_pull::<f32>(ts).map_err(BenchError::from));
                    if let Some(p) = pulled {
                        err.keep(check_len(p.len(), keys));
                    }
                },
            );
            (2 * cell.size_bytes, s)
        }
    };
    debug_assert_eq!(sample.bytes, sample.ops * bytes as u64);
    err.into_result(sample)
}

/// A sparse measurement and, for pushes, how long the first push (which inserts the
/// keys into the server's table) took.
#[derive(Clone, Debug)]
pub struct SparseOutcome {
    /// The steady-state measurement (keys already present on the server).
    pub sample: Sample,
    /// The first push of the key set, which inserted the keys.
    pub first_push: Option<Duration>,
}

/// Run one sparse cell on `worker` with the key set `keys` (from [`sparse_keys`]).
pub fn run_sparse(
    worker: &Worker,
    keys: &Arc<Vec<Key>>,
    cell: SparseCell,
    budget: &Budget,
    sync: &crate::cluster::SyncPoint,
) -> Result<SparseOutcome, BenchError> {
    let n = keys.len();
    let values: Arc<Vec<f32>> = Arc::new(vec![0.5; n]);
    let mut first_push = None;
    if cell.op == SparseOp::Push {
        let t0 = Instant::now();
        worker.wait(worker.push(keys.clone(), values.clone()))?;
        first_push = Some(t0.elapsed());
    }
    sync.wait()?;
    let value_bytes = (n * std::mem::size_of::<f32>()) as u64;
    let mut err = FirstError::default();
    let sample = match cell.op {
        SparseOp::Push => run_pipelined(
            budget,
            1,
            value_bytes,
            n as u64,
            || worker.push(keys.clone(), values.clone()),
            |ts: Timestamp| {
                err.keep(worker.wait(ts).map_err(BenchError::from));
            },
        ),
        SparseOp::Pull => run_pipelined(
            budget,
            1,
            value_bytes,
            n as u64,
            || worker.pull::<f32>(keys.clone()),
            |ts| {
                let pulled = err.keep(worker.wait_pull::<f32>(ts).map_err(BenchError::from));
                if let Some(p) = pulled {
                    err.keep(check_len(p.len(), n));
                }
            },
        ),
    };
    err.into_result(SparseOutcome { sample, first_push })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_ranges_are_disjoint() {
        let sizes = [1024usize, 16 << 10, 256 << 10, 4 << 20];
        let mut ranges: Vec<KeyRange> = (0..2)
            .flat_map(|r| sizes.iter().map(move |&k| dense_range(r, k)))
            .collect();
        ranges.sort_by_key(|r| r.begin);
        for w in ranges.windows(2) {
            assert!(w[0].end <= w[1].begin, "{:?} overlaps {:?}", w[0], w[1]);
        }
        assert!(ranges.last().unwrap().end < SPARSE_KEYS_FROM);
    }

    #[test]
    fn sparse_keys_are_sorted_distinct_and_above_dense() {
        for pattern in [KeyPattern::Random, KeyPattern::Sequential] {
            let k = sparse_keys(1, 10_000, pattern);
            assert_eq!(k.len(), 10_000);
            assert!(k.windows(2).all(|w| w[0] < w[1]));
            assert!(k[0] >= SPARSE_KEYS_FROM);
            assert!(*k.last().unwrap() < pserv_engine::keys::KEY_END);
        }
        assert_ne!(
            sparse_keys(0, 100, KeyPattern::Random),
            sparse_keys(1, 100, KeyPattern::Random)
        );
    }
}
