//! Whole-cluster tests: a real scheduler and real server processes on 127.0.0.1; workers
//! are in-test `Worker`s (each with its own transport and sockets).

mod common;

use std::io::Write;
use std::time::Duration;

use common::Cluster;
use pserv_engine::keys::KeyRange;
use pserv_engine::proto::Status;
use pserv_engine::worker::Worker;
use pserv_engine::EngineError;

fn worker(c: &Cluster, rank: u32) -> Worker {
    common::worker(c, rank, Duration::from_secs(60))
}

fn workers(c: &Cluster, n: u32) -> Vec<Worker> {
    common::workers(c, n, Duration::from_secs(60))
}

fn spread_keys(n: u64) -> Vec<u64> {
    common::spread_keys(n, 7)
}

#[test]
fn push_then_pull_returns_the_sum_over_workers() {
    let mut c = Cluster::start(3, 3, &["--update=sum"]);
    let ws = workers(&c, 3);
    let keys = spread_keys(3000);
    std::thread::scope(|s| {
        for w in &ws {
            let keys = keys.clone();
            s.spawn(move || {
                let r = w.rank() as f32 + 1.0;
                // Many pushes in flight, then wait for them all.
                let tss: Vec<_> = (0..20)
                    .map(|i| {
                        let vals: Vec<f32> = keys
                            .iter()
                            .map(|&k| r * ((k % 7) as f32 + i as f32))
                            .collect();
                        w.push(keys.clone(), vals)
                    })
                    .collect();
                for ts in tss {
                    w.wait(ts).unwrap();
                }
                w.barrier().unwrap();
            });
        }
    });
    // Sum over workers r = 1..=3 and pushes i = 0..20 of r * (k%7 + i) = 6 * (20*(k%7) + 190).
    let ts = ws[0].pull::<f32>(keys.clone());
    let got = ws[0].wait_pull::<f32>(ts).unwrap().to_vec();
    for (k, v) in keys.iter().zip(&got) {
        assert_eq!(*v, 6.0 * (20.0 * (k % 7) as f32 + 190.0), "key {k}");
    }
    // The pull went to all three servers: one segment each.
    assert_eq!(
        ws[0]
            .wait_pull::<f32>(ws[0].pull::<f32>(keys.clone()))
            .unwrap()
            .segments()
            .count(),
        3
    );
    for w in ws {
        w.finish(0).unwrap();
    }
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn ranges_span_servers_and_round_trip() {
    let mut c = Cluster::start(2, 1, &["--update=assign", "--value-len=4"]);
    let w = worker(&c, 0);
    // The first boundary between two servers of the routing table.
    let mid = w.cluster().partition.ranges()[1].begin;
    let range = KeyRange::new(mid - 1000, mid + 3000);
    let vals: Vec<f32> = (0..range.len() * 4).map(|i| i as f32).collect();
    w.wait(w.push_range(range, vals.clone())).unwrap();
    let got = w.wait_pull::<f32>(w.pull_range::<f32>(range)).unwrap();
    assert_eq!(got.segments().count(), 2);
    assert_eq!(got.to_vec(), vals);
    // Key-list pulls see the dense values too; keys never pushed read as zero.
    let keys = vec![mid - 1000, mid - 1, mid, mid + 2999, mid + 5000];
    let got = w.wait_pull::<f32>(w.pull::<f32>(keys)).unwrap().to_vec();
    let at = |k: u64| (((k - (mid - 1000)) * 4) as f32, 4);
    let mut want = Vec::new();
    for k in [mid - 1000, mid - 1, mid, mid + 2999] {
        let (b, n) = at(k);
        want.extend((0..n).map(|j| b + j as f32));
    }
    want.extend([0.0; 4]);
    assert_eq!(got, want);
    // Push-pull: assign then read back in one round trip.
    let ts = w.push_pull::<f32>(vec![5u64, mid + 1], vec![1.0f32; 8]);
    assert_eq!(w.wait_pull::<f32>(ts).unwrap().to_vec(), vec![1.0; 8]);
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let mut c = Cluster::start(1, 1, &["--update=sum"]);
    let w = worker(&c, 0);
    let keys = vec![1u64, 2, 3];
    w.wait(w.push(keys.clone(), vec![1.0f32, 2.0, 3.0]))
        .unwrap();

    // Unsorted keys: refused before sending.
    let e = w
        .wait(w.push(vec![3u64, 1], vec![1.0f32, 1.0]))
        .unwrap_err();
    assert!(
        matches!(e, EngineError::InvalidRequest(ref m) if m.contains("sorted")),
        "{e}"
    );
    // Wrong number of values.
    let e = w.wait(w.push(keys.clone(), vec![1.0f32])).unwrap_err();
    assert!(matches!(e, EngineError::InvalidRequest(_)), "{e}");
    // Wrong value type for the cluster.
    let e = w
        .wait(w.push(keys.clone(), vec![1.0f64, 2.0, 3.0]))
        .unwrap_err();
    assert!(
        matches!(e, EngineError::InvalidRequest(ref m) if m.contains("type")),
        "{e}"
    );
    // An update function the server does not know: the server answers with an error.
    let e = w
        .wait(w.push_with(keys.clone(), vec![9.0f32; 3], 999))
        .unwrap_err();
    match e {
        EngineError::Server {
            status, message, ..
        } => {
            assert_eq!(status, Status::UnknownFunction);
            assert!(message.contains("999"), "{message}");
        }
        other => panic!("expected a server error, got {other}"),
    }
    // Unknown timestamps.
    assert!(matches!(
        w.wait(1 << 40),
        Err(EngineError::UnknownTimestamp(_))
    ));
    // The store is as before.
    let got = w.wait_pull::<f32>(w.pull::<f32>(keys)).unwrap().to_vec();
    assert_eq!(got, vec![1.0, 2.0, 3.0]);
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn pushes_of_nan_or_infinity_are_refused_whole_unless_the_server_allows_them() {
    let mut c = Cluster::start(1, 1, &["--update=sum"]);
    let w = worker(&c, 0);
    let keys = vec![10u64, 20, 30];
    w.wait(w.push(keys.clone(), vec![1.0f32, 2.0, 3.0]))
        .unwrap();
    let refused = |e: EngineError, key: u64| match e {
        EngineError::Server {
            status, message, ..
        } => {
            assert_eq!(status, Status::BadRequest);
            assert!(message.contains("non-finite"), "{message}");
            assert!(message.contains(&format!("key {key}")), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    };
    // NaN in a key list (the other keys' finite values are not applied either).
    let e = w
        .wait(w.push(keys.clone(), vec![5.0f32, f32::NAN, 5.0]))
        .unwrap_err();
    refused(e, 20);
    // An infinity in a range push, and in a push-pull.
    let r = KeyRange::new(100, 104);
    let e = w
        .wait(w.push_range(r, vec![0.0f32, 0.0, 0.0, f32::NEG_INFINITY]))
        .unwrap_err();
    refused(e, 103);
    let Err(e) = w.wait_pull::<f32>(w.push_pull::<f32>(vec![30u64], vec![f32::INFINITY])) else {
        panic!("a push-pull of infinity was applied");
    };
    refused(e, 30);
    // Nothing of them was applied; the server still serves.
    let got = w
        .wait_pull::<f32>(w.pull::<f32>(keys.clone()))
        .unwrap()
        .to_vec();
    assert_eq!(got, vec![1.0, 2.0, 3.0]);
    let got = w.wait_pull::<f32>(w.pull_range::<f32>(r)).unwrap().to_vec();
    assert_eq!(got, vec![0.0; 4]);
    w.wait(w.push(keys.clone(), vec![1.0f32; 3])).unwrap();
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));

    // A server started with --allow-non-finite applies them.
    let mut c = Cluster::start_with(1, 1, &["--update=sum"], &["--allow-non-finite"]);
    let w = worker(&c, 0);
    w.wait(w.push(keys.clone(), vec![1.0f32, f32::NAN, 3.0]))
        .unwrap();
    let got = w.wait_pull::<f32>(w.pull::<f32>(keys)).unwrap().to_vec();
    assert_eq!(got[0], 1.0);
    assert!(got[1].is_nan());
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// Wait for the process named `name` to exit; its status.
fn exit_of(c: &mut Cluster, name: &str, limit: Duration) -> std::process::ExitStatus {
    let (_, child) = c.procs.0.iter_mut().find(|(n, _)| n == name).unwrap();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn servers_stop_when_the_scheduler_stays_gone_or_on_sigterm_without_it() {
    // Server 0 gives a lost scheduler 1 s; server 1 keeps the default (60 s) and is
    // sent SIGTERM once the scheduler is gone.
    let mut c = Cluster::scheduler_only(2, 1, &["--update=sum"]);
    for (r, extra) in [
        (0, "--scheduler-grace-secs=1"),
        (1, "--scheduler-grace-secs=60"),
    ] {
        let mut a = vec![
            "server".to_string(),
            format!("--scheduler={}", c.scheduler),
            format!("--rank={r}"),
            extra.to_string(),
        ];
        a.extend(common::net_flags());
        c.procs.spawn(&format!("server {r}"), &a);
    }
    let w = worker(&c, 0);
    w.wait(w.push(spread_keys(10), vec![1.0f32; 10])).unwrap();
    common::kill(&mut c, "scheduler");
    let started = std::time::Instant::now();
    common::signal(&c, "server 1", "-TERM");
    let st = exit_of(&mut c, "server 1", Duration::from_secs(10));
    assert!(st.code().is_some(), "server 1 did not exit by itself: {st}");
    let st = exit_of(&mut c, "server 0", Duration::from_secs(15));
    assert!(!st.success(), "server 0: {st}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "server 0 stopped before its grace"
    );
    drop(w);
}

#[test]
fn a_server_or_worker_pointed_at_a_port_that_is_not_a_scheduler_fails_at_once() {
    // A listener that answers every connection with an HTTP error.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    l.set_nonblocking(true).unwrap();
    let t = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((mut s, _)) = l.accept() {
                // Longer than a frame header, so it is read as one (and refused).
                let _ = s.write_all(&b"HTTP/1.1 400 Bad Request\r\n\r\n".repeat(8));
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    // With a secret (the default) the handshake fails; without one (--insecure) the
    // first answer is no frame. Either way at once, with a message naming the address.
    for (role, insecure) in [
        ("server", false),
        ("worker", false),
        ("server", true),
        ("worker", true),
    ] {
        let started = std::time::Instant::now();
        let out = common::pserv_cmd()
            .args([role, &format!("--scheduler={addr}")])
            .args(common::net_flags())
            .args(insecure.then_some("--insecure"))
            .env_remove(if insecure { "PSERV_SECRET_FILE" } else { "-" })
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role}: {err}");
        let expected = if insecure {
            format!("the connection to {addr} closed before it answered")
        } else {
            format!("the peer at {addr} did not authenticate")
        };
        assert!(
            err.contains(&expected),
            "{role} (insecure {insecure}): {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{role} took {:?}",
            started.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn garbage_and_vanishing_clients_do_not_take_the_server_down() {
    let mut c = Cluster::start(1, 2, &["--update=sum"]);
    let ws = workers(&c, 2);
    let server = ws[0].cluster().servers[0].addr;
    let keys = spread_keys(500);

    // A client that sends garbage, one that announces a huge frame, and one that
    // disconnects in the middle of a valid frame.
    let mut garbage = std::net::TcpStream::connect(server).unwrap();
    garbage.write_all(&[0x5a; 4096]).unwrap();
    let mut huge = std::net::TcpStream::connect(server).unwrap();
    let mut h = pserv_transport::Header::new(pserv_transport::MessageKind::Push, 99, 1);
    h.key_count = 1 << 50;
    huge.write_all(h.as_bytes()).unwrap();
    {
        let mut half = std::net::TcpStream::connect(server).unwrap();
        let mut h = pserv_transport::Header::new(pserv_transport::MessageKind::Push, 99, 1);
        h.dtype = pserv_transport::DType::F32 as u8;
        h.value_len = 1;
        let frame = pserv_transport::wire::encode(&h, &[1, 2, 3, 4, 5, 6], &[0u8; 24]);
        half.write_all(&frame[..frame.len() / 2]).unwrap();
    }

    std::thread::scope(|s| {
        for w in &ws {
            let keys = keys.clone();
            s.spawn(move || {
                for _ in 0..50 {
                    let ts = w.push(keys.clone(), vec![1.0f32; keys.len()]);
                    w.wait(ts).unwrap();
                }
                w.barrier().unwrap();
            });
        }
    });
    let got = ws[1]
        .wait_pull::<f32>(ws[1].pull::<f32>(keys))
        .unwrap()
        .to_vec();
    assert!(got.iter().all(|&v| v == 100.0), "{:?}", &got[..5]);
    drop(garbage);
    drop(huge);
    for w in ws {
        w.finish(0).unwrap();
    }
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn a_worker_that_dies_mid_job_does_not_stop_the_others() {
    let mut c = Cluster::start(1, 2, &["--update=sum"]);
    let mut ws = workers(&c, 2);
    let quitter = ws.pop().unwrap();
    // Leave without saying goodbye: the scheduler skips it, barriers stop waiting for it.
    drop(quitter);
    let w = ws.pop().unwrap();
    w.wait(w.push(vec![1u64], vec![2.0f32])).unwrap();
    w.barrier().unwrap();
    assert_eq!(
        w.wait_pull::<f32>(w.pull::<f32>(vec![1u64]))
            .unwrap()
            .to_vec(),
        vec![2.0]
    );
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn large_range_pulls_are_consistent_snapshots_under_concurrent_pushes() {
    // Pulls of at least 256 KiB are written straight from the store under its lock: a
    // pull must never see a push half applied.
    let mut c = Cluster::start(1, 2, &["--update=sum"]);
    let ws = workers(&c, 2);
    let range = KeyRange::new(200_000, 200_000 + (1 << 20)); // 4 MiB of f32
    let ones = std::sync::Arc::new(vec![1.0f32; range.len() as usize]);
    ws[0].wait(ws[0].push_range(range, ones.clone())).unwrap();
    std::thread::scope(|s| {
        let pusher = &ws[0];
        let ones = ones.clone();
        s.spawn(move || {
            for _ in 0..30 {
                pusher.wait(pusher.push_range(range, ones.clone())).unwrap();
            }
        });
        let puller = &ws[1];
        let mut seen = Vec::new();
        for _ in 0..30 {
            let v = puller
                .wait_pull::<f32>(puller.pull_range::<f32>(range))
                .unwrap()
                .to_vec();
            let first = v[0];
            assert!(
                v.iter().all(|&x| x == first),
                "torn pull: {first} and {:?}",
                v.iter().find(|&&x| x != first)
            );
            seen.push(first);
        }
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "pulls went back in time: {seen:?}"
        );
    });
    // A range that is only partly dense (the rest never pushed) reads zeros there.
    let wide = KeyRange::new(100_000, 200_000 + (1 << 20));
    let v = ws[1]
        .wait_pull::<f32>(ws[1].pull_range::<f32>(wide))
        .unwrap()
        .to_vec();
    assert!(v[..100_000].iter().all(|&x| x == 0.0));
    assert!(v[100_000..].iter().all(|&x| x == 31.0));
    for w in ws {
        w.finish(0).unwrap();
    }
    c.procs.wait_all(Duration::from_secs(30));
}

fn status(c: &Cluster) -> String {
    let out = common::pserv_cmd()
        .args(["status", &format!("--scheduler={}", c.scheduler)])
        .output()
        .expect("pserv status runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn status_shows_the_cluster_and_a_silent_server_turns_dead() {
    let mut c = Cluster::start(2, 1, &["--update=sum", "--heartbeat-timeout-ms=800"]);
    let w = worker(&c, 0);
    let s = status(&c);
    assert!(s.contains("routing table epoch 1"), "{s}");
    assert!(s.contains("job running"), "{s}");
    assert!(
        s.contains("server 0 at 127.0.0.1:") && s.contains("server 1 at 127.0.0.1:"),
        "{s}"
    );
    // Replication is on by default with two servers: every chain holds both.
    assert!(s.contains("1 replica(s) per range"), "{s}");
    assert!(
        s.contains("ranges (head first):\n  [0x0, ")
            && s.contains("server 0 -> server 1")
            && s.contains("server 1 -> server 0"),
        "{s}"
    );
    assert!(!s.contains("dead"), "{s}");
    // Servers report their replication with every heartbeat.
    w.wait(w.push(vec![1u64, 1 << 63], vec![1.0f32, 1.0]))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut s = status(&c);
    while !(s.contains("server 0 at")
        && s.lines()
            .any(|l| l.contains("server 0 at") && l.contains("replication: "))
        && s.contains("not yet acknowledged by their tails"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no replication report:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
        s = status(&c);
    }
    // A server that stops (no heartbeats, connection still open) is declared dead...
    common::signal(&c, "server 1", "-STOP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut s = status(&c);
    while !s.contains("server 1 at")
        || !s
            .lines()
            .any(|l| l.contains("server 1 at") && l.contains(": dead"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never declared dead:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(200));
        s = status(&c);
    }
    assert!(
        s.lines()
            .any(|l| l.contains("server 0 at") && l.contains(": live")),
        "{s}"
    );
    // ...and taken off the ring: its ranges pass to their replica, server 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s.contains("routing table epoch 2") {
        assert!(std::time::Instant::now() < deadline, "no new table:\n{s}");
        std::thread::sleep(Duration::from_millis(100));
        s = status(&c);
    }
    assert!(
        !s.contains("server 1 ->") && !s.contains("-> server 1"),
        "{s}"
    );
    // ...and live again when it resumes (fenced: it heads nothing any more).
    common::signal(&c, "server 1", "-CONT");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !status(&c)
        .lines()
        .any(|l| l.contains("server 1 at") && l.contains(": live"))
    {
        assert!(std::time::Instant::now() < deadline, "never live again");
        std::thread::sleep(Duration::from_millis(200));
    }
    w.wait(w.push(vec![1u64], vec![1.0f32])).unwrap();
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// Send one frame on a raw connection and read the answer frame back.
fn raw_request(server: std::net::SocketAddr, frame: &[u8]) -> (pserv_transport::Header, Vec<u8>) {
    let sender = bytemuck::from_bytes::<pserv_transport::Header>(
        &frame[..pserv_transport::wire::HEADER_LEN],
    )
    .sender;
    let mut s = common::raw_connect(server, sender);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(frame).unwrap();
    common::read_frame(&mut s)
}

#[test]
fn keys_are_routed_by_the_ring_and_stale_or_misrouted_requests_are_refused() {
    let mut c = Cluster::start(2, 1, &["--update=sum", "--vnodes=32"]);
    let w = worker(&c, 0);
    let table = w.cluster().partition.clone();
    assert_eq!(table.epoch(), 1);
    // 32 virtual nodes per server: many ranges, each server owning several.
    assert!(table.ranges().len() > 8, "{}", table.ranges().len());
    assert!(table.ranges_of(0).len() > 1 && table.ranges_of(1).len() > 1);
    // Keys spread over the ring land on their owners and come back in key order.
    let keys = spread_keys(2000);
    let vals: Vec<f32> = (0..keys.len()).map(|i| i as f32).collect();
    w.wait(w.push(keys.clone(), vals.clone())).unwrap();
    assert_eq!(
        w.wait_pull::<f32>(w.pull::<f32>(keys.clone()))
            .unwrap()
            .to_vec(),
        vals
    );

    // A push routed with a stale epoch: refused with StaleEpoch, nothing applied.
    let owner = table.server_of(keys[0]);
    let addr = w.cluster().servers[owner].addr;
    let mut h = pserv_transport::Header::new(pserv_transport::MessageKind::Push, 1_000, 1);
    h.dtype = pserv_transport::DType::F32 as u8;
    h.value_len = 1;
    h.epoch = 7;
    let frame = pserv_transport::wire::encode(&h, &[keys[0]], &100.0f32.to_le_bytes());
    let (answer, text) = raw_request(addr, &frame);
    assert_eq!(Status::from_u8(answer.status), Status::StaleEpoch);
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("epoch 7") && text.contains("epoch 1"),
        "{text}"
    );
    // A push sent to a server that does not own the key: refused with NotOwner.
    let other = w.cluster().servers[1 - owner].addr;
    h.epoch = 1;
    let frame = pserv_transport::wire::encode(&h, &[keys[0]], &100.0f32.to_le_bytes());
    let (answer, text) = raw_request(other, &frame);
    assert_eq!(Status::from_u8(answer.status), Status::NotOwner);
    assert!(String::from_utf8_lossy(&text).contains("does not own"));
    // A clocked request with unsorted keys, as worker 0 (node id 1 + 2 servers): refused
    // with the reason; the server keeps serving.
    let mut bad = pserv_transport::Header::new(pserv_transport::MessageKind::Pull, 3, 2);
    bad.dtype = pserv_transport::DType::F32 as u8;
    bad.value_len = 1;
    bad.clock = 1;
    bad.epoch = 1;
    let mine: Vec<u64> = keys
        .iter()
        .copied()
        .filter(|&k| table.server_of(k) == owner)
        .take(2)
        .collect();
    let frame = pserv_transport::wire::encode(&bad, &[mine[1], mine[0]], &[]);
    let (answer, text) = raw_request(addr, &frame);
    assert_eq!(Status::from_u8(answer.status), Status::BadRequest);
    assert!(
        String::from_utf8_lossy(&text).contains("strictly increasing"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    // Nothing changed.
    assert_eq!(
        w.wait_pull::<f32>(w.pull::<f32>(vec![keys[0]]))
            .unwrap()
            .to_vec(),
        vec![0.0]
    );
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn filtered_pushes_send_only_significant_changes_and_the_drain_completes_the_sum() {
    use pserv_engine::filter::{FilterChain, Significant, Threshold};
    use pserv_engine::worker::TaskOpts;
    let mut c = Cluster::start(2, 1, &["--update=sum"]);
    let w = worker(&c, 0);
    let keys = spread_keys(300);
    let vals = vec![0.375f32; keys.len()];
    let mut chain = FilterChain::<f32>::new().with(Significant::new(Threshold::Absolute(1.0)));
    let pull = |w: &Worker| {
        w.wait_pull::<f32>(w.pull::<f32>(keys.clone()))
            .unwrap()
            .to_vec()
    };
    // 0.375, 0.75 are held; 1.125 goes; then 0.375 is held again.
    for _ in 0..4 {
        let ts = w.push_filtered(&keys, &vals, &mut chain, &TaskOpts::default());
        w.wait(ts).unwrap();
    }
    assert!(pull(&w).iter().all(|&v| v == 1.125));
    let stats = chain.stats();
    assert_eq!(stats[0].1.offered, 4 * keys.len() as u64);
    assert_eq!(stats[0].1.sent, keys.len() as u64);
    // The end of training: the residuals go, and the servers hold every push.
    let ts = w.push_drained(&mut chain, &TaskOpts::default());
    w.wait(ts).unwrap();
    assert!(pull(&w).iter().all(|&v| v == 1.5));
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

#[test]
fn key_lists_are_cached_a_miss_is_resent_and_a_wrong_name_changes_nothing() {
    use pserv_engine::keycache::ListId;
    use pserv_transport::wire::FLAG_KEYS_CACHED;
    // Each server caches at most 120 keys: two of the 50-key lists below, not three.
    let mut c = Cluster::start_with(2, 1, &["--update=sum"], &["--key-cache-keys=120"]);
    let mut cfg = pserv_engine::worker::WorkerConfig::new(c.scheduler);
    cfg.security = common::security();
    cfg.rank = Some(0);
    cfg.tcp = pserv_transport::TcpConfig {
        threads: 1,
        pin_cores: false,
        ..pserv_transport::TcpConfig::default()
    };
    cfg.timeout = Duration::from_secs(60);
    cfg.key_cache = true;
    let w = Worker::connect(cfg).unwrap();
    let table = w.cluster().partition.clone();
    // Three lists of 100 keys, about 50 per server.
    let lists: Vec<Vec<u64>> = (0..3).map(|i| common::spread_keys(100, 11 + i)).collect();
    let push = |keys: &Vec<u64>, v: f32| {
        w.wait(w.push(keys.clone(), vec![v; keys.len()])).unwrap();
    };
    let pull = |keys: &Vec<u64>| {
        w.wait_pull::<f32>(w.pull::<f32>(keys.clone()))
            .unwrap()
            .to_vec()
    };
    // First push: in full, cached. Second: by name.
    push(&lists[0], 1.0);
    let s = w.key_cache_stats().unwrap();
    assert_eq!((s.eligible, s.by_name, s.confirmed), (2, 0, 2), "{s:?}");
    push(&lists[0], 2.0);
    let s = w.key_cache_stats().unwrap();
    assert_eq!((s.by_name, s.misses), (2, 0), "{s:?}");
    assert!(s.key_bytes_saved > 0);
    assert!(pull(&lists[0]).iter().all(|&v| v == 3.0));
    // Lists 1 and 2 push list 0 out of the servers' caches (the pull of list 0 touched
    // it last, so 0 is evicted when 2 arrives): naming it again misses, and the worker
    // resends it with its keys, applied once.
    push(&lists[1], 1.0);
    push(&lists[2], 1.0);
    push(&lists[0], 4.0);
    let s = w.key_cache_stats().unwrap();
    assert!(s.misses >= 1, "{s:?}");
    assert!(pull(&lists[0]).iter().all(|&v| v == 7.0));
    assert!(pull(&lists[1]).iter().all(|&v| v == 1.0));
    assert!(pull(&lists[2]).iter().all(|&v| v == 1.0));

    // A raw push naming a list by a wrong second hash, and one naming a list the server
    // never saw: refused as misses, nothing applied.
    let owner = table.server_of(lists[1][0]);
    let mine: Vec<u64> = lists[1]
        .iter()
        .copied()
        .filter(|&k| table.server_of(k) == owner)
        .collect();
    let addr = w.cluster().servers[owner].addr;
    let real = ListId::of(&mine);
    for id in [
        ListId {
            hi: real.hi ^ 1,
            ..real
        },
        ListId::of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
    ] {
        let mut h =
            pserv_transport::Header::new(pserv_transport::MessageKind::Push, w.node_id(), 1);
        h.dtype = pserv_transport::DType::F32 as u8;
        h.value_len = 1;
        h.epoch = 1;
        h.flags = FLAG_KEYS_CACHED;
        let vals = vec![100.0f32; id.len as usize];
        let frame = pserv_transport::wire::encode(&h, &id.words(), bytemuck::cast_slice(&vals));
        let (answer, text) = raw_request(addr, &frame);
        assert_eq!(Status::from_u8(answer.status), Status::KeyCacheMiss);
        assert!(
            String::from_utf8_lossy(&text).contains("resend the keys"),
            "{}",
            String::from_utf8_lossy(&text)
        );
    }
    assert!(pull(&lists[1]).iter().all(|&v| v == 1.0));
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// A filter of the user's, written against the public API only: each push sends its `k`
/// largest-magnitude entries and holds the rest (added to the key's next push), which
/// the drain sends at the end.
struct TopK {
    k: usize,
    held: std::collections::BTreeMap<u64, f32>,
    stats: pserv_engine::filter::FilterStats,
}

impl pserv_engine::filter::Filter<f32> for TopK {
    fn name(&self) -> &str {
        "top-k"
    }
    fn push(
        &mut self,
        entries: pserv_engine::filter::Entries<f32>,
    ) -> pserv_engine::filter::Entries<f32> {
        let mut all: Vec<(u64, f32)> = entries
            .iter()
            .map(|(k, v)| (k, v[0] + self.held.remove(&k).unwrap_or(0.0)))
            .collect();
        self.stats.offered += all.len() as u64;
        all.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let rest = all.split_off(self.k.min(all.len()));
        self.held.extend(rest);
        all.sort_by_key(|e| e.0);
        self.stats.sent += all.len() as u64;
        pserv_engine::filter::Entries::new(
            all.iter().map(|e| e.0).collect(),
            all.iter().map(|e| e.1).collect(),
            1,
        )
    }
    fn drain(&mut self, value_len: usize) -> pserv_engine::filter::Entries<f32> {
        let held = std::mem::take(&mut self.held);
        pserv_engine::filter::Entries::new(
            held.keys().copied().collect(),
            held.values().copied().collect(),
            value_len,
        )
    }
    fn stats(&self) -> pserv_engine::filter::FilterStats {
        self.stats
    }
}

#[test]
fn a_users_own_filter_runs_on_pushes_and_its_drain_completes_the_sum() {
    use pserv_engine::filter::FilterChain;
    use pserv_engine::worker::TaskOpts;
    let mut c = Cluster::start(2, 1, &["--update=sum"]);
    let w = worker(&c, 0);
    let keys = spread_keys(100);
    let mut chain = FilterChain::<f32>::new().with(TopK {
        k: 10,
        held: Default::default(),
        stats: Default::default(),
    });
    let mut want = vec![0f32; keys.len()];
    for round in 0..5 {
        let vals: Vec<f32> = (0..keys.len())
            .map(|i| ((i * 7 + round * 13) % 17) as f32 - 8.0)
            .collect();
        for (a, v) in want.iter_mut().zip(&vals) {
            *a += v;
        }
        let ts = w.push_filtered(&keys, &vals, &mut chain, &TaskOpts::default());
        w.wait(ts).unwrap();
    }
    let stats = chain.stats();
    assert_eq!(stats[0].0, "top-k");
    assert_eq!((stats[0].1.offered, stats[0].1.sent), (500, 50));
    let ts = w.push_drained(&mut chain, &TaskOpts::default());
    w.wait(ts).unwrap();
    let got = w
        .wait_pull::<f32>(w.pull::<f32>(keys.clone()))
        .unwrap()
        .to_vec();
    assert_eq!(got, want, "sent plus drained is every push");
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}

/// The hostile client of the hardening report, against an authenticated cluster: a
/// process without the secret that speaks the documented wire format gets nothing and
/// changes nothing; one with the secret cannot speak as another node, nor reach a server
/// without naming one; `pserv status` needs the secret. The job then goes on unchanged.
#[test]
fn strangers_without_the_secret_or_under_another_id_read_and_change_nothing() {
    use std::io::Read;
    let mut c = Cluster::start(1, 1, &["--update=sum"]);
    let w = worker(&c, 0);
    let server = w.cluster().servers[0].addr;
    let key = 12345u64;
    w.wait(w.push(vec![key], vec![1.0f32])).unwrap();
    let push = |sender: u32| {
        let mut h = pserv_transport::Header::new(pserv_transport::MessageKind::Push, sender, 9);
        h.dtype = pserv_transport::DType::F32 as u8;
        h.value_len = 1;
        h.epoch = 1;
        pserv_transport::wire::encode(&h, &[key], &f32::NAN.to_le_bytes())
    };
    let closed_unanswered = |mut s: std::net::TcpStream, what: &str| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0, "{what}: the server answered {n} bytes");
    };
    // 1. No secret: the first frame is no authentication; closed, unanswered.
    let mut s = std::net::TcpStream::connect(server).unwrap();
    s.write_all(&push(1_000)).unwrap();
    closed_unanswered(s, "no secret");
    // 2. The secret, but a frame under another node's id (the worker's): closed.
    let mut s = common::raw_connect(server, 1_000);
    s.write_all(&push(w.node_id())).unwrap();
    closed_unanswered(s, "another sender");
    // 3. The secret and no node id: a server takes no such connection.
    let s = std::net::TcpStream::connect(server).unwrap();
    let secret = pserv_transport::Secret::from_file(common::secret_file()).unwrap();
    let e = pserv_transport::auth::connect_side(
        &s,
        &pserv_transport::AuthConfig::new(secret),
        0,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("cluster nodes only"), "{e}");
    // 4. pserv status without the secret, and with another one.
    let out = std::process::Command::new(common::pserv())
        .args(["status", &format!("--scheduler={}", c.scheduler)])
        .env_remove("PSERV_SECRET_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no cluster secret"),
        "{err}"
    );
    let other = c.scratch.path("other.secret");
    pserv_transport::Secret::create_file(&other).unwrap();
    let out = std::process::Command::new(common::pserv())
        .args(["status", &format!("--scheduler={}", c.scheduler)])
        .env("PSERV_SECRET_FILE", &other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not hold this cluster's secret"),
        "{err}"
    );
    assert!(
        status(&c).contains("worker 0"),
        "the right secret still works"
    );
    // Nothing changed: the model holds the worker's push only.
    assert_eq!(
        w.wait_pull::<f32>(w.pull::<f32>(vec![key]))
            .unwrap()
            .to_vec(),
        vec![1.0]
    );
    w.finish(0).unwrap();
    c.procs.wait_all(Duration::from_secs(30));
}
