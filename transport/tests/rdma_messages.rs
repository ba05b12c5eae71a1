//! The RDMA message path: connections whose frames move to rings in registered memory,
//! written with RDMA WRITE over a queue pair, after a `PRDM` handshake on the TCP socket.
//!
//! The device tests are `#[ignore]`d (feature `rdma`, and a device: a NIC, Soft-RoCE, or
//! the software device of `sys/softrdma`):
//!
//! ```text
//! PSERV_RDMA_DEVICE=soft0 scripts/soft-rdma \
//!     cargo test --release -p pserv-transport --features rdma --test rdma_messages -- --include-ignored
//! ```
//!
//! What runs: frames of every size (most larger than the 64 KiB ring) both ways, from
//! many threads at once; a reader that stops (the ring fills, frames wait in the send
//! queue, none is lost or reordered); a peer process SIGKILLed and a peer transport
//! dropped (the other side closes, bounded in time); a peer that refuses (RDMA off, no
//! such device) keeps the connection on TCP; a queue pair that the device forces into
//! the error state (`SOFTRDMA_FAULTS=qp_error_after=N` in a child process) closes the
//! connection on both sides. Large frames by rendezvous (descriptors through the ring,
//! bodies RDMA READ from the sender's staging buffers): sizes around the threshold
//! between small frames, in order both ways, many in flight from many threads; a hostile
//! descriptor closes only its connection, saying why; a sender that goes away with its
//! descriptors unread is seen in bounded time. Without a device: hostile or malformed
//! hellos are refused or close only their connection.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use pserv_transport::wire::{self, DType, Header, MessageKind, FLAG_RESPONSE};
use pserv_transport::{
    CloseReason, Conn, Handler, OutFrame, OwnedFrame, Payload, RdmaMessages, RecvFrame,
    ShmMessages, TcpConfig, TcpTransport,
};

const WAIT: Duration = Duration::from_secs(30);
/// The smallest ring there is: most frames below wrap it or do not fit it at all.
const RING: usize = 64 << 10;

struct Echo {
    closes: Sender<String>,
    /// While set, the handler waits for a message on it before each frame (a reader
    /// that stops reading).
    gate: Option<Receiver<()>>,
}

impl Handler for Echo {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        if let Some(g) = &self.gate {
            if g.recv_timeout(WAIT).is_err() {
                self.gate = None;
            }
        }
        let f = frame.frame();
        let mut h = *f.header();
        h.flags |= FLAG_RESPONSE;
        let out = OutFrame::new(
            h,
            Payload::copy_from(bytemuck::cast_slice(f.keys())),
            Payload::copy_from(f.values()),
        );
        let _ = conn.send(out);
    }
    fn on_close(&mut self, _conn: &Conn, reason: &CloseReason) {
        let _ = self.closes.send(reason.to_string());
    }
}

struct Collect {
    tx: Sender<OwnedFrame>,
    closes: Sender<String>,
}

impl Handler for Collect {
    fn on_frame(&mut self, _conn: &Conn, frame: RecvFrame<'_>) {
        let _ = self.tx.send(frame.into_owned());
    }
    fn on_close(&mut self, _conn: &Conn, reason: &CloseReason) {
        let _ = self.closes.send(reason.to_string());
    }
}

fn device() -> Option<String> {
    std::env::var("PSERV_RDMA_DEVICE").ok()
}

fn cfg(threads: usize, rdma: RdmaMessages) -> TcpConfig {
    TcpConfig {
        threads,
        pin_cores: false,
        // As `--transport rdma`: no shared memory, RDMA with every peer (this host's too).
        shm_messages: ShmMessages::Off,
        rdma_messages: rdma,
        rdma_ring_bytes: RING,
        rdma_device: device(),
        ..TcpConfig::default()
    }
}

fn server_with(
    c: TcpConfig,
    gate: Option<Receiver<()>>,
) -> (TcpTransport, std::net::SocketAddr, Receiver<String>) {
    let (ctx, crx) = unbounded();
    let t = TcpTransport::start(c, move |_| Echo {
        closes: ctx.clone(),
        gate: gate.clone(),
    })
    .unwrap();
    let addr = t.listen("127.0.0.1:0").unwrap();
    (t, addr, crx)
}

fn server(rdma: RdmaMessages) -> (TcpTransport, std::net::SocketAddr, Receiver<String>) {
    server_with(cfg(2, rdma), None)
}

fn client_with(c: TcpConfig) -> (TcpTransport, Receiver<OwnedFrame>, Receiver<String>) {
    let (tx, rx) = unbounded();
    let (ctx, crx) = unbounded();
    let t = TcpTransport::start(c, |_| Collect {
        tx: tx.clone(),
        closes: ctx.clone(),
    })
    .unwrap();
    (t, rx, crx)
}

fn client() -> (TcpTransport, Receiver<OwnedFrame>, Receiver<String>) {
    client_with(cfg(1, RdmaMessages::AllPeers))
}

fn frame(ts: u64, n: usize) -> OutFrame {
    let keys: Vec<u64> = (0..n as u64).map(|k| k * 3).collect();
    let values: Vec<f32> = (0..n).map(|k| k as f32 + ts as f32).collect();
    let mut h = Header::new(MessageKind::Push, 3, ts);
    h.dtype = DType::F32 as u8;
    h.value_len = 1;
    OutFrame::new(h, Payload::owned(keys), Payload::owned(values))
}

fn check_echo(got: &OwnedFrame, ts: u64, n: usize) {
    let f = got.frame();
    assert_eq!(f.header().timestamp, ts);
    assert!(f.header().has(FLAG_RESPONSE));
    assert_eq!(f.keys().len(), n, "frame {ts}");
    let v = f.values_as::<f32>().unwrap();
    for (k, (&key, &val)) in f.keys().iter().zip(v).enumerate() {
        assert_eq!(key, k as u64 * 3, "frame {ts}: key {k}");
        assert_eq!(val, k as f32 + ts as f32, "frame {ts}: value {k}");
    }
}

/// Wait (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The next close reason that is not an earlier connection's "peer closed".
fn next_close(closes: &Receiver<String>, what: &str) -> String {
    loop {
        let why = closes
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{what}: not closed"));
        if !why.contains("peer closed") {
            return why;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Device tests

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn frames_of_every_size_cross_rdma_both_ways_in_order() {
    let (srv, addr, _closes) = server(RdmaMessages::AllPeers);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    assert_eq!(conn.path(), "tcp (rdma offered)");
    // Sent at once, before the offer's answer can have come: held, then delivered.
    let sizes = [
        1usize,
        10,
        1000,
        100_000,
        3 << 20,
        3,
        7000,
        1 << 20,
        2,
        16_383,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        conn.send(frame(i as u64, n)).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let got = rx.recv_timeout(WAIT).expect("echo");
        check_echo(&got, i as u64, n);
    }
    assert!(conn.is_rdma(), "the connection moved to rdma");
    assert!(!conn.is_shm());
    assert_eq!(conn.path(), "rdma");
    assert_eq!(cli.stats().rdma_connections.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().rdma_connections.load(Ordering::Relaxed), 1);
    assert_eq!(cli.stats().rdma_refused.load(Ordering::Relaxed), 0);
    // Later frames (after the switch) too, and the loops sleep and wake in between.
    for i in 100..110u64 {
        std::thread::sleep(Duration::from_millis(20));
        conn.send(frame(i, 5000)).unwrap();
        check_echo(&rx.recv_timeout(WAIT).expect("echo"), i, 5000);
    }
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn many_threads_with_many_frames_in_flight_keep_their_order() {
    let (_srv, addr, _closes) = server(RdmaMessages::AllPeers);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    let threads = 4;
    let per = 150u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let conn = conn.clone();
            s.spawn(move || {
                for i in 0..per {
                    let ts = t * 1000 + i;
                    let n = 1 + ((ts * 7919) % 20_000) as usize;
                    conn.send(frame(ts, n)).unwrap();
                }
            });
        }
    });
    let mut last = vec![None::<u64>; threads as usize];
    for _ in 0..threads * per {
        let got = rx.recv_timeout(WAIT).expect("echo");
        let ts = got.frame().header().timestamp;
        let n = 1 + ((ts * 7919) % 20_000) as usize;
        check_echo(&got, ts, n);
        let t = (ts / 1000) as usize;
        assert!(
            last[t].is_none_or(|p| p < ts),
            "thread {t}: {ts} after {last:?}"
        );
        last[t] = Some(ts);
    }
    assert!(conn.is_rdma());
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn a_reader_that_stops_fills_the_ring_and_loses_nothing() {
    let (gate_tx, gate_rx) = unbounded();
    let (_srv, addr, _closes) = server_with(cfg(1, RdmaMessages::AllPeers), Some(gate_rx));
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    // The first frame passes; the server's loop then waits in its handler.
    gate_tx.send(()).unwrap();
    conn.send(frame(0, 10)).unwrap();
    check_echo(&rx.recv_timeout(WAIT).expect("echo"), 0, 10);
    assert!(conn.is_rdma());
    // 40 frames of 200 KB each: 8 MB against a 64 KiB ring nobody reads.
    let n = 50_000;
    for i in 1..=40u64 {
        conn.send(frame(i, n)).unwrap();
    }
    eventually("frames waiting for room in the ring", || {
        conn.queued_bytes() > 4 << 20
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        rx.try_recv().is_err(),
        "nothing comes back while the reader stops"
    );
    // The reader goes on: everything arrives, in order.
    for _ in 0..40 {
        gate_tx.send(()).unwrap();
    }
    for i in 1..=40u64 {
        check_echo(&rx.recv_timeout(WAIT).expect("echo"), i, n);
    }
    eventually("the send queue drained", || conn.queued_bytes() == 0);
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn a_peer_that_goes_away_is_seen_both_ways() {
    // The server transport goes.
    let (srv, addr, _closes) = server(RdmaMessages::AllPeers);
    let (cli, rx, cli_closes) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(1, 10)).unwrap();
    rx.recv_timeout(WAIT).expect("echo");
    assert!(conn.is_rdma());
    let t = Instant::now();
    drop(srv);
    let why = cli_closes
        .recv_timeout(WAIT)
        .expect("the client sees the close");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(why.contains("peer closed") || why.contains("rdma"), "{why}");
    assert!(conn.is_closed());
    assert!(conn.send(frame(2, 1)).is_err());

    // The client transport goes.
    let (_srv, addr, srv_closes) = server(RdmaMessages::AllPeers);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(1, 10)).unwrap();
    rx.recv_timeout(WAIT).expect("echo");
    assert!(conn.is_rdma());
    let t = Instant::now();
    drop(cli);
    srv_closes
        .recv_timeout(WAIT)
        .expect("the server sees the close");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn a_peer_process_sigkilled_is_seen_without_a_hang() {
    let child = common::ChildProc::spawn("echo_server", &[]);
    let addr: std::net::SocketAddr = child.expect("addr").parse().unwrap();
    let (cli, rx, closes) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    for i in 0..20u64 {
        conn.send(frame(i, 30_000)).unwrap();
    }
    for i in 0..20u64 {
        check_echo(&rx.recv_timeout(WAIT).expect("echo"), i, 30_000);
    }
    assert!(conn.is_rdma());
    // Frames in flight while the peer dies: the sender must not hang either.
    let sender = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            let mut i = 1000;
            while conn.send(frame(i, 30_000)).is_ok() && i < 1_000_000 {
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(child); // SIGKILL
    closes.recv_timeout(WAIT).expect("the close is seen");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(conn.is_closed());
    sender.join().unwrap();
}

/// The rendezvous threshold of the tests below: frames of about 340 keys and more.
const RDV: usize = 4096;

fn cfg_rdv(threads: usize) -> TcpConfig {
    TcpConfig {
        rdma_rendezvous_bytes: RDV,
        ..cfg(threads, RdmaMessages::AllPeers)
    }
}

/// Bytes after the header of `frame(_, n)`: keys, values, padding.
fn body_of(n: usize) -> usize {
    wire::pad8(12 * n)
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn rendezvous_frames_around_the_threshold_cross_both_ways_in_order() {
    let (_srv, addr, _closes) = server_with(cfg_rdv(2), None);
    let (cli, rx, _) = client_with(cfg_rdv(1));
    let conn = cli.connect(addr, WAIT).unwrap();
    // Bodies just below, at and above the threshold, and far above the 64 KiB ring,
    // each between small frames.
    let mut sizes = Vec::new();
    for n in (RDV / 12 - 6..RDV / 12 + 6).chain([20_000, 100_000, 700_000]) {
        sizes.extend([n, 1, 50]);
    }
    let big = sizes.iter().filter(|&&n| body_of(n) >= RDV).count() as u64;
    for round in 0..3u64 {
        for (i, &n) in sizes.iter().enumerate() {
            conn.send(frame(round * 1000 + i as u64, n)).unwrap();
        }
        for (i, &n) in sizes.iter().enumerate() {
            let got = rx.recv_timeout(WAIT).expect("echo");
            check_echo(&got, round * 1000 + i as u64, n);
        }
    }
    assert!(conn.is_rdma());
    let (sent, received) = conn.rdma_rendezvous_frames();
    assert_eq!(sent, 3 * big, "every large frame left by rendezvous");
    assert_eq!(
        received,
        3 * big,
        "every large echo came back by rendezvous"
    );
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn many_rendezvous_frames_in_flight_from_many_threads_keep_their_order() {
    let (_srv, addr, _closes) = server_with(cfg_rdv(2), None);
    let (cli, rx, _) = client_with(cfg_rdv(1));
    let conn = cli.connect(addr, WAIT).unwrap();
    let threads = 4u64;
    let per = 60u64;
    let size = |ts: u64| 200 + ((ts * 7919) % 40_000) as usize;
    std::thread::scope(|s| {
        for t in 0..threads {
            let conn = conn.clone();
            s.spawn(move || {
                for i in 0..per {
                    let ts = t * 1000 + i;
                    conn.send(frame(ts, size(ts))).unwrap();
                }
            });
        }
    });
    let mut last = vec![None::<u64>; threads as usize];
    for _ in 0..threads * per {
        let got = rx.recv_timeout(WAIT).expect("echo");
        let ts = got.frame().header().timestamp;
        check_echo(&got, ts, size(ts));
        let t = (ts / 1000) as usize;
        assert!(
            last[t].is_none_or(|p| p < ts),
            "thread {t}: {ts} after {last:?}"
        );
        last[t] = Some(ts);
    }
    let (sent, received) = conn.rdma_rendezvous_frames();
    assert!(
        sent > 100 && received > 100,
        "{sent} sent, {received} received by rendezvous"
    );
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn a_hostile_rendezvous_descriptor_closes_only_its_connection() {
    let (_srv, addr, closes) = server_with(cfg_rdv(2), None);
    let (cli, rx, _) = client_with(cfg_rdv(1));
    let good = cli.connect(addr, WAIT).unwrap();
    let bad = cli.connect(addr, WAIT).unwrap();
    for c in [&good, &bad] {
        c.send(frame(1, 10)).unwrap();
        check_echo(&rx.recv_timeout(WAIT).expect("echo"), 1, 10);
        assert!(c.is_rdma());
    }
    // A "frame" whose first bytes are a rendezvous descriptor's: its header's magic
    // is `PRDV`, its sender field the low half of the id (5: unknown, 0 expected).
    let mut h = Header::new(MessageKind::Push, 5, 0);
    h.magic = u32::from_le_bytes(*b"PRDV");
    (h.version, h.kind) = (0, 0);
    let keys: Vec<u64> = vec![0; 5];
    bad.send(OutFrame::new(h, Payload::owned(keys), Payload::empty()))
        .unwrap();
    let why = next_close(&closes, "a hostile descriptor");
    assert!(
        why.contains("rendezvous descriptor of unknown id 5"),
        "the close says why: {why}"
    );
    eventually("the hostile connection closed", || bad.is_closed());
    // The other connection goes on, large frames too.
    good.send(frame(2, 50_000)).unwrap();
    check_echo(&rx.recv_timeout(WAIT).expect("echo"), 2, 50_000);
    assert!(!good.is_closed());
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn a_sender_that_vanishes_mid_rendezvous_is_seen_without_a_hang() {
    let (gate_tx, gate_rx) = unbounded();
    let (_srv, addr, closes) = server_with(cfg_rdv(1), Some(gate_rx));
    let (cli, rx, _) = client_with(cfg_rdv(1));
    let conn = cli.connect(addr, WAIT).unwrap();
    gate_tx.send(()).unwrap();
    conn.send(frame(0, 10)).unwrap();
    check_echo(&rx.recv_timeout(WAIT).expect("echo"), 0, 10);
    // The server's loop waits in its handler; the descriptors of 10 large frames land
    // in its ring, their bodies in the client's staging buffers.
    for i in 1..=10u64 {
        conn.send(frame(i, 50_000)).unwrap();
    }
    eventually("every frame left by rendezvous", || {
        conn.rdma_rendezvous_frames().0 == 10
    });
    // The client goes away with its buffers; the server then reads on: its READs fail
    // (or it sees the socket's end first), and it closes in bounded time.
    drop(conn);
    drop(cli);
    let t = Instant::now();
    for _ in 0..10 {
        gate_tx.send(()).unwrap();
    }
    let why = closes.recv_timeout(WAIT).expect("the server closes");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        why.contains("peer closed") || why.contains("rdma") || why.contains("mid-frame"),
        "{why}"
    );
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE, build with --features rdma, pass --ignored"]
fn a_peer_that_refuses_keeps_the_connection_on_tcp() {
    // RDMA off at the server.
    let (srv, addr, _closes) = server(RdmaMessages::Off);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    for i in 0..5u64 {
        conn.send(frame(i, 100_000)).unwrap();
    }
    for i in 0..5u64 {
        check_echo(&rx.recv_timeout(WAIT).expect("echo"), i, 100_000);
    }
    assert!(!conn.is_rdma());
    assert_eq!(conn.path(), "tcp");
    assert_eq!(cli.stats().rdma_refused.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().rdma_refused.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().rdma_connections.load(Ordering::Relaxed), 0);

    // A server whose device does not exist refuses too.
    let (srv, addr, _closes) = server_with(
        TcpConfig {
            rdma_device: Some("no-such-device".into()),
            ..cfg(1, RdmaMessages::AllPeers)
        },
        None,
    );
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(9, 1000)).unwrap();
    check_echo(&rx.recv_timeout(WAIT).expect("echo"), 9, 1000);
    assert_eq!(conn.path(), "tcp");
    assert_eq!(srv.stats().rdma_refused.load(Ordering::Relaxed), 1);

    // A client with RDMA for other hosts only offers nothing to this host.
    let (cli2, rx2, _) = client_with(cfg(1, RdmaMessages::OtherHosts));
    let (srv3, addr3, _c) = server(RdmaMessages::AllPeers);
    let c2 = cli2.connect(addr3, WAIT).unwrap();
    c2.send(frame(7, 3)).unwrap();
    check_echo(&rx2.recv_timeout(WAIT).expect("echo"), 7, 3);
    assert_eq!(c2.path(), "tcp");
    assert_eq!(srv3.stats().rdma_refused.load(Ordering::Relaxed), 0);
    assert_eq!(srv3.stats().rdma_connections.load(Ordering::Relaxed), 0);
}

#[test]
#[ignore = "needs the software RDMA device (SOFTRDMA_FAULTS): run under scripts/soft-rdma with --ignored"]
fn a_queue_pair_forced_into_error_closes_the_connection() {
    if std::env::var("PSERV_SOFT_RDMA").is_err() {
        eprintln!("skipped: needs the software device's fault knobs (scripts/soft-rdma)");
        return;
    }
    let (srv, addr, srv_closes) = server(RdmaMessages::AllPeers);
    // The child's device puts its queue pair in the error state after 200 send WQEs.
    let child = common::ChildProc::spawn(
        "faulty_client",
        &[
            ("PSERV_PEER", addr.to_string()),
            ("SOFTRDMA_FAULTS", "qp_error_after=200".into()),
        ],
    );
    let why = child.expect("closed");
    assert!(why.contains("rdma queue pair"), "child's close: {why}");
    let echoed = child.expect_u64("echoed");
    eprintln!("the child's connection closed after {echoed} echoes: {why}");
    assert!(echoed > 0, "frames crossed before the fault");
    assert!(
        echoed < 100_000,
        "the fault came before the child ran out of frames"
    );
    assert_eq!(srv.stats().rdma_connections.load(Ordering::Relaxed), 1);
    let t = Instant::now();
    srv_closes
        .recv_timeout(WAIT)
        .expect("the server's side closes too");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    child.finish();
}

/// The child side of the process tests.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(common::ROLE) else {
        return;
    };
    match role.as_str() {
        "echo_server" => {
            let (_srv, addr, _closes) = server(RdmaMessages::AllPeers);
            println!("@@ addr {addr}");
            // Until killed (or the parent goes).
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        "faulty_client" => {
            let addr: std::net::SocketAddr = std::env::var("PSERV_PEER").unwrap().parse().unwrap();
            let (cli, rx, closes) = client();
            let conn = cli.connect(addr, WAIT).unwrap();
            let mut echoed = 0u64;
            for i in 0..100_000u64 {
                if conn.send(frame(i, 100)).is_err() {
                    break;
                }
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(f) => {
                        check_echo(&f, i, 100);
                        assert!(conn.is_rdma(), "frame {i} went over {}", conn.path());
                        echoed += 1;
                    }
                    Err(_) => break,
                }
            }
            let why = closes.recv_timeout(WAIT).expect("the connection closes");
            println!("@@ closed {why}");
            println!("@@ echoed {echoed}");
        }
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Without a device

/// The 96 bytes of an RDMA hello, built by hand as a hostile peer would.
fn rdma_hello(kind: u8, ring: u64) -> [u8; 96] {
    let mut b = [0u8; 96];
    b[..4].copy_from_slice(b"PRDM");
    b[4] = kind;
    b[5] = 2;
    b[8..16].copy_from_slice(&ring.to_le_bytes());
    b
}

#[test]
fn hostile_rdma_hellos_are_refused_or_close_only_their_connection() {
    let (_srv, addr, closes) = server(RdmaMessages::AllPeers);
    // Silly rings, a region that does not match, no endpoint: refused (or, with no
    // device, refused for that), and the connection goes on over TCP.
    for ring in [3u64, 1 << 40, RING as u64] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&rdma_hello(1, ring)).unwrap();
        let mut answer = [0u8; 96];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer[..4], b"PRDM");
        assert_eq!(answer[4], 3, "a refusal of ring {ring}");
        let f = frame(41, 4).to_bytes();
        s.write_all(&f).unwrap();
        // The whole echo (unread bytes would make the close a reset).
        let mut echo = vec![0u8; f.len()];
        s.read_exact(&mut echo).unwrap();
        let head: &[u8; wire::HEADER_LEN] = echo[..wire::HEADER_LEN].try_into().unwrap();
        assert_eq!(Header::from_bytes(head).timestamp, 41, "served over TCP");
    }
    // An answer nobody asked for, a late offer, a wrong version: closed.
    for (what, bytes) in [
        ("unasked answer", rdma_hello(2, RING as u64).to_vec()),
        (
            "late offer",
            [frame(1, 4).to_bytes(), rdma_hello(1, RING as u64).to_vec()].concat(),
        ),
        ("bad version", {
            let mut h = rdma_hello(1, RING as u64);
            h[5] = 9;
            h.to_vec()
        }),
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&bytes).unwrap();
        let why = next_close(&closes, what);
        assert!(why.contains("RDMA"), "{what}: {why}");
    }
}

#[test]
fn rdma_off_by_default_and_a_connection_without_a_device_stays_on_tcp() {
    assert_eq!(TcpConfig::default().rdma_messages, RdmaMessages::Off);
    if device().is_some() {
        return; // the device tests cover the other case
    }
    // No device named, none (or no rdma feature) here: the offer is never made.
    let c = TcpConfig {
        rdma_device: Some("no-such-device".into()),
        ..cfg(1, RdmaMessages::AllPeers)
    };
    let (_srv, addr, _closes) = server_with(c.clone(), None);
    let (cli, rx, _) = client_with(c);
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(3, 100)).unwrap();
    check_echo(&rx.recv_timeout(WAIT).expect("echo"), 3, 100);
    assert_eq!(conn.path(), "tcp");
    assert_eq!(cli.stats().rdma_connections.load(Ordering::Relaxed), 0);
}
