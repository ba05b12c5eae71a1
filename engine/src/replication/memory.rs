//! Exactly-once memory: which table ranges of each push (worker, task) a server holds,
//! as head or through the batches it installed, so a push resent after a failover is
//! applied only where it is not held yet.

use std::collections::{HashMap, VecDeque};

use crate::base::keys::{Key, KeyRange};

use super::KeysRef;

/// How many pushes every server remembers for exactly-once retries.
pub const SEEN_CAP: usize = 1 << 16;

/// (worker node id, task timestamp) -> ranges held; the oldest entries are forgotten
/// beyond [`SEEN_CAP`].
#[derive(Default)]
pub(super) struct Seen {
    pub(super) map: HashMap<(u32, u64), Vec<KeyRange>>,
    order: VecDeque<(u32, u64)>,
}

impl Seen {
    /// Remember that push `id` is held here on `ranges`.
    pub(super) fn record(&mut self, id: (u32, u64), ranges: &[KeyRange]) {
        if ranges.is_empty() {
            return;
        }
        let e = self.map.entry(id).or_insert_with(|| {
            self.order.push_back(id);
            Vec::new()
        });
        for r in ranges {
            if !e.contains(r) {
                e.push(*r);
            }
        }
        while self.order.len() > SEEN_CAP {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        debug_assert!(self.map.len() <= SEEN_CAP);
    }

    /// Whether every key of `keys` lies in a range held for push `id`.
    pub(super) fn covers(&self, id: (u32, u64), keys: KeysRef<'_>) -> bool {
        let Some(held) = self.map.get(&id) else {
            return false;
        };
        let inside = |k: Key| held.iter().any(|r| r.contains(k));
        match keys {
            KeysRef::List(ks) => !ks.is_empty() && ks.iter().all(|&k| inside(k)),
            KeysRef::Range(r) => {
                !r.is_empty() && {
                    // Covered when the held ranges tile it.
                    let mut pos = r.begin;
                    let mut sorted = held.clone();
                    sorted.sort_by_key(|x| x.begin);
                    for h in sorted {
                        if h.begin <= pos && h.end > pos {
                            pos = h.end;
                        }
                    }
                    pos >= r.end
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_covers_keys_only_inside_recorded_ranges() {
        let mut s = Seen::default();
        s.record((7, 1), &[KeyRange::new(10, 20), KeyRange::new(30, 40)]);
        assert!(s.covers((7, 1), KeysRef::List(&[10, 19, 35])));
        assert!(!s.covers((7, 1), KeysRef::List(&[10, 25])));
        assert!(!s.covers((7, 2), KeysRef::List(&[10])));
        assert!(!s.covers((8, 1), KeysRef::List(&[10])));
        assert!(s.covers((7, 1), KeysRef::Range(KeyRange::new(12, 18))));
        assert!(!s.covers((7, 1), KeysRef::Range(KeyRange::new(12, 32))));
        s.record((7, 1), &[KeyRange::new(20, 30)]);
        assert!(s.covers((7, 1), KeysRef::Range(KeyRange::new(12, 32))));
        for i in 0..(SEEN_CAP as u64 + 10) {
            s.record((1, 100 + i), &[KeyRange::new(0, 1)]);
        }
        assert!(!s.covers((7, 1), KeysRef::List(&[10])), "oldest forgotten");
        assert!(s.map.len() <= SEEN_CAP);
    }
}
