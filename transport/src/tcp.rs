//! TCP on per-core mio event loops.
//!
//! A [`TcpTransport`] runs N event-loop threads (default: one per core), each pinned to a
//! core and owning its `mio::Poll`, its connections' read state and its receive buffers.
//! Application threads hand control work (adopting a connection, listening, closing,
//! shutting down) to a loop over a crossbeam channel plus a `mio::Waker`.
//!
//! Sending is done by whoever sends: [`Conn::send`] takes the connection's write lock and,
//! when nothing is queued, writes the frame with one vectored write straight from the
//! caller's buffers (header, keys, values: no staging copy). What the socket does not take
//! is queued and flushed by the owning loop on the next writable edge. This saves a
//! cross-core wake-up (about 25 us on these machines) on every request.
//!
//! Receiving is done by the loops only. Small frames are parsed in place from a 64 KiB
//! per-connection buffer (many frames per `read`), large frames are read straight into a
//! pooled buffer of their size. Each frame goes to the loop's [`Handler`].
//!
//! Backpressure: a connection's queued bytes are bounded by `send_queue_max_bytes`. An
//! application thread that sends beyond it blocks until the loop has flushed below half of
//! it; a loop thread never blocks: instead the loop stops reading requests from a peer
//! whose answers it cannot deliver, until they drain.
//!
//! Bad input: a frame that fails [`Header::layout`] / [`Frame::from_body`], a compressed
//! frame whose block does not decode to its values, a peer that closes mid-frame, or a
//! socket error closes that connection with one log line and an [`Handler::on_close`]
//! call; the loop keeps serving every other connection.
//!
//! # Value compression, negotiated per connection
//!
//! A connection may compress the values of the data frames it sends
//! ([`Conn::set_codec`]; [`Codec::None`] by default). [`Conn::send`] encodes the value
//! section of a frame of `f32` or `f64` values, status 0, not compressed already, with
//! at least [`COMPRESS_MIN_BYTES`] of values (exactly as many as its keys and value length
//! call for) into one [`compress`] block. When the block is smaller than the values the
//! frame goes out with [`FLAG_COMPRESSED`] and the block as its values; otherwise it goes
//! out unchanged. Keys are never compressed, nor are control frames, error answers
//! (dtype bytes or a non-zero status) or frames sent with [`Conn::send_borrowed`] (large
//! range pulls streamed from a store under its lock, which compressing would hold longer).
//! Compression runs on the sending thread, before it takes the connection's write lock,
//! with one codec [`Context`](compress::Context) per thread.
//!
//! The receiving loop decodes a compressed frame before its handler sees it. The block
//! must decode to exactly the value bytes the header calls for: keys x value length x
//! element size, where the keys are the key count, the keys in the range of a
//! [`FLAG_RANGE`] frame, or the list length of a [`FLAG_KEYS_CACHED`] frame; and the
//! decoded frame must pass the usual checks within `max_frame`. Its claimed length is
//! checked before anything is allocated. The handler gets an owned frame with the flag
//! cleared and `value_bytes` the decoded length. A block that does not decode to that
//! closes the connection with [`CloseReason::BadBlock`], like any malformed frame.
//!
//! Negotiation needs no handshake: a peer that sends a compressed frame shows that it
//! decodes them. With [`TcpConfig::mirror_codec`] (the default) a connection whose own
//! codec is none takes the codec of the first compressed frame it receives, so a server
//! answers compressed exactly to the workers that compress, and raw to the others. A
//! peer must only be sent compressed frames once it is known to decode them (a build
//! without compression refuses [`FLAG_COMPRESSED`] as an unknown flag): turn a codec on
//! at the side that knows, the other side follows. [`Stats`] counts the value bytes of
//! the frames compression was tried on, before and after, both ways.
//!
//! # Locks and their order
//!
//! What is shared between threads, and how:
//!
//! - Per connection ([`Conn`]):
//!   - `write: Mutex<WriteState>`: the send queue, the bytes of its front frame already
//!     written and the count of queued bytes. Every write to the socket is made under it
//!     (so the bytes of two frames never interleave); the loop's reads take no lock.
//!   - `space: Condvar`, paired with `write`: application threads over the queue bound
//!     wait on it (releasing `write`); the loop notifies it after a flush that leaves at
//!     most half the bound queued, and closing notifies it.
//!   - `closed: AtomicBool`: set once, by `mark_closed`, *before* it takes `write` to drop
//!     the queue; senders read it under `write`. So once `mark_closed` has released
//!     `write`, nothing is ever queued on the connection again.
//!   - `tag: AtomicU64`: the application's value, independent of everything else.
//!   - `codec: AtomicU64`: the send codec, read once per frame by senders, set by the
//!     application or (mirroring) by the loop; independent of everything else.
//!   - `tls: Option<Mutex<TlsSession>>` (with [`TcpConfig::tls`]): the TLS session every
//!     byte to and from the socket goes through. Senders take it under `write` (plaintext
//!     in, records out, so records and frames stay in order); the loop's reads take it
//!     alone (records in, plaintext out, and the alerts or key updates reading makes go
//!     out under it); closing takes it alone to send `close_notify`.
//! - Per loop: the command channel (crossbeam, synchronised inside) and its `Waker`. The
//!   loop's own state (connections, read buffers, listeners) belongs to its thread and
//!   takes no lock.
//! - Per transport: `BufPool::free` (a `Mutex`, in [`buf`](crate::buf)); the counters
//!   `next_conn`, `next_loop` and [`Stats`] (relaxed atomics, never used to order
//!   anything).
//!
//! Lock order (a thread takes them in this order, never the other way round):
//!
//! 1. Locks of the application: the [`Handler`]'s own, a parameter store's shard (held
//!    across [`Conn::send_borrowed`]), the engine's replication locks. The transport
//!    calls the handler only while it holds none of its locks.
//! 2. `write` of one connection. A thread never holds the `write` of two connections,
//!    and never closes a connection while holding its `write` (`mark_closed` takes it):
//!    every path that closes after a failed write releases it first. Sending a command
//!    to a loop (waking it) happens after `write` is released too.
//! 3. `tls` of a connection: under its `write` (sending, flushing) or alone (reading,
//!    closing). Nothing is taken while it is held.
//! 4. `BufPool::free`, a leaf: taken under `write` when a queued frame whose payload is
//!    a pooled buffer is dropped (a flushed frame, or the queue of a closed connection),
//!    and on its own anywhere else. Nothing is taken while it is held. (So the `Drop` of
//!    an [`AsBytes`](crate::buf::AsBytes) payload must take no lock but the pool's.)
//!
//! Debug builds check 2 to 4 (module `lock_order`): taking a `write` while holding one
//! or while holding a `tls`, or any transport lock while holding the pool's, panics
//! before the lock is tried.
//!
//! # TLS
//!
//! With [`TcpConfig::tls`], `ConnInner::write_out` gives plaintext to the session and
//! writes its records to the socket; the session holds at most
//! [`TLS_SEND_BUFFER_BYTES`](crate::tls::TLS_SEND_BUFFER_BYTES) of records the socket did
//! not take, and beyond that takes nothing (`WouldBlock`, as a full socket). Bytes it
//! took count as written for the send queue, so `flush_locked` writes the records still
//! held on every writable edge, also when the queue is empty. `read_in` reads records,
//! decrypts them and returns plaintext; `Ok(0)` only after the peer's `close_notify` (a
//! TCP end without it is an error: the stream may have been cut). A TLS connection makes
//! and takes no shared-memory or RDMA offer.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::{Condvar, Mutex, MutexGuard};

use self::lock_order::{Rank, Ranked};

use crate::auth::{self, AuthConfig, AuthError, AUTH_MAGIC};
use crate::buf::{BufPool, OutFrame, OwnedFrame, Payload, RecvFrame};
use crate::compress::{self, Codec};
use crate::rdmapipe::{
    RdmaDevice, RdmaHello, RdmaMessages, RdmaOffer, RdmaPipe, RdmaPipeConfig, RdmaRefusal,
    RDMA_HELLO_LEN, RDMA_HELLO_MAGIC,
};
use crate::shmpipe::{Hello, HelloKind, Refusal, ShmMessages, ShmPipe, HELLO_LEN, HELLO_MAGIC};
use crate::tls::{self, TlsConfig, TlsError, TlsSession};
use crate::wire::{
    DType, Frame, Header, Layout, WireError, DEFAULT_MAX_FRAME, FLAG_COMPRESSED, FLAG_KEYS_CACHED,
    FLAG_RANGE, HEADER_LEN,
};

const WAKER: Token = Token(usize::MAX);
const STAGING_BYTES: usize = 64 << 10;
/// Bytes a loop reads from one connection before it turns to the others.
const READ_BUDGET_BYTES: usize = 8 << 20;
/// Frames at least this large, sent from an application thread, are written by the
/// connection's loop.
const HANDOFF_MIN_BYTES: usize = 1 << 20;
/// Frames gathered into one vectored write.
const MAX_FRAMES_PER_WRITE: usize = 64;

/// The smallest value section [`Conn::send`] tries to compress, in bytes.
///
/// Below it a try cannot pay. On 256 bytes of f32 values (90% zero), one try costs about
/// 0.08 us in zero runs, 0.19 us in LZ4 and 1 to 2.5 us in zstd, mostly its context reset
/// (`ratios_report` in [`compress`], on a shared 2-core x86 VM). What it can save is at
/// most the values less the block's 9-byte header, about 250 bytes: 0.2 us on a 10 Gb/s
/// link, while the frame's 56-byte header and its system call (several us) stay. So at
/// 256 bytes the fast codecs about break even on a fast link, zstd pays only on slow
/// ones, and a smaller frame cannot even save what a failed try (pure loss) costs. Above
/// it the possible saving grows with the size, as does the cost, but zstd's fixed part
/// does not.
pub const COMPRESS_MIN_BYTES: usize = 256;

thread_local! {
    static ON_LOOP: Cell<bool> = const { Cell::new(false) };
    /// This thread's codec state (a zstd context or two), for sending and receiving.
    static CODEC_CTX: RefCell<compress::Context> = RefCell::new(compress::Context::new());
}

/// Run `f` with this thread's codec context (a fresh one if the thread's is not
/// available: during thread teardown, or were it ever re-entered).
fn with_codec_ctx<R>(f: impl FnOnce(&mut compress::Context) -> R) -> R {
    let mut f = Some(f);
    let done = CODEC_CTX.try_with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        Some((f.take().expect("called once"))(&mut c))
    });
    match done {
        Ok(Some(r)) => r,
        _ => (f.take().expect("not called yet"))(&mut compress::Context::new()),
    }
}

/// The value bytes a frame's values are once decoded: (number of keys) x `value_len` x
/// element size, where the number of keys is the range's length for [`FLAG_RANGE`], the
/// list's length (the third key word) for [`FLAG_KEYS_CACHED`], else the key count.
/// `None` when the key words needed are missing, a range runs backwards, the dtype is
/// unknown, or the product overflows. `keys` are the key section's bytes.
fn decoded_values_len(h: &Header, keys: &[u8]) -> Option<u64> {
    let word = |i: usize| {
        keys.get(i * 8..i * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let n = if h.has(FLAG_KEYS_CACHED) {
        word(2)?
    } else if h.has(FLAG_RANGE) {
        word(1)?.checked_sub(word(0)?)?
    } else {
        h.key_count
    };
    let elem = DType::from_u8(h.dtype)?.size() as u64;
    n.checked_mul(u64::from(h.value_len))?.checked_mul(elem)
}

/// Whether a frame carries values without keys to count them by (answers: the requester
/// knows its keys). Its compressed values decode to the length their block claims.
fn keyless(h: &Header) -> bool {
    h.key_count == 0 && !h.has(FLAG_RANGE) && !h.has(FLAG_KEYS_CACHED)
}

/// The transport's lock order (see the [module docs](self)), checked in debug builds.
///
/// Each thread keeps the rank of the innermost transport lock it holds; taking a lock
/// whose rank is not above it panics before the lock is tried, so an order violation (or
/// a lock taken twice) panics in the tests instead of deadlocking some day. Release
/// builds compile the check away.
pub(crate) mod lock_order {
    #[cfg(debug_assertions)]
    use std::cell::Cell;
    use std::ops::{Deref, DerefMut};

    /// The transport's locks, in the order a thread may take them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub(crate) enum Rank {
        /// A connection's write state: at most one per thread.
        Write,
        /// A connection's TLS session: under its `write` or alone; nothing under it but
        /// the pool's lock (never taken in practice).
        Tls,
        /// The free list of a [`BufPool`](crate::buf::BufPool): a leaf.
        Pool,
    }

    #[cfg(debug_assertions)]
    thread_local! {
        /// The rank of the innermost transport lock this thread holds.
        static HELD: Cell<Option<Rank>> = const { Cell::new(None) };
    }

    /// Restores the thread's previous rank when dropped.
    #[cfg(debug_assertions)]
    struct Order {
        prev: Option<Rank>,
    }

    #[cfg(debug_assertions)]
    impl Drop for Order {
        fn drop(&mut self) {
            HELD.with(|h| h.set(self.prev));
        }
    }

    /// A lock guard that holds its rank in the thread's lock order while it lives.
    pub(crate) struct Ranked<G> {
        guard: G,
        /// Dropped after `guard`: the rank is given up once the lock is.
        #[cfg(debug_assertions)]
        _order: Order,
    }

    impl<G> Ranked<G> {
        /// Take a lock of `rank` with `lock`, checking the order first.
        #[inline(always)]
        pub(crate) fn lock(rank: Rank, lock: impl FnOnce() -> G) -> Self {
            #[cfg(debug_assertions)]
            let order = {
                let prev = HELD.with(Cell::get);
                assert!(
                    prev < Some(rank),
                    "lock order: the {rank:?} lock taken while this thread holds the {prev:?} \
                     lock (see the lock order in tcp.rs)"
                );
                HELD.with(|h| h.set(Some(rank)));
                Order { prev }
            };
            #[cfg(not(debug_assertions))]
            let _ = rank;
            Ranked {
                guard: lock(),
                #[cfg(debug_assertions)]
                _order: order,
            }
        }

        /// The guard itself (to wait on a condition variable with it).
        pub(crate) fn guard_mut(&mut self) -> &mut G {
            &mut self.guard
        }
    }

    impl<G: Deref> Deref for Ranked<G> {
        type Target = G::Target;
        fn deref(&self) -> &G::Target {
            &self.guard
        }
    }

    impl<G: DerefMut> DerefMut for Ranked<G> {
        fn deref_mut(&mut self) -> &mut G::Target {
            &mut self.guard
        }
    }
}

/// Configuration of a [`TcpTransport`].
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Number of event loops (default: one per core).
    pub threads: usize,
    /// Pin loop `i` to core `core_offset + i` (default: true).
    pub pin_cores: bool,
    /// First core used for pinning. `None` (the default): start at core 0 and move to
    /// the node's own offset when [`TcpTransport::repin`] is called, so the processes of
    /// one host spread over its cores; `Some(k)`: stay at `k`.
    pub core_offset: Option<usize>,
    /// Largest frame accepted from a peer, header included.
    pub max_frame: usize,
    /// Bound on a connection's queued outgoing bytes (backpressure).
    pub send_queue_max_bytes: usize,
    /// After activity, a loop polls without blocking for this long before it sleeps
    /// (0: always block; default 100). Busy polling yields between polls, so threads that
    /// share the core still run; it saves the ~25 us wake-up of an idle vCPU per message.
    pub busy_poll_us: u64,
    /// Idle receive buffers kept per transport.
    pub pool_buffers_max: usize,
    /// Mirror a peer's compression (default: true). When a connection whose own codec is
    /// [`Codec::None`] receives a compressed frame, it takes that frame's codec as its
    /// send codec ([`Conn::set_codec`]; a zstd block does not name its level, so zstd is
    /// mirrored at [`compress::ZSTD_DEFAULT_LEVEL`]). A peer that compresses shows that it
    /// decodes, so a server answers compressed exactly to the workers that compress.
    /// With `false`, connections compress only when told to; a connection that should
    /// never compress needs `false` (setting its codec to none is undone by the next
    /// compressed frame it receives).
    pub mirror_codec: bool,
    /// Move the frames of connections between processes of this host through shared
    /// memory (see [`shmpipe`](crate::shmpipe)); default [`ShmMessages::SameHost`].
    pub shm_messages: ShmMessages,
    /// Bytes of each of a shared-memory connection's two rings (a power of two between
    /// 64 KiB and 1 GiB; rounded up). Both are populated when the connection is made.
    pub shm_ring_bytes: usize,
    /// How long a connection that offered shared memory waits for the answer before it
    /// closes (the frames sent meanwhile are held, not lost, until then).
    pub shm_offer_timeout: Duration,
    /// Move the frames of connections to RDMA queue pairs (see
    /// [`rdmapipe`](crate::rdmapipe)); default [`RdmaMessages::Off`]. Needs the `rdma`
    /// cargo feature and a device on both sides; where either lacks one, the offer is
    /// refused (or not made) and the connection stays on TCP. A connection that offers
    /// shared memory offers nothing else.
    pub rdma_messages: RdmaMessages,
    /// Bytes of each of an RDMA connection's two rings (a power of two between 64 KiB
    /// and 1 GiB; rounded up), registered with the device when the connection is made.
    pub rdma_ring_bytes: usize,
    /// Frames over RDMA whose body (keys, values, padding) is at least this many bytes
    /// are not copied through the ring: the peer RDMA READs the body from a registered
    /// staging buffer of this side (a rendezvous, see [`rdmapipe`](crate::rdmapipe));
    /// default [`RDMA_RENDEZVOUS_DEFAULT`](crate::rdmapipe::RDMA_RENDEZVOUS_DEFAULT)
    /// (64 KiB); 0: every frame goes through the ring. Only this side's sending is
    /// concerned: every side reads both.
    pub rdma_rendezvous_bytes: usize,
    /// The RDMA device messages use (`mlx5_0`, `soft0`); `None`: the first one.
    pub rdma_device: Option<String>,
    /// Authenticate every connection with a cluster secret before any other byte (see
    /// [`auth`](crate::auth)); `None` (the default): connections are not authenticated.
    /// Both ends must agree: a side with a secret and a side without refuse each other.
    pub auth: Option<AuthConfig>,
    /// Encrypt every connection with TLS 1.3, certificates checked both ways against the
    /// cluster CA (see [`tls`](crate::tls)); `None` (the default): frames travel in clear.
    /// Runs after [`auth`](Self::auth), before the connection reaches its loop. A TLS
    /// connection makes and takes no shared-memory or RDMA offer: its frames go over
    /// TLS. Both ends must agree: a side with TLS and a side without refuse each other.
    pub tls: Option<TlsConfig>,
}

impl TcpConfig {
    /// How this side's RDMA pipes are set up.
    fn rdma_pipe(&self) -> RdmaPipeConfig {
        RdmaPipeConfig {
            ring: self.rdma_ring_bytes,
            rendezvous: self.rdma_rendezvous_bytes,
            max_frame: self.max_frame,
        }
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            threads: pserv_sys::cpu::core_count(),
            pin_cores: true,
            core_offset: None,
            max_frame: DEFAULT_MAX_FRAME,
            send_queue_max_bytes: 256 << 20,
            busy_poll_us: 100,
            pool_buffers_max: 64,
            mirror_codec: true,
            shm_messages: ShmMessages::SameHost,
            shm_ring_bytes: 4 << 20,
            shm_offer_timeout: Duration::from_secs(10),
            rdma_messages: RdmaMessages::Off,
            rdma_ring_bytes: 4 << 20,
            rdma_rendezvous_bytes: crate::rdmapipe::RDMA_RENDEZVOUS_DEFAULT,
            rdma_device: None,
            auth: None,
            tls: None,
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed cleanly between frames.
    #[error("peer closed the connection")]
    PeerClosed,
    /// The peer closed after sending part of a frame.
    #[error("peer vanished mid-frame ({got} of {need} bytes received)")]
    VanishedMidFrame {
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame needed.
        need: usize,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(#[from] WireError),
    /// The peer sent a compressed frame ([`FLAG_COMPRESSED`]) whose value block does not
    /// decode to the values its header calls for (a corrupt or truncated block, a length
    /// other than the header's, a decoded frame that would be invalid or too large).
    #[error("malformed compressed frame: {0}")]
    BadBlock(String),
    /// A socket error, or a shared-memory ring whose positions do not fit it.
    #[error("socket error: {0}")]
    Io(#[source] io::Error),
    /// The shared-memory or RDMA handshake went wrong: no answer to an offer in time, a
    /// hello where none may come, a queue pair that cannot connect after its offer was
    /// accepted.
    #[error("handshake: {0}")]
    Handshake(String),
    /// This side closed it ([`Conn::close`] or transport shutdown).
    #[error("closed locally")]
    Local,
    /// A frame's sender is not the node id the peer authenticated as.
    #[error("a frame claims sender {claimed}, but the peer authenticated as node {authenticated}")]
    WrongSender {
        /// The frame's sender.
        claimed: u32,
        /// The id the peer proved at the handshake.
        authenticated: u32,
    },
    /// A peer started a TLS handshake (or sent a TLS alert) on a connection of a node
    /// that runs without TLS.
    #[error("the peer speaks TLS (it runs with --tls-cert), but this node runs without TLS")]
    UnexpectedTls,
    /// A peer tried to authenticate with a node that runs without a cluster secret.
    #[error(
        "the peer tried to authenticate (it holds a cluster secret), but this node runs without one (--insecure)"
    )]
    UnexpectedAuth,
}

/// Errors of transport operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Connecting to a peer failed.
    #[error("connecting to {addr} failed")]
    Connect {
        /// The peer's address.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding a listening socket failed.
    #[error("listening on {addr} failed")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending on a closed connection.
    #[error("connection {conn} to {peer} is closed")]
    Closed {
        /// Connection id.
        conn: u64,
        /// Peer address.
        peer: SocketAddr,
    },
    /// Starting an event loop failed.
    #[error("starting an event loop failed")]
    Start(#[source] io::Error),
    /// The connection was made but not authenticated.
    #[error("connecting to {addr}: {why}")]
    Auth {
        /// The peer's address.
        addr: String,
        /// Why (in the message itself, not repeated as a cause).
        why: AuthError,
    },
    /// The connection was made but its TLS handshake failed.
    #[error("connecting to {addr}: {why}")]
    Tls {
        /// The peer's address.
        addr: String,
        /// Why (in the message itself, not repeated as a cause).
        why: TlsError,
    },
}

/// Traffic counters of a transport.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes written to sockets.
    pub bytes_sent: AtomicU64,
    /// Bytes read from sockets.
    pub bytes_received: AtomicU64,
    /// Frames delivered to handlers.
    pub frames_received: AtomicU64,
    /// Value bytes of the outgoing frames compression was tried on (a connection with a
    /// codec sending a data frame of at least [`COMPRESS_MIN_BYTES`] of values), before
    /// compression. Frames it was not tried on count neither here nor in
    /// `values_wire_out`.
    pub values_raw_out: AtomicU64,
    /// Value bytes of the same frames as sent: the block's length where compression paid,
    /// the raw length where it did not. `values_raw_out / values_wire_out` is the ratio.
    pub values_wire_out: AtomicU64,
    /// Outgoing frames sent compressed (with [`FLAG_COMPRESSED`]).
    pub frames_compressed_out: AtomicU64,
    /// Value bytes of the compressed frames received, as they came (the blocks).
    pub values_wire_in: AtomicU64,
    /// Value bytes of the compressed frames received, once decoded.
    pub values_raw_in: AtomicU64,
    /// Compressed frames received, decoded and delivered.
    pub frames_compressed_in: AtomicU64,
    /// Connections whose frames moved to shared memory (both sides count theirs).
    pub shm_connections: AtomicU64,
    /// Shared-memory offers refused (by this side or by the peer).
    pub shm_refused: AtomicU64,
    /// Connections whose frames moved to RDMA queue pairs (both sides count theirs).
    pub rdma_connections: AtomicU64,
    /// RDMA offers refused (by this side or by the peer).
    pub rdma_refused: AtomicU64,
    /// Connections whose TLS handshake completed (both sides count theirs).
    pub tls_connections: AtomicU64,
    /// TLS handshakes that failed on this side (refused, or timed out).
    pub tls_failed: AtomicU64,
}

/// What a loop's owner does with incoming frames. Each loop owns one handler, made by the
/// factory given to [`TcpTransport::start`]; it runs on the loop thread and must not block
/// for long (sending is fine: it never blocks on a loop thread).
pub trait Handler: Send + 'static {
    /// A frame arrived on `conn`.
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>);
    /// `conn` was adopted by this loop (accepted or connected).
    fn on_open(&mut self, _conn: &Conn) {}
    /// `conn` was closed; it will deliver nothing more.
    fn on_close(&mut self, _conn: &Conn, _reason: &CloseReason) {}
    /// The loop handled every event that was ready in one turn (it polls again next, or
    /// sleeps): work that can wait for the turn's other frames, and then should not wait
    /// at all, goes here (a server sends its replication batches here, so the pushes of
    /// one turn share a batch). Called on every turn, also idle busy-polling ones: keep it
    /// cheap when there is nothing to do.
    fn on_turn_end(&mut self) {}
}

/// Whether the calling thread is an event loop's (a handler's code runs there).
pub fn on_loop_thread() -> bool {
    ON_LOOP.with(Cell::get)
}

struct WriteState {
    queue: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    front_written: usize,
    /// Bytes queued (unwritten), all frames.
    queued: usize,
    /// Set by `mark_closed` once it dropped the queue: nothing is queued after it.
    shut: bool,
    /// While a shared-memory offer waits for its answer: frames are queued, not written,
    /// until the answer says where they go (or until this deadline closes the connection).
    hold: Option<Instant>,
}

impl WriteState {
    /// The invariants of a send queue, checked whenever its lock is taken or released:
    /// the counters agree with the queue, and a partial write stays inside its frame.
    fn check(&self) {
        match self.queue.front() {
            None => {
                debug_assert_eq!(self.queued, 0, "an empty send queue counts queued bytes");
                debug_assert_eq!(
                    self.front_written, 0,
                    "an empty send queue has a partly written front frame"
                );
            }
            Some(front) => {
                let len = front.wire_len();
                debug_assert!(
                    self.front_written < len,
                    "a partial write advanced past its frame ({} of {len} bytes)",
                    self.front_written
                );
                debug_assert!(
                    self.queued >= len - self.front_written,
                    "{} bytes queued, fewer than the {} left of the front frame",
                    self.queued,
                    len - self.front_written
                );
            }
        }
        // The exact count, on queues short enough to add up on every lock.
        if cfg!(debug_assertions) && self.queue.len() <= MAX_FRAMES_PER_WRITE {
            let total: usize = self.queue.iter().map(OutFrame::wire_len).sum();
            debug_assert_eq!(
                self.queued + self.front_written,
                total,
                "queued bytes do not add up to the frames in the send queue"
            );
        }
        if self.shut {
            debug_assert!(
                self.queue.is_empty(),
                "a closed connection has frames queued"
            );
        }
    }
}

/// A connection's write state, locked at its rank in the lock order; its invariants
/// are checked when it is taken and when it is released.
struct WriteGuard<'a>(Ranked<MutexGuard<'a, WriteState>>);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if cfg!(debug_assertions) && !std::thread::panicking() {
            self.0.check();
        }
    }
}

impl std::ops::Deref for WriteGuard<'_> {
    type Target = WriteState;
    fn deref(&self) -> &WriteState {
        &self.0
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut WriteState {
        &mut self.0
    }
}

/// Where a connection's frames go once they left the socket.
#[derive(Debug)]
enum MsgPipe {
    Shm(ShmPipe),
    Rdma(Box<RdmaPipe>),
}

/// An offer waiting for its answer.
#[derive(Debug)]
enum Offered {
    Shm(ShmPipe),
    Rdma(RdmaOffer),
}

impl MsgPipe {
    fn write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<(usize, bool)> {
        match self {
            MsgPipe::Shm(p) => p.write_vectored(slices),
            MsgPipe::Rdma(p) => p.write_vectored(slices),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        match self {
            MsgPipe::Shm(p) => p.read(buf),
            MsgPipe::Rdma(p) => p.read(buf),
        }
    }

    fn readable(&self) -> bool {
        match self {
            MsgPipe::Shm(p) => p.readable(),
            MsgPipe::Rdma(p) => p.readable(),
        }
    }

    fn writable(&self) -> bool {
        match self {
            MsgPipe::Shm(p) => p.writable(),
            MsgPipe::Rdma(p) => p.writable(),
        }
    }

    fn arm(&self, for_room: bool) -> bool {
        match self {
            MsgPipe::Shm(p) => p.arm(for_room),
            MsgPipe::Rdma(p) => p.arm(for_room),
        }
    }
}

struct ConnInner {
    id: u64,
    peer: SocketAddr,
    stream: TcpStream,
    loop_index: usize,
    write: Mutex<WriteState>,
    space: Condvar,
    closed: AtomicBool,
    tag: AtomicU64,
    /// The send codec, as [`Codec::to_bits`].
    codec: AtomicU64,
    /// Set once, under `write`, when the connection's frames move to shared memory or
    /// to RDMA.
    pipe: OnceLock<MsgPipe>,
    /// The connecting side's region (and queue pair) while its offer waits for an answer.
    offered: Mutex<Option<Offered>>,
    /// Whether this side accepted the connection (only an acceptor takes offers).
    accepted: bool,
    /// Whether any byte was written to the socket (an offer must come before).
    wrote: AtomicBool,
    /// Set by the loop when the socket of a shared-memory connection reported bytes
    /// (doorbells) or its end: the next empty ring drains it. Without it an empty ring
    /// costs no system call.
    bells: AtomicBool,
    /// The node id an accepted peer authenticated as (`None`: not authenticated, or
    /// this side connected). Frames from a peer with a non-zero id must carry it.
    peer_identity: Option<u32>,
    /// The TLS session, on a connection of a transport with [`TcpConfig::tls`]: every
    /// byte to and from the socket goes through it. Locked at rank `Tls`.
    tls: Option<Mutex<TlsSession>>,
    shared: Arc<Shared>,
}

impl ConnInner {
    /// Write to the peer: into the shared-memory ring once the connection moved there,
    /// else to the socket. Like a non-blocking socket write (`WouldBlock` when full).
    fn write_out(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            let n = self.lock_tls(tls).write_plain(&self.stream, slices)?;
            self.wrote.store(true, Ordering::Relaxed);
            return Ok(n);
        }
        match self.pipe.get() {
            Some(pipe) => {
                let (n, wake) = pipe.write_vectored(slices)?;
                if wake {
                    self.doorbell();
                }
                Ok(n)
            }
            None => {
                let n = (&self.stream).write_vectored(slices)?;
                self.wrote.store(true, Ordering::Relaxed);
                Ok(n)
            }
        }
    }

    /// Wake the peer's loop: one byte on the socket, which carries nothing else once the
    /// frames moved to shared memory. A full socket buffer means doorbells are pending
    /// already; a broken socket shows on the read side.
    fn doorbell(&self) {
        let _ = (&self.stream).write(&[0u8]);
    }

    /// Read from the peer (the ring once moved, else the socket), like a non-blocking
    /// socket read: `Ok(0)` once the peer is gone and everything it sent was read.
    fn read_in(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tls) = &self.tls {
            return self.lock_tls(tls).read_plain(&self.stream, buf);
        }
        let Some(pipe) = self.pipe.get() else {
            return (&self.stream).read(buf);
        };
        loop {
            match pipe.read(buf) {
                Ok((n, wake)) => {
                    if wake {
                        self.doorbell();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // The ring is empty: take the doorbells off the socket (edge-triggered polls
            // report new bytes only once they were drained), and see whether it closed;
            // unless the socket reported nothing since it was last drained.
            if !self.bells.swap(false, Ordering::AcqRel) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut bells = [0u8; 256];
            match (&self.stream).read(&mut bells) {
                Ok(0) if !pipe.readable() => {
                    // The end stays reported: every later read sees it again.
                    self.bells.store(true, Ordering::Release);
                    return Ok(0);
                }
                Ok(_) => self.bells.store(true, Ordering::Release),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !pipe.readable() {
                        return Err(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.bells.store(true, Ordering::Release)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An RDMA write that failed because the peer process went away (its socket is
    /// closed too: a queue pair to a dead peer fails only after its retries) is the
    /// peer closing, not an error; any other reason stays. Call before this side shuts
    /// its socket.
    fn peer_gone(&self, reason: CloseReason) -> CloseReason {
        let CloseReason::Io(e) = reason else {
            return reason;
        };
        // Only a peer that failed or stopped answering (not this side's own queue pair
        // in error: a flush) may be a peer that is gone.
        if !matches!(self.pipe.get(), Some(MsgPipe::Rdma(_)))
            || e.kind() != io::ErrorKind::ConnectionReset
        {
            return CloseReason::Io(e);
        }
        // Only doorbells travel on the socket now: drain them to see its end.
        let mut bells = [0u8; 256];
        for _ in 0..64 {
            match (&self.stream).read(&mut bells) {
                Ok(0) => {
                    tracing::debug!(conn = self.id, peer = %self.peer, error = %e, "an RDMA write failed after the peer closed its socket");
                    return CloseReason::PeerClosed;
                }
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return CloseReason::PeerClosed,
            }
        }
        CloseReason::Io(e)
    }

    /// Lock the TLS session (rank [`Rank::Tls`]).
    fn lock_tls<'a>(&self, tls: &'a Mutex<TlsSession>) -> Ranked<MutexGuard<'a, TlsSession>> {
        Ranked::lock(Rank::Tls, || tls.lock())
    }

    /// Write the TLS records the session holds for the socket, as far as it takes them:
    /// `Ok(true)` when none is left (or the connection has no TLS).
    fn flush_tls(&self) -> io::Result<bool> {
        let Some(tls) = &self.tls else {
            return Ok(true);
        };
        let mut s = self.lock_tls(tls);
        if !s.pending() {
            return Ok(true);
        }
        match s.flush(&self.stream) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// End the socket (both ways): with TLS, after a `close_notify` (best effort), so
    /// the peer reads a clean end.
    fn shutdown_stream(&self) {
        if let Some(tls) = &self.tls {
            self.lock_tls(tls).close(&self.stream);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Lock the write state (rank [`Rank::Write`]).
    fn lock_write(&self) -> WriteGuard<'_> {
        let w = WriteGuard(Ranked::lock(Rank::Write, || self.write.lock()));
        w.check();
        w
    }
}

/// A connection: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Conn(Arc<ConnInner>);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn#{}({})", self.0.id, self.0.peer)
    }
}

impl Conn {
    /// Unique id of this connection within its transport.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.0.peer
    }

    /// A value the application attaches (for example the peer's node id); 0 at first.
    pub fn tag(&self) -> u64 {
        self.0.tag.load(Ordering::Acquire)
    }

    /// Attach a value to the connection.
    pub fn set_tag(&self, tag: u64) {
        self.0.tag.store(tag, Ordering::Release)
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// Whether the connection's frames travel through shared memory.
    pub fn is_shm(&self) -> bool {
        matches!(self.0.pipe.get(), Some(MsgPipe::Shm(_)))
    }

    /// Whether the connection's bytes travel inside a TLS session.
    pub fn is_tls(&self) -> bool {
        self.0.tls.is_some()
    }

    /// Whether the connection's frames travel over an RDMA queue pair.
    pub fn is_rdma(&self) -> bool {
        matches!(self.0.pipe.get(), Some(MsgPipe::Rdma(_)))
    }

    /// Frames this connection sent and received by RDMA rendezvous (their bodies read
    /// by the receiver's NIC from the sender's staging buffer, not through the ring;
    /// see [`TcpConfig::rdma_rendezvous_bytes`]); `(0, 0)` off RDMA.
    pub fn rdma_rendezvous_frames(&self) -> (u64, u64) {
        match self.0.pipe.get() {
            Some(MsgPipe::Rdma(p)) => p.rendezvous_frames(),
            _ => (0, 0),
        }
    }

    /// The path its frames take: `tls` (TCP inside TLS), `shm`, `rdma`, `tcp`, or
    /// `tcp (shm offered)` / `tcp (rdma offered)` while an offer waits for its answer.
    pub fn path(&self) -> &'static str {
        if self.is_tls() {
            return "tls";
        }
        match (self.0.pipe.get(), &*self.0.offered.lock()) {
            (Some(MsgPipe::Shm(_)), _) => "shm",
            (Some(MsgPipe::Rdma(_)), _) => "rdma",
            (None, Some(Offered::Shm(_))) => "tcp (shm offered)",
            (None, Some(Offered::Rdma(_))) => "tcp (rdma offered)",
            (None, None) => "tcp",
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.0.lock_write().queued
    }

    /// The codec [`send`](Self::send) compresses values with ([`Codec::None`], the
    /// default: it does not). See the [module docs](self) for which frames it compresses.
    pub fn codec(&self) -> Codec {
        Codec::from_bits(self.0.codec.load(Ordering::Acquire))
    }

    /// Compress the values of the data frames sent from now on with `codec` (none: stop
    /// compressing). Only for a peer known to decode compressed frames; with
    /// [`TcpConfig::mirror_codec`] the peer's side of the connection then answers in the
    /// same codec. Frames already queued are not changed.
    pub fn set_codec(&self, codec: Codec) {
        self.0.codec.store(codec.to_bits(), Ordering::Release)
    }

    /// Take `codec` as the send codec if the connection has none (mirroring a peer).
    fn mirror_codec(&self, codec: Codec) {
        if codec != Codec::None {
            let _ = self.0.codec.compare_exchange(
                Codec::None.to_bits(),
                codec.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Send a frame. Writes it at once when nothing is queued before it, else queues it
    /// for the loop. On an application thread this blocks while the connection has more
    /// than `send_queue_max_bytes` queued; on a loop thread it never blocks.
    ///
    /// With a codec set ([`set_codec`](Self::set_codec)), the values of a data frame of
    /// at least [`COMPRESS_MIN_BYTES`] are compressed first, on this thread, and sent
    /// compressed when that makes them smaller (see the [module docs](self)).
    pub fn send(&self, frame: OutFrame) -> Result<(), TransportError> {
        let frame = self.compress_values(frame);
        self.send_frame(frame)
    }

    /// The frame as it goes out: with its values compressed, when the connection has a
    /// codec, the frame is one to try it on, and the block is smaller than the values.
    fn compress_values(&self, frame: OutFrame) -> OutFrame {
        let codec = self.codec();
        if codec == Codec::None || self.is_closed() {
            return frame;
        }
        let h = frame.header();
        let values = frame.values().bytes();
        let raw_len = values.len();
        // Data frames only, with exactly the values the receiver will expect: anything
        // else goes out as it is, and the receiver judges it as it would have.
        if !matches!(h.value_type(), Some(DType::F32 | DType::F64))
            || h.status != 0
            || h.has(FLAG_COMPRESSED)
            || raw_len < COMPRESS_MIN_BYTES
            || !(keyless(h) || decoded_values_len(h, frame.keys().bytes()) == Some(raw_len as u64))
        {
            return frame;
        }
        let shared = &self.0.shared;
        let stats = &shared.stats;
        stats
            .values_raw_out
            .fetch_add(raw_len as u64, Ordering::Relaxed);
        let mut block = shared.pool.take(compress::encode_room(raw_len));
        let encoded =
            with_codec_ctx(|ctx| compress::compress_into(ctx, codec, values, block.bytes_mut()))
                // The block's header counts: a block no smaller than the values goes raw.
                .filter(|e| e.bytes_out < raw_len);
        let Some(encoded) = encoded else {
            stats
                .values_wire_out
                .fetch_add(raw_len as u64, Ordering::Relaxed);
            return frame;
        };
        debug_assert!(
            encoded.bytes_out < raw_len,
            "a compressed block of {} bytes for {raw_len} bytes of values",
            encoded.bytes_out
        );
        stats
            .values_wire_out
            .fetch_add(encoded.bytes_out as u64, Ordering::Relaxed);
        stats.frames_compressed_out.fetch_add(1, Ordering::Relaxed);
        // The send queue's bound counts wire bytes, so a queued block must not pin much
        // more memory than its length: a small one moves to a buffer of its size (the
        // room it was written in goes back to the pool for the next frame).
        let block = if encoded.bytes_out <= block.len() / 2 {
            Payload::owned(block.bytes()[..encoded.bytes_out].to_vec())
        } else {
            block.truncate(encoded.bytes_out);
            Payload::owned(block)
        };
        let (mut header, keys, _raw) = frame.into_parts();
        header.flags |= FLAG_COMPRESSED;
        OutFrame::new(header, keys, block)
    }

    /// [`send`](Self::send) of a frame as it is (no compression).
    fn send_frame(&self, frame: OutFrame) -> Result<(), TransportError> {
        let inner = &*self.0;
        let max = inner.shared.cfg.send_queue_max_bytes;
        let mut w = inner.lock_write();
        if !ON_LOOP.with(Cell::get) {
            while w.queued > max && !self.is_closed() {
                inner.space.wait(w.0.guard_mut());
            }
        }
        if self.is_closed() {
            return Err(self.closed_error());
        }
        // Open under `write`: `mark_closed` has not dropped the queue yet.
        debug_assert!(!w.shut, "sending on a connection whose queue was dropped");
        let len = frame.wire_len();
        let was_idle = w.queue.is_empty();
        w.queued += len;
        w.queue.push_back(frame);
        if len >= HANDOFF_MIN_BYTES && !ON_LOOP.with(Cell::get) {
            // A large frame from an application thread: the connection's pinned loop
            // writes it, so the bulk copy runs on a known core, not wherever the OS put
            // the caller (possibly the receiver's core). The wake-up is noise at this size.
            drop(w);
            if was_idle {
                inner
                    .shared
                    .command(inner.loop_index, Command::Flush(inner.id));
            }
            return Ok(());
        }
        match self.flush_locked(&mut w) {
            Ok(_) => Ok(()),
            Err(err) => {
                drop(w);
                tracing::debug!(conn = inner.id, peer = %inner.peer, error = %err, "write failed");
                self.close_for(CloseReason::Io(err));
                Err(self.closed_error())
            }
        }
    }

    /// Send a frame whose values are borrowed (for example straight from a parameter
    /// store, under its lock), without copying them into a buffer first.
    ///
    /// When nothing is queued before it, the frame is written straight from `values`,
    /// waiting for the socket to drain for at most `block_max` in all. What has not left
    /// by then (a slow reader) is copied and queued like any other frame, so the borrow
    /// ends when this returns. When frames are queued already, the values are copied and
    /// queued at once. This blocks the calling thread (possibly a loop) for up to
    /// `block_max`: use it for large frames, where the copy it saves costs more.
    ///
    /// The values go out uncompressed whatever the connection's codec (also when they are
    /// copied): compressing would keep the borrow, often a store's lock, for longer than
    /// sending them does on a fast link; these frames are not counted in the compression
    /// [`Stats`].
    pub fn send_borrowed(
        &self,
        header: Header,
        keys: crate::buf::Payload,
        values: &[&[u8]],
        block_max: Duration,
    ) -> Result<(), TransportError> {
        let copy = || {
            let mut buf = Vec::with_capacity(values.iter().map(|v| v.len()).sum());
            for v in values {
                buf.extend_from_slice(v);
            }
            crate::buf::Payload::owned(buf)
        };
        let inner = &*self.0;
        let mut w = inner.lock_write();
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if !w.queue.is_empty() || w.hold.is_some() {
            drop(w);
            return self.send_frame(OutFrame::new(header, keys, copy()));
        }
        debug_assert!(
            keys.len().is_multiple_of(8),
            "key payload must hold whole u64 keys"
        );
        debug_assert!(!w.shut, "sending on a connection whose queue was dropped");
        let values_len: usize = values.iter().map(|v| v.len()).sum();
        let mut h = header;
        h.key_count = (keys.len() / 8) as u64;
        h.value_bytes = values_len as u64;
        let wire_len = crate::wire::pad8(HEADER_LEN + keys.len() + values_len);
        let pad = wire_len - HEADER_LEN - keys.len() - values_len;
        let deadline = Instant::now() + block_max;
        let mut written = 0usize;
        while written < wire_len {
            let result = {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(values.len() + 3);
                let mut skip = written;
                let parts = [h.as_bytes(), keys.bytes()]
                    .into_iter()
                    .chain(values.iter().copied())
                    .chain(std::iter::once(&crate::wire::PADDING[..pad]));
                for part in parts {
                    if skip >= part.len() {
                        skip -= part.len();
                    } else {
                        slices.push(IoSlice::new(&part[skip..]));
                        skip = 0;
                    }
                }
                inner.write_out(&slices)
            };
            match result {
                Ok(0) => {
                    drop(w);
                    self.close();
                    return Err(self.closed_error());
                }
                Ok(n) => {
                    written += n;
                    debug_assert!(
                        written <= wire_len,
                        "a partial write advanced past its frame ({written} of {wire_len} bytes)"
                    );
                    inner
                        .shared
                        .stats
                        .bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    if inner.pipe.get().is_some() {
                        // The peer's loop empties the ring; nothing to poll on.
                        std::thread::yield_now();
                    } else if let Err(e) = pserv_sys::fd::wait_writable(
                        std::os::fd::AsFd::as_fd(&inner.stream),
                        deadline - now,
                    ) {
                        tracing::debug!(conn = inner.id, error = %e, "poll failed");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    drop(w);
                    tracing::debug!(conn = inner.id, peer = %inner.peer, error = %e, "write failed");
                    self.close_for(CloseReason::Io(e));
                    return Err(self.closed_error());
                }
            }
        }
        if written < wire_len {
            // A slow reader: queue the rest (as a copy) for the loop to flush. The copy
            // goes on where the borrowed bytes stopped, so it must be the same frame.
            let rest = OutFrame::new(header, keys, copy());
            debug_assert_eq!(
                rest.wire_len(),
                wire_len,
                "the copy of a borrowed frame has another length"
            );
            debug_assert_eq!(
                *rest.header(),
                h,
                "the copy of a borrowed frame has another header"
            );
            // `front_written` counts the front frame's bytes: the rest must be the front.
            // (`write` was held since the queue was found empty.)
            debug_assert!(
                w.queue.is_empty(),
                "a frame was queued during a borrowed send"
            );
            w.queue.push_back(rest);
            w.front_written = written;
            w.queued += wire_len - written;
        }
        Ok(())
    }

    fn closed_error(&self) -> TransportError {
        TransportError::Closed {
            conn: self.0.id,
            peer: self.0.peer,
        }
    }

    /// Close the connection: the peer sees the socket close, queued frames are dropped,
    /// and the owning loop calls `on_close` with [`CloseReason::Local`].
    pub fn close(&self) {
        if self.mark_closed() {
            self.0.shutdown_stream();
            self.0
                .shared
                .command(self.0.loop_index, Command::Close(self.0.id));
        }
    }

    /// Close after a failed write on an application thread: like [`close`](Self::close),
    /// but `on_close` gets `reason` (the write's error).
    fn close_for(&self, reason: CloseReason) {
        let reason = self.0.peer_gone(reason);
        if self.mark_closed() {
            self.0.shutdown_stream();
            self.0
                .shared
                .command(self.0.loop_index, Command::CloseFor(self.0.id, reason));
        }
    }

    /// Returns true the first time.
    fn mark_closed(&self) -> bool {
        let first = !self.0.closed.swap(true, Ordering::AcqRel);
        if first {
            let mut w = self.0.lock_write();
            w.queue.clear();
            w.queued = 0;
            w.front_written = 0;
            w.shut = true;
            self.0.space.notify_all();
        }
        first
    }

    /// Write as much of the queue as the socket takes. Returns whether it drained.
    fn flush_locked(&self, w: &mut WriteState) -> io::Result<bool> {
        let inner = &*self.0;
        if w.hold.is_some() {
            // A shared-memory offer waits for its answer; the frames wait with it.
            return Ok(false);
        }
        while !w.queue.is_empty() {
            let result = {
                let mut slices = [IoSlice::new(&[]); 4 * MAX_FRAMES_PER_WRITE];
                let mut count = 0;
                let mut skip = w.front_written;
                for frame in w.queue.iter().take(MAX_FRAMES_PER_WRITE) {
                    for part in frame.parts() {
                        if skip >= part.len() {
                            skip -= part.len();
                        } else {
                            slices[count] = IoSlice::new(&part[skip..]);
                            count += 1;
                            skip = 0;
                        }
                    }
                }
                inner.write_out(&slices[..count])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    inner
                        .shared
                        .stats
                        .bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                    debug_assert!(
                        n <= w.queued,
                        "the socket took {n} bytes of {} queued",
                        w.queued
                    );
                    w.queued -= n;
                    let mut left = n + w.front_written;
                    while let Some(front) = w.queue.front() {
                        let len = front.wire_len();
                        if left >= len {
                            left -= len;
                            w.queue.pop_front();
                        } else {
                            break;
                        }
                    }
                    if w.queue.is_empty() {
                        debug_assert_eq!(left, 0, "a write advanced past the last queued frame");
                    }
                    w.front_written = left;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        debug_assert_eq!(w.queued, 0, "a drained send queue counts queued bytes");
        debug_assert_eq!(
            w.front_written, 0,
            "a drained send queue has a partly written front frame"
        );
        w.front_written = 0;
        // The session may still hold records of frames it took (the socket was full),
        // or records a read made (alerts, key updates): they go on this writable edge
        // too, with the queue empty.
        inner.flush_tls()
    }

    /// Flush from the loop; wakes blocked senders once below half the bound.
    fn flush_from_loop(&self) -> io::Result<()> {
        let mut w = self.0.lock_write();
        self.flush_locked(&mut w)?;
        if w.queued <= self.0.shared.cfg.send_queue_max_bytes / 2 {
            self.0.space.notify_all();
        }
        Ok(())
    }

    fn over_bound(&self) -> bool {
        self.0.lock_write().queued > self.0.shared.cfg.send_queue_max_bytes
    }
}

enum Command {
    Adopt(Conn),
    Flush(u64),
    Pin(usize),
    Listen(TcpListener),
    Close(u64),
    /// Close with the reason an application thread's write failed for.
    CloseFor(u64, CloseReason),
    Shutdown,
}

struct LoopLink {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

struct Shared {
    cfg: TcpConfig,
    links: Vec<LoopLink>,
    next_conn: AtomicU64,
    next_loop: AtomicUsize,
    stats: Stats,
    pool: Arc<BufPool>,
    /// The RDMA device of the message path, opened at the first connection that needs
    /// it (or why it could not be).
    rdma: OnceLock<Result<RdmaDevice, String>>,
    /// The node id connections this side opens authenticate as (0: none yet).
    identity: AtomicU32,
    /// Accepted connections whose authentication runs now (bounded).
    authenticating: AtomicUsize,
}

impl Shared {
    fn command(&self, loop_index: usize, cmd: Command) {
        let link = &self.links[loop_index];
        // The channel is unbounded, but what goes through it is bounded by the number of
        // connections: one adopt and one close each, plus listen and shutdown.
        if link.tx.send(cmd).is_ok() {
            let _ = link.waker.wake();
        }
    }

    fn new_conn(
        self: &Arc<Self>,
        stream: TcpStream,
        accepted: bool,
        peer_identity: Option<u32>,
        tls: Option<TlsSession>,
    ) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let peer = stream.peer_addr()?;
        let loop_index = self.next_loop.fetch_add(1, Ordering::Relaxed) % self.links.len();
        Ok(Conn(Arc::new(ConnInner {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed) + 1,
            peer,
            stream,
            loop_index,
            write: Mutex::new(WriteState {
                queue: VecDeque::new(),
                front_written: 0,
                queued: 0,
                shut: false,
                hold: None,
            }),
            space: Condvar::new(),
            closed: AtomicBool::new(false),
            tag: AtomicU64::new(0),
            codec: AtomicU64::new(Codec::None.to_bits()),
            pipe: OnceLock::new(),
            offered: Mutex::new(None),
            accepted,
            wrote: AtomicBool::new(false),
            bells: AtomicBool::new(true),
            peer_identity,
            tls: tls.map(Mutex::new),
            shared: self.clone(),
        })))
    }
}

/// Accepted connections authenticating at once, at most; more are closed.
const MAX_AUTHENTICATING: usize = 256;

/// Authenticate an accepted connection on a thread of its own (bounded by the
/// configuration's timeout, so a silent peer costs a thread for that long and no loop
/// time), then run its TLS handshake (when configured, bounded the same way), then hand
/// it to its loop; a failure is logged, naming the peer, and the connection closed.
fn authenticate_accepted(shared: &Arc<Shared>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    if shared.authenticating.fetch_add(1, Ordering::AcqRel) >= MAX_AUTHENTICATING {
        shared.authenticating.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(peer = ?peer, "{MAX_AUTHENTICATING} connections authenticate already; closing another one");
        return;
    }
    let shared2 = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("pserv-auth".into())
        .spawn(move || {
            let shared = shared2;
            let id = match &shared.cfg.auth {
                Some(cfg) => match auth::accept_side(&stream, cfg, false) {
                    Ok(id) => Some(Some(id)),
                    Err(e) => {
                        tracing::warn!(error = %e, "refused a connection");
                        None
                    }
                },
                None => Some(None),
            };
            let session = match (id, &shared.cfg.tls) {
                (None, _) => None,
                (Some(_), None) => Some(None),
                (Some(_), Some(cfg)) => match tls::accept_side(&stream, cfg, false) {
                    Ok(session) => {
                        shared.stats.tls_connections.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(peer = ?peer, "accepted a TLS connection (TLS 1.3, the peer's certificate verified)");
                        Some(Some(session))
                    }
                    Err(e) => {
                        shared.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "refused a connection");
                        None
                    }
                },
            };
            if let (Some(id), Some(session)) = (id, session) {
                match shared.new_conn(stream, true, id, session) {
                    Ok(conn) => shared.command(conn.0.loop_index, Command::Adopt(conn)),
                    Err(e) => {
                        tracing::warn!(error = %e, "setting up an accepted connection failed")
                    }
                }
            }
            shared.authenticating.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        shared.authenticating.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(peer = ?peer, error = %e, "no thread to authenticate a connection; closed");
    }
}

fn connect_on(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Conn, TransportError> {
    let err = |source| TransportError::Connect {
        addr: addr.to_string(),
        source,
    };
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(err)?;
    if let Some(a) = &shared.cfg.auth {
        let identity = shared.identity.load(Ordering::Acquire);
        auth::connect_side(&stream, a, identity, false).map_err(|why| TransportError::Auth {
            addr: addr.to_string(),
            why,
        })?;
    }
    let session = match &shared.cfg.tls {
        None => None,
        Some(cfg) => match tls::connect_side(&stream, cfg, false) {
            Ok(session) => {
                shared.stats.tls_connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %addr, "connected over TLS (TLS 1.3, the peer's certificate verified)");
                Some(session)
            }
            Err(why) => {
                shared.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %why, "a connection failed its TLS handshake");
                return Err(TransportError::Tls {
                    addr: addr.to_string(),
                    why,
                });
            }
        },
    };
    let conn = shared.new_conn(stream, false, None, session).map_err(err)?;
    offer_fast_path(shared, &conn).map_err(err)?;
    shared.command(conn.0.loop_index, Command::Adopt(conn.clone()));
    Ok(conn)
}

/// Whether the socket's peer is a process of this host: a loopback address, or the
/// address this side's end has (a connection to one's own interface).
fn same_host(stream: &TcpStream) -> bool {
    match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

/// Write all of `bytes` to a fresh non-blocking socket now (a hello: 64 bytes always
/// fit an empty socket buffer; anything less is an error, not a wait).
fn write_now(stream: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    while done < bytes.len() {
        match (&*stream).write(&bytes[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                pserv_sys::fd::wait_writable(
                    std::os::fd::AsFd::as_fd(stream),
                    deadline - Instant::now(),
                )?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The connecting side of the handshakes: when configured, make a shared-memory region
/// (peer on this host) or an RDMA queue pair and region (see [`TcpConfig::rdma_messages`]),
/// hold the connection's frames and send the offer as the stream's first bytes. What
/// cannot be made leaves the connection on TCP. A TLS connection offers nothing: its
/// frames stay inside TLS.
fn offer_fast_path(shared: &Arc<Shared>, conn: &Conn) -> io::Result<()> {
    let inner = &*conn.0;
    if inner.tls.is_some() {
        return Ok(());
    }
    let local = same_host(&inner.stream);
    let (offered, bytes): (Offered, Vec<u8>) = if shared.cfg.shm_messages != ShmMessages::Off
        && local
    {
        match ShmPipe::create(shared.cfg.shm_ring_bytes) {
            Ok((pipe, offer)) => (Offered::Shm(pipe), offer.encode().to_vec()),
            Err(e) => {
                tracing::info!(peer = %inner.peer, error = %e, "no shared-memory region for a connection; it stays on TCP");
                return Ok(());
            }
        }
    } else if shared.cfg.rdma_messages == RdmaMessages::AllPeers
        || (shared.cfg.rdma_messages == RdmaMessages::OtherHosts && !local)
    {
        let made = shared
            .rdma_device()
            .map_err(io::Error::other)
            .and_then(|dev| RdmaOffer::create(dev, shared.cfg.rdma_pipe()));
        match made {
            Ok((offer, hello)) => (Offered::Rdma(offer), hello.encode().to_vec()),
            Err(e) => {
                tracing::info!(peer = %inner.peer, error = %e, "no RDMA queue pair for a connection; it stays on TCP");
                return Ok(());
            }
        }
    } else {
        return Ok(());
    };
    *inner.offered.lock() = Some(offered);
    inner.lock_write().hold = Some(Instant::now() + shared.cfg.shm_offer_timeout);
    write_now(&inner.stream, &bytes)?;
    inner.wrote.store(true, Ordering::Relaxed);
    Ok(())
}

impl Shared {
    /// The message path's RDMA device, opened on first use; why not, if it cannot be.
    fn rdma_device(&self) -> Result<&RdmaDevice, String> {
        self.rdma
            .get_or_init(|| {
                RdmaDevice::open(self.cfg.rdma_device.as_deref()).inspect_err(|e| {
                    tracing::info!(error = %e, "no RDMA device for messages; connections stay on TCP");
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Opens connections on a [`TcpTransport`]'s loops; cheap to clone, usable from any
/// thread. Connections it opens stop when the transport shuts down.
#[derive(Clone)]
pub struct Connector(Arc<Shared>);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

impl Connector {
    /// Connect to `addr` (blocking up to `timeout`) and hand the connection to a loop.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, TransportError> {
        connect_on(&self.0, addr, timeout)
    }
}

/// The TCP transport: event loops plus the handle application threads use.
/// Dropping it shuts the loops down (closing every connection) and joins them.
pub struct TcpTransport {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpTransport {
    /// Start the loops; `factory(i)` makes the handler of loop `i`.
    pub fn start<H: Handler>(
        cfg: TcpConfig,
        mut factory: impl FnMut(usize) -> H,
    ) -> Result<Self, TransportError> {
        let n = cfg.threads.max(1);
        let mut polls = Vec::with_capacity(n);
        let mut links = Vec::with_capacity(n);
        let mut rxs = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new().map_err(TransportError::Start)?;
            let waker =
                Arc::new(Waker::new(poll.registry(), WAKER).map_err(TransportError::Start)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            links.push(LoopLink { tx, waker });
            rxs.push(rx);
            polls.push(poll);
        }
        let shared = Arc::new(Shared {
            pool: BufPool::new(cfg.pool_buffers_max),
            cfg,
            links,
            next_conn: AtomicU64::new(0),
            next_loop: AtomicUsize::new(0),
            stats: Stats::default(),
            rdma: OnceLock::new(),
            identity: AtomicU32::new(0),
            authenticating: AtomicUsize::new(0),
        });
        let mut threads = Vec::with_capacity(n);
        for (i, (poll, rx)) in polls.into_iter().zip(rxs).enumerate() {
            let lp = EventLoop {
                index: i,
                poll,
                rx,
                handler: factory(i),
                conns: HashMap::new(),
                listeners: Vec::new(),
                again: Vec::new(),
                shm: Vec::new(),
                offers: Vec::new(),
                shared: shared.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("pserv-loop-{i}"))
                .spawn(move || lp.run())
                .map_err(TransportError::Start)?;
            threads.push(t);
        }
        Ok(TcpTransport { shared, threads })
    }

    /// Listen on `addr`; accepted connections are spread over the loops. Returns the bound
    /// address (useful with port 0).
    pub fn listen(
        &self,
        addr: impl ToSocketAddrs + std::fmt::Debug,
    ) -> Result<SocketAddr, TransportError> {
        let err = |source| TransportError::Listen {
            addr: format!("{addr:?}"),
            source,
        };
        let listener = TcpListener::bind(&addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let local = listener.local_addr().map_err(err)?;
        self.shared.command(0, Command::Listen(listener));
        Ok(local)
    }

    /// Connect to `addr` (blocking up to `timeout`) and hand the connection to a loop.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, TransportError> {
        connect_on(&self.shared, addr, timeout)
    }

    /// The node id the connections this transport opens from now on authenticate as
    /// (with [`TcpConfig::auth`]; 0, the start value, names none). Set it once the node
    /// knows its id, before it connects to peers that check it.
    pub fn set_identity(&self, id: u32) {
        self.shared.identity.store(id, Ordering::Release);
    }

    /// A handle that opens connections on these loops from any thread (for example from
    /// a handler that learns about a new peer).
    pub fn connector(&self) -> Connector {
        Connector(self.shared.clone())
    }

    /// Traffic counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The transport's pool of receive buffers.
    pub fn pool(&self) -> &Arc<BufPool> {
        &self.shared.pool
    }

    /// Pin loop `i` to core `(offset + i) % cores` (when pinning is on and no fixed
    /// `core_offset` was configured). Nodes
    /// call this once they know their node id, so the loops of the processes sharing a
    /// host start on different cores instead of all piling onto the first ones.
    pub fn repin(&self, offset: usize) {
        if self.shared.cfg.pin_cores && self.shared.cfg.core_offset.is_none() {
            for i in 0..self.shared.links.len() {
                self.shared.command(i, Command::Pin(offset + i));
            }
        }
    }

    /// Number of event loops.
    pub fn threads(&self) -> usize {
        self.shared.links.len()
    }

    /// Stop the loops, closing all connections, and wait for them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for i in 0..self.shared.links.len() {
            self.shared.command(i, Command::Shutdown);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read state of one connection, owned by its loop.
struct ReadState {
    staging: Vec<u64>,
    start: usize,
    end: usize,
    big: Option<BigFrame>,
    paused: bool,
    /// Nothing was read yet (a shared-memory offer is taken only as the first bytes).
    fresh: bool,
}

struct BigFrame {
    header: Header,
    layout: Layout,
    body: crate::buf::PoolBuf,
    filled: usize,
}

impl ReadState {
    /// The invariants of a connection's receive state, checked before every step.
    fn check(&self) {
        debug_assert!(
            self.start <= self.end,
            "staging start {} past its end {}",
            self.start,
            self.end
        );
        debug_assert!(
            self.end <= STAGING_BYTES,
            "staging end {} past the buffer",
            self.end
        );
        // Frames are padded to 8 bytes, so each starts 8-aligned (keys are viewed in place).
        debug_assert!(
            self.start.is_multiple_of(8),
            "a frame in the staging buffer starts unaligned at {}",
            self.start
        );
        if let Some(big) = &self.big {
            debug_assert_eq!(
                self.start, 0,
                "staging bytes left behind while a large frame is read"
            );
            debug_assert_eq!(
                self.end, 0,
                "staging bytes left behind while a large frame is read"
            );
            debug_assert!(
                big.filled <= big.layout.body_len,
                "a large frame read past its body ({} of {} bytes)",
                big.filled,
                big.layout.body_len
            );
            debug_assert_eq!(
                big.body.len(),
                big.layout.body_len,
                "a large frame's buffer does not have its body's length"
            );
        }
    }
}

struct LoopConn {
    conn: Conn,
    read: ReadState,
    /// Listed in the loop's `shm` (its frames moved to shared memory).
    on_shm: bool,
}

struct EventLoop<H> {
    index: usize,
    poll: Poll,
    rx: Receiver<Command>,
    handler: H,
    conns: HashMap<u64, LoopConn>,
    listeners: Vec<TcpListener>,
    /// Connections whose read budget ran out with data left.
    again: Vec<u64>,
    /// Connections whose frames moved to shared memory: looked at on every turn.
    shm: Vec<u64>,
    /// Connections whose shared-memory offer waits for an answer, with its deadline.
    offers: Vec<(u64, Instant)>,
    shared: Arc<Shared>,
}

/// Outcome of reading from one connection.
enum ReadOutcome {
    /// Drained to WouldBlock (or paused).
    Idle,
    /// Budget spent, data may remain.
    More,
    /// Close with this reason.
    Close(CloseReason),
}

const LISTENER_BASE: u64 = u64::MAX / 2;

impl<H: Handler> EventLoop<H> {
    fn pin(&self, core: usize) {
        if !pserv_sys::cpu::pin_current_thread(core) {
            tracing::info!(
                loop_index = self.index,
                core,
                "could not pin event loop to its core"
            );
        }
    }

    fn run(mut self) {
        ON_LOOP.with(|f| f.set(true));
        if self.shared.cfg.pin_cores {
            self.pin(self.shared.cfg.core_offset.unwrap_or(0) + self.index);
        }
        let mut events = Events::with_capacity(256);
        let spin = Duration::from_micros(self.shared.cfg.busy_poll_us);
        let mut last_active = Instant::now();
        loop {
            let mut timeout = if !self.again.is_empty() || last_active.elapsed() < spin {
                Some(Duration::ZERO)
            } else {
                None
            };
            if timeout.is_none() {
                timeout = self.before_sleep();
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(loop_index = self.index, error = %e, "event loop poll failed; stopping loop");
                return;
            }
            if !events.is_empty() {
                last_active = Instant::now();
            } else if timeout == Some(Duration::ZERO) {
                // Busy polling: let a thread that shares this core run between polls.
                std::thread::yield_now();
            }
            for ev in events.iter() {
                let token = ev.token();
                if token == WAKER {
                    continue;
                }
                let id = token.0 as u64;
                if id >= LISTENER_BASE {
                    self.accept((id - LISTENER_BASE) as usize);
                    continue;
                }
                if ev.is_writable() {
                    self.on_writable(id);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    if let Some(lc) = self.conns.get(&id) {
                        lc.conn.0.bells.store(true, Ordering::Release);
                    }
                    self.read_conn(id);
                }
            }
            for id in std::mem::take(&mut self.again) {
                self.read_conn(id);
            }
            if !self.shm.is_empty() && self.poll_rings() {
                last_active = Instant::now();
            }
            if !self.offers.is_empty() {
                self.expire_offers();
            }
            self.handler.on_turn_end();
            if self.drain_commands() {
                break;
            }
        }
        for id in self.conns.keys().copied().collect::<Vec<_>>() {
            self.close_conn(id, CloseReason::Local);
        }
    }

    /// Look at the rings of the shared-memory connections: read what arrived, write what
    /// waits for room. Returns whether anything moved.
    fn poll_rings(&mut self) -> bool {
        let mut moved = false;
        for i in 0..self.shm.len() {
            let Some(id) = self.shm.get(i).copied() else {
                break;
            };
            let Some(lc) = self.conns.get(&id) else {
                continue;
            };
            let Some(pipe) = lc.conn.0.pipe.get() else {
                continue;
            };
            let read = !lc.read.paused && pipe.readable();
            let write = pipe.writable() && lc.conn.queued_bytes() > 0;
            if write {
                self.on_writable(id);
                moved = true;
            }
            if read {
                self.read_conn(id);
                moved = true;
            }
        }
        moved
    }

    /// The poll timeout for a loop about to sleep: ask the peers of its shared-memory
    /// connections for a doorbell, and do not sleep if something is there already; wake
    /// for the first offer deadline.
    fn before_sleep(&mut self) -> Option<Duration> {
        for id in &self.shm {
            let Some(lc) = self.conns.get(id) else {
                continue;
            };
            let Some(pipe) = lc.conn.0.pipe.get() else {
                continue;
            };
            let queued = lc.conn.queued_bytes() > 0;
            pipe.arm(queued);
            if (!lc.read.paused && pipe.readable()) || (queued && pipe.writable()) {
                return Some(Duration::ZERO);
            }
        }
        let now = Instant::now();
        self.offers
            .iter()
            .map(|&(_, deadline)| deadline.saturating_duration_since(now))
            .min()
    }

    /// Close the connections whose offer had no answer in time.
    fn expire_offers(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        self.offers.retain(|&(id, deadline)| {
            let waiting = self
                .conns
                .get(&id)
                .is_some_and(|lc| lc.conn.0.offered.lock().is_some());
            if waiting && now >= deadline {
                expired.push(id);
            }
            waiting && now < deadline
        });
        let limit = self.shared.cfg.shm_offer_timeout;
        for id in expired {
            let what = match self.conns.get(&id).map(|lc| lc.conn.path()) {
                Some("tcp (rdma offered)") => "RDMA",
                _ => "shared-memory",
            };
            self.close_conn(
                id,
                CloseReason::Handshake(format!(
                    "the peer did not answer the {what} offer within {limit:?}"
                )),
            );
        }
    }

    /// Returns true on shutdown.
    fn drain_commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Adopt(conn) => self.adopt(conn),
                Command::Listen(l) => {
                    let token = Token((LISTENER_BASE + self.listeners.len() as u64) as usize);
                    let fd = l.as_raw_fd();
                    match self.poll.registry().register(
                        &mut SourceFd(&fd),
                        token,
                        Interest::READABLE,
                    ) {
                        Ok(()) => self.listeners.push(l),
                        Err(e) => tracing::error!(error = %e, "registering a listener failed"),
                    }
                    // A connection may already be waiting.
                    self.accept(self.listeners.len().saturating_sub(1));
                }
                Command::Close(id) => self.close_conn(id, CloseReason::Local),
                Command::CloseFor(id, reason) => self.close_conn(id, reason),
                Command::Pin(core) => self.pin(core),
                Command::Flush(id) => self.on_writable(id),
                Command::Shutdown => return true,
            }
        }
        false
    }

    fn accept(&mut self, which: usize) {
        if which >= self.listeners.len() {
            return;
        }
        loop {
            let accepted = self.listeners[which].accept();
            match accepted {
                Ok((stream, _))
                    if self.shared.cfg.auth.is_some() || self.shared.cfg.tls.is_some() =>
                {
                    authenticate_accepted(&self.shared, stream);
                }
                Ok((stream, _)) => match self.shared.new_conn(stream, true, None, None) {
                    Ok(conn) => {
                        if conn.0.loop_index == self.index {
                            self.adopt(conn);
                        } else {
                            self.shared.command(conn.0.loop_index, Command::Adopt(conn));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "setting up an accepted connection failed")
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: log and try again on the next event.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    fn adopt(&mut self, conn: Conn) {
        let id = conn.id();
        debug_assert_eq!(
            conn.0.loop_index, self.index,
            "connection {id} adopted by another loop than its own"
        );
        debug_assert!(
            id < LISTENER_BASE,
            "connection id {id} collides with the listener tokens"
        );
        let fd = conn.0.stream.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(id as usize),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(conn = id, error = %e, "registering a connection failed");
            conn.mark_closed();
            self.handler.on_close(&conn, &CloseReason::Io(e));
            return;
        }
        let before = self.conns.insert(
            id,
            LoopConn {
                conn: conn.clone(),
                read: ReadState {
                    staging: vec![0u64; STAGING_BYTES / 8],
                    start: 0,
                    end: 0,
                    big: None,
                    paused: false,
                    fresh: true,
                },
                on_shm: false,
            },
        );
        debug_assert!(before.is_none(), "connection {id} adopted twice");
        if let Some(deadline) = conn.0.lock_write().hold {
            self.offers.push((id, deadline));
        }
        self.handler.on_open(&conn);
        if conn.is_closed() {
            self.close_conn(id, CloseReason::Local);
        } else {
            // Data may have arrived before registration; edge-triggered polls would not
            // report it again.
            self.read_conn(id);
        }
    }

    fn on_writable(&mut self, id: u64) {
        let Some(lc) = self.conns.get(&id) else {
            return;
        };
        let conn = lc.conn.clone();
        if let Err(e) = conn.flush_from_loop() {
            self.close_conn(id, CloseReason::Io(e));
            return;
        }
        if lc.read.paused && !conn.over_bound() {
            if let Some(lc) = self.conns.get_mut(&id) {
                lc.read.paused = false;
            }
            self.read_conn(id);
        }
    }

    fn read_conn(&mut self, id: u64) {
        let Some(lc) = self.conns.get_mut(&id) else {
            return;
        };
        let outcome = read_frames(&lc.conn, &mut lc.read, &mut self.handler, &self.shared);
        if !lc.on_shm && lc.conn.0.pipe.get().is_some() {
            lc.on_shm = true;
            self.shm.push(id);
        }
        match outcome {
            ReadOutcome::Idle => {}
            ReadOutcome::More => self.again.push(id),
            ReadOutcome::Close(reason) => self.close_conn(id, reason),
        }
    }

    fn close_conn(&mut self, id: u64, reason: CloseReason) {
        let Some(lc) = self.conns.remove(&id) else {
            return;
        };
        let conn = lc.conn;
        if lc.on_shm {
            self.shm.retain(|&s| s != id);
        }
        let fd = conn.0.stream.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        let reason = conn.0.peer_gone(reason);
        conn.mark_closed();
        conn.0.shutdown_stream();
        match &reason {
            CloseReason::PeerClosed | CloseReason::Local => {
                tracing::debug!(conn = id, peer = %conn.peer_addr(), %reason, "connection closed")
            }
            _ => tracing::warn!(conn = id, peer = %conn.peer_addr(), %reason, "closing connection"),
        }
        self.handler.on_close(&conn, &reason);
    }
}

/// Decode a checked [`FLAG_COMPRESSED`] frame as the receiver does (see
/// [`decompress_checked`]), count it in [`Stats`] and mirror its codec (if so configured).
fn decompress_frame(
    conn: &Conn,
    frame: &Frame<'_>,
    shared: &Shared,
) -> Result<OwnedFrame, CloseReason> {
    let block_len = frame.values().len();
    let (owned, info) = decompress_checked(frame, shared.cfg.max_frame, &shared.pool)?;
    let stats = &shared.stats;
    stats
        .values_wire_in
        .fetch_add(block_len as u64, Ordering::Relaxed);
    stats
        .values_raw_in
        .fetch_add(info.len as u64, Ordering::Relaxed);
    stats.frames_compressed_in.fetch_add(1, Ordering::Relaxed);
    if shared.cfg.mirror_codec {
        conn.mirror_codec(info.codec);
    }
    Ok(owned)
}

/// Decode a checked [`FLAG_COMPRESSED`] frame into a frame of its own, as if it had come
/// uncompressed: the flag cleared, `value_bytes` the decoded length, the same keys, and
/// the block's values in a buffer of `pool`. The block must decode to exactly the values
/// the header calls for, and the decoded frame must pass the usual checks within
/// `max_frame`; nothing is allocated before the block's claimed length is found to be
/// that. Returns the frame and what the block's header said.
///
/// This is what every connection runs on a compressed frame it receives (the fuzz target
/// `frame` calls it on arbitrary bytes); an `Err` closes the connection.
pub fn decompress_checked(
    frame: &Frame<'_>,
    max_frame: usize,
    pool: &Arc<BufPool>,
) -> Result<(OwnedFrame, compress::BlockInfo), CloseReason> {
    let h = *frame.header();
    if !h.has(FLAG_COMPRESSED) {
        return Err(CloseReason::BadBlock(
            "a plain frame has no value block to decode".into(),
        ));
    }
    let block = frame.values();
    let keys: &[u8] = bytemuck::cast_slice(frame.keys());
    let claimed = if keyless(&h) {
        // No keys to count the values by (an answer): the block's own length, bounded
        // by the frame limit before anything is allocated.
        let max = max_frame.saturating_sub(crate::wire::HEADER_LEN);
        Some(
            compress::inspect(block, max)
                .map_err(|e| {
                    CloseReason::BadBlock(format!(
                        "its {}-byte value block, for at most {max} bytes of values: {e}",
                        block.len()
                    ))
                })?
                .len as u64,
        )
    } else {
        decoded_values_len(&h, keys)
    };
    let Some(want) = claimed else {
        return Err(CloseReason::BadBlock(format!(
            "the values it calls for ({} x {} of dtype {}) do not fit in 64 bits",
            if h.has(FLAG_RANGE) {
                "the range's keys"
            } else if h.has(FLAG_KEYS_CACHED) {
                "the cached list's keys"
            } else {
                "its keys"
            },
            h.value_len,
            h.dtype
        )));
    };
    let mut plain = h;
    plain.flags &= !FLAG_COMPRESSED;
    plain.value_bytes = want;
    // Bounds the decoded frame by `max_frame` (and so `want` by usize) before anything
    // is allocated for it.
    let layout = plain
        .layout(max_frame)
        .map_err(|e| CloseReason::BadBlock(format!("decoded, it would be invalid: {e}")))?;
    let want = layout.values_len;
    let info = compress::inspect(block, want).map_err(|e| {
        CloseReason::BadBlock(format!(
            "its {}-byte value block, for {want} bytes of values: {e}",
            block.len()
        ))
    })?;
    if info.len != want {
        return Err(CloseReason::BadBlock(format!(
            "its {}-byte {} value block holds {} bytes, the header calls for {want}",
            block.len(),
            info.codec.name(),
            info.len
        )));
    }
    let mut body = pool.take(layout.body_len);
    let bytes = body.bytes_mut();
    let (k, rest) = bytes.split_at_mut(layout.keys_len);
    k.copy_from_slice(keys);
    let (v, pad) = rest.split_at_mut(want);
    pad.fill(0);
    let got = with_codec_ctx(|ctx| compress::decode_into(ctx, block, v)).map_err(|e| {
        CloseReason::BadBlock(format!(
            "its {}-byte {} value block does not decode: {e}",
            block.len(),
            info.codec.name()
        ))
    })?;
    if got != want {
        // `inspect` saw this length claimed; `decode_into` returns the claimed length.
        return Err(CloseReason::BadBlock(format!(
            "its value block decodes to {got} bytes, the header calls for {want}"
        )));
    }
    let owned = OwnedFrame::from_checked(plain, layout, body);
    if let Err(e) = owned.frame_checked() {
        return Err(CloseReason::BadBlock(format!(
            "decoded, it would be invalid: {e}"
        )));
    }
    Ok((owned, info))
}

/// Take a shared-memory hello read from `conn` (`first`: as the stream's first bytes;
/// `after`: bytes read behind it).
///
/// - An offer, on an accepted connection as its first bytes: open the region and answer
///   accept (and move to it) or refuse with the reason (and stay on TCP). The answer is
///   the first thing this side writes; an acceptor that wrote before cannot answer first
///   and closes the connection.
/// - An answer to this side's offer: move to the region (accept) or stay on TCP
///   (refuse); either way the frames held meanwhile go out.
///
/// Any other hello is a protocol error that closes the connection.
fn on_hello(
    conn: &Conn,
    bytes: &[u8; HELLO_LEN],
    first: bool,
    after: usize,
    shared: &Shared,
) -> Result<(), CloseReason> {
    let inner = &*conn.0;
    let hello = Hello::decode(bytes).map_err(CloseReason::Handshake)?;
    match hello.kind {
        HelloKind::Offer => {
            if !(inner.accepted && first) {
                return Err(CloseReason::Handshake(
                    "a shared-memory offer that is not the first bytes of an accepted connection"
                        .into(),
                ));
            }
            let too_late = || {
                CloseReason::Handshake(
                    "frames were sent on the connection before its shared-memory offer was read"
                        .into(),
                )
            };
            if inner.wrote.load(Ordering::Relaxed) {
                return Err(too_late());
            }
            let opened = if shared.cfg.shm_messages == ShmMessages::Off {
                Err((Refusal::Disabled, "shared memory is off here".to_string()))
            } else if inner.tls.is_some() {
                Err((
                    Refusal::Disabled,
                    "the connection runs TLS: its frames stay inside it".to_string(),
                ))
            } else if after > 0 {
                Err((
                    Refusal::BadOffer,
                    format!("{after} bytes followed the offer before its answer"),
                ))
            } else {
                ShmPipe::accept(&hello)
            };
            let w = inner.lock_write();
            if inner.wrote.load(Ordering::Relaxed) || !w.queue.is_empty() {
                // The answer cannot be the first bytes any more.
                return Err(too_late());
            }
            match opened {
                Ok(pipe) => {
                    write_now(&inner.stream, &Hello::reply(HelloKind::Accept, 0).encode())
                        .map_err(CloseReason::Io)?;
                    let ring = pipe.ring_bytes();
                    let _ = inner.pipe.set(MsgPipe::Shm(pipe));
                    drop(w);
                    shared.stats.shm_connections.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = inner.id, peer = %inner.peer, ring, "frames move to shared memory (offer accepted)");
                }
                Err((why, detail)) => {
                    write_now(
                        &inner.stream,
                        &Hello::reply(HelloKind::Refuse, why as u16).encode(),
                    )
                    .map_err(CloseReason::Io)?;
                    inner.wrote.store(true, Ordering::Relaxed);
                    drop(w);
                    shared.stats.shm_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(conn = inner.id, peer = %inner.peer, reason = %detail, "refused a shared-memory offer; the connection stays on TCP");
                }
            }
            Ok(())
        }
        HelloKind::Accept | HelloKind::Refuse => {
            let pipe = {
                let mut offered = inner.offered.lock();
                match offered.take() {
                    Some(Offered::Shm(pipe)) => pipe,
                    other => {
                        *offered = other;
                        return Err(CloseReason::Handshake(
                            "a shared-memory answer to an offer this side did not make".into(),
                        ));
                    }
                }
            };
            let mut w = inner.lock_write();
            w.hold = None;
            if hello.kind == HelloKind::Accept {
                let ring = pipe.ring_bytes();
                let _ = inner.pipe.set(MsgPipe::Shm(pipe));
                shared.stats.shm_connections.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(conn = inner.id, peer = %inner.peer, ring, "frames move to shared memory (offer accepted by the peer)");
            } else {
                shared.stats.shm_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(conn = inner.id, peer = %inner.peer, reason = Refusal::describe(hello.reason), "the peer refused shared memory; the connection stays on TCP");
            }
            // The frames held while the offer was out go now, where the answer says.
            let flushed = conn.flush_locked(&mut w);
            drop(w);
            flushed.map(|_| ()).map_err(CloseReason::Io)
        }
    }
}

/// Take an RDMA hello read from `conn`, like [`on_hello`]: an offer (first bytes of an
/// accepted connection) is answered accept, with this side's queue pair and region, or
/// refuse with the reason; an answer to this side's offer connects its queue pair
/// (accept) or leaves it on TCP (refuse), and the held frames go out.
fn on_rdma_hello(
    conn: &Conn,
    bytes: &[u8; RDMA_HELLO_LEN],
    first: bool,
    after: usize,
    shared: &Shared,
) -> Result<(), CloseReason> {
    let inner = &*conn.0;
    let hello = RdmaHello::decode(bytes).map_err(CloseReason::Handshake)?;
    match hello.kind {
        HelloKind::Offer => {
            if !(inner.accepted && first) {
                return Err(CloseReason::Handshake(
                    "an RDMA offer that is not the first bytes of an accepted connection".into(),
                ));
            }
            let too_late = || {
                CloseReason::Handshake(
                    "frames were sent on the connection before its RDMA offer was read".into(),
                )
            };
            if inner.wrote.load(Ordering::Relaxed) {
                return Err(too_late());
            }
            let opened = if shared.cfg.rdma_messages == RdmaMessages::Off {
                Err((
                    RdmaRefusal::Disabled,
                    "RDMA messages are off here".to_string(),
                ))
            } else if inner.tls.is_some() {
                Err((
                    RdmaRefusal::Disabled,
                    "the connection runs TLS: its frames stay inside it".to_string(),
                ))
            } else if after > 0 {
                Err((
                    RdmaRefusal::BadOffer,
                    format!("{after} bytes followed the offer before its answer"),
                ))
            } else {
                match shared.rdma_device() {
                    Ok(dev) => RdmaPipe::accept(dev, &hello, shared.cfg.rdma_pipe()),
                    Err(e) => Err((RdmaRefusal::NoDevice, e)),
                }
            };
            let w = inner.lock_write();
            if inner.wrote.load(Ordering::Relaxed) || !w.queue.is_empty() {
                return Err(too_late());
            }
            match opened {
                Ok((pipe, answer)) => {
                    write_now(&inner.stream, &answer.encode()).map_err(CloseReason::Io)?;
                    let ring = pipe.ring_bytes();
                    let _ = inner.pipe.set(MsgPipe::Rdma(Box::new(pipe)));
                    drop(w);
                    shared
                        .stats
                        .rdma_connections
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = inner.id, peer = %inner.peer, ring, "frames move to RDMA (offer accepted)");
                }
                Err((why, detail)) => {
                    write_now(&inner.stream, &RdmaHello::refuse(why).encode())
                        .map_err(CloseReason::Io)?;
                    inner.wrote.store(true, Ordering::Relaxed);
                    drop(w);
                    shared.stats.rdma_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(conn = inner.id, peer = %inner.peer, reason = %detail, "refused an RDMA offer; the connection stays on TCP");
                }
            }
            Ok(())
        }
        HelloKind::Accept | HelloKind::Refuse => {
            let offer = {
                let mut offered = inner.offered.lock();
                match offered.take() {
                    Some(Offered::Rdma(offer)) => offer,
                    other => {
                        *offered = other;
                        return Err(CloseReason::Handshake(
                            "an RDMA answer to an offer this side did not make".into(),
                        ));
                    }
                }
            };
            let mut w = inner.lock_write();
            w.hold = None;
            if hello.kind == HelloKind::Accept {
                // The peer moved already: a queue pair that cannot connect ends the
                // connection (there is no going back to TCP).
                let pipe = offer.complete(&hello).map_err(|e| {
                    CloseReason::Handshake(format!("connecting the RDMA queue pair: {e}"))
                })?;
                pipe.mark_peer_ready().map_err(|e| {
                    CloseReason::Handshake(format!("marking the peer's RDMA region ready: {e}"))
                })?;
                let ring = pipe.ring_bytes();
                let _ = inner.pipe.set(MsgPipe::Rdma(Box::new(pipe)));
                // The peer's loop may sleep without having asked for a doorbell.
                inner.doorbell();
                shared
                    .stats
                    .rdma_connections
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(conn = inner.id, peer = %inner.peer, ring, "frames move to RDMA (offer accepted by the peer)");
            } else {
                shared.stats.rdma_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(conn = inner.id, peer = %inner.peer, reason = RdmaRefusal::describe(hello.reason), "the peer refused RDMA; the connection stays on TCP");
            }
            let flushed = conn.flush_locked(&mut w);
            drop(w);
            flushed.map(|_| ()).map_err(CloseReason::Io)
        }
    }
}

/// Read and deliver frames until the socket is drained, the budget is spent, reading is
/// paused by backpressure, or the connection must close.
fn read_frames<H: Handler>(
    conn: &Conn,
    rs: &mut ReadState,
    handler: &mut H,
    shared: &Arc<Shared>,
) -> ReadOutcome {
    let max_frame = shared.cfg.max_frame;
    let mut budget = READ_BUDGET_BYTES;
    loop {
        rs.check();
        if conn.is_closed() {
            return ReadOutcome::Idle;
        }
        if rs.paused {
            return ReadOutcome::Idle;
        }
        // 1. A large frame being read into its own buffer.
        if let Some(big) = rs.big.as_mut() {
            let len = big.layout.body_len;
            // Else the read below asks for nothing and its 0 looks like the peer closing.
            debug_assert!(
                big.filled < len,
                "a complete large frame ({len} bytes) was not delivered"
            );
            match conn.0.read_in(&mut big.body.bytes_mut()[big.filled..len]) {
                Ok(0) => {
                    return ReadOutcome::Close(CloseReason::VanishedMidFrame {
                        got: HEADER_LEN + big.filled,
                        need: big.layout.frame_len(),
                    })
                }
                Ok(n) => {
                    shared
                        .stats
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    big.filled += n;
                    budget = budget.saturating_sub(n);
                    if big.filled == len {
                        let big = rs.big.take().expect("checked above");
                        let owned = OwnedFrame::from_checked(big.header, big.layout, big.body);
                        // Range checks need the keys: re-check before delivering.
                        let decoded = match owned.frame_checked() {
                            Err(e) => return ReadOutcome::Close(CloseReason::Malformed(e)),
                            Ok(f) if f.header().has(FLAG_COMPRESSED) => {
                                Some(decompress_frame(conn, &f, shared))
                            }
                            Ok(_) => None,
                        };
                        let owned = match decoded {
                            None => owned,
                            Some(Ok(plain)) => plain,
                            Some(Err(reason)) => return ReadOutcome::Close(reason),
                        };
                        shared.stats.frames_received.fetch_add(1, Ordering::Relaxed);
                        handler.on_frame(conn, RecvFrame::Owned(owned));
                        if conn.over_bound() {
                            rs.paused = true;
                        }
                    }
                    if budget == 0 {
                        return ReadOutcome::More;
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Idle,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return ReadOutcome::Close(CloseReason::Io(e)),
            }
        }
        // 2. Complete frames in the staging buffer. (First, a peer that holds a cluster
        // secret, here where none is: its hello is shorter than a frame header; or a
        // peer that speaks TLS, here where no TLS is: its handshake or its alert.)
        if rs.fresh && conn.0.tls.is_none() && rs.end - rs.start >= 2 {
            let bytes: &[u8] = bytemuck::cast_slice(&rs.staging);
            if tls::looks_like_tls(&bytes[rs.start..rs.end]) {
                return ReadOutcome::Close(CloseReason::UnexpectedTls);
            }
        }
        if rs.fresh && rs.end - rs.start >= AUTH_MAGIC.len() {
            let bytes: &[u8] = bytemuck::cast_slice(&rs.staging);
            if bytes[rs.start..rs.start + AUTH_MAGIC.len()] == AUTH_MAGIC {
                return ReadOutcome::Close(CloseReason::UnexpectedAuth);
            }
        }
        while rs.end - rs.start >= HEADER_LEN {
            let bytes: &[u8] = bytemuck::cast_slice(&rs.staging);
            if bytes[rs.start..rs.start + 4] == HELLO_MAGIC.to_le_bytes() {
                // A shared-memory hello where a frame would start.
                if rs.end - rs.start < HELLO_LEN {
                    break;
                }
                let hello: [u8; HELLO_LEN] = bytes[rs.start..rs.start + HELLO_LEN]
                    .try_into()
                    .expect("length checked");
                rs.start += HELLO_LEN;
                let first = std::mem::replace(&mut rs.fresh, false);
                if let Err(reason) = on_hello(conn, &hello, first, rs.end - rs.start, shared) {
                    return ReadOutcome::Close(reason);
                }
                if conn.0.pipe.get().is_some() {
                    // Past the hello, the socket carries only doorbells.
                    rs.start = rs.end;
                    break;
                }
                continue;
            }
            if bytes[rs.start..rs.start + 4] == RDMA_HELLO_MAGIC.to_le_bytes() {
                // An RDMA hello where a frame would start.
                if rs.end - rs.start < RDMA_HELLO_LEN {
                    break;
                }
                let hello: [u8; RDMA_HELLO_LEN] = bytes[rs.start..rs.start + RDMA_HELLO_LEN]
                    .try_into()
                    .expect("length checked");
                rs.start += RDMA_HELLO_LEN;
                let first = std::mem::replace(&mut rs.fresh, false);
                if let Err(reason) = on_rdma_hello(conn, &hello, first, rs.end - rs.start, shared) {
                    return ReadOutcome::Close(reason);
                }
                if conn.0.pipe.get().is_some() {
                    rs.start = rs.end;
                    break;
                }
                continue;
            }
            rs.fresh = false;
            let head: &[u8; HEADER_LEN] = bytes[rs.start..rs.start + HEADER_LEN]
                .try_into()
                .expect("length checked");
            let header = Header::from_bytes(head);
            if let Some(id) = conn.0.peer_identity.filter(|&id| id != 0) {
                if header.sender != id {
                    return ReadOutcome::Close(CloseReason::WrongSender {
                        claimed: header.sender,
                        authenticated: id,
                    });
                }
            }
            let layout = match header.layout(max_frame) {
                Ok(l) => l,
                Err(e) => return ReadOutcome::Close(CloseReason::Malformed(e)),
            };
            let frame_len = layout.frame_len();
            if frame_len > STAGING_BYTES {
                // Move to a dedicated buffer; read the rest straight into it.
                let mut body = shared.pool.take(layout.body_len);
                let have = rs.end - rs.start - HEADER_LEN;
                // The staging buffer holds less than the frame: some of it is left to read.
                debug_assert!(
                    have < layout.body_len,
                    "a frame larger than the staging buffer is complete in it"
                );
                body.bytes_mut()[..have].copy_from_slice(&bytes[rs.start + HEADER_LEN..rs.end]);
                rs.start = 0;
                rs.end = 0;
                rs.big = Some(BigFrame {
                    header,
                    layout,
                    body,
                    filled: have,
                });
                break;
            }
            if rs.end - rs.start < frame_len {
                break;
            }
            let body = &bytes[rs.start + HEADER_LEN..rs.start + frame_len];
            let frame = match Frame::from_body(header, &layout, body) {
                Ok(f) => f,
                Err(e) => return ReadOutcome::Close(CloseReason::Malformed(e)),
            };
            rs.start += frame_len;
            let frame = if header.has(FLAG_COMPRESSED) {
                match decompress_frame(conn, &frame, shared) {
                    Ok(plain) => RecvFrame::Owned(plain),
                    Err(reason) => return ReadOutcome::Close(reason),
                }
            } else {
                RecvFrame::Borrowed {
                    frame,
                    pool: &shared.pool,
                }
            };
            shared.stats.frames_received.fetch_add(1, Ordering::Relaxed);
            handler.on_frame(conn, frame);
            if conn.is_closed() {
                return ReadOutcome::Idle;
            }
            if conn.over_bound() {
                rs.paused = true;
                break;
            }
        }
        if rs.big.is_some() {
            continue;
        }
        if rs.paused {
            return ReadOutcome::Idle;
        }
        // 3. Make room and read more.
        if rs.start == rs.end {
            rs.start = 0;
            rs.end = 0;
        } else if rs.start > 0 {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut rs.staging);
            bytes.copy_within(rs.start..rs.end, 0);
            rs.end -= rs.start;
            rs.start = 0;
        }
        if budget == 0 {
            return ReadOutcome::More;
        }
        debug_assert_eq!(rs.start, 0, "staging buffer not compacted before a read");
        // Room is left: a frame that fits was delivered, a larger one moved out. Else the
        // read asks for nothing and its 0 looks like the peer closing.
        debug_assert!(
            rs.end < STAGING_BYTES,
            "staging buffer full without a complete frame"
        );
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut rs.staging);
        match conn.0.read_in(&mut bytes[rs.end..]) {
            Ok(0) => {
                return ReadOutcome::Close(if rs.end == 0 {
                    CloseReason::PeerClosed
                } else {
                    let need = if rs.end >= HEADER_LEN {
                        let head: &[u8; HEADER_LEN] =
                            bytes[..HEADER_LEN].try_into().expect("length checked");
                        Header::from_bytes(head)
                            .layout(max_frame)
                            .map_or(HEADER_LEN, |l| l.frame_len())
                    } else {
                        HEADER_LEN
                    };
                    CloseReason::VanishedMidFrame { got: rs.end, need }
                });
            }
            Ok(n) => {
                shared
                    .stats
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
                rs.end += n;
                budget = budget.saturating_sub(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Idle,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return ReadOutcome::Close(CloseReason::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lock_order::{Rank, Ranked};

    #[test]
    fn locks_taken_in_order_and_their_rank_given_back() {
        let (a, b) = (parking_lot::Mutex::new(1), parking_lot::Mutex::new(2));
        {
            let w = Ranked::lock(Rank::Write, || a.lock());
            let p = Ranked::lock(Rank::Pool, || b.lock());
            assert_eq!(*w + *p, 3);
        }
        // Both released: the thread may start from the first rank again.
        let w = Ranked::lock(Rank::Write, || a.lock());
        assert_eq!(*w, 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "lock order")]
    fn a_lock_taken_against_the_order_panics() {
        let (a, b) = (parking_lot::Mutex::new(()), parking_lot::Mutex::new(()));
        let _p = Ranked::lock(Rank::Pool, || b.lock());
        let _w = Ranked::lock(Rank::Write, || a.lock());
    }

    #[test]
    fn a_tls_session_is_taken_under_write_and_the_pool_under_it() {
        let (a, b, c) = (
            parking_lot::Mutex::new(1),
            parking_lot::Mutex::new(2),
            parking_lot::Mutex::new(3),
        );
        let w = Ranked::lock(Rank::Write, || a.lock());
        let t = Ranked::lock(Rank::Tls, || b.lock());
        let p = Ranked::lock(Rank::Pool, || c.lock());
        assert_eq!(*w + *t + *p, 6);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "lock order")]
    fn a_write_lock_under_a_tls_session_panics() {
        let (a, b) = (parking_lot::Mutex::new(()), parking_lot::Mutex::new(()));
        let _t = Ranked::lock(Rank::Tls, || b.lock());
        let _w = Ranked::lock(Rank::Write, || a.lock());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "lock order")]
    fn two_write_locks_at_once_panic() {
        let (a, b) = (parking_lot::Mutex::new(()), parking_lot::Mutex::new(()));
        let _w = Ranked::lock(Rank::Write, || a.lock());
        let _w2 = Ranked::lock(Rank::Write, || b.lock());
    }
}
