//! The simulated servers' store: per key, the history of the pushes applied to it (push
//! ids, in order). It is what the replication core reads into batches and installs from
//! them (through [`EntryStore`], as it does the server's store), so the checkers see
//! exactly what replication moved: a push applied twice, lost, or reordered shows in the
//! histories.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use crate::base::keys::{Key, KeyRange};
use crate::proto::ReplicaPart;
use crate::replication::entries::pod_vec;
use crate::replication::EntryStore;

/// A push id: who pushed, at which clock, which task (see [`push_id`]).
pub(crate) type PushId = u64;

/// The id of the push of `task` by worker `worker` at clock `clock`. Carried as the
/// push's value (an f64, exact below 2^53).
pub(crate) fn push_id(clock: u64, worker: u32, task: u64) -> PushId {
    debug_assert!(clock < 1 << 20, "clock {clock} fits 20 bits");
    debug_assert!(worker < 1 << 12, "worker {worker} fits 12 bits");
    debug_assert!(task < 1 << 20, "task {task} fits 20 bits");
    (clock << 32) | (u64::from(worker) << 20) | task
}

/// The clock of push `id`.
pub(crate) fn clock_of(id: PushId) -> u64 {
    id >> 32
}

/// Histories by key, plus the keys changed since the checkers last looked.
#[derive(Default)]
pub(crate) struct SimStore {
    entries: RefCell<BTreeMap<Key, Vec<PushId>>>,
    dirty: RefCell<BTreeSet<Key>>,
}

impl SimStore {
    /// The history of `key` (empty: never pushed).
    pub(crate) fn history(&self, key: Key) -> Vec<PushId> {
        self.entries.borrow().get(&key).cloned().unwrap_or_default()
    }

    /// Whether `key`'s history holds `id`.
    pub(crate) fn holds(&self, key: Key, id: PushId) -> bool {
        self.entries
            .borrow()
            .get(&key)
            .is_some_and(|h| h.contains(&id))
    }

    /// Apply push `id` to `key`; returns false (and applies nothing) when the key holds
    /// it already: a push applied twice.
    pub(crate) fn apply(&self, key: Key, id: PushId) -> bool {
        let mut e = self.entries.borrow_mut();
        let h = e.entry(key).or_default();
        if h.contains(&id) {
            return false;
        }
        h.push(id);
        self.dirty.borrow_mut().insert(key);
        true
    }

    /// Every key with a history.
    pub(crate) fn keys(&self) -> Vec<Key> {
        self.entries.borrow().keys().copied().collect()
    }

    /// The keys changed since the last call.
    pub(crate) fn take_dirty(&self) -> BTreeSet<Key> {
        std::mem::take(&mut self.dirty.borrow_mut())
    }

    fn encode(&self, keys: &[Key]) -> Vec<u8> {
        let e = self.entries.borrow();
        let mut out: Vec<u64> = Vec::new();
        for k in keys {
            let h = e.get(k).map(Vec::as_slice).unwrap_or(&[]);
            out.push(h.len() as u64);
            out.extend_from_slice(h);
        }
        bytemuck::cast_slice(&out).to_vec()
    }

    fn install_keys(&self, keys: &[Key], bytes: &[u8]) -> Result<(), String> {
        let words: Vec<u64> = pod_vec(bytes);
        let mut at = 0usize;
        let mut e = self.entries.borrow_mut();
        let mut d = self.dirty.borrow_mut();
        for &k in keys {
            let n = *words.get(at).ok_or("history bytes end early")? as usize;
            let h = words
                .get(at + 1..at + 1 + n)
                .ok_or("history bytes end early")?;
            at += 1 + n;
            e.insert(k, h.to_vec());
            d.insert(k);
        }
        if at != words.len() {
            return Err(format!("{} history words left over", words.len() - at));
        }
        Ok(())
    }
}

impl EntryStore for SimStore {
    fn read_keys(&self, keys: &[Key]) -> (Vec<u8>, Vec<u8>) {
        (self.encode(keys), Vec::new())
    }

    fn read_range(&self, range: KeyRange) -> (Vec<u8>, Vec<u8>) {
        // Ranges carry the keys they hold first (the simulation's pushes are key lists;
        // snapshots of whole ranges come through `stored_keys` and `read_keys`).
        let keys: Vec<Key> = self
            .entries
            .borrow()
            .range(range.begin..range.end)
            .map(|(k, _)| *k)
            .collect();
        let mut out: Vec<u64> = vec![keys.len() as u64];
        out.extend_from_slice(&keys);
        let mut bytes = bytemuck::cast_slice(&out).to_vec();
        bytes.extend_from_slice(&self.encode(&keys));
        (bytes, Vec::new())
    }

    fn install(&self, part: &ReplicaPart) -> Result<(), String> {
        match part {
            ReplicaPart::Keys { keys, weights, .. } => {
                let keys: Vec<Key> = pod_vec(keys);
                self.install_keys(&keys, weights)
            }
            ReplicaPart::Range { range, weights, .. } => {
                let words: Vec<u64> = pod_vec(weights);
                let n = *words.first().ok_or("empty range part")? as usize;
                let keys = words.get(1..1 + n).ok_or("range part ends early")?.to_vec();
                // Dense: keys of the range it does not list hold nothing.
                let gone: Vec<Key> = self
                    .entries
                    .borrow()
                    .range(range.begin..range.end)
                    .map(|(k, _)| *k)
                    .filter(|k| !keys.contains(k))
                    .collect();
                for k in gone {
                    self.entries.borrow_mut().remove(&k);
                    self.dirty.borrow_mut().insert(k);
                }
                self.install_keys(&keys, &weights[(1 + n) * 8..])
            }
        }
    }

    fn stored_keys(&self, ranges: &[KeyRange]) -> Vec<Key> {
        let e = self.entries.borrow();
        let mut out = Vec::new();
        for r in ranges {
            out.extend(e.range(r.begin..r.end).map(|(k, _)| *k));
        }
        out
    }

    fn shape(&self) -> (usize, usize, usize) {
        (1, 0, 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_round_trip_through_replica_parts() {
        let a = SimStore::default();
        assert!(a.apply(5, push_id(1, 0, 1)));
        assert!(a.apply(5, push_id(1, 1, 1)));
        assert!(!a.apply(5, push_id(1, 0, 1)), "a second apply is refused");
        assert!(a.apply(9, push_id(2, 0, 2)));
        let b = SimStore::default();
        let (w, s) = a.read_keys(&[5, 7, 9]);
        b.install(&ReplicaPart::Keys {
            keys: bytemuck::cast_slice(&[5u64, 7, 9]).to_vec(),
            weights: w,
            state: s,
        })
        .unwrap();
        assert_eq!(b.history(5), a.history(5));
        assert_eq!(b.history(9), vec![push_id(2, 0, 2)]);
        assert!(b.history(7).is_empty());
        let c = SimStore::default();
        assert!(c.apply(6, 1));
        let r = KeyRange::new(0, 10);
        let (w, s) = a.read_range(r);
        c.install(&ReplicaPart::Range {
            range: r,
            weights: w,
            state: s,
        })
        .unwrap();
        assert!(
            c.history(6).is_empty(),
            "dense: a key the range lacks is cleared"
        );
        assert_eq!(c.history(5), a.history(5));
        assert_eq!(clock_of(push_id(7, 3, 9)), 7);
        assert_eq!(c.stored_keys(&[KeyRange::new(0, 6)]), vec![5]);
    }
}
