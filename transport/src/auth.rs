//! Authenticated connections: a mutual challenge-response over a cluster secret, run on
//! every connection before any other byte (frames, shared-memory or RDMA hellos).
//!
//! Every node of a cluster holds the same secret (32 random bytes or more, from a file
//! only its owner can read). A connection is usable only once both ends proved that they
//! hold it, over nonces both chose fresh, and the connecting side named the node id it
//! speaks as. The accepting side then delivers only frames whose `sender` is that id
//! (a connection that named 0, a node without an id yet such as one registering with the
//! scheduler or `pserv status`, is not checked so: the application decides what it may
//! do). The exchange, all over the fresh TCP stream (fixed sizes, little-endian):
//!
//! ```text
//! connector -> acceptor  HELLO     "PSVAUTH1" identity:u32 flags:u32 nonce_c[32]      48 bytes
//! acceptor  -> connector CHALLENGE "PSVAUTH1" nonce_s[32] mac_a[32]                   72 bytes
//! connector -> acceptor  PROOF     mac_c[32]                                          32 bytes
//! acceptor  -> connector VERDICT   "PSVV" code:u32 (0 accepted; else why not)          8 bytes
//!
//! mac_a = HMAC-SHA256(secret, "pserv auth v1 acceptor"  | nonce_c | nonce_s | identity)
//! mac_c = HMAC-SHA256(secret, "pserv auth v1 connector" | nonce_c | nonce_s | identity)
//! ```
//!
//! The connector checks `mac_a` before it answers (an acceptor without the secret learns
//! nothing it could replay: the next connector's nonce differs), the acceptor checks
//! `mac_c` (a recorded proof is worthless: its nonce differs every time); the two labels
//! keep one side's proof from being reflected as the other's. MACs are compared in
//! constant time.
//!
//! What this does not do: it authenticates the two ends when the connection is made and
//! binds the sender id; it does not encrypt or sign the frames that follow. A party that
//! can inject packets into an established TCP connection (on the path between two
//! hosts) is not stopped by it; on such networks run the cluster over a network that is
//! private to it (the usual InfiniBand or cluster fabric), or tunnel it (WireGuard,
//! IPsec). Every holder of the secret is trusted alike: a node that holds it can claim
//! any node id when it connects.
//!
//! Every step is bounded by [`AuthConfig::timeout`]; a peer that says nothing, says
//! something else, or proves nothing gets a [`AuthError`] that names it, and the
//! connection is closed before anything reached the application.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The magic the first two messages start with.
pub const AUTH_MAGIC: [u8; 8] = *b"PSVAUTH1";
/// Length of the connector's hello.
pub const AUTH_HELLO_LEN: usize = 48;
/// Length of the acceptor's challenge.
pub const CHALLENGE_LEN: usize = 72;
/// Length of the connector's proof.
pub const PROOF_LEN: usize = 32;
/// Length of the acceptor's verdict.
pub const VERDICT_LEN: usize = 8;
const VERDICT_MAGIC: [u8; 4] = *b"PSVV";
/// Length of a nonce.
pub const NONCE_LEN: usize = 32;
const LABEL_ACCEPTOR: &[u8] = b"pserv auth v1 acceptor";
const LABEL_CONNECTOR: &[u8] = b"pserv auth v1 connector";

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// The longest secret file read, in bytes.
const MAX_SECRET_BYTES: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// A cluster secret. Its bytes are never printed.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Reading or writing the file failed.
    #[error("cluster secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The file's bytes are no usable secret.
    #[error("cluster secret file {path}: {why}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

impl Secret {
    /// A secret from its bytes (at least [`MIN_SECRET_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "a cluster secret needs at least {MIN_SECRET_BYTES} bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Secret(Arc::new(bytes.to_vec())))
    }

    /// A fresh random secret of 32 bytes.
    pub fn generate() -> Secret {
        let mut b = [0u8; 32];
        fill_random(&mut b);
        Secret(Arc::new(b.to_vec()))
    }

    /// Read a secret file: its bytes, without one trailing newline, at least
    /// [`MIN_SECRET_BYTES`] of them. A file that others than its owner can read or write
    /// is refused (like ssh's keys), so is an empty or over-long one.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        use std::os::unix::fs::MetadataExt;
        let io_err = |source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |why: String| SecretError::Bad {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if !meta.is_file() {
            return Err(bad("is not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "is accessible by others than its owner (mode {:o}); chmod 600 it",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > MAX_SECRET_BYTES as u64 {
            return Err(bad(format!(
                "has {} bytes, more than the {MAX_SECRET_BYTES} a secret may have",
                meta.len()
            )));
        }
        let mut bytes = std::fs::read(path).map_err(io_err)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        Secret::from_bytes(&bytes).map_err(bad)
    }

    /// Write a fresh secret (64 hexadecimal digits) to a new file `path`, readable by
    /// its owner only; an existing file is not overwritten.
    pub fn create_file(path: &Path) -> Result<Secret, SecretError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut raw = [0u8; 32];
        fill_random(&mut raw);
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        f.write_all(hex.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(io_err)?;
        Secret::from_bytes(hex.as_bytes()).map_err(|why| SecretError::Bad {
            path: path.to_path_buf(),
            why,
        })
    }

    fn mac(&self, label: &[u8], nonce_c: &[u8], nonce_s: &[u8], identity: u32) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(nonce_c);
        m.update(nonce_s);
        m.update(&identity.to_le_bytes());
        m
    }
}

/// Fill `buf` with bytes from the operating system's random source.
fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source works");
}

/// How a transport authenticates its connections.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The cluster secret.
    pub secret: Secret,
    /// Refuse connections that name no node id (0): a server takes requests only from
    /// nodes; the scheduler takes registrations, which come before an id.
    pub require_identity: bool,
    /// The bound on the whole exchange, per connection.
    pub timeout: Duration,
}

impl AuthConfig {
    /// Authentication with `secret`, a 5 s bound, ids not required.
    pub fn new(secret: Secret) -> AuthConfig {
        AuthConfig {
            secret,
            require_identity: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A connector's hello, decoded: the node id it speaks as and its nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthHello {
    /// The node id (0: none yet).
    pub identity: u32,
    /// The connector's nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl AuthHello {
    /// Decode the 48 bytes a connection starts with; `None` when they are no hello.
    pub fn decode(b: &[u8; AUTH_HELLO_LEN]) -> Option<AuthHello> {
        if b[..8] != AUTH_MAGIC {
            return None;
        }
        Some(AuthHello {
            identity: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            nonce: b[16..48].try_into().expect("32 bytes"),
        })
    }

    fn encode(&self) -> [u8; AUTH_HELLO_LEN] {
        let mut b = [0u8; AUTH_HELLO_LEN];
        b[..8].copy_from_slice(&AUTH_MAGIC);
        b[8..12].copy_from_slice(&self.identity.to_le_bytes());
        b[16..48].copy_from_slice(&self.nonce);
        b
    }
}

/// The connector's check of the acceptor's challenge (72 bytes) to `hello`: the
/// acceptor's nonce when its MAC proves the secret, else why not.
pub fn check_challenge(
    secret: &Secret,
    hello: &AuthHello,
    ch: &[u8; CHALLENGE_LEN],
) -> Result<[u8; NONCE_LEN], ChallengeError> {
    if ch[..8] != AUTH_MAGIC {
        return Err(ChallengeError::NotAChallenge);
    }
    let nonce_s: [u8; NONCE_LEN] = ch[8..40].try_into().expect("32 bytes");
    secret
        .mac(LABEL_ACCEPTOR, &hello.nonce, &nonce_s, hello.identity)
        .verify_slice(&ch[40..72])
        .map_err(|_| ChallengeError::WrongSecret)?;
    Ok(nonce_s)
}

/// The acceptor's check of a connector's proof (32 bytes) for `hello` and its own nonce.
pub fn check_proof(
    secret: &Secret,
    hello: &AuthHello,
    nonce_s: &[u8; NONCE_LEN],
    proof: &[u8; PROOF_LEN],
) -> bool {
    secret
        .mac(LABEL_CONNECTOR, &hello.nonce, nonce_s, hello.identity)
        .verify_slice(proof)
        .is_ok()
}

/// Why a challenge was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeError {
    /// The bytes are no challenge.
    NotAChallenge,
    /// Its MAC was made with another secret (or for another hello).
    WrongSecret,
}

/// Decode the acceptor's verdict (8 bytes): `Ok(())` for accepted, else the reason.
pub fn decode_verdict(v: &[u8; VERDICT_LEN]) -> Result<(), &'static str> {
    if v[..4] != VERDICT_MAGIC {
        return Err("its answer is no verdict");
    }
    match Verdict::from_code(u32::from_le_bytes(v[4..8].try_into().expect("4 bytes"))) {
        Some(Verdict::Accepted) => Ok(()),
        Some(Verdict::BadProof) => Err("it did not accept our proof of the cluster secret"),
        Some(Verdict::IdentityRequired) => {
            Err("it takes connections from cluster nodes only, and this one has no node id")
        }
        None => Err("an unknown verdict"),
    }
}

/// Why the verdict refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Verdict {
    Accepted = 0,
    BadProof = 1,
    IdentityRequired = 2,
}

impl Verdict {
    fn from_code(c: u32) -> Option<Verdict> {
        match c {
            0 => Some(Verdict::Accepted),
            1 => Some(Verdict::BadProof),
            2 => Some(Verdict::IdentityRequired),
            _ => None,
        }
    }
}

/// Why authenticating a connection failed. Every variant names the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer's first bytes were no authentication hello.
    #[error(
        "the peer at {peer} did not authenticate (its first bytes are no pserv authentication \
         hello): it runs without the cluster secret (--insecure), or it is no pserv node"
    )]
    NoHello {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer answered with a proof made with another secret.
    #[error(
        "the peer at {peer} does not hold this cluster's secret (its proof does not match): \
         check that both use the same --secret-file"
    )]
    WrongSecret {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer closed the connection during the exchange.
    #[error(
        "the peer at {peer} closed the connection during authentication ({stage}): it may run \
         without the cluster secret (--insecure) or with another one, or be no pserv node"
    )]
    Closed {
        /// The peer.
        peer: SocketAddr,
        /// Which message was awaited.
        stage: &'static str,
    },
    /// The peer said nothing within the bound.
    #[error("the peer at {peer} sent no {stage} within {timeout:?} of authentication")]
    Timeout {
        /// The peer.
        peer: SocketAddr,
        /// Which message was awaited.
        stage: &'static str,
        /// The bound.
        timeout: Duration,
    },
    /// The acceptor refused the connection.
    #[error("the peer at {peer} refused the connection: {why}")]
    Refused {
        /// The peer.
        peer: SocketAddr,
        /// Its reason.
        why: &'static str,
    },
    /// The connecting peer named no node id where one is required.
    #[error(
        "the peer at {peer} named no node id; this node takes connections from cluster nodes only"
    )]
    NoIdentity {
        /// The peer.
        peer: SocketAddr,
    },
    /// A socket error.
    #[error("authenticating the connection with {peer}: {source}")]
    Io {
        /// The peer.
        peer: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A blocking exchange on `stream` bounded by `deadline`.
struct Exchange<'a> {
    stream: &'a TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    timeout: Duration,
}

impl Exchange<'_> {
    fn left(&self, stage: &'static str) -> Result<Duration, AuthError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AuthError::Timeout {
                peer: self.peer,
                stage,
                timeout: self.timeout,
            });
        }
        Ok(left)
    }

    fn io(&self, stage: &'static str, e: io::Error) -> AuthError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::Timeout {
                peer: self.peer,
                stage,
                timeout: self.timeout,
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => AuthError::Closed {
                peer: self.peer,
                stage,
            },
            _ => AuthError::Io {
                peer: self.peer,
                source: e,
            },
        }
    }

    fn read(&self, buf: &mut [u8], stage: &'static str) -> Result<(), AuthError> {
        let mut done = 0;
        while done < buf.len() {
            let left = self.left(stage)?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(stage, e))?;
            match (&*self.stream).read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(AuthError::Closed {
                        peer: self.peer,
                        stage,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(stage, e)),
            }
        }
        Ok(())
    }

    fn write(&self, bytes: &[u8], stage: &'static str) -> Result<(), AuthError> {
        let left = self.left(stage)?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| self.io(stage, e))?;
        (&*self.stream)
            .write_all(bytes)
            .map_err(|e| self.io(stage, e))
    }
}

/// Restores a stream's blocking mode and timeouts on every exit.
pub(crate) struct Restore<'a> {
    stream: &'a TcpStream,
    nonblocking: bool,
}

impl<'a> Restore<'a> {
    pub(crate) fn blocking(stream: &'a TcpStream, nonblocking: bool) -> io::Result<Restore<'a>> {
        stream.set_nonblocking(false)?;
        Ok(Restore {
            stream,
            nonblocking,
        })
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = self.stream.set_read_timeout(None);
        let _ = self.stream.set_write_timeout(None);
        let _ = self.stream.set_nonblocking(self.nonblocking);
    }
}

/// The connecting side: prove the secret, speaking as `identity` (0: no node id yet).
/// `nonblocking` is the mode the stream is left in.
pub fn connect_side(
    stream: &TcpStream,
    cfg: &AuthConfig,
    identity: u32,
    nonblocking: bool,
) -> Result<(), AuthError> {
    let peer = peer_of(stream);
    let _restore =
        Restore::blocking(stream, nonblocking).map_err(|source| AuthError::Io { peer, source })?;
    let ex = Exchange {
        stream,
        peer,
        deadline: Instant::now() + cfg.timeout,
        timeout: cfg.timeout,
    };
    let mut hello = AuthHello {
        identity,
        nonce: [0u8; NONCE_LEN],
    };
    fill_random(&mut hello.nonce);
    ex.write(&hello.encode(), "hello")?;
    let mut ch = [0u8; CHALLENGE_LEN];
    ex.read(&mut ch, "challenge")?;
    let nonce_s = check_challenge(&cfg.secret, &hello, &ch).map_err(|e| match e {
        ChallengeError::NotAChallenge => AuthError::NoHello { peer },
        ChallengeError::WrongSecret => AuthError::WrongSecret { peer },
    })?;
    let proof = cfg
        .secret
        .mac(LABEL_CONNECTOR, &hello.nonce, &nonce_s, identity)
        .finalize()
        .into_bytes();
    ex.write(&proof, "proof")?;
    let mut v = [0u8; VERDICT_LEN];
    ex.read(&mut v, "verdict")?;
    decode_verdict(&v).map_err(|why| AuthError::Refused { peer, why })
}

/// The accepting side: check the peer's proof of the secret; returns the node id it
/// speaks as. `nonblocking` is the mode the stream is left in.
pub fn accept_side(
    stream: &TcpStream,
    cfg: &AuthConfig,
    nonblocking: bool,
) -> Result<u32, AuthError> {
    let peer = peer_of(stream);
    let _restore =
        Restore::blocking(stream, nonblocking).map_err(|source| AuthError::Io { peer, source })?;
    let ex = Exchange {
        stream,
        peer,
        deadline: Instant::now() + cfg.timeout,
        timeout: cfg.timeout,
    };
    let mut raw = [0u8; AUTH_HELLO_LEN];
    // The magic first: a peer without the secret (a frame, a shared-memory hello, a
    // stranger's bytes) is told apart at once, not at the timeout.
    ex.read(&mut raw[..8], "hello")?;
    if raw[..8] != AUTH_MAGIC {
        return Err(AuthError::NoHello { peer });
    }
    ex.read(&mut raw[8..], "hello")?;
    let hello = AuthHello::decode(&raw).ok_or(AuthError::NoHello { peer })?;
    let identity = hello.identity;
    let nonce_c = &hello.nonce;
    let mut nonce_s = [0u8; NONCE_LEN];
    fill_random(&mut nonce_s);
    let mut ch = [0u8; CHALLENGE_LEN];
    ch[..8].copy_from_slice(&AUTH_MAGIC);
    ch[8..40].copy_from_slice(&nonce_s);
    let mac = cfg
        .secret
        .mac(LABEL_ACCEPTOR, nonce_c, &nonce_s, identity)
        .finalize()
        .into_bytes();
    ch[40..72].copy_from_slice(&mac);
    ex.write(&ch, "challenge")?;
    let mut proof = [0u8; PROOF_LEN];
    ex.read(&mut proof, "proof")?;
    let verdict = if !check_proof(&cfg.secret, &hello, &nonce_s, &proof) {
        Verdict::BadProof
    } else if cfg.require_identity && identity == 0 {
        Verdict::IdentityRequired
    } else {
        Verdict::Accepted
    };
    let mut v = [0u8; VERDICT_LEN];
    v[..4].copy_from_slice(&VERDICT_MAGIC);
    v[4..8].copy_from_slice(&(verdict as u32).to_le_bytes());
    // A refused peer is told why, when it still listens; the refusal stands either way.
    let sent = ex.write(&v, "verdict");
    match verdict {
        Verdict::Accepted => sent.map(|_| identity),
        Verdict::BadProof => Err(AuthError::WrongSecret { peer }),
        Verdict::IdentityRequired => Err(AuthError::NoIdentity { peer }),
    }
}

pub(crate) fn peer_of(stream: &TcpStream) -> SocketAddr {
    stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn cfg(secret: &[u8]) -> AuthConfig {
        AuthConfig {
            timeout: Duration::from_secs(2),
            ..AuthConfig::new(Secret::from_bytes(secret).unwrap())
        }
    }

    fn run(
        c_cfg: AuthConfig,
        s_cfg: AuthConfig,
        identity: u32,
    ) -> (Result<(), AuthError>, Result<u32, AuthError>) {
        let (c, s) = pair();
        let acceptor = std::thread::spawn(move || {
            let r = accept_side(&s, &s_cfg, false);
            drop(s);
            r
        });
        let r = connect_side(&c, &c_cfg, identity, false);
        drop(c);
        (r, acceptor.join().unwrap())
    }

    #[test]
    fn the_same_secret_authenticates_and_names_the_identity() {
        let (c, s) = run(
            cfg(b"0123456789abcdef0123"),
            cfg(b"0123456789abcdef0123"),
            7,
        );
        c.unwrap();
        assert_eq!(s.unwrap(), 7);
    }

    #[test]
    fn another_secret_fails_on_both_ends_with_a_message_naming_the_peer() {
        let (c, s) = run(
            cfg(b"0123456789abcdef0123"),
            cfg(b"0123456789abcdef9999"),
            7,
        );
        let c = c.unwrap_err();
        assert!(matches!(c, AuthError::WrongSecret { .. }), "{c}");
        assert!(c.to_string().contains("127.0.0.1"), "{c}");
        let s = s.unwrap_err();
        assert!(matches!(s, AuthError::Closed { .. }), "{s}");
        assert!(s.to_string().contains("127.0.0.1"), "{s}");
    }

    #[test]
    fn an_identity_is_required_where_configured() {
        let mut strict = cfg(b"0123456789abcdef0123");
        strict.require_identity = true;
        let (c, s) = run(cfg(b"0123456789abcdef0123"), strict.clone(), 0);
        assert!(matches!(c.unwrap_err(), AuthError::Refused { .. }));
        assert!(matches!(s.unwrap_err(), AuthError::NoIdentity { .. }));
        let (c, s) = run(cfg(b"0123456789abcdef0123"), strict, 3);
        c.unwrap();
        assert_eq!(s.unwrap(), 3);
    }

    #[test]
    fn a_peer_that_sends_something_else_is_refused_at_once() {
        let (mut c, s) = pair();
        c.write_all(&[0x50; 56]).unwrap();
        let t = Instant::now();
        let e = accept_side(&s, &cfg(b"0123456789abcdef0123"), false).unwrap_err();
        assert!(matches!(e, AuthError::NoHello { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_silent_peer_times_out_on_both_sides() {
        let (c, s) = pair();
        let mut short = cfg(b"0123456789abcdef0123");
        short.timeout = Duration::from_millis(200);
        let e = accept_side(&s, &short, false).unwrap_err();
        assert!(matches!(e, AuthError::Timeout { .. }), "{e}");
        let e = connect_side(&c, &short, 1, false).unwrap_err();
        assert!(matches!(e, AuthError::Timeout { .. }), "{e}");
    }

    #[test]
    fn a_replayed_proof_is_refused() {
        // Record a good exchange's proof, then replay it against a fresh challenge.
        let secret = cfg(b"0123456789abcdef0123");
        let (mut c, s) = pair();
        let s_cfg = secret.clone();
        let acceptor = std::thread::spawn(move || accept_side(&s, &s_cfg, false));
        let mut hello = [0u8; AUTH_HELLO_LEN];
        hello[..8].copy_from_slice(&AUTH_MAGIC);
        hello[8..12].copy_from_slice(&5u32.to_le_bytes());
        c.write_all(&hello).unwrap();
        let mut ch = [0u8; CHALLENGE_LEN];
        c.read_exact(&mut ch).unwrap();
        // A proof made for another server nonce (as a recorded one would be).
        let stale = secret
            .secret
            .mac(LABEL_CONNECTOR, &[0u8; 32], &[1u8; 32], 5)
            .finalize()
            .into_bytes();
        c.write_all(&stale).unwrap();
        let mut v = [0u8; VERDICT_LEN];
        c.read_exact(&mut v).unwrap();
        assert_eq!(&v[..4], &VERDICT_MAGIC);
        assert_eq!(u32::from_le_bytes(v[4..].try_into().unwrap()), 1);
        assert!(matches!(
            acceptor.join().unwrap().unwrap_err(),
            AuthError::WrongSecret { .. }
        ));
    }

    #[test]
    fn secret_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("pserv-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        let _ = std::fs::remove_file(&p);
        let made = Secret::create_file(&p).unwrap();
        let read = Secret::from_file(&p).unwrap();
        assert_eq!(made.0, read.0);
        assert!(Secret::create_file(&p).is_err(), "an existing file is kept");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(&p, b"short\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Secret::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("at least 16 bytes"), "{e}");
        let e = Secret::from_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        assert!(!format!("{made:?}").contains(String::from_utf8_lossy(&made.0).as_ref()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
