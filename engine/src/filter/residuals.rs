//! Per-key values a filter holds back, in one arena (no allocation per key) under a map
//! with a cheap hash (keys are u64s; splitmix64 spreads them).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::base::keys::Key;
use crate::base::value::Value;

/// A hasher for u64 keys: splitmix64 of the key.
#[derive(Default)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        crate::placement::ring::splitmix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
}

/// A map from keys with [`KeyHasher`].
pub(super) type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

/// `value_len` values per held key, in slots of one arena.
pub(super) struct Residuals<T> {
    index: KeyMap<usize>,
    arena: Vec<T>,
    free: Vec<usize>,
    value_len: usize,
}

impl<T: Value> Residuals<T> {
    /// Empty; the width is taken from the first key held.
    pub(super) fn new() -> Self {
        Residuals {
            index: KeyMap::default(),
            arena: Vec::new(),
            free: Vec::new(),
            value_len: 0,
        }
    }

    /// The values held for `key`.
    pub(super) fn get(&self, key: Key) -> Option<&[T]> {
        let &slot = self.index.get(&key)?;
        Some(&self.arena[slot..slot + self.value_len])
    }

    /// The values held for `key`, to change in place.
    pub(super) fn get_mut(&mut self, key: Key) -> Option<&mut [T]> {
        let &slot = self.index.get(&key)?;
        Some(&mut self.arena[slot..slot + self.value_len])
    }

    /// Hold `values` for `key` (which holds nothing yet).
    pub(super) fn insert(&mut self, key: Key, values: &[T]) {
        if self.value_len == 0 {
            self.value_len = values.len();
        }
        assert_eq!(values.len(), self.value_len, "residuals of one width");
        debug_assert!(!self.index.contains_key(&key), "key {key} is held already");
        let slot = match self.free.pop() {
            Some(s) => {
                self.arena[s..s + self.value_len].copy_from_slice(values);
                s
            }
            None => {
                let s = self.arena.len();
                self.arena.extend_from_slice(values);
                s
            }
        };
        self.index.insert(key, slot);
    }

    /// Append what is held for `key` to `out` and let it go; false when nothing was held.
    pub(super) fn take_into(&mut self, key: Key, out: &mut Vec<T>) -> bool {
        let Some(slot) = self.index.remove(&key) else {
            return false;
        };
        out.extend_from_slice(&self.arena[slot..slot + self.value_len]);
        self.free.push(slot);
        true
    }

    /// Everything held, by key; nothing is held afterwards.
    pub(super) fn drain(&mut self, value_len: usize) -> BTreeMap<Key, Vec<T>> {
        let mut out = BTreeMap::new();
        if self.value_len == value_len {
            for (&k, &slot) in &self.index {
                out.insert(k, self.arena[slot..slot + value_len].to_vec());
            }
        }
        *self = Residuals::new();
        out
    }
}
