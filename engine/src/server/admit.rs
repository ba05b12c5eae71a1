//! Admission of a clocked request into the server's clock gate, without I/O or locks:
//! the server's handler and the simulation both call [`admit`] with the gate they own.

use crate::base::keys::KeyRange;
use crate::consistency::clock::{Action, ClockGate};
use crate::placement::Partition;
use crate::proto;

/// A clocked data request as the gate sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clocked {
    /// The worker's index among the workers (node id minus servers minus one).
    pub(crate) worker: usize,
    /// The worker's clock the request carries (at least 1).
    pub(crate) clock: u64,
    /// A pull (else a push).
    pub(crate) is_pull: bool,
    /// Sequential: every earlier task of its worker has finished.
    pub(crate) ordered: bool,
    /// The request's timestamp (task, segment, origin: see `proto::origin_of`).
    pub(crate) timestamp: u64,
    /// A range request (one of possibly several range messages of one task).
    pub(crate) is_range: bool,
}

/// Admit `req` (touching table ranges `ranges` of server `me`) into `gate`, holding `p`
/// for it: the actions to carry out now, in order (applies and answers of this and
/// other held requests).
///
/// - A sequential request says every earlier task of its worker finished: its clock
///   rises to the previous clock (the request's own for a pull) everywhere first.
/// - A pull is answered once every live worker's clock on the ranges it reads allows.
/// - A push applies in (clock, rank) order on the ranges it writes. A worker's first
///   message of a clock to this server (one key list, or clock-only) carries all its
///   keys here, so it moves the worker's clock on every range this server heads; a
///   resent piece, or one range of a range request, only where it writes.
pub(crate) fn admit<P>(
    gate: &mut ClockGate<P>,
    table: &Partition,
    me: usize,
    req: &Clocked,
    ranges: Vec<KeyRange>,
    p: P,
) -> Vec<Action<P>> {
    debug_assert!(req.clock > 0, "an unclocked request never meets the gate");
    let mut actions = if req.ordered {
        let done = if req.is_pull {
            req.clock
        } else {
            req.clock - 1
        };
        gate.completed(req.worker, done)
    } else {
        Vec::new()
    };
    if req.is_pull {
        if let Some(p) = gate.pull(req.clock, ranges, p) {
            actions.push(Action::Answer(p));
        }
    } else {
        let origin = proto::origin_of(req.timestamp);
        let first = origin == 0 || proto::segment_of(req.timestamp) + 1 == origin;
        let scope = if first && !req.is_range {
            table.ranges_of(me)
        } else if req.ordered && !req.is_range {
            // A resent piece of a key list may carry only some of the task's keys in
            // the table ranges it writes (another piece with the rest may still be on
            // its way, or refused and waiting): it moves no clock. The worker's next
            // sequential request says the whole task finished (`completed`).
            Vec::new()
        } else {
            ranges.clone()
        };
        actions.extend(gate.push(req.worker, req.clock, ranges, scope, req.ordered, p));
    }
    actions
}

/// A worker's [`proto::Control::CompletedHere`] for its sequential push of `clock`: every
/// key of it that server `me` heads under routing-table `epoch` is acknowledged, so its
/// clock rises to `clock` on the ranges `table` gives `me`. Nothing when `table` is at
/// another epoch (the notice speaks of other ranges).
pub(crate) fn completed_here<P>(
    gate: &mut ClockGate<P>,
    table: &Partition,
    me: usize,
    (worker, clock, epoch): (usize, u64, u64),
) -> Vec<Action<P>> {
    if table.epoch() != epoch {
        return Vec::new();
    }
    gate.reached(worker, clock, &table.ranges_of(me))
}
