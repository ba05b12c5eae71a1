//! Sparse logistic regression, the compute side of the main job (MISSION.md P1, P2).
//!
//! The model is L2-regularised logistic regression over hashed sparse features, trained by
//! minibatch SGD. A distributed worker runs, for each minibatch of its shard:
//!
//! ```ignore
//! for batch in shard.minibatches(params.batch_size) {
//!     let keys = batch.unique_keys();              // sorted, deduplicated
//!     let weights: Vec<f32> = pull(keys);            // aligned with `keys`
//!     let mut grad = vec![0.0; keys.len()];
//!     let loss = gradient(&batch, &weights, params.l2, &mut grad);
//!     push(keys, &grad);                             // the server does w -= lr * g
//! }
//! ```
//!
//! and [`train_single_process`] runs exactly the same SGD in one process, in the same
//! minibatch order, so the distributed loss can be compared with it.
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
