//! Checkpoints at epoch barriers, decided by the state machine: when one is due
//! (`--checkpoint-every`, a `pserv checkpoint` request), the barrier that ends an epoch is
//! held, every server that heads a range is asked to write its file, and once all have
//! answered the manifest is written ([`Output::WriteCheckpoint`], by the process) and only
//! then ([`Input::CheckpointCommitted`](super::Input::CheckpointCommitted)) the barrier
//! released. A server that fails, does not answer within
//! [`WRITE_TIMEOUT`](crate::checkpoint::WRITE_TIMEOUT) or leaves gives the checkpoint up
//! (logged, the requester told, naming the servers) and training goes on.
//!
//! Epochs are counted from barriers as the LR job lays them out: two per epoch (the end
//! of training, then the end of evaluation), so barrier `2k` ends epoch `k` after the
//! restored one. No push is in flight there: every worker waited for its pushes (and so
//! for their replicas) before it entered the barrier; under sequential and bounded-delay
//! consistency that is a clock boundary.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::core::{ConnKey, Output, SchedulerCore};
use crate::checkpoint::{Every, FileEntry, Manifest, MANIFEST_VERSION};
use crate::proto::{Control, Role};

/// When and where the scheduler writes checkpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointPlan {
    /// `--checkpoint-every`.
    pub every: Option<Every>,
    /// `--checkpoint-dir`.
    pub dir: Option<PathBuf>,
    /// The epoch of the checkpoint the job was restored from (0: a fresh job): barrier
    /// `2k` ends epoch `restored_epoch + k`.
    pub restored_epoch: u64,
    /// The job flags of the checkpoint restored from: recorded in the checkpoints this
    /// scheduler writes until the job's worker 0 reports its own (the same: it checks
    /// them against these), and by a scheduler restarted with `--recover`, which never
    /// hears them again.
    pub restored_job: Option<serde_json::Value>,
}

/// The scheduler's checkpoint state.
#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    pub(super) plan: CheckpointPlan,
    /// When the last checkpoint was written (or 0), in `now_ms` time.
    last_ms: u64,
    /// `pserv checkpoint` requests not yet served: (connection, folder).
    requests: Vec<(ConnKey, PathBuf)>,
    /// The job's model-defining flags, from its worker 0.
    job: Option<serde_json::Value>,
    pending: Option<Pending>,
    /// Epochs checkpointed so far (each once, however many folders got one).
    pub(super) written: Vec<u64>,
    /// The newest epoch barrier looked at, whether `--checkpoint-every` was due there,
    /// and the folders a checkpoint was taken (or tried) into at it: one barrier may take
    /// one per folder (a `pserv checkpoint` request elsewhere and the periodic one).
    at: (u64, bool, Vec<PathBuf>),
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    epoch: u64,
    root: PathBuf,
    waiting: BTreeSet<u32>,
    files: Vec<FileEntry>,
    since_ms: u64,
    requesters: Vec<ConnKey>,
    /// The manifest is being written.
    committing: bool,
}

impl SchedulerCore {
    /// Take checkpoints as `plan` says.
    pub fn with_checkpoints(mut self, plan: CheckpointPlan) -> Self {
        self.ckpt.job = plan.restored_job.clone();
        self.ckpt.plan = plan;
        self
    }

    /// The epochs checkpointed so far.
    pub fn checkpoints_written(&self) -> &[u64] {
        &self.ckpt.written
    }

    /// Whether barrier `seq` (complete) must wait for a checkpoint: one is being taken at
    /// it or an earlier one, or one is due now (then it is started).
    pub(super) fn checkpoint_holds(&mut self, seq: u64, out: &mut Vec<Output>) -> bool {
        if let Some(p) = &self.ckpt.pending {
            return seq >= p.seq;
        }
        if seq <= self.last_barrier || !seq.is_multiple_of(2) || seq < self.ckpt.at.0 {
            return false;
        }
        let epoch = self.ckpt.plan.restored_epoch + seq / 2;
        if seq > self.ckpt.at.0 {
            let every = match self.ckpt.plan.every {
                Some(Every::Epochs(n)) => epoch.is_multiple_of(n),
                Some(Every::Secs(s)) => self.now_ms.saturating_sub(self.ckpt.last_ms) >= s * 1000,
                None => false,
            };
            self.ckpt.at = (seq, every, Vec::new());
        }
        let (_, every, done) = &self.ckpt.at;
        let periodic = self
            .ckpt
            .plan
            .dir
            .clone()
            .filter(|d| *every && !done.contains(d));
        let root = match (self.ckpt.requests.first(), periodic) {
            (Some((_, d)), _) => d.clone(),
            (None, Some(d)) => d,
            _ => return false,
        };
        let requesters: Vec<ConnKey> = self
            .ckpt
            .requests
            .iter()
            .filter(|(_, d)| *d == root)
            .map(|(c, _)| *c)
            .collect();
        self.ckpt.requests.retain(|(_, d)| *d != root);
        self.ckpt.at.2.push(root.clone());
        let heads: BTreeSet<u32> = self.table.owners().iter().copied().collect();
        let dir = root.join(crate::checkpoint::epoch_dir_name(epoch));
        let mut missing = Vec::new();
        let mut conns = Vec::new();
        for &r in &heads {
            match self.server_conn(r) {
                Some(c) => conns.push(c),
                None => missing.push(r),
            }
        }
        self.ckpt.pending = Some(Pending {
            seq,
            epoch,
            root,
            waiting: heads.clone(),
            files: Vec::new(),
            since_ms: self.now_ms,
            requesters,
            committing: false,
        });
        if !missing.is_empty() {
            self.checkpoint_abort(
                format!("servers {missing:?} head ranges but are not connected"),
                false,
                out,
            );
            return false;
        }
        out.push(Output::Log(format!(
            "checkpoint of epoch {epoch}: barrier {seq} held while servers {heads:?} write into {}",
            dir.display()
        )));
        let msg = Control::CheckpointWrite {
            dir: dir.display().to_string(),
            epoch,
        };
        Self::send_each(conns, &msg, out);
        true
    }

    fn server_conn(&self, rank: u32) -> Option<ConnKey> {
        self.nodes
            .iter()
            .find(|(_, n)| n.role == Role::Server && n.rank == rank && !n.gone && !n.dead)
            .map(|(c, _)| *c)
    }

    fn server_rank(&self, conn: ConnKey) -> Option<u32> {
        self.nodes
            .get(&conn)
            .filter(|n| n.role == Role::Server)
            .map(|n| n.rank)
    }

    /// `pserv checkpoint`: write one into `dir` at the next epoch barrier.
    pub(super) fn on_checkpoint_request(
        &mut self,
        conn: ConnKey,
        dir: String,
        out: &mut Vec<Output>,
    ) {
        let path = PathBuf::from(&dir);
        if self.finished {
            return self.refuse(conn, "the job is over: no epoch barrier is left", out);
        }
        if !path.is_absolute() {
            return self.refuse(
                conn,
                &format!("checkpoint folder {dir:?} is not an absolute path"),
                out,
            );
        }
        out.push(Output::Log(format!(
            "checkpoint into {dir} requested: it is taken at the next epoch barrier"
        )));
        self.ckpt.requests.push((conn, path));
    }

    /// A server wrote its file.
    pub(super) fn on_checkpoint_written(
        &mut self,
        conn: ConnKey,
        epoch: u64,
        file: FileEntry,
        out: &mut Vec<Output>,
    ) {
        let Some(rank) = self.server_rank(conn) else {
            return self.refuse(
                conn,
                "a checkpoint file from a node that is not a server",
                out,
            );
        };
        let Some(p) = self.ckpt.pending.as_mut().filter(|p| p.epoch == epoch) else {
            out.push(Output::Log(format!(
                "server {rank} reported a checkpoint file of epoch {epoch}, which is not being taken; ignored"
            )));
            return;
        };
        if file.rank != rank || !p.waiting.remove(&rank) {
            out.push(Output::Log(format!(
                "server {rank} reported an unexpected checkpoint file {file:?}; ignored"
            )));
            return;
        }
        p.files.push(file);
        if !p.waiting.is_empty() || p.committing {
            return;
        }
        p.committing = true;
        let mut files = p.files.clone();
        files.sort_by_key(|f| f.rank);
        let state_len = files.first().map_or(0, |f| f.state_len);
        if files.iter().any(|f| f.state_len != state_len) {
            return self.checkpoint_abort(
                format!("the servers hold different state lengths: {files:?}"),
                true,
                out,
            );
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            epoch,
            value_type: self.spec.value_type,
            value_len: self.spec.value_len,
            update: self.spec.update.to_string(),
            state_len,
            replicas: self.spec.replicas,
            partition: self.table.clone(),
            job: self.ckpt.job.clone(),
            files,
        };
        out.push(Output::WriteCheckpoint {
            root: p.root.clone(),
            manifest: Box::new(manifest),
        });
    }

    /// A server could not write its file.
    pub(super) fn on_checkpoint_failed(
        &mut self,
        conn: ConnKey,
        epoch: u64,
        reason: String,
        out: &mut Vec<Output>,
    ) {
        let rank = self.server_rank(conn);
        if self.ckpt.pending.as_ref().is_some_and(|p| p.epoch == epoch) {
            let who = rank.map_or("a server".to_string(), |r| format!("server {r}"));
            self.checkpoint_abort(
                format!("{who} could not write its file: {reason}"),
                true,
                out,
            );
        }
    }

    /// The job's flags, from a worker.
    pub(super) fn on_job_flags(&mut self, json: String, out: &mut Vec<Output>) {
        match serde_json::from_str(&json) {
            Ok(v) => self.ckpt.job = Some(v),
            Err(e) => out.push(Output::Log(format!("ignored malformed job flags: {e}"))),
        }
    }

    /// The manifest of epoch `epoch` was written into `result`'s folder (or could not be).
    pub(super) fn on_checkpoint_committed(
        &mut self,
        epoch: u64,
        result: Result<PathBuf, String>,
        out: &mut Vec<Output>,
    ) {
        if !self
            .ckpt
            .pending
            .as_ref()
            .is_some_and(|p| p.epoch == epoch && p.committing)
        {
            return;
        }
        match result {
            Err(why) => self.checkpoint_abort(format!("writing the manifest: {why}"), true, out),
            Ok(dir) => {
                let p = self.ckpt.pending.take().expect("checked above");
                let line = format!("checkpoint of epoch {epoch} written to {}", dir.display());
                out.push(Output::Log(line.clone()));
                Self::send_each(p.requesters, &Control::Log { line }, out);
                if self.ckpt.written.last() != Some(&epoch) {
                    self.ckpt.written.push(epoch);
                }
                self.ckpt.last_ms = self.now_ms;
                self.release_barriers(out);
            }
        }
    }

    /// Give the checkpoint being taken up (`why`), tell whoever asked for it, and let the
    /// barrier go.
    fn checkpoint_abort(&mut self, why: String, release: bool, out: &mut Vec<Output>) {
        let Some(p) = self.ckpt.pending.take() else {
            return;
        };
        let line = format!(
            "checkpoint of epoch {} into {} failed: {why}; training goes on without it",
            p.epoch,
            p.root.display()
        );
        out.push(Output::Log(line.clone()));
        Self::send_each(p.requesters, &Control::Refused { reason: line }, out);
        if release {
            self.release_barriers(out);
        }
    }

    /// Time passed: give up a checkpoint a server does not answer for, or one whose
    /// server is gone.
    pub(super) fn checkpoint_tick(&mut self, out: &mut Vec<Output>) {
        let Some(p) = &self.ckpt.pending else {
            return;
        };
        if p.committing {
            return;
        }
        let gone: Vec<u32> = p
            .waiting
            .iter()
            .copied()
            .filter(|&r| self.server_conn(r).is_none())
            .collect();
        let limit = crate::checkpoint::WRITE_TIMEOUT.as_millis() as u64;
        if !gone.is_empty() {
            let why = format!("servers {gone:?} failed or left before writing their files");
            self.checkpoint_abort(why, true, out);
        } else if self.now_ms.saturating_sub(p.since_ms) > limit {
            let why = format!(
                "servers {:?} did not write their files within {} s",
                p.waiting,
                limit / 1000
            );
            self.checkpoint_abort(why, true, out);
        }
    }

    /// The job ended (or a requester left): refuse the requests no barrier will serve.
    pub(super) fn checkpoint_requests_end(&mut self, out: &mut Vec<Output>) {
        for (conn, dir) in std::mem::take(&mut self.ckpt.requests) {
            let reason = format!(
                "the job ended before another epoch barrier: no checkpoint was written into {}",
                dir.display()
            );
            out.push(Output::Send {
                conn,
                msg: Control::Refused { reason },
            });
        }
    }

    /// A connection closed: forget its requests.
    pub(super) fn checkpoint_conn_closed(&mut self, conn: ConnKey) {
        self.ckpt.requests.retain(|(c, _)| *c != conn);
        if let Some(p) = self.ckpt.pending.as_mut() {
            p.requesters.retain(|c| *c != conn);
        }
    }
}
