//! The shared-memory message path: connections between transports of one host move
//! their frames through rings in a shared region after a handshake on the TCP socket.
//! Frames of every size (many larger than the ring) both ways and from many threads,
//! peers that vanish, refuse, never answer, or send hostile hellos.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use pserv_transport::wire::{self, DType, Header, MessageKind, FLAG_RESPONSE};
use pserv_transport::{
    CloseReason, Codec, Conn, Handler, OutFrame, OwnedFrame, Payload, RecvFrame, ShmMessages,
    TcpConfig, TcpTransport,
};

const WAIT: Duration = Duration::from_secs(20);
/// The smallest ring there is: most frames below wrap it or do not fit it at all.
const RING: usize = 64 << 10;

struct Echo {
    closes: Sender<String>,
}

impl Handler for Echo {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
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

fn cfg(threads: usize, shm: ShmMessages) -> TcpConfig {
    TcpConfig {
        threads,
        pin_cores: false,
        shm_messages: shm,
        shm_ring_bytes: RING,
        ..TcpConfig::default()
    }
}

fn server(shm: ShmMessages) -> (TcpTransport, std::net::SocketAddr, Receiver<String>) {
    let (ctx, crx) = unbounded();
    let t = TcpTransport::start(cfg(2, shm), |_| Echo {
        closes: ctx.clone(),
    })
    .unwrap();
    let addr = t.listen("127.0.0.1:0").unwrap();
    (t, addr, crx)
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
    client_with(cfg(1, ShmMessages::SameHost))
}

fn push(ts: u64, keys: Vec<u64>, values: Vec<f32>) -> OutFrame {
    let mut h = Header::new(MessageKind::Push, 3, ts);
    h.dtype = DType::F32 as u8;
    h.value_len = if keys.is_empty() {
        0
    } else {
        (values.len() / keys.len()) as u32
    };
    OutFrame::new(h, Payload::owned(keys), Payload::owned(values))
}

/// Wait (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn check_echo(got: &OwnedFrame, ts: u64, n: usize) {
    let f = got.frame();
    assert_eq!(f.header().timestamp, ts);
    assert!(f.header().has(FLAG_RESPONSE));
    assert_eq!(f.keys().len(), n);
    let v = f.values_as::<f32>().unwrap();
    for (k, (&key, &val)) in f.keys().iter().zip(v).enumerate() {
        assert_eq!(key, k as u64 * 3, "frame {ts}: key {k}");
        assert_eq!(val, k as f32 + ts as f32, "frame {ts}: value {k}");
    }
}

fn frame(ts: u64, n: usize) -> OutFrame {
    let keys: Vec<u64> = (0..n as u64).map(|k| k * 3).collect();
    let values: Vec<f32> = (0..n).map(|k| k as f32 + ts as f32).collect();
    push(ts, keys, values)
}

#[test]
fn frames_of_every_size_cross_shared_memory_in_order() {
    let (srv, addr, _closes) = server(ShmMessages::SameHost);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    // Sent at once, before the offer's answer can have come: held, then delivered.
    let sizes = [1usize, 10, 1000, 100_000, 3 << 20, 3, 7000, 1 << 20, 2];
    for (i, &n) in sizes.iter().enumerate() {
        conn.send(frame(i as u64, n)).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let got = rx.recv_timeout(WAIT).expect("echo");
        check_echo(&got, i as u64, n);
    }
    assert!(conn.is_shm(), "the connection moved to shared memory");
    assert_eq!(conn.path(), "shm");
    assert_eq!(cli.stats().shm_connections.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().shm_connections.load(Ordering::Relaxed), 1);
    // Compression works over the rings as over TCP (values of zeros shrink).
    conn.set_codec(Codec::Lz4);
    let keys: Vec<u64> = (0..50_000u64).map(|k| k * 3).collect();
    conn.send(push(99, keys, vec![0.0; 50_000])).unwrap();
    let got = rx.recv_timeout(WAIT).expect("echo of the compressed frame");
    assert_eq!(got.frame().header().timestamp, 99);
    assert!(got
        .frame()
        .values_as::<f32>()
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    assert!(cli.stats().frames_compressed_out.load(Ordering::Relaxed) >= 1);
}

#[test]
fn many_threads_with_many_frames_in_flight() {
    let (_srv, addr, _closes) = server(ShmMessages::SameHost);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    let threads = 4;
    let per = 300u64;
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
        // Each thread's frames come back in the order it sent them.
        let t = (ts / 1000) as usize;
        assert!(
            last[t].is_none_or(|p| p < ts),
            "thread {t}: {ts} after {last:?}"
        );
        last[t] = Some(ts);
    }
    assert!(conn.is_shm());
}

#[test]
fn a_peer_that_goes_away_is_seen_at_once_both_ways() {
    // The server goes: the client's connection closes (the socket is the detector).
    let (srv, addr, _closes) = server(ShmMessages::SameHost);
    let (cli, rx, cli_closes) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(1, 10)).unwrap();
    rx.recv_timeout(WAIT).expect("echo");
    assert!(conn.is_shm());
    let t = Instant::now();
    drop(srv);
    let why = cli_closes
        .recv_timeout(WAIT)
        .expect("the client sees the close");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(why.contains("peer closed"), "{why}");
    assert!(conn.is_closed());
    assert!(conn.send(frame(2, 1)).is_err());

    // The client goes: the server's connection closes.
    let (_srv, addr, srv_closes) = server(ShmMessages::SameHost);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(1, 10)).unwrap();
    rx.recv_timeout(WAIT).expect("echo");
    drop(cli);
    let why = srv_closes
        .recv_timeout(WAIT)
        .expect("the server sees the close");
    assert!(why.contains("peer closed"), "{why}");
}

#[test]
fn a_peer_that_refuses_keeps_the_connection_on_tcp() {
    let (srv, addr, _closes) = server(ShmMessages::Off);
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    for i in 0..5u64 {
        conn.send(frame(i, 100_000)).unwrap();
    }
    for i in 0..5u64 {
        check_echo(&rx.recv_timeout(WAIT).expect("echo"), i, 100_000);
    }
    assert!(!conn.is_shm());
    assert_eq!(conn.path(), "tcp");
    assert_eq!(cli.stats().shm_refused.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().shm_refused.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().shm_connections.load(Ordering::Relaxed), 0);
    // A client that does not offer is never asked.
    let (cli2, rx2, _) = client_with(cfg(1, ShmMessages::Off));
    let (srv3, addr3, _c) = server(ShmMessages::SameHost);
    let c2 = cli2.connect(addr3, WAIT).unwrap();
    c2.send(frame(7, 3)).unwrap();
    check_echo(&rx2.recv_timeout(WAIT).expect("echo"), 7, 3);
    assert!(!c2.is_shm());
    assert_eq!(srv3.stats().shm_refused.load(Ordering::Relaxed), 0);
}

#[test]
fn an_offer_nobody_answers_closes_the_connection_after_its_bound_and_sends_nothing() {
    // A listener that is not pserv: accepts, reads, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (cli, _rx, closes) = client_with(TcpConfig {
        shm_offer_timeout: Duration::from_millis(300),
        ..cfg(1, ShmMessages::SameHost)
    });
    let conn = cli.connect(addr, WAIT).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    assert_eq!(conn.path(), "tcp (shm offered)");
    conn.send(frame(1, 10)).unwrap();
    let t = Instant::now();
    let why = closes
        .recv_timeout(WAIT)
        .expect("closed after the offer's bound");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        why.contains("did not answer the shared-memory offer"),
        "{why}"
    );
    // All the peer ever got is the 64-byte offer: the held frame never went out.
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 64, "only the offer was written");
    assert_eq!(&got[..4], b"PSHM");
}

/// The 64 bytes of a hello, built by hand as a hostile peer would.
fn hello(kind: u8, ring: u64, cookie: u64, locator: &str) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..4].copy_from_slice(b"PSHM");
    b[4] = kind;
    b[5] = 1;
    b[8..16].copy_from_slice(&ring.to_le_bytes());
    b[16..24].copy_from_slice(&cookie.to_le_bytes());
    b[24..24 + locator.len()].copy_from_slice(locator.as_bytes());
    b
}

fn raw_frame(ts: u64) -> Vec<u8> {
    let f = frame(ts, 4);
    f.to_bytes()
}

#[test]
fn hostile_hellos_are_refused_or_close_only_their_connection() {
    let (srv, addr, closes) = server(ShmMessages::SameHost);
    // An offer of a file that is no region: refused, and the connection goes on over TCP.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&hello(1, RING as u64, 5, "/proc/1/fd/0"))
        .unwrap();
    let mut answer = [0u8; 64];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[..4], b"PSHM");
    assert_eq!(answer[4], 3, "a refusal");
    assert_eq!(u16::from_le_bytes([answer[6], answer[7]]), 2, "cannot open");
    s.write_all(&raw_frame(41)).unwrap();
    let mut head = [0u8; wire::HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    assert_eq!(Header::from_bytes(&head).timestamp, 41, "served over TCP");

    // A locator outside /proc/PID/fd, a silly ring: refused too.
    for bad in [
        hello(1, RING as u64, 5, "/etc/passwd"),
        hello(1, 3, 5, "/proc/1/fd/0"),
        hello(1, 1 << 40, 5, "/proc/1/fd/0"),
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&bad).unwrap();
        let mut answer = [0u8; 64];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(answer[4], 3, "a refusal");
    }

    // An offer after a frame, an answer nobody asked for, a wrong version: closed.
    for (what, bytes) in [
        (
            "late offer",
            [
                raw_frame(1),
                hello(1, RING as u64, 5, "/proc/1/fd/0").to_vec(),
            ]
            .concat(),
        ),
        ("unasked answer", hello(2, 0, 0, "").to_vec()),
        ("bad version", {
            let mut h = hello(1, RING as u64, 5, "/proc/1/fd/0");
            h[5] = 9;
            h.to_vec()
        }),
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&bytes).unwrap();
        // Earlier connections closing (their sockets dropped) report "peer closed".
        let why = loop {
            let why = closes
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("{what}: not closed"));
            if !why.contains("peer closed") {
                break why;
            }
        };
        assert!(why.contains("shared-memory"), "{what}: {why}");
    }

    // The server still serves everyone else over shared memory.
    let (cli, rx, _) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(frame(5, 1000)).unwrap();
    check_echo(&rx.recv_timeout(WAIT).expect("echo"), 5, 1000);
    assert!(conn.is_shm());
    assert_eq!(srv.stats().shm_connections.load(Ordering::Relaxed), 1);
}

#[test]
fn a_reader_that_lags_gets_everything_and_the_writer_is_bounded() {
    // A handler that is slow at first: the ring fills, the sender's queue is bounded by
    // `send_queue_max_bytes`, and once the reader catches up every frame arrives intact.
    struct Slow {
        tx: Sender<OwnedFrame>,
        seen: usize,
    }
    impl Handler for Slow {
        fn on_frame(&mut self, _conn: &Conn, frame: RecvFrame<'_>) {
            self.seen += 1;
            if self.seen < 5 {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.tx.send(frame.into_owned());
        }
    }
    let (tx, rx) = unbounded();
    let srv = TcpTransport::start(cfg(1, ShmMessages::SameHost), |_| Slow {
        tx: tx.clone(),
        seen: 0,
    })
    .unwrap();
    let addr = srv.listen("127.0.0.1:0").unwrap();
    let (cli, _rx, _) = client_with(TcpConfig {
        send_queue_max_bytes: 1 << 20,
        ..cfg(1, ShmMessages::SameHost)
    });
    let conn = cli.connect(addr, WAIT).unwrap();
    let n = 40u64;
    let sender = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            let mut max_queued = 0;
            for i in 0..n {
                conn.send(frame(i, 50_000)).unwrap();
                max_queued = max_queued.max(conn.queued_bytes());
            }
            max_queued
        })
    };
    for i in 0..n {
        let got = rx.recv_timeout(WAIT).expect("frame");
        let f = got.frame();
        assert_eq!(f.header().timestamp, i);
        let v = f.values_as::<f32>().unwrap();
        assert_eq!(v.len(), 50_000);
        assert_eq!(v[49_999], 49_999.0 + i as f32);
    }
    let max_queued = sender.join().unwrap();
    // The bound plus one frame (a send past it waits, the one that crosses it queues).
    let frame_len = frame(0, 50_000).wire_len();
    assert!(
        max_queued <= (1 << 20) + frame_len,
        "queue grew to {max_queued} (bound {} + a {frame_len}-byte frame)",
        1 << 20
    );
    eventually("the queue drains", || conn.queued_bytes() == 0);
    assert!(conn.is_shm());
}
