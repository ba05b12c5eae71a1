//! Synchronisation across workers: the consistency clock and barriers.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::base::error::EngineError;
use crate::proto::Control;

use super::Worker;

impl Worker {
    /// Advance this worker's consistency clock by one and return it (the first call
    /// returns 1). Once a worker ticks, its pushes carry its clock to every server, and
    /// its pulls wait on the servers until every worker's clock has reached
    /// `clock - tau - 1` (the task's consistency model decides tau): bounded delay across
    /// workers. A clocked worker should push once per tick.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// This worker's consistency clock (0: never ticked, requests carry no clock).
    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Acquire)
    }

    /// Wait until every worker has called `barrier` as often as this one.
    pub fn barrier(&self) -> Result<(), EngineError> {
        self.barrier_live().map(|_| ())
    }

    /// Whether this worker joined a running job (its rank is beyond the first workers').
    pub fn joined_late(&self) -> bool {
        self.rank >= self.cluster.workers
    }

    /// For a worker that joined a running job: wait for the next barrier the others
    /// reach and take part from there on. Returns that barrier's number and the ranks of
    /// the workers running.
    pub fn join_barrier(&self) -> Result<(u64, Vec<u32>), EngineError> {
        self.await_barrier(0)
    }

    /// For a worker that joins a running job: enter at barrier `seq` (the one that
    /// ends epoch `seq / 2` of the LR job, for example), whatever the time it
    /// registered; refused when the job is past it. Returns the live workers. The
    /// worker's clock continues from the clock the others had there.
    pub fn join_at_barrier(&self, seq: u64) -> Result<Vec<u32>, EngineError> {
        self.await_barrier(seq.max(1)).map(|(_, live)| live)
    }

    /// Set this worker's clock to `clock` (a replacement resuming after the failed
    /// worker's last clock); never moves it back.
    pub fn resume_clock(&self, clock: u64) {
        self.clock.fetch_max(clock, Ordering::AcqRel);
    }

    /// Count barriers from `seq` on (a replacement takes the failed worker's count: its
    /// next `barrier` is `seq + 1`).
    pub fn resume_barriers(&self, seq: u64) {
        self.barrier_seq.fetch_max(seq, Ordering::AcqRel);
        self.core.barriers_passed.fetch_max(seq, Ordering::AcqRel);
    }

    /// Number the tasks of clock `clock` from `clock << TASK_STRIDE_BITS` on, so that a
    /// push of a given clock has the same task timestamp in every run and in a
    /// replacement that redoes it (the servers' exactly-once memory keys on it). Tasks
    /// skipped count as finished. Call at the start of each clock, before its tasks.
    pub fn align_tasks(&self, clock: u64) {
        self.core.skip_tasks_to(clock << TASK_STRIDE_BITS);
    }
}

/// Task timestamps per clock for [`Worker::align_tasks`]: 2^8 tasks of one clock at most
/// keep their numbers (more only shift the next clock's).
pub const TASK_STRIDE_BITS: u32 = 8;

impl Worker {
    /// [`barrier`](Self::barrier), returning the ranks of the workers still running
    /// (sorted; workers that left are missing): what a job needs to hand a departed
    /// worker's data to the others.
    pub fn barrier_live(&self) -> Result<Vec<u32>, EngineError> {
        let seq = self.barrier_seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.await_barrier(seq).map(|(_, live)| live)
    }

    /// Ask for barrier `seq` (0: the next one the others reach) and wait until it is
    /// released; a restarted scheduler is asked again. Returns the barrier's number and
    /// the live workers.
    fn await_barrier(&self, seq: u64) -> Result<(u64, Vec<u32>), EngineError> {
        let clock = self.clock();
        if let Err(e) = self.tell_scheduler(Control::Barrier { seq, clock }) {
            // The scheduler is gone: a restarted one gets it when this worker rejoins.
            tracing::debug!(error = %e, "barrier not sent; waiting for the scheduler");
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.control.recv_deadline(deadline) {
                Ok(Control::BarrierDone {
                    seq: s,
                    live,
                    clock: entry,
                }) if seq == 0 || s == seq => {
                    self.barrier_seq.store(s, Ordering::Relaxed);
                    self.core.barriers_passed.store(s, Ordering::Release);
                    if self.clock() < entry && self.joined_late() {
                        // Entering the job here: count on from where the others are.
                        self.clock.store(entry, Ordering::Release);
                    }
                    return Ok((s, live));
                }
                Ok(Control::SchedulerBack) => {
                    let _ = self.tell_scheduler(Control::Barrier { seq, clock });
                }
                Ok(Control::Shutdown) => return Err(EngineError::SchedulerGone),
                Ok(Control::Refused { reason }) => {
                    return Err(EngineError::Registration(format!(
                        "the scheduler refused barrier {seq}: {reason}"
                    )))
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(EngineError::Timeout(if seq == 0 {
                        format!("no barrier reached within {:?} of joining", self.timeout)
                    } else {
                        format!("barrier {seq} not released within {:?}", self.timeout)
                    }))
                }
                Err(_) => return Err(EngineError::SchedulerGone),
                Ok(other) => tracing::debug!(?other, "control message while in a barrier"),
            }
        }
    }
}
