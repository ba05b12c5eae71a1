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
//! # Rendezvous (large frames)
//!
//! A frame whose body (keys, values, padding) is at least
//! [`TcpConfig::rdma_rendezvous_bytes`](crate::TcpConfig::rdma_rendezvous_bytes)
//! (default [`RDMA_RENDEZVOUS_DEFAULT`], 64 KiB; 0: never) does not go through the ring:
//!
//! ```text
//!  sender:   body --copy--> registered staging buffer;  ring <-- descriptor (PRDV: id, addr, len, rkey, header)
//!  receiver: descriptor checked -> header delivered -> RDMA READ body straight into the reader's buffer
//!            -> RDMA WRITE "n frames read" into the sender's C_RDV_DONE -> sender reuses (or frees) the buffer
//! ```
//!
//! - The pipe sees frames, not only bytes: callers write whole frames back to back (the
//!   send queue's and `send_borrowed`'s vectored writes), and each side follows the
//!   frame boundaries of its stream by their headers. A rendezvous frame is taken whole
//!   or not at all, so a write never stops inside one; at a boundary a header or
//!   descriptor goes into the ring whole (the reader looks only at whole ones).
//! - **One copy, not zero**: the caller's frame (an `OutFrame` of the send queue, or a
//!   store's values borrowed under its lock by `send_borrowed`) leaves the caller's
//!   hands when the write returns, while the peer's READ comes later; keeping it alive
//!   until the peer's release, and registering arbitrary caller memory, would need the
//!   send queue to hold frames past their write. So the sender copies the body once into
//!   a staging buffer of its own, registered for remote reads (powers of two from
//!   64 KiB; up to 8 released buffers, 16 MiB, stay registered for later frames, as
//!   registration is expensive). The ring path copies twice (into the staging mirror,
//!   then out of the ring): this saves the receiver's copy and the ring's credit round
//!   trips, and a frame larger than the ring crosses in one READ.
//! - The receiver READs the body straight into the buffer it reads into (the transport's
//!   pooled aligned receive buffer of a large frame), registering that buffer for the
//!   time of the READ ([`pserv_sys::rdma::BorrowedRegion`]; a registration per large
//!   frame, deregistered before the read returns, so the device never touches it after).
//!   READs longer than the port's `max_msg_sz` are split.
//! - Release: descriptors carry consecutive ids and are read in order, so one word says
//!   how many were read; the receiver RDMA WRITEs it into the sender's `C_RDV_DONE` once
//!   its READ completed. The sender reuses a buffer only after that; at most 32 frames
//!   (32 MiB of buffers; one larger frame alone) are unreleased per pipe, beyond which
//!   writes stop (`WouldBlock`) and the writer asks for a doorbell with its *writer
//!   waiting* word, which the receiver looks at after its release write completed (as
//!   for credit).
//!   Dropping the pipe deregisters every buffer: a later READ of the peer fails.
//! - Order: a descriptor sits where its frame would have, so frames are delivered in
//!   the order they were written, large and small alike.
//! - Untrusted: a descriptor must carry the next id, zero reserved bytes, a frame header
//!   that passes [`Header::layout`] within `max_frame`, a length equal to that frame's
//!   body, and an address range that does not wrap; else reading fails with
//!   `InvalidData` naming what is wrong (the connection closes; every later read fails
//!   the same). A bad rkey or address shows as a failed READ: the pipe is broken, as for
//!   a failed write. A release count that goes back or past what was sent is an error too.
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
//! A READ that fails or does not complete within [`OP_TIMEOUT`] marks the pipe broken
//! too, so a sender that vanishes mid-rendezvous is seen in bounded time.
//!
//! Not built: zero copy at the sender (READs from the caller's or the store's pinned
//! memory; see above why the body is staged), a registration cache for receive buffers
//! (each large frame registers its landing buffer), several READs in flight per pipe
//! (one frame is read at a time, in order), and a connection uses one queue pair and
//! one completion queue of its own (no shared receive queue).

use crate::shmpipe::HelloKind;
use crate::wire::{Header, HEADER_LEN};

/// First four bytes of an [`RdmaHello`], where a frame's magic would be.
pub(crate) const RDMA_HELLO_MAGIC: u32 = u32::from_le_bytes(*b"PRDM");
/// Length of an [`RdmaHello`] on the wire (a multiple of 8).
pub const RDMA_HELLO_LEN: usize = 96;
/// Version 2: frames of at least the sender's rendezvous threshold may arrive as
/// rendezvous descriptors (see the module docs); version 1 peers do not read them.
const RDMA_HELLO_VERSION: u8 = 2;
/// Bytes of an encoded queue-pair endpoint in a hello.
const ENDPOINT_BYTES: usize = 32;

/// Smallest and largest ring an offer may name.
#[cfg(feature = "rdma")]
pub(crate) const RDMA_RING_MIN: usize = 64 << 10;
#[cfg(feature = "rdma")]
pub(crate) const RDMA_RING_MAX: usize = 1 << 30;

/// First four bytes of a rendezvous descriptor, where a frame's magic would be.
pub(crate) const RDV_MAGIC: u32 = u32::from_le_bytes(*b"PRDV");
/// Bytes of a rendezvous descriptor in the ring (a multiple of 8): magic, reserved, id,
/// address, length, rkey, reserved, then the frame's 56-byte header.
pub const RDV_LEN: usize = 40 + HEADER_LEN;
/// Default [`TcpConfig::rdma_rendezvous_bytes`](crate::TcpConfig::rdma_rendezvous_bytes):
/// frames whose body (keys, values, padding) is at least this long leave by rendezvous.
pub const RDMA_RENDEZVOUS_DEFAULT: usize = 64 << 10;

/// How one side's pipe is set up (from [`TcpConfig`](crate::TcpConfig)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RdmaPipeConfig {
    /// Bytes of each ring (rounded up to a power of two within the bounds).
    pub ring: usize,
    /// Frames whose body is at least this long are sent by rendezvous; 0: never.
    pub rendezvous: usize,
    /// The largest frame this side accepts (bounds a descriptor's length).
    pub max_frame: usize,
}

/// A rendezvous descriptor: the frame's header, and where the peer's NIC reads its body
/// from (one of the sender's registered staging buffers).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) struct RdvDescriptor {
    /// The sender's sequence number of its rendezvous frames (0, 1, 2, ...).
    pub id: u64,
    /// The body's address, length and rkey in the sender's memory.
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
    /// The frame's header, delivered as it was before the body.
    pub header: [u8; HEADER_LEN],
}

#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
impl RdvDescriptor {
    /// The ring bytes.
    pub(crate) fn encode(&self) -> [u8; RDV_LEN] {
        let mut b = [0u8; RDV_LEN];
        b[0..4].copy_from_slice(&RDV_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..36].copy_from_slice(&self.rkey.to_le_bytes());
        b[40..].copy_from_slice(&self.header);
        b
    }

    /// Parse and check ring bytes written by the peer: the magic, zero reserved bytes,
    /// the id the receiver expects next, a frame header that passes
    /// [`Header::layout`] within `max_frame`, a length equal to that frame's body, and an
    /// address range that does not wrap. `Err` says what is wrong; never panics.
    pub(crate) fn decode(
        b: &[u8; RDV_LEN],
        expected_id: u64,
        max_frame: usize,
    ) -> Result<Self, String> {
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != RDV_MAGIC {
            return Err("not a rendezvous descriptor".into());
        }
        if b[4..8] != [0; 4] || b[36..40] != [0; 4] {
            return Err("a rendezvous descriptor with non-zero reserved bytes".into());
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&b[40..]);
        let d = RdvDescriptor {
            id: word(8),
            addr: word(16),
            len: word(24),
            rkey: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
            header,
        };
        if d.id != expected_id {
            return Err(format!(
                "a rendezvous descriptor of unknown id {} (expected {expected_id})",
                d.id
            ));
        }
        let layout = Header::from_bytes(&d.header)
            .layout(max_frame)
            .map_err(|e| format!("a rendezvous descriptor's frame header: {e}"))?;
        if d.len == 0 || d.len != layout.body_len as u64 {
            return Err(format!(
                "a rendezvous descriptor of {} bytes for a frame body of {} bytes",
                d.len, layout.body_len
            ));
        }
        if d.addr.checked_add(d.len).is_none() {
            return Err(format!(
                "a rendezvous descriptor of {} bytes at {:#x} wraps the address space",
                d.len, d.addr
            ));
        }
        Ok(d)
    }
}

/// Check a peer's rendezvous descriptor with the decoder the pipe runs on it (expecting
/// id `expected_id`, frames up to `max_frame`). `Err` says what is wrong; never panics.
pub fn check_rendezvous(
    bytes: &[u8; RDV_LEN],
    expected_id: u64,
    max_frame: usize,
) -> Result<(), String> {
    RdvDescriptor::decode(bytes, expected_id, max_frame).map(|_| ())
}

/// Valid rendezvous descriptors (ids 0 and 1), as the pipe writes them (seeds for the
/// fuzz corpus).
pub fn sample_rendezvous() -> Vec<[u8; RDV_LEN]> {
    use crate::wire::MessageKind;
    (0..2u64)
        .map(|id| {
            let mut h = Header::new(MessageKind::Push, 3, 9 + id);
            h.value_bytes = 100_000 + id * 8;
            RdvDescriptor {
                id,
                addr: 0x7f00_0010_0000,
                len: 100_000 + id * 8,
                rkey: 0x4321,
                header: h.as_bytes().try_into().expect("56 bytes"),
            }
            .encode()
        })
        .collect()
}

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

    use super::{RdmaHello, RdmaPipeConfig, RdmaRefusal};

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
        pub(crate) fn create(
            dev: &RdmaDevice,
            _cfg: RdmaPipeConfig,
        ) -> io::Result<(RdmaOffer, RdmaHello)> {
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
            _cfg: RdmaPipeConfig,
        ) -> Result<(RdmaPipe, RdmaHello), (RdmaRefusal, String)> {
            match *dev {}
        }
        pub(crate) fn ring_bytes(&self) -> usize {
            match *self {}
        }
        pub(crate) fn rendezvous_frames(&self) -> (u64, u64) {
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
    use std::collections::VecDeque;
    use std::io::{self, IoSlice};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use parking_lot::Mutex;
    use pserv_sys::rdma::{
        Access, Completion, Context, MemoryRegion, Opcode, ProtectionDomain, QpConfig, QpEndpoint,
        QueuePair, RdmaError, RemoteRegion,
    };
    use pserv_sys::PinnedRegion;

    use super::{
        HelloKind, RdmaHello, RdmaPipeConfig, RdmaRefusal, RdvDescriptor, OP_TIMEOUT,
        RDMA_RING_MAX, RDMA_RING_MIN, RDV_LEN, RDV_MAGIC,
    };
    use crate::wire::{Header, HEADER_LEN, MAGIC};

    /// Whether `bytes` are the first bytes of the little-endian `magic`.
    fn starts_like(bytes: &[u8], magic: u32) -> bool {
        magic.to_le_bytes().starts_with(bytes)
    }

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
    /// How many of this side's rendezvous frames the peer has read (its READs completed):
    /// their staging buffers may be used again.
    const C_RDV_DONE: usize = 640;
    // Words this side writes from (the sources of its small RDMA WRITEs):
    const S_TAIL: usize = 1024;
    const S_HEAD: usize = 1152;
    const S_ONE: usize = 1280;
    const S_RDV_DONE: usize = 1408;
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

    /// Rendezvous frames of one pipe whose staging buffers the peer has not released.
    pub(crate) const RDV_MAX_IN_FLIGHT: usize = 32;
    /// Their bytes (one frame larger than this goes alone).
    const RDV_IN_FLIGHT_BYTES: usize = 32 << 20;
    /// Released staging buffers a pipe keeps registered for later frames: count, bytes.
    const RDV_IDLE_COUNT: usize = 8;
    const RDV_IDLE_BYTES: usize = 16 << 20;
    /// The smallest staging buffer (sizes are powers of two, so buffers are reused).
    const RDV_MIN_BUFFER: usize = 64 << 10;

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
        /// Open `name` (or, without one, the first device with an ACTIVE port, as the
        /// one-sided backend picks; the first device when none is active) and allocate a
        /// protection domain.
        pub(crate) fn open(name: Option<&str>) -> Result<RdmaDevice, String> {
            let active = match name {
                Some(_) => None,
                None => pserv_sys::rdma::devices().ok().and_then(|devs| {
                    devs.into_iter()
                        .find(|d| d.ports.iter().any(|p| p.active))
                        .map(|d| d.name)
                }),
            };
            let ctx = Context::open(name.or(active.as_deref())).map_err(|e| e.to_string())?;
            let pd = ctx.alloc_pd().map_err(|e| e.to_string())?;
            tracing::info!(
                device = ctx.name(),
                firmware = ctx.firmware(),
                software = ctx.is_software_device(),
                "rdma message path: device opened"
            );
            Ok(RdmaDevice { pd })
        }

        /// The opened device's name.
        #[cfg(test)]
        pub(crate) fn name(&self) -> &str {
            self.pd.context().name()
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
        cfg: RdmaPipeConfig,
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
        /// The connecting side: a queue pair and a region of two `cfg.ring`-byte rings
        /// (rounded up to a power of two within the bounds), and the offer naming them.
        pub(crate) fn create(
            dev: &RdmaDevice,
            mut cfg: RdmaPipeConfig,
        ) -> io::Result<(RdmaOffer, RdmaHello)> {
            cfg.ring = cfg
                .ring
                .clamp(RDMA_RING_MIN, RDMA_RING_MAX)
                .next_power_of_two();
            let (qp, mr) = dev.make(cfg.ring).map_err(|e| verb_err("rdma offer", e))?;
            let offer = hello(HelloKind::Offer, cfg.ring, &mr, qp.endpoint());
            Ok((RdmaOffer { qp, mr, cfg }, offer))
        }

        /// The acceptor's answer came: connect the queue pair to its endpoint.
        pub(crate) fn complete(self, answer: &RdmaHello) -> io::Result<RdmaPipe> {
            let (remote, ep, _) = check_peer(answer, Some(self.cfg.ring))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let qp = self
                .qp
                .handshake(ep)
                .map_err(|e| verb_err("rdma connect", e))?;
            Ok(RdmaPipe::new(qp, self.mr, remote, self.cfg, true))
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
                        let what = if c.opcode == Opcode::Read {
                            "a read"
                        } else {
                            "a write"
                        };
                        return Err(self.fail(kind, format!("{what} failed: {e}")));
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
        /// Frames whose body is at least this long leave by rendezvous (0: never).
        rendezvous: usize,
        /// The largest frame this side accepts.
        max_frame: usize,
        /// The outbound stream's frame boundaries and rendezvous buffers.
        out: Mutex<OutState>,
        /// The inbound stream's frame boundaries and the rendezvous being read.
        inp: Mutex<InState>,
        /// Frames sent and received by rendezvous.
        rdv_sent: AtomicU64,
        rdv_received: AtomicU64,
    }

    /// A staging buffer the peer may still READ.
    struct InFlight {
        id: u64,
        buf: MemoryRegion,
    }

    /// The outbound stream as frames: the pipe takes whole frames' headers, so it knows
    /// where each starts. Locked before the queue pair.
    #[derive(Default)]
    struct OutState {
        /// Bytes of the current frame still to go through the ring (0: at a boundary).
        left: u64,
        /// Something that is not a frame was written (a caller's bug, or a header that
        /// did not parse): from then on every byte goes through the ring as it is.
        raw: bool,
        /// The id of the next rendezvous frame.
        next_id: u64,
        /// Rendezvous frames the peer released (its `C_RDV_DONE`, checked).
        released: u64,
        /// Buffers of frames not released yet, oldest first; their bytes.
        in_flight: VecDeque<InFlight>,
        in_flight_bytes: usize,
        /// Released buffers kept registered for later frames; their bytes.
        idle: Vec<MemoryRegion>,
        idle_bytes: usize,
        /// The last write stopped before a rendezvous frame for want of a slot.
        blocked: bool,
        /// Free ring bytes the next write needs to make progress (a whole header or
        /// descriptor at a frame boundary; 0 before the first write).
        need: u64,
    }

    impl OutState {
        /// Whether a rendezvous frame of `body` bytes may take a staging buffer now.
        fn slot_for(&self, body: usize) -> bool {
            self.in_flight.is_empty()
                || (self.in_flight.len() < RDV_MAX_IN_FLIGHT
                    && self.in_flight_bytes + body.max(RDV_MIN_BUFFER).next_power_of_two()
                        <= RDV_IN_FLIGHT_BYTES)
        }
    }

    /// What [`RdmaPipe::fill`] took: bytes of the caller's, and the new tail.
    struct Filled {
        written: usize,
        tail: u64,
    }

    /// A position in a caller's slices.
    struct Cursor<'a, 'b> {
        slices: &'a [IoSlice<'b>],
        i: usize,
        off: usize,
    }

    impl Cursor<'_, '_> {
        fn remaining(&self) -> usize {
            self.slices[self.i.min(self.slices.len())..]
                .iter()
                .map(|s| s.len())
                .sum::<usize>()
                - self.off
        }

        /// Copy up to `dst.len()` bytes from here without moving; how many.
        fn peek(&self, dst: &mut [u8]) -> usize {
            let (mut i, mut off, mut done) = (self.i, self.off, 0);
            while done < dst.len() && i < self.slices.len() {
                let s = &self.slices[i][off..];
                let k = s.len().min(dst.len() - done);
                dst[done..done + k].copy_from_slice(&s[..k]);
                done += k;
                i += 1;
                off = 0;
            }
            done
        }

        /// Move past `n` bytes (there are that many), handing them to `f` piece by piece.
        fn take(&mut self, mut n: usize, mut f: impl FnMut(&[u8])) {
            while n > 0 {
                let s = &self.slices[self.i][self.off..];
                let k = s.len().min(n);
                if k > 0 {
                    f(&s[..k]);
                }
                n -= k;
                self.off += k;
                if self.off == self.slices[self.i].len() {
                    self.i += 1;
                    self.off = 0;
                }
            }
        }
    }

    /// The rendezvous frame being delivered.
    struct Rdv {
        desc: RdvDescriptor,
        remote: RemoteRegion,
        /// Bytes of the header and of the body delivered.
        header_done: usize,
        body_done: u64,
    }

    /// The inbound stream as frames. Locked before the queue pair.
    #[derive(Default)]
    struct InState {
        /// Ring bytes of the current frame not delivered yet (0: at a boundary).
        left: u64,
        /// A header that did not parse was seen: bytes go out as they are (the
        /// transport's frame checks then close the connection).
        raw: bool,
        /// The id the next descriptor must carry.
        next_id: u64,
        rdv: Option<Rdv>,
        /// A descriptor was refused: every later read fails with this.
        bad: Option<String>,
        /// The peer's tail when a read found only part of a header or descriptor (the
        /// ring is not readable until the tail moves).
        stalled_at: Option<u64>,
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
            cfg: RdmaPipeConfig,
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
            let cfg = RdmaPipeConfig { ring, ..cfg };
            Ok((RdmaPipe::new(qp, mr, remote, cfg, false), answer))
        }

        fn new(
            qp: QueuePair,
            mr: Arc<MemoryRegion>,
            remote: RemoteRegion,
            cfg: RdmaPipeConfig,
            connector: bool,
        ) -> Self {
            let ring = cfg.ring;
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
                rendezvous: cfg.rendezvous,
                max_frame: cfg.max_frame,
                out: Mutex::new(OutState::default()),
                inp: Mutex::new(InState::default()),
                rdv_sent: AtomicU64::new(0),
                rdv_received: AtomicU64::new(0),
            }
        }

        /// Bytes of each ring.
        pub(crate) fn ring_bytes(&self) -> usize {
            self.ring
        }

        /// Frames sent and received by rendezvous so far.
        pub(crate) fn rendezvous_frames(&self) -> (u64, u64) {
            (
                self.rdv_sent.load(Ordering::Relaxed),
                self.rdv_received.load(Ordering::Relaxed),
            )
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
                            format!("a write or read did not complete within {OP_TIMEOUT:?}"),
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
        ///
        /// `slices` continue the stream of whole frames where the last call stopped. A
        /// frame whose body is at least the rendezvous threshold is taken whole or not
        /// at all: its body is copied into a registered staging buffer and a descriptor
        /// goes through the ring in its place; it counts as written in full.
        pub(crate) fn write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<(usize, bool)> {
            self.qp.lock().check()?;
            let want: usize = slices.iter().map(|s| s.len()).sum();
            if want == 0 {
                return Ok((0, false));
            }
            if !self.ready() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut out = self.out.lock();
            self.release(&mut out)?;
            let start_tail = self.tail.load(Ordering::Relaxed);
            let mut filled = self.fill(&mut out, slices, self.ring as u64 - self.out_used()?);
            if filled.written == 0 {
                // Ask for a wake-up (landed before we look again), then look again.
                self.write_word(S_ONE, C_WRITER_WAITING)?;
                self.release(&mut out)?;
                filled = self.fill(&mut out, slices, self.ring as u64 - self.out_used()?);
                if filled.written == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
            drop(out);
            let tail = filled.tail;
            let mask = self.ring as u64 - 1;
            let staging = DATA + self.ring;
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
            if filled.written < want {
                self.write_word(S_ONE, C_WRITER_WAITING)?;
            }
            Ok((filled.written, self.take_flag(C_READER_WAITING)))
        }

        /// Copy what of `slices` fits `free` ring bytes (and the rendezvous slots) into
        /// the staging mirror from the current tail, and rendezvous bodies into staging
        /// buffers; nothing is posted. Changes `out`'s stream position only for what it
        /// took (and notes what the next write needs: room, or a slot).
        fn fill(&self, out: &mut OutState, slices: &[IoSlice<'_>], mut free: u64) -> Filled {
            let mut cur = Cursor {
                slices,
                i: 0,
                off: 0,
            };
            let mut tail = self.tail.load(Ordering::Relaxed);
            let mut written = 0usize;
            let mut need = 1;
            loop {
                let rem = cur.remaining();
                if rem == 0 {
                    break;
                }
                if out.raw || out.left > 0 {
                    let lim = if out.raw {
                        rem
                    } else {
                        rem.min(out.left as usize)
                    };
                    let k = lim.min(free as usize);
                    if k == 0 {
                        break;
                    }
                    cur.take(k, |piece| {
                        self.stage(tail, piece);
                        tail = tail.wrapping_add(piece.len() as u64);
                    });
                    free -= k as u64;
                    written += k;
                    if !out.raw {
                        out.left -= k as u64;
                    }
                    continue;
                }
                // A frame starts here: its header is in `slices` (callers write whole
                // frames); anything else goes through as it is.
                let mut head = [0u8; HEADER_LEN];
                let got = cur.peek(&mut head);
                if got < HEADER_LEN {
                    debug_assert!(
                        !starts_like(&head[..got], MAGIC),
                        "a frame's header is split across writes"
                    );
                    out.raw = true;
                    continue;
                }
                let Ok(layout) = Header::from_bytes(&head).layout(usize::MAX) else {
                    out.raw = true;
                    continue;
                };
                let body = layout.body_len;
                let rendezvous =
                    self.rendezvous > 0 && body >= self.rendezvous && rem - HEADER_LEN >= body;
                if rendezvous {
                    if free < RDV_LEN as u64 {
                        need = RDV_LEN as u64;
                        break;
                    }
                    if !out.slot_for(body) {
                        out.blocked = true;
                        break;
                    }
                    match self.staging_buffer(out, body) {
                        Ok(buf) => {
                            cur.take(HEADER_LEN, |_| {});
                            let mut at = 0;
                            cur.take(body, |piece| {
                                buf.write_at(at, piece).expect("inside the staging buffer");
                                at += piece.len();
                            });
                            let desc = RdvDescriptor {
                                id: out.next_id,
                                addr: buf.addr(),
                                len: body as u64,
                                rkey: buf.rkey(),
                                header: head,
                            };
                            self.stage(tail, &desc.encode());
                            tail = tail.wrapping_add(RDV_LEN as u64);
                            free -= RDV_LEN as u64;
                            written += HEADER_LEN + body;
                            out.in_flight_bytes += buf.len();
                            // The frame's bytes now live in `buf` only, until released.
                            out.in_flight.push_back(InFlight {
                                id: out.next_id,
                                buf,
                            });
                            out.next_id += 1;
                            out.blocked = false;
                            self.rdv_sent.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, bytes = body, "no rendezvous staging buffer: the frame goes through the ring");
                        }
                    }
                }
                // Through the ring; its header lands in one write (the reader looks at
                // whole headers only).
                if free < HEADER_LEN as u64 {
                    need = HEADER_LEN as u64;
                    break;
                }
                out.left = layout.frame_len() as u64;
            }
            out.need = need;
            Filled { written, tail }
        }

        /// Copy `bytes` into the staging mirror at ring position `at` (wrapping).
        fn stage(&self, at: u64, bytes: &[u8]) {
            let mask = self.ring as u64 - 1;
            let staging = DATA + self.ring;
            let mut at = at;
            let mut src = bytes;
            while !src.is_empty() {
                let off = (at & mask) as usize;
                let n = src.len().min(self.ring - off);
                self.mr
                    .write_at(staging + off, &src[..n])
                    .expect("inside the staging ring");
                src = &src[n..];
                at = at.wrapping_add(n as u64);
            }
        }

        /// A registered staging buffer of at least `len` bytes: the smallest idle one
        /// that fits, else a new one (a power of two, registered for remote reads).
        fn staging_buffer(&self, out: &mut OutState, len: usize) -> io::Result<MemoryRegion> {
            let best = out
                .idle
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let buf = out.idle.swap_remove(i);
                out.idle_bytes -= buf.len();
                return Ok(buf);
            }
            let size = len.max(RDV_MIN_BUFFER).next_power_of_two();
            let region = PinnedRegion::new(size).map_err(io::Error::other)?;
            self.mr
                .pd()
                .register(region, Access::REMOTE_READ)
                .map_err(|e| verb_err("registering a rendezvous buffer", e))
        }

        /// Take the peer's word of how many rendezvous frames it has read, checked, and
        /// keep (or free) their buffers.
        fn release(&self, out: &mut OutState) -> io::Result<()> {
            let done = self.word(C_RDV_DONE).load(Ordering::Acquire);
            if done < out.released || done > out.next_id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "rdma rendezvous: the peer says it read {done} frames of {} sent ({} released before)",
                        out.next_id, out.released
                    ),
                ));
            }
            out.released = done;
            while out.in_flight.front().is_some_and(|f| f.id < done) {
                let f = out.in_flight.pop_front().expect("looked at");
                out.in_flight_bytes -= f.buf.len();
                if out.idle.len() < RDV_IDLE_COUNT && out.idle_bytes + f.buf.len() <= RDV_IDLE_BYTES
                {
                    out.idle_bytes += f.buf.len();
                    out.idle.push(f.buf);
                }
                out.blocked = false;
            }
            Ok(())
        }

        /// Read what this side's ring holds into `buf` (`WouldBlock` when empty); the
        /// bytes read and whether the peer waits for room (ring its doorbell).
        ///
        /// What landed in the ring is read even after the queue pair failed (a peer
        /// that wrote its last frames and exited: its queue pair goes to error with it);
        /// the failure is reported once the ring is empty.
        ///
        /// A rendezvous descriptor where a frame starts is checked, and its frame is
        /// delivered in its place: the header, then the body, RDMA READ from the peer's
        /// staging buffer straight into `buf`.
        pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
            if buf.is_empty() {
                return Ok((0, false));
            }
            let mut inp = self.inp.lock();
            if let Some(why) = &inp.bad {
                return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
            }
            if inp.rdv.is_some() {
                return self.read_rendezvous(&mut inp, buf);
            }
            let avail = self.in_avail()?;
            if avail == 0 {
                self.qp.lock().check()?;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let head = self.head.load(Ordering::Relaxed);
            // The span to copy: up to the next descriptor, or to a header not whole yet.
            let limit = avail.min(buf.len() as u64);
            let mut span = 0u64;
            while span < limit {
                if inp.raw {
                    span = limit;
                    break;
                }
                if inp.left > 0 {
                    let k = inp.left.min(limit - span);
                    span += k;
                    inp.left -= k;
                    continue;
                }
                let have = avail - span;
                let mut magic = [0u8; 4];
                let seen = have.min(magic.len() as u64) as usize;
                self.peek(head.wrapping_add(span), &mut magic[..seen]);
                if !starts_like(&magic[..seen], MAGIC) && !starts_like(&magic[..seen], RDV_MAGIC) {
                    // Not a frame: the transport's checks say so.
                    inp.raw = true;
                    continue;
                }
                if seen < magic.len() {
                    break;
                }
                if u32::from_le_bytes(magic) == RDV_MAGIC {
                    if span > 0 || have < RDV_LEN as u64 {
                        break;
                    }
                    let mut rec = [0u8; RDV_LEN];
                    self.peek(head, &mut rec);
                    let desc = match RdvDescriptor::decode(&rec, inp.next_id, self.max_frame) {
                        Ok(d) => d,
                        Err(why) => {
                            let why = format!("rdma rendezvous: {why}");
                            inp.bad = Some(why.clone());
                            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
                        }
                    };
                    inp.next_id += 1;
                    inp.rdv = Some(Rdv {
                        remote: RemoteRegion {
                            addr: desc.addr,
                            len: desc.len,
                            rkey: desc.rkey,
                        },
                        desc,
                        header_done: 0,
                        body_done: 0,
                    });
                    let wake = self.consume(head, RDV_LEN as u64);
                    let (n, wake_too) = self.read_rendezvous(&mut inp, buf)?;
                    return Ok((n, wake || wake_too));
                }
                if have < HEADER_LEN as u64 {
                    break;
                }
                let mut h = [0u8; HEADER_LEN];
                self.peek(head.wrapping_add(span), &mut h);
                match Header::from_bytes(&h).layout(self.max_frame) {
                    Ok(l) => inp.left = l.frame_len() as u64,
                    Err(_) => inp.raw = true,
                }
            }
            if span == 0 {
                // Part of a header or descriptor: the rest comes with the same write.
                inp.stalled_at = Some(self.word(C_IN_TAIL).load(Ordering::Acquire));
                self.qp.lock().check()?;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            inp.stalled_at = None;
            let n = span as usize;
            self.peek(head, &mut buf[..n]);
            Ok((n, self.consume(head, span)))
        }

        /// Copy ring bytes from position `at` (wrapping) into `dst`.
        fn peek(&self, at: u64, dst: &mut [u8]) {
            let mask = self.ring as u64 - 1;
            let mut at = at;
            let mut done = 0;
            while done < dst.len() {
                let off = (at & mask) as usize;
                let k = (dst.len() - done).min(self.ring - off);
                self.mr
                    .read_at(DATA + off, &mut dst[done..done + k])
                    .expect("inside the ring");
                done += k;
                at = at.wrapping_add(k as u64);
            }
        }

        /// Move the head past `n` bytes read from `head` and credit them to the peer;
        /// whether the peer waits for room.
        fn consume(&self, head: u64, n: u64) -> bool {
            let head = head.wrapping_add(n);
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
            credited.is_ok() && self.take_flag(C_WRITER_WAITING)
        }

        /// Deliver the next bytes of the rendezvous frame being read: its header, then
        /// its body, READ into `buf`; once the body is in, tell the peer its buffer is
        /// free.
        fn read_rendezvous(&self, inp: &mut InState, buf: &mut [u8]) -> io::Result<(usize, bool)> {
            let rdv = inp.rdv.as_mut().expect("a rendezvous is being read");
            if rdv.header_done < HEADER_LEN {
                let n = (HEADER_LEN - rdv.header_done).min(buf.len());
                buf[..n].copy_from_slice(&rdv.desc.header[rdv.header_done..rdv.header_done + n]);
                rdv.header_done += n;
                return Ok((n, false));
            }
            let n = (rdv.desc.len - rdv.body_done).min(buf.len() as u64) as usize;
            self.read_remote(&mut buf[..n], &rdv.remote, rdv.body_done)?;
            rdv.body_done += n as u64;
            if rdv.body_done < rdv.desc.len {
                return Ok((n, false));
            }
            inp.rdv = None;
            self.rdv_received.fetch_add(1, Ordering::Relaxed);
            // Released: the id of every frame read so far (ids are consecutive).
            self.word(S_RDV_DONE).store(inp.next_id, Ordering::Release);
            let told = {
                let mut st = self.qp.lock();
                self.post(&mut st, S_RDV_DONE, 8, C_RDV_DONE, true)
            }
            .and_then(|wr| self.wait(wr));
            // A peer that cannot be told is gone; the bytes read are delivered anyway.
            Ok((n, told.is_ok() && self.take_flag(C_WRITER_WAITING)))
        }

        /// RDMA READ `dst.len()` bytes at `offset` of the peer's `remote` straight into
        /// `dst`, registered for the time of the READ; wait for it (a failure or a READ
        /// that does not complete within [`OP_TIMEOUT`] marks the pipe broken).
        fn read_remote(
            &self,
            dst: &mut [u8],
            remote: &RemoteRegion,
            offset: u64,
        ) -> io::Result<()> {
            let len = dst.len();
            let local = match self.mr.pd().register_borrowed(dst, Access::LOCAL_WRITE) {
                Ok(r) => r,
                Err(e) => {
                    return Err(self.qp.lock().fail(
                        LOCAL_FAILURE,
                        format!("registering a rendezvous landing buffer of {len} bytes: {e}"),
                    ))
                }
            };
            let wr = {
                let mut st = self.qp.lock();
                let mut at = 0usize;
                let mut last = 0;
                while at < len {
                    let n = (len - at).min(self.max_msg);
                    let start = Instant::now();
                    last = loop {
                        st.check()?;
                        let wr = st.next_wr;
                        match st.qp.post_read_borrowed(
                            wr,
                            &local,
                            at..at + n,
                            remote,
                            offset + at as u64,
                            at + n == len,
                        ) {
                            Ok(()) => {
                                st.next_wr += 1;
                                break wr;
                            }
                            Err(RdmaError::QueueFull { .. }) if start.elapsed() < OP_TIMEOUT => {
                                st.drain()?;
                                std::hint::spin_loop();
                            }
                            Err(e) => {
                                return Err(st.fail(
                                    PEER_UNREACHABLE,
                                    format!("posting a rendezvous read: {e}"),
                                ))
                            }
                        }
                    };
                    at += n;
                }
                last
            };
            // On failure `local` is dropped here, deregistered: the device does not touch
            // `dst` again, whatever became of the READ.
            self.wait(wr)
        }

        /// Whether a read makes progress: this side's ring holds bytes beyond a partial
        /// header, or a rendezvous frame is being read (a broken pipe, ring or stream
        /// counts: reading reports it).
        pub(crate) fn readable(&self) -> bool {
            let inp = self.inp.lock();
            if inp.bad.is_some() || inp.rdv.is_some() || self.broken() {
                return true;
            }
            match self.in_avail() {
                Err(_) => true,
                Ok(0) => false,
                Ok(_) => inp.stalled_at != Some(self.word(C_IN_TAIL).load(Ordering::Acquire)),
            }
        }

        /// Whether a write makes progress: the peer's ring has room (for a whole header or
        /// descriptor where the last write stopped before one), and a rendezvous frame that waited for a slot has one now (a
        /// broken pipe or ring counts: writing reports it).
        pub(crate) fn writable(&self) -> bool {
            if self.broken() {
                return true;
            }
            if !self.ready() {
                return false;
            }
            let out = self.out.lock();
            let room = match self.out_used() {
                Ok(u) => self.ring as u64 - u >= out.need.max(1),
                Err(_) => return true,
            };
            if !room {
                return false;
            }
            !out.blocked || self.word(C_RDV_DONE).load(Ordering::Acquire) != out.released
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

    /// A connected pair of pipes on the device named by `PSERV_RDMA_DEVICE`, without
    /// rendezvous (every byte through the rings).
    #[cfg(feature = "rdma")]
    fn pair(ring: usize) -> (RdmaPipe, RdmaPipe) {
        pair_with(ring, 0)
    }

    /// A connected pair whose frames of a body of at least `rendezvous` bytes leave by
    /// rendezvous (0: never).
    #[cfg(feature = "rdma")]
    fn pair_with(ring: usize, rendezvous: usize) -> (RdmaPipe, RdmaPipe) {
        let name = std::env::var("PSERV_RDMA_DEVICE")
            .expect("PSERV_RDMA_DEVICE is not set: name an RDMA device (e.g. soft0)");
        let dev = RdmaDevice::open(Some(&name)).expect("open the device");
        let cfg = RdmaPipeConfig {
            ring,
            rendezvous,
            max_frame: crate::wire::DEFAULT_MAX_FRAME,
        };
        let (offer, hello) = RdmaOffer::create(&dev, cfg).expect("offer");
        let hello = RdmaHello::decode(&hello.encode()).expect("the offer parses");
        let (b, answer) = RdmaPipe::accept(&dev, &hello, cfg).expect("accept");
        let answer = RdmaHello::decode(&answer.encode()).expect("the answer parses");
        let a = offer.complete(&answer).expect("connect");
        a.mark_peer_ready().expect("mark ready");
        (a, b)
    }

    /// Without a device name the message path opens the first device with an ACTIVE
    /// port (a device whose port is down would carry nothing). scripts/soft-rdma-test
    /// runs it once more with soft0's port down, expecting soft1
    /// (`PSERV_EXPECT_RDMA_DEVICE`).
    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: pass --ignored"]
    fn without_a_name_the_message_path_opens_a_device_with_an_active_port() {
        let devs = pserv_sys::rdma::devices().expect("list the devices");
        let first_active = devs
            .iter()
            .find(|d| d.ports.iter().any(|p| p.active))
            .expect("a device with an ACTIVE port")
            .name
            .clone();
        if let Ok(want) = std::env::var("PSERV_EXPECT_RDMA_DEVICE") {
            assert_eq!(first_active, want, "the first device with an ACTIVE port");
        }
        let dev = RdmaDevice::open(None).expect("open a device");
        assert_eq!(dev.name(), first_active);
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

    /// The wire bytes of a control frame with `n` value bytes derived from `ts`.
    #[cfg(feature = "rdma")]
    fn frame_bytes(ts: u64, n: usize) -> Vec<u8> {
        use crate::wire::{pad8, MessageKind};
        let mut h = Header::new(MessageKind::Control, 7, ts);
        h.value_bytes = n as u64;
        let mut b = h.as_bytes().to_vec();
        b.extend((0..n).map(|i| (i as u64 * 31 + ts * 7) as u8));
        b.resize(pad8(HEADER_LEN + n), 0);
        b
    }

    /// Move `frames` from `tx` to `rx` and back the stream `rx` read: written in batches
    /// of up to `batch` frames per vectored write (resumed where a write stopped), read
    /// in chunks of varying sizes; bounded in time.
    #[cfg(feature = "rdma")]
    fn pump(tx: &RdmaPipe, rx: &RdmaPipe, frames: &[Vec<u8>], batch: usize) -> Vec<u8> {
        use std::io::IoSlice;
        use std::time::{Duration, Instant};
        let total: usize = frames.iter().map(|f| f.len()).sum();
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0u8; 1 << 20];
        let (mut next, mut front_done) = (0usize, 0usize);
        let start = Instant::now();
        let mut round = 0usize;
        while got.len() < total {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "stuck: {} of {total} bytes received",
                got.len()
            );
            round += 1;
            if next < frames.len() {
                let mut slices = vec![IoSlice::new(&frames[next][front_done..])];
                for f in frames.iter().skip(next + 1).take(batch - 1) {
                    slices.push(IoSlice::new(f));
                }
                match tx.write_vectored(&slices) {
                    Ok((mut n, _)) => {
                        while n > 0 {
                            let left = frames[next].len() - front_done;
                            if n >= left {
                                n -= left;
                                next += 1;
                                front_done = 0;
                            } else {
                                front_done += n;
                                n = 0;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            // Chunks from 1 byte (headers in pieces) to the whole buffer.
            let chunk = [1usize, 7, 56, 100, 4096, 70_000, 1 << 20][round % 7];
            for _ in 0..4 {
                match rx.read(&mut buf[..chunk]) {
                    Ok((k, _)) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
        got
    }

    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn rendezvous_frames_around_the_threshold_keep_their_place_both_ways() {
        let threshold = 4096;
        let (a, b) = pair_with(64 << 10, threshold);
        // Bodies just below, at and above the threshold, larger than the ring, between
        // small frames.
        let mut frames = Vec::new();
        let mut ts = 0u64;
        for n in
            (threshold - 24..threshold + 24)
                .step_by(4)
                .chain([100_000, 300_000, 1 << 20, 3 << 20])
        {
            for m in [n, 1, 300] {
                frames.push(frame_bytes(ts, m));
                ts += 1;
            }
        }
        let want: Vec<u8> = frames.concat();
        let big = frames
            .iter()
            .filter(|f| f.len() - HEADER_LEN >= threshold)
            .count() as u64;
        for batch in [1, 5, 64] {
            let before = (a.rendezvous_frames(), b.rendezvous_frames());
            assert!(
                pump(&a, &b, &frames, batch) == want,
                "a to b: the stream changed"
            );
            assert!(
                pump(&b, &a, &frames, batch) == want,
                "b to a: the stream changed"
            );
            assert_eq!(
                a.rendezvous_frames().0 - before.0 .0,
                big,
                "a sent by rendezvous"
            );
            assert_eq!(
                b.rendezvous_frames().1 - before.1 .1,
                big,
                "b read by rendezvous"
            );
            assert_eq!(
                b.rendezvous_frames().0 - before.1 .0,
                big,
                "b sent by rendezvous"
            );
            assert_eq!(
                a.rendezvous_frames().1 - before.0 .1,
                big,
                "a read by rendezvous"
            );
        }
        // Without rendezvous the same stream goes through the ring.
        let (c, d) = pair(64 << 10);
        assert!(pump(&c, &d, &frames, 8) == want);
        assert_eq!(c.rendezvous_frames(), (0, 0));
        assert_eq!(d.rendezvous_frames(), (0, 0));
    }

    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn rendezvous_frames_in_flight_wait_for_their_release() {
        use std::io::IoSlice;
        let (a, b) = pair_with(64 << 10, 1024);
        let frames: Vec<Vec<u8>> = (0..50u64).map(|ts| frame_bytes(ts, 20_000)).collect();
        // Nobody reads: the sender takes as many as it has slots for, then stops.
        let mut sent = 0;
        while sent < frames.len() {
            match a.write_vectored(&[IoSlice::new(&frames[sent])]) {
                Ok((n, _)) => {
                    assert_eq!(n, frames[sent].len(), "a rendezvous frame goes whole");
                    sent += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        assert_eq!(
            sent,
            verbs::RDV_MAX_IN_FLIGHT,
            "every slot taken, then none"
        );
        assert!(!a.writable(), "no slot: not writable");
        // The reader that reads one whole frame releases its buffer and wakes the writer.
        let mut buf = vec![0u8; 1 << 20];
        let len = frames[0].len();
        let (mut got, mut woke) = (0, false);
        while got < len {
            let (k, wake) = b.read(&mut buf[got..len]).expect("read");
            got += k;
            woke |= wake;
        }
        assert_eq!(buf[..len], frames[0][..]);
        assert!(woke, "the writer waiting for a slot is woken");
        assert!(a.writable());
        // The frames in flight come next, then the rest as it is sent.
        let in_flight = frames[1..sent].concat();
        let mut stream = Vec::new();
        let start = std::time::Instant::now();
        while stream.len() < in_flight.len() {
            assert!(
                start.elapsed() < OP_TIMEOUT * 4,
                "frames in flight not delivered"
            );
            match b.read(&mut buf) {
                Ok((k, _)) => stream.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        assert!(stream == in_flight, "the frames in flight changed");
        assert!(pump(&a, &b, &frames[sent..], 4) == frames[sent..].concat());
        assert_eq!(a.rendezvous_frames().0, frames.len() as u64);
    }

    /// A descriptor as a hostile peer writes it into the ring (its bytes do not start
    /// with a frame's magic, so the writing pipe passes them through unchanged).
    #[cfg(feature = "rdma")]
    fn hostile(desc: &RdvDescriptor) -> std::io::Error {
        let (a, b) = pair_with(64 << 10, 1024);
        let bytes = desc.encode();
        let (n, _) = a
            .write_vectored(&[std::io::IoSlice::new(&bytes)])
            .expect("write");
        assert_eq!(n, RDV_LEN);
        let mut buf = vec![0u8; 1 << 20];
        let start = std::time::Instant::now();
        loop {
            assert!(
                start.elapsed() < OP_TIMEOUT * 2,
                "a hostile descriptor hangs"
            );
            match b.read(&mut buf) {
                Ok((k, _)) => assert!(k <= HEADER_LEN, "only the header is delivered"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The error stays.
                    assert!(b.read(&mut buf).is_err());
                    return e;
                }
            }
        }
    }

    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn hostile_rendezvous_descriptors_fail_the_pipe_with_a_clear_error() {
        let header: [u8; HEADER_LEN] = frame_bytes(1, 8000)[..HEADER_LEN].try_into().unwrap();
        let good = RdvDescriptor {
            id: 0,
            addr: 0x7000_0000,
            len: 8000,
            rkey: 0xbad,
            header,
        };
        let e = hostile(&RdvDescriptor {
            id: 3,
            ..good.clone()
        });
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("unknown id 3"), "{e}");
        let e = hostile(&RdvDescriptor {
            len: 7999,
            ..good.clone()
        });
        assert!(e.to_string().contains("for a frame body of 8000"), "{e}");
        let e = hostile(&RdvDescriptor {
            len: 0,
            ..good.clone()
        });
        assert!(e.to_string().contains("frame body"), "{e}");
        let mut huge = Header::from_bytes(&header);
        huge.value_bytes = 1 << 40;
        let e = hostile(&RdvDescriptor {
            len: (1 << 40) + 8,
            header: huge.as_bytes().try_into().unwrap(),
            ..good.clone()
        });
        assert!(e.to_string().contains("frame header"), "{e}");
        let e = hostile(&RdvDescriptor {
            addr: u64::MAX - 100,
            ..good.clone()
        });
        assert!(e.to_string().contains("wraps"), "{e}");
        // Well formed, but naming memory the peer never registered: the READ fails and
        // the pipe is broken.
        let e = hostile(&good);
        assert!(e.to_string().contains("a read failed"), "{e}");
    }

    #[cfg(feature = "rdma")]
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn a_peer_that_vanishes_mid_rendezvous_is_seen_without_a_hang() {
        use std::io::IoSlice;
        use std::time::{Duration, Instant};
        let bound = OP_TIMEOUT + Duration::from_secs(5);
        // The sender goes away after its descriptor landed: the receiver's READ fails.
        let (a, b) = pair_with(64 << 10, 1024);
        let f = frame_bytes(9, 500_000);
        let (n, _) = a.write_vectored(&[IoSlice::new(&f)]).expect("write");
        assert_eq!(n, f.len());
        drop(a);
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        let (k, _) = b.read(&mut buf).expect("the header is delivered");
        assert_eq!(buf[..k], f[..HEADER_LEN]);
        let e = b.read(&mut buf).expect_err("the body cannot be read");
        assert!(start.elapsed() < bound, "took {:?}", start.elapsed());
        assert!(e.to_string().contains("rdma queue pair"), "{e}");
        // The receiver goes away while the sender waits for slots: its writes fail.
        let (a, b) = pair_with(64 << 10, 1024);
        let f = frame_bytes(10, 20_000);
        while a.write_vectored(&[IoSlice::new(&f)]).is_ok() {}
        drop(b);
        let start = Instant::now();
        let e = loop {
            assert!(start.elapsed() < bound, "a write to a vanished peer hangs");
            match a.write_vectored(&[IoSlice::new(&f)]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break e,
                Ok(_) => panic!("a write with no slot left succeeded"),
            }
        };
        assert!(e.to_string().contains("rdma queue pair"), "{e}");
    }

    #[test]
    fn rendezvous_descriptors_round_trip_and_refuse_garbage() {
        use crate::wire::MessageKind;
        let mut h = Header::new(MessageKind::Push, 2, 5);
        h.value_bytes = 100_000;
        let header: [u8; HEADER_LEN] = h.as_bytes().try_into().unwrap();
        let d = RdvDescriptor {
            id: 4,
            addr: 0x7f00_0000_0000,
            len: 100_000,
            rkey: 77,
            header,
        };
        let max = crate::wire::DEFAULT_MAX_FRAME;
        assert_eq!(RdvDescriptor::decode(&d.encode(), 4, max), Ok(d.clone()));
        assert!(check_rendezvous(&d.encode(), 5, max)
            .unwrap_err()
            .contains("unknown id 4"));
        assert!(check_rendezvous(&d.encode(), 4, 50_000)
            .unwrap_err()
            .contains("frame header"));
        let mut b = d.encode();
        b[37] = 1;
        assert!(check_rendezvous(&b, 4, max)
            .unwrap_err()
            .contains("reserved"));
        b = d.encode();
        b[0] = b'X';
        assert!(check_rendezvous(&b, 4, max).is_err());
        assert_eq!(RDV_LEN % 8, 0, "frames after a descriptor stay aligned");
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
