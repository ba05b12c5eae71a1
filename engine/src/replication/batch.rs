//! Batches: what a head queues per downstream chain before it reads the values and sends
//! them, what it sent and waits for, and how a request's keys group by chain.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::base::keys::{Key, KeyRange};
use crate::placement::Partition;
use crate::proto::PushRecord;

use super::{AnswerId, KeysRef};

/// What a batch carries (before its values are read).
#[derive(Default)]
pub(super) struct Batch {
    pub(super) keys: Vec<Key>,
    pub(super) ranges: Vec<KeyRange>,
    /// Whole ranges to copy (every stored key), for a replica new in the chain.
    pub(super) snapshots: Vec<KeyRange>,
    pub(super) answers: Vec<AnswerId>,
    pub(super) pushes: Vec<PushRecord>,
    /// When its oldest push was queued.
    pub(super) since: Option<Duration>,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.ranges.is_empty()
            && self.snapshots.is_empty()
            && self.answers.is_empty()
            && self.pushes.is_empty()
    }

    /// This batch as if sent on `chain` at `now` (to be regrouped with the sent ones).
    pub(super) fn into_sent(self, chain: Vec<u32>, now: Duration) -> Sent {
        Sent {
            since: self.since.unwrap_or(now),
            chain,
            keys: self.keys,
            ranges: self.ranges,
            snapshots: self.snapshots,
            answers: self.answers,
            pushes: self.pushes,
        }
    }
}

/// A batch sent and not yet acknowledged.
pub(super) struct Sent {
    /// The replicas it went to, in chain order.
    pub(super) chain: Vec<u32>,
    /// When it was queued first (its oldest push).
    pub(super) since: Duration,
    pub(super) keys: Vec<Key>,
    pub(super) ranges: Vec<KeyRange>,
    pub(super) snapshots: Vec<KeyRange>,
    pub(super) answers: Vec<AnswerId>,
    pub(super) pushes: Vec<PushRecord>,
}

/// The keys of a request grouped by the downstream chain of their ranges, with the
/// table's ranges they touch.
pub(super) struct Groups {
    /// (followers, keys, ranges) for ranges with replicas.
    pub(super) groups: Vec<(Vec<u32>, Vec<Key>, Vec<KeyRange>)>,
    /// Every table range touched (replicated or not).
    pub(super) touched: Vec<KeyRange>,
}

/// Group `keys` by the chain (followers) of the table range each falls in.
pub(super) fn group(table: &Partition, keys: KeysRef<'_>) -> Groups {
    let mut map: BTreeMap<Vec<u32>, (Vec<Key>, Vec<KeyRange>)> = BTreeMap::new();
    let mut touched = Vec::new();
    match keys {
        KeysRef::List(ks) => {
            debug_assert!(
                ks.windows(2).all(|w| w[0] < w[1]),
                "keys sorted and distinct"
            );
            let mut start = 0;
            while start < ks.len() {
                let i = table.index_of(ks[start]);
                let r = table.ranges()[i];
                let end = start + ks[start..].partition_point(|&k| k < r.end);
                debug_assert!(end > start, "the first key lies in its own range");
                touched.push(r);
                let f = &table.followers()[i];
                if !f.is_empty() {
                    map.entry(f.clone())
                        .or_default()
                        .0
                        .extend_from_slice(&ks[start..end]);
                }
                start = end;
            }
        }
        KeysRef::Range(range) => {
            if !range.is_empty() {
                let first = table.index_of(range.begin);
                for i in first..table.ranges().len() {
                    let Some(part) = table.ranges()[i].intersect(&range) else {
                        break;
                    };
                    touched.push(table.ranges()[i]);
                    let f = &table.followers()[i];
                    if !f.is_empty() {
                        map.entry(f.clone()).or_default().1.push(part);
                    }
                }
            }
        }
    }
    Groups {
        groups: map.into_iter().map(|(f, (k, r))| (f, k, r)).collect(),
        touched,
    }
}

/// Sort and merge overlapping or touching ranges.
pub(super) fn merge_ranges(mut v: Vec<KeyRange>) -> Vec<KeyRange> {
    v.retain(|r| !r.is_empty());
    v.sort_by_key(|r| r.begin);
    let mut out: Vec<KeyRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.begin <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    debug_assert!(out.windows(2).all(|w| w[0].end < w[1].begin));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_ranges_merges_overlaps_and_neighbours() {
        let m = merge_ranges(vec![
            KeyRange::new(5, 8),
            KeyRange::new(0, 2),
            KeyRange::new(2, 3),
            KeyRange::new(6, 10),
            KeyRange::new(20, 20),
        ]);
        assert_eq!(m, vec![KeyRange::new(0, 3), KeyRange::new(5, 10)]);
    }
}
