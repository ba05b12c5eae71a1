//! A worker's record of which key lists each server confirmed it holds.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

use super::ListId;

/// Counters of a [`SentLists`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SentStats {
    /// Messages whose key list was long enough to be cached.
    pub eligible: u64,
    /// Of those, sent by name only.
    pub by_name: u64,
    /// Key bytes not sent thanks to that (keys minus the three words of a name).
    pub key_bytes_saved: u64,
    /// Lists servers confirmed they stored.
    pub confirmed: u64,
    /// Names servers did not resolve (the segment was resent with its keys).
    pub misses: u64,
}

impl SentStats {
    /// The share of eligible messages sent by name.
    pub fn hit_rate(&self) -> f64 {
        if self.eligible == 0 {
            0.0
        } else {
            self.by_name as f64 / self.eligible as f64
        }
    }
}

/// Per server, a bounded LRU of the lists it confirmed (by first hash, with the second
/// hash and the length to tell a collision).
pub struct SentLists {
    per_server: NonZeroUsize,
    held: Mutex<HashMap<u32, LruCache<u64, ListId>>>,
    eligible: AtomicU64,
    by_name: AtomicU64,
    saved: AtomicU64,
    confirmed: AtomicU64,
    misses: AtomicU64,
}

impl SentLists {
    /// A record of at most `per_server` lists per server (at least 1).
    pub fn new(per_server: usize) -> SentLists {
        SentLists {
            per_server: NonZeroUsize::new(per_server.max(1)).expect("at least 1"),
            held: Mutex::new(HashMap::new()),
            eligible: AtomicU64::new(0),
            by_name: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// A list `id` is about to go to `server`: whether to send it by name (`first`: the
    /// segment's first send; resends always carry their keys). Counts the decision.
    pub fn send_by_name(&self, server: u32, id: ListId, first: bool) -> bool {
        self.eligible.fetch_add(1, Ordering::Relaxed);
        let held = first
            && self
                .held
                .lock()
                .get_mut(&server)
                .and_then(|l| l.get(&id.lo).copied())
                // Same first hash, another list: a collision, sent in full.
                .is_some_and(|h| h == id);
        if held {
            self.by_name.fetch_add(1, Ordering::Relaxed);
            self.saved
                .fetch_add(id.len.saturating_sub(3) * 8, Ordering::Relaxed);
        }
        held
    }

    /// `server` answered that it stored list `id`.
    pub fn confirm(&self, server: u32, id: ListId) {
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        let cap = self.per_server;
        self.held
            .lock()
            .entry(server)
            .or_insert_with(|| LruCache::new(cap))
            .put(id.lo, id);
    }

    /// `server` did not resolve `id`: forget it there.
    pub fn missed(&self, server: u32, id: ListId) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = self.held.lock().get_mut(&server) {
            if l.peek(&id.lo) == Some(&id) {
                l.pop(&id.lo);
            }
        }
    }

    /// The connection to `server` closed: whatever answers there next starts empty.
    pub fn forget_server(&self, server: u32) {
        self.held.lock().remove(&server);
    }

    /// The counters.
    pub fn stats(&self) -> SentStats {
        SentStats {
            eligible: self.eligible.load(Ordering::Relaxed),
            by_name: self.by_name.load(Ordering::Relaxed),
            key_bytes_saved: self.saved.load(Ordering::Relaxed),
            confirmed: self.confirmed.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}
