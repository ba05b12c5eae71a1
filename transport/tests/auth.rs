//! Authenticated connections end to end, on TCP and on the shared-memory path: the same
//! secret connects and frames flow; another secret, no secret, a stranger's bytes or a
//! frame under another node's id are refused, with a message, and the listener keeps
//! serving the others.

use std::io::{Read, Write};
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use pserv_transport::wire::{DType, Header, MessageKind, FLAG_RESPONSE};
use pserv_transport::{
    AuthConfig, AuthError, CloseReason, Conn, Handler, OutFrame, OwnedFrame, Payload, RecvFrame,
    Secret, ShmMessages, TcpConfig, TcpTransport, TransportError,
};

const WAIT: Duration = Duration::from_secs(20);

/// Echoes frames; reports closes.
struct Echo {
    closes: Sender<String>,
}

impl Handler for Echo {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        let f = frame.frame();
        let mut h = *f.header();
        h.flags |= FLAG_RESPONSE;
        let _ = conn.send(OutFrame::new(
            h,
            Payload::copy_from(bytemuck::cast_slice(f.keys())),
            Payload::copy_from(f.values()),
        ));
    }
    fn on_close(&mut self, _conn: &Conn, reason: &CloseReason) {
        let _ = self.closes.send(reason.to_string());
    }
}

struct Collect {
    tx: Sender<OwnedFrame>,
}

impl Handler for Collect {
    fn on_frame(&mut self, _conn: &Conn, frame: RecvFrame<'_>) {
        let _ = self.tx.send(frame.into_owned());
    }
}

fn secret(s: &[u8]) -> Option<AuthConfig> {
    Some(AuthConfig {
        timeout: Duration::from_secs(2),
        ..AuthConfig::new(Secret::from_bytes(s).unwrap())
    })
}

fn cfg(auth: Option<AuthConfig>, shm: ShmMessages) -> TcpConfig {
    TcpConfig {
        threads: 1,
        pin_cores: false,
        shm_messages: shm,
        auth,
        ..TcpConfig::default()
    }
}

fn server(auth: Option<AuthConfig>) -> (TcpTransport, std::net::SocketAddr, Receiver<String>) {
    let (tx, closes) = unbounded();
    let t = TcpTransport::start(cfg(auth, ShmMessages::SameHost), |_| Echo {
        closes: tx.clone(),
    })
    .unwrap();
    let addr = t.listen("127.0.0.1:0").unwrap();
    (t, addr, closes)
}

fn client(auth: Option<AuthConfig>, shm: ShmMessages) -> (TcpTransport, Receiver<OwnedFrame>) {
    let (tx, rx) = unbounded();
    let t = TcpTransport::start(cfg(auth, shm), |_| Collect { tx: tx.clone() }).unwrap();
    (t, rx)
}

fn push(sender: u32, ts: u64) -> OutFrame {
    let mut h = Header::new(MessageKind::Push, sender, ts);
    h.dtype = DType::F32 as u8;
    h.value_len = 1;
    OutFrame::new(h, Payload::owned(vec![ts]), Payload::owned(vec![ts as f32]))
}

const S1: &[u8] = b"the first cluster's secret";
const S2: &[u8] = b"another cluster's secret!!";

/// The same secret: frames flow both ways, on TCP and on shared memory.
#[test]
fn the_same_secret_connects_over_tcp_and_shared_memory() {
    let (_srv, addr, _closes) = server(secret(S1));
    for shm in [ShmMessages::Off, ShmMessages::SameHost] {
        let (cli, rx) = client(secret(S1), shm);
        cli.set_identity(9);
        let conn = cli.connect(addr, WAIT).unwrap();
        for ts in 0..100 {
            conn.send(push(9, ts)).unwrap();
        }
        for ts in 0..100 {
            let f = rx.recv_timeout(WAIT).expect("echo");
            assert_eq!(f.frame().header().timestamp, ts);
        }
        if shm == ShmMessages::SameHost {
            let deadline = std::time::Instant::now() + WAIT;
            while !conn.is_shm() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(conn.is_shm(), "the connection moved to shared memory");
        }
    }
}

/// Another secret, or none, is refused on both ends with a message; the listener then
/// still serves a client with the right secret.
#[test]
fn a_wrong_or_missing_secret_is_refused_and_the_others_are_served() {
    let (_srv, addr, _closes) = server(secret(S1));
    let (cli, _rx) = client(secret(S2), ShmMessages::Off);
    match cli.connect(addr, WAIT) {
        Err(TransportError::Auth {
            why: AuthError::WrongSecret { .. },
            ..
        }) => {}
        other => panic!("another secret connected: {:?}", other.map(|c| c.id())),
    }
    // No secret at all: the connection is made, its first frame closes it unanswered.
    let (cli, rx) = client(None, ShmMessages::Off);
    let conn = cli.connect(addr, WAIT).unwrap();
    let _ = conn.send(push(0, 1));
    assert!(rx.recv_timeout(Duration::from_secs(2)).is_err());
    let deadline = std::time::Instant::now() + WAIT;
    while !conn.is_closed() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(conn.is_closed(), "an unauthenticated connection was kept");
    // The right secret still works.
    let (cli, rx) = client(secret(S1), ShmMessages::Off);
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(push(0, 7)).unwrap();
    assert_eq!(
        rx.recv_timeout(WAIT)
            .expect("served")
            .frame()
            .header()
            .timestamp,
        7
    );
}

/// A node with a secret connecting to one without: both sides say why.
#[test]
fn a_secret_against_an_insecure_node_is_refused_with_reasons_on_both_ends() {
    let (_srv, addr, closes) = server(None);
    let (cli, _rx) = client(secret(S1), ShmMessages::Off);
    let e = match cli.connect(addr, WAIT) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an insecure node took an authenticated connection"),
    };
    assert!(
        e.contains("closed the connection during authentication"),
        "{e}"
    );
    let why = closes.recv_timeout(WAIT).expect("the insecure side closed");
    assert!(why.contains("runs without one"), "{why}");
}

/// A frame under another node's id closes the connection; a frame under the
/// authenticated id is served.
#[test]
fn a_frame_under_another_senders_id_closes_the_connection() {
    let (_srv, addr, closes) = server(secret(S1));
    let (cli, rx) = client(secret(S1), ShmMessages::Off);
    cli.set_identity(4);
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(push(4, 1)).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().frame().header().timestamp, 1);
    let _ = conn.send(push(5, 2));
    let why = closes.recv_timeout(WAIT).expect("closed");
    assert!(why.contains("claims sender 5"), "{why}");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

/// A stranger that speaks first with other bytes, or says nothing, is closed within the
/// bound and costs the loop nothing: a good client is served meanwhile.
#[test]
fn strangers_are_closed_within_the_bound_while_others_are_served() {
    let (_srv, addr, _closes) = server(secret(S1));
    let mut silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut garbage = std::net::TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0xAB; 64]).unwrap();
    let (cli, rx) = client(secret(S1), ShmMessages::Off);
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(push(0, 3)).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().frame().header().timestamp, 3);
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(garbage.read(&mut b).unwrap_or(0), 0, "garbage is closed");
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Past the 2 s bound the acceptor closes (the challenge never came: nothing to read).
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "a silent peer is closed");
    }
}
