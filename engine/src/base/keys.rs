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

/// A half-open range of keys `[begin, end)`. `begin <= end` always holds: decoding one
/// that runs backwards (from a peer) is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "WireKeyRange")]
pub struct KeyRange {
    /// First key in the range.
    pub begin: Key,
    /// One past the last key in the range.
    pub end: Key,
}

/// A [`KeyRange`] as it is decoded, before `begin <= end` is checked.
#[derive(Deserialize)]
struct WireKeyRange {
    begin: Key,
    end: Key,
}

impl TryFrom<WireKeyRange> for KeyRange {
    type Error = String;

    fn try_from(w: WireKeyRange) -> Result<Self, String> {
        if w.begin > w.end {
            return Err(format!("key range [{}, {}) runs backwards", w.begin, w.end));
        }
        Ok(KeyRange {
            begin: w.begin,
            end: w.end,
        })
    }
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

#[cfg(test)]
mod decode_tests {
    use super::*;

    /// A backwards range from a peer (a replica batch's part, a push record, a window
    /// request) is a decode error, not a range whose `len` underflows (found by the fuzz
    /// target `replica_batch`).
    #[test]
    fn a_backwards_range_does_not_decode() {
        let good = KeyRange::new(3, 9);
        let bytes = postcard::to_allocvec(&good).unwrap();
        assert_eq!(postcard::from_bytes::<KeyRange>(&bytes).unwrap(), good);
        let empty = postcard::to_allocvec(&KeyRange::new(5, 5)).unwrap();
        assert!(postcard::from_bytes::<KeyRange>(&empty).unwrap().is_empty());
        let backwards = postcard::to_allocvec(&(9u64, 3u64)).unwrap();
        assert!(postcard::from_bytes::<KeyRange>(&backwards).is_err());
        let json: Result<KeyRange, _> = serde_json::from_str(r#"{"begin":9,"end":3}"#);
        assert!(json.unwrap_err().to_string().contains("runs backwards"));
    }
}
