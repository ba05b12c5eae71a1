//! Key caching (the paper's cached key lists): a worker that sends the same key list to a
//! server again sends only the list's name, which the server resolves from its cache.
//!
//! Minibatches repeat their key sets (every epoch visits the same minibatches, and a
//! minibatch's pull and push name the same keys), so most key bytes on the wire are
//! lists the server has seen. The protocol:
//!
//! 1. A worker sends a key list of at least [`MIN_KEYS`] keys in full, with
//!    `FLAG_CACHE_KEYS`: "remember this list". The server hashes the list itself (it
//!    never trusts a sender's hash), stores it under (sender, [`ListId`]) in its bounded
//!    [`KeyCache`], and echoes `FLAG_CACHE_KEYS` in its answer when it did.
//! 2. Only after such an answer does the worker's [`SentLists`] record that this server
//!    holds the list. Later requests with the same list to that server carry
//!    `FLAG_KEYS_CACHED` and three words (the two hashes and the length) instead of
//!    the keys.
//! 3. A server that does not hold the list (evicted, restarted, or a new server at that
//!    rank) refuses with `Status::KeyCacheMiss` before anything else sees the request:
//!    nothing is applied, the clock gate never counts it. The worker forgets the list
//!    and resends the segment with its keys at once (a resent segment always carries
//!    its keys).
//!
//! Collisions cannot put values on the wrong keys: a list is named by two independent
//! 64-bit hashes and its length, both ends compare all three, and the server computes
//! them from the keys it stores. A name whose first hash matches but whose second hash
//! or length does not is a miss, not a hit. Replicas never see cached frames (a head
//! replicates values, not requests), and after a failover the new head's cache starts
//! empty: its first requests miss or populate, which costs a round trip, never a value.

mod receiver;
mod sender;
#[cfg(test)]
mod tests;

pub use receiver::{CacheStats, KeyCache, Lookup};
pub use sender::{SentLists, SentStats};

/// Key lists shorter than this are always sent in full: the three words of a name would
/// save too little to pay for the hashing and the cache entry.
pub const MIN_KEYS: usize = 16;

/// The default bound of a server's cache, in keys over all lists (8 bytes each: 64 MiB).
pub const DEFAULT_SERVER_KEYS: usize = 8 << 20;

/// The default number of lists a worker remembers per server as held there.
pub const DEFAULT_SENT_LISTS: usize = 1 << 16;

/// The seeds of the two hashes: independent xxh3 streams.
const SEED_LO: u64 = 0x7073_6572_765f_6b63; // "pserv_kc"
const SEED_HI: u64 = 0x9e37_79b9_7f4a_7c15;

/// The name of a key list: two independent 64-bit hashes of its bytes and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListId {
    /// The first hash (the cache's index).
    pub lo: u64,
    /// The second hash, checked on every lookup.
    pub hi: u64,
    /// The number of keys, checked on every lookup.
    pub len: u64,
}

impl ListId {
    /// The name of `keys`.
    pub fn of(keys: &[u64]) -> ListId {
        let bytes: &[u8] = bytemuck::cast_slice(keys);
        ListId {
            lo: xxhash_rust::xxh3::xxh3_64_with_seed(bytes, SEED_LO),
            hi: xxhash_rust::xxh3::xxh3_64_with_seed(bytes, SEED_HI),
            len: keys.len() as u64,
        }
    }

    /// The three key words of a `FLAG_KEYS_CACHED` frame.
    pub fn words(&self) -> [u64; 3] {
        [self.lo, self.hi, self.len]
    }

    /// The name the three key words of a `FLAG_KEYS_CACHED` frame give (`None` unless
    /// there are exactly three).
    pub fn from_words(words: &[u64]) -> Option<ListId> {
        match *words {
            [lo, hi, len] => Some(ListId { lo, hi, len }),
            _ => None,
        }
    }
}

/// How a list is named: [`ListId::of`] in the engine; tests pass weak functions to force
/// collisions.
pub type Hasher = fn(&[u64]) -> ListId;
