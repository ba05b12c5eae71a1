//! Who is who: server and worker ranks, node ids (the `sender` of every frame), and the
//! tags a process puts on its connections. Every conversion between these and plain
//! numbers lives here; the numbers are the ones on the wire (node ids) and in the
//! transport (tags), and they do not change.
//!
//! Node ids: the scheduler is 0; the servers of the first table (`first_servers` of
//! them, the cluster spec's count) are `1 + rank`; workers are `1 + first_servers +
//! rank`; servers that joined a running cluster are [`JOINED_SERVER_BASE`]` + rank`
//! (their ranks are never below `first_servers`). Ids are unique while
//! `1 + first_servers + workers <= JOINED_SERVER_BASE` (about 16.7 million nodes).

use std::fmt;

/// The rank of a server: its place among the servers (0, 1, ...), also of servers that
/// joined later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerRank(pub u32);

/// The rank of a worker: its place among the workers (0, 1, ...), also of workers that
/// joined later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerRank(pub u32);

impl fmt::Display for ServerRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for WorkerRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Node ids of servers that joined a running cluster start here
/// (`JOINED_SERVER_BASE + rank`): above every worker's id, also of workers that join
/// later (`1 + first_servers + rank`).
pub const JOINED_SERVER_BASE: u32 = 1 << 24;

/// A node's id: what the scheduler hands out in its welcome and every frame carries as
/// its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// What a node id stands for (see [`NodeId::who`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Who {
    /// The scheduler.
    Scheduler,
    /// A server: of the first table or one that joined later.
    Server(ServerRank),
    /// A worker: of the first job or one that joined later.
    Worker(WorkerRank),
}

impl NodeId {
    /// The scheduler's id.
    pub const SCHEDULER: NodeId = NodeId(0);

    /// The id of server `rank` of the first table (`1 + rank`).
    pub fn first_server(rank: ServerRank) -> NodeId {
        NodeId(1 + rank.0)
    }

    /// The id of server `rank` that joined a running cluster (`JOINED_SERVER_BASE +
    /// rank`).
    pub fn joined_server(rank: ServerRank) -> NodeId {
        NodeId(JOINED_SERVER_BASE + rank.0)
    }

    /// The id of server `rank` in a cluster whose first table had `first_servers`
    /// servers: ranks from `first_servers` on joined later.
    pub fn server(rank: ServerRank, first_servers: u32) -> NodeId {
        if rank.0 >= first_servers {
            NodeId::joined_server(rank)
        } else {
            NodeId::first_server(rank)
        }
    }

    /// The id of worker `rank` in a cluster whose first table had `first_servers`
    /// servers (`1 + first_servers + rank`).
    pub fn worker(rank: WorkerRank, first_servers: u32) -> NodeId {
        NodeId(1 + first_servers + rank.0)
    }

    /// What this id stands for in a cluster whose first table had `first_servers`
    /// servers. Every id decodes to something: ids from [`JOINED_SERVER_BASE`] on are
    /// servers, the ids between the first servers' and those are workers.
    pub fn who(self, first_servers: u32) -> Who {
        match self.0 {
            0 => Who::Scheduler,
            id if id >= JOINED_SERVER_BASE => Who::Server(ServerRank(id - JOINED_SERVER_BASE)),
            id if id <= first_servers => Who::Server(ServerRank(id - 1)),
            id => Who::Worker(WorkerRank(id - 1 - first_servers)),
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which kind of process holds a connection tag. Tags are local to the process that
/// sets and reads them, and the two kinds number them differently (as they always
/// have): a node of the other role is `rank + 1`, a node of the holder's own role is
/// `PEER_TAG + rank`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A server: workers are `rank + 1`, other servers `PEER_TAG + rank`.
    Server,
    /// A worker: servers are `rank + 1` (it never connects to other workers).
    Worker,
}

/// What a connection leads to, as its tag ([`pserv_transport::Conn::tag`]) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnTag {
    /// Not known (yet): the tag of a new connection.
    Unknown,
    /// The scheduler.
    Scheduler,
    /// A server.
    Server(ServerRank),
    /// A worker.
    Worker(WorkerRank),
}

/// The tag of an untagged connection.
const UNKNOWN_TAG: u64 = 0;
/// The tag of the scheduler's connection.
const SCHEDULER_TAG: u64 = u64::MAX;
/// Tags of connections to nodes of the holder's own role start here (`PEER_TAG + rank`).
const PEER_TAG: u64 = 1 << 40;

impl ConnTag {
    /// The number to store with [`pserv_transport::Conn::set_tag`] in a process of kind
    /// `holder`.
    pub fn to_u64(self, holder: Holder) -> u64 {
        match (self, holder) {
            (ConnTag::Unknown, _) => UNKNOWN_TAG,
            (ConnTag::Scheduler, _) => SCHEDULER_TAG,
            // The other role: `rank + 1`.
            (ConnTag::Worker(r), Holder::Server) => u64::from(r.0) + 1,
            (ConnTag::Server(r), Holder::Worker) => u64::from(r.0) + 1,
            // The holder's own role: `PEER_TAG + rank`.
            (ConnTag::Server(r), Holder::Server) => PEER_TAG + u64::from(r.0),
            (ConnTag::Worker(r), Holder::Worker) => PEER_TAG + u64::from(r.0),
        }
    }

    /// What a tag read with [`pserv_transport::Conn::tag`] in a process of kind `holder`
    /// means. A number [`to_u64`](Self::to_u64) never gives is [`ConnTag::Unknown`].
    pub fn from_u64(tag: u64, holder: Holder) -> ConnTag {
        match tag {
            UNKNOWN_TAG => ConnTag::Unknown,
            SCHEDULER_TAG => ConnTag::Scheduler,
            t if t >= PEER_TAG => match (u32::try_from(t - PEER_TAG), holder) {
                (Ok(r), Holder::Server) => ConnTag::Server(ServerRank(r)),
                (Ok(r), Holder::Worker) => ConnTag::Worker(WorkerRank(r)),
                (Err(_), _) => ConnTag::Unknown,
            },
            t => match (u32::try_from(t - 1), holder) {
                (Ok(r), Holder::Server) => ConnTag::Worker(WorkerRank(r)),
                (Ok(r), Holder::Worker) => ConnTag::Server(ServerRank(r)),
                (Err(_), _) => ConnTag::Unknown,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOLDERS: [Holder; 2] = [Holder::Server, Holder::Worker];

    /// Ranks at the edges of `u32`, and small ones.
    fn edge_ranks() -> impl Iterator<Item = u32> {
        (0..64).chain([
            1 << 16,
            (1 << 24) - 1,
            1 << 24,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ])
    }

    fn tags(r: u32) -> [ConnTag; 4] {
        [
            ConnTag::Unknown,
            ConnTag::Scheduler,
            ConnTag::Server(ServerRank(r)),
            ConnTag::Worker(WorkerRank(r)),
        ]
    }

    #[test]
    fn tag_numbers_are_the_ones_in_use() {
        // Servers: 0 unknown, worker rank + 1, PEER_TAG + server rank, u64::MAX.
        let s = Holder::Server;
        assert_eq!(ConnTag::Unknown.to_u64(s), 0);
        assert_eq!(ConnTag::Scheduler.to_u64(s), u64::MAX);
        assert_eq!(ConnTag::Worker(WorkerRank(0)).to_u64(s), 1);
        assert_eq!(ConnTag::Worker(WorkerRank(7)).to_u64(s), 8);
        assert_eq!(ConnTag::Server(ServerRank(0)).to_u64(s), 1 << 40);
        assert_eq!(ConnTag::Server(ServerRank(3)).to_u64(s), (1 << 40) + 3);
        // Workers: 0 unknown, server rank + 1, u64::MAX.
        let w = Holder::Worker;
        assert_eq!(ConnTag::Unknown.to_u64(w), 0);
        assert_eq!(ConnTag::Scheduler.to_u64(w), u64::MAX);
        assert_eq!(ConnTag::Server(ServerRank(0)).to_u64(w), 1);
        assert_eq!(ConnTag::Server(ServerRank(4)).to_u64(w), 5);
    }

    #[test]
    fn tags_round_trip_at_the_edges() {
        for h in HOLDERS {
            for r in edge_ranks() {
                for t in tags(r) {
                    assert_eq!(ConnTag::from_u64(t.to_u64(h), h), t, "{t:?} held by {h:?}");
                }
            }
        }
    }

    #[test]
    fn numbers_no_tag_gives_are_unknown() {
        for h in HOLDERS {
            for n in [
                (1 << 32) + 1,
                (1 << 32) + 2,
                PEER_TAG - 1,
                PEER_TAG + (1 << 32),
                u64::MAX - 1,
            ] {
                assert_eq!(
                    ConnTag::from_u64(n, h),
                    ConnTag::Unknown,
                    "{n} held by {h:?}"
                );
            }
        }
    }

    #[test]
    fn node_ids_are_the_ones_in_use() {
        assert_eq!(NodeId::SCHEDULER, NodeId(0));
        // Three first servers, then workers, then joiners.
        assert_eq!(NodeId::server(ServerRank(0), 3), NodeId(1));
        assert_eq!(NodeId::server(ServerRank(2), 3), NodeId(3));
        assert_eq!(NodeId::worker(WorkerRank(0), 3), NodeId(4));
        assert_eq!(NodeId::worker(WorkerRank(2), 3), NodeId(6));
        assert_eq!(NodeId::server(ServerRank(3), 3), NodeId((1 << 24) + 3));
        assert_eq!(NodeId::first_server(ServerRank(5)), NodeId(6));
        assert_eq!(NodeId::joined_server(ServerRank(5)), NodeId((1 << 24) + 5));
        assert_eq!(NodeId(0).who(3), Who::Scheduler);
    }

    #[test]
    fn node_ids_round_trip_at_the_edges() {
        for first in [1, 2, 3, 64, 1000, 100_000] {
            // First servers, joiners (ranks from `first` on), workers.
            for r in (0..first.min(64)).chain([first - 1]) {
                let id = NodeId::server(ServerRank(r), first);
                assert_eq!(id.who(first), Who::Server(ServerRank(r)));
            }
            for r in (first..first + 64).chain([u32::MAX - JOINED_SERVER_BASE]) {
                let id = NodeId::server(ServerRank(r), first);
                assert_eq!(id.who(first), Who::Server(ServerRank(r)));
            }
            for r in (0..64).chain([JOINED_SERVER_BASE - 2 - first]) {
                let id = NodeId::worker(WorkerRank(r), first);
                assert_eq!(id.who(first), Who::Worker(WorkerRank(r)));
            }
        }
    }

    #[test]
    fn every_small_id_decodes_and_encodes_back() {
        for first in 0..32u32 {
            for id in 0..256u32 {
                let back = match NodeId(id).who(first) {
                    Who::Scheduler => NodeId::SCHEDULER,
                    Who::Server(r) => NodeId::server(r, first),
                    Who::Worker(r) => NodeId::worker(r, first),
                };
                assert_eq!(back, NodeId(id), "id {id}, {first} first servers");
            }
        }
    }

    #[test]
    fn ids_never_collide_in_realistic_clusters() {
        for (first, workers, joined) in [(1, 1, 1), (4, 16, 4), (16, 64, 16), (100, 10_000, 100)] {
            let mut seen = std::collections::HashSet::new();
            assert!(seen.insert(NodeId::SCHEDULER));
            for r in 0..first + joined {
                assert!(
                    seen.insert(NodeId::server(ServerRank(r), first)),
                    "server {r}"
                );
            }
            for r in 0..workers {
                assert!(
                    seen.insert(NodeId::worker(WorkerRank(r), first)),
                    "worker {r}"
                );
            }
            assert_eq!(seen.len() as u32, 1 + first + joined + workers);
        }
    }

    proptest! {
        #[test]
        fn tag_round_trip(r in any::<u32>(), which in 0..4usize, server_side in any::<bool>()) {
            let h = if server_side { Holder::Server } else { Holder::Worker };
            let t = tags(r)[which];
            prop_assert_eq!(ConnTag::from_u64(t.to_u64(h), h), t);
        }

        #[test]
        fn tag_numbers_decode_to_themselves_or_unknown(n in any::<u64>(), server_side in any::<bool>()) {
            let h = if server_side { Holder::Server } else { Holder::Worker };
            let t = ConnTag::from_u64(n, h);
            prop_assert!(t == ConnTag::Unknown || t.to_u64(h) == n, "{} -> {:?}", n, t);
        }

        #[test]
        fn node_id_round_trip(first in 0u32..100_000, r in 0u32..1_000_000) {
            prop_assert_eq!(
                NodeId::worker(WorkerRank(r), first).who(first),
                Who::Worker(WorkerRank(r))
            );
            prop_assert_eq!(
                NodeId::server(ServerRank(r), first).who(first),
                Who::Server(ServerRank(r))
            );
            prop_assert_eq!(NodeId::SCHEDULER.who(first), Who::Scheduler);
        }

        #[test]
        fn servers_and_workers_never_share_an_id(
            first in 1u32..10_000,
            s in 0u32..100_000,
            w in 0u32..1_000_000,
        ) {
            let server = NodeId::server(ServerRank(s), first);
            let worker = NodeId::worker(WorkerRank(w), first);
            prop_assert_ne!(server, worker);
            prop_assert_ne!(server, NodeId::SCHEDULER);
            prop_assert_ne!(worker, NodeId::SCHEDULER);
        }
    }
}
