//! The engine's messages on top of the wire format: control messages (encoded with
//! postcard in a `Control` frame's values), status codes of error answers, and the frame
//! builders every role uses.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use pserv_transport::wire::{DType, Header, MessageKind, FLAG_CACHE_KEYS, FLAG_RESPONSE};
use pserv_transport::{Frame, OutFrame, Payload};

use crate::placement::Partition;
use crate::update::UpdateSpec;

pub use crate::base::status::Status;

/// Node id of the scheduler ([`NodeId::SCHEDULER`](crate::base::ids::NodeId::SCHEDULER)).
pub const SCHEDULER_ID: u32 = crate::base::ids::NodeId::SCHEDULER.0;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Holds a partition of the parameters.
    Server,
    /// Holds a partition of the data; pushes and pulls.
    Worker,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Worker => "worker",
        })
    }
}

/// A server as the cluster table lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Node id.
    pub id: u32,
    /// Rank among servers; it owns `partition.ranges_of(rank)`.
    pub rank: u32,
    /// Where workers connect.
    pub addr: SocketAddr,
}

/// Element type of the parameter values, as configured for the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueType {
    /// 32-bit floats.
    F32,
    /// 64-bit floats.
    F64,
}

impl ValueType {
    /// The wire tag.
    pub fn dtype(self) -> DType {
        match self {
            ValueType::F32 => DType::F32,
            ValueType::F64 => DType::F64,
        }
    }
}

impl std::str::FromStr for ValueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(ValueType::F32),
            "f64" => Ok(ValueType::F64),
            _ => Err(format!("unknown value type {s:?} (expected f32 or f64)")),
        }
    }
}

/// What every node learns when the cluster is complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Servers by rank.
    pub servers: Vec<ServerInfo>,
    /// Number of workers.
    pub workers: u32,
    /// Which server owns which keys.
    pub partition: Partition,
    /// Element type of the values.
    pub value_type: ValueType,
    /// Values per key.
    pub value_len: u32,
    /// The servers' default update function.
    pub update: UpdateSpec,
    /// Ranks of the workers that have left (finished or failed) by the time of this
    /// message. A server that joins later never sees their connections close, so its
    /// clock gate retires them from this list instead of waiting for them forever.
    pub gone_workers: Vec<u32>,
    /// The job keeps a failed worker's place for a replacement
    /// ([`Control::Replace`]): servers keep its slot in their clock gates when its
    /// connection closes (until the scheduler says `WorkerGone`), remember every push
    /// for exactly-once redos, and answer a sequential pull asked again with the answer
    /// it got the first time.
    pub replace_workers: bool,
}

/// Per-worker traffic and work counters, reported when a worker finishes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Examples processed (job-defined).
    pub examples: u64,
    /// Bytes the worker wrote to sockets.
    pub bytes_sent: u64,
    /// Bytes the worker read from sockets.
    pub bytes_received: u64,
    /// Seconds the worker spent training (job-defined; 0 if not measured).
    pub seconds: f64,
    /// Of those, seconds spent blocked waiting for pulls (consistency and network).
    pub blocked_seconds: f64,
}

/// What a server holds when the job ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// The server's rank.
    pub rank: u32,
    /// Keys stored.
    pub keys: u64,
    /// Keys with a non-zero weight.
    pub nonzero: u64,
    /// Pinned bytes of the store.
    pub bytes: u64,
    /// Requests the clock gate held back: pulls waiting for the workers' clocks (bounded
    /// delay, sequential) and ordered pushes waiting for their turn (sequential).
    #[serde(default)]
    pub held_pulls: u64,
    /// Total seconds the held requests waited in the clock gate.
    #[serde(default)]
    pub held_pull_seconds: f64,
    /// Replication batches this server sent as a chain's head.
    #[serde(default)]
    pub replica_batches: u64,
    /// Pushes those batches carried (pushes per batch: the aggregation's saving).
    #[serde(default)]
    pub replica_pushes: u64,
    /// Value bytes (weights and state) those batches carried.
    #[serde(default)]
    pub replica_bytes: u64,
    /// The key cache: lists stored, names resolved, names missed (absent or mismatched),
    /// lists evicted.
    #[serde(default)]
    pub key_cache: [u64; 4],
}

/// Control-plane messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// A node introduces itself to the scheduler.
    Register {
        /// Its role.
        role: Role,
        /// A server's listening address (workers: None).
        addr: Option<SocketAddr>,
        /// A requested rank (must be free and below the role's count).
        rank: Option<u32>,
        /// Process id, for the operator.
        pid: u32,
    },
    /// The scheduler's answer once every node has registered.
    Welcome {
        /// The node's id.
        node_id: u32,
        /// The node's rank within its role.
        rank: u32,
        /// The cluster table.
        cluster: Box<ClusterInfo>,
        /// For a worker that replaces a failed one ([`Control::Replace`]): where it takes
        /// over.
        resume: Option<Box<Resume>>,
    },
    /// A server has set up its store and serves requests: workers may now be welcomed.
    Ready,
    /// Registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// A worker waits at barrier number `seq` until all workers arrive.
    Barrier {
        /// Barrier sequence number (each worker counts its barriers).
        seq: u64,
        /// The worker's consistency clock as it arrives (0: it never ticked).
        clock: u64,
    },
    /// Barrier `seq` is complete.
    BarrierDone {
        /// Barrier sequence number.
        seq: u64,
        /// Ranks of the workers still running (sorted): a job hands the data shards of
        /// workers that left to these (elastic workers).
        live: Vec<u32>,
        /// The largest clock a worker arrived with: where a worker that enters the job at
        /// this barrier starts counting (every worker of a clocked job arrives with the
        /// same clock at an epoch's barrier).
        clock: u64,
    },
    /// Progress of a worker (job-defined units), for the operator's progress bar.
    Progress {
        /// Units done since the last report.
        done: u64,
        /// Total units of this worker's whole run.
        total: u64,
    },
    /// A line for the operator's console.
    Log {
        /// The text.
        line: String,
    },
    /// A job result to merge into the summary (a JSON object).
    Summary {
        /// JSON object text.
        json: String,
    },
    /// A server's final counters, sent when it is told to shut down.
    ServerDone {
        /// Its counters.
        stats: ServerStats,
    },
    /// A worker has finished.
    Done {
        /// Its counters.
        stats: WorkerStats,
    },
    /// Stop: the job is over.
    Shutdown,
    /// Server to scheduler: still alive (sent every [`HEARTBEAT_EVERY`]).
    Heartbeat,
    /// Anyone to scheduler: describe the cluster (`pserv status`); no registration needed.
    StatusRequest,
    /// Scheduler to whoever asked: the cluster as the scheduler sees it.
    Status {
        /// The report.
        report: StatusReport,
    },
    /// Worker to server: attach the server's one-sided window on `range`, with the
    /// worker's host id and its connection endpoints by backend kind.
    OpenWindow {
        /// The dense key range (inside the server's range).
        range: crate::base::keys::KeyRange,
        /// The worker's host id (same-host check for shm).
        host: String,
        /// (backend kind, endpoint bytes) the worker can use.
        offers: Vec<(u8, Vec<u8>)>,
    },
    /// Server to worker: the window is attached through this grant.
    WindowGranted {
        /// Descriptors and endpoint.
        grant: WindowGrant,
    },
    /// Server to worker: no one-sided window; use TCP.
    WindowRefused {
        /// Why.
        reason: String,
    },
    /// Scheduler to servers and workers: the routing table changed (a server failed,
    /// joined or left). Nodes at an older epoch install it; requests routed with the old
    /// table are refused with [`Status::StaleEpoch`] and resent by the workers.
    Table {
        /// The new routing table, with its chains and epoch.
        partition: Partition,
    },
    /// Server to server: the values a chain's head replicates down the chain (chain
    /// replication after aggregation).
    Replicate {
        /// The batch.
        batch: Box<ReplicaBatch>,
    },
    /// Tail to head: every replica of the chain installed batch `seq` of the head.
    ReplicaAck {
        /// The head's batch number.
        seq: u64,
    },
    /// A server asks to join a running cluster (`pserv server --join`).
    Join {
        /// Where it listens.
        addr: SocketAddr,
        /// A requested rank (must be free; default: the next one).
        rank: Option<u32>,
        /// Process id, for the operator.
        pid: u32,
    },
    /// Anyone to scheduler: server `rank` should leave gracefully, after handing its
    /// ranges over (`pserv leave`, or the server itself on SIGTERM).
    Leave {
        /// The server's rank.
        rank: u32,
    },
    /// Scheduler to every node: the servers of the cluster now (a server joined).
    Servers {
        /// Every server, by rank.
        servers: Vec<ServerInfo>,
    },
    /// A node reconnects to a scheduler that restarted (`pserv scheduler --recover`) and
    /// reports what the scheduler needs to rebuild its view.
    Rejoin {
        /// Server or worker.
        role: Role,
        /// Its rank.
        rank: u32,
        /// Its node id.
        node_id: u32,
        /// Where a server listens.
        addr: Option<SocketAddr>,
        /// Process id.
        pid: u32,
        /// The routing table it has (the newest among the servers' wins).
        table: Partition,
        /// A worker's number of barriers passed.
        barriers: u64,
    },
    /// Worker to every server: a sequential push of clock `clock` that had to be resent
    /// in part (after a failover or a refusal) is acknowledged, and so is every earlier
    /// push of this worker. Servers move its clock up to `clock` on every range: its
    /// resent pieces moved it only where they wrote, and no other message of this
    /// worker may come to say so (it was its last push).
    Completed {
        /// The clock every push of the worker up to which is acknowledged.
        clock: u64,
    },
    /// Worker to a server, while a sequential push of `clock` whose keys were partly
    /// resent is still open elsewhere: every key of it that this server heads under
    /// routing-table `epoch` is acknowledged. The server moves the worker's clock up to
    /// `clock` on its ranges (when it is at `epoch`): the resent pieces moved it nowhere,
    /// and waiting for [`Control::Completed`] could wait on a gate that waits on this one.
    CompletedHere {
        /// The push's clock.
        clock: u64,
        /// The routing-table epoch whose ranges of this server the notice speaks of.
        epoch: u64,
    },
    /// Internal to a worker (never sent): the scheduler connection is back after a restart;
    /// a barrier in progress is asked for again.
    SchedulerBack,
    /// Server to scheduler, with every heartbeat: its replication as a chain's head.
    ReplicationLag {
        /// Batches queued or sent and not yet acknowledged by their tail.
        batches: u64,
        /// Pushes waiting in them for their answer.
        pushes: u64,
        /// Age of the oldest of them, in microseconds.
        oldest_us: u64,
    },
    /// Server to scheduler: under routing table `epoch`, every copy this server started
    /// as a head (whole ranges for replicas new in its chains) is acknowledged.
    Synced {
        /// The table's epoch.
        epoch: u64,
    },
    /// Scheduler to servers: worker `rank` has left the job (finished or failed). Servers
    /// retire it from their clock gates, as when its connection closes; this reaches
    /// servers it never connected to (one that joined after it, or before it sent them
    /// anything).
    WorkerGone {
        /// The worker's rank.
        rank: u32,
    },
    /// Worker to a server, first on a new connection: compress the answers on this
    /// connection with `codec` (a codec name, `pserv_transport::compress::Codec`'s
    /// syntax) when that makes them smaller. The worker compresses its requests so.
    Compress {
        /// The codec's name.
        codec: String,
    },
    /// Operator (`pserv checkpoint`) to the scheduler: write a checkpoint into `dir` at
    /// the next epoch barrier. Answered with a `Log` once it is written, or `Refused`.
    CheckpointRequest {
        /// The checkpoint folder (absolute).
        dir: String,
    },
    /// Scheduler to a server: write the ranges you head into `dir` (the epoch folder) as
    /// `server-RANK.ckpt`; answer `CheckpointWritten` or `CheckpointFailed`.
    CheckpointWrite {
        /// The epoch folder.
        dir: String,
        /// The job epoch the checkpoint follows.
        epoch: u64,
    },
    /// Server to the scheduler: its checkpoint file is written (and synced).
    CheckpointWritten {
        /// The job epoch.
        epoch: u64,
        /// The file.
        file: crate::checkpoint::FileEntry,
    },
    /// Server to the scheduler: its checkpoint file could not be written.
    CheckpointFailed {
        /// The job epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Worker 0 to the scheduler: the job's model-defining flags (JSON object of flag to
    /// value), recorded in every checkpoint's manifest and checked on restore.
    JobFlags {
        /// The JSON object.
        json: String,
    },
    /// A worker process to the scheduler, instead of `Register`: take over the place of
    /// failed worker `rank` (its rank, node id, data shard and position). Answered with a
    /// `Welcome` carrying a [`Resume`], or `Refused` (the rank is alive, unknown, or the
    /// job keeps no places for replacements) changing nothing.
    Replace {
        /// The failed worker's rank.
        rank: u32,
        /// Process id, for the operator.
        pid: u32,
    },
    /// Scheduler to servers: worker `rank` enters the job at clock `clock` (it joined,
    /// or replaces a failed worker): the clock gates count it from `clock + 1` on.
    /// Answered with `WorkerEntered`; the barrier it enters at waits for every answer.
    WorkerEnters {
        /// The worker's rank.
        rank: u32,
        /// The clock every other worker has at the entry (the joiner's starts there).
        clock: u64,
    },
    /// Server to scheduler: its clock gate counts worker `rank` now.
    WorkerEntered {
        /// The worker's rank.
        rank: u32,
    },
    /// Scheduler to servers: which clock has failed worker `rank` reached on your
    /// ranges? Answered with `WorkerClockIs`.
    WorkerClock {
        /// The worker's rank.
        rank: u32,
    },
    /// Server to scheduler: worker `rank`'s smallest clock over the ranges this server
    /// heads (every push of it up to that clock is applied here).
    WorkerClockIs {
        /// The worker's rank.
        rank: u32,
        /// Its clock here.
        clock: u64,
    },
    /// Operator (`pserv leave --worker RANK`) to the scheduler: worker `rank` leaves
    /// gracefully; the scheduler passes it on as `PleaseLeave`.
    WorkerLeave {
        /// The worker's rank.
        rank: u32,
    },
    /// Scheduler to a worker: finish the clock you are in, then leave the job.
    PleaseLeave,
    /// Worker to scheduler: it leaves after clock `clock` (every push of it is
    /// acknowledged): the servers retire it and the others take its shard from the next
    /// epoch, nobody waits for it. Then it sends `Done`.
    Leaving {
        /// Its last clock.
        clock: u64,
    },
    /// Worker to scheduler at every epoch: the rows it trains and its clock, for
    /// `pserv status`.
    Shard {
        /// The epoch.
        epoch: u32,
        /// Row ranges of the training set (start, end).
        rows: Vec<(u64, u64)>,
        /// Its clock when the epoch starts.
        clock: u64,
    },
}

/// Where a replacement worker takes over from the failed one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The newest barrier the job released (the failed worker passed it, and no later
    /// one was released without its replacement).
    pub barrier: u64,
    /// The workers running at that barrier (what the failed worker's epoch plan used).
    pub live: Vec<u32>,
    /// The clock the workers had at that barrier.
    pub barrier_clock: u64,
    /// The failed worker's clock: the smallest over the servers of the clock up to which
    /// its pushes are applied there. The replacement's first step is `clock + 1`.
    pub clock: u64,
}

/// A push whose effect a replication batch carries, for exactly-once retries: a worker
/// that resends it after a failover finds it applied on the new head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRecord {
    /// The worker's node id.
    pub sender: u32,
    /// The push's task timestamp.
    pub ts: u64,
    /// The key ranges of the head the push touched (the routing table's ranges).
    pub ranges: Vec<crate::base::keys::KeyRange>,
}

/// Values of keys after the head applied some pushes: weights and the update function's
/// state, which the replica installs as they are (values, not gradients: installing
/// twice changes nothing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReplicaPart {
    /// Sorted keys, `keys.len() * value_len` weights and `* state_len` more of state.
    Keys {
        /// The keys, as little-endian u64s.
        #[serde(with = "serde_bytes")]
        keys: Vec<u8>,
        /// Their weights.
        #[serde(with = "serde_bytes")]
        weights: Vec<u8>,
        /// Their state.
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// Every key of a range (dense).
    Range {
        /// The keys.
        range: crate::base::keys::KeyRange,
        /// Their weights.
        #[serde(with = "serde_bytes")]
        weights: Vec<u8>,
        /// Their state.
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
}

/// One replication message down a chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaBatch {
    /// Rank of the head that made it.
    pub origin: u32,
    /// The head's batch number (acknowledged by the tail).
    pub seq: u64,
    /// The routing-table epoch the head made it under.
    pub epoch: u64,
    /// Ranks still to receive it after the one it is sent to (empty: that one is the tail).
    pub rest: Vec<u32>,
    /// The whole chain after the head it travels (a hand-off marker is per chain: only
    /// the marker that followed a range's batches says they all arrived).
    #[serde(default)]
    pub path: Vec<u32>,
    /// The pushes whose effects it carries.
    pub pushes: Vec<PushRecord>,
    /// The values.
    pub parts: Vec<ReplicaPart>,
}

/// Bits of a request header's `timestamp` that hold the worker's task timestamp. Above
/// them: [`SEGMENT_BITS`] bits of the index of the task's segment the request carries (a
/// task split over several servers, and resent after a failover, has one segment per
/// request, and the answer names its segment), then [`SEGMENT_BITS`] bits of its *origin*:
/// the index (plus one) of the segment of the task's first split its keys come from, kept
/// when they are resent. Servers identify a piece of a push by (sender, [`push_id`]): the
/// task and origin, not the segment, so a resent piece is recognised wherever it lands.
pub const TASK_BITS: u32 = 40;

/// Bits of the segment index, and of the origin, in a request's `timestamp`.
pub const SEGMENT_BITS: u32 = 12;

/// The most segments a task can have (and the most servers a first split can reach).
pub const MAX_SEGMENTS: usize = 1 << SEGMENT_BITS;

const SEGMENT_MASK: u64 = (1 << SEGMENT_BITS) - 1;

/// The task timestamp of a request's `timestamp` field.
pub fn task_of(timestamp: u64) -> u64 {
    timestamp & ((1 << TASK_BITS) - 1)
}

/// The segment index of a request's `timestamp` field.
pub fn segment_of(timestamp: u64) -> usize {
    ((timestamp >> TASK_BITS) & SEGMENT_MASK) as usize
}

/// The origin (first-split segment plus one; 0: not given) of a request's `timestamp`.
pub fn origin_of(timestamp: u64) -> usize {
    (timestamp >> (TASK_BITS + SEGMENT_BITS)) as usize
}

/// What identifies a piece of a push for exactly-once resends: the task and the origin,
/// without the segment index.
pub fn push_id(timestamp: u64) -> u64 {
    timestamp & !(SEGMENT_MASK << TASK_BITS)
}

/// The `timestamp` field of segment `segment` of task `ts` whose keys come from segment
/// `origin` of the task's first split (both below [`MAX_SEGMENTS`]).
pub fn request_timestamp(ts: u64, segment: usize, origin: usize) -> u64 {
    debug_assert!(ts < 1 << TASK_BITS && segment < MAX_SEGMENTS && origin < MAX_SEGMENTS);
    ts | ((segment as u64) << TASK_BITS)
        | (((origin + 1) as u64 & SEGMENT_MASK) << (TASK_BITS + SEGMENT_BITS))
}

/// Node ids of servers that joined a running cluster start here (`JOINED_SERVER_BASE +
/// rank`): above every worker's id, also of workers that join later (`1 + S + rank`).
/// The node ids are encoded and decoded in [`crate::base::ids`].
pub const JOINED_SERVER_BASE: u32 = crate::base::ids::JOINED_SERVER_BASE;

/// How often servers send [`Control::Heartbeat`].
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_millis(300);

/// One key range of the routing table and the servers that hold it, head first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RangeStatus {
    /// The keys.
    pub range: crate::base::keys::KeyRange,
    /// Ranks of the servers holding it, head first (one: no replication).
    pub chain: Vec<u32>,
}

/// One node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Server or worker.
    pub role: Role,
    /// Rank within its role.
    pub rank: u32,
    /// Where it listens (servers).
    pub addr: Option<std::net::SocketAddr>,
    /// `live`, `dead` (missed heartbeats), `gone` (connection closed) or `done`.
    pub state: String,
    /// Milliseconds since its last heartbeat (servers).
    pub heartbeat_ms_ago: Option<u64>,
    /// A server's replication as head at its last heartbeat: batches not yet acknowledged
    /// by their tail, pushes waiting in them, age of the oldest in microseconds.
    #[serde(default)]
    pub replication: Option<(u64, u64, u64)>,
    /// A worker's share of the data and its clock, as it reported them.
    #[serde(default)]
    pub shard: Option<WorkerShard>,
}

/// Which rows a worker trains, at which clock (what `pserv status` shows of a worker).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerShard {
    /// The epoch it reported last.
    pub epoch: u32,
    /// Row ranges of the training set (start, end) it trains in that epoch.
    pub rows: Vec<(u64, u64)>,
    /// Its clock when that epoch started.
    pub clock: u64,
    /// How often a replacement took this rank over.
    pub replaced: u32,
    /// Whether it left gracefully.
    pub left: bool,
}

/// What `pserv status` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The routing table's epoch.
    pub epoch: u64,
    /// Replicas per range beyond the head.
    pub replicas: u32,
    /// The routing table.
    pub ranges: Vec<RangeStatus>,
    /// Every registered node.
    pub nodes: Vec<NodeStatus>,
    /// Whether the job runs (workers welcomed), and whether it is over.
    pub running: bool,
    /// See `running`.
    pub finished: bool,
    /// Replication lag per range; empty while replication is not wired (every range has
    /// one copy).
    pub replication_lag: Vec<(crate::base::keys::KeyRange, u64)>,
}

/// Errors decoding a control message.
#[derive(Debug, thiserror::Error)]
#[error("undecodable control message: {0}")]
pub struct ControlDecodeError(#[from] postcard::Error);

impl Control {
    /// Encode as a control frame from `sender`.
    pub fn to_frame(&self, sender: u32) -> OutFrame {
        let bytes = postcard::to_allocvec(self).expect("control messages always encode");
        let header = Header::new(MessageKind::Control, sender, 0);
        OutFrame::new(header, Payload::empty(), Payload::owned(bytes))
    }

    /// Decode from a control frame's values.
    pub fn from_frame(frame: &Frame<'_>) -> Result<Control, ControlDecodeError> {
        Ok(postcard::from_bytes(frame.values())?)
    }
}

fn response_header(request: &Header, sender: u32) -> Header {
    let mut h = *request;
    h.sender = sender;
    // An answer says it cached the request's key list by echoing FLAG_CACHE_KEYS (a
    // server that did not cache it clears the flag before serving).
    h.flags = FLAG_RESPONSE | (request.flags & FLAG_CACHE_KEYS);
    h.status = Status::Ok as u8;
    h
}

/// An answer to `request` carrying `values` (no keys: the requester knows them).
pub fn answer(request: &Header, sender: u32, value_len: u32, values: Payload) -> OutFrame {
    let mut h = response_header(request, sender);
    h.value_len = value_len;
    OutFrame::new(h, Payload::empty(), values)
}

/// An error answer to `request`: the status code and a text for the requester.
pub fn error_answer(request: &Header, sender: u32, status: Status, message: &str) -> OutFrame {
    let mut h = response_header(request, sender);
    h.status = status as u8;
    h.dtype = DType::Bytes as u8;
    h.value_len = 0;
    OutFrame::new(h, Payload::empty(), Payload::copy_from(message.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trip() {
        let msgs = vec![
            Control::Register {
                role: Role::Server,
                addr: Some("127.0.0.1:5000".parse().unwrap()),
                rank: Some(1),
                pid: 42,
            },
            Control::Barrier { seq: 7, clock: 3 },
            Control::Done {
                stats: WorkerStats {
                    examples: 5,
                    bytes_sent: 6,
                    bytes_received: 7,
                    seconds: 1.5,
                    blocked_seconds: 0.25,
                },
            },
            Control::Shutdown,
            Control::CheckpointWritten {
                epoch: 3,
                file: crate::checkpoint::FileEntry {
                    rank: 1,
                    name: "server-1.ckpt".into(),
                    bytes: 99,
                    checksum: u64::MAX,
                    keys: 5,
                    state_len: 1,
                },
            },
            Control::CheckpointWrite {
                dir: "/ck/epoch-3".into(),
                epoch: 3,
            },
        ];
        for m in msgs {
            let f = m.to_frame(3);
            let bytes =
                pserv_transport::wire::encode(f.header(), &[], &postcard::to_allocvec(&m).unwrap());
            let buf: Vec<u64> = {
                let mut v = vec![0u64; bytes.len() / 8];
                bytemuck::cast_slice_mut::<u64, u8>(&mut v).copy_from_slice(&bytes);
                v
            };
            let (frame, _) = Frame::new_checked(bytemuck::cast_slice(&buf), 1 << 20).unwrap();
            assert_eq!(Control::from_frame(&frame).unwrap(), m);
        }
    }

    #[test]
    fn garbage_control_is_an_error_not_a_panic() {
        let bytes = pserv_transport::wire::encode(
            &Header::new(MessageKind::Control, 1, 0),
            &[],
            &[0xff; 9],
        );
        let buf: Vec<u64> = {
            let mut v = vec![0u64; bytes.len() / 8];
            bytemuck::cast_slice_mut::<u64, u8>(&mut v).copy_from_slice(&bytes);
            v
        };
        let (frame, _) = Frame::new_checked(bytemuck::cast_slice(&buf), 1 << 20).unwrap();
        assert!(Control::from_frame(&frame).is_err());
    }
}

/// What a server answers to a worker's window request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowGrant {
    /// The window's key range.
    pub range: crate::base::keys::KeyRange,
    /// Values per key.
    pub value_len: u32,
    /// Bytes per value element.
    pub elem: u32,
    /// Payload bytes per versioned block.
    pub block_payload: u64,
    /// The backend chosen.
    pub backend: u8,
    /// The server's endpoint bytes (for the worker's `connect`).
    pub endpoint: Vec<u8>,
    /// Encoded descriptors: the blocks, the meta words, this worker's landing area.
    pub data: Vec<u8>,
    /// See `data`.
    pub meta: Vec<u8>,
    /// See `data`.
    pub landing: Vec<u8>,
    /// Why this backend (for the worker's log).
    pub reason: String,
}
