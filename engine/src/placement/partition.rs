//! The partition of the key space over servers: the routing table (its ranges and their chains).

use serde::{Deserialize, Serialize};

use crate::base::keys::{Key, KeyRange, KEY_END};

/// Which server owns which part of the key space: contiguous ranges in key order, each
/// owned by one server, together covering `[0, u64::MAX)` without gaps. A server may own
/// several ranges (the virtual nodes of a consistent-hashing ring, [`crate::placement::ring`]); the
/// even split gives server `i` the single range `i`. The partition has an epoch: every
/// data message carries the epoch it was routed with.
///
/// Decoding a table (from the scheduler, or a peer's message) checks all of that: one that
/// breaks it is an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WirePartition")]
pub struct Partition {
    ranges: Vec<KeyRange>,
    /// The server owning each range.
    owners: Vec<u32>,
    /// The replicas of each range after its owner, in chain order (head, then these; the
    /// last is the tail). Empty lists without replication.
    #[serde(default)]
    followers: Vec<Vec<u32>>,
    servers: usize,
    epoch: u64,
}

/// A [`Partition`] as it is decoded, before its invariants are checked.
#[derive(Deserialize)]
struct WirePartition {
    ranges: Vec<KeyRange>,
    owners: Vec<u32>,
    #[serde(default)]
    followers: Vec<Vec<u32>>,
    servers: usize,
    epoch: u64,
}

impl TryFrom<WirePartition> for Partition {
    type Error = String;

    fn try_from(w: WirePartition) -> Result<Self, String> {
        let followers = if w.followers.is_empty() {
            // A table without replication may come without its (empty) chains.
            vec![Vec::new(); w.ranges.len()]
        } else {
            w.followers
        };
        let p = Partition {
            ranges: w.ranges,
            owners: w.owners,
            followers,
            servers: w.servers,
            epoch: w.epoch,
        };
        if !p.is_valid() {
            return Err(format!(
                "a routing table of {} ranges, {} owners and {} servers that does not cover the key space once with its servers",
                p.ranges.len(),
                p.owners.len(),
                p.servers
            ));
        }
        Ok(p)
    }
}

impl Partition {
    /// Split the key space evenly over `servers` servers (epoch 1).
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
        let p = Partition {
            followers: vec![Vec::new(); servers],
            ranges,
            owners: (0..servers as u32).collect(),
            servers,
            epoch: 1,
        };
        p.check();
        p
    }

    /// The heads of a consistent-hashing ring whose servers are ranks `0..servers`:
    /// each virtual node's range owned by its server, neighbours of one owner merged.
    ///
    /// # Panics
    /// If a ring server is not below `servers`.
    pub fn from_ring(ring: &crate::placement::ring::Ring, servers: usize) -> Self {
        Self::from_ring_chains(ring, servers, 0)
    }

    /// The chains of a consistent-hashing ring for `replicas` replicas after each head
    /// (fewer where the ring has fewer servers): neighbours with the same whole chain
    /// merged.
    ///
    /// # Panics
    /// If a ring server is not below `servers`.
    pub fn from_ring_chains(
        ring: &crate::placement::ring::Ring,
        servers: usize,
        replicas: usize,
    ) -> Self {
        let mut ranges: Vec<KeyRange> = Vec::new();
        let mut owners: Vec<u32> = Vec::new();
        let mut followers: Vec<Vec<u32>> = Vec::new();
        for (r, chain) in ring.ranges(replicas) {
            let owner = chain[0];
            assert!(
                chain.iter().all(|&s| (s as usize) < servers),
                "ring server in {chain:?} out of range"
            );
            match (ranges.last_mut(), owners.last(), followers.last()) {
                (Some(last), Some(&o), Some(f))
                    if o == owner && last.end == r.begin && f[..] == chain[1..] =>
                {
                    last.end = r.end
                }
                _ => {
                    ranges.push(r);
                    owners.push(owner);
                    followers.push(chain[1..].to_vec());
                }
            }
        }
        let p = Partition {
            ranges,
            owners,
            followers,
            servers,
            epoch: ring.epoch(),
        };
        p.check();
        p
    }

    /// Build from explicit (range, chain) pieces (sorted, contiguous, covering the key
    /// space; chains head first, distinct servers below `servers`), neighbours with the
    /// same chain merged. `None` when the pieces do not form a valid table.
    pub fn from_chains(
        pieces: Vec<(KeyRange, Vec<u32>)>,
        servers: usize,
        epoch: u64,
    ) -> Option<Self> {
        let mut ranges: Vec<KeyRange> = Vec::new();
        let mut owners: Vec<u32> = Vec::new();
        let mut followers: Vec<Vec<u32>> = Vec::new();
        for (r, chain) in pieces {
            let (&head, rest) = chain.split_first()?;
            match (ranges.last_mut(), owners.last(), followers.last()) {
                (Some(last), Some(&o), Some(f))
                    if o == head && last.end == r.begin && f[..] == *rest =>
                {
                    last.end = r.end
                }
                _ => {
                    ranges.push(r);
                    owners.push(head);
                    followers.push(rest.to_vec());
                }
            }
        }
        let distinct = followers.iter().zip(&owners).all(|(f, o)| {
            let mut c = f.clone();
            c.push(*o);
            c.sort_unstable();
            c.windows(2).all(|w| w[0] != w[1])
        });
        let p = Partition {
            ranges,
            owners,
            followers,
            servers,
            epoch,
        };
        (distinct && p.is_valid()).then_some(p)
    }

    /// Build from explicit ranges (sorted, contiguous, covering the key space), server
    /// `i` owning `ranges[i]`.
    pub fn from_ranges(ranges: Vec<KeyRange>) -> Option<Self> {
        let n = ranges.len();
        let p = Partition {
            owners: (0..n as u32).collect(),
            followers: vec![Vec::new(); n],
            ranges,
            servers: n,
            epoch: 1,
        };
        p.is_valid().then_some(p)
    }

    fn is_valid(&self) -> bool {
        !self.ranges.is_empty()
            && self.ranges.len() == self.owners.len()
            && self.followers.len() == self.owners.len()
            && self
                .followers
                .iter()
                .zip(&self.owners)
                .all(|(f, o)| f.iter().all(|s| s != o && (*s as usize) < self.servers))
            && self.ranges[0].begin == 0
            && self.ranges.last().is_some_and(|r| r.end == KEY_END)
            && self.ranges.windows(2).all(|w| w[0].end == w[1].begin)
            && self.ranges.iter().all(|r| !r.is_empty())
            && self.owners.iter().all(|&o| (o as usize) < self.servers)
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
        self.servers
    }

    /// Always false: a partition has at least one server.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The epoch this routing table belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The ranges server `i` owns, in key order.
    pub fn ranges_of(&self, i: usize) -> Vec<KeyRange> {
        self.ranges
            .iter()
            .zip(&self.owners)
            .filter(|(_, &o)| o as usize == i)
            .map(|(r, _)| *r)
            .collect()
    }

    /// The largest range server `i` owns (the first of equal ones), if any.
    pub fn largest_range_of(&self, i: usize) -> Option<KeyRange> {
        self.ranges_of(i)
            .into_iter()
            .fold(None, |best: Option<KeyRange>, r| match best {
                Some(b) if b.len() >= r.len() => Some(b),
                _ => Some(r),
            })
    }

    /// All ranges, in key order, with their owners.
    pub fn ranges(&self) -> &[KeyRange] {
        &self.ranges
    }

    /// The owner of each range of [`ranges`](Self::ranges).
    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    /// The replicas of each range of [`ranges`](Self::ranges) after its owner, in chain
    /// order (empty without replication).
    pub fn followers(&self) -> &[Vec<u32>] {
        &self.followers
    }

    /// The index into [`ranges`](Self::ranges) of the range holding `key`.
    pub fn index_of(&self, key: Key) -> usize {
        self.ranges.partition_point(|r| r.end <= key)
    }

    /// The longest chain of any range, less its head: the replication factor in effect.
    pub fn replicas(&self) -> usize {
        self.followers.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// The chain holding `key`: owner first, then its replicas.
    pub fn chain_of(&self, key: Key) -> Vec<u32> {
        let i = self.index_of(key);
        let mut c = vec![self.owners[i]];
        c.extend_from_slice(&self.followers[i]);
        c
    }

    /// The server owning `key`.
    pub fn server_of(&self, key: Key) -> usize {
        debug_assert!(key < KEY_END);
        self.owners[self.ranges.partition_point(|r| r.end <= key)] as usize
    }

    /// Whether server `i` owns every key of `range` (which then lies in one or several
    /// adjacent ranges of `i`).
    pub fn owns(&self, i: usize, range: &KeyRange) -> bool {
        range.is_empty() || self.split_range(*range).iter().all(|(s, _)| *s == i)
    }

    /// Whether server `i` owns every key of the sorted list `keys`.
    pub fn owns_keys(&self, i: usize, keys: &[Key]) -> bool {
        self.split_keys(keys).iter().all(|(s, _)| *s == i)
    }

    /// Split a sorted key list into runs of keys with one owner: `(server, index range
    /// into keys)`, in key order. A server may appear in several runs (several ranges);
    /// one binary search per run, not one per key.
    pub fn split_keys(&self, keys: &[Key]) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut out: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut start = 0;
        while start < keys.len() {
            let i = self.ranges.partition_point(|r| r.end <= keys[start]);
            let server = self.owners[i] as usize;
            let end_key = self.ranges[i].end;
            let end = start + keys[start..].partition_point(|&k| k < end_key);
            match out.last_mut() {
                Some((s, run)) if *s == server && run.end == start => run.end = end,
                _ => out.push((server, start..end)),
            }
            start = end;
        }
        out
    }

    /// Split a key range into the parts owned by one server each, in key order
    /// (adjacent ranges of one owner merged).
    pub fn split_range(&self, range: KeyRange) -> Vec<(usize, KeyRange)> {
        if range.is_empty() {
            return Vec::new();
        }
        let first = self.ranges.partition_point(|r| r.end <= range.begin);
        let mut out: Vec<(usize, KeyRange)> = Vec::new();
        for (r, &o) in self.ranges[first..].iter().zip(&self.owners[first..]) {
            let Some(part) = r.intersect(&range) else {
                break;
            };
            match out.last_mut() {
                Some((s, p)) if *s == o as usize && p.end == part.begin => p.end = part.end,
                _ => out.push((o as usize, part)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A table from the network that breaks the invariants (a gap, an owner that is no
    /// server, chains of the wrong count, no range at all) is a decode error, not a
    /// table whose lookups index out of bounds (found by the fuzz target `control`).
    #[test]
    fn a_broken_table_does_not_decode() {
        let good = Partition::even(3);
        let bytes = postcard::to_allocvec(&good).unwrap();
        assert_eq!(postcard::from_bytes::<Partition>(&bytes).unwrap(), good);
        let decode =
            |p: &Partition| postcard::from_bytes::<Partition>(&postcard::to_allocvec(p).unwrap());
        let mut gap = good.clone();
        gap.ranges[1].begin += 1;
        assert!(decode(&gap).is_err());
        let mut stranger = good.clone();
        stranger.owners[2] = 3;
        assert!(decode(&stranger).is_err());
        let mut short = good.clone();
        short.followers.pop();
        assert!(decode(&short).is_err());
        let mut empty = good.clone();
        (empty.ranges, empty.owners, empty.followers) = (Vec::new(), Vec::new(), Vec::new());
        assert!(decode(&empty).is_err());
        // Without replication, the chains may be left out (JSON).
        let mut json = serde_json::to_value(&good).unwrap();
        json.as_object_mut().unwrap().remove("followers");
        assert_eq!(serde_json::from_value::<Partition>(json).unwrap(), good);
    }

    #[test]
    fn ring_chains_match_the_ring_for_every_key() {
        let ring = crate::placement::ring::Ring::new(&[0, 1, 2, 3], 16);
        for k in [0usize, 1, 2, 5] {
            let p = Partition::from_ring_chains(&ring, 4, k);
            assert_eq!(p.replicas(), k.min(3));
            for w in p.ranges().windows(2) {
                assert_eq!(w[0].end, w[1].begin);
            }
            for (i, r) in p.ranges().iter().enumerate() {
                for key in [r.begin, r.begin + r.len() / 2, r.end - 1] {
                    assert_eq!(p.chain_of(key), ring.chain(key, k), "key {key:#x}, k {k}");
                    assert_eq!(p.index_of(key), i);
                }
                if i > 0 {
                    // Neighbours are merged unless their chains differ.
                    assert!(p.chain_of(r.begin) != p.chain_of(r.begin - 1));
                }
            }
        }
        // Removing a server: its ranges pass to the next server of their chains.
        let after = ring.remove_server(2);
        let p1 = Partition::from_ring_chains(&ring, 4, 1);
        let p2 = Partition::from_ring_chains(&after, 4, 1);
        assert!(p2.epoch() > p1.epoch());
        for r in p1.ranges() {
            let c = p1.chain_of(r.begin);
            if c[0] == 2 {
                assert_eq!(p2.server_of(r.begin) as u32, c[1]);
            }
        }
    }

    #[test]
    fn even_split_covers_the_key_space() {
        for n in [1, 2, 3, 7, 64] {
            let p = Partition::even(n);
            assert_eq!(p.len(), n);
            assert_eq!(p.ranges()[0].begin, 0);
            assert_eq!(p.ranges()[n - 1].end, KEY_END);
            let lens: Vec<u64> = p.ranges().iter().map(|r| r.len()).collect();
            let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            assert!(max - min <= 1, "uneven split {lens:?}");
        }
    }

    #[test]
    fn server_of_edges() {
        let p = Partition::even(4);
        assert_eq!(p.server_of(0), 0);
        assert_eq!(p.server_of(p.ranges()[1].begin), 1);
        assert_eq!(p.server_of(p.ranges()[1].begin - 1), 0);
        assert_eq!(p.server_of(KEY_END - 1), 3);
    }

    #[test]
    fn split_range_across_servers() {
        let p = Partition::even(4);
        let b = p.ranges()[1].begin;
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
                    prop_assert!(p.ranges()[*server].contains(k));
                    prop_assert_eq!(p.server_of(k), *server);
                }
                next = idx.end;
            }
            prop_assert_eq!(next, keys.len());
        }
    }

    proptest! {
        /// A ring's partition: every run and piece is owned by its server, runs tile the
        /// key list and pieces tile the range, in key order.
        #[test]
        fn ring_partitions_route_every_key_to_its_owner(
            servers in 1usize..6,
            vnodes in 1u32..32,
            mut keys in proptest::collection::vec(0u64..KEY_END, 0..300),
            a in 0u64..KEY_END, b in 0u64..KEY_END,
        ) {
            let ids: Vec<u32> = (0..servers as u32).collect();
            let ring = crate::placement::ring::Ring::new(&ids, vnodes);
            let p = Partition::from_ring(&ring, servers);
            prop_assert_eq!(p.epoch(), ring.epoch());
            keys.sort_unstable();
            keys.dedup();
            let mut next = 0;
            for (server, idx) in p.split_keys(&keys) {
                prop_assert_eq!(idx.start, next);
                for &k in &keys[idx.clone()] {
                    prop_assert_eq!(ring.owner(k) as usize, server);
                    prop_assert_eq!(p.server_of(k), server);
                }
                prop_assert!(p.owns_keys(server, &keys[idx.clone()]));
                next = idx.end;
            }
            prop_assert_eq!(next, keys.len());
            let r = KeyRange::new(a.min(b), a.max(b));
            let mut at = r.begin;
            for (server, piece) in p.split_range(r) {
                prop_assert_eq!(piece.begin, at);
                prop_assert!(p.owns(server, &piece));
                prop_assert_eq!(ring.owner(piece.begin) as usize, server);
                prop_assert_eq!(ring.owner(piece.end - 1) as usize, server);
                at = piece.end;
            }
            prop_assert!(r.is_empty() || at == r.end);
            let total: u64 = (0..servers).flat_map(|s| p.ranges_of(s)).map(|r| r.len()).sum();
            prop_assert_eq!(total, KEY_END);
        }
    }
}
