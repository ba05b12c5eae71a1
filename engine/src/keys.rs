//! Keys, key ranges and the partition of the key space over servers (MISSION.md P2, P3).
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

/// Which server owns which part of the key space: contiguous ranges in key order, server
/// `i` owning `ranges[i]`, together covering `[0, u64::MAX)` without gaps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    ranges: Vec<KeyRange>,
}

impl Partition {
    /// Split the key space evenly over `servers` servers.
    ///
    /// # Panics
    /// If `servers == 0`.
    pub fn even(servers: usize) -> Self {
        assert!(servers > 0, "a partition needs at least one server");
        let n = servers as u128;
        let ranges = (0..n)
            .map(|i| {
                let b = (u128::from(KEY_END) * i / n) as u64;
                let e = (u128::from(KEY_END) * (i + 1) / n) as u64;
                KeyRange::new(b, e)
            })
            .collect();
        let p = Partition { ranges };
        p.check();
        p
    }

    /// Build from explicit ranges (sorted, contiguous, covering the key space).
    pub fn from_ranges(ranges: Vec<KeyRange>) -> Option<Self> {
        let p = Partition { ranges };
        p.is_valid().then_some(p)
    }

    fn is_valid(&self) -> bool {
        !self.ranges.is_empty()
            && self.ranges[0].begin == 0
            && self.ranges.last().is_some_and(|r| r.end == KEY_END)
            && self.ranges.windows(2).all(|w| w[0].end == w[1].begin)
            && self.ranges.iter().all(|r| !r.is_empty())
    }

    fn check(&self) {
        assert!(
            self.is_valid(),
            "partition invariant broken: {:?}",
            self.ranges
        );
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Always false: a partition has at least one server.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The range of server `i`.
    pub fn range(&self, i: usize) -> KeyRange {
        self.ranges[i]
    }

    /// All ranges, in server order.
    pub fn ranges(&self) -> &[KeyRange] {
        &self.ranges
    }

    /// The server owning `key`.
    pub fn server_of(&self, key: Key) -> usize {
        debug_assert!(key < KEY_END);
        self.ranges.partition_point(|r| r.end <= key)
    }

    /// Split a sorted key list into per-server slices: `(server, index range into keys)`,
    /// in key order, only for servers that get at least one key. One binary search per
    /// server, not one per key.
    pub fn split_keys(&self, keys: &[Key]) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < keys.len() {
            let server = self.server_of(keys[start]);
            let end_key = self.ranges[server].end;
            let end = start + keys[start..].partition_point(|&k| k < end_key);
            out.push((server, start..end));
            start = end;
        }
        out
    }

    /// Split a key range into the per-server parts it covers, in key order.
    pub fn split_range(&self, range: KeyRange) -> Vec<(usize, KeyRange)> {
        if range.is_empty() {
            return Vec::new();
        }
        let first = self.server_of(range.begin);
        self.ranges[first..]
            .iter()
            .enumerate()
            .map_while(|(i, r)| r.intersect(&range).map(|part| (first + i, part)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn even_split_covers_the_key_space() {
        for n in [1, 2, 3, 7, 64] {
            let p = Partition::even(n);
            assert_eq!(p.len(), n);
            assert_eq!(p.range(0).begin, 0);
            assert_eq!(p.range(n - 1).end, KEY_END);
            let lens: Vec<u64> = p.ranges().iter().map(|r| r.len()).collect();
            let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            assert!(max - min <= 1, "uneven split {lens:?}");
        }
    }

    #[test]
    fn server_of_edges() {
        let p = Partition::even(4);
        assert_eq!(p.server_of(0), 0);
        assert_eq!(p.server_of(p.range(1).begin), 1);
        assert_eq!(p.server_of(p.range(1).begin - 1), 0);
        assert_eq!(p.server_of(KEY_END - 1), 3);
    }

    #[test]
    fn split_range_across_servers() {
        let p = Partition::even(4);
        let b = p.range(1).begin;
        let parts = p.split_range(KeyRange::new(b - 10, b + 10));
        assert_eq!(
            parts,
            vec![(0, KeyRange::new(b - 10, b)), (1, KeyRange::new(b, b + 10))]
        );
        assert!(p.split_range(KeyRange::new(5, 5)).is_empty());
        assert_eq!(p.split_range(KeyRange::FULL).len(), 4);
    }

    #[test]
    fn from_ranges_rejects_gaps_and_overlaps() {
        assert!(
            Partition::from_ranges(vec![KeyRange::new(0, 10), KeyRange::new(11, KEY_END)])
                .is_none()
        );
        assert!(
            Partition::from_ranges(vec![KeyRange::new(0, 10), KeyRange::new(9, KEY_END)]).is_none()
        );
        assert!(
            Partition::from_ranges(vec![KeyRange::new(0, 10), KeyRange::new(10, KEY_END)])
                .is_some()
        );
        assert!(Partition::from_ranges(vec![]).is_none());
    }

    proptest! {
        #[test]
        fn split_keys_is_a_partition_of_the_list(
            servers in 1usize..9,
            mut keys in proptest::collection::vec(0u64..KEY_END, 0..200),
        ) {
            keys.sort_unstable();
            keys.dedup();
            let p = Partition::even(servers);
            let parts = p.split_keys(&keys);
            let mut next = 0;
            let mut last_server = None;
            for (server, idx) in &parts {
                prop_assert_eq!(idx.start, next);
                prop_assert!(idx.end > idx.start);
                if let Some(l) = last_server { prop_assert!(*server > l); }
                last_server = Some(*server);
                for &k in &keys[idx.clone()] {
                    prop_assert!(p.range(*server).contains(k));
                    prop_assert_eq!(p.server_of(k), *server);
                }
                next = idx.end;
            }
            prop_assert_eq!(next, keys.len());
        }
    }
}
