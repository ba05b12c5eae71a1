//! Optional TLS for connections between hosts: frames encrypted and integrity-protected
//! by TLS 1.3 ([rustls], ring provider), with mutual certificate authentication against
//! a cluster CA.
//!
//! Every node holds a certificate and key signed by the cluster's CA and the CA's
//! certificate. A connecting node verifies the acceptor's chain against the CA, and the
//! acceptor requires a client certificate and verifies it against the same CA
//! ([`WebPkiClientVerifier`]). Nodes connect by IP address, so the name checked is the
//! same for every node: [`TLS_SERVER_NAME`] (`pserv`). Every node certificate must carry
//! it as a DNS subject alternative name (`pserv tls-certs` makes such certificates); any
//! holder of a certificate of the cluster CA is trusted alike, as any holder of the
//! cluster secret is.
//!
//! On a fresh connection, where [`TcpConfig::tls`](crate::tcp::TcpConfig::tls) is set:
//!
//! 1. the cluster-secret exchange of [`auth`](crate::auth), unchanged and in clear (it
//!    reveals nothing), when configured;
//! 2. the TLS handshake, blocking, bounded by [`TlsConfig::timeout`] (the connecting
//!    side in `connect`, the accepting side on the thread that authenticates accepted
//!    connections);
//! 3. the acceptor's verdict: one byte, [`TLS_VERDICT_OK`], as the first plaintext byte.
//!    Under TLS 1.3 a client's handshake ends before the server has checked the client's
//!    certificate; waiting for this byte makes a refused client certificate fail the
//!    connecting side's `connect` too (with the server's alert), not some later read;
//! 4. the connection is handed to its loop; every frame goes through the session.
//!
//! A failed handshake is one log line on each end naming the peer ([`TlsError`]), and
//! the connection is closed before any byte reached a handler. A TLS connection makes no
//! shared-memory or RDMA offer, and refuses one: its frames stay inside TLS, also
//! between processes of one host. Only TLS 1.3 is offered (so no downgrade to 1.2
//! exists); session tickets and resumption are off (connections are long-lived).
//!
//! The session ([`TlsSession`]) sits behind a lock of its own in the connection (rank
//! `Tls` in `tcp.rs`'s lock order: taken under the connection's `write`, or alone by the
//! loop's reads and by closing; nothing is taken under it).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use crate::auth::{peer_of, Restore};
use rustls::{ServerConnection, SupportedProtocolVersion};

/// The server name every node's certificate carries (as a DNS subject alternative name)
/// and every connecting node verifies, whatever address it connects to.
pub const TLS_SERVER_NAME: &str = "pserv";

/// The acceptor's verdict, its first plaintext byte on a connection it accepted.
pub const TLS_VERDICT_OK: u8 = 0x5a;

/// Bytes of TLS records a session holds for the socket before it takes no more
/// plaintext (the writer then sees `WouldBlock`).
pub const TLS_SEND_BUFFER_BYTES: usize = 1 << 20;

/// Bytes read from the socket at once, then fed to the session.
const TLS_READ_BUFFER_BYTES: usize = 128 << 10;

/// The largest PEM file read (a certificate chain, a key or a CA bundle).
const MAX_PEM_BYTES: u64 = 1 << 20;

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Why TLS could not be set up, or a handshake failed. Every handshake error names the
/// peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or holds nothing usable.
    #[error("TLS {what} file {path}: {why}")]
    File {
        /// Which file: `certificate`, `key` or `CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The certificates and key do not make a configuration (a key that does not match
    /// the certificate, a CA that is no CA).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The handshake with a peer failed.
    #[error("TLS handshake with the peer at {peer} failed: {why}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// Why, with a hint where one helps.
        why: String,
    },
    /// The peer did not finish the handshake within the bound.
    #[error("the peer at {peer} did not finish the TLS handshake within {timeout:?}")]
    Timeout {
        /// The peer.
        peer: SocketAddr,
        /// The bound.
        timeout: Duration,
    },
}

/// How a transport encrypts its connections: this node's certificate chain and key and
/// the cluster CA, as rustls configurations for both sides of a connection.
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The bound on a connection's handshake (and the acceptor's verdict).
    pub timeout: Duration,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsConfig(mutual, TLS 1.3, timeout {:?})", self.timeout)
    }
}

/// Read a PEM file of at most [`MAX_PEM_BYTES`].
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bad = |why: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(bad(format!(
            "has {} bytes, more than the {MAX_PEM_BYTES} read",
            meta.len()
        )));
    }
    if what == "key" {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "others than its owner may read or write it (mode {mode:03o}); a private key \
                 must be its owner's only: chmod 600 {}",
                path.display()
            )));
        }
    }
    std::fs::read(path).map_err(|e| bad(e.to_string()))
}

impl TlsConfig {
    /// TLS from PEM files: this node's certificate chain (its certificate first), its
    /// private key (PKCS#8, PKCS#1 or SEC1; the file must be readable by its owner only)
    /// and the cluster CA's certificate(s). A 5 s handshake bound.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<TlsConfig, TlsError> {
        let certs = read_pem("certificate", cert)?;
        let key_pem = read_pem("key", key)?;
        let ca_pem = read_pem("CA", ca)?;
        let file = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |why: String| TlsError::File { what, path, why }
        };
        let chain = parse_certs(&certs).map_err(file("certificate", cert))?;
        let key_der = parse_key(&key_pem).map_err(file("key", key))?;
        let roots = parse_roots(&ca_pem).map_err(file("CA", ca))?;
        TlsConfig::build(chain, key_der, roots)
    }

    /// TLS from PEM bytes (as [`from_pem_files`](Self::from_pem_files), without files;
    /// the key's permissions are the caller's business).
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<TlsConfig, TlsError> {
        let msg =
            |what: &'static str| move |why: String| TlsError::Config(format!("{what}: {why}"));
        let chain = parse_certs(cert).map_err(msg("certificate"))?;
        let key_der = parse_key(key).map_err(msg("key"))?;
        let roots = parse_roots(ca).map_err(msg("CA"))?;
        TlsConfig::build(chain, key_der, roots)
    }

    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<TlsConfig, TlsError> {
        // ring (no cmake, unlike aws-lc-rs); rustls 0.23.48 deprecates it for lacking
        // post-quantum key exchange, which this cluster-internal TLS does without.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("the client certificate verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(TLS13_ONLY)
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(format!("this node's certificate and key: {e}")))?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(TLS13_ONLY)
            .map_err(cfg_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("this node's certificate and key: {e}")))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            timeout: Duration::from_secs(5),
        })
    }
}

fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate (a PEM \"CERTIFICATE\" block)".into());
    }
    Ok(certs)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no PEM private key: {e}"))
}

fn parse_roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("a certificate that is no usable CA: {e}"))?;
    }
    Ok(roots)
}

/// A connection's TLS session once its handshake is done: the rustls state and the
/// ciphertext read from the socket but not yet fed to it.
pub(crate) struct TlsSession {
    conn: Connection,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// The socket reported its end.
    eof: bool,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsSession")
    }
}

/// A rustls error as an `io::Error` (a session in error stays in it).
fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsSession {
    fn new(mut conn: Connection) -> TlsSession {
        conn.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
        TlsSession {
            conn,
            inbuf: vec![0u8; TLS_READ_BUFFER_BYTES].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            eof: false,
        }
    }

    /// Whether records wait for the socket.
    pub(crate) fn pending(&self) -> bool {
        self.conn.wants_write()
    }

    /// Write the records waiting for the socket, as far as the non-blocking socket takes
    /// them. Returns the bytes written; `WouldBlock` when some are left (the socket's
    /// next writable edge must flush again).
    pub(crate) fn flush(&mut self, stream: &TcpStream) -> io::Result<usize> {
        let mut s = stream;
        let mut total = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut s) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Give plaintext to the session and write its records to the socket. Like a
    /// non-blocking socket write: the bytes taken (`WouldBlock` when none, because the
    /// session holds [`TLS_SEND_BUFFER_BYTES`] of records the socket did not take). Taken
    /// bytes whose records are still in the session go out at the next `flush`.
    pub(crate) fn write_plain(
        &mut self,
        stream: &TcpStream,
        slices: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        // Older records first: they make room for the new ones.
        match self.flush(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = self.conn.writer().write_vectored(slices)?;
        match self.flush(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let asked: usize = slices.iter().map(|s| s.len()).sum();
        if n == 0 && asked > 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Read plaintext, like a non-blocking socket read: `Ok(0)` once the peer closed the
    /// session cleanly (its `close_notify`) and everything before it was read;
    /// `WouldBlock` when the socket has no more records; an error for a TCP end without
    /// `close_notify` (a truncation) and for a record that does not decrypt. Records the
    /// session makes while reading (alerts, key updates) are written, as far as the
    /// socket takes them.
    pub(crate) fn read_plain(&mut self, stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        loop {
            match self.conn.reader().read(&mut buf[got..]) {
                Ok(n) if n > 0 => {
                    got += n;
                    if got == buf.len() {
                        return Ok(got);
                    }
                    continue;
                }
                Ok(_) => return Ok(got),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if got > 0 => {
                    // Deliver what came; the next read reports the end again.
                    let _ = e;
                    return Ok(got);
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer ended the TCP connection without closing its TLS session \
                         (no close_notify): it failed, or the stream was cut",
                    ))
                }
                Err(e) => return Err(e),
            }
            if self.in_start < self.in_end {
                let mut s = &self.inbuf[self.in_start..self.in_end];
                let n = self.conn.read_tls(&mut s)?;
                self.in_start += n;
                if n == 0 {
                    // Closed cleanly already: nothing more is read.
                    self.in_start = self.in_end;
                }
                self.process(stream)?;
                continue;
            }
            if got > 0 {
                // Before another system call: what came is delivered first.
                return Ok(got);
            }
            if self.eof {
                // Tell the session (once more) that the stream ended.
                let _ = self.conn.read_tls(&mut io::empty());
                self.process(stream)?;
                return match self.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer ended the TCP connection without closing its TLS session \
                         (no close_notify): it failed, or the stream was cut",
                    )),
                    Err(e) => Err(e),
                };
            }
            match (&*stream).read(&mut self.inbuf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.in_start = 0;
                    self.in_end = n;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Process the records fed in; write what that made (alerts, key updates).
    fn process(&mut self, stream: &TcpStream) -> io::Result<()> {
        let processed = self.conn.process_new_packets();
        // Whatever it made goes out (an alert too, before the error closes).
        match self.flush(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if processed.is_ok() => return Err(e),
            Err(_) => {}
        }
        processed.map(|_| ()).map_err(tls_io)
    }

    /// Send `close_notify` (best effort, not waiting for the socket): the peer then reads
    /// a clean end.
    pub(crate) fn close(&mut self, stream: &TcpStream) {
        self.conn.send_close_notify();
        let _ = self.flush(stream);
    }
}

/// A blocking handshake step bounded by a deadline.
struct Bounded<'a> {
    stream: &'a TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    timeout: Duration,
    /// Which side this is (for the hints).
    client: bool,
}

impl Bounded<'_> {
    fn arm(&self) -> Result<(), TlsError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        self.stream
            .set_read_timeout(Some(left))
            .and_then(|_| self.stream.set_write_timeout(Some(left)))
            .map_err(|e| self.fail(e))
    }

    fn timed_out(&self) -> TlsError {
        TlsError::Timeout {
            peer: self.peer,
            timeout: self.timeout,
        }
    }

    /// A handshake I/O error, with a hint.
    fn fail(&self, e: io::Error) -> TlsError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return self.timed_out(),
            _ => {}
        }
        let text = e.to_string();
        let hint = if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ) {
            " (the peer closed the connection: it may run without TLS (no --tls-cert), or \
             have refused this node's certificate)"
        } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
            " (the peer's bytes are no TLS: it runs without TLS (no --tls-cert), or is no \
             pserv node)"
        } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
            if self.client {
                " (the acceptor's certificate is not signed by this cluster's CA: check --tls-ca)"
            } else {
                " (the connecting node's certificate is not signed by this cluster's CA: check --tls-ca)"
            }
        } else if text.contains("NotValidForName") {
            " (the acceptor's certificate does not name `pserv`: make node certificates with \
             `pserv tls-certs`)"
        } else if text.contains("CertificateRequired") || text.contains("NoCertificatesPresented") {
            " (the connecting node presented no certificate)"
        } else if text.contains("UnknownCA") || text.contains("BadCertificate") {
            " (the peer refused this node's certificate: is it signed by the cluster's CA?)"
        } else {
            ""
        };
        TlsError::Handshake {
            peer: self.peer,
            why: format!("{text}{hint}"),
        }
    }

    /// Run the handshake to its end.
    fn handshake(&self, conn: &mut Connection) -> Result<(), TlsError> {
        let mut s = self.stream;
        while conn.is_handshaking() {
            self.arm()?;
            match conn.complete_io(&mut s) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        while conn.wants_write() {
            self.arm()?;
            match conn.write_tls(&mut s) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(())
    }
}

/// Blocking mode for a handshake, restored (and timeouts cleared) on every exit: the
/// same guard the secret's exchange uses.
fn blocking(stream: &TcpStream, nonblocking: bool) -> Result<Restore<'_>, TlsError> {
    Restore::blocking(stream, nonblocking).map_err(|e| TlsError::Handshake {
        peer: peer_of(stream),
        why: e.to_string(),
    })
}

/// The connecting side: handshake (verifying the acceptor's certificate against the CA
/// under [`TLS_SERVER_NAME`], presenting this node's), then wait for the acceptor's
/// verdict. `nonblocking` is the mode the stream is left in.
pub(crate) fn connect_side(
    stream: &TcpStream,
    cfg: &TlsConfig,
    nonblocking: bool,
) -> Result<TlsSession, TlsError> {
    let _mode = blocking(stream, nonblocking)?;
    let b = Bounded {
        stream,
        peer: peer_of(stream),
        deadline: Instant::now() + cfg.timeout,
        timeout: cfg.timeout,
        client: true,
    };
    let name = ServerName::try_from(TLS_SERVER_NAME).expect("a valid DNS name");
    let mut conn: Connection = ClientConnection::new(cfg.client.clone(), name)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .into();
    b.handshake(&mut conn)?;
    // The verdict: the acceptor's first plaintext byte, or its alert.
    let mut s = stream;
    let mut byte = [0u8; 1];
    loop {
        match conn.reader().read(&mut byte) {
            Ok(1) if byte[0] == TLS_VERDICT_OK => break,
            Ok(1) => {
                return Err(TlsError::Handshake {
                    peer: b.peer,
                    why: format!("its first byte is {:#04x}, no TLS verdict", byte[0]),
                })
            }
            Ok(_) => return Err(b.fail(io::ErrorKind::UnexpectedEof.into())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(b.fail(e)),
        }
        b.arm()?;
        match conn.read_tls(&mut s) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(b.fail(e)),
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(&mut s);
            return Err(b.fail(tls_io(e)));
        }
    }
    Ok(TlsSession::new(conn))
}

/// The accepting side: handshake (requiring a client certificate of the CA), then send
/// the verdict. `nonblocking` is the mode the stream is left in.
pub(crate) fn accept_side(
    stream: &TcpStream,
    cfg: &TlsConfig,
    nonblocking: bool,
) -> Result<TlsSession, TlsError> {
    let _mode = blocking(stream, nonblocking)?;
    let b = Bounded {
        stream,
        peer: peer_of(stream),
        deadline: Instant::now() + cfg.timeout,
        timeout: cfg.timeout,
        client: false,
    };
    let mut conn: Connection = ServerConnection::new(cfg.server.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?
        .into();
    b.handshake(&mut conn)?;
    conn.writer()
        .write_all(&[TLS_VERDICT_OK])
        .map_err(|e| b.fail(e))?;
    let mut s = stream;
    while conn.wants_write() {
        b.arm()?;
        match conn.write_tls(&mut s) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(b.fail(e)),
        }
    }
    Ok(TlsSession::new(conn))
}

/// Whether `bytes` (at least two) start like a TLS record (a handshake or an alert),
/// which a pserv frame or hello never does.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && matches!(bytes[0], 0x15 | 0x16) && bytes[1] == 0x03
}
