//! The main job: L2-regularised sparse logistic regression trained by minibatch SGD on a
//! parameter server (the paper's first application).
//!
//! Every worker loads (or generates, deterministically from the seed) the same data set,
//! puts it in the same seeded order, takes its shard by rank, and for each minibatch pulls
//! the weights of the keys it touches, computes the gradient, and pushes it; the servers
//! apply the update rule (AdaGrad by default: `n += g^2; w -= lr * g / sqrt(n)`). Every
//! epoch each worker trains its shard in a new order drawn from the seed (`--shuffle`).
//! After each epoch all workers meet at a barrier, worker 0 pulls the weights of the
//! held-out set's keys, evaluates, and reports the line to the scheduler's console.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use crate::base::error::EngineError;
use crate::consistency::Consistency;
use crate::lr::{gradient, Dataset, Minibatch, SgdParams, SparseModel, SyntheticSpec};
use crate::proto::Control;
use crate::update::UpdateSpec;
use crate::worker::{TaskOpts, Timestamp, Worker};

/// The server-side optimizer of the LR job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Optimizer {
    /// Plain SGD: `w -= lr * g` (the worker adds the L2 term to the gradient). Its step
    /// size has to suit the data's scale: the default 4 suits the synthetic set (rows of
    /// squared norm 2) and diverges on one-hot data with 14 ones a row (use ~0.5 there).
    Sgd,
    /// AdaGrad with learning rate `lr` (the worker adds the L2 term): per-key steps
    /// `lr / sqrt(sum of g^2)`, which adapt to the features' scale and frequency. The
    /// default.
    Adagrad,
    /// FTRL-proximal with alpha = `lr`, beta = 1 and the servers applying `--l1`, `--l2`:
    /// weights become exactly zero, a sparse model.
    Ftrl,
}

impl Optimizer {
    /// The learning rate (FTRL: alpha) when `--lr` is not given. AdaGrad's 0.5 was picked
    /// by measurement on the synthetic set and on real and realistic files (README, "The
    /// main job"); SGD's and FTRL's 4 are the synthetic set's.
    pub fn default_lr(self) -> f64 {
        match self {
            Optimizer::Adagrad => 0.5,
            Optimizer::Sgd | Optimizer::Ftrl => 4.0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Optimizer::Sgd => "sgd",
            Optimizer::Adagrad => "adagrad",
            Optimizer::Ftrl => "ftrl",
        }
    }
}

/// `--shuffle`: the order in which the workers train the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shuffle {
    /// The data's own order (a file's lines, the synthetic set's rows): contiguous shards,
    /// the same minibatches every epoch. A file sorted by label trains badly this way.
    None,
    /// The training set in one random order drawn from `--seed` (the same on every
    /// worker) before it is sharded; the same minibatches every epoch, so their key lists
    /// repeat (what `--key-cache` names from the second epoch on).
    Once,
    /// As `once`, and every epoch each worker trains its shard in a new order drawn from
    /// `--seed`, the epoch and the shard: the same seed gives the same orders on every
    /// run, each epoch its own. The default.
    Epoch,
}

impl Shuffle {
    fn name(self) -> &'static str {
        match self {
            Shuffle::None => "none",
            Shuffle::Once => "once",
            Shuffle::Epoch => "epoch",
        }
    }
}

/// The seed of the order in which the rows `first_row..` of the (ordered) training set,
/// a shard or a departed worker's part of one, are trained in `epoch` under
/// `--shuffle epoch`: a function of the job's seed, the epoch and the first row only, so
/// every run with the same seed trains the same orders, whichever worker trains them.
pub fn epoch_seed(seed: u64, epoch: u32, first_row: usize) -> u64 {
    use crate::lr::rng::mix64;
    mix64(seed ^ 0x6570_6f63_6873_6875) // "epochshu"
        ^ mix64(u64::from(epoch).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        ^ mix64((first_row as u64) ^ 0x726f_7773_0000_0000) // "rows"
}

/// The rows `d` (the rows `first_row..` of the ordered training set) in the order they
/// train in `epoch`: under [`Shuffle::Epoch`] a permutation drawn from
/// [`epoch_seed`]`(seed, epoch, first_row)`, otherwise `d` itself.
pub fn epoch_order(
    shuffle: Shuffle,
    seed: u64,
    epoch: u32,
    first_row: usize,
    d: &Dataset,
) -> std::borrow::Cow<'_, Dataset> {
    match shuffle {
        Shuffle::Epoch => std::borrow::Cow::Owned(d.shuffled(epoch_seed(seed, epoch, first_row))),
        Shuffle::None | Shuffle::Once => std::borrow::Cow::Borrowed(d),
    }
}

/// The seed of the one order `--shuffle once|epoch` puts the training set in before it is
/// sharded.
fn order_seed(seed: u64) -> u64 {
    crate::lr::rng::mix64(seed ^ 0x7472_6169_6e6f_7264) // "trainord"
}

/// A clap value parser: a whole number of at least `MIN`. A negative number gets this
/// message too (with `allow_negative_numbers`), not clap's "unexpected argument".
fn whole<T: TryFrom<u64>, const MIN: u64>(s: &str) -> Result<T, String> {
    let n: i128 = s
        .trim()
        .parse()
        .map_err(|_| format!("must be a whole number >= {MIN}"))?;
    if n < i128::from(MIN) {
        return Err(format!("must be >= {MIN}"));
    }
    u64::try_from(n)
        .ok()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| "too large".to_string())
}

/// One `--slow-worker` spec: a worker (or every worker) sleeping before minibatches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slowdown {
    /// The worker rank, or every worker (`None`).
    pub rank: Option<u32>,
    /// How long it sleeps.
    pub delay: std::time::Duration,
    /// The share of minibatches it sleeps before (1: every one).
    pub prob: f64,
}

/// Flags of the LR job.
#[derive(Args, Clone, Debug)]
pub struct JobArgs {
    /// Training data in libsvm format (default: a synthetic data set from --seed).
    #[arg(long, env = "PSERV_DATA")]
    pub data: Option<PathBuf>,
    /// Held-out data in libsvm format, evaluated after each epoch (needs --data; all of
    /// --data then trains and --test-fraction is ignored).
    #[arg(long, env = "PSERV_TEST_DATA")]
    pub test_data: Option<PathBuf>,
    /// Seed of the synthetic data set and of the training order (--shuffle).
    #[arg(long, env = "PSERV_SEED", default_value_t = 1, value_parser = whole::<u64, 0>, allow_negative_numbers = true)]
    pub seed: u64,
    /// Examples of the synthetic data set (training plus held-out).
    #[arg(long, env = "PSERV_EXAMPLES", value_parser = whole::<usize, 1>, allow_negative_numbers = true)]
    pub examples: Option<usize>,
    /// Distinct features of the synthetic data set.
    #[arg(long, env = "PSERV_FEATURES", value_parser = whole::<usize, 1>, allow_negative_numbers = true)]
    pub features: Option<usize>,
    /// Fraction of the data held out for evaluation (without --test-data).
    #[arg(
        long,
        env = "PSERV_TEST_FRACTION",
        default_value_t = 0.2,
        allow_negative_numbers = true
    )]
    pub test_fraction: f64,
    /// Passes over the training data.
    #[arg(long, env = "PSERV_EPOCHS", default_value_t = 3, value_parser = whole::<u32, 1>, allow_negative_numbers = true)]
    pub epochs: u32,
    /// Examples per minibatch.
    #[arg(long, env = "PSERV_BATCH_SIZE", default_value_t = 100, value_parser = whole::<usize, 1>, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Learning rate of the servers' rule (FTRL: alpha). Default: 0.5 for adagrad, 4 for
    /// sgd and ftrl.
    #[arg(long, env = "PSERV_LR", allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// L2 regularisation.
    #[arg(
        long,
        env = "PSERV_L2",
        default_value_t = 1e-5,
        allow_negative_numbers = true
    )]
    pub l2: f64,
    /// L1 regularisation (FTRL only: applied by the servers' proximal step).
    #[arg(
        long,
        env = "PSERV_L1",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub l1: f64,
    /// The servers' update rule.
    #[arg(long, env = "PSERV_OPTIMIZER", value_enum, default_value = "adagrad")]
    pub optimizer: Optimizer,
    /// Training order: none (the data's own), once (one random order from --seed before
    /// sharding), epoch (that, and each worker reorders its shard every epoch).
    #[arg(long, env = "PSERV_SHUFFLE", value_enum, default_value = "epoch")]
    pub shuffle: Shuffle,
    /// Consistency model: sequential, eventual, or bounded:TAU (bounded delay).
    #[arg(long, env = "PSERV_CONSISTENCY", default_value = "eventual")]
    pub consistency: Consistency,
    /// Slow workers down: `RANK:MS` sleeps MS milliseconds before every minibatch on that
    /// rank; `RANK:MS:P` only before a random share P of them (a straggler); `*` for
    /// RANK means every worker; several specs separated by commas.
    #[arg(long, env = "PSERV_SLOW_WORKER")]
    pub slow_worker: Option<String>,
    /// When a worker leaves (dies) mid-training, skip its data shard instead of handing
    /// it to the workers still running from the next epoch on.
    #[arg(long, env = "PSERV_SKIP_DEPARTED")]
    pub skip_departed: bool,
    /// For a worker that joins the running job: enter it at the start of epoch N (at
    /// least 2), whenever it registered (without: at the next epoch boundary). A run with
    /// a worker joining at a given epoch is the same in every run, also under sequential
    /// consistency. Workers of the job's own ranks ignore it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub join_at_epoch: Option<u32>,
    /// Worker 0 also evaluates every N minibatches (0: only after each epoch).
    #[arg(long, env = "PSERV_EVAL_EVERY", default_value_t = 0, value_parser = whole::<usize, 0>, allow_negative_numbers = true)]
    pub eval_every: usize,
    /// Report the time at which the held-out logloss first fell to this value.
    #[arg(long, env = "PSERV_TARGET_LOGLOSS", allow_negative_numbers = true)]
    pub target_logloss: Option<f64>,
    /// Each worker appends one JSON line per training pull to `PATH.RANK`: its clock and
    /// the smallest worker clock the servers had when they answered.
    #[arg(long, env = "PSERV_TRACE")]
    pub trace: Option<PathBuf>,
    /// Fold the features into this many buckets (the hashing trick) laid out densely on
    /// the servers, each server's share one contiguous key range: workers then pull the
    /// model as dense ranges, one-sidedly where `--transport` gives shm or rdma, and push
    /// sparse gradients.
    #[arg(long, env = "PSERV_HASH_BUCKETS", value_parser = whole::<u64, 1>, allow_negative_numbers = true)]
    pub hash_buckets: Option<u64>,
    /// Filters every worker runs on its pushes, in order (comma-separated or repeated):
    /// `significant:T` (send a key once its accumulated gradient exceeds T; the rest is
    /// held and sent with the last push), `significant-rel:R` (... exceeds R times its
    /// weight), `kkt` (skip gradients the L1 proximal step leaves at 0: needs --l1 and
    /// --optimizer ftrl), `skip:P` (send each key with probability P, scaled by 1/P),
    /// `quantize:BITS` (values on a BITS-bit grid per push, the rounding error kept).
    #[arg(long = "filter", env = "PSERV_FILTER", value_delimiter = ',')]
    pub filters: Vec<crate::filter::FilterSpec>,
    /// Send repeated key lists by name once a server cached them (the paper's key
    /// caching; servers bound their caches with `--key-cache-keys`).
    #[arg(long, env = "PSERV_KEY_CACHE")]
    pub key_cache: bool,
    /// Compress the values of this worker's requests, and so (a server answers in the
    /// codec a worker sends) of the answers: none, lz4, zstd, zstd:LEVEL or zeros (runs
    /// of zero words). A frame is sent compressed only when that makes it smaller.
    #[arg(long, env = "PSERV_COMPRESS", default_value = "none")]
    pub compress: pserv_transport::compress::Codec,
    /// The answer filter the servers run on training pulls: none, bf16 (weights rounded
    /// to bfloat16 precision) or zero-small (|w| < 1e-6 answered as 0); they pay with
    /// `--compress` (see `filter::AnswerFilter`). Evaluation pulls are never filtered.
    #[arg(long, env = "PSERV_PULL_FILTER", value_enum, default_value = "none")]
    pub pull_filter: PullFilter,
    /// Resume the job from the checkpoint in DIR (its `latest`, or DIR itself when it
    /// holds a manifest): training starts at the epoch after the checkpoint's, and the
    /// job's flags must be the checkpoint's (see `checkpoint`). `pserv local` passes it
    /// to the scheduler and the servers too.
    #[arg(long, env = "PSERV_RESTORE")]
    pub restore: Option<PathBuf>,
}

/// `--pull-filter`: a built-in answer filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PullFilter {
    /// The weights as stored.
    None,
    /// Rounded to bfloat16 precision.
    Bf16,
    /// Magnitudes below 1e-6 answered as 0.
    ZeroSmall,
}

impl PullFilter {
    /// The answer filter id pulls name.
    pub fn id(self) -> u16 {
        match self {
            PullFilter::None => crate::filter::ANSWER_NONE,
            PullFilter::Bf16 => crate::filter::ANSWER_BF16,
            PullFilter::ZeroSmall => crate::filter::ANSWER_ZERO_SMALL,
        }
    }

    fn name(self) -> &'static str {
        match self {
            PullFilter::None => "none",
            PullFilter::Bf16 => "bf16",
            PullFilter::ZeroSmall => "zero-small",
        }
    }
}

/// The dense layout of `--hash-buckets`: bucket `j` of `D` lives on server `j % S` at key
/// `begin(j % S) + j / S`, so each server's buckets form one range starting at its first
/// key.
#[derive(Clone, Debug)]
pub struct DenseLayout {
    buckets: u64,
    bases: Vec<u64>,
}

impl DenseLayout {
    /// The layout of `buckets` buckets over the servers of `partition`.
    pub fn new(buckets: u64, partition: &crate::placement::Partition) -> Self {
        DenseLayout {
            buckets: buckets.max(1),
            // Each server's buckets start at its largest range (ring ranges are ~2^64 /
            // (servers x vnodes) keys wide: far more than any bucket count).
            bases: (0..partition.len())
                .map(|s| partition.largest_range_of(s).map_or(0, |r| r.begin))
                .collect(),
        }
    }

    /// The key a feature key folds into.
    pub fn key(&self, k: u64) -> u64 {
        let j = crate::lr::rng::mix64(k) % self.buckets;
        let s = self.bases.len() as u64;
        self.bases[(j % s) as usize] + j / s
    }

    /// Each server's range of buckets, in server order.
    pub fn windows(&self) -> Vec<crate::base::keys::KeyRange> {
        let s = self.bases.len() as u64;
        self.bases
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let n = (self.buckets + s - 1 - i as u64) / s;
                crate::base::keys::KeyRange::new(b, b + n)
            })
            .collect()
    }

    /// `d` with every key folded (values of keys that fold together add up).
    pub fn fold(&self, d: &Dataset) -> Dataset {
        let mut out = Dataset::with_capacity(d.len(), d.keys().len());
        for row in d.rows() {
            out.push_row(
                row.label,
                row.keys
                    .iter()
                    .zip(row.values)
                    .map(|(&k, &v)| (self.key(k), v)),
            );
        }
        out
    }
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
        if !(self.lr().is_finite() && self.lr() > 0.0) {
            return bad("--lr must be a positive number");
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("--l2 must be a non-negative number");
        }
        if !(self.l1.is_finite() && self.l1 >= 0.0) {
            return bad("--l1 must be a non-negative number");
        }
        if self.l1 > 0.0 && self.optimizer != Optimizer::Ftrl {
            return bad("--l1 needs --optimizer ftrl (the proximal step runs on the servers)");
        }
        if self.filters.contains(&crate::filter::FilterSpec::Kkt) && self.l1 == 0.0 {
            return bad("--filter kkt needs --l1 above 0 (and --optimizer ftrl)");
        }
        if let Some(t) = self.target_logloss {
            if !(t.is_finite() && t > 0.0) {
                return bad("--target-logloss must be a positive number");
            }
        }
        if self.test_data.is_some() && self.data.is_none() {
            return bad("--test-data needs --data (the held-out rows of a file's features)");
        }
        self.slow()?;
        Ok(())
    }

    /// The learning rate: `--lr`, or the optimizer's default.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or_else(|| self.optimizer.default_lr())
    }

    /// Check that `--data` and `--test-data` name readable, non-empty regular files, with
    /// a message naming the flag and the file. `pserv local` checks before it starts any
    /// process (a failure then leaves only the error in `--summary-json`); every worker
    /// checks again when it loads them.
    pub fn check_files(&self) -> Result<(), EngineError> {
        for (flag, path) in [("--data", &self.data), ("--test-data", &self.test_data)] {
            if let Some(p) = path {
                check_file(flag, p)?;
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
            format!("--l2={}", self.l2),
            format!("--shuffle={}", self.shuffle.name()),
        ];
        if let Some(lr) = self.lr {
            a.push(format!("--lr={lr}"));
        }
        if let Some(p) = &self.data {
            a.push(format!("--data={}", p.display()));
        }
        if let Some(p) = &self.test_data {
            a.push(format!("--test-data={}", p.display()));
        }
        if let Some(d) = self.hash_buckets {
            a.push(format!("--hash-buckets={d}"));
        }
        if let Some(n) = self.examples {
            a.push(format!("--examples={n}"));
        }
        if let Some(n) = self.features {
            a.push(format!("--features={n}"));
        }
        a.push(format!("--l1={}", self.l1));
        a.push(format!("--optimizer={}", self.optimizer.name()));
        a.push(format!("--consistency={}", self.consistency));
        if let Some(s) = &self.slow_worker {
            a.push(format!("--slow-worker={s}"));
        }
        if self.skip_departed {
            a.push("--skip-departed".into());
        }
        if let Some(n) = self.join_at_epoch {
            a.push(format!("--join-at-epoch={n}"));
        }
        a.push(format!("--eval-every={}", self.eval_every));
        if let Some(t) = self.target_logloss {
            a.push(format!("--target-logloss={t}"));
        }
        if let Some(p) = &self.trace {
            a.push(format!("--trace={}", p.display()));
        }
        for f in &self.filters {
            a.push(format!("--filter={f}"));
        }
        if self.key_cache {
            a.push("--key-cache".into());
        }
        if self.compress != pserv_transport::compress::Codec::None {
            a.push(format!("--compress={}", self.compress));
        }
        if self.pull_filter != PullFilter::None {
            a.push(format!("--pull-filter={}", self.pull_filter.name()));
        }
        if let Some(p) = &self.restore {
            a.push(format!("--restore={}", p.display()));
        }
        a
    }

    /// The flags that decide the model a run of this job trains, as a checkpoint records
    /// them (flag name to value) and a restore must match: all of [`to_args`](Self::to_args)
    /// but those that change only speed, reporting or the number of epochs.
    pub fn model_flags(&self) -> std::collections::BTreeMap<String, String> {
        crate::checkpoint::job_flags(
            &self.to_args(),
            &[
                "epochs",
                "restore",
                "slow-worker",
                "eval-every",
                "target-logloss",
                "trace",
                "key-cache",
                "compress",
            ],
        )
    }

    /// With `--restore`: the checkpoint (its manifest verified), checked against these flags (and
    /// the flags that cannot resume: filters hold residuals on the workers, which a
    /// checkpoint does not keep). `None` without `--restore`.
    pub fn restored(&self) -> Result<Option<crate::checkpoint::Checkpoint>, EngineError> {
        let Some(dir) = &self.restore else {
            return Ok(None);
        };
        if !self.filters.is_empty() {
            return Err(EngineError::Config(
                "--restore with --filter: a checkpoint does not hold the workers' filter \
                 residuals, so the run could not resume as it was"
                    .into(),
            ));
        }
        if self.hash_buckets.is_some() {
            return Err(EngineError::Config(
                "--restore with --hash-buckets is not supported yet: dense ranges are \
                 checkpointed as single keys, and their layout follows the server count"
                    .into(),
            ));
        }
        // Only the manifest: the servers verify the files they load (and `pserv local`
        // every file before it starts anything).
        let ck = crate::checkpoint::Checkpoint::open_manifest(dir)?;
        ck.check_job(&self.model_flags())?;
        if u64::from(self.epochs) <= ck.manifest.epoch {
            return Err(EngineError::Config(format!(
                "--epochs {} but the checkpoint {} already follows epoch {}: nothing is left \
                 to train (ask for more epochs)",
                self.epochs,
                ck.dir.display(),
                ck.manifest.epoch
            )));
        }
        Ok(Some(ck))
    }

    /// The slowdowns of `--slow-worker`, checked.
    pub fn slow(&self) -> Result<Vec<Slowdown>, EngineError> {
        let Some(s) = &self.slow_worker else {
            return Ok(Vec::new());
        };
        let bad = || {
            EngineError::Config(format!(
                "--slow-worker {s:?}: expected RANK:MS or RANK:MS:P (RANK a number or *, \
                 MS milliseconds, P a probability), comma-separated"
            ))
        };
        let mut out = Vec::new();
        for spec in s.split(',') {
            let parts: Vec<&str> = spec.split(':').map(str::trim).collect();
            if !(2..=3).contains(&parts.len()) {
                return Err(bad());
            }
            let rank = match parts[0] {
                "*" => None,
                r => Some(r.parse::<u32>().map_err(|_| bad())?),
            };
            let ms: f64 = parts[1].parse().map_err(|_| bad())?;
            let prob: f64 = match parts.get(2) {
                Some(p) => p.parse().map_err(|_| bad())?,
                None => 1.0,
            };
            if !(ms.is_finite() && ms >= 0.0 && (0.0..=1.0).contains(&prob)) {
                return Err(bad());
            }
            out.push(Slowdown {
                rank,
                delay: std::time::Duration::from_secs_f64(ms / 1000.0),
                prob,
            });
        }
        Ok(out)
    }

    /// The servers' default update rule for this job.
    pub fn update_spec(&self) -> UpdateSpec {
        match self.optimizer {
            Optimizer::Sgd => UpdateSpec::Sgd { lr: self.lr() },
            Optimizer::Adagrad => UpdateSpec::Adagrad {
                lr: self.lr(),
                eps: 1e-8,
            },
            Optimizer::Ftrl => UpdateSpec::Ftrl {
                alpha: self.lr(),
                beta: 1.0,
                l1: self.l1,
                l2: self.l2,
            },
        }
    }

    /// The L2 term the workers add to their gradients (FTRL applies L2 on the servers).
    pub fn worker_l2(&self) -> f32 {
        match self.optimizer {
            Optimizer::Ftrl => 0.0,
            _ => self.l2 as f32,
        }
    }
}

impl JobArgs {
    /// The SGD hyper-parameters.
    pub fn sgd_params(&self) -> SgdParams {
        SgdParams {
            lr: self.lr() as f32,
            l2: self.l2 as f32,
            batch_size: self.batch_size,
            epochs: self.epochs as usize,
        }
    }

    /// Load or generate `(train, held-out)`, the training rows in the order `--shuffle`
    /// gives them before sharding. Deterministic: every worker gets the same.
    pub fn load_data(&self) -> Result<(Dataset, Dataset), EngineError> {
        let (train, test) = self.load_unordered()?;
        Ok(match self.shuffle {
            Shuffle::None => (train, test),
            Shuffle::Once | Shuffle::Epoch => (train.shuffled(order_seed(self.seed)), test),
        })
    }

    /// `(train, held-out)` as read, split or generated.
    fn load_unordered(&self) -> Result<(Dataset, Dataset), EngineError> {
        let Some(path) = &self.data else {
            return Ok(Dataset::synthetic(&self.synthetic_spec()));
        };
        self.check_files()?;
        let read = |flag: &str, p: &Path, least: usize| {
            let d = Dataset::read_libsvm(p)
                .map_err(|e| EngineError::Config(format!("loading {flag}: {e}")))?;
            if d.len() < least {
                return Err(EngineError::Config(format!(
                    "{flag} {} holds {} examples; need at least {least}",
                    p.display(),
                    d.len()
                )));
            }
            Ok(d)
        };
        match &self.test_data {
            Some(test) => Ok((read("--data", path, 1)?, read("--test-data", test, 1)?)),
            None => Ok(read("--data", path, 2)?.split_holdout(self.test_fraction)),
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

/// `path` is a readable, non-empty regular file, or the error says which of these it is not.
fn check_file(flag: &str, path: &Path) -> Result<(), EngineError> {
    let bad = |what: String| {
        Err(EngineError::Config(format!(
            "{flag} {}: {what}",
            path.display()
        )))
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return bad("no such file".into()),
        Err(e) => return bad(format!("cannot be read: {e}")),
    };
    if meta.is_dir() {
        return bad("is a directory, not a data file".into());
    }
    if !meta.is_file() {
        return bad("is not a regular file (a device or a pipe?); give a libsvm file".into());
    }
    if let Err(e) = std::fs::File::open(path) {
        return bad(format!("cannot be read: {e}"));
    }
    if meta.len() == 0 {
        return bad("is empty".into());
    }
    Ok(())
}

/// Milliseconds since the Unix epoch (for times compared across processes).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Report progress to the scheduler at most this often.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// What one epoch trains: the shards of departed workers split over the live ones, and
/// the number of clock steps (the most minibatches any live worker has).
struct EpochPlan {
    /// Whether the workers train their own shards (rank `r` of the first `workers`);
    /// false once workers joined: then `extra` splits all the data over the live ones.
    own: bool,
    /// Per live worker rank: rows of departed workers' shards it trains this epoch.
    extra: std::collections::BTreeMap<u32, Vec<std::ops::Range<usize>>>,
    steps: usize,
}

fn epoch_plan(len: usize, workers: usize, live: &[u32], batch: usize, skip: bool) -> EpochPlan {
    let batch = batch.max(1);
    let mut extra: std::collections::BTreeMap<u32, Vec<std::ops::Range<usize>>> =
        live.iter().map(|&r| (r, Vec::new())).collect();
    if live.iter().any(|&r| r as usize >= workers) {
        // Workers joined: every live worker gets an even share of all the data.
        for (j, &r) in live.iter().enumerate() {
            extra.insert(r, vec![Dataset::shard_range(len, j, live.len())]);
        }
        let steps = extra
            .values()
            .map(|v| v.iter().map(|x| x.len().div_ceil(batch)).sum::<usize>())
            .max()
            .unwrap_or(0);
        return EpochPlan {
            own: false,
            extra,
            steps,
        };
    }
    if !skip && !live.is_empty() {
        for gone in (0..workers as u32).filter(|r| !live.contains(r)) {
            let rows = Dataset::shard_range(len, gone as usize, workers);
            for (j, &r) in live.iter().enumerate() {
                let sub = Dataset::shard_range(rows.len(), j, live.len());
                if !sub.is_empty() {
                    extra
                        .entry(r)
                        .or_default()
                        .push(rows.start + sub.start..rows.start + sub.end);
                }
            }
        }
    }
    let steps = live
        .iter()
        .filter(|&&r| (r as usize) < workers)
        .map(|&r| {
            Dataset::shard_range(len, r as usize, workers)
                .len()
                .div_ceil(batch)
                + extra[&r]
                    .iter()
                    .map(|x| x.len().div_ceil(batch))
                    .sum::<usize>()
        })
        .max()
        .unwrap_or(0);
    EpochPlan {
        own: true,
        extra,
        steps,
    }
}

/// Train this worker's shard (see the module docs), then report and finish.
///
/// Under a consistency model other than eventual, every minibatch is one tick of the
/// worker's clock: the pull waits (on the servers) until every worker has pushed the
/// minibatch `tau + 1` ticks back, and every worker runs the same number of minibatches
/// per epoch (a shard one row shorter ends with an empty one) so clocks stay aligned.
pub fn run_lr_worker(worker: Worker, job: &JobArgs) -> Result<(), EngineError> {
    // The job pushes gradients; the servers' update rule is its optimizer. Any other
    // rule (the hand-started scheduler's default `sum`, another rate) trains a model the
    // job did not ask for, and silently diverges: refuse it with the fix.
    let want = job.update_spec();
    let have = worker.cluster().update;
    if have != want {
        return Err(EngineError::Config(format!(
            "the servers apply the update rule `{have}` (the scheduler's --update), but this \
             job's optimizer needs `{want}`: start the scheduler with --update {want} \
             (pserv local and pserv launch do)"
        )));
    }
    // --restore: the checkpoint's epoch; training resumes after it.
    let restored_epoch = match job.restored()? {
        Some(ck) => u32::try_from(ck.manifest.epoch).unwrap_or(u32::MAX),
        None => 0,
    };
    if worker.rank() == 0 {
        // What every checkpoint of this job records, and a restore checks.
        let json = serde_json::to_string(&job.model_flags()).expect("json encodes");
        worker.tell_scheduler(Control::JobFlags { json })?;
    }
    let (train, test) = job.load_data()?;
    // --hash-buckets: fold the data, attach the servers' windows over the buckets.
    let dense = job
        .hash_buckets
        .map(|d| DenseLayout::new(d, &worker.cluster().partition));
    let (train, test) = match &dense {
        Some(l) => (l.fold(&train), l.fold(&test)),
        None => (train, test),
    };
    let mut one_sided_windows = 0usize;
    let windows: Vec<(crate::base::keys::KeyRange, usize)> = match &dense {
        Some(l) => {
            let mut at = 0;
            let mut out = Vec::new();
            for w in l.windows() {
                if w.is_empty() {
                    continue;
                }
                one_sided_windows += worker
                    .open_window(w)?
                    .iter()
                    .filter(|(_, ok, _)| *ok)
                    .count();
                out.push((w, at));
                at += w.len() as usize;
            }
            // In key order, for the lookups below (ring bases are not in server order).
            out.sort_by_key(|(w, _)| w.begin);
            out
        }
        None => Vec::new(),
    };
    let mut model: Vec<f32> = vec![0.0; windows.iter().map(|(w, _)| w.len() as usize).sum()];
    let rank = worker.rank() as usize;
    let workers = worker.num_workers() as usize;
    // A worker that joined the running job (rank beyond the first ones) has no shard of its
    // own: it gets a share from the epoch it enters at (the scheduler has the servers'
    // clock gates count it from there, under every consistency model).
    let late = rank >= workers;
    // Failed workers are replaced in place: every worker ticks (also under eventual
    // consistency, so the servers know each one's clock) and numbers its tasks by clock
    // (so a replacement's redone push has the failed worker's id).
    let replacing = worker.cluster().replace_workers;
    if replacing && dense.is_some() {
        return Err(EngineError::Config(
            "--replace-failed-workers takes no --hash-buckets: one-sided window pushes are not              redone by a replacement"
                .into(),
        ));
    }
    let (shard, shard_start) = if late {
        (train.slice(0..0), 0)
    } else {
        let rows = Dataset::shard_range(train.len(), rank, workers);
        (train.slice(rows.clone()), rows.start)
    };
    let params = job.sgd_params();
    let l2 = job.worker_l2();
    // Elastic workers: the shards of workers that left, split over those still running
    // (from the epoch after a barrier showed them gone). Re-planned every epoch.
    let mut live: Vec<u32> = (0..workers as u32).collect();
    let mut first_epoch = restored_epoch + 1;
    // A replacement: the failed worker's steps of its epoch already done, and whether it
    // had passed the barrier that ends that epoch's training.
    let mut done_steps = 0usize;
    let mut trained = false;
    if let Some(r) = worker.resume().cloned() {
        worker.resume_barriers(r.barrier);
        worker.resume_clock(r.clock);
        live = r.live.clone();
        if r.barrier % 2 == 1 {
            // Past the end of its epoch's training: evaluation and the next barrier.
            first_epoch = restored_epoch + r.barrier.div_ceil(2) as u32;
            trained = true;
        } else {
            first_epoch = restored_epoch + (r.barrier / 2) as u32 + 1;
            done_steps = r.clock.saturating_sub(r.barrier_clock) as usize;
        }
        worker.tell_scheduler(Control::Log {
            line: format!(
                "worker {rank} (a replacement) resumes in epoch {first_epoch} after clock {}                  ({done_steps} steps of the epoch done{})",
                r.clock,
                if trained { ", its training done" } else { "" }
            ),
        })?;
    } else if let Some(n) = job.join_at_epoch.filter(|_| late) {
        if n < restored_epoch + 2 {
            return Err(EngineError::Config(format!(
                "--join-at-epoch {n}: this job starts at epoch {}; a worker joins at a later one",
                restored_epoch + 1
            )));
        }
        // Epoch N starts after barrier 2 (N - 1) (two per epoch: training, evaluation).
        live = worker.join_at_barrier(2 * u64::from(n - 1 - restored_epoch))?;
        first_epoch = n;
    } else if late {
        // Take part from the next barrier the others reach: the end of an epoch's
        // training (odd) or of its evaluation (even); start with the epoch after it.
        let (seq, l) = worker.join_barrier()?;
        live = l;
        let mut seq = seq;
        if seq % 2 == 1 {
            live = worker.barrier_live()?;
            seq += 1;
        }
        first_epoch = restored_epoch + (seq / 2) as u32 + 1;
    }
    let mut slices: std::collections::HashMap<(usize, usize), Dataset> =
        std::collections::HashMap::new();
    let clocked = job.consistency != Consistency::Eventual || replacing;
    let slow: Vec<Slowdown> = job
        .slow()?
        .into_iter()
        .filter(|s| s.rank.is_none_or(|r| r as usize == rank))
        .collect();
    let mut filters = crate::filter::FilterChain::<f32>::new();
    for f in &job.filters {
        filters.push_filter(f.build(job.l1, workers, job.seed ^ (rank as u64 + 1)));
    }
    let mut straggle_rng = crate::lr::rng::SplitMix64::new(
        job.seed ^ 0x005e_ed0f_57a6_61e5 ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut trace = match &job.trace {
        Some(p) => {
            let path = PathBuf::from(format!("{}.{rank}", p.display()));
            Some(std::io::BufWriter::new(
                std::fs::File::create(&path).map_err(|source| EngineError::Io {
                    context: format!("creating the trace {}", path.display()),
                    source,
                })?,
            ))
        }
        None => None,
    };
    let total = shard.len() as u64 * u64::from((job.epochs + 1).saturating_sub(first_epoch));
    worker.tell_scheduler(Control::Progress { done: 0, total })?;
    if rank == 0 {
        let data = match (&job.data, &job.test_data) {
            (None, _) => format!("the synthetic set of seed {}", job.seed),
            (Some(d), None) => format!(
                "{}, {:.0}% held out",
                d.display(),
                job.test_fraction * 100.0
            ),
            (Some(d), Some(t)) => format!(
                "{}, held-out rows from {} (--test-fraction is not used)",
                d.display(),
                t.display()
            ),
        };
        worker.tell_scheduler(Control::Log {
            line: format!(
                "data: {data}: {} training and {} held-out rows; {} lr {}, shuffle {}",
                train.len(),
                test.len(),
                job.optimizer.name(),
                job.lr(),
                job.shuffle.name()
            ),
        })?;
    }
    let test_keys: Arc<Vec<u64>> = Arc::new(if rank == 0 {
        test.unique_keys()
    } else {
        Vec::new()
    });
    let pull_opts = TaskOpts {
        func: job.pull_filter.id(),
        ..TaskOpts::default()
    };
    let eval_opts = TaskOpts {
        consistency: Some(Consistency::Eventual),
        ..TaskOpts::default()
    };
    let evaluate = || -> Result<crate::lr::Eval, EngineError> {
        let values = worker
            .wait_pull::<f32>(worker.pull_opts::<f32>(test_keys.clone(), &eval_opts))?
            .to_vec();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let why = format!(
                "the model is not finite: the weight of key {} is {} (a learning rate too \
                 large, or pushes of non-finite values let in with --allow-non-finite)",
                test_keys[i], values[i]
            );
            // The scheduler fails the job with this reason (its summary holds it).
            let _ = worker.tell_scheduler(Control::Summary {
                json: serde_json::json!({ "error": why }).to_string(),
            });
            return Err(EngineError::JobFailed(why));
        }
        Ok(SparseModel::new(test_keys.as_ref().clone(), values).evaluate(&test))
    };
    let started = Instant::now();
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let mut reached: Option<f64> = None;
    let mut note_eval = |loss: f64, at: f64, curve: &mut Vec<(f64, f64)>| {
        curve.push((at, loss));
        if reached.is_none() && job.target_logloss.is_some_and(|t| loss <= t) {
            reached = Some(at);
        }
    };
    let mut examples = 0u64;
    let mut blocked = std::time::Duration::ZERO;
    let mut weights: Vec<f32> = Vec::new();
    let mut last_eval = None;
    let mut step_count = 0usize;
    let mut left = false;
    // A replacement: when its first push was acknowledged (ms since the Unix epoch).
    let mut first_ack_ms: Option<u64> = None;
    'epochs: for epoch in first_epoch..=job.epochs {
        let plan = epoch_plan(
            train.len(),
            workers,
            &live,
            params.batch_size,
            job.skip_departed,
        );
        let steps = plan.steps;
        for r in plan.extra.get(&(rank as u32)).into_iter().flatten() {
            slices
                .entry((r.start, r.end))
                .or_insert_with(|| train.slice(r.clone()));
        }
        // This epoch's rows: the own shard (unless workers joined) and parts of departed
        // workers' shards, each with its first row in the training set; under
        // `--shuffle epoch` each in this epoch's order.
        let own = plan.own.then_some((shard_start, &shard));
        let extra = plan
            .extra
            .get(&(rank as u32))
            .into_iter()
            .flatten()
            .map(|r| (r.start, &slices[&(r.start, r.end)]));
        let pieces: Vec<std::borrow::Cow<'_, Dataset>> = own
            .into_iter()
            .chain(extra)
            .map(|(first_row, d)| epoch_order(job.shuffle, job.seed, epoch, first_row, d))
            .collect();
        let batches: Vec<Minibatch<'_>> = pieces
            .iter()
            .flat_map(|d| d.minibatches(params.batch_size))
            .collect();
        // What this worker trains this epoch, for `pserv status`.
        let rows: Vec<(u64, u64)> = own
            .map(|(start, d)| (start as u64, (start + d.len()) as u64))
            .into_iter()
            .chain(
                plan.extra
                    .get(&(rank as u32))
                    .into_iter()
                    .flatten()
                    .map(|r| (r.start as u64, r.end as u64)),
            )
            .collect();
        let _ = worker.tell_scheduler_now(Control::Shard {
            epoch,
            rows,
            clock: worker.clock(),
        });
        // A replacement resumes inside the epoch (or after its training).
        let skip = if epoch == first_epoch {
            if trained {
                steps
            } else {
                done_steps.min(steps)
            }
        } else {
            0
        };
        let mut unreported = 0u64;
        let mut reported_at = Instant::now();
        let mut previous_push: Option<Timestamp> = None;
        for step in skip..steps {
            let clock = if clocked { worker.tick() } else { 0 };
            if replacing {
                worker.align_tasks(clock);
            }
            let Some(batch) = batches.get(step) else {
                // This shard is out of rows: an empty push keeps the clock in step (and
                // the last one carries what the filters held back).
                let last = epoch == job.epochs && step + 1 == steps;
                if clocked || (last && !filters.is_empty()) {
                    let held = if last {
                        filters.drain(1)
                    } else {
                        crate::filter::Entries::empty(1)
                    };
                    previous_push = Some(worker.push::<f32>(held.keys, held.values));
                }
                continue;
            };
            for s in &slow {
                if s.prob >= 1.0 || straggle_rng.next_f64() < s.prob {
                    std::thread::sleep(s.delay);
                }
            }
            let keys: Arc<Vec<u64>> = Arc::new(batch.unique_keys().to_vec());
            let asked = Instant::now();
            let server_clock = if !windows.is_empty() {
                // Dense model: read every server's bucket range (one-sided where attached)
                // and gather this minibatch's weights. Our previous push must be in first,
                // as it is for a pull sent after it on the same connection.
                if let Some(ts) = previous_push.take() {
                    worker.wait(ts)?;
                }
                for &(w, at) in &windows {
                    let n = w.len() as usize;
                    worker.pull_range_into(w, &mut model[at..at + n], &pull_opts)?;
                }
                blocked += asked.elapsed();
                weights.clear();
                weights.extend(keys.iter().map(|&k| {
                    let i = windows.partition_point(|(w, _)| w.end <= k);
                    let (w, at) = windows[i];
                    model[at + (k - w.begin) as usize]
                }));
                None
            } else {
                let pulled =
                    worker.wait_pull::<f32>(worker.pull_opts::<f32>(keys.clone(), &pull_opts))?;
                blocked += asked.elapsed();
                // Requests to one server are answered in order, so the previous push is done.
                if let Some(ts) = previous_push {
                    worker.wait(ts)?;
                }
                weights.resize(keys.len(), 0.0);
                pulled.copy_to(&mut weights);
                Some(pulled.server_clock())
            };
            if let Some(t) = trace.as_mut() {
                use std::io::Write;
                let line = match server_clock {
                    Some(s) => format!("{{\"clock\":{clock},\"server_clock\":{s}}}\n"),
                    None => format!("{{\"clock\":{clock}}}\n"),
                };
                t.write_all(line.as_bytes())
                    .map_err(|source| EngineError::Io {
                        context: "writing the trace".into(),
                        source,
                    })?;
            }
            let mut grad = vec![0.0f32; keys.len()];
            gradient(batch, &weights, l2, &mut grad);
            previous_push = Some(if filters.is_empty() {
                worker.push(keys, grad)
            } else {
                use crate::filter::Entries;
                filters.pulled(&Entries::new(keys.to_vec(), weights.clone(), 1));
                let mut out = filters.apply(Entries::new(keys.to_vec(), grad, 1));
                if epoch == job.epochs && step + 1 == steps {
                    // The last push of training carries what the filters held back.
                    out = out.merge_sum(&filters.drain(1));
                }
                worker.push(out.keys, out.values)
            });
            if first_ack_ms.is_none() && worker.resume().is_some() {
                if let Some(ts) = previous_push.take() {
                    worker.wait(ts)?;
                }
                first_ack_ms = Some(unix_ms());
            }
            examples += batch.len() as u64;
            unreported += batch.len() as u64;
            step_count += 1;
            if rank == 0 && job.eval_every > 0 && step_count.is_multiple_of(job.eval_every) {
                let eval = evaluate()?;
                note_eval(eval.logloss, started.elapsed().as_secs_f64(), &mut curve);
            }
            if worker.leave_asked() {
                if rank == 0 {
                    tracing::warn!("worker 0 evaluates the job's model: it does not leave");
                } else {
                    // Finish this clock: its push acknowledged, then out of the gates.
                    if let Some(ts) = previous_push.take() {
                        worker.wait(ts)?;
                    }
                    worker.tell_scheduler(Control::Leaving {
                        clock: worker.clock(),
                    })?;
                    worker.tell_scheduler(Control::Progress {
                        done: unreported,
                        total,
                    })?;
                    left = true;
                    break 'epochs;
                }
            }
            if reported_at.elapsed() >= PROGRESS_EVERY {
                // Progress is worth no stall: while the scheduler restarts, training goes
                // on and the count is reported to the restarted one.
                let sent = worker.tell_scheduler_now(Control::Progress {
                    done: unreported,
                    total,
                });
                if sent.is_ok() {
                    unreported = 0;
                }
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
        if !(trained && epoch == first_epoch) {
            worker.barrier()?;
        }
        if rank == 0 {
            let eval = evaluate()?;
            note_eval(eval.logloss, started.elapsed().as_secs_f64(), &mut curve);
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
        live = worker.barrier_live()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(t) = trace.as_mut() {
        use std::io::Write;
        t.flush().map_err(|source| EngineError::Io {
            context: "writing the trace".into(),
            source,
        })?;
    }
    {
        let mut traffic = serde_json::Map::new();
        let (sent, received) = worker.traffic();
        traffic.insert("bytes_sent".into(), sent.into());
        traffic.insert("bytes_received".into(), received.into());
        // It left gracefully (`pserv leave --worker`, SIGTERM) before the end.
        traffic.insert("left".into(), left.into());
        traffic.insert("clock".into(), worker.clock().into());
        let t = worker.transport_stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        // The message path: connections moved to shared memory, offers refused.
        traffic.insert("shm_connections".into(), load(&t.shm_connections).into());
        traffic.insert("shm_refused".into(), load(&t.shm_refused).into());
        // ... and to RDMA queue pairs.
        traffic.insert("rdma_connections".into(), load(&t.rdma_connections).into());
        traffic.insert("rdma_refused".into(), load(&t.rdma_refused).into());
        if job.compress != pserv_transport::compress::Codec::None {
            let (raw_out, wire_out) = (load(&t.values_raw_out), load(&t.values_wire_out));
            let (raw_in, wire_in) = (load(&t.values_raw_in), load(&t.values_wire_in));
            traffic.insert(
                "compression".into(),
                serde_json::json!({
                    "codec": job.compress.to_string(),
                    "frames_out": load(&t.frames_compressed_out),
                    "values_raw_out": raw_out,
                    "values_wire_out": wire_out,
                    "frames_in": load(&t.frames_compressed_in),
                    "values_raw_in": raw_in,
                    "values_wire_in": wire_in,
                    "ratio": (raw_out + raw_in) as f64 / ((wire_out + wire_in).max(1)) as f64,
                }),
            );
        }
        if let Some(k) = worker.key_cache_stats() {
            let mut v = serde_json::to_value(k).expect("json encodes");
            v["hit_rate"] = k.hit_rate().into();
            traffic.insert("key_cache".into(), v);
        }
        let mut m = serde_json::Map::new();
        m.insert(format!("traffic_worker_{rank}"), traffic.into());
        if let Some(r) = worker.resume() {
            m.insert(
                format!("replacement_worker_{rank}"),
                serde_json::json!({
                    "resumed_after_clock": r.clock,
                    "barrier": r.barrier,
                    "first_ack_unix_ms": first_ack_ms,
                }),
            );
        }
        worker.tell_scheduler(Control::Summary {
            json: serde_json::Value::Object(m).to_string(),
        })?;
    }
    if !filters.is_empty() {
        let stats: Vec<serde_json::Value> = filters
            .stats()
            .into_iter()
            .map(|(name, s)| {
                serde_json::json!({
                    "filter": name,
                    "offered": s.offered,
                    "sent": s.sent,
                    "skipped_fraction": s.skipped_fraction(),
                })
            })
            .collect();
        let mut m = serde_json::Map::new();
        m.insert(format!("filters_worker_{rank}"), stats.into());
        worker.tell_scheduler(Control::Summary {
            json: serde_json::Value::Object(m).to_string(),
        })?;
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
            "consistency": job.consistency.to_string(),
            "optimizer": job.optimizer.name(),
            "lr": job.lr(),
            "shuffle": job.shuffle.name(),
            "seconds_to_target": reached,
            "hash_buckets": job.hash_buckets,
            "one_sided_windows": one_sided_windows,
            "eval_curve": curve,
            "filters": job.filters.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "key_cache": job.key_cache,
            "compress": job.compress.to_string(),
            "pull_filter": job.pull_filter.name(),
        });
        worker.tell_scheduler(Control::Summary {
            json: summary.to_string(),
        })?;
    }
    worker.finish_with(examples, seconds, blocked.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        job: JobArgs,
    }

    fn job(args: &[&str]) -> JobArgs {
        P::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .job
    }

    /// Each row as (label, keys, value bits), sorted: the multiset of a data set's rows.
    fn row_set(d: &Dataset) -> Vec<(u32, Vec<u64>, Vec<u32>)> {
        let mut v: Vec<_> = d
            .rows()
            .map(|r| {
                let bits = r.values.iter().map(|x| x.to_bits()).collect();
                (r.label.to_bits(), r.keys.to_vec(), bits)
            })
            .collect();
        v.sort();
        v
    }

    fn numbered(n: usize) -> Dataset {
        let mut d = Dataset::new();
        for i in 0..n as u64 {
            d.push_row((i % 2) as f32, [(i, 1.0), (1_000_000 + i % 7, 0.5)]);
        }
        d
    }

    #[test]
    fn the_epoch_order_is_a_reproducible_permutation_new_every_epoch() {
        let d = numbered(500);
        let order = |epoch, first| epoch_order(Shuffle::Epoch, 9, epoch, first, &d).into_owned();
        let (e1, e2) = (order(1, 0), order(2, 0));
        assert_eq!(row_set(&e1), row_set(&d), "a permutation of the rows");
        assert_eq!(row_set(&e2), row_set(&d));
        assert_eq!(
            e1,
            order(1, 0),
            "the same seed and epoch give the same order"
        );
        assert_ne!(e1, d, "reordered");
        assert_ne!(e1, e2, "each epoch its own order");
        assert_ne!(e1, order(1, 500), "another shard, another order");
        let other_seed = epoch_order(Shuffle::Epoch, 10, 1, 0, &d).into_owned();
        assert_ne!(e1, other_seed);
        // Rows that stay in place: about 1 of 500 for a random permutation.
        let fixed = e1.rows().zip(d.rows()).filter(|(a, b)| a == b).count();
        assert!(fixed < 10, "{fixed} rows kept their place");
        for s in [Shuffle::None, Shuffle::Once] {
            assert!(matches!(
                epoch_order(s, 9, 1, 0, &d),
                std::borrow::Cow::Borrowed(x) if *x == d
            ));
        }
    }

    #[test]
    fn load_data_orders_the_training_rows_by_the_shuffle_flag() {
        let synthetic = ["--examples=600", "--features=500", "--seed=3"];
        let with = |s: &str| {
            let mut a = synthetic.to_vec();
            a.push(s);
            job(&a).load_data().unwrap()
        };
        let (none, test_none) = with("--shuffle=none");
        let (once, test_once) = with("--shuffle=once");
        let (epoch, _) = with("--shuffle=epoch");
        assert_eq!(test_none, test_once, "the held-out rows do not move");
        assert_ne!(none, once);
        assert_eq!(row_set(&none), row_set(&once));
        assert_eq!(once, epoch, "epoch starts from the same order as once");
        assert_eq!(with("--shuffle=once").0, once, "reproducible");
    }

    #[test]
    fn test_data_files_are_checked_and_loaded() {
        let dir = std::env::temp_dir().join(format!("pserv-job-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let train = dir.join("train.svm");
        let test = dir.join("test.svm");
        let empty = dir.join("empty.svm");
        let comments = dir.join("comments.svm");
        std::fs::write(&train, "1 1:1\n0 2:1\n1 1:1 3:1\n").unwrap();
        std::fs::write(&test, "0 2:1\n1 1:1\n").unwrap();
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&comments, "# nothing here\n\n").unwrap();
        let load = |t: &Path| {
            let (d, t) = (
                format!("--data={}", train.display()),
                format!("--test-data={}", t.display()),
            );
            let j = job(&[&d, &t, "--test-fraction=0.5"]);
            j.check().and_then(|()| j.load_data())
        };
        let (tr, te) = load(&test).unwrap();
        assert_eq!((tr.len(), te.len()), (3, 2), "all of --data trains");
        assert_eq!(te.labels(), &[0.0, 1.0]);
        let err = |t: &Path| load(t).unwrap_err().to_string();
        let missing = dir.join("missing.svm");
        for (path, want) in [
            (missing.as_path(), "no such file"),
            (Path::new("/dev/null"), "not a regular file"),
            (empty.as_path(), "is empty"),
            (dir.as_path(), "is a directory"),
            (comments.as_path(), "holds 0 examples"),
        ] {
            let e = err(path);
            assert!(e.contains(want), "{}: {e}", path.display());
            assert!(e.contains("--test-data"), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        assert!(!err(Path::new("/dev/null")).contains("no such file"));
        let only_test = job(&[&format!("--test-data={}", test.display())]);
        assert!(only_test
            .check()
            .unwrap_err()
            .to_string()
            .contains("needs --data"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn numeric_flags_say_their_bound() {
        let err =
            |a: &[&str]| match P::try_parse_from(std::iter::once("x").chain(a.iter().copied())) {
                Ok(_) => panic!("{a:?} parsed"),
                Err(e) => e.to_string(),
            };
        assert!(err(&["--epochs", "-1"]).contains("must be >= 1"));
        assert!(err(&["--epochs=0"]).contains("must be >= 1"));
        assert!(err(&["--batch-size", "-3"]).contains("must be >= 1"));
        assert!(err(&["--seed", "-1"]).contains("must be >= 0"));
        assert!(err(&["--eval-every", "x"]).contains("whole number"));
        assert_eq!(job(&["--epochs", "5"]).epochs, 5);
        // Negative floats reach the checks, which name the flag.
        let lr = job(&["--lr", "-1"]).check().unwrap_err().to_string();
        assert!(lr.contains("--lr must be a positive number"), "{lr}");
        // The default rate follows the optimizer.
        assert_eq!(job(&[]).lr(), Optimizer::Adagrad.default_lr());
        assert_eq!(job(&["--optimizer=sgd"]).lr(), 4.0);
        assert_eq!(job(&["--optimizer=sgd", "--lr=0.5"]).lr(), 0.5);
    }

    #[test]
    fn a_departed_shard_is_split_over_the_live_workers() {
        // Nobody left: no extra rows; steps = the longest shard's minibatches.
        let p = epoch_plan(100, 3, &[0, 1, 2], 10, false);
        assert!(p.extra.values().all(Vec::is_empty));
        assert_eq!(p.steps, 4);
        // Worker 1 left: its rows [33, 66) go to 0 and 2, in halves, covering it once.
        let p = epoch_plan(100, 3, &[0, 2], 10, false);
        assert_eq!(p.extra[&0], vec![33..49]);
        assert_eq!(p.extra[&2], vec![49..66]);
        // Worker 2 trains its 34 rows (4 minibatches) plus 17 (2 minibatches).
        assert_eq!(p.steps, 6);
        // Skipped: nobody trains them.
        let p = epoch_plan(100, 3, &[0, 2], 10, true);
        assert!(p.extra.values().all(Vec::is_empty));
        assert_eq!(p.steps, 4);
        // A worker joined (rank 3): all rows split evenly over the live workers.
        let p = epoch_plan(100, 3, &[0, 2, 3], 10, false);
        assert!(!p.own);
        assert_eq!(p.extra[&0], vec![0..33]);
        assert_eq!(p.extra[&2], vec![33..66]);
        assert_eq!(p.extra[&3], vec![66..100]);
        assert_eq!(p.steps, 4);
    }
}
