//! A routing-table switch as the server makes it, without I/O: the order of the steps
//! (replication prepares, the table changes, the clock gate gives up what was routed
//! with the old table) is what keeps a clocked request from moving a clock under a
//! table the server no longer has. The server's control loop and the simulation both
//! switch with [`switch_table`].

use std::sync::Arc;

use crate::consistency::clock::{Action, ClockGate};
use crate::placement::Partition;

/// What a switch left to do: refuse `stale` (routed with another table: the workers
/// resend them), carry out `actions` (with the gate still held), then tell replication
/// the table moved from `old` to the new one.
pub(crate) struct Switched<P> {
    /// The table before the switch.
    pub(crate) old: Arc<Partition>,
    /// Held requests routed with another table.
    pub(crate) stale: Vec<P>,
    /// What their removal lets the gate do, in order.
    pub(crate) actions: Vec<Action<P>>,
}

/// Switch `table` to `new` if it is newer (else `None`: an older or repeated table is
/// ignored). `prepare` runs before the switch, with both tables (replication starts
/// noting the ranges taken over); `epoch_of` says which table epoch a held request was
/// routed with (0: unrouted, never stale). The caller holds `gate` across the call and
/// the actions, so nothing it holds for the old table slips through in between.
pub(crate) fn switch_table<P>(
    gate: &mut ClockGate<P>,
    table: &mut Arc<Partition>,
    new: Arc<Partition>,
    prepare: impl FnOnce(&Partition, &Partition),
    epoch_of: impl Fn(&P) -> u32,
) -> Option<Switched<P>> {
    if new.epoch() <= table.epoch() {
        return None;
    }
    prepare(table, &new);
    let epoch = new.epoch();
    let old = std::mem::replace(table, new);
    debug_assert!(table.epoch() > old.epoch(), "epochs only grow");
    let (stale, actions) = gate.evict(|p| {
        let e = epoch_of(p);
        e != 0 && u64::from(e) != epoch
    });
    Some(Switched {
        old,
        stale,
        actions,
    })
}
