//! The consistent-hashing ring with virtual nodes.
//!
//! Every server id gets `vnodes` points on the `u64` key ring, each from a deterministic
//! hash of `(server id, i)` ([`vnode_point`]), so every node that knows the server set and
//! `vnodes` computes the same ring. A virtual node owns the contiguous key range from its
//! point up to the next point; the range that wraps past the top of the key space is cut
//! in two (`[last point, KEY_END)` and `[0, first point)`), so every owned range is a
//! plain [`KeyRange`] and range push/pull keeps working.
//!
//! The *chain* of a range is its owner (the head) followed by the next `k` *distinct*
//! servers in inheritance order: the owners of the points *below* the range's point,
//! walking down the ring (and wrapping). Those are the servers that would inherit the
//! range if the owner's point went away (a removed point's range extends the range of the
//! point below it), so: removing a server deletes it from the chains it was in and appends
//! the next distinct server; adding one inserts it (as head of the ranges its points cut
//! off, or inside the chains whose walk meets its points) and drops the last member. Either
//! way the survivors keep their relative order, and the head's successor is the one that
//! takes over when the head dies. Chain replication ([`crate::replication`]) relies on that:
//! a survivor's history contains that of every survivor after it.
//!
//! A ring has an epoch; [`Ring::add_server`] and [`Ring::remove_server`] return a new ring
//! with the epoch one higher. Rings travel in messages (serde). Servers check the epoch a
//! request was routed with against the routing table ([`crate::placement::Partition`]),
//! which the scheduler builds from the ring.
//!
//! Edge cases: two points may collide (same hash modulo `KEY_END`); the earlier one (by
//! server id) then owns an empty range, which [`Ring::ranges`] leaves out. A ring always
//! has at least one server.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::base::keys::{Key, KeyRange, KEY_END};

/// A server's id on the ring.
pub type ServerId = u32;

/// The ring point of virtual node `i` of `server`: splitmix64 of `(server << 32) | i`,
/// reduced into `[0, KEY_END)`. Stable across versions: it is part of the wire contract.
pub fn vnode_point(server: ServerId, i: u32) -> Key {
    splitmix64((u64::from(server) << 32) | u64::from(i)) % KEY_END
}

/// splitmix64's finaliser: a fast, well-mixing, deterministic 64-bit hash.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The consistent-hashing ring: servers, their virtual nodes, and the epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    epoch: u64,
    vnodes: u32,
    /// Sorted, distinct, never empty.
    servers: Vec<ServerId>,
    /// `(point, server)`, sorted; `vnodes` per server.
    points: Vec<(Key, ServerId)>,
}

/// Balance of a ring: the share of the key space each server heads.
#[derive(Clone, Debug, PartialEq)]
pub struct Balance {
    /// `(server, keys headed)`, in server order.
    pub keys: Vec<(ServerId, u64)>,
    /// Largest over smallest key count (1.0 is perfect).
    pub max_over_min: f64,
}

impl Ring {
    /// A ring of `servers` (any order, duplicates ignored), `vnodes` points each, epoch 1.
    ///
    /// # Panics
    /// With no server or `vnodes == 0`.
    pub fn new(servers: &[ServerId], vnodes: u32) -> Ring {
        let mut s = servers.to_vec();
        s.sort_unstable();
        s.dedup();
        Self::build(1, vnodes, s)
    }

    fn build(epoch: u64, vnodes: u32, servers: Vec<ServerId>) -> Ring {
        assert!(!servers.is_empty(), "a ring needs at least one server");
        assert!(
            vnodes > 0,
            "a ring needs at least one virtual node per server"
        );
        let mut points: Vec<(Key, ServerId)> = servers
            .iter()
            .flat_map(|&s| (0..vnodes).map(move |i| (vnode_point(s, i), s)))
            .collect();
        points.sort_unstable();
        let r = Ring {
            epoch,
            vnodes,
            servers,
            points,
        };
        r.check();
        r
    }

    fn check(&self) {
        assert!(self.epoch >= 1, "ring epochs start at 1");
        assert!(self.servers.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(self.points.len(), self.servers.len() * self.vnodes as usize);
        debug_assert!(self.points.windows(2).all(|w| w[0] <= w[1]));
        debug_assert!(self.points.iter().all(|p| p.0 < KEY_END));
    }

    /// The ring with `server` added and the epoch one higher.
    ///
    /// # Panics
    /// If `server` is already on the ring (the manager rejects duplicate joins first).
    pub fn add_server(&self, server: ServerId) -> Ring {
        assert!(
            !self.has_server(server),
            "server {server} already on the ring"
        );
        let mut s = self.servers.clone();
        s.push(server);
        s.sort_unstable();
        let r = Self::build(self.epoch + 1, self.vnodes, s);
        assert!(r.epoch > self.epoch);
        r
    }

    /// The ring without `server`, epoch one higher.
    ///
    /// # Panics
    /// If `server` is not on the ring or is its last server.
    pub fn remove_server(&self, server: ServerId) -> Ring {
        assert!(self.has_server(server), "server {server} not on the ring");
        let s: Vec<ServerId> = self
            .servers
            .iter()
            .copied()
            .filter(|&x| x != server)
            .collect();
        let r = Self::build(self.epoch + 1, self.vnodes, s);
        assert!(r.epoch > self.epoch);
        r
    }

    /// The same ring at another epoch (the control plane numbers the tables of a change
    /// in between: a join's copy phase takes one epoch).
    ///
    /// # Panics
    /// If `epoch` is 0.
    pub fn with_epoch(&self, epoch: u64) -> Ring {
        let r = Ring {
            epoch,
            ..self.clone()
        };
        r.check();
        r
    }

    /// The ring's epoch (1 for a new ring; one more per change).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Virtual nodes per server.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// The servers, sorted.
    pub fn servers(&self) -> &[ServerId] {
        &self.servers
    }

    /// Whether `server` is on the ring.
    pub fn has_server(&self, server: ServerId) -> bool {
        self.servers.binary_search(&server).is_ok()
    }

    /// The points `(point, server)`, sorted.
    pub fn points(&self) -> &[(Key, ServerId)] {
        &self.points
    }

    /// Index into `points` of the virtual node owning `key`.
    fn vnode_of(&self, key: Key) -> usize {
        debug_assert!(key < KEY_END);
        let i = self.points.partition_point(|p| p.0 <= key);
        if i == 0 {
            self.points.len() - 1
        } else {
            i - 1
        }
    }

    /// One past the last key of the owned range holding `key`.
    fn range_end(&self, key: Key) -> Key {
        let i = self.points.partition_point(|p| p.0 <= key);
        self.points.get(i).map_or(KEY_END, |p| p.0)
    }

    /// The owned range (a virtual node's range, or one half of the wrapping one) holding
    /// `key`.
    pub fn range_of(&self, key: Key) -> KeyRange {
        let i = self.points.partition_point(|p| p.0 <= key);
        let begin = if i == 0 { 0 } else { self.points[i - 1].0 };
        KeyRange::new(begin, self.range_end(key))
    }

    /// The server owning (heading) `key`.
    pub fn owner(&self, key: Key) -> ServerId {
        self.points[self.vnode_of(key)].1
    }

    fn chain_from(&self, vnode: usize, k: usize) -> Vec<ServerId> {
        let want = (k + 1).min(self.servers.len());
        let mut out = Vec::with_capacity(want);
        let n = self.points.len();
        let mut i = vnode;
        while out.len() < want {
            let s = self.points[i].1;
            if !out.contains(&s) {
                out.push(s);
            }
            i = (i + n - 1) % n;
        }
        debug_assert_eq!(out[0], self.points[vnode].1);
        out
    }

    /// The chain of `key`: its owner, then the next `k` distinct servers in inheritance
    /// order (the owners of the points below, wrapping; fewer when the ring has fewer
    /// servers). Head first, tail last.
    pub fn chain(&self, key: Key, k: usize) -> Vec<ServerId> {
        self.chain_from(self.vnode_of(key), k)
    }

    /// Every owned range with its chain, sorted, tiling `[0, KEY_END)` without gaps or
    /// overlaps (empty ranges of colliding points left out).
    pub fn ranges(&self, k: usize) -> Vec<(KeyRange, Vec<ServerId>)> {
        let n = self.points.len();
        let mut out = Vec::with_capacity(n + 1);
        if self.points[0].0 > 0 {
            out.push((
                KeyRange::new(0, self.points[0].0),
                self.chain_from(n - 1, k),
            ));
        }
        for i in 0..n {
            let end = self.points.get(i + 1).map_or(KEY_END, |p| p.0);
            if end > self.points[i].0 {
                out.push((KeyRange::new(self.points[i].0, end), self.chain_from(i, k)));
            }
        }
        out
    }

    /// The ranges `server` is in the chain of, with its position (0 = head).
    pub fn ranges_of(&self, server: ServerId, k: usize) -> Vec<(KeyRange, Vec<ServerId>, usize)> {
        self.ranges(k)
            .into_iter()
            .filter_map(|(r, c)| c.iter().position(|&s| s == server).map(|p| (r, c, p)))
            .collect()
    }

    /// Split a sorted key list into runs of consecutive keys with the same owner:
    /// `(owner, index range into keys)`, in key order. A server heads several ranges, so it
    /// may appear in several runs; callers batch a server's runs into one message.
    pub fn split_keys(&self, keys: &[Key]) -> Vec<(ServerId, Range<usize>)> {
        debug_assert!(keys.windows(2).all(|w| w[0] <= w[1]), "keys not sorted");
        let mut out: Vec<(ServerId, Range<usize>)> = Vec::new();
        let mut start = 0;
        while start < keys.len() {
            let owner = self.owner(keys[start]);
            let end_key = self.range_end(keys[start]);
            let end = start + keys[start..].partition_point(|&k| k < end_key);
            match out.last_mut() {
                Some((o, r)) if *o == owner && r.end == start => r.end = end,
                _ => out.push((owner, start..end)),
            }
            start = end;
        }
        out
    }

    /// Split a key range into its owned parts, in key order: `(owner, part)`.
    pub fn split_range(&self, range: KeyRange) -> Vec<(ServerId, KeyRange)> {
        let mut out = Vec::new();
        let mut b = range.begin;
        while b < range.end {
            let e = self.range_end(b).min(range.end);
            out.push((self.owner(b), KeyRange::new(b, e)));
            b = e;
        }
        out
    }

    /// How much of the key space each server heads, and the max/min ratio.
    pub fn balance(&self) -> Balance {
        let mut keys: Vec<(ServerId, u64)> = self.servers.iter().map(|&s| (s, 0)).collect();
        for (r, c) in self.ranges(0) {
            let i = self.servers.binary_search(&c[0]).unwrap(); // every owner is a server
            keys[i].1 += r.len();
        }
        let max = keys.iter().map(|k| k.1).max().unwrap_or(0);
        let min = keys.iter().map(|k| k.1).min().unwrap_or(0);
        Balance {
            keys,
            max_over_min: max as f64 / min.max(1) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check_tiling(r: &Ring, k: usize) {
        let rs = r.ranges(k);
        assert_eq!(rs[0].0.begin, 0);
        assert_eq!(rs.last().unwrap().0.end, KEY_END);
        for w in rs.windows(2) {
            assert_eq!(w[0].0.end, w[1].0.begin, "gap or overlap");
        }
        for (range, chain) in &rs {
            assert!(!range.is_empty());
            assert_eq!(chain.len(), (k + 1).min(r.servers().len()));
            let mut c = chain.clone();
            c.sort_unstable();
            c.dedup();
            assert_eq!(c.len(), chain.len(), "chain repeats a server");
            assert_eq!(r.owner(range.begin), chain[0]);
            assert_eq!(r.owner(range.end - 1), chain[0]);
            assert_eq!(&r.chain(range.begin, k), chain);
            assert_eq!(r.range_of(range.begin), *range);
        }
    }

    #[test]
    fn small_rings() {
        for n in 1..6u32 {
            let servers: Vec<u32> = (0..n).collect();
            for v in [1, 2, 16] {
                let r = Ring::new(&servers, v);
                assert_eq!(r.epoch(), 1);
                for k in 0..4 {
                    check_tiling(&r, k);
                }
            }
        }
    }

    #[test]
    fn owner_edges() {
        let r = Ring::new(&[1, 2, 3], 4);
        let p0 = r.points()[0];
        assert_eq!(r.owner(p0.0), p0.1);
        assert_eq!(r.owner(0), r.points().last().unwrap().1);
        assert_eq!(r.owner(KEY_END - 1), r.points().last().unwrap().1);
        let parts = r.split_range(KeyRange::FULL);
        assert_eq!(parts.len(), r.ranges(0).len());
    }

    #[test]
    fn serde_round_trip() {
        let r = Ring::new(&[4, 9, 2], 16);
        let bytes = postcard::to_allocvec(&r).unwrap();
        let back: Ring = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, r);
    }

    /// Max/min keys per server, analytically (key-space share) and for 100k random keys.
    #[test]
    fn balance_report() {
        for servers in [4u32, 8] {
            for v in [16u32, 64, 256] {
                let ids: Vec<u32> = (0..servers).collect();
                let r = Ring::new(&ids, v);
                let b = r.balance();
                let mut counts = vec![0u64; servers as usize];
                let mut x = 7u64;
                for _ in 0..100_000 {
                    x = splitmix64(x);
                    counts[r.owner(x % KEY_END) as usize] += 1;
                }
                let emp =
                    *counts.iter().max().unwrap() as f64 / *counts.iter().min().unwrap() as f64;
                println!(
                    "ring balance: servers={servers} vnodes={v} max/min key-space={:.3} max/min of 100k random keys={emp:.3}",
                    b.max_over_min
                );
                if v >= 64 {
                    assert!(b.max_over_min < 2.0, "V={v}: {}", b.max_over_min);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn ranges_tile_the_key_space(
            servers in proptest::collection::btree_set(0u32..1000, 1..9),
            v in 1u32..40,
            k in 0usize..4,
        ) {
            let ids: Vec<u32> = servers.into_iter().collect();
            check_tiling(&Ring::new(&ids, v), k);
        }

        #[test]
        fn add_and_remove_move_only_the_changed_server(
            servers in proptest::collection::btree_set(0u32..1000, 2..9),
            newcomer in 1000u32..2000,
            v in 1u32..40,
            k in 0usize..3,
            keys in proptest::collection::vec(0u64..KEY_END, 50),
        ) {
            let ids: Vec<u32> = servers.into_iter().collect();
            let r = Ring::new(&ids, v);
            let added = r.add_server(newcomer);
            prop_assert!(added.epoch() > r.epoch());
            let gone = ids[0];
            let removed = r.remove_server(gone);
            prop_assert!(removed.epoch() > r.epoch());
            check_tiling(&added, k);
            check_tiling(&removed, k);
            for &key in &keys {
                let (o, a, d) = (r.owner(key), added.owner(key), removed.owner(key));
                prop_assert!(a == o || a == newcomer, "key moved between old servers on add");
                prop_assert!(d == o || o == gone, "key moved between survivors on remove");
                // Survivors keep their relative order in the chain.
                let c = r.chain(key, k);
                let ca: Vec<u32> = added.chain(key, k).into_iter().filter(|&s| s != newcomer).collect();
                let mut it = c.iter();
                prop_assert!(ca.iter().all(|s| it.any(|x| x == s)), "add reordered survivors: {:?} {:?}", c, ca);
                let cd = removed.chain(key, k);
                let c_minus: Vec<u32> = c.iter().copied().filter(|&s| s != gone).collect();
                prop_assert!(cd.starts_with(&c_minus), "remove reordered survivors: {:?} {:?}", c, cd);
            }
        }

        #[test]
        fn split_keys_groups_by_owner(
            servers in proptest::collection::btree_set(0u32..100, 1..6),
            mut keys in proptest::collection::vec(0u64..KEY_END, 0..200),
        ) {
            keys.sort_unstable();
            let ids: Vec<u32> = servers.into_iter().collect();
            let r = Ring::new(&ids, 8);
            let mut next = 0;
            for (s, idx) in r.split_keys(&keys) {
                prop_assert_eq!(idx.start, next);
                prop_assert!(idx.end > idx.start);
                for &key in &keys[idx.clone()] { prop_assert_eq!(r.owner(key), s); }
                next = idx.end;
            }
            prop_assert_eq!(next, keys.len());
        }
    }
}
