//! The RDMA message path: a connection between two processes that both have an RDMA
//! device moves its frames through a pair of byte rings in registered memory, written
//! with RDMA WRITE over one reliable-connected queue pair, instead of through TCP.
//!
//! It mirrors [`shmpipe`](crate::shmpipe): a connection starts as TCP; the connecting
//! side, when its configuration allows it ([`RdmaMessages`]), opens the device (once per
//! transport), prepares a queue pair and registers one region (its inbound ring, a
//! staging mirror of the peer's inbound ring, and control words), writes an *offer*
//! ([`RdmaHello`], magic `PRDM`: its queue-pair endpoint and its region's address, length
//! and rkey) as the first bytes of the stream, and holds its frames until the answer.
//! The accepting side makes its own queue pair and region, connects its queue pair to
//! the offer's endpoint and answers *accept* with its endpoint and region (then both
//! sides switch), or *refuse* with a reason (then both stay on TCP, the held frames go
//! out over TCP, and both sides log the reason). The connecting side then connects its
//! queue pair, marks the acceptor's region *ready* with an RDMA WRITE (the acceptor posts
//! nothing before: a message to a queue pair that is not connected yet would only be
//! retransmitted after the transport timer) and rings the doorbell once.
//!
//! # Data path
//!
//! - Producer: copies the bytes into its staging mirror at the tail position, RDMA
//!   WRITEs the span(s) into the peer's inbound ring, then RDMA WRITEs its new tail into
//!   the peer's tail word. A reliable connection executes the writes of one queue pair in
//!   order, so the consumer sees the data before the tail that covers it. The tail write
//!   is signaled and the producer waits for its completion before it returns (so its
//!   source word may be reused, and the doorbell check below is sound): one round trip
//!   per vectored write, which carries many frames when the send queue holds many.
//! - Consumer: reads its inbound ring between its head and the tail the peer wrote (a
//!   local load), copies the bytes out, and RDMA WRITEs its new head into the peer's
//!   credit word, waiting for that completion too. The producer never writes more than
//!   the ring's size past the credit it sees (credit-based flow control); a full ring
//!   makes writes return `WouldBlock` and frames wait in the send queue, as over shm.
//!
//! # Doorbells
//!
//! As over shm, the TCP socket stays open as the peer-failure detector and carries
//! one-byte doorbells. A loop about to sleep RDMA WRITEs a *reader waiting* word into
//! the producer's region (and *writer waiting* when it has bytes queued) and waits for
//! those writes to complete before it looks at its rings once more. A producer looks at
//! its local *reader waiting* word only after its tail write completed (a consumer, at
//! its *writer waiting* word after its credit write completed). So of two sides that
//! each wrote and then looked, at least one sees the other's write: a wake-up is never
//! lost.
//!
//! # Failures
//!
//! A completion error, a failed post, or a completion that does not come within
//! [`OP_TIMEOUT`] marks the pipe broken; every later read or write returns the error and
//! the connection closes, as with a dead TCP peer. Everything read from remote-written
//! memory is untrusted: positions that do not fit the ring are errors, and the bytes pass
//! the same frame checks as TCP bytes. Without the `rdma` cargo feature the hello still
//! parses (an offer is refused as [`RdmaRefusal::Disabled`]), and the pipe types are
//! empty enums no value of which can exist.
//!
//! Not built: large values are copied through the rings like every other byte (no RDMA
//! READ rendezvous from the store's pinned regions), and a connection uses one queue
//! pair and one completion queue of its own (no shared receive queue).

use crate::shmpipe::HelloKind;

/// First four bytes of an [`RdmaHello`], where a frame's magic would be.
pub(crate) const RDMA_HELLO_MAGIC: u32 = u32::from_le_bytes(*b"PRDM");
/// Length of an [`RdmaHello`] on the wire (a multiple of 8).
pub const RDMA_HELLO_LEN: usize = 96;
const RDMA_HELLO_VERSION: u8 = 1;
/// Bytes of an encoded queue-pair endpoint in a hello.
const ENDPOINT_BYTES: usize = 32;

/// Smallest and largest ring an offer may name.
#[cfg(feature = "rdma")]
pub(crate) const RDMA_RING_MIN: usize = 64 << 10;
#[cfg(feature = "rdma")]
pub(crate) const RDMA_RING_MAX: usize = 1 << 30;

/// When connections move their frames to RDMA queue pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RdmaMessages {
    /// Never: no offers are made, offers from peers are refused.
    #[default]
    Off,
    /// With peers on other hosts (a peer on this host uses shared memory when
    /// [`ShmMessages`](crate::ShmMessages) allows it, else TCP); offers are accepted.
    OtherHosts,
    /// With every peer, this host's too (shared memory is not offered then); offers are
    /// accepted. What `--transport rdma` asks for.
    AllPeers,
}

/// Why an accepting side refused an RDMA offer (in a refusal's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RdmaRefusal {
    /// Its configuration says [`RdmaMessages::Off`], or it was built without `rdma`.
    Disabled = 1,
    /// It has no usable RDMA device.
    NoDevice = 2,
    /// Its queue pair or region could not be made or connected.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Setup = 3,
    /// The offer is malformed (version, ring size, region, endpoint).
    BadOffer = 4,
}

impl RdmaRefusal {
    /// What the reason means, for a log line.
    pub(crate) fn describe(code: u16) -> &'static str {
        match code {
            1 => "the peer does not use RDMA for messages (off, or built without rdma)",
            2 => "the peer has no usable RDMA device",
            3 => "the peer could not set up or connect its queue pair",
            4 => "the peer found the offer malformed",
            _ => "the peer gave an unknown reason",
        }
    }
}

/// The 96 bytes of an RDMA offer, acceptance or refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RdmaHello {
    pub kind: HelloKind,
    /// An [`RdmaRefusal`] code in a refusal, else 0.
    pub reason: u16,
    /// Bytes of each ring (offer and acceptance).
    pub ring: u64,
    /// The sender's region: virtual address, length, rkey.
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
    /// The sender's queue-pair endpoint ([`pserv_sys`]'s 32-byte encoding).
    pub endpoint: [u8; ENDPOINT_BYTES],
}

impl RdmaHello {
    /// A refusal.
    pub(crate) fn refuse(reason: RdmaRefusal) -> Self {
        RdmaHello {
            kind: HelloKind::Refuse,
            reason: reason as u16,
            ring: 0,
            addr: 0,
            len: 0,
            rkey: 0,
            endpoint: [0; ENDPOINT_BYTES],
        }
    }

    /// The wire bytes.
    pub(crate) fn encode(&self) -> [u8; RDMA_HELLO_LEN] {
        let mut b = [0u8; RDMA_HELLO_LEN];
        b[0..4].copy_from_slice(&RDMA_HELLO_MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = RDMA_HELLO_VERSION;
        b[6..8].copy_from_slice(&self.reason.to_le_bytes());
        b[8..16].copy_from_slice(&self.ring.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..36].copy_from_slice(&self.rkey.to_le_bytes());
        b[40..40 + ENDPOINT_BYTES].copy_from_slice(&self.endpoint);
        b
    }

    /// Parse wire bytes; `Err` says what is wrong. Never panics.
    pub(crate) fn decode(b: &[u8; RDMA_HELLO_LEN]) -> Result<Self, String> {
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != RDMA_HELLO_MAGIC {
            return Err("not an RDMA hello".into());
        }
        if b[5] != RDMA_HELLO_VERSION {
            return Err(format!(
                "RDMA hello of version {} (this build speaks {RDMA_HELLO_VERSION})",
                b[5]
            ));
        }
        let kind = match b[4] {
            1 => HelloKind::Offer,
            2 => HelloKind::Accept,
            3 => HelloKind::Refuse,
            k => return Err(format!("RDMA hello of unknown kind {k}")),
        };
        if b[36..40] != [0; 4] || b[40 + ENDPOINT_BYTES..].iter().any(|&c| c != 0) {
            return Err("RDMA hello with non-zero reserved bytes".into());
        }
        let mut endpoint = [0u8; ENDPOINT_BYTES];
        endpoint.copy_from_slice(&b[40..40 + ENDPOINT_BYTES]);
        Ok(RdmaHello {
            kind,
            reason: u16::from_le_bytes([b[6], b[7]]),
            ring: word(8),
            addr: word(16),
            len: word(24),
            rkey: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
            endpoint,
        })
    }
}

/// Check a peer's RDMA hello (offer, acceptance or refusal) with the decoder the transport
/// runs on it, in builds with and without the `rdma` feature. `Err` says what is wrong;
/// never panics (the fuzz target `pipe_hello` holds it to that).
pub fn check_hello(bytes: &[u8; RDMA_HELLO_LEN]) -> Result<(), String> {
    RdmaHello::decode(bytes).map(|_| ())
}

/// Valid RDMA hellos, as the encoder writes them (seeds for the fuzz corpus).
pub fn sample_hellos() -> Vec<[u8; RDMA_HELLO_LEN]> {
    let offer = RdmaHello {
        kind: HelloKind::Offer,
        reason: 0,
        ring: 1 << 20,
        addr: 0x7f00_0000_1000,
        len: 2 << 20,
        rkey: 0x1234,
        endpoint: [0x5a; ENDPOINT_BYTES],
    };
    let accept = RdmaHello {
        kind: HelloKind::Accept,
        ..offer.clone()
    };
    vec![
        offer.encode(),
        accept.encode(),
        RdmaHello::refuse(RdmaRefusal::Disabled).encode(),
    ]
}

/// How long a posted write may take to complete before the pipe counts as broken (the
/// transport's own retries, about half a second with the default queue-pair timeout,
/// end sooner on a dead peer).
#[cfg(feature = "rdma")]
pub(crate) const OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(feature = "rdma")]
pub(crate) use self::verbs::{RdmaDevice, RdmaOffer, RdmaPipe};

#[cfg(not(feature = "rdma"))]
pub(crate) use self::none::{RdmaDevice, RdmaOffer, RdmaPipe};

/// Without the `rdma` feature: types no value of which exists, and setup that says so.
#[cfg(not(feature = "rdma"))]
mod none {
    use std::io::{self, IoSlice};

    use super::{RdmaHello, RdmaRefusal};

    /// No device can be opened in a build without `rdma`.
    #[derive(Debug)]
    pub(crate) enum RdmaDevice {}

    impl RdmaDevice {
        pub(crate) fn open(_name: Option<&str>) -> Result<RdmaDevice, String> {
            Err("this build has no RDMA support (cargo feature `rdma`)".into())
        }
    }

    /// An offer cannot be made.
    #[derive(Debug)]
    pub(crate) enum RdmaOffer {}

    /// A pipe cannot exist.
    #[derive(Debug)]
    pub(crate) enum RdmaPipe {}

    impl RdmaOffer {
        pub(crate) fn create(dev: &RdmaDevice, _ring: usize) -> io::Result<(RdmaOffer, RdmaHello)> {
            match *dev {}
        }
        pub(crate) fn complete(self, _answer: &RdmaHello) -> io::Result<RdmaPipe> {
            match self {}
        }
    }

    impl RdmaPipe {
        pub(crate) fn accept(
            dev: &RdmaDevice,
            _offer: &RdmaHello,
        ) -> Result<(RdmaPipe, RdmaHello), (RdmaRefusal, String)> {
            match *dev {}
        }
        pub(crate) fn ring_bytes(&self) -> usize {
            match *self {}
        }
        pub(crate) fn mark_peer_ready(&self) -> io::Result<()> {
            match *self {}
        }
        pub(crate) fn write_vectored(&self, _s: &[IoSlice<'_>]) -> io::Result<(usize, bool)> {
            match *self {}
        }
        pub(crate) fn read(&self, _buf: &mut [u8]) -> io::Result<(usize, bool)> {
            match *self {}
        }
        pub(crate) fn readable(&self) -> bool {
            match *self {}
        }
        pub(crate) fn writable(&self) -> bool {
            match *self {}
        }
        pub(crate) fn arm(&self, _for_room: bool) -> bool {
            match *self {}
        }
    }
}

#[cfg(feature = "rdma")]
mod verbs {
    use std::io::{self, IoSlice};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use parking_lot::Mutex;
    use pserv_sys::rdma::{
        Access, Completion, Context, MemoryRegion, ProtectionDomain, QpConfig, QpEndpoint,
        QueuePair, RdmaError, RemoteRegion,
    };
    use pserv_sys::PinnedRegion;

    use super::{HelloKind, RdmaHello, RdmaRefusal, OP_TIMEOUT, RDMA_RING_MAX, RDMA_RING_MIN};

    // Region layout (both sides alike, so an offset names the same word at the peer).
    // Words the peer writes, each on its own 128 bytes:
    /// The peer's tail in this side's inbound ring.
    const C_IN_TAIL: usize = 0;
    /// The peer's head in this side's outbound ring (the credit).
    const C_OUT_HEAD: usize = 128;
    /// The peer, reader of this side's outbound ring, sleeps: ring after writing.
    const C_READER_WAITING: usize = 256;
    /// The peer, writer of this side's inbound ring, waits for room: ring after reading.
    const C_WRITER_WAITING: usize = 384;
    /// Set by the connecting side in the acceptor's region once its queue pair is up.
    const C_READY: usize = 512;
    // Words this side writes from (the sources of its small RDMA WRITEs):
    const S_TAIL: usize = 1024;
    const S_HEAD: usize = 1152;
    const S_ONE: usize = 1280;
    /// The error kind of a pipe whose own queue pair failed (a post refused, a flush).
    const LOCAL_FAILURE: io::ErrorKind = io::ErrorKind::ConnectionAborted;
    /// The error kind of a pipe whose peer failed a request or never answered it.
    const PEER_UNREACHABLE: io::ErrorKind = io::ErrorKind::ConnectionReset;

    /// The inbound ring; the outbound staging mirror follows it.
    const DATA: usize = 4096;

    /// Send-queue depth of a pipe's queue pair (one vectored write posts at most a few
    /// data pieces and its tail).
    const SEND_WR: u32 = 64;
    const POLL_BATCH: usize = 16;

    fn region_len(ring: usize) -> usize {
        DATA + 2 * ring
    }

    fn verb_err(what: &str, e: RdmaError) -> io::Error {
        io::Error::other(format!("{what}: {e}"))
    }

    /// The device messages go over, opened once per transport.
    #[derive(Debug)]
    pub(crate) struct RdmaDevice {
        pd: ProtectionDomain,
    }

    impl RdmaDevice {
        /// Open `name` (or the first device) and allocate a protection domain.
        pub(crate) fn open(name: Option<&str>) -> Result<RdmaDevice, String> {
            let ctx = Context::open(name).map_err(|e| e.to_string())?;
            let pd = ctx.alloc_pd().map_err(|e| e.to_string())?;
            tracing::info!(
                device = ctx.name(),
                firmware = ctx.firmware(),
                software = ctx.is_software_device(),
                "rdma message path: device opened"
            );
            Ok(RdmaDevice { pd })
        }

        /// A prepared queue pair and a registered region of `ring`-byte rings.
        fn make(
            &self,
            ring: usize,
        ) -> Result<(pserv_sys::rdma::PreparedQueuePair, Arc<MemoryRegion>), RdmaError> {
            let cfg = QpConfig {
                max_send_wr: SEND_WR,
                max_recv_wr: 1,
                ..QpConfig::default()
            };
            let cq = self
                .pd
                .context()
                .create_cq((cfg.max_send_wr + cfg.max_recv_wr) as usize)?;
            let qp = self.pd.prepare_qp(cq, cfg)?;
            let region = PinnedRegion::new(region_len(ring))
                .map_err(|e| RdmaError::Config(format!("mapping a message region: {e}")))?;
            let mr = self.pd.register(region, Access::ALL)?;
            Ok((qp, Arc::new(mr)))
        }
    }

    /// The connecting side's queue pair and region while its offer waits for an answer.
    #[derive(Debug)]
    pub(crate) struct RdmaOffer {
        qp: pserv_sys::rdma::PreparedQueuePair,
        mr: Arc<MemoryRegion>,
        ring: usize,
    }

    fn hello(kind: HelloKind, ring: usize, mr: &MemoryRegion, ep: QpEndpoint) -> RdmaHello {
        RdmaHello {
            kind,
            reason: 0,
            ring: ring as u64,
            addr: mr.addr(),
            len: region_len(ring) as u64,
            rkey: mr.rkey(),
            endpoint: ep.encode(),
        }
    }

    /// Check the ring size and region of a peer's hello; its region and endpoint.
    fn check_peer(
        h: &RdmaHello,
        ring: Option<usize>,
    ) -> Result<(RemoteRegion, QpEndpoint, usize), String> {
        let r = usize::try_from(h.ring).unwrap_or(usize::MAX);
        if !r.is_power_of_two() || !(RDMA_RING_MIN..=RDMA_RING_MAX).contains(&r) {
            return Err(format!("a hello of {}-byte rings", h.ring));
        }
        if ring.is_some_and(|want| want != r) {
            return Err(format!(
                "an answer of {r}-byte rings to an offer of {ring:?}"
            ));
        }
        if h.len != region_len(r) as u64 || h.addr.checked_add(h.len).is_none() {
            return Err(format!(
                "a region of {} bytes at {:#x} for {r}-byte rings",
                h.len, h.addr
            ));
        }
        let ep = QpEndpoint::decode(&h.endpoint).map_err(|e| format!("its endpoint: {e}"))?;
        Ok((
            RemoteRegion {
                addr: h.addr,
                len: h.len,
                rkey: h.rkey,
            },
            ep,
            r,
        ))
    }

    impl RdmaOffer {
        /// The connecting side: a queue pair and a region of two `ring`-byte rings
        /// (rounded up to a power of two within the bounds), and the offer naming them.
        pub(crate) fn create(dev: &RdmaDevice, ring: usize) -> io::Result<(RdmaOffer, RdmaHello)> {
            let ring = ring.clamp(RDMA_RING_MIN, RDMA_RING_MAX).next_power_of_two();
            let (qp, mr) = dev.make(ring).map_err(|e| verb_err("rdma offer", e))?;
            let offer = hello(HelloKind::Offer, ring, &mr, qp.endpoint());
            Ok((RdmaOffer { qp, mr, ring }, offer))
        }

        /// The acceptor's answer came: connect the queue pair to its endpoint.
        pub(crate) fn complete(self, answer: &RdmaHello) -> io::Result<RdmaPipe> {
            let (remote, ep, _) = check_peer(answer, Some(self.ring))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let qp = self
                .qp
                .handshake(ep)
                .map_err(|e| verb_err("rdma connect", e))?;
            Ok(RdmaPipe::new(qp, self.mr, remote, self.ring, true))
        }
    }

    struct QpState {
        qp: QueuePair,
        next_wr: u64,
        /// Every send request below this id has completed.
        done_wr: u64,
        /// The first failure and its kind; the pipe is unusable after it.
        broken: Option<(io::ErrorKind, String)>,
    }

    impl QpState {
        /// Mark the pipe broken (a first failure stays) and say so. `kind`:
        /// [`PEER_UNREACHABLE`] when the peer's side did not answer or refused, else
        /// [`LOCAL_FAILURE`].
        fn fail(&mut self, kind: io::ErrorKind, why: String) -> io::Error {
            let (kind, why) = self.broken.get_or_insert((kind, why)).clone();
            io::Error::new(kind, format!("rdma queue pair: {why}"))
        }

        fn check(&mut self) -> io::Result<()> {
            match &self.broken {
                Some((kind, why)) => Err(io::Error::new(*kind, format!("rdma queue pair: {why}"))),
                None => Ok(()),
            }
        }

        /// Take the completions there are.
        fn drain(&mut self) -> io::Result<()> {
            let mut buf = [Completion::default(); POLL_BATCH];
            loop {
                let n = match self.qp.poll(&mut buf) {
                    Ok(n) => n,
                    Err(e) => return Err(self.fail(LOCAL_FAILURE, format!("polling: {e}"))),
                };
                for c in &buf[..n] {
                    if let Err(e) = c.status {
                        // A flush: this side's queue pair went to the error state; else
                        // the peer's side failed the request or never answered it.
                        let kind = if e.is_flush() {
                            LOCAL_FAILURE
                        } else {
                            PEER_UNREACHABLE
                        };
                        return Err(self.fail(kind, format!("a write failed: {e}")));
                    }
                    // Send queues complete in order: everything up to this one is done.
                    self.done_wr = self.done_wr.max(c.wr_id + 1);
                }
                if n < POLL_BATCH {
                    return Ok(());
                }
            }
        }
    }

    /// Both rings of one connection over one queue pair, seen from one side.
    pub(crate) struct RdmaPipe {
        qp: Mutex<QpState>,
        mr: Arc<MemoryRegion>,
        remote: RemoteRegion,
        ring: usize,
        max_msg: usize,
        /// The next byte this side writes into the peer's ring.
        tail: AtomicU64,
        /// The next byte this side reads from its own ring.
        head: AtomicU64,
        /// Whether this side may post (the acceptor waits for the connector's mark).
        connector: bool,
    }

    impl std::fmt::Debug for RdmaPipe {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RdmaPipe")
                .field("ring", &self.ring)
                .field("connector", &self.connector)
                .finish()
        }
    }

    /// A ring position from remote-written memory that cannot be right.
    fn bad_position(ring: usize, what: &str, gap: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "rdma ring of {ring} bytes: the peer's {what} position is {gap} bytes from ours"
            ),
        )
    }

    impl RdmaPipe {
        /// The accepting side: make a queue pair and region, connect to the offer's
        /// endpoint; the pipe and the acceptance to send.
        pub(crate) fn accept(
            dev: &RdmaDevice,
            offer: &RdmaHello,
        ) -> Result<(RdmaPipe, RdmaHello), (RdmaRefusal, String)> {
            let (remote, ep, ring) =
                check_peer(offer, None).map_err(|e| (RdmaRefusal::BadOffer, e))?;
            let (qp, mr) = dev
                .make(ring)
                .map_err(|e| (RdmaRefusal::Setup, e.to_string()))?;
            let answer = hello(HelloKind::Accept, ring, &mr, qp.endpoint());
            let qp = qp
                .handshake(ep)
                .map_err(|e| (RdmaRefusal::Setup, e.to_string()))?;
            Ok((RdmaPipe::new(qp, mr, remote, ring, false), answer))
        }

        fn new(
            qp: QueuePair,
            mr: Arc<MemoryRegion>,
            remote: RemoteRegion,
            ring: usize,
            connector: bool,
        ) -> Self {
            let max_msg = qp.max_message().max(4096);
            mr.atomic_u64(S_ONE)
                .expect("in the region")
                .store(1, Ordering::Relaxed);
            RdmaPipe {
                qp: Mutex::new(QpState {
                    qp,
                    next_wr: 0,
                    done_wr: 0,
                    broken: None,
                }),
                mr,
                remote,
                ring,
                max_msg,
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
                connector,
            }
        }

        /// Bytes of each ring.
        pub(crate) fn ring_bytes(&self) -> usize {
            self.ring
        }

        /// Store `v` into this side's control word at `at`, as a peer's RDMA WRITE would.
        #[cfg(test)]
        pub(crate) fn poke_for_test(&self, at: usize, v: u64) {
            self.word(at).store(v, Ordering::SeqCst)
        }

        fn word(&self, at: usize) -> &AtomicU64 {
            self.mr
                .atomic_u64(at)
                .expect("control words lie in the region")
        }

        /// Whether this side may post: always for the connector; for the acceptor once
        /// the connector marked its region.
        fn ready(&self) -> bool {
            self.connector || self.word(C_READY).load(Ordering::Acquire) != 0
        }

        fn broken(&self) -> bool {
            self.qp.lock().broken.is_some()
        }

        /// Post one WRITE of `local` (offset, len in this region) to `remote_off` of the
        /// peer's; a full send queue is drained first. Returns its id.
        fn post(
            &self,
            st: &mut QpState,
            local: usize,
            len: usize,
            remote_off: usize,
            signaled: bool,
        ) -> io::Result<u64> {
            let start = Instant::now();
            loop {
                st.check()?;
                let wr = st.next_wr;
                match st.qp.post_write(
                    wr,
                    self.mr.slice(local..local + len),
                    &self.remote,
                    remote_off as u64,
                    signaled,
                ) {
                    Ok(()) => {
                        st.next_wr += 1;
                        return Ok(wr);
                    }
                    Err(RdmaError::QueueFull { .. }) if start.elapsed() < OP_TIMEOUT => {
                        st.drain()?;
                        std::hint::spin_loop();
                    }
                    Err(e) => return Err(st.fail(LOCAL_FAILURE, format!("posting a write: {e}"))),
                }
            }
        }

        /// Wait until request `wr` (and every one before it) completed.
        fn wait(&self, wr: u64) -> io::Result<()> {
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                {
                    let mut st = self.qp.lock();
                    st.check()?;
                    if st.done_wr > wr {
                        return Ok(());
                    }
                    st.drain()?;
                    if st.done_wr > wr {
                        return Ok(());
                    }
                    if start.elapsed() >= OP_TIMEOUT {
                        return Err(st.fail(
                            PEER_UNREACHABLE,
                            format!("a write did not complete within {OP_TIMEOUT:?}"),
                        ));
                    }
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }

        /// Post a signaled write of the 8-byte word at `src` to the peer's `dst` and
        /// wait for it.
        fn write_word(&self, src: usize, dst: usize) -> io::Result<()> {
            let wr = {
                let mut st = self.qp.lock();
                self.post(&mut st, src, 8, dst, true)?
            };
            self.wait(wr)
        }

        /// The connecting side, once connected: mark the acceptor's region ready (and
        /// wait until the mark landed; the caller then rings the doorbell).
        pub(crate) fn mark_peer_ready(&self) -> io::Result<()> {
            debug_assert!(
                self.connector,
                "only the connecting side marks its peer ready"
            );
            self.write_word(S_ONE, C_READY)
        }

        /// Clear a waiting flag the peer set; whether it was set (then ring its doorbell).
        fn take_flag(&self, at: usize) -> bool {
            let flag = self.word(at);
            flag.load(Ordering::SeqCst) != 0 && flag.swap(0, Ordering::SeqCst) != 0
        }

        /// Bytes the peer's ring holds that it has not read, checked.
        fn out_used(&self) -> io::Result<u64> {
            let tail = self.tail.load(Ordering::Relaxed);
            let head = self.word(C_OUT_HEAD).load(Ordering::Acquire);
            let used = tail.wrapping_sub(head);
            if used > self.ring as u64 {
                return Err(bad_position(self.ring, "read", used));
            }
            Ok(used)
        }

        /// Bytes waiting in this side's ring, checked.
        fn in_avail(&self) -> io::Result<u64> {
            let head = self.head.load(Ordering::Relaxed);
            let tail = self.word(C_IN_TAIL).load(Ordering::Acquire);
            let avail = tail.wrapping_sub(head);
            if avail > self.ring as u64 {
                return Err(bad_position(self.ring, "write", avail));
            }
            Ok(avail)
        }

        /// Write as much of `slices` as the peer's ring takes (`WouldBlock` when it
        /// takes nothing); the bytes written and whether the peer's loop sleeps and
        /// must be woken. A full ring asks the peer to ring back once it made room.
        pub(crate) fn write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<(usize, bool)> {
            self.qp.lock().check()?;
            let want: usize = slices.iter().map(|s| s.len()).sum();
            if want == 0 {
                return Ok((0, false));
            }
            if !self.ready() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut free = self.ring as u64 - self.out_used()?;
            if free == 0 {
                // Ask for a wake-up (landed before we look again), then look again.
                self.write_word(S_ONE, C_WRITER_WAITING)?;
                free = self.ring as u64 - self.out_used()?;
                if free == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
            let start_tail = self.tail.load(Ordering::Relaxed);
            let mut tail = start_tail;
            let mut written = 0usize;
            let mask = self.ring as u64 - 1;
            let staging = DATA + self.ring;
            for s in slices {
                let mut src: &[u8] = s;
                while !src.is_empty() && free > 0 {
                    let off = (tail & mask) as usize;
                    let n = src.len().min(free as usize).min(self.ring - off);
                    self.mr
                        .write_at(staging + off, &src[..n])
                        .expect("inside the staging ring");
                    src = &src[n..];
                    tail = tail.wrapping_add(n as u64);
                    free -= n as u64;
                    written += n;
                }
                if free == 0 {
                    break;
                }
            }
            // The written span, in pieces that neither wrap nor exceed a message.
            let wr = {
                let mut st = self.qp.lock();
                let mut at = start_tail;
                while at != tail {
                    let off = (at & mask) as usize;
                    let n = (tail.wrapping_sub(at) as usize)
                        .min(self.ring - off)
                        .min(self.max_msg);
                    self.post(&mut st, staging + off, n, DATA + off, false)?;
                    at = at.wrapping_add(n as u64);
                }
                self.word(S_TAIL).store(tail, Ordering::Release);
                self.post(&mut st, S_TAIL, 8, C_IN_TAIL, true)?
            };
            self.tail.store(tail, Ordering::Relaxed);
            self.wait(wr)?;
            if written < want {
                self.write_word(S_ONE, C_WRITER_WAITING)?;
            }
            Ok((written, self.take_flag(C_READER_WAITING)))
        }

        /// Read what this side's ring holds into `buf` (`WouldBlock` when empty); the
        /// bytes read and whether the peer waits for room (ring its doorbell).
        ///
        /// What landed in the ring is read even after the queue pair failed (a peer
        /// that wrote its last frames and exited: its queue pair goes to error with it);
        /// the failure is reported once the ring is empty.
        pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
            if buf.is_empty() {
                return Ok((0, false));
            }
            let avail = self.in_avail()?;
            if avail == 0 {
                self.qp.lock().check()?;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut head = self.head.load(Ordering::Relaxed);
            let n = (avail as usize).min(buf.len());
            let mask = self.ring as u64 - 1;
            let mut done = 0;
            while done < n {
                let off = (head & mask) as usize;
                let k = (n - done).min(self.ring - off);
                self.mr
                    .read_at(DATA + off, &mut buf[done..done + k])
                    .expect("inside the ring");
                done += k;
                head = head.wrapping_add(k as u64);
            }
            self.head.store(head, Ordering::Relaxed);
            // Credit: the head only grows, so a later value read by an earlier write is
            // still a position the bytes before it were read at.
            self.word(S_HEAD).store(head, Ordering::Release);
            // The credit goes back to a live peer; to a failed one it cannot, and the
            // bytes read are delivered all the same (the next empty read reports it).
            let credited = {
                let mut st = self.qp.lock();
                self.post(&mut st, S_HEAD, 8, C_OUT_HEAD, true)
            }
            .and_then(|wr| self.wait(wr));
            if credited.is_err() {
                return Ok((n, false));
            }
            Ok((n, self.take_flag(C_WRITER_WAITING)))
        }

        /// Whether this side's ring holds bytes (a broken pipe or ring counts: reading
        /// reports it).
        pub(crate) fn readable(&self) -> bool {
            self.broken() || self.in_avail().map_or(true, |a| a > 0)
        }

        /// Whether the peer's ring has room and this side may write (a broken pipe or
        /// ring counts: writing reports it).
        pub(crate) fn writable(&self) -> bool {
            self.broken()
                || (self.ready() && self.out_used().map_or(true, |u| u < self.ring as u64))
        }

        /// Before this side's loop sleeps: ask the peer to ring when it writes (and,
        /// with `for_room`, when it makes room), wait until those requests landed, then
        /// say whether there is something to do already (then the loop must not sleep).
        /// An acceptor not marked ready yet asks nothing: the connector rings once it
        /// marked it.
        pub(crate) fn arm(&self, for_room: bool) -> bool {
            if !self.ready() {
                return self.ready() || self.broken();
            }
            let asked = self.write_word(S_ONE, C_READER_WAITING).and_then(|()| {
                if for_room {
                    self.write_word(S_ONE, C_WRITER_WAITING)
                } else {
                    Ok(())
                }
            });
            if asked.is_err() {
                return true;
            }
            self.readable() || (for_room && self.writable())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "rdma")]
    use std::io;

    /// A connected pair of pipes on the device named by `PSERV_RDMA_DEVICE`.
    #[cfg(feature = "rdma")]
    fn pair(ring: usize) -> (RdmaPipe, RdmaPipe) {
        let name = std::env::var("PSERV_RDMA_DEVICE")
            .expect("PSERV_RDMA_DEVICE is not set: name an RDMA device (e.g. soft0)");
        let dev = RdmaDevice::open(Some(&name)).expect("open the device");
        let (offer, hello) = RdmaOffer::create(&dev, ring).expect("offer");
        let hello = RdmaHello::decode(&hello.encode()).expect("the offer parses");
        let (b, answer) = RdmaPipe::accept(&dev, &hello).expect("accept");
        let answer = RdmaHello::decode(&answer.encode()).expect("the answer parses");
        let a = offer.complete(&answer).expect("connect");
        a.mark_peer_ready().expect("mark ready");
        (a, b)
    }

    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn bytes_cross_both_ways_wrap_and_fill_the_ring() {
        use std::io::IoSlice;
        let ring = 64 << 10;
        let (a, b) = pair(ring);
        let mut buf = vec![0u8; ring];
        let (mut sent, mut got) = (0u64, 0u64);
        for round in 0..100usize {
            let len = 1 + (round * 7919) % (ring - 1);
            let chunk: Vec<u8> = (0..len).map(|i| (sent as usize + i) as u8).collect();
            let (n, _) = a.write_vectored(&[IoSlice::new(&chunk)]).expect("write");
            assert_eq!(n, len, "an empty ring takes a chunk smaller than itself");
            sent += n as u64;
            let mut left = n;
            while left > 0 {
                let (k, _) = b.read(&mut buf[..left]).expect("read");
                for (i, &byte) in buf[..k].iter().enumerate() {
                    assert_eq!(
                        byte,
                        (got as usize + i) as u8,
                        "byte {} corrupted",
                        got + i as u64
                    );
                }
                got += k as u64;
                left -= k;
            }
        }
        assert_eq!(sent, got);
        // The other way.
        let (n, _) = b.write_vectored(&[IoSlice::new(b"pong")]).expect("write");
        assert_eq!(n, 4);
        let (k, _) = a.read(&mut buf).expect("read");
        assert_eq!(&buf[..k], b"pong");
        assert_eq!(
            a.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A full ring takes what fits, then nothing; the reader that makes room wakes
        // the writer that asked.
        let big = vec![5u8; ring + 100];
        let (n, _) = a.write_vectored(&[IoSlice::new(&big)]).expect("write");
        assert_eq!(n, ring, "the ring takes what fits");
        assert_eq!(
            a.write_vectored(&[IoSlice::new(&big)]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!a.writable());
        let (k, wake) = b.read(&mut buf[..10]).expect("read");
        assert_eq!(k, 10);
        assert!(wake, "the reader that makes room wakes the waiting writer");
        assert!(a.writable());
        // A sleeping reader is woken by the next write.
        let (k, _) = b.read(&mut buf).expect("read");
        assert_eq!(k, ring - 10);
        assert!(!b.arm(false), "nothing to read: the loop may sleep");
        let (_, wake) = a.write_vectored(&[IoSlice::new(b"x")]).expect("write");
        assert!(wake, "the reader armed: the writer must ring");
        let (_, wake) = a.write_vectored(&[IoSlice::new(b"y")]).expect("write");
        assert!(!wake, "one wake-up per wait");
        assert!(b.arm(false), "bytes are waiting: the loop must not sleep");
    }

    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn positions_that_do_not_fit_the_ring_are_errors() {
        let (a, b) = pair(64 << 10);
        // A hostile peer moves its write position far ahead (here: written locally
        // into the word the peer's RDMA WRITEs land in).
        b.poke_for_test(0, 10 << 20);
        let err = b.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("write position"), "{err}");
        // ... or its read position ahead of what was written.
        a.poke_for_test(128, 77);
        let err = a
            .write_vectored(&[std::io::IoSlice::new(b"z")])
            .unwrap_err();
        assert!(err.to_string().contains("read position"), "{err}");
    }

    #[test]
    fn hello_round_trips_and_refuses_garbage() {
        let h = RdmaHello {
            kind: HelloKind::Offer,
            reason: 0,
            ring: 1 << 20,
            addr: 0x7f00_0000_1000,
            len: 4096 + (2 << 20),
            rkey: 0xdead_beef,
            endpoint: [7; 32],
        };
        assert_eq!(RdmaHello::decode(&h.encode()).expect("decode"), h);
        let r = RdmaHello::refuse(RdmaRefusal::NoDevice);
        let back = RdmaHello::decode(&r.encode()).expect("decode");
        assert_eq!(back.kind, HelloKind::Refuse);
        assert_eq!(back.reason, RdmaRefusal::NoDevice as u16);
        let mut bad = h.encode();
        bad[5] = 9;
        assert!(RdmaHello::decode(&bad).unwrap_err().contains("version 9"));
        bad = h.encode();
        bad[4] = 0;
        assert!(RdmaHello::decode(&bad)
            .unwrap_err()
            .contains("unknown kind"));
        bad = h.encode();
        bad[90] = 1;
        assert!(RdmaHello::decode(&bad).unwrap_err().contains("reserved"));
        bad = h.encode();
        bad[0] = b'X';
        assert!(RdmaHello::decode(&bad).is_err());
        assert_eq!(RDMA_HELLO_LEN % 8, 0, "frames after a hello stay aligned");
    }
}
