//! The main job: L2-regularised sparse logistic regression trained by minibatch SGD on a
//! parameter server (the paper's first application).
//!
//! Every worker loads (or generates, deterministically from the seed) the same data set,
//! takes its shard by rank, and for each minibatch pulls the weights of the keys it
//! touches, computes the gradient, and pushes it; the servers apply `w -= lr * g`.
//! After each epoch all workers meet at a barrier, worker 0 pulls the weights of the
//! held-out set's keys, evaluates, and reports the line to the scheduler's console.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::error::EngineError;
use crate::lr::{gradient, Dataset, SgdParams, SparseModel, SyntheticSpec};
use crate::proto::Control;
use crate::worker::{Timestamp, Worker};

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
    #[arg(long, env = "PSERV_BATCH_SIZE", default_value_t = 100)]
    pub batch_size: usize,
    /// SGD learning rate.
    #[arg(long, env = "PSERV_LR", default_value_t = 4.0)]
    pub lr: f64,
    /// L2 regularisation.
    #[arg(long, env = "PSERV_L2", default_value_t = 1e-5)]
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
                return Err(EngineError::Config(format!(
                    "--data {}: no such file",
                    p.display()
                )));
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

impl JobArgs {
    /// The SGD hyper-parameters.
    pub fn sgd_params(&self) -> SgdParams {
        SgdParams {
            lr: self.lr as f32,
            l2: self.l2 as f32,
            batch_size: self.batch_size,
            epochs: self.epochs as usize,
        }
    }

    /// Load or generate `(train, held-out)`. Deterministic: every worker gets the same.
    pub fn load_data(&self) -> Result<(Dataset, Dataset), EngineError> {
        match &self.data {
            Some(path) => {
                let all = Dataset::read_libsvm(path)
                    .map_err(|e| EngineError::Config(format!("loading the training data: {e}")))?;
                if all.len() < 2 {
                    return Err(EngineError::Config(format!(
                        "{} holds {} examples; need at least 2",
                        path.display(),
                        all.len()
                    )));
                }
                Ok(all.split_holdout(self.test_fraction))
            }
            None => Ok(Dataset::synthetic(&self.synthetic_spec())),
        }
    }

    /// The synthetic data set these flags describe.
    pub fn synthetic_spec(&self) -> SyntheticSpec {
        let mut spec = SyntheticSpec {
            seed: self.seed,
            ..SyntheticSpec::default()
        };
        if let Some(n) = self.examples {
            let test = ((n as f64) * self.test_fraction).round() as usize;
            spec.test_examples = test.max(1);
            spec.train_examples = n.saturating_sub(test).max(1);
        }
        if let Some(f) = self.features {
            spec.features = f.max(1) as u64;
        }
        spec
    }
}

/// Report progress to the scheduler at most this often.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Train this worker's shard (see the module docs), then report and finish.
pub fn run_lr_worker(worker: Worker, job: &JobArgs) -> Result<(), EngineError> {
    let (train, test) = job.load_data()?;
    let rank = worker.rank() as usize;
    let shard = train.shard(rank, worker.num_workers() as usize);
    let params = job.sgd_params();
    let total = shard.len() as u64 * u64::from(job.epochs);
    worker.tell_scheduler(Control::Progress { done: 0, total })?;
    let test_keys: Arc<Vec<u64>> = Arc::new(if rank == 0 {
        test.unique_keys()
    } else {
        Vec::new()
    });
    let started = Instant::now();
    let mut examples = 0u64;
    let mut weights: Vec<f32> = Vec::new();
    let mut last_eval = None;
    for epoch in 1..=job.epochs {
        let mut unreported = 0u64;
        let mut reported_at = Instant::now();
        let mut previous_push: Option<Timestamp> = None;
        for batch in shard.minibatches(params.batch_size) {
            let keys: Arc<Vec<u64>> = Arc::new(batch.unique_keys().to_vec());
            let pulled = worker.wait_pull::<f32>(worker.pull::<f32>(keys.clone()))?;
            // Requests to one server are answered in order, so the previous push is done.
            if let Some(ts) = previous_push {
                worker.wait(ts)?;
            }
            weights.resize(keys.len(), 0.0);
            pulled.copy_to(&mut weights);
            drop(pulled);
            let mut grad = vec![0.0f32; keys.len()];
            gradient(&batch, &weights, params.l2, &mut grad);
            previous_push = Some(worker.push(keys, grad));
            examples += batch.len() as u64;
            unreported += batch.len() as u64;
            if reported_at.elapsed() >= PROGRESS_EVERY {
                worker.tell_scheduler(Control::Progress {
                    done: unreported,
                    total,
                })?;
                unreported = 0;
                reported_at = Instant::now();
            }
        }
        if let Some(ts) = previous_push {
            worker.wait(ts)?;
        }
        worker.tell_scheduler(Control::Progress {
            done: unreported,
            total,
        })?;
        worker.barrier()?;
        if rank == 0 {
            let values = worker
                .wait_pull::<f32>(worker.pull::<f32>(test_keys.clone()))?
                .to_vec();
            let model = SparseModel::new(test_keys.as_ref().clone(), values);
            let eval = model.evaluate(&test);
            worker.tell_scheduler(Control::Log {
                line: format!(
                    "epoch {epoch}: held-out logloss {:.4}, accuracy {:.4} (majority class {:.4}), {:.1} s",
                    eval.logloss,
                    eval.accuracy,
                    test.majority_rate(),
                    started.elapsed().as_secs_f64()
                ),
            })?;
            last_eval = Some(eval);
        }
        worker.barrier()?;
    }
    if let Some(eval) = last_eval {
        let summary = serde_json::json!({
            "test_logloss": eval.logloss,
            "test_accuracy": eval.accuracy,
            "test_auc": eval.auc,
            "majority_rate": test.majority_rate(),
            "epochs": job.epochs,
            "train_examples": train.len(),
            "test_examples": test.len(),
            "workers": worker.num_workers(),
            "servers": worker.cluster().servers.len(),
        });
        worker.tell_scheduler(Control::Summary {
            json: summary.to_string(),
        })?;
    }
    worker.finish(examples)
}
