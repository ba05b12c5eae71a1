//! Unit tests of the scheduler's state machine.

use std::collections::BTreeSet;
use std::time::Duration;

use super::run::merge_summary;
use super::{ClusterSpec, ConnKey, Input, Output, SchedulerCore};
use crate::placement::Partition;
use crate::proto::{Control, Role, ValueType, WorkerStats};
use crate::update::UpdateSpec;

fn spec(servers: u32, workers: u32) -> ClusterSpec {
    ClusterSpec {
        servers,
        workers,
        value_type: ValueType::F32,
        value_len: 1,
        update: UpdateSpec::Sum,
        vnodes: 0,
        replicas: 0,
    }
}

fn register(core: &mut SchedulerCore, conn: ConnKey, role: Role, rank: Option<u32>) -> Vec<Output> {
    core.handle(Input::Message {
        conn,
        msg: Control::Register {
            role,
            addr: (role == Role::Server)
                .then(|| format!("127.0.0.1:{}", 7000 + conn).parse().unwrap()),
            rank,
            pid: 1,
        },
    })
}

fn sends(out: &[Output]) -> Vec<(ConnKey, &Control)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn, msg } => Some((*conn, msg)),
            _ => None,
        })
        .collect()
}

/// Two servers and two workers registered; returns the core.
fn running() -> SchedulerCore {
    running_spec(spec(2, 2))
}

/// Like [`running`], for a spec of two servers and two workers.
fn running_spec(sp: ClusterSpec) -> SchedulerCore {
    running_core(SchedulerCore::new(sp))
}

/// [`running`] from a given (unregistered) core of two servers and two workers.
fn running_core(mut c: SchedulerCore) -> SchedulerCore {
    assert!(sends(&register(&mut c, 1, Role::Server, Some(1))).is_empty());
    register(&mut c, 2, Role::Worker, None);
    register(&mut c, 3, Role::Server, None);
    let out = register(&mut c, 4, Role::Worker, None);
    // Phase 1: servers only.
    let mut welcomes = sends(&out);
    assert_eq!(welcomes.len(), 2);
    assert!(welcomes.iter().all(|(c, _)| [1, 3].contains(c)));
    let out = c.handle(Input::Message {
        conn: 1,
        msg: Control::Ready,
    });
    assert!(sends(&out).is_empty());
    assert!(!c.is_running());
    // Phase 2: the last server is ready; workers get the table.
    let out = c.handle(Input::Message {
        conn: 3,
        msg: Control::Ready,
    });
    let workers = sends(&out);
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|(c, _)| [2, 4].contains(c)));
    welcomes.extend(workers);
    // Servers are welcomed first, ranks honoured, ids distinct.
    let mut ids = BTreeSet::new();
    for (i, (conn, msg)) in welcomes.iter().enumerate() {
        let Control::Welcome {
            node_id,
            rank,
            cluster,
            ..
        } = msg
        else {
            panic!("expected a welcome, got {msg:?}")
        };
        ids.insert(*node_id);
        assert_eq!(cluster.servers.len(), 2);
        assert_eq!(cluster.servers[1].addr.port(), 7001);
        if i < 2 {
            assert!([1, 3].contains(conn));
        }
        if *conn == 1 {
            assert_eq!(*rank, 1);
        }
        if *conn == 3 {
            assert_eq!(*rank, 0);
        }
    }
    assert_eq!(ids.len(), 4);
    assert!(c.is_running());
    c
}

#[test]
fn a_failed_server_leaves_the_ring_and_everyone_gets_the_new_table() {
    let mut sp = spec(2, 2);
    sp.vnodes = 16;
    sp.replicas = 1;
    assert!(sp.validate().is_ok());
    let mut c = running_spec(sp.clone());
    assert_eq!(c.table().replicas(), 1);
    assert_eq!(c.status().ranges[0].chain.len(), 2);
    // Server rank 1 (connection 1) dies.
    let out = c.handle(Input::Closed { conn: 1 });
    let tables: Vec<_> = sends(&out)
        .into_iter()
        .filter_map(|(conn, m)| match m {
            Control::Table { partition } => Some((conn, partition.clone())),
            _ => None,
        })
        .collect();
    let mut to: Vec<ConnKey> = tables.iter().map(|t| t.0).collect();
    to.sort_unstable();
    assert_eq!(to, vec![2, 3, 4], "every live node learns the table");
    let t = &tables[0].1;
    assert_eq!(t.epoch(), 2);
    assert!(
        t.owners().iter().all(|&o| o == 0),
        "server 0 heads everything"
    );
    assert!(
        t.followers().iter().all(Vec::is_empty),
        "no server left to replicate to"
    );
    assert_eq!(c.failovers.len(), 1);
    assert_eq!(c.status().epoch, 2);
    // Again: nothing more happens.
    let out = c.handle(Input::Closed { conn: 1 });
    assert!(sends(&out).is_empty());

    // Without replicas the ranges are lost, said so, and the table stays.
    sp.replicas = 0;
    let mut c = running_spec(sp);
    let out = c.handle(Input::Closed { conn: 1 });
    assert!(sends(&out).is_empty());
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Log(l) if l.contains("unavailable"))));
    assert_eq!(c.table().epoch(), 1);
}

fn tables(out: &[Output]) -> Vec<(ConnKey, Partition)> {
    sends(out)
        .into_iter()
        .filter_map(|(conn, m)| match m {
            Control::Table { partition } => Some((conn, partition.clone())),
            _ => None,
        })
        .collect()
}

fn msg(c: &mut SchedulerCore, conn: ConnKey, msg: Control) -> Vec<Output> {
    c.handle(Input::Message { conn, msg })
}

#[test]
fn a_server_joins_copies_first_then_the_table_flips_and_another_leaves() {
    let mut sp = spec(2, 2);
    sp.vnodes = 16;
    sp.replicas = 1;
    let mut c = running_spec(sp);
    let join = |addr: &str, rank| Control::Join {
        addr: addr.parse().unwrap(),
        rank,
        pid: 9,
    };
    // Duplicates are refused and change nothing.
    for bad in [
        join("127.0.0.1:7001", None),
        join("127.0.0.1:9000", Some(1)),
    ] {
        let out = msg(&mut c, 9, bad);
        assert!(
            matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("duplicate"))
        );
    }
    assert_eq!(c.table().epoch(), 1);
    // A real join: welcomed with the current table, as rank 2, id above the workers'.
    let out = msg(&mut c, 9, join("127.0.0.1:9000", None));
    let Control::Welcome {
        node_id,
        rank,
        cluster,
        ..
    } = sends(&out)[0].1
    else {
        panic!("expected a welcome: {out:?}")
    };
    assert_eq!((*rank, *node_id), (2, crate::proto::JOINED_SERVER_BASE + 2));
    assert_eq!(cluster.partition.epoch(), 1);
    // Ready: everyone learns the servers, and the copy table (epoch 2) goes out.
    let out = msg(&mut c, 9, Control::Ready);
    assert!(sends(&out)
        .iter()
        .any(|(_, m)| matches!(m, Control::Servers { servers } if servers.len() == 3)));
    let t = tables(&out);
    assert_eq!(t.len(), 5, "all five nodes get the copy table");
    let mid = t[0].1.clone();
    assert_eq!(mid.epoch(), 2);
    assert!(
        mid.owners().iter().all(|&o| o < 2),
        "heads do not change while copying"
    );
    assert!(
        mid.followers().iter().any(|f| f.contains(&2)),
        "the joiner receives copies"
    );
    // A second change waits for this one.
    let out = msg(&mut c, 2, Control::Leave { rank: 0 });
    assert!(
        matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("in progress"))
    );
    // Heads report their copies; a stale report does not count.
    assert!(tables(&msg(&mut c, 1, Control::Synced { epoch: 1 })).is_empty());
    assert!(tables(&msg(&mut c, 1, Control::Synced { epoch: 2 })).is_empty());
    let out = msg(&mut c, 3, Control::Synced { epoch: 2 });
    let t = tables(&out);
    assert_eq!(t.len(), 5);
    let fin = &t[0].1;
    assert_eq!(fin.epoch(), 3);
    assert!(fin.owners().contains(&2), "the joiner heads ranges now");
    assert_eq!(c.table(), fin);
    // Now server 0 (connection 3) leaves gracefully.
    let out = msg(&mut c, 2, Control::Leave { rank: 7 });
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    let out = msg(&mut c, 2, Control::Leave { rank: 0 });
    let mid = &tables(&out)[0].1;
    assert_eq!(mid.epoch(), 4);
    let heads: BTreeSet<u32> = mid.owners().iter().copied().collect();
    let mut out = Vec::new();
    for (conn, rank) in [(1, 1), (3, 0), (9, 2)] {
        if heads.contains(&rank) {
            out = msg(&mut c, conn, Control::Synced { epoch: 4 });
        }
    }
    let fin = &tables(&out)[0].1;
    assert_eq!(fin.epoch(), 5);
    assert!(fin.owners().iter().all(|&o| o != 0));
    assert!(fin.followers().iter().all(|f| !f.contains(&0)));
    assert!(
        sends(&out).contains(&(3, &Control::Shutdown)),
        "the leaver is told to stop"
    );
    // Its connection closing afterwards is no failure.
    let out = c.handle(Input::Closed { conn: 3 });
    assert!(tables(&out).is_empty());
    assert!(c.failovers.is_empty());
}

/// The `Rejoin` report a node sends a restarted scheduler.
fn rejoin_report(role: Role, rank: u32, node_id: u32, table: &Partition, barriers: u64) -> Control {
    Control::Rejoin {
        role,
        rank,
        node_id,
        addr: (role == Role::Server).then(|| "127.0.0.1:7000".parse().unwrap()),
        pid: 1,
        table: table.clone(),
        barriers,
    }
}

#[test]
fn a_restarted_scheduler_rebuilds_its_view_from_the_rejoining_nodes() {
    let mut sp = spec(2, 2);
    sp.vnodes = 16;
    sp.replicas = 1;
    // The table the servers had: server 1 failed earlier (epoch 2).
    let ring = crate::placement::ring::Ring::new(&[0, 1], 16).remove_server(1);
    let table = Partition::from_ring_chains(&ring, 2, 1);
    assert_eq!(table.epoch(), 2);
    let rejoin = |role, rank, node_id, table: &Partition, barriers| {
        rejoin_report(role, rank, node_id, table, barriers)
    };
    // Not recovering: a rejoin is refused.
    let mut fresh = running_spec(sp.clone());
    let out = msg(&mut fresh, 50, rejoin(Role::Worker, 0, 3, &table, 0));
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));

    let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
    assert!(c.is_recovering());
    // Only server 0 is alive; the workers passed 4 barriers.
    let out = msg(&mut c, 1, rejoin(Role::Server, 0, 1, &table, 0));
    assert!(sends(&out).is_empty());
    msg(&mut c, 2, rejoin(Role::Worker, 0, 3, &table, 4));
    // A barrier before the view is rebuilt waits.
    assert!(sends(&msg(&mut c, 2, Control::Barrier { seq: 5, clock: 0 })).is_empty());
    msg(&mut c, 3, rejoin(Role::Worker, 1, 4, &table, 4));
    // A rank that rejoined already is refused.
    let out = msg(&mut c, 4, rejoin(Role::Worker, 1, 4, &table, 4));
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    // Server 1 never comes: the wait ends and the view is the servers' newest table.
    let out = c.handle(Input::Tick { now_ms: 600 });
    assert!(!c.is_recovering());
    assert_eq!(c.table().epoch(), 2);
    let t = tables(&out);
    assert_eq!(t.len(), 3, "every node gets the table");
    // Barriers go on from where the workers are.
    let out = msg(&mut c, 3, Control::Barrier { seq: 5, clock: 0 });
    assert_eq!(sends(&out).len(), 2);
    // And decisions resume: server 0 is the only one, so its failure is said plainly.
    let out = c.handle(Input::Closed { conn: 1 });
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Log(l) if l.contains("unavailable"))));
}

/// Found by the simulation (seed 191): a restarted scheduler ended the job as soon as
/// the first worker that rejoined reported `Done`, although the other workers had not
/// rejoined yet (and were still training).
#[test]
fn a_recovering_scheduler_ends_the_job_only_once_its_view_is_rebuilt() {
    let sp = spec(1, 2);
    let table = Partition::from_ring_chains(&crate::placement::ring::Ring::new(&[0], 4), 1, 0);
    let rejoin = |role, rank, node_id| rejoin_report(role, rank, node_id, &table, 0);
    let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
    msg(&mut c, 1, rejoin(Role::Server, 0, 1));
    msg(&mut c, 2, rejoin(Role::Worker, 0, 2));
    let out = msg(
        &mut c,
        2,
        Control::Done {
            stats: WorkerStats::default(),
        },
    );
    assert!(
        !out.contains(&Output::JobDone),
        "worker 1 has not rejoined yet"
    );
    assert!(!c.is_finished());
    // Worker 1 rejoins: the view is complete, the job goes on until it is done too.
    let out = msg(&mut c, 3, rejoin(Role::Worker, 1, 3));
    assert!(!c.is_recovering());
    assert!(!out.contains(&Output::JobDone));
    let out = msg(
        &mut c,
        3,
        Control::Done {
            stats: WorkerStats::default(),
        },
    );
    assert!(out.contains(&Output::JobDone));

    // Every rejoined worker finished during the wait: the job ends with the wait.
    let mut c = SchedulerCore::new(spec(1, 2)).recovering(Duration::from_millis(500));
    msg(&mut c, 1, rejoin(Role::Server, 0, 1));
    msg(&mut c, 2, rejoin(Role::Worker, 0, 2));
    msg(
        &mut c,
        2,
        Control::Done {
            stats: WorkerStats::default(),
        },
    );
    let out = c.handle(Input::Tick { now_ms: 600 });
    assert!(!c.is_recovering());
    assert!(out.contains(&Output::JobDone), "{out:?}");
}

/// Found by the simulation (seeds 483, 761 and more): a restarted scheduler ended its
/// wait for rejoins once as many workers as the spec names were back, counting a
/// late worker (rank above the spec's) in place of an original one that had not
/// rejoined yet; that one was then refused and the job ended without it.
#[test]
fn recovery_waits_for_every_rank_not_for_a_count() {
    let sp = spec(1, 2);
    let table = Partition::from_ring_chains(&crate::placement::ring::Ring::new(&[0], 4), 1, 0);
    let rejoin = |role, rank, node_id| rejoin_report(role, rank, node_id, &table, 0);
    let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
    msg(&mut c, 1, rejoin(Role::Server, 0, 1));
    msg(&mut c, 2, rejoin(Role::Worker, 0, 2));
    // A late worker (rank 2) is back; worker 1 is not.
    msg(&mut c, 3, rejoin(Role::Worker, 2, 4));
    assert!(c.is_recovering(), "worker 1 has not rejoined");
    let out = msg(&mut c, 4, rejoin(Role::Worker, 1, 3));
    assert!(!c.is_recovering());
    assert!(!out.iter().any(|o| matches!(
        o,
        Output::Send {
            msg: Control::Refused { .. },
            ..
        }
    )));
}

/// Found by the simulation (seed 9890): a server that crashed while no scheduler ran
/// (so nobody declared it failed) stayed head of its ranges in the rebuilt view, and
/// requests for them failed for good. It is failed over once the wait ends.
#[test]
fn a_server_that_never_rejoins_is_failed_over_after_recovery() {
    let mut sp = spec(3, 1);
    sp.vnodes = 8;
    sp.replicas = 1;
    let table =
        Partition::from_ring_chains(&crate::placement::ring::Ring::new(&[0, 1, 2], 8), 3, 1);
    let rejoin = |role, rank, node_id| rejoin_report(role, rank, node_id, &table, 0);
    let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
    msg(&mut c, 1, rejoin(Role::Server, 0, 1));
    msg(&mut c, 2, rejoin(Role::Server, 1, 2));
    msg(&mut c, 3, rejoin(Role::Worker, 0, 4));
    let out = c.handle(Input::Tick { now_ms: 600 });
    assert!(!c.is_recovering());
    let sent = tables(&out);
    let last = &sent.last().expect("tables sent").1;
    assert!(last.epoch() > table.epoch());
    assert!(
        last.owners().iter().all(|&o| o != 2),
        "server 2 heads nothing"
    );
}

/// Found by the simulation (seeds 2583, 9721): a worker whose barrier answer was lost
/// with a crashed scheduler asks the restarted one again; the others had passed that
/// barrier (they said so when they rejoined), so it waited forever.
#[test]
fn a_barrier_passed_before_a_restart_is_released_at_once() {
    let sp = spec(1, 2);
    let table = Partition::from_ring_chains(&crate::placement::ring::Ring::new(&[0], 4), 1, 0);
    let rejoin =
        |role, rank, node_id, barriers| rejoin_report(role, rank, node_id, &table, barriers);
    let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
    msg(&mut c, 1, rejoin(Role::Server, 0, 1, 0));
    msg(&mut c, 2, rejoin(Role::Worker, 0, 2, 1));
    msg(&mut c, 3, rejoin(Role::Worker, 1, 3, 0));
    assert!(!c.is_recovering());
    let out = msg(&mut c, 3, Control::Barrier { seq: 1, clock: 0 });
    assert_eq!(
        sends(&out),
        vec![(
            3,
            &Control::BarrierDone {
                seq: 1,
                live: vec![0, 1],
                clock: 0,
            }
        )]
    );
}

/// Found by the simulation (seed 63): a restarted scheduler accepted a server's join
/// before any server had rejoined, and built the joiner a table from an empty view.
#[test]
fn a_recovering_scheduler_refuses_membership_changes() {
    let mut sp = spec(2, 2);
    sp.vnodes = 8;
    let mut c = SchedulerCore::new(sp).recovering(Duration::from_millis(500));
    let out = msg(
        &mut c,
        1,
        Control::Join {
            addr: "127.0.0.1:7003".parse().unwrap(),
            rank: None,
            pid: 1,
        },
    );
    assert!(
        matches!(&sends(&out)[0].1, Control::Refused { reason } if reason.contains("rebuilding")),
        "{out:?}"
    );
    let out = msg(&mut c, 2, Control::Leave { rank: 0 });
    assert!(
        matches!(&sends(&out)[0].1, Control::Refused { reason } if reason.contains("rebuilding"))
    );
    let out = msg(
        &mut c,
        3,
        Control::Register {
            role: Role::Worker,
            addr: None,
            rank: None,
            pid: 1,
        },
    );
    assert!(
        matches!(&sends(&out)[0].1, Control::Refused { reason } if reason.contains("rebuilding"))
    );
    assert!(tables(&out).is_empty());
}

#[test]
fn replica_settings_that_cannot_work_are_refused() {
    let mut sp = spec(2, 2);
    sp.replicas = 1;
    assert!(sp.validate().unwrap_err().contains("--vnodes"));
    sp.vnodes = 8;
    sp.replicas = 2;
    assert!(sp.validate().unwrap_err().contains("at least 3 servers"));
    sp.replicas = 1;
    assert!(sp.validate().is_ok());
}

#[test]
fn registration_assigns_ranks_and_welcomes_everyone() {
    running();
}

#[test]
fn bad_registrations_are_refused() {
    let mut c = SchedulerCore::new(spec(1, 1));
    let out = register(&mut c, 1, Role::Server, Some(5));
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    register(&mut c, 2, Role::Server, Some(0));
    let out = register(&mut c, 3, Role::Server, Some(0));
    assert!(matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("taken")));
    let out = register(&mut c, 4, Role::Server, None);
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    let out = c.handle(Input::Message {
        conn: 9,
        msg: Control::Register {
            role: Role::Server,
            addr: None,
            rank: None,
            pid: 1,
        },
    });
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    // A node leaving before the cluster completes frees its rank.
    c.handle(Input::Closed { conn: 2 });
    assert!(sends(&register(&mut c, 5, Role::Server, Some(0))).is_empty());
}

#[test]
fn barriers_release_when_all_live_workers_arrive() {
    let mut c = running();
    let out = c.handle(Input::Message {
        conn: 2,
        msg: Control::Barrier { seq: 1, clock: 0 },
    });
    assert!(sends(&out).is_empty());
    let out = c.handle(Input::Message {
        conn: 4,
        msg: Control::Barrier { seq: 1, clock: 0 },
    });
    let s = sends(&out);
    assert_eq!(s.len(), 2);
    assert!(s.iter().all(|(_, m)| **m
        == Control::BarrierDone {
            seq: 1,
            live: vec![0, 1],
            clock: 0,
        }));
    // A worker that vanishes no longer holds others back.
    c.handle(Input::Message {
        conn: 2,
        msg: Control::Barrier { seq: 2, clock: 0 },
    });
    let out = c.handle(Input::Closed { conn: 4 });
    // The servers are told, for their clock gates...
    let gone = Control::WorkerGone { rank: 1 };
    assert_eq!(sends(&out)[..2], [(3, &gone), (1, &gone)]);
    // ...and the other workers learn it left (its data shard passes to them).
    assert_eq!(
        sends(&out)[2..],
        vec![(
            2,
            &Control::BarrierDone {
                seq: 2,
                live: vec![0],
                clock: 0,
            }
        )]
    );
}

#[test]
fn barrier_from_a_server_or_stranger_is_refused() {
    let mut c = running();
    let out = c.handle(Input::Message {
        conn: 1,
        msg: Control::Barrier { seq: 1, clock: 0 },
    });
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    let out = c.handle(Input::Message {
        conn: 77,
        msg: Control::Done {
            stats: WorkerStats::default(),
        },
    });
    assert!(matches!(sends(&out)[0].1, Control::Refused { .. }));
    assert!(!c.is_finished());
}

#[test]
fn job_ends_when_every_worker_is_done_and_everyone_is_told() {
    let mut c = running();
    let done = |examples| Control::Done {
        stats: WorkerStats {
            examples,
            bytes_sent: 10,
            bytes_received: 20,
            seconds: 2.0,
            blocked_seconds: 0.5,
        },
    };
    let out = c.handle(Input::Message {
        conn: 2,
        msg: done(5),
    });
    assert!(!out.contains(&Output::JobDone));
    let out = c.handle(Input::Message {
        conn: 4,
        msg: done(7),
    });
    assert!(out.contains(&Output::JobDone));
    let shut: Vec<ConnKey> = sends(&out)
        .iter()
        .filter(|(_, m)| **m == Control::Shutdown)
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(shut.len(), 4);
    let s = merge_summary(&c, 2.0);
    assert_eq!(s["examples"], 12);
    assert_eq!(s["examples_per_sec"], 6.0);
    assert_eq!(s["bytes_sent"], 20);
}

#[test]
fn late_servers_must_join_and_late_workers_take_part_from_the_next_barrier() {
    let mut c = running();
    // A server registering the old way once the job runs is refused.
    let out = register(&mut c, 10, Role::Server, None);
    assert!(matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("--join")));
    // Barrier 1 released for the two workers.
    for conn in [2, 4] {
        c.handle(Input::Message {
            conn,
            msg: Control::Barrier { seq: 1, clock: 0 },
        });
    }
    // A worker joins: the next rank, an id after the other workers'.
    let out = register(&mut c, 11, Role::Worker, None);
    let Control::Welcome { node_id, rank, .. } = sends(&out)[0].1 else {
        panic!("{out:?}")
    };
    assert_eq!((*rank, *node_id), (2, 1 + 2 + 2));
    // A taken rank is refused.
    let out = register(&mut c, 12, Role::Worker, Some(0));
    assert!(matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("taken")));
    // The joiner counts in nothing until it enters: barrier 2 is released without it.
    for conn in [2, 4] {
        c.handle(Input::Message {
            conn,
            msg: Control::Barrier { seq: 2, clock: 8 },
        });
    }
    assert_eq!(c.last_barrier, 2);
    // It asks for "the next" (seq 0): barrier 3. The others arrive there at clock 12:
    // before it is released, every server's clock gate must count the joiner from 12.
    let out = c.handle(Input::Message {
        conn: 11,
        msg: Control::Barrier { seq: 0, clock: 0 },
    });
    assert!(sends(&out).is_empty());
    c.handle(Input::Message {
        conn: 2,
        msg: Control::Barrier { seq: 3, clock: 12 },
    });
    let out = c.handle(Input::Message {
        conn: 4,
        msg: Control::Barrier { seq: 3, clock: 12 },
    });
    let enters = Control::WorkerEnters { rank: 2, clock: 12 };
    let s = sends(&out);
    assert_eq!(s.len(), 2, "{out:?}");
    assert!(s.iter().all(|(c, m)| [1, 3].contains(c) && **m == enters));
    // One server answered: still held.
    let out = c.handle(Input::Message {
        conn: 1,
        msg: Control::WorkerEntered { rank: 2 },
    });
    assert!(sends(&out).is_empty());
    assert_eq!(states(&c).iter().filter(|s| s.2 == "joining").count(), 1);
    let out = c.handle(Input::Message {
        conn: 3,
        msg: Control::WorkerEntered { rank: 2 },
    });
    let s = sends(&out);
    assert_eq!(s.len(), 3);
    assert!(s.iter().all(|(_, m)| **m
        == Control::BarrierDone {
            seq: 3,
            live: vec![0, 1, 2],
            clock: 12,
        }));
    // A joiner asking for a barrier the job is past is refused, saying so.
    let out = register(&mut c, 13, Role::Worker, None);
    assert!(matches!(sends(&out)[0].1, Control::Welcome { rank: 3, .. }));
    let out = c.handle(Input::Message {
        conn: 13,
        msg: Control::Barrier { seq: 2, clock: 0 },
    });
    assert!(
        matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("released already"))
    );
}

/// Two servers, two workers, with replacements on (wait 5 s); barriers 1 and 2 passed at
/// clock 10.
fn running_replacing() -> SchedulerCore {
    let mut c =
        running_core(SchedulerCore::new(spec(2, 2)).with_replacement(Duration::from_secs(5)));
    for seq in [1, 2] {
        for conn in [2, 4] {
            c.handle(Input::Message {
                conn,
                msg: Control::Barrier { seq, clock: 10 },
            });
        }
    }
    assert_eq!(c.last_barrier, 2);
    c
}

#[test]
fn a_failed_workers_place_is_kept_and_its_replacement_resumes_where_it_stopped() {
    let mut c = running_replacing();
    // Worker 1 (connection 4) dies: the servers are not told (its slot stays), and the
    // barrier worker 0 reaches waits.
    let out = c.handle(Input::Closed { conn: 4 });
    assert!(sends(&out).is_empty(), "{out:?}");
    assert_eq!(c.vacancies(), vec![1]);
    let out = c.handle(Input::Message {
        conn: 2,
        msg: Control::Barrier { seq: 3, clock: 20 },
    });
    assert!(sends(&out).is_empty());
    // The job does not end while a place waits.
    c.handle(Input::Message {
        conn: 2,
        msg: Control::Done {
            stats: WorkerStats::default(),
        },
    });
    assert!(!c.is_finished());
    let refused = |out: &[Output], what: &str| matches!(sends(out)[..], [(_, Control::Refused { reason })] if reason.contains(what));
    // Replacing a live worker, or a rank with no place, is refused and changes nothing.
    let out = c.handle(Input::Message {
        conn: 9,
        msg: Control::Replace { rank: 0, pid: 1 },
    });
    assert!(refused(&out, "is alive"), "{out:?}");
    let out = c.handle(Input::Message {
        conn: 9,
        msg: Control::Replace { rank: 5, pid: 1 },
    });
    assert!(refused(&out, "no place"), "{out:?}");
    assert_eq!(c.vacancies(), vec![1]);
    // A replacement: the servers are asked which clock worker 1 reached.
    let out = c.handle(Input::Message {
        conn: 10,
        msg: Control::Replace { rank: 1, pid: 2 },
    });
    let ask = Control::WorkerClock { rank: 1 };
    assert_eq!(sends(&out), vec![(1, &ask), (3, &ask)]);
    let out = c.handle(Input::Message {
        conn: 1,
        msg: Control::WorkerClockIs { rank: 1, clock: 14 },
    });
    assert!(sends(&out).is_empty());
    let out = c.handle(Input::Message {
        conn: 3,
        msg: Control::WorkerClockIs { rank: 1, clock: 13 },
    });
    // Welcomed as worker 1 with its node id, resuming after the smallest clock.
    let Control::Welcome {
        node_id,
        rank,
        resume,
        cluster,
    } = sends(&out)[0].1
    else {
        panic!("{out:?}")
    };
    assert_eq!((*rank, *node_id), (1, 1 + 2 + 1));
    assert!(cluster.replace_workers);
    assert_eq!(
        resume,
        &Some(Box::new(crate::proto::Resume {
            barrier: 2,
            live: vec![0, 1],
            barrier_clock: 10,
            clock: 13,
        }))
    );
    assert!(c.vacancies().is_empty());
    assert!(states(&c).contains(&(Role::Worker, 1, "replaced".into())));
    // Its arrival releases the barrier, with both ranks live.
    let out = c.handle(Input::Message {
        conn: 10,
        msg: Control::Barrier { seq: 3, clock: 20 },
    });
    let done = Control::BarrierDone {
        seq: 3,
        live: vec![0, 1],
        clock: 20,
    };
    assert_eq!(sends(&out), vec![(2, &done), (10, &done)]);
}

#[test]
fn a_place_nobody_takes_is_given_up_after_the_wait_and_the_others_go_on() {
    let mut c = running_replacing();
    c.handle(Input::Tick { now_ms: 1_000 });
    c.handle(Input::Closed { conn: 4 });
    c.handle(Input::Message {
        conn: 2,
        msg: Control::Barrier { seq: 3, clock: 20 },
    });
    let out = c.handle(Input::Tick { now_ms: 5_500 });
    assert!(sends(&out).is_empty(), "still within the wait");
    let out = c.handle(Input::Tick { now_ms: 6_100 });
    let gone = Control::WorkerGone { rank: 1 };
    let s = sends(&out);
    assert_eq!(s[..2], [(1, &gone), (3, &gone)], "{out:?}");
    assert_eq!(
        s[2..],
        [(
            2,
            &Control::BarrierDone {
                seq: 3,
                live: vec![0],
                clock: 20,
            }
        )]
    );
    // Too late now.
    let out = c.handle(Input::Message {
        conn: 10,
        msg: Control::Replace { rank: 1, pid: 2 },
    });
    assert!(matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("no place")));
}

#[test]
fn a_replacement_is_refused_when_the_job_keeps_no_places() {
    let mut c = running();
    c.handle(Input::Closed { conn: 4 });
    let out = c.handle(Input::Message {
        conn: 10,
        msg: Control::Replace { rank: 1, pid: 2 },
    });
    assert!(
        matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("--replace-failed-workers"))
    );
}

#[test]
fn a_worker_asked_to_leave_finishes_its_clock_and_is_retired_at_once() {
    let mut c = running();
    let out = c.handle(Input::Message {
        conn: 20,
        msg: Control::WorkerLeave { rank: 0 },
    });
    assert!(matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("worker 0")));
    let out = c.handle(Input::Message {
        conn: 20,
        msg: Control::WorkerLeave { rank: 7 },
    });
    assert!(
        matches!(sends(&out)[0].1, Control::Refused { reason } if reason.contains("not running"))
    );
    let out = c.handle(Input::Message {
        conn: 20,
        msg: Control::WorkerLeave { rank: 1 },
    });
    let s = sends(&out);
    assert_eq!(s[0], (4, &Control::PleaseLeave));
    assert!(matches!(s[1], (20, Control::Log { .. })));
    // Worker 0 waits at a barrier; worker 1 says it leaves after clock 7: the servers
    // retire it at once and the barrier goes on without it.
    c.handle(Input::Message {
        conn: 2,
        msg: Control::Barrier { seq: 1, clock: 9 },
    });
    let out = c.handle(Input::Message {
        conn: 4,
        msg: Control::Leaving { clock: 7 },
    });
    let gone = Control::WorkerGone { rank: 1 };
    let s = sends(&out);
    assert_eq!(s[..2], [(1, &gone), (3, &gone)], "{out:?}");
    assert_eq!(
        s[2..],
        [(
            2,
            &Control::BarrierDone {
                seq: 1,
                live: vec![0],
                clock: 9,
            }
        )]
    );
    // Its connection closing later is no failure.
    let out = c.handle(Input::Closed { conn: 4 });
    assert!(sends(&out)
        .iter()
        .all(|(_, m)| !matches!(m, Control::BarrierDone { .. })));
    assert!(states(&c).contains(&(Role::Worker, 1, "gone".into())));
}

fn heartbeat(c: &mut SchedulerCore, conn: ConnKey, now_ms: u64) -> Vec<Output> {
    let mut out = c.handle(Input::Tick { now_ms });
    out.extend(c.handle(Input::Message {
        conn,
        msg: Control::Heartbeat,
    }));
    out
}

fn states(c: &SchedulerCore) -> Vec<(Role, u32, String)> {
    c.status()
        .nodes
        .into_iter()
        .map(|n| (n.role, n.rank, n.state))
        .collect()
}

#[test]
fn heartbeats_keep_servers_live_and_silence_makes_them_dead() {
    let mut c = running().with_heartbeat_timeout(Duration::from_millis(1000));
    // Both servers beat for a while: live.
    for t in (0..3000).step_by(300) {
        heartbeat(&mut c, 1, t);
        heartbeat(&mut c, 3, t);
    }
    assert!(
        states(&c).iter().all(|(_, _, s)| s == "live"),
        "{:?}",
        states(&c)
    );
    // Server on conn 3 falls silent after its beat at 2700: dead once the timeout
    // passes (after 3700), not before.
    for t in (3000..3700).step_by(300) {
        heartbeat(&mut c, 1, t);
    }
    c.handle(Input::Tick { now_ms: 3700 });
    assert!(states(&c).iter().all(|(_, _, s)| s == "live"));
    let out = heartbeat(&mut c, 1, 3800);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Log(l) if l.contains("presumed dead"))),
        "{out:?}"
    );
    let dead: Vec<_> = states(&c)
        .into_iter()
        .filter(|(_, _, s)| s == "dead")
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    // It comes back: live again.
    heartbeat(&mut c, 3, 4500);
    assert!(states(&c).iter().all(|(_, _, s)| s == "live"));
}

#[test]
fn a_heartbeat_from_an_unknown_node_is_refused_and_changes_nothing() {
    let mut c = running();
    let before = c.status();
    for (conn, why) in [(99, "unknown connection"), (2, "a worker, not a server")] {
        let out = c.handle(Input::Message {
            conn,
            msg: Control::Heartbeat,
        });
        let sent = sends(&out);
        assert!(
            matches!(sent.as_slice(), [(to, Control::Refused { reason })]
                if *to == conn && reason.contains("heartbeat from an unknown node")),
            "{why}: {out:?}"
        );
    }
    assert_eq!(c.status(), before);
}

#[test]
fn status_reports_the_routing_table_and_every_node() {
    let mut c = running();
    let out = c.handle(Input::Message {
        conn: 77,
        msg: Control::StatusRequest,
    });
    let [(77, Control::Status { report })] = sends(&out).as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(report.epoch, 1);
    assert_eq!(report.ranges.len(), 2);
    assert_eq!(report.ranges[0].range.begin, 0);
    assert_eq!(report.ranges[1].range.end, crate::base::keys::KEY_END);
    assert_eq!(report.ranges[1].chain, vec![1]);
    assert_eq!(report.nodes.len(), 4);
    assert!(report.running && !report.finished);
    let text = crate::cli::status::render(report);
    assert!(text.contains("routing table epoch 1"), "{text}");
    assert!(text.contains("server 1 at 127.0.0.1:"), "{text}");
    assert!(
        text.contains("replication lag: no server reported yet"),
        "{text}"
    );
}

#[test]
fn a_worker_that_registers_while_the_servers_set_up_joins_once_the_job_runs() {
    let mut c = SchedulerCore::new(spec(1, 1));
    register(&mut c, 1, Role::Server, None);
    let out = register(&mut c, 2, Role::Worker, None);
    assert_eq!(sends(&out).len(), 1, "the server gets the table");
    // A worker beyond the spec, before the server is ready: not refused, not welcomed.
    let out = register(&mut c, 3, Role::Worker, None);
    assert!(sends(&out).is_empty(), "{out:?}");
    // Another one that goes away before the job runs is forgotten.
    register(&mut c, 4, Role::Worker, None);
    c.handle(Input::Closed { conn: 4 });
    let out = c.handle(Input::Message {
        conn: 1,
        msg: Control::Ready,
    });
    let mut welcomed: Vec<(ConnKey, u32)> = sends(&out)
        .into_iter()
        .filter_map(|(conn, m)| match m {
            Control::Welcome { rank, .. } => Some((conn, *rank)),
            _ => None,
        })
        .collect();
    welcomed.sort_unstable();
    assert_eq!(
        welcomed,
        vec![(2, 0), (3, 1)],
        "the early worker joins as worker 1"
    );
    assert!(c.is_running());
}

fn barrier_of_both(c: &mut SchedulerCore, seq: u64) -> Vec<Output> {
    let mut out = Vec::new();
    for conn in [2, 4] {
        out.extend(c.handle(Input::Message {
            conn,
            msg: Control::Barrier { seq, clock: 0 },
        }));
    }
    out
}

/// The barriers released (to every worker) by `out`.
fn released(out: &[Output]) -> Vec<u64> {
    let done: Vec<(ConnKey, u64)> = sends(out)
        .into_iter()
        .filter_map(|(c, m)| match m {
            Control::BarrierDone { seq, .. } => Some((c, *seq)),
            _ => None,
        })
        .collect();
    let seqs: BTreeSet<u64> = done.iter().map(|d| d.1).collect();
    for s in &seqs {
        let to: BTreeSet<ConnKey> = done.iter().filter(|d| d.1 == *s).map(|d| d.0).collect();
        assert_eq!(
            to,
            BTreeSet::from([2, 4]),
            "barrier {s} released to both workers"
        );
    }
    seqs.into_iter().collect()
}

fn written(c: &mut SchedulerCore, conn: ConnKey, rank: u32, epoch: u64) -> Vec<Output> {
    c.handle(Input::Message {
        conn,
        msg: Control::CheckpointWritten {
            epoch,
            file: crate::checkpoint::FileEntry {
                rank,
                name: format!("server-{rank}.ckpt"),
                bytes: 64,
                checksum: 7,
                keys: 1,
                state_len: 0,
            },
        },
    })
}

fn logs(out: &[Output]) -> String {
    out.iter()
        .filter_map(|o| match o {
            Output::Log(l) => Some(l.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_checkpoint_holds_its_epoch_barrier_until_every_file_and_the_manifest_are_written() {
    use crate::checkpoint::Every;
    let mut c = running().with_checkpoints(super::CheckpointPlan {
        every: Some(Every::Epochs(1)),
        dir: Some("/ck".into()),
        restored_epoch: 4,
        restored_job: None,
    });
    // The end of an epoch's training (odd): released at once.
    assert_eq!(released(&barrier_of_both(&mut c, 1)), vec![1]);
    // The end of the epoch: held; both heads are asked to write.
    let out = barrier_of_both(&mut c, 2);
    assert!(released(&out).is_empty(), "{out:?}");
    let mut asked: Vec<ConnKey> = sends(&out)
        .into_iter()
        .filter(|(_, m)| {
            **m == Control::CheckpointWrite {
                dir: "/ck/epoch-5".into(),
                epoch: 5,
            }
        })
        .map(|(c, _)| c)
        .collect();
    asked.sort_unstable();
    assert_eq!(asked, vec![1, 3], "{out:?}");
    let out = written(&mut c, 3, 0, 5);
    assert!(out.is_empty(), "{out:?}");
    // The last file: the manifest is to be written; the barrier still waits for it.
    let out = written(&mut c, 1, 1, 5);
    assert!(released(&out).is_empty());
    let [Output::WriteCheckpoint { root, manifest }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(root, &std::path::PathBuf::from("/ck"));
    assert_eq!((manifest.epoch, manifest.files.len()), (5, 2));
    assert_eq!(manifest.partition, *c.table());
    let out = c.handle(Input::CheckpointCommitted {
        epoch: 5,
        result: Ok("/ck/epoch-5".into()),
    });
    assert_eq!(released(&out), vec![2]);
    assert_eq!(c.checkpoints_written(), &[5]);

    // A server that cannot write: the checkpoint is given up, the barrier released.
    barrier_of_both(&mut c, 3);
    assert!(released(&barrier_of_both(&mut c, 4)).is_empty());
    written(&mut c, 3, 0, 6);
    let out = c.handle(Input::Message {
        conn: 1,
        msg: Control::CheckpointFailed {
            epoch: 6,
            reason: "disk full".into(),
        },
    });
    assert_eq!(released(&out), vec![4]);
    assert!(logs(&out).contains("server 1 could not write its file: disk full"));

    // A server that does not answer: given up after the bound, naming it.
    barrier_of_both(&mut c, 5);
    assert!(released(&barrier_of_both(&mut c, 6)).is_empty());
    written(&mut c, 3, 0, 7);
    let mut out = Vec::new();
    let mut now = 0;
    while released(&out).is_empty() {
        now += 1000;
        assert!(now < 120_000, "never given up");
        // Heartbeats keep both servers alive meanwhile.
        for conn in [1, 3] {
            c.handle(Input::Message {
                conn,
                msg: Control::Heartbeat,
            });
        }
        out = c.handle(Input::Tick { now_ms: now });
    }
    assert!(
        logs(&out).contains("servers {1} did not write their files within 60 s"),
        "{}",
        logs(&out)
    );
    assert_eq!(c.checkpoints_written(), &[5]);
}

#[test]
fn pserv_checkpoint_is_answered_once_the_checkpoint_is_written() {
    let mut c = running();
    let ask = |c: &mut SchedulerCore, dir: &str| {
        c.handle(Input::Message {
            conn: 9,
            msg: Control::CheckpointRequest { dir: dir.into() },
        })
    };
    let out = ask(&mut c, "relative/dir");
    assert!(matches!(sends(&out)[..], [(9, Control::Refused { .. })]));
    assert!(sends(&ask(&mut c, "/asked")).is_empty());
    // No checkpoint flags: only the request makes one, at the next epoch barrier.
    assert_eq!(released(&barrier_of_both(&mut c, 1)), vec![1]);
    assert!(released(&barrier_of_both(&mut c, 2)).is_empty());
    written(&mut c, 1, 1, 1);
    written(&mut c, 3, 0, 1);
    let out = c.handle(Input::CheckpointCommitted {
        epoch: 1,
        result: Ok("/asked/epoch-1".into()),
    });
    assert_eq!(released(&out), vec![2]);
    assert!(sends(&out)
        .iter()
        .any(|(c, m)| *c == 9
            && matches!(m, Control::Log { line } if line.contains("/asked/epoch-1"))));
    // The next epoch barrier takes none.
    barrier_of_both(&mut c, 3);
    assert_eq!(released(&barrier_of_both(&mut c, 4)), vec![4]);
}

#[test]
fn checkpoints_every_n_seconds_wait_for_the_first_epoch_barrier_after_n_seconds() {
    let mut c = running().with_checkpoints(super::CheckpointPlan {
        every: Some(crate::checkpoint::Every::Secs(5)),
        dir: Some("/ck".into()),
        restored_epoch: 0,
        restored_job: None,
    });
    // Time passes in steps the servers' heartbeats keep up with.
    let mut now = 0;
    let mut tick = |c: &mut SchedulerCore, to: u64| {
        while now < to {
            now = (now + 500).min(to);
            for conn in [1, 3] {
                c.handle(Input::Message {
                    conn,
                    msg: Control::Heartbeat,
                });
            }
            c.handle(Input::Tick { now_ms: now });
        }
    };
    tick(&mut c, 1000);
    barrier_of_both(&mut c, 1);
    assert_eq!(
        released(&barrier_of_both(&mut c, 2)),
        vec![2],
        "1 s in: not yet"
    );
    tick(&mut c, 5500);
    // Odd barriers (the end of training, before evaluation) never take one.
    assert_eq!(released(&barrier_of_both(&mut c, 3)), vec![3]);
    assert!(
        released(&barrier_of_both(&mut c, 4)).is_empty(),
        "5.5 s in: due"
    );
    written(&mut c, 1, 1, 2);
    let out = written(&mut c, 3, 0, 2);
    assert!(
        matches!(out[..], [Output::WriteCheckpoint { .. }]),
        "{out:?}"
    );
    let out = c.handle(Input::CheckpointCommitted {
        epoch: 2,
        result: Ok("/ck/epoch-2".into()),
    });
    assert_eq!(released(&out), vec![4]);
    // The next is due 5 s after this one.
    tick(&mut c, 9000);
    barrier_of_both(&mut c, 5);
    assert_eq!(released(&barrier_of_both(&mut c, 6)), vec![6]);
    assert_eq!(c.checkpoints_written(), &[2]);
}

#[test]
fn a_request_into_another_folder_and_the_periodic_checkpoint_both_take_one_at_a_barrier() {
    let mut c = running().with_checkpoints(super::CheckpointPlan {
        every: Some(crate::checkpoint::Every::Epochs(1)),
        dir: Some("/every".into()),
        restored_epoch: 0,
        restored_job: None,
    });
    c.handle(Input::Message {
        conn: 9,
        msg: Control::CheckpointRequest {
            dir: "/asked".into(),
        },
    });
    barrier_of_both(&mut c, 1);
    let mut dirs = Vec::new();
    let mut out = barrier_of_both(&mut c, 2);
    for _ in 0..2 {
        assert!(released(&out).is_empty(), "{out:?}");
        let dir = sends(&out)
            .into_iter()
            .find_map(|(_, m)| match m {
                Control::CheckpointWrite { dir, .. } => Some(dir.clone()),
                _ => None,
            })
            .expect("servers asked to write");
        dirs.push(dir.clone());
        written(&mut c, 1, 1, 1);
        let done = written(&mut c, 3, 0, 1);
        let [Output::WriteCheckpoint { root, .. }] = &done[..] else {
            panic!("{done:?}")
        };
        out = c.handle(Input::CheckpointCommitted {
            epoch: 1,
            result: Ok(root.join("epoch-1")),
        });
    }
    assert_eq!(dirs, ["/asked/epoch-1", "/every/epoch-1"]);
    assert_eq!(released(&out), vec![2]);
    assert_eq!(c.checkpoints_written(), &[1]);
}
