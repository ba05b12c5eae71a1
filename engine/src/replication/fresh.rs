//! Late batches: what a server applied as the new head of ranges it took over, so that a
//! batch made under an older table (a late batch of the previous head, still in flight
//! when the table changed) that holds any of it is dropped whole; and the hand-off
//! markers a new head waits for before it serves what it took over.

use std::collections::HashSet;

use crate::base::keys::{Key, KeyRange};
use crate::proto::ReplicaPart;

/// Keys this server applied as the head of ranges it took over under the current table.
#[derive(Default)]
pub(super) struct Fresh {
    pub(super) epoch: u64,
    /// Ranges this server heads now and did not head under the previous table.
    pub(super) inherited: Vec<KeyRange>,
    /// Previous heads of those, with the chain their batches travelled, whose hand-off
    /// marker has not come yet.
    pub(super) awaiting: Vec<(u32, Vec<u32>)>,
    pub(super) keys: HashSet<Key>,
    pub(super) ranges: Vec<KeyRange>,
    /// Previous heads one of whose late batches was dropped: their later late batches are
    /// dropped too (their values build on the dropped one's).
    pub(super) dropped: HashSet<u32>,
}

impl Fresh {
    /// Whether a fresh key or range is in `part`.
    pub(super) fn touches(&self, part: &ReplicaPart) -> bool {
        let fresh = |k: Key| self.keys.contains(&k) || self.ranges.iter().any(|r| r.contains(k));
        match part {
            // Whole keys only: a part with a torn last key is refused when installed.
            ReplicaPart::Keys { keys, .. } => keys
                .chunks_exact(8)
                .map(|k| u64::from_le_bytes(k.try_into().expect("8 bytes")))
                .any(fresh),
            ReplicaPart::Range { range, .. } => {
                self.ranges.iter().any(|r| r.intersect(range).is_some())
                    || self.keys.iter().any(|&k| range.contains(k))
            }
        }
    }

    /// Whether a batch of `epoch` from `origin` with these parts must be dropped: it is
    /// older than the table this server took ranges over with, and it holds something
    /// applied here since (or follows a dropped one of the same head).
    pub(super) fn is_late(&self, epoch: u64, origin: u32, parts: &[ReplicaPart]) -> bool {
        let stale = epoch < self.epoch && (!self.keys.is_empty() || !self.ranges.is_empty());
        stale
            && !parts.is_empty()
            && (self.dropped.contains(&origin) || parts.iter().any(|p| self.touches(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_batch_is_recognised_when_it_holds_keys_the_new_head_applied_since() {
        let mut f = Fresh {
            epoch: 3,
            ..Fresh::default()
        };
        f.keys.insert(5);
        f.ranges.push(KeyRange::new(20, 22));
        let bytes = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let keys = |ks: &[u64]| ReplicaPart::Keys {
            keys: bytemuck::cast_slice(ks).to_vec(),
            weights: bytes(&vec![1.0; ks.len()]),
            state: bytes(&vec![0.0; ks.len()]),
        };
        let range = |b: u64, e: u64| ReplicaPart::Range {
            range: KeyRange::new(b, e),
            weights: bytes(&vec![1.0; (e - b) as usize]),
            state: bytes(&vec![0.0; (e - b) as usize]),
        };
        assert!(f.touches(&keys(&[4, 5, 6])), "a fresh key");
        assert!(f.touches(&keys(&[21])), "a key in a fresh range");
        assert!(!f.touches(&keys(&[4, 6, 19, 22])));
        assert!(f.touches(&range(3, 6)), "holds key 5");
        assert!(f.touches(&range(21, 30)), "overlaps a fresh range");
        assert!(!f.touches(&range(6, 20)));
        assert!(!f.touches(&range(22, 40)));
        assert!(f.is_late(2, 9, &[keys(&[5])]));
        assert!(!f.is_late(3, 9, &[keys(&[5])]), "not older than the table");
        assert!(!f.is_late(2, 9, &[keys(&[6])]), "nothing fresh in it");
        f.dropped.insert(9);
        assert!(f.is_late(2, 9, &[keys(&[6])]), "follows a dropped one");
    }

    /// A part whose key bytes are not whole keys (a hostile or broken batch) is checked
    /// without a panic: by its whole keys (found by the fuzz target `replica_batch`).
    #[test]
    fn a_part_with_a_torn_key_is_checked_by_its_whole_keys() {
        let mut f = Fresh {
            epoch: 3,
            ..Fresh::default()
        };
        f.keys.insert(5);
        let torn = |ks: &[u64], extra: usize| {
            let mut keys: Vec<u8> = bytemuck::cast_slice(ks).to_vec();
            keys.extend(std::iter::repeat_n(0xff, extra));
            ReplicaPart::Keys {
                keys,
                weights: Vec::new(),
                state: Vec::new(),
            }
        };
        assert!(f.touches(&torn(&[5], 3)));
        assert!(!f.touches(&torn(&[6], 7)));
        assert!(!f.touches(&torn(&[], 5)));
        assert!(f.is_late(2, 9, &[torn(&[4, 5], 1)]));
    }
}
