//! The server node: holds one partition of the parameters and answers pushes and pulls
//! on the transport's event-loop threads (MISSION.md P1, P3, P4).
//!
//! A request is served where it arrives: the loop that read it looks its keys up in the
//! [`Store`] (sharded by key sub-range, one lock per shard, so loops rarely contend),
//! applies the update function, and writes the answer on the same thread. No request
//! crosses threads.
//!
//! Bad requests (wrong value type, unsorted keys, keys outside this server's range,
//! unknown update function, wrong value lengths) get an error answer with a
//! [`Status`] and a text; the store is left as it was and the connection stays open.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::RecvTimeoutError;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};

use pserv_transport::wire::{MessageKind, FLAG_ORDERED, FLAG_RANGE, FLAG_RESPONSE};
use pserv_transport::{
    BufPool, CloseReason, Conn, Frame, Handler, OutFrame, OwnedFrame, Payload, RecvFrame,
    TcpConfig, TcpTransport,
};

use crate::base::error::EngineError;
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::consistency::clock::{Action, ClockGate};
use crate::onesided::{ServerOneSided, TransportKind, Window};
use crate::placement::Partition;
use crate::proto::{self, ClusterInfo, Control, Role, ServerStats, Status, ValueType};
use crate::replication::{EntryStore, HeldPart, KeysRef, ReplicationConfig, Replicator};
use crate::store::{Store, StoreConfig, StoreError};
use crate::update::{from_fn, Sum, UpdateFn, UpdateRegistry, ID_FIRST_USER};
use crate::worker::SCHEDULER_TAG;

/// Configuration of a [`Server`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The scheduler's address.
    pub scheduler: SocketAddr,
    /// Where to listen for workers (port 0: any free port).
    pub listen: SocketAddr,
    /// The transport's event loops.
    pub tcp: TcpConfig,
    /// A requested rank (decides the key range).
    pub rank: Option<u32>,
    /// Store shards (locks); value length and type come from the cluster table.
    pub shards: usize,
    /// How long to wait for the cluster table.
    pub register_timeout: Duration,
    /// At shutdown, write the model to `DIR/model-RANK.bin` (see [`Server::run`]).
    pub dump_model: Option<std::path::PathBuf>,
    /// User update rules this server serves beside the built-ins (MISSION.md P4), by the
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
fn add_rule<T: Value>(rules: &mut Vec<Arc<dyn UpdateFn<T>>>, rule: Arc<dyn UpdateFn<T>>) -> u16 {
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
fn registry<T: Value>(
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
            rank: None,
            shards: 16,
            register_timeout: Duration::from_secs(120),
            dump_model: None,
            rules: UserRules::default(),
            transport: TransportKind::Tcp,
            replication: ReplicationConfig::default(),
            join: false,
        }
    }
}

/// A typed store plus its update functions.
pub(crate) struct Typed<T: Value> {
    pub(crate) store: Store<T>,
    pub(crate) updates: UpdateRegistry<T>,
}

/// The store in the cluster's value type.
pub(crate) enum AnyStore {
    F32(Typed<f32>),
    F64(Typed<f64>),
}

/// What a server knows once the cluster table arrived.
pub(crate) struct Ready {
    pub(crate) node_id: u32,
    pub(crate) rank: u32,
    pub(crate) store: AnyStore,
    /// Number of servers (worker node ids follow theirs).
    servers: u32,
    /// Number of workers.
    workers: u32,
    /// Worker clocks and the clocked requests waiting on them (bounded delay, P6).
    clocks: Mutex<ClockGate<Held>>,
    /// The routing table: which keys this server serves (heads), the chains, the epoch.
    table: RwLock<Arc<Partition>>,
    /// Chain replication (a no-op where the table has no replicas).
    repl: Replicator,
    /// The one-sided window side (none over plain TCP).
    onesided: Option<Arc<ServerOneSided>>,
    /// Requests (pulls, and ordered pushes) the gate held, and their total wait in
    /// nanoseconds.
    held: (AtomicU64, AtomicU64),
}

struct Core {
    ready: OnceLock<Ready>,
    control: Sender<Control>,
    pool: Arc<BufPool>,
    max_frame: usize,
}

struct ServerHandler {
    core: Arc<Core>,
}

/// Why a request failed, as answered to the worker.
struct Refusal(Status, String);

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::KeyOutOfRange { .. } | StoreError::RangeOutOfRange { .. } => {
                Status::NotOwner
            }
            StoreError::KeysNotSorted { .. } | StoreError::ValueLength { .. } => Status::BadRequest,
            _ => Status::StoreError,
        };
        Refusal(status, e.to_string())
    }
}

impl Handler for ServerHandler {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        let f = frame.frame();
        let h = *f.header();
        if h.kind == MessageKind::Control as u8 {
            if conn.tag() == SCHEDULER_TAG {
                match Control::from_frame(&f) {
                    Ok(msg) => {
                        let _ = self.core.control.send(msg);
                    }
                    Err(e) => tracing::warn!(error = %e, "bad control message from the scheduler"),
                }
            } else {
                match Control::from_frame(&f) {
                    Ok(Control::OpenWindow {
                        range,
                        host,
                        offers,
                    }) => open_window(&self.core, conn, h.sender, range, &host, &offers),
                    Ok(Control::Replicate { batch }) => match self.core.ready.get() {
                        Some(ready) if is_server(ready, h.sender) => {
                            ready.repl.on_batch(entries(ready), batch)
                        }
                        _ => {
                            tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "replica batch from a node that is not a server; ignored")
                        }
                    },
                    Ok(Control::ReplicaAck { seq }) => match self.core.ready.get() {
                        Some(ready) if is_server(ready, h.sender) => ready.repl.on_ack(seq),
                        _ => {
                            tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "replica ack from a node that is not a server; ignored")
                        }
                    },
                    Ok(Control::Completed { clock }) => {
                        if let Some(ready) = self.core.ready.get() {
                            match h.sender.checked_sub(1 + ready.servers) {
                                Some(w) if w < ready.workers => {
                                    let mut gate = ready.clocks.lock();
                                    let actions = gate.completed(w as usize, clock);
                                    run_actions(&self.core, ready, &mut gate, actions);
                                }
                                _ => {
                                    tracing::warn!(peer = %conn.peer_addr(), sender = h.sender, "clock notice from a node that is not a worker; ignored")
                                }
                            }
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(peer = %conn.peer_addr(), ?other, "unexpected control message from a worker; ignored")
                    }
                    Err(e) => {
                        tracing::warn!(peer = %conn.peer_addr(), error = %e, "bad control message from a worker; ignored")
                    }
                }
            }
            return;
        }
        let Some(ready) = self.core.ready.get() else {
            let _ = conn.send(proto::error_answer(
                &h,
                0,
                Status::NotReady,
                "server has no cluster table yet",
            ));
            return;
        };
        // Remember which worker this connection belongs to, so its clock can be retired
        // when it goes away.
        let servers = ready.servers;
        let worker = h.sender.checked_sub(1 + servers);
        if conn.tag() == 0 {
            if let Some(w) = worker {
                conn.set_tag(u64::from(w) + 1);
            }
        }
        if h.clock == 0 {
            // Unclocked: serve at once, from the receive buffer.
            answer_request(&self.core, ready, &f, conn, 0);
            return;
        }
        let Some(worker) = worker.filter(|&w| w < ready.workers) else {
            let _ = conn.send(proto::error_answer(
                &h,
                ready.node_id,
                Status::BadRequest,
                &format!(
                    "clocked request from node {}, which is not a worker",
                    h.sender
                ),
            ));
            return;
        };
        // Requests this server will refuse (routed with another table, keys it does not
        // head, ranges not handed over yet) are refused before the clock gate sees them:
        // the gate must not count a push that is not applied.
        if let Some(refusal) = precheck(ready, &f) {
            refuse(ready, conn, &h, refusal);
            return;
        }
        let mut gate = ready.clocks.lock();
        // A table installed since the precheck evicted what the gate held (under this
        // lock): so check the epoch again, and nothing routed with an older table enters.
        let table = ready.table.read().clone();
        if h.epoch != 0 && u64::from(h.epoch) != table.epoch() {
            drop(gate);
            refuse(ready, conn, &h, stale_epoch(h.epoch, table.epoch()));
            return;
        }
        let me = ready.rank as usize;
        let ranges = touched(&table, me, &f);
        let is_pull = h.kind == MessageKind::Pull as u8;
        let ordered = h.has(FLAG_ORDERED);
        let worker = worker as usize;
        // A sequential request starts only when every earlier task of its worker has
        // finished: every push of an older clock is acknowledged.
        let mut actions = if ordered {
            let done = if is_pull { h.clock } else { h.clock - 1 };
            gate.completed(worker, done)
        } else {
            Vec::new()
        };
        let held = Held {
            conn: conn.clone(),
            frame: frame.into_owned(),
            since: std::time::Instant::now(),
            ranges: ranges.clone(),
        };
        if is_pull {
            if let Some(p) = gate.pull(h.clock, ranges, held) {
                actions.push(Action::Answer(p));
            }
        } else {
            // A worker's first message of a clock to this server (one key list, or
            // clock-only) carries all its keys here: it moves the worker's clock on every
            // range this server heads. A resent piece, or one range of a range request,
            // carries only some: it moves the clock where it writes.
            let origin = proto::origin_of(h.timestamp);
            let first = origin == 0 || proto::segment_of(h.timestamp) + 1 == origin;
            let scope = if first && !h.has(FLAG_RANGE) {
                table.ranges_of(me)
            } else {
                ranges.clone()
            };
            actions.extend(gate.push(worker, h.clock, ranges, scope, ordered, held));
        }
        run_actions(&self.core, ready, &mut gate, actions);
    }

    fn on_close(&mut self, conn: &Conn, _reason: &CloseReason) {
        let (Some(ready), tag) = (self.core.ready.get(), conn.tag()) else {
            return;
        };
        if tag >= PEER_TAG && tag != SCHEDULER_TAG {
            // A connection to another server closed: batches on chains through it are
            // regrouped (it failed or left).
            let table = ready.table.read().clone();
            ready
                .repl
                .peer_lost(entries(ready), &table, (tag - PEER_TAG) as u32);
            return;
        }
        if tag == 0 || tag == SCHEDULER_TAG {
            return;
        }
        let worker = (tag - 1) as usize;
        let mut gate = ready.clocks.lock();
        let actions = gate.retire(worker);
        run_actions(&self.core, ready, &mut gate, actions);
    }
}

/// Answer `h` with `refusal`. A request routed with an older table than this server's is
/// a redirect: the current table goes first, so the worker learns it from here too (not
/// only from the scheduler) and resends.
fn refuse(ready: &Ready, conn: &Conn, h: &pserv_transport::Header, refusal: Refusal) {
    let Refusal(status, msg) = refusal;
    if status == Status::StaleEpoch && h.epoch != 0 {
        let table = ready.table.read().clone();
        if u64::from(h.epoch) < table.epoch() {
            let t = Control::Table {
                partition: (*table).clone(),
            };
            let _ = conn.send(t.to_frame(ready.node_id));
        }
    }
    tracing::debug!(peer = %conn.peer_addr(), %status, %msg, "refused a request");
    let _ = conn.send(proto::error_answer(h, ready.node_id, status, &msg));
}

/// The routing checks of a data request (epoch, ownership, hand-off), without the store.
fn precheck(ready: &Ready, f: &Frame<'_>) -> Option<Refusal> {
    let keys = match f.range() {
        Some((b, e)) if b > e => return None, // malformed: serve() answers it
        Some((b, e)) => KeysRef::Range(KeyRange::new(b, e)),
        None if f.keys().windows(2).any(|w| w[0] >= w[1]) => return None, // unsorted: likewise
        None => KeysRef::List(f.keys()),
    };
    routing_refusal(ready, &ready.table.read(), f.header().epoch, keys)
}

/// The refusal of a request routed with table `epoch` by a server at `current`.
fn stale_epoch(epoch: u32, current: u64) -> Refusal {
    Refusal(
        Status::StaleEpoch,
        format!(
            "request routed with routing-table epoch {epoch}, this server is at epoch \
             {current}: learn the current table and resend"
        ),
    )
}

/// Why `table` does not let this server serve `keys` of a request routed with `epoch`:
/// another epoch, keys it does not head, ranges not handed over yet.
fn routing_refusal(
    ready: &Ready,
    table: &Partition,
    epoch: u32,
    keys: KeysRef<'_>,
) -> Option<Refusal> {
    // Epoch 0: a client that does not route, such as a tool; it still must ask the right
    // server.
    if epoch != 0 && u64::from(epoch) != table.epoch() {
        return Some(stale_epoch(epoch, table.epoch()));
    }
    let me = ready.rank as usize;
    let owned = match keys {
        KeysRef::Range(r) => table.owns(me, &r),
        KeysRef::List(ks) => table.owns_keys(me, ks),
    };
    if !owned {
        return Some(Refusal(
            Status::NotOwner,
            format!(
                "server {me} does not own all of these keys under epoch {}",
                table.epoch()
            ),
        ));
    }
    ready.repl.handoff_pending(keys).map(|prev| {
        Refusal(
            Status::StaleEpoch,
            format!(
                "these keys passed to server {me} at epoch {}; server {prev} has not handed \
                 them over yet: resend shortly",
                table.epoch()
            ),
        )
    })
}

/// Tags of the connections to other servers: `PEER_TAG + rank`.
const PEER_TAG: u64 = 1 << 40;

/// Whether node `id` is a server of the cluster (servers that joined later have ids
/// above every worker's).
fn is_server(ready: &Ready, id: u32) -> bool {
    (1..=ready.servers).contains(&id) || id >= proto::JOINED_SERVER_BASE
}

/// The store, for replication.
fn entries(ready: &Ready) -> &dyn EntryStore {
    match &ready.store {
        AnyStore::F32(t) => &t.store,
        AnyStore::F64(t) => &t.store,
    }
}

/// A clocked request the gate holds: where it came from, its bytes, when it arrived,
/// the table ranges it touches.
struct Held {
    conn: Conn,
    frame: OwnedFrame,
    since: std::time::Instant,
    ranges: Vec<KeyRange>,
}

/// The ranges `table` gives server `me` that the keys of `f` fall in (clipped to the
/// request for a range request). Call after [`precheck`] passed (keys sorted, owned).
fn touched(table: &Partition, me: usize, f: &Frame<'_>) -> Vec<KeyRange> {
    let mine = table
        .ranges()
        .iter()
        .zip(table.owners())
        .filter(|(_, &o)| o as usize == me)
        .map(|(r, _)| *r);
    match f.range() {
        Some((b, e)) => {
            let req = KeyRange::new(b, e);
            mine.filter_map(|r| r.intersect(&req)).collect()
        }
        None => {
            let keys = f.keys();
            mine.filter(|r| {
                let i = keys.partition_point(|&k| k < r.begin);
                i < keys.len() && keys[i] < r.end
            })
            .collect()
        }
    }
}

/// A request served this long after it arrived counts as held by the gate (requests
/// served at once take a few microseconds).
const HELD_MIN: Duration = Duration::from_micros(50);

/// Carry out the gate's decisions, in order, with the gate still locked (the order of
/// applies is what sequential consistency promises).
fn run_actions(core: &Core, ready: &Ready, gate: &mut ClockGate<Held>, actions: Vec<Action<Held>>) {
    let publish = !actions.is_empty();
    for a in actions {
        match a {
            Action::Apply(p) | Action::Answer(p) => {
                let waited = p.since.elapsed();
                if waited >= HELD_MIN {
                    ready.held.0.fetch_add(1, Ordering::Relaxed);
                    ready
                        .held
                        .1
                        .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                }
                let clock = gate.min(&p.ranges);
                answer_request(core, ready, &p.frame.frame(), &p.conn, clock);
            }
        }
    }
    if publish {
        // One-sided readers wait on this word instead of the gate (after the applies).
        if let Some(w) = ready.onesided.as_ref().and_then(|o| o.window()) {
            w.publish_clock(gate.clock().min(w.range));
        }
    }
}

/// A worker asks for the one-sided window on `range`: grant it (creating the window on
/// the first request, filled with the store's current values) or refuse, on `conn`.
fn open_window(
    core: &Core,
    conn: &Conn,
    sender: u32,
    range: KeyRange,
    host: &str,
    offers: &[(u8, Vec<u8>)],
) {
    let answer = match core.ready.get() {
        None => Control::WindowRefused {
            reason: "server has no cluster table yet".into(),
        },
        Some(ready) if ready.table.read().replicas() > 0 => Control::WindowRefused {
            reason: "the cluster replicates (--replicas): one-sided pushes would bypass the chain, so this range stays on tcp".into(),
        },
        Some(ready) => match &ready.onesided {
            None => Control::WindowRefused {
                reason: "the server runs with --transport tcp".into(),
            },
            Some(os) => {
                let worker = sender.saturating_sub(1 + ready.servers);
                let init = |w: &Window| match &ready.store {
                    AnyStore::F32(t) => fill_window(t, w),
                    AnyStore::F64(t) => fill_window(t, w),
                };
                match os.grant(worker, range, host, offers, init) {
                    Ok(grant) => Control::WindowGranted { grant },
                    Err(reason) => Control::WindowRefused { reason },
                }
            }
        },
    };
    let _ = conn.send(answer.to_frame(core.ready.get().map_or(0, |r| r.node_id)));
}

/// Copy the store's values of the window's range into the new window.
fn fill_window<T: Value>(t: &Typed<T>, w: &Window) {
    let mut vals = vec![T::default(); w.range.len() as usize * t.store.value_len()];
    if let Err(e) = t.store.pull_range(w.range, &mut vals) {
        tracing::warn!(error = %e, "could not copy the store into the window; it starts at zero");
        return;
    }
    w.init(bytemuck::cast_slice(&vals));
}

/// Apply a push that landed one-sidedly: function `func` on range `r` of the window,
/// with the gradients in `mem` at byte offset `off`.
fn apply_landed<T: Value>(
    t: &Typed<T>,
    w: &Window,
    func: u16,
    r: KeyRange,
    mem: &dyn pserv_transport::onesided::Memory,
    off: usize,
) -> Result<(), String> {
    let f = t
        .updates
        .get(func)
        .ok_or_else(|| format!("no update function with id {func}"))?;
    w.check_rule(f.as_ref())?;
    w.push_range_landed(r, mem, off, f.as_ref());
    Ok(())
}

/// Serve a request whose keys all lie in the one-sided window.
#[allow(clippy::too_many_arguments)]
fn serve_window<T: Value>(
    core: &Core,
    ready: &Ready,
    t: &Typed<T>,
    w: &Window,
    f: &Frame<'_>,
    kind: MessageKind,
    range: Option<KeyRange>,
    out_elems: usize,
) -> Result<Option<OutFrame>, Refusal> {
    let h = f.header();
    let bad = |msg: String| Refusal(Status::BadRequest, msg);
    let grads = || {
        f.values_as::<T>()
            .ok_or_else(|| bad("value bytes are not a whole number of values".into()))
    };
    let update = || -> Result<_, Refusal> {
        let fun = t.updates.get(h.func).ok_or_else(|| {
            Refusal(
                Status::UnknownFunction,
                format!("no update function with id {}", h.func),
            )
        })?;
        w.check_rule(fun.as_ref()).map_err(bad)?;
        Ok(fun)
    };
    if matches!(kind, MessageKind::Push | MessageKind::PushPull) {
        let fun = update()?;
        match range {
            Some(r) => w.push_range(r, grads()?, fun.as_ref()),
            None => w.push_keys(f.keys(), grads()?, fun.as_ref()),
        }
        if kind == MessageKind::Push {
            return Ok(Some(proto::answer(h, ready.node_id, 0, Payload::empty())));
        }
    }
    let mut buf = core.pool.take(out_elems * std::mem::size_of::<T>());
    {
        let out: &mut [T] = bytemuck::cast_slice_mut(buf.bytes_mut());
        match range {
            Some(r) => w.pull_range(r, out),
            None => w.pull_keys(f.keys(), out),
        }
        .map_err(|e| Refusal(Status::BadRequest, e))?;
    }
    Ok(Some(proto::answer(
        h,
        ready.node_id,
        t.store.value_len() as u32,
        Payload::owned(buf),
    )))
}

/// Serve a data request and send the answer (or the refusal). `clock` goes into the
/// answer: the smallest worker clock the server had when it answered.
fn answer_request(core: &Core, ready: &Ready, f: &Frame<'_>, conn: &Conn, clock: u64) {
    let h = *f.header();
    // The routing table stays as it is until the push is applied and queued for
    // replication: a table change then finds it queued, under the chains it was applied
    // for (and sends it before its hand-off markers).
    let table = ready.table.read();
    let applying = ready.repl.applying();
    let answer = match &ready.store {
        AnyStore::F32(t) => serve(core, ready, &table, t, f, conn, clock),
        AnyStore::F64(t) => serve(core, ready, &table, t, f, conn, clock),
    };
    let out = match answer {
        Ok(Some(frame)) => frame,
        Ok(None) => return,
        Err(refusal) => {
            drop(applying);
            drop(table);
            return refuse(ready, conn, &h, refusal);
        }
    };
    let is_write = h.kind == MessageKind::Push as u8 || h.kind == MessageKind::PushPull as u8;
    if is_write && out.header().status == Status::Ok as u8 {
        // The answer waits until every replica of the touched ranges holds the push.
        let keys = match f.range() {
            Some((b, e)) => KeysRef::Range(KeyRange::new(b, e)),
            None => KeysRef::List(f.keys()),
        };
        let full = ready.repl.after_apply(
            &table,
            h.sender,
            proto::push_id(h.timestamp),
            keys,
            conn,
            out,
        );
        let epoch = table.epoch();
        drop(applying);
        drop(table);
        ready.repl.flush_chains(entries(ready), epoch, full);
        return;
    }
    // A failed send means the worker is gone; the transport logs and closes it.
    let _ = conn.send(out);
}

/// Range pulls of at least this many bytes are sent straight from the store.
const BORROW_MIN_BYTES: usize = 256 << 10;
/// How long a loop may wait for a slow reader while sending from the store, before it
/// copies the rest and moves on.
const BORROW_BLOCK_MAX: Duration = Duration::from_millis(50);

/// Serve one data request against the typed store. Returns the answer to send, or `None`
/// when the answer was sent already (large range pulls go straight from the store).
#[allow(clippy::too_many_arguments)]
fn serve<T: Value>(
    core: &Core,
    ready: &Ready,
    table: &Partition,
    t: &Typed<T>,
    f: &Frame<'_>,
    conn: &Conn,
    clock: u64,
) -> Result<Option<OutFrame>, Refusal> {
    let mut answered = *f.header();
    answered.clock = clock;
    let h = &answered;
    let bad = |msg: String| Refusal(Status::BadRequest, msg);
    if h.has(FLAG_RESPONSE) {
        return Err(bad("servers do not take answers".into()));
    }
    if h.dtype != T::DTYPE as u8 {
        return Err(Refusal(
            Status::WrongType,
            format!(
                "values of type tag {}, this server stores {:?}",
                h.dtype,
                T::DTYPE
            ),
        ));
    }
    let vlen = t.store.value_len();
    if h.value_len as usize != vlen {
        return Err(bad(format!(
            "{} values per key, this server stores {vlen}",
            h.value_len
        )));
    }
    let kind = MessageKind::from_u8(h.kind).ok_or_else(|| bad("unknown kind".into()))?;
    let update = || {
        t.updates.get(h.func).ok_or_else(|| {
            Refusal(
                Status::UnknownFunction,
                format!("no update function with id {}", h.func),
            )
        })
    };
    let grads = || {
        f.values_as::<T>()
            .ok_or_else(|| bad("value bytes are not a whole number of values".into()))
    };
    let range = f.range().map(|(b, e)| KeyRange::new(b, e));
    let keys_here = match range {
        Some(r) => r.len(),
        None => f.keys().len() as u64,
    };
    let out_elems = keys_here
        .checked_mul(vlen as u64)
        .filter(|n| n.saturating_mul(std::mem::size_of::<T>() as u64) <= core.max_frame as u64)
        .ok_or_else(|| {
            bad(format!(
                "answer for {keys_here} keys would exceed the frame limit"
            ))
        })? as usize;
    let needs_values = matches!(kind, MessageKind::Push | MessageKind::PushPull);
    if needs_values && f.values().len() != out_elems * std::mem::size_of::<T>() {
        return Err(bad(format!(
            "{} value bytes for {keys_here} keys x {vlen} values",
            f.values().len()
        )));
    }
    if !needs_values && !f.values().is_empty() {
        return Err(bad("a pull carries no values".into()));
    }
    if kind == MessageKind::Control {
        return Err(bad("unexpected control message".into()));
    }
    let request_keys = match range {
        Some(r) => KeysRef::Range(r),
        None => KeysRef::List(f.keys()),
    };
    if let Some(refusal) = routing_refusal(ready, table, h.epoch, request_keys) {
        return Err(refusal);
    }
    if let Some(w) = ready.onesided.as_ref().and_then(|o| o.window()) {
        let keys = f.keys();
        let (inside, touches) = match range {
            Some(r) => (w.covers(&r), r.intersect(&w.range).is_some()),
            None => {
                let first = keys.partition_point(|&k| k < w.range.begin);
                let last = keys.partition_point(|&k| k < w.range.end);
                (
                    !keys.is_empty() && first == 0 && last == keys.len(),
                    last > first,
                )
            }
        };
        if inside {
            return serve_window(core, ready, t, w, f, kind, range, out_elems);
        }
        if touches {
            return Err(bad(format!(
                "the request's keys straddle the one-sided window {}: split it at the window's bounds",
                w.range
            )));
        }
    }
    // A push resent after a failover that this server holds already (as the old head's
    // replica): apply nothing, answer as applied (after re-replicating). Held in part (a
    // resent piece whose keys were split differently from the batches that brought some
    // of them): apply only the rest.
    let held = if matches!(kind, MessageKind::Push | MessageKind::PushPull) && table.replicas() > 0
    {
        ready
            .repl
            .held(h.sender, proto::push_id(h.timestamp), request_keys)
    } else {
        HeldPart::Nothing
    };
    if held != HeldPart::All && matches!(kind, MessageKind::Push | MessageKind::PushPull) {
        ready.repl.note_apply(table.epoch(), request_keys);
    }
    if held != HeldPart::Nothing {
        if let HeldPart::Part(held) = &held {
            let fun = update()?;
            let g = grads()?;
            match range {
                Some(r) => {
                    for part in unheld_parts(r, held) {
                        let at = (part.begin - r.begin) as usize * vlen;
                        let n = part.len() as usize * vlen;
                        t.store.push_range(part, &g[at..at + n], fun.as_ref())?;
                    }
                }
                None => {
                    let mut keys = Vec::new();
                    let mut vals = Vec::new();
                    for (i, &k) in f.keys().iter().enumerate() {
                        if !held.iter().any(|r| r.contains(k)) {
                            keys.push(k);
                            vals.extend_from_slice(&g[i * vlen..(i + 1) * vlen]);
                        }
                    }
                    t.store.push(&keys, &vals, fun.as_ref())?;
                }
            }
        }
        tracing::info!(
            sender = h.sender,
            ts = proto::push_id(h.timestamp),
            all = held == HeldPart::All,
            "push resent after a failover is here already (all of it, or the rest applied now)"
        );
        let mut buf = core.pool.take(if kind == MessageKind::PushPull {
            out_elems * std::mem::size_of::<T>()
        } else {
            0
        });
        if kind == MessageKind::PushPull {
            let out: &mut [T] = bytemuck::cast_slice_mut(buf.bytes_mut());
            match range {
                Some(r) => t.store.pull_range(r, out)?,
                None => t.store.pull(f.keys(), out)?,
            }
            return Ok(Some(proto::answer(
                h,
                ready.node_id,
                vlen as u32,
                Payload::owned(buf),
            )));
        }
        return Ok(Some(proto::answer(h, ready.node_id, 0, Payload::empty())));
    }
    match kind {
        MessageKind::Push => {
            let fun = update()?;
            match range {
                Some(r) => t.store.push_range(r, grads()?, fun.as_ref())?,
                None => t.store.push(f.keys(), grads()?, fun.as_ref())?,
            }
            if let Some(k) = crate::replication::trace_key() {
                if range.is_none() && f.keys().binary_search(&k).is_ok() {
                    let mut v = vec![T::default(); vlen];
                    let _ = t.store.pull(&[k], &mut v);
                    tracing::info!(sender = h.sender, stamp = h.timestamp, epoch = h.epoch, table = table.epoch(), value = ?v[0], "TRACE apply");
                }
            }
            Ok(Some(proto::answer(h, ready.node_id, 0, Payload::empty())))
        }
        MessageKind::Pull
            if range.is_some() && out_elems * std::mem::size_of::<T>() >= BORROW_MIN_BYTES =>
        {
            let r = range.expect("checked by the guard");
            let header = *proto::answer(h, ready.node_id, vlen as u32, Payload::empty()).header();
            // Zero copy: write the answer from the dense blocks, under their shards' locks.
            let sent = t.store.with_dense_range(r, |parts| {
                let bytes: Vec<&[u8]> = parts.iter().map(|p| bytemuck::cast_slice(p)).collect();
                conn.send_borrowed(header, Payload::empty(), &bytes, BORROW_BLOCK_MAX)
            })?;
            match sent {
                Some(_) => Ok(None),
                None => {
                    let mut buf = core.pool.take(out_elems * std::mem::size_of::<T>());
                    t.store
                        .pull_range(r, bytemuck::cast_slice_mut(buf.bytes_mut()))?;
                    Ok(Some(proto::answer(
                        h,
                        ready.node_id,
                        vlen as u32,
                        Payload::owned(buf),
                    )))
                }
            }
        }
        MessageKind::Pull | MessageKind::PushPull => {
            let mut buf = core.pool.take(out_elems * std::mem::size_of::<T>());
            {
                let out: &mut [T] = bytemuck::cast_slice_mut(buf.bytes_mut());
                match (kind, range) {
                    (MessageKind::Pull, Some(r)) => t.store.pull_range(r, out)?,
                    (MessageKind::Pull, None) => t.store.pull(f.keys(), out)?,
                    (_, Some(r)) => {
                        t.store
                            .push_pull_range(r, grads()?, update()?.as_ref(), out)?
                    }
                    (_, None) => t
                        .store
                        .push_pull(f.keys(), grads()?, update()?.as_ref(), out)?,
                }
            }
            Ok(Some(proto::answer(
                h,
                ready.node_id,
                vlen as u32,
                Payload::owned(buf),
            )))
        }
        MessageKind::Control => Err(bad("unexpected control message".into())),
    }
}

/// The parts of `r` outside every range of `held`, in key order.
fn unheld_parts(r: KeyRange, held: &[KeyRange]) -> Vec<KeyRange> {
    let mut cut: Vec<KeyRange> = held.iter().filter_map(|h| h.intersect(&r)).collect();
    cut.sort_by_key(|h| h.begin);
    let mut out = Vec::new();
    let mut pos = r.begin;
    for c in cut {
        if c.begin > pos {
            out.push(KeyRange::new(pos, c.begin));
        }
        pos = pos.max(c.end);
    }
    if pos < r.end {
        out.push(KeyRange::new(pos, r.end));
    }
    out
}

/// A running server node.
pub struct Server {
    core: Arc<Core>,
    control: crossbeam_channel::Receiver<Control>,
    addr: SocketAddr,
    transport: TcpTransport,
    /// The scheduler connection (replaced when a restarted scheduler comes back).
    sched: Arc<Mutex<Conn>>,
    /// The scheduler's address.
    scheduler_addr: SocketAddr,
    dump_model: Option<std::path::PathBuf>,
    /// The thread applying one-sided pushes, if any.
    notices: Option<std::thread::JoinHandle<()>>,
    /// The replication window's thread and its stop flag.
    flusher: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
}

impl Server {
    /// Start listening, register with the scheduler, and wait for the cluster table;
    /// from then on requests are served on the event loops.
    pub fn start(cfg: ServerConfig) -> Result<Server, EngineError> {
        // Refuse bad user rules before registering, not once the cluster is up.
        registry::<f32>(Arc::new(Sum), &cfg.rules.f32)?;
        registry::<f64>(Arc::new(Sum), &cfg.rules.f64)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let core = Arc::new(Core {
            ready: OnceLock::new(),
            control: tx,
            pool: BufPool::new(64),
            max_frame: cfg.tcp.max_frame,
        });
        let transport =
            TcpTransport::start(cfg.tcp.clone(), |_| ServerHandler { core: core.clone() })?;
        let addr = transport.listen(cfg.listen)?;
        let scheduler = transport.connect(cfg.scheduler, Duration::from_secs(10))?;
        scheduler.set_tag(SCHEDULER_TAG);
        let hello = if cfg.join {
            Control::Join {
                addr,
                rank: cfg.rank,
                pid: std::process::id(),
            }
        } else {
            Control::Register {
                role: Role::Server,
                addr: Some(addr),
                rank: cfg.rank,
                pid: std::process::id(),
            }
        };
        scheduler.send(hello.to_frame(0))?;
        let (node_id, rank, cluster) = match rx.recv_timeout(cfg.register_timeout) {
            Ok(Control::Welcome {
                node_id,
                rank,
                cluster,
            }) => (node_id, rank, cluster),
            Ok(Control::Refused { reason }) => return Err(EngineError::Registration(reason)),
            Ok(other) => {
                return Err(EngineError::Registration(format!(
                    "unexpected answer {other:?}"
                )))
            }
            Err(_) => {
                return Err(EngineError::Registration(format!(
                    "no cluster table from the scheduler at {} within {:?}",
                    cfg.scheduler, cfg.register_timeout
                )))
            }
        };
        transport.repin(node_id as usize);
        // Connections to the other servers, for chain replication (every server listens
        // before it registers, so all of them accept by now).
        let mut peers: Vec<Option<Conn>> = Vec::new();
        for s in &cluster.servers {
            if peers.len() <= s.rank as usize {
                peers.resize(s.rank as usize + 1, None);
            }
            if s.rank == rank {
                continue;
            }
            match transport.connect(s.addr, Duration::from_secs(5)) {
                Ok(c) => {
                    c.set_tag(PEER_TAG + u64::from(s.rank));
                    peers[s.rank as usize] = Some(c);
                }
                // A server that failed earlier: nothing will be sent to it.
                Err(e) => tracing::warn!(peer = s.rank, error = %e, "no connection to a server"),
            }
        }
        let sched = Arc::new(Mutex::new(scheduler.clone()));
        let synced = {
            let sched = sched.clone();
            Box::new(move |epoch: u64| {
                let _ = sched
                    .lock()
                    .send(Control::Synced { epoch }.to_frame(node_id));
            })
        };
        let repl = Replicator::new(rank, node_id, cfg.replication, peers, synced);
        let ready = make_ready(
            node_id,
            rank,
            &cluster,
            cfg.shards,
            &cfg.rules,
            cfg.transport,
            repl,
        )?;
        tracing::info!(
            node_id,
            rank,
            ranges = ready.table.read().ranges_of(rank as usize).len(),
            epoch = ready.table.read().epoch(),
            replicas = ready.table.read().replicas(),
            %addr,
            "server ready"
        );
        let _ = core.ready.set(ready);
        let notices = core.ready.get().and_then(|r| r.onesided.clone()).map(|os| {
            let core = core.clone();
            std::thread::Builder::new()
                .name("pserv-onesided".into())
                .spawn(move || {
                    let ready = core.ready.get().expect("set before the thread starts");
                    os.serve_notices(|w, func, r, mem, off| match &ready.store {
                        AnyStore::F32(t) => apply_landed(t, w, func, r, mem, off),
                        AnyStore::F64(t) => apply_landed(t, w, func, r, mem, off),
                    })
                })
                .map_err(|source| EngineError::Io {
                    context: "starting the one-sided notice thread".into(),
                    source,
                })
        });
        let notices = notices.transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let core = core.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pserv-replicate".into())
                .spawn(move || {
                    let ready = core.ready.get().expect("set before the thread starts");
                    ready.repl.run_flusher(
                        entries(ready),
                        || ready.table.read().epoch(),
                        || stop.load(Ordering::Relaxed),
                    )
                })
                .map_err(|source| EngineError::Io {
                    context: "starting the replication thread".into(),
                    source,
                })?
        };
        scheduler.send(Control::Ready.to_frame(node_id))?;
        Ok(Server {
            flusher: Some((flusher, stop)),
            notices,
            core,
            control: rx,
            addr,
            transport,
            sched,
            scheduler_addr: cfg.scheduler,
            dump_model: cfg.dump_model.clone(),
        })
    }

    /// The scheduler sent a new routing table: install it if it is newer, and move
    /// replication to the new chains.
    fn install_table(&self, new: Partition) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let new = Arc::new(new);
        // The clock gate is locked across the switch and the eviction below: no request
        // it holds for the old table may be let through (and move a clock) in between.
        let mut gate = ready.clocks.lock();
        let old = {
            let mut t = ready.table.write();
            if new.epoch() <= t.epoch() {
                tracing::debug!(epoch = new.epoch(), "older routing table ignored");
                return;
            }
            ready.repl.prepare_table(&t, &new);
            std::mem::replace(&mut *t, new.clone())
        };
        // Clocked requests the gate holds were routed with the old table: refused (with
        // the new table first), so the workers resend them; they moved no clock.
        let epoch = new.epoch();
        let (stale, actions) = gate.evict(|p| {
            let e = p.frame.header().epoch;
            e != 0 && u64::from(e) != epoch
        });
        for p in stale {
            let h = *p.frame.header();
            let refusal = Refusal(
                Status::StaleEpoch,
                format!(
                    "the routing table changed to epoch {epoch} while this request waited \
                     for the workers' clocks: learn the table and resend"
                ),
            );
            refuse(ready, &p.conn, &h, refusal);
        }
        run_actions(&self.core, ready, &mut gate, actions);
        drop(gate);
        tracing::info!(
            rank = ready.rank,
            from = old.epoch(),
            to = new.epoch(),
            ranges = new.ranges_of(ready.rank as usize).len(),
            "routing table changed"
        );
        ready.repl.on_table(entries(ready), &old, &new);
    }

    /// The scheduler's connection closed (it failed): try once to reach a restarted one
    /// (`pserv scheduler --recover` on the same address) and report this server to it. The
    /// data path goes on meanwhile; this is tried again at the next tick.
    fn reconnect_scheduler(&self) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        let Ok(conn) = self
            .transport
            .connect(self.scheduler_addr, Duration::from_millis(200))
        else {
            return;
        };
        conn.set_tag(SCHEDULER_TAG);
        let table = ready.table.read().as_ref().clone();
        let rejoin = Control::Rejoin {
            role: Role::Server,
            rank: ready.rank,
            node_id: ready.node_id,
            addr: Some(self.addr),
            pid: std::process::id(),
            table,
            barriers: 0,
        };
        if conn.send(rejoin.to_frame(ready.node_id)).is_ok() {
            tracing::info!(scheduler = %self.scheduler_addr, "reconnected to a restarted scheduler");
            *self.sched.lock() = conn;
        }
    }

    /// Connect to servers that joined.
    fn connect_peers(&self, servers: &[proto::ServerInfo]) {
        let Some(ready) = self.core.ready.get() else {
            return;
        };
        for s in servers {
            if s.rank == ready.rank || ready.repl.has_peer(s.rank) {
                continue;
            }
            match self.transport.connect(s.addr, Duration::from_secs(5)) {
                Ok(c) => {
                    c.set_tag(PEER_TAG + u64::from(s.rank));
                    ready.repl.add_peer(s.rank, c);
                    tracing::info!(peer = s.rank, addr = %s.addr, "connected to a server that joined");
                }
                Err(e) => tracing::warn!(peer = s.rank, error = %e, "no connection to a server"),
            }
        }
    }

    /// Where workers connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until the scheduler says the job is over (or its connection closes); then
    /// report the store's counters to the scheduler and, if configured, dump the model.
    pub fn run(self) -> Result<(), EngineError> {
        // SIGTERM: leave gracefully (hand the ranges over first), then stop when told.
        let term = Arc::new(AtomicBool::new(false));
        if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()) {
            tracing::warn!(error = %e, "cannot catch SIGTERM; it will stop the server at once");
        }
        let mut leaving = false;
        loop {
            if term.load(Ordering::Relaxed) && !leaving {
                leaving = true;
                if let Some(r) = self.core.ready.get() {
                    tracing::info!(
                        rank = r.rank,
                        "SIGTERM: asking the scheduler to let this server leave"
                    );
                    let _ = self
                        .sched
                        .lock()
                        .send(Control::Leave { rank: r.rank }.to_frame(r.node_id));
                } else {
                    break;
                }
            }
            match self
                .control
                .recv_timeout(Duration::from_millis(100).min(proto::HEARTBEAT_EVERY))
            {
                Ok(Control::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Control::Refused { reason }) if leaving => {
                    tracing::warn!(%reason, "the scheduler refused the leave; stopping now");
                    break;
                }
                Ok(Control::Log { line }) => tracing::info!("{line}"),
                Ok(Control::Table { partition }) => self.install_table(partition),
                Ok(Control::Servers { servers }) => self.connect_peers(&servers),
                Ok(other) => tracing::debug!(?other, "control message ignored by server"),
                Err(RecvTimeoutError::Timeout) => {
                    if self.sched.lock().is_closed() {
                        self.reconnect_scheduler();
                    }
                    let id = self.core.ready.get().map_or(0, |r| r.node_id);
                    let _ = self.sched.lock().send(Control::Heartbeat.to_frame(id));
                    if let Some(r) = self.core.ready.get() {
                        let (batches, pushes, oldest) = r.repl.lag();
                        let lag = Control::ReplicationLag {
                            batches,
                            pushes,
                            oldest_us: oldest.as_micros() as u64,
                        };
                        let _ = self.sched.lock().send(lag.to_frame(id));
                    }
                }
            }
        }
        if let Some(r) = self.core.ready.get() {
            let stats = match &r.store {
                AnyStore::F32(t) => stats_of(r, &t.store),
                AnyStore::F64(t) => stats_of(r, &t.store),
            };
            tracing::info!(
                rank = r.rank,
                keys = stats.keys,
                nonzero = stats.nonzero,
                "server shutting down"
            );
            let _ = self
                .sched
                .lock()
                .send(Control::ServerDone { stats }.to_frame(r.node_id));
            if let Some(dir) = &self.dump_model {
                let path = dir.join(format!("model-{}.bin", r.rank));
                let written = match &r.store {
                    AnyStore::F32(t) => dump_model(&t.store, &path),
                    AnyStore::F64(t) => dump_model(&t.store, &path),
                };
                written.map_err(|source| EngineError::Io {
                    context: format!("writing the model to {}", path.display()),
                    source,
                })?;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.sched.lock().queued_bytes() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Some(r) = self.core.ready.get() {
            // Replication still on its way (a leaving server's last batches and hand-off
            // markers) goes out first.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !r.repl.idle() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if let Some(os) = self.core.ready.get().and_then(|r| r.onesided.as_ref()) {
            os.stop();
        }
        if let Some(t) = self.notices {
            let _ = t.join();
        }
        if let Some((t, stop)) = self.flusher {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
        self.transport.shutdown();
        Ok(())
    }
}

fn stats_of<T: Value>(ready: &Ready, store: &Store<T>) -> ServerStats {
    let repl = ready.repl.stats();
    ServerStats {
        rank: ready.rank,
        keys: store.key_count(),
        nonzero: store.nonzero_count(),
        bytes: store.bytes(),
        held_pulls: ready.held.0.load(Ordering::Relaxed),
        held_pull_seconds: ready.held.1.load(Ordering::Relaxed) as f64 * 1e-9,
        replica_batches: repl.batches,
        replica_pushes: repl.pushes,
        replica_bytes: repl.bytes,
    }
}

/// Write every stored key and its weights, in key order: per key the u64 key then the
/// weights, little-endian. Two runs that built the same model write the same bytes.
fn dump_model<T: Value>(store: &Store<T>, path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut result = Ok(());
    store.for_each(|key, weights| {
        if result.is_ok() {
            result = out
                .write_all(&key.to_le_bytes())
                .and_then(|_| out.write_all(bytemuck::cast_slice(weights)));
        }
    });
    result?;
    out.flush()
}

fn make_ready(
    node_id: u32,
    rank: u32,
    cluster: &ClusterInfo,
    shards: usize,
    rules: &UserRules,
    transport: TransportKind,
    repl: Replicator,
) -> Result<Ready, EngineError> {
    // The store takes any key; which keys this server serves is the routing table's
    // business (checked per request, with its epoch).
    let range = KeyRange::FULL;
    // Enough state for the default rule and every user rule of the cluster's type.
    let user_state_len = match cluster.value_type {
        ValueType::F32 => rules.state_len_f32(),
        ValueType::F64 => rules.state_len_f64(),
    };
    let cfg = StoreConfig {
        shards,
        value_len: cluster.value_len as usize,
        state_len: cluster.update.state_len().max(user_state_len),
        ..StoreConfig::default()
    };
    let onesided = ServerOneSided::new(
        transport,
        cluster.partition.ranges_of(rank as usize),
        cluster.value_len as usize,
        match cluster.value_type {
            ValueType::F32 => 4,
            ValueType::F64 => 8,
        },
        cfg.state_len,
    )?
    .map(Arc::new);
    let err = |e: StoreError| EngineError::Config(format!("creating the store: {e}"));
    let store = match cluster.value_type {
        ValueType::F32 => AnyStore::F32(Typed {
            updates: registry(cluster.update.build::<f32>(), &rules.f32)?,
            store: Store::new(range, cfg).map_err(err)?,
        }),
        ValueType::F64 => AnyStore::F64(Typed {
            updates: registry(cluster.update.build::<f64>(), &rules.f64)?,
            store: Store::new(range, cfg).map_err(err)?,
        }),
    };
    Ok(Ready {
        node_id,
        rank,
        store,
        // The servers of the first table (ids 1..=S); joiners have ids above the workers.
        servers: cluster
            .servers
            .iter()
            .filter(|s| s.id == 1 + s.rank)
            .count() as u32,
        workers: cluster.workers,
        clocks: Mutex::new(ClockGate::new(range, cluster.workers as usize)),
        table: RwLock::new(Arc::new(cluster.partition.clone())),
        repl,
        held: (AtomicU64::new(0), AtomicU64::new(0)),
        onesided,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(b: u64, e: u64) -> KeyRange {
        KeyRange::new(b, e)
    }

    #[test]
    fn unheld_parts_are_what_no_held_range_covers() {
        assert_eq!(unheld_parts(r(0, 100), &[]), vec![r(0, 100)]);
        assert_eq!(
            unheld_parts(r(10, 100), &[r(50, 60), r(0, 20), r(55, 70)]),
            vec![r(20, 50), r(70, 100)]
        );
        assert!(unheld_parts(r(10, 20), &[r(0, 15), r(15, 30)]).is_empty());
        assert_eq!(unheld_parts(r(10, 20), &[r(30, 40)]), vec![r(10, 20)]);
    }
}
