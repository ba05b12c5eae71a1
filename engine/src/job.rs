//! The main job: L2-regularised sparse logistic regression trained by minibatch SGD on a
//! parameter server (the paper's first application).
//!
//! Every worker loads (or generates, deterministically from the seed) the same data set,
//! takes its shard by rank, and for each minibatch pulls the weights of the keys it
//! touches, computes the gradient, and pushes it; the servers apply `w -= lr * g`.
//! After each epoch all workers meet at a barrier, worker 0 pulls the weights of the
//! held-out set's keys, evaluates, and reports the line to the scheduler's console.

use std::path::PathBuf;

use clap::Args;

use crate::error::EngineError;

/// Flags of the LR job.
#[derive(Args, Clone, Debug)]
pub struct JobArgs {
    /// Training data in libsvm format (default: a synthetic data set from --seed).
    #[arg(long, env = "PSERV_DATA")]
    pub data: Option<PathBuf>,
    /// Seed of the synthetic data set.
    #[arg(long, env = "PSERV_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Examples of the synthetic data set (training plus held-out).
    #[arg(long, env = "PSERV_EXAMPLES")]
    pub examples: Option<usize>,
    /// Distinct features of the synthetic data set.
    #[arg(long, env = "PSERV_FEATURES")]
    pub features: Option<usize>,
    /// Fraction of the data held out for evaluation.
    #[arg(long, env = "PSERV_TEST_FRACTION", default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Passes over the training data.
    #[arg(long, env = "PSERV_EPOCHS", default_value_t = 3)]
    pub epochs: u32,
    /// Examples per minibatch.
    #[arg(long, env = "PSERV_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// SGD learning rate.
    #[arg(long, env = "PSERV_LR", default_value_t = 0.5)]
    pub lr: f64,
    /// L2 regularisation.
    #[arg(long, env = "PSERV_L2", default_value_t = 1e-6)]
    pub l2: f64,
}

impl JobArgs {
    /// Refuse settings that cannot work, with a clear message.
    pub fn check(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Config(m.to_string()));
        if self.epochs == 0 {
            return bad("--epochs must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1");
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return bad("--test-fraction must be between 0 and 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr must be a positive number");
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("--l2 must be a non-negative number");
        }
        if let Some(p) = &self.data {
            if !p.is_file() {
                return Err(EngineError::Config(format!("--data {}: no such file", p.display())));
            }
        }
        Ok(())
    }

    /// These flags as command-line arguments (to start worker processes).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--seed={}", self.seed),
            format!("--test-fraction={}", self.test_fraction),
            format!("--epochs={}", self.epochs),
            format!("--batch-size={}", self.batch_size),
            format!("--lr={}", self.lr),
            format!("--l2={}", self.l2),
        ];
        if let Some(p) = &self.data {
            a.push(format!("--data={}", p.display()));
        }
        if let Some(n) = self.examples {
            a.push(format!("--examples={n}"));
        }
        if let Some(n) = self.features {
            a.push(format!("--features={n}"));
        }
        a
    }
}
