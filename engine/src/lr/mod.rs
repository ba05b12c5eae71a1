//! Sparse logistic regression, the compute side of the main job.
//!
//! The model is L2-regularised logistic regression over hashed sparse features, trained by
//! minibatch SGD. A distributed worker runs, for each minibatch of its shard:
//!
//! ```
//! use std::collections::BTreeMap;
//! use pserv_engine::lr::{gradient, Dataset, SgdParams, SyntheticSpec};
//!
//! let (train, _test) = Dataset::synthetic(&SyntheticSpec::small(1));
//! let params = SgdParams::default();
//! let shard = train.shard(0, 2); // this worker's rows
//! let mut servers = BTreeMap::<u64, f32>::new(); // stands in for the servers
//! for batch in shard.minibatches(params.batch_size) {
//!     let keys = batch.unique_keys(); // sorted, deduplicated
//!     // pull
//!     let weights: Vec<f32> = keys.iter().map(|k| *servers.get(k).unwrap_or(&0.0)).collect();
//!     let mut grad = vec![0.0; keys.len()];
//!     let _batch_loss = gradient(&batch, &weights, params.l2, &mut grad);
//!     for (k, g) in keys.iter().zip(&grad) {
//!         *servers.entry(*k).or_insert(0.0) -= params.lr * g; // push; the server applies SGD
//!     }
//! }
//! ```
//!
//! [`train_single_process`] runs the same SGD in one process, over the whole training set
//! in the same minibatch order (weights start at zero, as on the servers). One worker with
//! sequential consistency reproduces it exactly; with several workers the order of updates
//! differs, so the losses agree closely but not bit for bit.
//!
//! - [`data`]: the [`Dataset`] (CSR rows of sorted keys), sharding, hold-out split.
//! - [`synthetic`]: a deterministic generator of power-law sparse data with a hidden model.
//! - [`libsvm`]: the `label idx:val ...` text format.
//! - [`model`]: minibatches, the gradient, evaluation, the single-process reference.
//! - [`rng`]: the mixer that hashes feature ids to keys and the generator's RNG.

pub mod data;
pub mod libsvm;
pub mod model;
pub mod rng;
pub mod synthetic;

use std::path::PathBuf;

pub use data::{Dataset, Row};
pub use model::{
    evaluate, evaluate_batch, gradient, objective, train_single_process, EpochStats, Eval,
    Minibatch, Minibatches, ReferenceSgd, SgdParams, SparseModel,
};
pub use rng::feature_key;
pub use synthetic::SyntheticSpec;

/// Errors of the LR job's data handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LrError {
    /// A data file could not be opened or read.
    #[error("reading {path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of a LIBSVM file is malformed.
    #[error("{source_name}:{line}: {message}")]
    Parse {
        /// The file (or other source) being parsed.
        source_name: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// CSR arrays given to [`Dataset::from_csr`] are inconsistent.
    #[error("invalid dataset: {0}")]
    InvalidDataset(String),
}
