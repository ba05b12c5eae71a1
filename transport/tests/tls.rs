//! TLS connections end to end (certificates made here with rcgen): small and large
//! frames flow both ways, many in flight, and what crosses the wire is not the
//! plaintext (a recording proxy in between); a client certificate of another CA, or
//! none, is refused on both ends; a node with TLS and one without refuse each other.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use pserv_transport::wire::{DType, Header, MessageKind, FLAG_RESPONSE};
use pserv_transport::{
    AuthConfig, CloseReason, Conn, Handler, OutFrame, OwnedFrame, Payload, RecvFrame, Secret,
    ShmMessages, TcpConfig, TcpTransport, TlsConfig, TlsError, TransportError,
};

const WAIT: Duration = Duration::from_secs(60);

/// A recognisable plaintext: no 16 bytes of ciphertext are these by chance.
const PATTERN: &[u8; 16] = b"PLAINTEXT-PSERV!";

/// Echoes frames; reports opens and closes.
struct Echo {
    events: Sender<String>,
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
    fn on_open(&mut self, conn: &Conn) {
        let _ = self.events.send(format!("open {}", conn.path()));
    }
    fn on_close(&mut self, _conn: &Conn, reason: &CloseReason) {
        let _ = self.events.send(format!("close {reason}"));
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

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = p.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A node's (certificate, key) PEM, signed by `ca`, for the name `pserv`.
fn node(ca: &Ca) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["pserv".to_string()]).unwrap();
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// TLS for a node of `ca`, trusting `trust`.
fn tls(ca: &Ca, trust: &Ca) -> Option<TlsConfig> {
    let (cert, key) = node(ca);
    let mut t =
        TlsConfig::from_pem(cert.as_bytes(), key.as_bytes(), trust.cert.pem().as_bytes()).unwrap();
    t.timeout = Duration::from_secs(5);
    Some(t)
}

fn secret() -> Option<AuthConfig> {
    Some(AuthConfig::new(
        Secret::from_bytes(b"the cluster's own secret").unwrap(),
    ))
}

fn cfg(auth: Option<AuthConfig>, tls: Option<TlsConfig>) -> TcpConfig {
    TcpConfig {
        threads: 1,
        pin_cores: false,
        shm_messages: ShmMessages::SameHost,
        auth,
        tls,
        ..TcpConfig::default()
    }
}

fn server(
    auth: Option<AuthConfig>,
    tls: Option<TlsConfig>,
) -> (TcpTransport, SocketAddr, Receiver<String>) {
    let (tx, events) = unbounded();
    let t = TcpTransport::start(cfg(auth, tls), |_| Echo { events: tx.clone() }).unwrap();
    let addr = t.listen("127.0.0.1:0").unwrap();
    (t, addr, events)
}

fn client(
    auth: Option<AuthConfig>,
    tls: Option<TlsConfig>,
) -> (TcpTransport, Receiver<OwnedFrame>, Receiver<String>) {
    let (tx, rx) = unbounded();
    let (ctx, closes) = unbounded();
    let t = TcpTransport::start(cfg(auth, tls), |_| Collect {
        tx: tx.clone(),
        closes: ctx.clone(),
    })
    .unwrap();
    (t, rx, closes)
}

/// A push of `len` bytes of values (the pattern over and over) at timestamp `ts`.
fn push(ts: u64, len: usize) -> OutFrame {
    let mut h = Header::new(MessageKind::Push, 0, ts);
    h.dtype = DType::F32 as u8;
    h.value_len = (len / 4) as u32;
    let values: Vec<u8> = PATTERN.iter().copied().cycle().take(len).collect();
    OutFrame::new(h, Payload::owned(vec![ts]), Payload::owned(values))
}

/// What a proxy saw pass, both ways.
#[derive(Default)]
struct Seen {
    bytes: u64,
    pattern: bool,
}

/// A TCP proxy for one connection to `to`, recording whether [`PATTERN`] passed.
fn proxy(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        let pipe = |mut from: TcpStream, mut to: TcpStream, seen: Arc<Mutex<Seen>>| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                // The last bytes of the previous read: a pattern may straddle reads.
                let mut tail: Vec<u8> = Vec::new();
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    tail.extend_from_slice(&buf[..n]);
                    let found = tail.windows(PATTERN.len()).any(|w| w == PATTERN);
                    {
                        let mut s = seen.lock().unwrap();
                        s.bytes += n as u64;
                        s.pattern |= found;
                    }
                    let keep = tail.len().min(PATTERN.len() - 1);
                    tail.drain(..tail.len() - keep);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            })
        };
        let t1 = pipe(
            a.try_clone().unwrap(),
            b.try_clone().unwrap(),
            seen2.clone(),
        );
        let t2 = pipe(b, a, seen2);
        let _ = (t1.join(), t2.join());
    });
    (addr, seen)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The proxy's own check: the pattern is found when it passes in clear.
#[test]
fn the_proxy_sees_the_pattern_of_a_connection_without_tls() {
    // Without TLS a connection on this host moves to shared memory: keep it on TCP.
    let tcp = || TcpConfig {
        shm_messages: ShmMessages::Off,
        ..cfg(None, None)
    };
    let (tx, _events) = unbounded();
    let srv = TcpTransport::start(tcp(), |_| Echo { events: tx.clone() }).unwrap();
    let addr = srv.listen("127.0.0.1:0").unwrap();
    let (proxy_addr, seen) = proxy(addr);
    let (tx, rx) = unbounded();
    let (ctx, _closes) = unbounded();
    let cli = TcpTransport::start(tcp(), |_| Collect {
        tx: tx.clone(),
        closes: ctx.clone(),
    })
    .unwrap();
    let conn = cli.connect(proxy_addr, WAIT).unwrap();
    assert_eq!(conn.path(), "tcp");
    conn.send(push(1, 1024)).unwrap();
    rx.recv_timeout(WAIT).expect("echo");
    assert!(
        seen.lock().unwrap().pattern,
        "the plain pattern was not seen"
    );
}

/// With TLS (after the secret's exchange): 1 KiB and 16 MiB frames, many in flight,
/// both ways, arrive intact and in order; the proxy never sees the plaintext.
#[test]
fn frames_flow_both_ways_inside_tls_and_the_wire_shows_no_plaintext() {
    let ca = ca("cluster CA");
    let (srv, addr, events) = server(secret(), tls(&ca, &ca));
    let (proxy_addr, seen) = proxy(addr);
    let (cli, rx, _closes) = client(secret(), tls(&ca, &ca));
    let conn = cli.connect(proxy_addr, WAIT).unwrap();
    assert!(conn.is_tls());
    assert_eq!(conn.path(), "tls");
    let opened = events.recv_timeout(WAIT).unwrap();
    assert_eq!(opened, "open tls");
    const SMALL: usize = 1 << 10;
    const BIG: usize = 16 << 20;
    let sizes: Vec<usize> = (0..400u64)
        .map(|i| if i % 100 == 50 { BIG } else { SMALL })
        .collect();
    let sender = {
        let conn = conn.clone();
        let sizes = sizes.clone();
        std::thread::spawn(move || {
            for (ts, &len) in sizes.iter().enumerate() {
                conn.send(push(ts as u64, len)).unwrap();
            }
        })
    };
    let mut plain = 0u64;
    for (ts, &len) in sizes.iter().enumerate() {
        let f = rx.recv_timeout(WAIT).expect("an echo");
        let frame = f.frame();
        assert_eq!(frame.header().timestamp, ts as u64, "echoes in order");
        let values = frame.values();
        assert_eq!(values.len(), len);
        assert!(
            values
                .chunks(PATTERN.len())
                .all(|c| c == &PATTERN[..c.len()]),
            "frame {ts}'s values changed on the way"
        );
        plain += 2 * len as u64;
    }
    sender.join().unwrap();
    let s = seen.lock().unwrap();
    assert!(
        s.bytes >= plain,
        "the proxy saw {} bytes, less than the {plain} of values",
        s.bytes
    );
    assert!(!s.pattern, "the plaintext pattern crossed the wire");
    assert_eq!(cli.stats().tls_connections.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().tls_connections.load(Ordering::Relaxed), 1);
    assert_eq!(cli.stats().shm_connections.load(Ordering::Relaxed), 0);
    drop(s);
    // A clean close: the server reads the close_notify, not a cut stream.
    conn.close();
    let closed = events.recv_timeout(WAIT).unwrap();
    assert_eq!(closed, "close peer closed the connection");
}

/// A raw rustls client that presents no certificate, trusting `ca`.
fn connect_without_certificate(addr: SocketAddr, ca: &Ca) -> Result<(), String> {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("pserv").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => Ok(()),
        Ok(_) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A client certificate of another CA, or none, is refused on both ends (the client's
/// connect fails with the server's alert; the server counts a failed handshake and no
/// connection reaches its handler); a server of another CA is refused by the client; the
/// server then still serves a client of its CA.
#[test]
fn a_certificate_of_another_ca_or_none_is_refused_on_both_ends() {
    let ca1 = ca("cluster CA");
    let ca2 = ca("another CA");
    let (srv, addr, events) = server(None, tls(&ca1, &ca1));
    let failed = || srv.stats().tls_failed.load(Ordering::Relaxed);

    // A certificate of another CA (trusting the right one).
    let (cli, _rx, _closes) = client(None, tls(&ca2, &ca1));
    match cli.connect(addr, WAIT) {
        Err(TransportError::Tls {
            why: TlsError::Handshake { why, .. },
            ..
        }) => assert!(why.contains("alert"), "{why}"),
        other => panic!(
            "another CA's certificate connected: {:?}",
            other.map(|c| c.id())
        ),
    }
    assert_eq!(cli.stats().tls_failed.load(Ordering::Relaxed), 1);
    wait_for("the server's failed handshake", || failed() == 1);

    // No certificate at all.
    let e = connect_without_certificate(addr, &ca1).expect_err("connected without a certificate");
    assert!(e.contains("CertificateRequired"), "{e}");
    wait_for("the server's second failed handshake", || failed() == 2);

    // A server of another CA, seen from a client of the right one.
    let (srv2, addr2, events2) = server(None, tls(&ca2, &ca2));
    let (cli, _rx, _closes) = client(None, tls(&ca1, &ca1));
    match cli.connect(addr2, WAIT) {
        Err(TransportError::Tls {
            why: TlsError::Handshake { why, .. },
            ..
        }) => assert!(why.contains("UnknownIssuer"), "{why}"),
        other => panic!(
            "a server of another CA was taken: {:?}",
            other.map(|c| c.id())
        ),
    }
    wait_for("the other server's failed handshake", || {
        srv2.stats().tls_failed.load(Ordering::Relaxed) == 1
    });
    assert!(events2.try_recv().is_err(), "a refused connection opened");

    // Nothing reached the handler; a good client is still served.
    assert!(events.try_recv().is_err(), "a refused connection opened");
    let (cli, rx, _closes) = client(None, tls(&ca1, &ca1));
    let conn = cli.connect(addr, WAIT).unwrap();
    conn.send(push(7, 100)).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap().frame().header().timestamp, 7);
    assert_eq!(srv.stats().tls_connections.load(Ordering::Relaxed), 1);
}

/// A node with TLS and one without refuse each other, with reasons on both ends.
#[test]
fn tls_against_a_node_without_tls_is_refused_both_ways() {
    let ca = ca("cluster CA");
    // TLS connecting to a node without: its handshake fails; the other side says why.
    let (_plain, plain_addr, events) = server(secret(), None);
    let (cli, _rx, _closes) = client(secret(), tls(&ca, &ca));
    match cli.connect(plain_addr, WAIT) {
        Err(TransportError::Tls { why, .. }) => {
            let why = why.to_string();
            assert!(why.contains("without TLS"), "{why}");
        }
        other => panic!("TLS connected to a plain node: {:?}", other.map(|c| c.id())),
    }
    let mut seen = Vec::new();
    while let Ok(e) = events.recv_timeout(Duration::from_secs(10)) {
        let done = e.starts_with("close");
        seen.push(e);
        if done {
            break;
        }
    }
    assert!(
        seen.last()
            .is_some_and(|e| e.contains("speaks TLS") && e.contains("without TLS")),
        "{seen:?}"
    );

    // A node without TLS connecting to one with: its first frame ends the connection,
    // unanswered; the TLS side counts a failed handshake and opened nothing.
    let (srv, tls_addr, events) = server(secret(), tls(&ca, &ca));
    let (cli, rx, closes) = client(secret(), None);
    let conn = cli.connect(tls_addr, WAIT).unwrap();
    let _ = conn.send(push(1, 64));
    wait_for("the plain connection to close", || conn.is_closed());
    assert!(rx.try_recv().is_err(), "a plain frame was answered");
    let why = closes.recv_timeout(WAIT).unwrap();
    assert!(why.contains("speaks TLS"), "{why}");
    assert_eq!(srv.stats().tls_failed.load(Ordering::Relaxed), 1);
    assert!(events.try_recv().is_err(), "a plain connection opened");
}

/// Missing or bad files are errors naming the file; a key others may read is refused.
#[test]
fn bad_certificate_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("pserv-tls-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca("cluster CA");
    let (cert, key) = node(&ca);
    let (c, k, a) = (
        dir.join("node.pem"),
        dir.join("node.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    std::fs::write(&a, ca.cert.pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = TlsConfig::from_pem_files(&c, &k, &a)
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.key") && e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    TlsConfig::from_pem_files(&c, &k, &a).unwrap();
    let e = TlsConfig::from_pem_files(&dir.join("missing.pem"), &k, &a)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate") && e.contains("missing.pem"),
        "{e}"
    );
    // A key where the CA belongs: no certificate in it.
    let e = TlsConfig::from_pem_files(&c, &k, &k)
        .unwrap_err()
        .to_string();
    assert!(e.contains("CA") && e.contains("node.key"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
