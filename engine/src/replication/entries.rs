//! Whole store entries (weights and update-rule state) as bytes: what a head reads into
//! a batch and a replica installs. [`EntryStore`] is the interface the replication core
//! sees; the server's [`Store`] implements it, and so does the simulation's.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;
use crate::proto::ReplicaPart;
use crate::store::Store;
use crate::update::UpdateFn;

/// Reads and writes whole store entries for replication.
pub(crate) trait EntryStore {
    /// Read the weights and state of sorted `keys` as bytes.
    fn read_keys(&self, keys: &[Key]) -> (Vec<u8>, Vec<u8>);
    /// Read the weights and state of every key of `range` as bytes.
    fn read_range(&self, range: KeyRange) -> (Vec<u8>, Vec<u8>);
    /// Install one part of a batch.
    fn install(&self, part: &ReplicaPart) -> Result<(), String>;
    /// Every stored key inside any of `ranges` (sorted, disjoint), sorted.
    fn stored_keys(&self, ranges: &[KeyRange]) -> Vec<Key>;
    /// Weights per key, state elements per key, bytes per element.
    fn shape(&self) -> (usize, usize, usize);
}

/// Reads a store's entries: a rule that copies weights and state out and changes nothing.
struct Capture<T> {
    state_len: usize,
    out: Mutex<(Vec<T>, Vec<T>)>,
}

impl<T: Value> UpdateFn<T> for Capture<T> {
    fn name(&self) -> &str {
        "replica-read"
    }
    fn state_len(&self) -> usize {
        self.state_len
    }
    fn apply(&self, weights: &mut [T], state: &mut [T], _grads: &[T]) {
        let mut o = self.out.lock();
        o.0.extend_from_slice(weights);
        o.1.extend_from_slice(state);
    }
}

/// Installs entries: a rule that sets the weights to the pushed values and the state to
/// the next elements of `state`.
struct Install<T> {
    state_len: usize,
    state: Vec<T>,
    at: AtomicUsize,
}

impl<T: Value> UpdateFn<T> for Install<T> {
    fn name(&self) -> &str {
        "replica-install"
    }
    fn state_len(&self) -> usize {
        self.state_len
    }
    fn apply(&self, weights: &mut [T], state: &mut [T], grads: &[T]) {
        weights.copy_from_slice(grads);
        if !state.is_empty() {
            let at = self.at.fetch_add(state.len(), Ordering::Relaxed);
            state.copy_from_slice(&self.state[at..at + state.len()]);
        }
    }
}

pub(super) fn to_values<T: Value>(bytes: &[u8]) -> Result<Vec<T>, String> {
    if !bytes.len().is_multiple_of(std::mem::size_of::<T>()) {
        return Err(format!("{} value bytes are not whole values", bytes.len()));
    }
    Ok(pod_vec(bytes))
}

/// Copy bytes (a whole number of `P`s) into a vector of `P`.
pub(crate) fn pod_vec<P: bytemuck::Pod>(bytes: &[u8]) -> Vec<P> {
    let mut v = vec![P::zeroed(); bytes.len() / std::mem::size_of::<P>()];
    bytemuck::cast_slice_mut::<P, u8>(&mut v).copy_from_slice(bytes);
    v
}

impl<T: Value> EntryStore for Store<T> {
    fn read_keys(&self, keys: &[Key]) -> (Vec<u8>, Vec<u8>) {
        let (w, s) = self.read_entries(keys).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading entries for replication");
            (Vec::new(), Vec::new())
        });
        (
            bytemuck::cast_slice(&w).to_vec(),
            bytemuck::cast_slice(&s).to_vec(),
        )
    }

    fn read_range(&self, range: KeyRange) -> (Vec<u8>, Vec<u8>) {
        let vl = self.value_len();
        let n = range.len() as usize;
        let cap = Capture {
            state_len: self.state_len(),
            out: Mutex::new((
                Vec::with_capacity(n * vl),
                Vec::with_capacity(n * vl * self.state_len()),
            )),
        };
        let zeros = vec![T::default(); n * vl];
        if let Err(e) = self.push_range(range, &zeros, &cap) {
            tracing::warn!(error = %e, "reading a range for replication");
        }
        let (w, s) = cap.out.into_inner();
        (
            bytemuck::cast_slice(&w).to_vec(),
            bytemuck::cast_slice(&s).to_vec(),
        )
    }

    fn install(&self, part: &ReplicaPart) -> Result<(), String> {
        let sl = self.state_len();
        let vl = self.value_len();
        match part {
            ReplicaPart::Keys {
                keys,
                weights,
                state,
            } => {
                if !keys.len().is_multiple_of(8) {
                    return Err("key bytes are not whole keys".into());
                }
                let ks: Vec<Key> = pod_vec(keys);
                let w = to_values::<T>(weights)?;
                let s = to_values::<T>(state)?;
                if w.len() != ks.len() * vl || s.len() != ks.len() * vl * sl {
                    return Err(format!(
                        "{} keys with {} weights and {} state elements",
                        ks.len(),
                        w.len(),
                        s.len()
                    ));
                }
                let rule = Install {
                    state_len: sl,
                    state: s,
                    at: AtomicUsize::new(0),
                };
                self.push(&ks, &w, &rule).map_err(|e| e.to_string())
            }
            ReplicaPart::Range {
                range,
                weights,
                state,
            } => {
                let w = to_values::<T>(weights)?;
                let s = to_values::<T>(state)?;
                // The range is the peer's: its weights count may not fit in a usize.
                let weights_of = usize::try_from(range.len())
                    .ok()
                    .and_then(|n| n.checked_mul(vl));
                let state_of = weights_of.and_then(|n| n.checked_mul(sl));
                if weights_of != Some(w.len()) || state_of != Some(s.len()) {
                    return Err(format!(
                        "range {range} with {} weights and {} state elements",
                        w.len(),
                        s.len()
                    ));
                }
                let rule = Install {
                    state_len: sl,
                    state: s,
                    at: AtomicUsize::new(0),
                };
                self.push_range(*range, &w, &rule)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn shape(&self) -> (usize, usize, usize) {
        (
            self.value_len(),
            self.value_len() * self.state_len(),
            std::mem::size_of::<T>(),
        )
    }

    fn stored_keys(&self, ranges: &[KeyRange]) -> Vec<Key> {
        let mut keys = Vec::new();
        self.for_each(|k, _| {
            let i = ranges.partition_point(|r| r.end <= k);
            if ranges.get(i).is_some_and(|r| r.contains(k)) {
                keys.push(k);
            }
        });
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;
    use crate::update::{Adagrad, Sum};

    fn store(state_len: usize) -> Store<f32> {
        Store::new(
            KeyRange::FULL,
            StoreConfig {
                shards: 4,
                value_len: 2,
                state_len,
                ..StoreConfig::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn entries_read_from_one_store_install_the_same_state_in_another() {
        let a = store(1);
        let rule = Adagrad { lr: 0.5, eps: 1e-6 };
        let keys = [3u64, 9, 1 << 40, u64::MAX - 7];
        a.push(&keys, &[1.0, -2.0, 0.5, 0.25, 3.0, 1.0, -1.0, 2.0], &rule)
            .unwrap();
        a.push_range(KeyRange::new(100, 104), &[1.0; 8], &rule)
            .unwrap();
        let b = store(1);
        let (w, s) = a.read_keys(&keys);
        b.install(&ReplicaPart::Keys {
            keys: bytemuck::cast_slice(&keys).to_vec(),
            weights: w,
            state: s,
        })
        .unwrap();
        let (w, s) = a.read_range(KeyRange::new(100, 104));
        b.install(&ReplicaPart::Range {
            range: KeyRange::new(100, 104),
            weights: w,
            state: s,
        })
        .unwrap();
        // Same weights, and the same state: one more identical push gives the same result.
        let more = [0.5f32; 8];
        a.push(&keys, &more, &rule).unwrap();
        b.push(&keys, &more, &rule).unwrap();
        a.push_range(KeyRange::new(100, 104), &more, &rule).unwrap();
        b.push_range(KeyRange::new(100, 104), &more, &rule).unwrap();
        let mut dump_a = Vec::new();
        a.for_each(|k, w| dump_a.push((k, w.to_vec())));
        let mut dump_b = Vec::new();
        b.for_each(|k, w| dump_b.push((k, w.to_vec())));
        assert_eq!(dump_a, dump_b);
        assert_eq!(b.stored_keys(&[KeyRange::new(0, 4)]), vec![3]);
        assert_eq!(
            b.stored_keys(&[KeyRange::new(0, 4), KeyRange::new(9, 101)]),
            vec![3, 9, 100]
        );
    }

    #[test]
    fn malformed_parts_are_refused_and_change_nothing() {
        let b = store(0);
        let bad = ReplicaPart::Keys {
            keys: vec![1, 2, 3],
            weights: vec![],
            state: vec![],
        };
        assert!(b.install(&bad).is_err());
        let bad = ReplicaPart::Keys {
            keys: bytemuck::cast_slice(&[1u64, 2]).to_vec(),
            weights: bytemuck::cast_slice(&[1.0f32; 3]).to_vec(),
            state: vec![],
        };
        assert!(b.install(&bad).is_err());
        let bad = ReplicaPart::Range {
            range: KeyRange::new(0, 4),
            weights: vec![0; 5],
            state: vec![],
        };
        assert!(b.install(&bad).is_err());
        // A range whose weights would not fit in memory (its count overflows).
        let huge = ReplicaPart::Range {
            range: KeyRange::FULL,
            weights: vec![],
            state: vec![],
        };
        assert!(b.install(&huge).is_err());
        assert_eq!(b.key_count(), 0);
        // Sum rule untouched by the internal rules.
        b.push(&[5], &[1.0, 1.0], &Sum).unwrap();
        assert_eq!(b.key_count(), 1);
    }
}
