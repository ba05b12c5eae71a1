//! What a server is started with: [`ServerConfig`] and the user rules it serves.

use std::net::SocketAddr;

use std::sync::Arc;
use std::time::Duration;

use pserv_transport::TcpConfig;

use crate::base::error::EngineError;
use crate::base::value::Value;
use crate::onesided::TransportKind;
use crate::replication::ReplicationConfig;
use crate::update::{from_fn, UpdateFn, UpdateRegistry, ID_FIRST_USER};

/// Configuration of a [`Server`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The scheduler's address.
    pub scheduler: SocketAddr,
    /// Where to listen for workers (port 0: any free port).
    pub listen: SocketAddr,
    /// The transport's event loops.
    pub tcp: TcpConfig,
    /// How this server authenticates its connections (default: the secret file
    /// `PSERV_SECRET_FILE` names); it takes connections from cluster nodes only.
    pub security: crate::base::security::Security,
    /// A requested rank (decides the key range).
    pub rank: Option<u32>,
    /// Store shards (locks); value length and type come from the cluster table.
    pub shards: usize,
    /// How long to wait for the cluster table.
    pub register_timeout: Duration,
    /// At shutdown, write the model to `DIR/model-RANK.bin` (see [`Server::run`]).
    pub dump_model: Option<std::path::PathBuf>,
    /// User update rules this server serves beside the built-ins, by the
    /// ids [`UserRules`]' `add_*` methods return. Workers name them with
    /// [`TaskOpts::func`](crate::worker::TaskOpts::func) or
    /// [`Worker::push_with`](crate::worker::Worker::push_with).
    pub rules: UserRules,
    /// The data path offered for a dense one-sided window (see [`crate::onesided`]):
    /// tcp (none), shm, rdma, or auto (rdma where a device is found, else shm).
    pub transport: TransportKind,
    /// How this server batches replication as a chain's head (when the cluster
    /// replicates: `pserv --replicas K`).
    pub replication: ReplicationConfig,
    /// Join a running cluster (`pserv server --join`) instead of registering for a new
    /// one: the scheduler gives it a rank, it copies the ranges it will hold, then the
    /// routing table flips to a ring with it.
    pub join: bool,
    /// Bound of this server's cache of workers' key lists, in keys over all lists (see
    /// [`crate::keycache`]; 0: cache nothing, so workers always send their keys).
    pub key_cache_keys: usize,
    /// Answer filters this server runs on pulls that name them, beside the built-ins
    /// (see [`crate::filter::AnswerFilter`]; ids from
    /// [`ANSWER_FIRST_USER`](crate::filter::ANSWER_FIRST_USER) in the order added).
    pub answer_filters: crate::filter::AnswerFilterSet,
    /// Apply pushes that hold NaN or infinite values (`--allow-non-finite`). By default
    /// such a push is refused whole (status `BadRequest`, nothing applied), so one bad or
    /// hostile worker cannot turn the model into NaN.
    pub allow_non_finite: bool,
    /// How long the scheduler may stay unreachable (its connection closed and no
    /// restarted scheduler found) before the server stops with an error naming it.
    pub scheduler_grace: Duration,
    /// Start from the checkpoint in this folder (`--restore`): before answering `Ready`,
    /// load every key of the ranges this server holds from all its server files.
    pub restore: Option<std::path::PathBuf>,
}

/// User update rules for a server: registered into its
/// [`UpdateRegistry`] once the cluster table says which value type the cluster stores
/// (the `f32` rules for an f32 cluster, the `f64` ones for f64).
///
/// Ids: the rules of one value type get [`ID_FIRST_USER`], [`ID_FIRST_USER`]` + 1`, ... in
/// the order they were added, which is what the `add_*` methods return; every server of a
/// cluster must add the same rules in the same order so that an id means the same rule
/// everywhere. Rules are registered under their [`UpdateFn::name`]: adding a name again
/// replaces the rule and keeps its id (as [`UpdateRegistry::register`] does). A name of a
/// built-in (`default`, `assign`, `sum`, `sgd`, `adagrad`, `ftrl`) makes
/// [`Server::start`] fail with [`EngineError::Config`].
///
/// The server's store keeps as much optimizer state per weight as the most demanding
/// rule needs, its default rule and every user rule of its value type included, so a
/// stateful user rule (momentum, counters) has its state beside the weights.
///
/// ```
/// use pserv_engine::server::{ServerConfig, UserRules};
/// use pserv_engine::update::ID_FIRST_USER;
///
/// let mut cfg = ServerConfig::new("127.0.0.1:9190".parse().unwrap());
/// // Momentum: state v per weight, v = 0.9 v + g, w -= 0.1 v.
/// let momentum = cfg.rules.add_f32_fn("momentum", 1, |w, v, g| {
///     for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
///         *v = 0.9 * *v + g;
///         *w -= 0.1 * *v;
///     }
/// });
/// assert_eq!(momentum, ID_FIRST_USER);
/// assert_eq!(cfg.rules.state_len_f32(), 1);
/// assert_eq!(format!("{:?}", cfg.rules), r#"UserRules { f32: ["momentum"], f64: [] }"#);
/// ```
#[derive(Clone, Default)]
pub struct UserRules {
    /// Rules for clusters of `f32` values, in id order from [`ID_FIRST_USER`].
    pub f32: Vec<Arc<dyn UpdateFn<f32>>>,
    /// Rules for clusters of `f64` values, in id order from [`ID_FIRST_USER`].
    pub f64: Vec<Arc<dyn UpdateFn<f64>>>,
}

impl std::fmt::Debug for UserRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let f32: Vec<&str> = self.f32.iter().map(|r| r.name()).collect();
        let f64: Vec<&str> = self.f64.iter().map(|r| r.name()).collect();
        f.debug_struct("UserRules")
            .field("f32", &f32)
            .field("f64", &f64)
            .finish()
    }
}

/// Put `rule` into `rules` (replacing one of the same name) and return its id.
pub(super) fn add_rule<T: Value>(
    rules: &mut Vec<Arc<dyn UpdateFn<T>>>,
    rule: Arc<dyn UpdateFn<T>>,
) -> u16 {
    let at = match rules.iter().position(|r| r.name() == rule.name()) {
        Some(i) => {
            rules[i] = rule;
            i
        }
        None => {
            rules.push(rule);
            rules.len() - 1
        }
    };
    u16::try_from(at)
        .ok()
        .and_then(|i| ID_FIRST_USER.checked_add(i))
        .expect("all u16 update function ids are taken")
}

impl UserRules {
    /// Add a rule for f32 clusters; returns the function id workers push with.
    pub fn add_f32(&mut self, rule: Arc<dyn UpdateFn<f32>>) -> u16 {
        add_rule(&mut self.f32, rule)
    }

    /// Add a rule for f64 clusters; returns the function id workers push with.
    pub fn add_f64(&mut self, rule: Arc<dyn UpdateFn<f64>>) -> u16 {
        add_rule(&mut self.f64, rule)
    }

    /// Add the closure `f(weights, state, grads)` as a rule named `name` for f32
    /// clusters, keeping `state_len` state elements per weight ([`from_fn`] has the
    /// contract); returns the function id workers push with.
    pub fn add_f32_fn<F>(&mut self, name: &str, state_len: usize, f: F) -> u16
    where
        F: Fn(&mut [f32], &mut [f32], &[f32]) + Send + Sync + 'static,
    {
        self.add_f32(from_fn(name, state_len, f))
    }

    /// [`add_f32_fn`](Self::add_f32_fn) for f64 clusters.
    pub fn add_f64_fn<F>(&mut self, name: &str, state_len: usize, f: F) -> u16
    where
        F: Fn(&mut [f64], &mut [f64], &[f64]) + Send + Sync + 'static,
    {
        self.add_f64(from_fn(name, state_len, f))
    }

    /// The most state per weight any f32 rule keeps (0 with none).
    pub fn state_len_f32(&self) -> usize {
        self.f32.iter().map(|r| r.state_len()).max().unwrap_or(0)
    }

    /// The most state per weight any f64 rule keeps (0 with none).
    pub fn state_len_f64(&self) -> usize {
        self.f64.iter().map(|r| r.state_len()).max().unwrap_or(0)
    }

    /// Whether no rule was added.
    pub fn is_empty(&self) -> bool {
        self.f32.is_empty() && self.f64.is_empty()
    }
}

/// A registry with the cluster's default rule, the built-ins and `user` at their ids.
pub(super) fn registry<T: Value>(
    default: Arc<dyn UpdateFn<T>>,
    user: &[Arc<dyn UpdateFn<T>>],
) -> Result<UpdateRegistry<T>, EngineError> {
    let mut reg = UpdateRegistry::new(default);
    for (i, rule) in user.iter().enumerate() {
        let name = rule.name();
        if let Some(id) = reg.id_of(name) {
            return Err(EngineError::Config(format!(
                "user update rule {name:?} (number {}): {}",
                i + 1,
                if id < ID_FIRST_USER {
                    "the name is a built-in's".to_owned()
                } else {
                    format!(
                        "the name is taken by rule number {}",
                        id - ID_FIRST_USER + 1
                    )
                }
            )));
        }
        let id = reg.register(name, rule.clone());
        debug_assert_eq!(usize::from(id - ID_FIRST_USER), i);
    }
    Ok(reg)
}

impl ServerConfig {
    /// Defaults for a scheduler at `scheduler`.
    pub fn new(scheduler: SocketAddr) -> Self {
        ServerConfig {
            scheduler,
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            tcp: TcpConfig::default(),
            security: crate::base::security::Security::default(),
            rank: None,
            shards: 16,
            register_timeout: Duration::from_secs(120),
            dump_model: None,
            rules: UserRules::default(),
            transport: TransportKind::Tcp,
            replication: ReplicationConfig::default(),
            join: false,
            key_cache_keys: crate::keycache::DEFAULT_SERVER_KEYS,
            allow_non_finite: false,
            scheduler_grace: Duration::from_secs(60),
            restore: None,
            answer_filters: crate::filter::AnswerFilterSet::default(),
        }
    }
}
