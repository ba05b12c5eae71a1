//! Keys, key ranges and the partition of the key space over servers.
//!
//! Keys are `u64`, ordered. A [`KeyRange`] is half-open, `[begin, end)`; the whole key
//! space is `[0, u64::MAX)`, so the key `u64::MAX` is never a valid key (the server store
//! uses it as its empty-slot marker).

use serde::{Deserialize, Serialize};

/// A parameter key.
pub type Key = u64;

/// The largest valid key plus one: every key is below it.
pub const KEY_END: Key = u64::MAX;

/// A half-open range of keys `[begin, end)`. `begin <= end` always holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyRange {
    /// First key in the range.
    pub begin: Key,
    /// One past the last key in the range.
    pub end: Key,
}

impl KeyRange {
    /// The whole key space `[0, u64::MAX)`.
    pub const FULL: KeyRange = KeyRange {
        begin: 0,
        end: KEY_END,
    };

    /// `[begin, end)`.
    ///
    /// # Panics
    /// If `begin > end` (a caller bug; ranges from the network are checked by the codec).
    pub fn new(begin: Key, end: Key) -> Self {
        assert!(begin <= end, "key range [{begin}, {end}) runs backwards");
        KeyRange { begin, end }
    }

    /// Number of keys in the range.
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }

    /// Whether the range holds no key.
    pub fn is_empty(&self) -> bool {
        self.begin == self.end
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: Key) -> bool {
        self.begin <= key && key < self.end
    }

    /// Whether `other` lies entirely within this range.
    pub fn covers(&self, other: &KeyRange) -> bool {
        self.begin <= other.begin && other.end <= self.end
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &KeyRange) -> Option<KeyRange> {
        let begin = self.begin.max(other.begin);
        let end = self.end.min(other.end);
        (begin < end).then_some(KeyRange { begin, end })
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.begin, self.end)
    }
}
