//! A server's cache of the key lists workers asked it to remember.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use super::{Hasher, ListId};

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The list, as it was stored.
    Hit(Arc<[u64]>),
    /// No list of this sender under this first hash (never stored, or evicted).
    Absent,
    /// A list under this first hash whose second hash or length differ: a collision or
    /// a stale name. Refused like an absent one.
    Mismatch,
}

/// Counters of a [`KeyCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Lists stored.
    pub stored: u64,
    /// Lookups that found their list.
    pub hits: u64,
    /// Lookups that found nothing.
    pub absent: u64,
    /// Lookups whose first hash matched a list with another second hash or length.
    pub mismatches: u64,
    /// Lists evicted to stay within the bound.
    pub evicted: u64,
    /// Keys held now.
    pub keys_held: u64,
}

struct Entry {
    hi: u64,
    keys: Arc<[u64]>,
}

struct Inner {
    lists: LruCache<(u32, u64), Entry>,
    keys_held: usize,
}

/// A bounded LRU cache of key lists by (sender, [`ListId`]), its bound counted in keys.
/// One per server, shared by its loops.
pub struct KeyCache {
    max_keys: usize,
    hasher: Hasher,
    inner: Mutex<Inner>,
    stored: AtomicU64,
    hits: AtomicU64,
    absent: AtomicU64,
    mismatches: AtomicU64,
    evicted: AtomicU64,
}

impl KeyCache {
    /// A cache holding at most `max_keys` keys over all lists (0: it stores nothing).
    pub fn new(max_keys: usize) -> KeyCache {
        Self::with_hasher(max_keys, ListId::of)
    }

    /// [`new`](Self::new) naming lists with `hasher` (tests force collisions with it).
    pub fn with_hasher(max_keys: usize, hasher: Hasher) -> KeyCache {
        KeyCache {
            max_keys,
            hasher,
            inner: Mutex::new(Inner {
                lists: LruCache::unbounded(),
                keys_held: 0,
            }),
            stored: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            absent: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// Remember `keys` (a sorted list) for `sender`, evicting the least recently used
    /// lists as needed. Returns its name, or `None` when it was not stored (the cache is
    /// off, or the list alone exceeds the bound). A list under the same first hash is
    /// replaced.
    pub fn store(&self, sender: u32, keys: &[u64]) -> Option<ListId> {
        if keys.is_empty() || keys.len() > self.max_keys {
            return None;
        }
        let id = (self.hasher)(keys);
        let mut g = self.inner.lock();
        if let Some(old) = g.lists.pop(&(sender, id.lo)) {
            g.keys_held -= old.keys.len();
        }
        while g.keys_held + keys.len() > self.max_keys {
            match g.lists.pop_lru() {
                Some((_, old)) => {
                    g.keys_held -= old.keys.len();
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        g.keys_held += keys.len();
        g.lists.put(
            (sender, id.lo),
            Entry {
                hi: id.hi,
                keys: Arc::from(keys),
            },
        );
        self.stored.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// The list `sender` named `id`.
    pub fn lookup(&self, sender: u32, id: ListId) -> Lookup {
        let mut g = self.inner.lock();
        let found = match g.lists.get(&(sender, id.lo)) {
            None => Lookup::Absent,
            Some(e) if e.hi != id.hi || e.keys.len() as u64 != id.len => Lookup::Mismatch,
            Some(e) => Lookup::Hit(e.keys.clone()),
        };
        drop(g);
        let counter = match found {
            Lookup::Hit(_) => &self.hits,
            Lookup::Absent => &self.absent,
            Lookup::Mismatch => &self.mismatches,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Forget every list of `sender` (a worker that left).
    pub fn forget_sender(&self, sender: u32) {
        let mut g = self.inner.lock();
        let gone: Vec<(u32, u64)> = g
            .lists
            .iter()
            .filter(|((s, _), _)| *s == sender)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(e) = g.lists.pop(&k) {
                g.keys_held -= e.keys.len();
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            stored: self.stored.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            absent: self.absent.load(Ordering::Relaxed),
            mismatches: self.mismatches.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            keys_held: self.inner.lock().keys_held as u64,
        }
    }
}
