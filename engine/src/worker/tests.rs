//! Unit tests: splitting and resplitting requests, resends, and settling answers.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use pserv_transport::wire::{Header, MessageKind, FLAG_RANGE};
use pserv_transport::{OwnedFrame, RecvFrame};

use crate::base::error::EngineError;
use crate::base::keys::{Key, KeyRange};
use crate::placement::Partition;
use crate::proto::{request_timestamp, segment_of, task_of, Status, MAX_SEGMENTS};

use super::request::{split_key_runs, split_range_runs, Request};
use super::retry::{Failure, RETRY_DELAY};
use super::state::Core;
use super::tasks::{completed_here_notices, Outcome, SegState, Segment, Task, TaskState};
use super::{Pulled, Shared};
use crate::placement::ring::Ring;
use crate::proto::TASK_BITS;
use pserv_transport::wire::DType;
use pserv_transport::{BufPool, Frame};

/// Three servers, 8 virtual nodes each (epoch 1), and the table after server 1 left
/// (epoch 2).
fn tables() -> (Partition, Partition) {
    let ring = Ring::new(&[0, 1, 2], 8);
    let after = ring.remove_server(1);
    (
        Partition::from_ring_chains(&ring, 3, 0),
        Partition::from_ring_chains(&after, 3, 0),
    )
}

/// All of `n` keys as runs.
fn req_all(n: usize) -> Vec<Range<usize>> {
    std::iter::once(0..n).collect()
}

/// Keys spread over the whole key space.
fn spread(n: u64) -> Vec<Key> {
    (0..n).map(|i| i * (u64::MAX / n)).collect()
}

/// A received frame holding `values`, answering `request`.
fn answer(request: &Header, values: &[f32]) -> OwnedFrame {
    let mut h = *request;
    h.flags = pserv_transport::wire::FLAG_RESPONSE;
    h.dtype = DType::F32 as u8;
    let bytes = pserv_transport::wire::encode(&h, &[], bytemuck::cast_slice(values));
    let mut buf = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(&bytes);
    let (frame, _) = Frame::new_checked(bytemuck::cast_slice(&buf), 1 << 20).unwrap();
    let pool = BufPool::new(4);
    RecvFrame::Borrowed { frame, pool: &pool }.into_owned()
}

fn pull_header() -> Header {
    let mut h = Header::new(MessageKind::Pull, 7, 0);
    h.dtype = DType::F32 as u8;
    h.value_len = 1;
    h
}

fn task_state(request: Request, segments: Vec<Segment>) -> TaskState {
    TaskState {
        noticed: Vec::new(),
        segments,
        error: None,
        waiter: None,
        keeps_values: true,
        dtype: DType::F32 as u8,
        request: Some(Arc::new(request)),
        started: true,
    }
}

/// Answer every sent segment of a pull of `keys` with the keys themselves as values.
fn answer_all(st: &mut TaskState, keys: &[Key], headers: &HashMap<usize, Header>) {
    for (i, s) in st.segments.iter_mut().enumerate() {
        if matches!(s.state, SegState::Sent) {
            let vals: Vec<f32> = s
                .runs
                .iter()
                .flat_map(|r| keys[r.clone()].iter().map(|&k| k as f32))
                .collect();
            s.part = Some(answer(&headers[&i], &vals));
            s.state = SegState::Done;
        }
    }
}

#[test]
fn request_timestamps_carry_task_and_segment() {
    for (ts, seg) in [
        (1u64, 0usize),
        (42, 3),
        ((1 << TASK_BITS) - 1, MAX_SEGMENTS - 1),
    ] {
        for origin in [0, seg.min(MAX_SEGMENTS - 2), MAX_SEGMENTS - 2] {
            let stamp = request_timestamp(ts, seg, origin);
            assert_eq!((task_of(stamp), segment_of(stamp)), (ts, seg));
            assert_eq!(crate::proto::origin_of(stamp), origin + 1);
            // The piece's identity does not depend on the segment it travels in.
            assert_eq!(
                crate::proto::push_id(stamp),
                crate::proto::push_id(request_timestamp(ts, 0, origin))
            );
        }
    }
    assert_ne!(
        crate::proto::push_id(request_timestamp(9, 0, 0)),
        crate::proto::push_id(request_timestamp(9, 0, 1))
    );
}

#[test]
fn resplitting_failed_keys_covers_exactly_them_grouped_by_new_owner() {
    let (old, new) = tables();
    let keys = spread(500);
    let first = split_key_runs(&old, &keys, &req_all(keys.len()));
    assert_eq!(
        first.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let failed = first[1].1.clone();
    assert!(failed.len() > 1, "server 1 owns several runs: {failed:?}");
    let again = split_key_runs(&new, &keys, &failed);
    let servers: Vec<u32> = again.iter().map(|(s, _)| *s).collect();
    assert!(!servers.contains(&1), "{servers:?}");
    assert!(
        servers.windows(2).all(|w| w[0] < w[1]),
        "one group per server, in order"
    );
    let mut covered = Vec::new();
    for (server, runs) in &again {
        assert!(runs.windows(2).all(|w| w[0].end < w[1].start), "{runs:?}");
        for r in runs {
            assert!(new.owns_keys(*server as usize, &keys[r.clone()]));
            covered.extend(r.clone());
        }
    }
    covered.sort_unstable();
    let want: Vec<usize> = failed.iter().flat_map(|r| r.clone()).collect();
    assert_eq!(covered, want);
}

#[test]
fn resplitting_a_failed_range_part_covers_exactly_it() {
    let (old, new) = tables();
    let range = KeyRange::new(1000, u64::MAX - 1000);
    let first = split_range_runs(&old, range, &req_all(range.len() as usize));
    let (_, failed) = first.iter().find(|(s, _)| *s == 1).unwrap().clone();
    assert_eq!(failed.len(), 1);
    let again = split_range_runs(&new, range, &failed);
    assert!(!again.is_empty());
    let mut at = failed[0].start;
    for (server, runs) in &again {
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].start, at, "in key order, without gaps");
        at = runs[0].end;
        let part = KeyRange::new(
            range.begin + runs[0].start as u64,
            range.begin + runs[0].end as u64,
        );
        assert!(new.owns(*server as usize, &part));
    }
    assert_eq!(at, failed[0].end);
}

#[test]
fn clocked_requests_reach_every_listed_server() {
    let (old, _) = tables();
    let keys: Shared<Key> = vec![5u64].into();
    let owner = old.server_of(5) as u32;
    let req = Request::keyed::<f32>(pull_header(), 1, true, keys, None);
    let plan = req.first_plan(&old, &[0, 1, 2]);
    assert_eq!(
        plan.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for (s, runs) in plan {
        assert_eq!(runs.is_empty(), s != owner);
    }
    // A range request: every server also gets a closing empty message, after its
    // ranges.
    let (lo, hi) = (old.ranges()[0].begin, old.ranges()[1].end);
    let req = Request::ranged::<f32>(pull_header(), 1, true, KeyRange::new(lo, hi), None);
    let plan = req.first_plan(&old, &[0, 1, 2]);
    for s in 0..3u32 {
        let mine: Vec<&Vec<Range<usize>>> = plan
            .iter()
            .filter(|(p, _)| *p == s)
            .map(|(_, r)| r)
            .collect();
        assert!(mine.last().unwrap().is_empty(), "server {s}: {mine:?}");
        assert!(mine[..mine.len() - 1].iter().all(|r| !r.is_empty()));
    }
    assert_eq!(plan.iter().filter(|(_, r)| r.is_empty()).count(), 3);
    assert!(plan.len() > 3);
}

#[test]
fn a_lost_segment_is_resent_by_the_new_table_and_the_pull_scatters_in_key_order() {
    let (old, new) = tables();
    let keys = spread(300);
    let shared: Shared<Key> = keys.clone().into();
    let req = Request::keyed::<f32>(pull_header(), 1, false, shared, None);
    let plan = req.first_plan(&old, &[]);
    let (segments, frames) = req.messages(&old, 5, 0, plan);
    let mut headers: HashMap<usize, Header> = frames
        .iter()
        .map(|(_, f)| (segment_of(f.header().timestamp), *f.header()))
        .collect();
    let mut st = task_state(req, segments);
    let t0 = Instant::now();
    st.park(1, Failure::Disconnected { server: 1 }, t0);
    let timeout = Duration::from_secs(60);
    // Same table: nothing to do yet.
    let r = st.resend_due(5, &old, t0, timeout, &|_| true);
    assert!(r.waiting && r.added == 0 && r.closed == 0);
    // A newer table: server 1's keys go to the others.
    let r = st.resend_due(5, &new, t0, timeout, &|_| true);
    assert!(!r.waiting);
    assert_eq!(r.closed, 1);
    assert_eq!(r.added, r.sends.len());
    assert_eq!(st.segments.len(), 3 + r.added);
    for (server, frame) in &r.sends {
        let h = frame.header();
        let seg = segment_of(h.timestamp);
        assert_eq!(task_of(h.timestamp), 5);
        assert!(seg >= 3);
        assert_eq!(st.segments[seg].server, *server);
        assert_eq!(u64::from(h.epoch), new.epoch());
        assert_eq!(st.segments[seg].epoch, new.epoch());
        assert_eq!(st.segments[seg].failed_at, Some(t0));
        // The message holds the keys of its runs, gathered.
        let want: Vec<Key> = st.segments[seg]
            .runs
            .iter()
            .flat_map(|r| keys[r.clone()].iter().copied())
            .collect();
        assert_eq!(h.key_count as usize, want.len());
        let (kp, _) = (st.request.as_ref().unwrap().body)(&st.segments[seg].runs);
        assert_eq!(bytemuck::cast_slice::<u8, Key>(kp.bytes()), &want[..]);
        headers.insert(seg, *h);
    }
    let replaced = &st.segments[1];
    assert!(matches!(replaced.state, SegState::Done));
    assert!(replaced.runs.is_empty() && replaced.part.is_none());
    answer_all(&mut st, &keys, &headers);
    let pulled: Pulled<f32> = Pulled {
        parts: st.take_answers(),
        _t: PhantomData,
    };
    let want: Vec<f32> = keys.iter().map(|&k| k as f32).collect();
    assert_eq!(pulled.to_vec(), want);
}

#[test]
fn a_range_part_refused_as_stale_is_resent_as_ranges() {
    let (old, new) = tables();
    let range = KeyRange::new(0, 3000);
    let vals: Vec<f32> = (0..3000).map(|i| i as f32).collect();
    let mut h = Header::new(MessageKind::Push, 7, 0);
    h.dtype = DType::F32 as u8;
    h.value_len = 1;
    let req = Request::ranged::<f32>(h, 1, false, range, Some(vals.clone().into()));
    // One table routes the whole small range to one server; the new table may too.
    let plan = req.first_plan(&old, &[]);
    let (segments, _) = req.messages(&old, 9, 0, plan);
    let n = segments.len();
    let mut st = task_state(req, segments);
    let t0 = Instant::now();
    let failure = Failure::Refused {
        server: st.segments[0].server,
        status: Status::StaleEpoch,
        message: "stale".into(),
    };
    st.park(0, failure, t0);
    let r = st.resend_due(9, &new, t0, Duration::from_secs(60), &|_| true);
    assert_eq!((r.closed, r.added), (1, r.sends.len()));
    for (server, frame) in &r.sends {
        let seg = segment_of(frame.header().timestamp);
        assert!(seg >= n);
        assert_ne!(frame.header().flags & FLAG_RANGE, 0);
        let runs = st.segments[seg].runs.clone();
        let (kp, vp) = (st.request.as_ref().unwrap().body)(&runs);
        let kr: &[u64] = bytemuck::cast_slice(kp.bytes());
        let part = KeyRange::new(kr[0], kr[1]);
        assert!(new.owns(*server as usize, &part));
        assert_eq!(part.begin, runs[0].start as u64);
        let v: &[f32] = bytemuck::cast_slice(vp.bytes());
        assert_eq!(v, &vals[runs[0].clone()]);
    }
}

#[test]
fn stale_refusals_under_the_same_table_are_resent_after_a_delay() {
    let (old, _) = tables();
    let keys: Shared<Key> = vec![5u64, 6].into();
    let req = Request::keyed::<f32>(pull_header(), 1, false, keys, None);
    let plan = req.first_plan(&old, &[]);
    let (segments, _) = req.messages(&old, 3, 0, plan);
    let mut st = task_state(req, segments);
    let server = st.segments[0].server;
    let t0 = Instant::now();
    let stale = || Failure::Refused {
        server,
        status: Status::StaleEpoch,
        message: "behind".into(),
    };
    st.park(0, stale(), t0);
    let timeout = Duration::from_secs(60);
    let r = st.resend_due(3, &old, t0, timeout, &|_| true);
    assert!(r.waiting && r.sends.is_empty());
    let later = t0 + RETRY_DELAY;
    let r = st.resend_due(3, &old, later, timeout, &|_| true);
    assert_eq!((r.closed, r.added), (1, 1));
    assert_eq!(r.sends[0].0, server);
    assert_eq!(st.segments[1].runs, vec![0..2]);
    assert_eq!(st.segments[1].attempt, 1);
    // Refused again: the next delay is longer.
    st.park(1, stale(), later);
    let r = st.resend_due(3, &old, later + RETRY_DELAY, timeout, &|_| true);
    assert!(r.waiting && r.sends.is_empty());
    let r = st.resend_due(3, &old, later + RETRY_DELAY * 2, timeout, &|_| true);
    assert_eq!(r.added, 1);
    // And after the timeout since the first failure, the task fails with it.
    st.park(2, stale(), later + RETRY_DELAY * 2);
    let r = st.resend_due(3, &old, t0 + timeout, timeout, &|_| true);
    assert_eq!((r.closed, r.added, r.waiting), (1, 0, false));
    assert!(matches!(
        st.error,
        Some(EngineError::Server {
            status: Status::StaleEpoch,
            ..
        })
    ));
}

#[test]
fn clock_only_segments_are_dropped_when_their_server_is_gone() {
    let (old, new) = tables();
    let keys: Shared<Key> = vec![5u64].into();
    let owner = old.server_of(5) as u32;
    let req = Request::keyed::<f32>(pull_header(), 1, true, keys, None);
    let plan = req.first_plan(&old, &[0, 1, 2]);
    let (segments, _) = req.messages(&old, 4, 0, plan);
    let mut st = task_state(req, segments);
    let t0 = Instant::now();
    let empty: Vec<usize> = (0..3).filter(|&i| i as u32 != owner).collect();
    // One keyless segment lost with its server, one refused as stale by a live one.
    st.park(
        empty[0],
        Failure::Disconnected {
            server: empty[0] as u32,
        },
        t0,
    );
    st.park(
        empty[1],
        Failure::Refused {
            server: empty[1] as u32,
            status: Status::StaleEpoch,
            message: String::new(),
        },
        t0,
    );
    let gone = empty[0] as u32;
    let alive = move |s: u32| s != gone;
    let table = if gone == 1 { &new } else { &old };
    let r = st.resend_due(4, table, t0 + RETRY_DELAY, Duration::from_secs(60), &alive);
    assert_eq!(r.closed, 2);
    assert_eq!(r.sends.len(), 1);
    assert_eq!(r.sends[0].0, empty[1] as u32);
    assert_eq!(r.sends[0].1.header().key_count, 0);
    assert!(st.error.is_none());
}

#[test]
fn answers_settle_their_segment_and_only_newer_tables_install() {
    let (old, new) = tables();
    let (tx, _rx) = crossbeam_channel::unbounded();
    let (wtx, _wrx) = crossbeam_channel::unbounded();
    let core = Core::new(tx, wtx, Duration::from_secs(60));
    assert!(core.install(old.clone()));
    assert!(!core.install(old.clone()));
    let keys = spread(30);
    let req = Request::keyed::<f32>(pull_header(), 1, false, keys.clone().into(), None);
    let plan = req.first_plan(&old, &[]);
    let (segments, frames) = req.messages(&old, 1, 0, plan);
    let n = segments.len();
    let task = Arc::new(Task {
        remaining: AtomicUsize::new(n),
        state: Mutex::new(task_state(req, segments)),
    });
    core.tasks.lock().insert(1, task.clone());
    // An answer naming the wrong server for its segment is dropped.
    let stamp = frames[0].1.header().timestamp;
    core.settle(stamp, frames[0].0 + 1, |_, _| Outcome::Done);
    assert_eq!(task.remaining.load(Ordering::Acquire), n);
    // A stale refusal parks the segment for a resend.
    let failure = Failure::Refused {
        server: frames[0].0,
        status: Status::StaleEpoch,
        message: String::new(),
    };
    core.settle(stamp, frames[0].0, |_, _| Outcome::Retry(failure));
    assert!(core.retrying.lock().contains(&1));
    assert_eq!(task.remaining.load(Ordering::Acquire), n);
    // A newer table: the segment is resent; without a connection to its server it
    // waits again (as for a server not connected yet), now routed with the new epoch.
    assert!(core.install(new.clone()));
    assert_eq!(core.table().epoch(), new.epoch());
    core.retry_pass();
    let st = task.state.lock();
    assert!(st.segments.len() > n);
    assert!(matches!(st.segments[0].state, SegState::Done));
    for s in &st.segments[n..] {
        assert_eq!(s.epoch, new.epoch());
        assert!(matches!(
            s.state,
            SegState::Waiting {
                failure: Failure::Refused {
                    status: Status::StaleEpoch,
                    ..
                },
                ..
            }
        ));
    }
    assert_eq!(
        task.remaining.load(Ordering::Acquire),
        n - 1 + st.segments.len() - n
    );
}

/// A sequential push whose server-1 keys were resent to the others: each head hears
/// `CompletedHere` once none of its keys of the task is unacknowledged, once per epoch,
/// and not before; a push with nothing resent, or not sequential, sends none.
#[test]
fn completed_here_goes_to_each_head_once_its_keys_are_acknowledged() {
    use crate::proto::Control;
    use pserv_transport::wire::FLAG_ORDERED;
    let (old, new) = tables();
    let keys = spread(300);
    let mut h = Header::new(MessageKind::Push, 7, 0);
    h.dtype = DType::F32 as u8;
    h.value_len = 1;
    h.clock = 4;
    h.flags |= FLAG_ORDERED;
    let values: Shared<f32> = vec![1.0f32; keys.len()].into();
    let req = Request::keyed::<f32>(h, 1, true, keys.clone().into(), Some(values));
    let plan = req.first_plan(&old, &[0, 1, 2]);
    let (segments, _) = req.messages(&old, 5, 0, plan);
    let mut st = task_state(req, segments);
    assert!(
        completed_here_notices(&mut st, &new).is_empty(),
        "nothing resent: the first messages moved the clocks"
    );
    let t0 = Instant::now();
    st.park(1, Failure::Disconnected { server: 1 }, t0);
    let r = st.resend_due(5, &new, t0, Duration::from_secs(60), &|_| true);
    let resent: Vec<u32> = r.sends.iter().map(|(s, _)| *s).collect();
    assert_eq!(resent, vec![0, 2], "server 1's keys went to both others");
    // Server 0's first message is answered: server 0 still waits for a resent piece.
    st.segments[0].state = SegState::Done;
    assert!(completed_here_notices(&mut st, &new).is_empty());
    // Its resent piece is answered too: server 0 (only) hears it, once.
    let to0 = st.segments.iter().rposition(|s| s.server == 0).unwrap();
    st.segments[to0].state = SegState::Done;
    let n = completed_here_notices(&mut st, &new);
    assert_eq!(
        n,
        vec![(
            0,
            Control::CompletedHere {
                clock: 4,
                epoch: new.epoch()
            }
        )]
    );
    assert!(completed_here_notices(&mut st, &new).is_empty(), "once");
    // Not sequential: nothing.
    st.noticed.clear();
    let mut plain = st.request.take().unwrap().header;
    plain.flags &= !FLAG_ORDERED;
    let keys2: Shared<Key> = keys.clone().into();
    st.request = Some(Arc::new(Request::keyed::<f32>(plain, 1, true, keys2, None)));
    assert!(completed_here_notices(&mut st, &new).is_empty());
}
