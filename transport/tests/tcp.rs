//! TCP transport on loopback: echo of small and large frames, many in flight, and bad
//! peers (garbage, vanishing mid-frame) that must not disturb the others. Connections
//! here stay on TCP (`ShmMessages::Off`); `tests/shm.rs` runs the shared-memory path.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use pserv_transport::wire::{self, DType, Header, MessageKind, FLAG_RESPONSE};
use pserv_transport::{
    CloseReason, Conn, Handler, OutFrame, OwnedFrame, Payload, RecvFrame, TcpConfig, TcpTransport,
};

/// Answers every frame with the same keys and values, flagged as a response.
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

/// Collects every frame it receives.
struct Collect {
    tx: Sender<OwnedFrame>,
}

impl Handler for Collect {
    fn on_frame(&mut self, _conn: &Conn, frame: RecvFrame<'_>) {
        let _ = self.tx.send(frame.into_owned());
    }
}

fn cfg(threads: usize) -> TcpConfig {
    TcpConfig {
        threads,
        pin_cores: false,
        shm_messages: pserv_transport::ShmMessages::Off,
        ..TcpConfig::default()
    }
}

fn server() -> (TcpTransport, std::net::SocketAddr, Receiver<String>) {
    let (ctx, crx) = unbounded();
    let t = TcpTransport::start(cfg(2), |_| Echo {
        closes: ctx.clone(),
    })
    .unwrap();
    let addr = t.listen("127.0.0.1:0").unwrap();
    (t, addr, crx)
}

fn client() -> (TcpTransport, Receiver<OwnedFrame>) {
    let (tx, rx) = unbounded();
    let t = TcpTransport::start(cfg(1), |_| Collect { tx: tx.clone() }).unwrap();
    (t, rx)
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

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn echoes_small_and_large_frames_in_order() {
    let (_srv, addr, _closes) = server();
    let (cli, rx) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    let sizes = [1usize, 10, 1000, 100_000, 4 << 20, 3];
    for (i, &n) in sizes.iter().enumerate() {
        let keys: Vec<u64> = (0..n as u64).map(|k| k * 3).collect();
        let values: Vec<f32> = (0..n).map(|k| k as f32 + i as f32).collect();
        conn.send(push(i as u64, keys, values)).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let got = rx.recv_timeout(WAIT).expect("echo");
        let f = got.frame();
        assert_eq!(f.header().timestamp, i as u64);
        assert!(f.header().has(FLAG_RESPONSE));
        assert_eq!(f.keys().len(), n);
        assert_eq!(f.keys()[n - 1], (n as u64 - 1) * 3);
        let v = f.values_as::<f32>().unwrap();
        assert_eq!(v[n - 1], (n - 1) as f32 + i as f32);
    }
    assert!(
        cli.stats()
            .bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            > 4 << 20
    );
}

#[test]
fn many_frames_in_flight_from_shared_buffers() {
    let (_srv, addr, _closes) = server();
    let (cli, rx) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    let data: Arc<dyn pserv_transport::AsBytes> =
        Arc::new((0..1024u32).map(|x| x as f32).collect::<Vec<f32>>());
    let n = 2000u64;
    for ts in 0..n {
        let off = (ts as usize % 1000) * 4;
        let mut h = Header::new(MessageKind::Push, 3, ts);
        h.dtype = DType::F32 as u8;
        h.value_len = 1;
        let f = OutFrame::new(
            h,
            Payload::owned(vec![ts]),
            Payload::shared(data.clone(), off..off + 4),
        );
        conn.send(f).unwrap();
    }
    for ts in 0..n {
        let got = rx.recv_timeout(WAIT).expect("echo");
        let f = got.frame();
        assert_eq!(f.header().timestamp, ts);
        assert_eq!(f.values_as::<f32>().unwrap(), &[(ts % 1000) as f32]);
    }
}

#[test]
fn garbage_and_vanishing_peers_do_not_disturb_others() {
    let (_srv, addr, closes) = server();
    let (cli, rx) = client();
    let good = cli.connect(addr, WAIT).unwrap();
    good.send(push(1, vec![1], vec![1.0])).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().frame().header().timestamp, 1);

    // Garbage: not a pserv header.
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    raw.write_all(&[0xAB; 200]).unwrap();
    let reason = closes.recv_timeout(WAIT).unwrap();
    assert!(reason.contains("bad magic"), "{reason}");

    // An oversize announcement is refused before its body is read.
    let mut raw2 = std::net::TcpStream::connect(addr).unwrap();
    let mut h = Header::new(MessageKind::Push, 9, 9);
    h.key_count = 1 << 40;
    raw2.write_all(h.as_bytes()).unwrap();
    let reason = closes.recv_timeout(WAIT).unwrap();
    assert!(reason.contains("exceeds the maximum"), "{reason}");

    // A valid header, half a body, then the peer vanishes.
    let mut raw3 = std::net::TcpStream::connect(addr).unwrap();
    let bytes = wire::encode(
        &{
            let mut h = Header::new(MessageKind::Push, 9, 9);
            h.dtype = DType::F32 as u8;
            h.value_len = 1;
            h
        },
        &[1, 2, 3, 4],
        bytemuck::cast_slice(&[1.0f32; 4]),
    );
    raw3.write_all(&bytes[..bytes.len() - 10]).unwrap();
    drop(raw3);
    let reason = closes.recv_timeout(WAIT).unwrap();
    assert!(reason.contains("mid-frame"), "{reason}");
    drop(raw);
    drop(raw2);

    // The good connection still works.
    good.send(push(2, vec![5, 6], vec![2.0, 3.0])).unwrap();
    let f = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(f.frame().header().timestamp, 2);
    assert_eq!(f.frame().values_as::<f32>().unwrap(), &[2.0, 3.0]);
}

#[test]
fn sending_on_a_closed_connection_is_an_error() {
    let (srv, addr, _closes) = server();
    let (cli, _rx) = client();
    let conn = cli.connect(addr, WAIT).unwrap();
    srv.shutdown();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if conn.send(push(1, vec![1], vec![1.0])).is_err() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "send kept succeeding");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(conn.is_closed());
}

#[test]
fn a_slow_reader_gets_backpressure_not_unbounded_queues() {
    // A peer that never reads: the sender's queue stays bounded and send blocks, so a
    // second thread observes the bound while the first is stuck.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _rx) = unbounded();
    let cli = TcpTransport::start(
        TcpConfig {
            send_queue_max_bytes: 1 << 20,
            ..cfg(1)
        },
        |_| Collect { tx: tx.clone() },
    )
    .unwrap();
    let conn = cli.connect(addr, WAIT).unwrap();
    let _peer = listener.accept().unwrap();
    let c2 = conn.clone();
    let sender = std::thread::spawn(move || {
        for i in 0..64u64 {
            if c2.send(push(i, vec![i], vec![0.0; 1])).is_err() {
                return i;
            }
            let big = vec![0u8; 256 << 10];
            let mut h = Header::new(MessageKind::Push, 1, i);
            h.dtype = DType::Bytes as u8;
            if c2
                .send(OutFrame::new(h, Payload::empty(), Payload::owned(big)))
                .is_err()
            {
                return i;
            }
        }
        64
    });
    std::thread::sleep(Duration::from_millis(500));
    let queued = conn.queued_bytes();
    assert!(queued <= (1 << 20) + (300 << 10), "queue grew to {queued}");
    assert!(
        !sender.is_finished(),
        "sender should be blocked by backpressure"
    );
    // Closing releases the blocked sender with an error.
    conn.close();
    let stopped_at = sender.join().unwrap();
    assert!(stopped_at < 64);
}

#[test]
fn borrowed_sends_reach_slow_readers_intact() {
    // The sender may wait only briefly for the reader, then must copy the rest and queue
    // it; the reader, slow at first, still gets every byte in order.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _rx) = unbounded();
    let cli = TcpTransport::start(cfg(1), |_| Collect { tx: tx.clone() }).unwrap();
    let conn = cli.connect(addr, WAIT).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    let a: Vec<u8> = (0..(6 << 20)).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..(2 << 20)).map(|i| (i % 13) as u8).collect();
    let mut h = Header::new(MessageKind::Pull, 1, 77);
    h.dtype = DType::Bytes as u8;
    let t = std::time::Instant::now();
    conn.send_borrowed(h, Payload::empty(), &[&a, &b], Duration::from_millis(20))
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "must not wait for the reader beyond its bound"
    );
    drop((a.clone(), b.clone()));
    // A frame sent after it arrives after it.
    conn.send(push(78, vec![1], vec![5.0])).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut all = Vec::new();
    use std::io::Read;
    let want =
        wire::pad8(wire::HEADER_LEN + a.len() + b.len()) + wire::pad8(wire::HEADER_LEN + 8 + 4);
    peer.set_read_timeout(Some(WAIT)).unwrap();
    while all.len() < want {
        let mut buf = vec![0u8; 1 << 20];
        let n = peer.read(&mut buf).unwrap();
        assert!(n > 0);
        all.extend_from_slice(&buf[..n]);
    }
    let words: Vec<u64> = all
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let bytes: &[u8] = bytemuck::cast_slice(&words);
    let (f, n) = pserv_transport::Frame::new_checked(bytes, wire::DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(f.header().timestamp, 77);
    assert_eq!(&f.values()[..a.len()], &a[..]);
    assert_eq!(&f.values()[a.len()..], &b[..]);
    let (g, _) = pserv_transport::Frame::new_checked(&bytes[n..], wire::DEFAULT_MAX_FRAME).unwrap();
    assert_eq!(g.header().timestamp, 78);
}
