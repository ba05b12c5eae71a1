//! The routing decisions of a server, without I/O or locks: whether a request routed
//! with some table epoch may be served here, which table ranges it touches, and which
//! parts of a resent push are not held yet. The server and the simulation both use
//! these.

use crate::base::keys::{Key, KeyRange};
use crate::placement::Partition;
use crate::proto::Status;
use crate::replication::KeysRef;
use crate::store::StoreError;

/// Why a request failed, as answered to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal(pub(crate) Status, pub(crate) String);

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

/// The refusal of a request routed with table `epoch` by a server at `current`.
pub(crate) fn stale_epoch(epoch: u32, current: u64) -> Refusal {
    Refusal(
        Status::StaleEpoch,
        format!(
            "request routed with routing-table epoch {epoch}, this server is at epoch \
             {current}: learn the current table and resend"
        ),
    )
}

/// Why `table` does not let server `me` serve `keys` of a request routed with `epoch`:
/// another epoch, keys it does not head, or ranges not handed over yet (`handoff` says
/// which previous head this server still waits for on those keys: the replication
/// core's `handoff_pending`). Checked in this order; `handoff` is asked only when the
/// first two pass.
pub(crate) fn route(
    table: &Partition,
    me: usize,
    epoch: u32,
    keys: KeysRef<'_>,
    handoff: impl FnOnce(KeysRef<'_>) -> Option<u32>,
) -> Option<Refusal> {
    // Epoch 0: a client that does not route, such as a tool; it still must ask the right
    // server.
    if epoch != 0 && u64::from(epoch) != table.epoch() {
        return Some(stale_epoch(epoch, table.epoch()));
    }
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
    handoff(keys).map(|prev| {
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

/// The ranges `table` gives server `me` that `keys` fall in (clipped to the request for a
/// range request). Call after [`route`] passed (keys sorted, owned).
pub(crate) fn touched_ranges(table: &Partition, me: usize, keys: KeysRef<'_>) -> Vec<KeyRange> {
    let mine = table
        .ranges()
        .iter()
        .zip(table.owners())
        .filter(|(_, &o)| o as usize == me)
        .map(|(r, _)| *r);
    match keys {
        KeysRef::Range(req) => mine.filter_map(|r| r.intersect(&req)).collect(),
        KeysRef::List(keys) => mine
            .filter(|r| {
                let i = keys.partition_point(|&k| k < r.begin);
                i < keys.len() && keys[i] < r.end
            })
            .collect(),
    }
}

/// The parts of `r` outside every range of `held`, in key order.
pub(crate) fn unheld_parts(r: KeyRange, held: &[KeyRange]) -> Vec<KeyRange> {
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
    debug_assert!(out.iter().all(|p| !p.is_empty() && r.covers(p)));
    out
}

/// The positions of the keys of `keys` outside every range of `held` (the part of a
/// resent push this server does not hold yet), in key order.
pub(crate) fn unheld_keys(keys: &[Key], held: &[KeyRange]) -> Vec<usize> {
    let out: Vec<usize> = keys
        .iter()
        .enumerate()
        .filter(|(_, &k)| !held.iter().any(|r| r.contains(k)))
        .map(|(i, _)| i)
        .collect();
    debug_assert!(out.len() <= keys.len());
    out
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
        assert_eq!(unheld_keys(&[1, 5, 12, 40], &[r(0, 6), r(30, 50)]), vec![2]);
        assert!(unheld_keys(&[1, 5], &[r(0, 6)]).is_empty());
    }

    #[test]
    fn routing_refuses_other_epochs_foreign_keys_and_ranges_not_handed_over() {
        let t = Partition::even(2);
        let mid = t.ranges()[1].begin;
        let epoch = t.epoch() as u32;
        let none = |_: KeysRef<'_>| None;
        assert!(route(&t, 0, epoch, KeysRef::List(&[1, 2]), none).is_none());
        assert!(
            route(&t, 0, 0, KeysRef::List(&[1, 2]), none).is_none(),
            "epoch 0 routes"
        );
        let stale = route(&t, 0, epoch + 1, KeysRef::List(&[1]), none).unwrap();
        assert_eq!(stale.0, Status::StaleEpoch);
        let foreign = route(&t, 0, epoch, KeysRef::List(&[1, mid]), none).unwrap();
        assert_eq!(foreign.0, Status::NotOwner);
        let waiting = route(&t, 1, epoch, KeysRef::Range(r(mid, mid + 5)), |_| Some(0)).unwrap();
        assert_eq!(waiting.0, Status::StaleEpoch);
        assert!(waiting.1.contains("handed"), "{}", waiting.1);
        assert_eq!(
            touched_ranges(&t, 1, KeysRef::Range(r(mid - 5, mid + 5))),
            vec![r(mid, mid + 5)]
        );
        assert_eq!(
            touched_ranges(&t, 0, KeysRef::List(&[3, 4])),
            vec![t.ranges()[0]]
        );
    }
}
