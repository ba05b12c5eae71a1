//! The shared-memory message path: a connection between two processes of one host moves
//! its frames through a pair of single-producer single-consumer byte rings in a shared
//! region instead of through the loopback TCP stack.
//!
//! A connection always starts as TCP. The connecting side, when its configuration allows
//! shared memory ([`ShmMessages`]) and the peer is on this host (a loopback address, or
//! the socket's own local address), creates a region ([`SharedRegion`]: a sealed memfd)
//! holding both rings, writes an *offer* ([`Hello`]) as the first bytes of the stream,
//! and holds every frame it is asked to send until the answer comes. The accepting side
//! reads the offer where a frame would start, opens the region by its locator, checks
//! its magic, cookie and size, and answers *accept* (then both sides switch) or
//! *refuse* with a reason (then both stay on TCP and the held frames go out over TCP).
//!
//! After the switch the TCP socket carries no frames, only one-byte doorbells, and stays
//! open for two reasons: it is the peer-failure detector (a process that dies has its
//! socket closed by the kernel, so a dead peer is seen exactly as fast as over TCP), and
//! its readiness events wake a sleeping event loop. A loop that is about to sleep sets
//! the *reader waiting* word of each of its inbound rings; a producer that finds it set
//! after writing clears it and rings the doorbell. A producer that finds its ring full
//! sets the *writer waiting* word; the consumer that frees room rings back. Both follow
//! the store-then-load pattern with sequentially consistent accesses, so a wake-up is
//! never lost; a spurious one costs a system call. While loops busy-poll they look at
//! the rings on every turn and no doorbell is needed.
//!
//! Everything read from the region is untrusted, like bytes from a socket: ring
//! positions that do not fit the ring close the connection ([`RingError`]), and the
//! bytes pass the same frame checks as TCP bytes.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};

use pserv_sys::SharedRegion;

/// First four bytes of a [`Hello`], where a frame's magic would be.
pub(crate) const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"PSHM");
/// Length of a [`Hello`] on the wire (a multiple of 8, so frames after it stay aligned).
pub const HELLO_LEN: usize = 64;
const HELLO_VERSION: u8 = 1;
const LOCATOR_MAX: usize = 40;

/// Smallest and largest ring an offer may name.
pub(crate) const RING_MIN: usize = 64 << 10;
pub(crate) const RING_MAX: usize = 1 << 30;

// Region layout: a header page, then the ring of each direction.
const R_MAGIC: usize = 0;
const R_COOKIE: usize = 8;
const R_RING: usize = 16;
const REGION_MAGIC: u64 = u64::from_le_bytes(*b"PSRVRING");
/// Control words of direction `d` start at `CTRL + d * CTRL_STRIDE`, each word on its
/// own 128 bytes (adjacent-line prefetch pairs 64-byte lines).
const CTRL: usize = 256;
const CTRL_STRIDE: usize = 512;
const C_TAIL: usize = 0;
const C_HEAD: usize = 128;
const C_READER_WAITING: usize = 256;
const C_WRITER_WAITING: usize = 384;
const DATA: usize = 4096;

/// Direction 0 carries the connecting side's frames, direction 1 the accepting side's.
const CONNECTOR_OUT: usize = 0;
const ACCEPTOR_OUT: usize = 1;

/// When connections use shared memory for their frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ShmMessages {
    /// Never: every connection stays on TCP, and offers from peers are refused.
    Off,
    /// Between processes of one host: a connection to a loopback address or to this
    /// host's own address offers shared memory, and offers from peers are accepted.
    #[default]
    SameHost,
}

/// What a [`Hello`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HelloKind {
    Offer = 1,
    Accept = 2,
    Refuse = 3,
}

/// Why an accepting side refused an offer (in a refusal's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its configuration says [`ShmMessages::Off`].
    Disabled = 1,
    /// The region could not be opened or mapped (another host, PID or user namespace,
    /// no permission to inspect the offering process).
    CannotOpen = 2,
    /// The region is not what the offer said (size, magic, cookie).
    Mismatch = 3,
    /// The offer is malformed (version, ring size, locator).
    BadOffer = 4,
}

impl Refusal {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Refusal::Disabled,
            2 => Refusal::CannotOpen,
            3 => Refusal::Mismatch,
            4 => Refusal::BadOffer,
            _ => return None,
        })
    }

    /// What the reason means, for a log line.
    pub(crate) fn describe(code: u16) -> &'static str {
        match Refusal::from_u16(code) {
            Some(Refusal::Disabled) => "the peer does not use shared memory for messages",
            Some(Refusal::CannotOpen) => {
                "the peer cannot open this process's region (another host or namespace?)"
            }
            Some(Refusal::Mismatch) => "the region the peer opened is not the one offered",
            Some(Refusal::BadOffer) => "the peer found the offer malformed",
            None => "the peer gave an unknown reason",
        }
    }
}

/// The 64 bytes of an offer, an acceptance or a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub kind: HelloKind,
    /// A [`Refusal`] code in a refusal, else 0.
    pub reason: u16,
    /// Bytes of each ring (an offer).
    pub ring: u64,
    /// The random word the region's header holds (an offer).
    pub cookie: u64,
    /// `/proc/<pid>/fd/<n>` of the region (an offer).
    pub locator: String,
}

impl Hello {
    pub(crate) fn reply(kind: HelloKind, reason: u16) -> Self {
        Hello {
            kind,
            reason,
            ring: 0,
            cookie: 0,
            locator: String::new(),
        }
    }

    /// The wire bytes.
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = HELLO_VERSION;
        b[6..8].copy_from_slice(&self.reason.to_le_bytes());
        b[8..16].copy_from_slice(&self.ring.to_le_bytes());
        b[16..24].copy_from_slice(&self.cookie.to_le_bytes());
        let loc = self.locator.as_bytes();
        let n = loc.len().min(LOCATOR_MAX);
        b[24..24 + n].copy_from_slice(&loc[..n]);
        b
    }

    /// Parse wire bytes; `Err` says what is wrong.
    pub(crate) fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != HELLO_MAGIC {
            return Err("not a shared-memory hello".into());
        }
        if b[5] != HELLO_VERSION {
            return Err(format!(
                "shared-memory hello of version {} (this build speaks {HELLO_VERSION})",
                b[5]
            ));
        }
        let kind = match b[4] {
            1 => HelloKind::Offer,
            2 => HelloKind::Accept,
            3 => HelloKind::Refuse,
            k => return Err(format!("shared-memory hello of unknown kind {k}")),
        };
        let loc = &b[24..24 + LOCATOR_MAX];
        let end = loc.iter().position(|&c| c == 0).unwrap_or(LOCATOR_MAX);
        let locator = std::str::from_utf8(&loc[..end])
            .map_err(|_| "shared-memory hello with a locator that is not UTF-8".to_string())?
            .to_owned();
        Ok(Hello {
            kind,
            reason: u16::from_le_bytes([b[6], b[7]]),
            ring: word(8),
            cookie: word(16),
            locator,
        })
    }
}

/// Check a peer's shared-memory hello (offer, acceptance or refusal) with the decoder the
/// transport runs on the first 64 bytes of a connection that start with its magic. `Err`
/// says what is wrong; never panics (the fuzz target `pipe_hello` holds it to that).
pub fn check_hello(bytes: &[u8; HELLO_LEN]) -> Result<(), String> {
    Hello::decode(bytes).map(|_| ())
}

/// Valid hellos of every kind, as the encoder writes them (seeds for the fuzz corpus).
pub fn sample_hellos() -> Vec<[u8; HELLO_LEN]> {
    let offer = Hello {
        kind: HelloKind::Offer,
        reason: 0,
        ring: RING_MIN as u64,
        cookie: 0x0123_4567_89ab_cdef,
        locator: "/proc/4242/fd/7".into(),
    };
    vec![
        offer.encode(),
        Hello::reply(HelloKind::Accept, 0).encode(),
        Hello::reply(HelloKind::Refuse, Refusal::Disabled as u16).encode(),
        Hello::reply(HelloKind::Refuse, Refusal::BadOffer as u16).encode(),
    ]
}

/// A ring position from the region that cannot be right: the peer is broken or hostile.
#[derive(Debug, thiserror::Error)]
#[error("shared-memory ring of {ring} bytes: the peer's {what} position is {gap} bytes from ours")]
pub struct RingError {
    ring: usize,
    what: &'static str,
    gap: u64,
}

impl From<RingError> for io::Error {
    fn from(e: RingError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Both rings of one connection, seen from one side.
pub(crate) struct ShmPipe {
    region: SharedRegion,
    ring: usize,
    out_dir: usize,
    in_dir: usize,
    /// The next byte this side writes (its own copy: the region's is only published).
    tail: AtomicU64,
    /// The next byte this side reads.
    head: AtomicU64,
}

impl std::fmt::Debug for ShmPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPipe")
            .field("ring", &self.ring)
            .field("locator", &self.region.locator())
            .finish()
    }
}

/// A random word (for the region's cookie): not secret, only unlikely to repeat.
fn random_word() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

impl ShmPipe {
    /// The connecting side: a new region with two rings of `ring` bytes (rounded up to a
    /// power of two within [`RING_MIN`], [`RING_MAX`]), and the offer that names it.
    pub(crate) fn create(ring: usize) -> io::Result<(ShmPipe, Hello)> {
        let ring = ring.clamp(RING_MIN, RING_MAX).next_power_of_two();
        let region = SharedRegion::create(DATA + 2 * ring).map_err(io::Error::other)?;
        let cookie = random_word();
        region
            .atomic_u64(R_RING)
            .store(ring as u64, Ordering::Relaxed);
        region.atomic_u64(R_COOKIE).store(cookie, Ordering::Relaxed);
        region
            .atomic_u64(R_MAGIC)
            .store(REGION_MAGIC, Ordering::Release);
        if region.locator().len() > LOCATOR_MAX {
            return Err(io::Error::other(format!(
                "region locator {} longer than {LOCATOR_MAX} bytes",
                region.locator()
            )));
        }
        let offer = Hello {
            kind: HelloKind::Offer,
            reason: 0,
            ring: ring as u64,
            cookie,
            locator: region.locator().to_owned(),
        };
        Ok((ShmPipe::new(region, ring, CONNECTOR_OUT), offer))
    }

    /// The accepting side: open the region an offer names and check it is that region.
    pub(crate) fn accept(offer: &Hello) -> Result<ShmPipe, (Refusal, String)> {
        let ring = usize::try_from(offer.ring).unwrap_or(usize::MAX);
        if offer.kind != HelloKind::Offer
            || !ring.is_power_of_two()
            || !(RING_MIN..=RING_MAX).contains(&ring)
        {
            return Err((
                Refusal::BadOffer,
                format!("an offer of {} -byte rings", offer.ring),
            ));
        }
        let region = SharedRegion::open(&offer.locator, DATA + 2 * ring)
            .map_err(|e| (Refusal::CannotOpen, e.to_string()))?;
        let magic = region.atomic_u64(R_MAGIC).load(Ordering::Acquire);
        let cookie = region.atomic_u64(R_COOKIE).load(Ordering::Relaxed);
        let their_ring = region.atomic_u64(R_RING).load(Ordering::Relaxed);
        if magic != REGION_MAGIC || cookie != offer.cookie || their_ring != offer.ring {
            return Err((
                Refusal::Mismatch,
                format!("{} holds another region", offer.locator),
            ));
        }
        Ok(ShmPipe::new(region, ring, ACCEPTOR_OUT))
    }

    fn new(region: SharedRegion, ring: usize, out_dir: usize) -> Self {
        ShmPipe {
            region,
            ring,
            out_dir,
            in_dir: 1 - out_dir,
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
        }
    }

    /// Bytes of each ring.
    pub(crate) fn ring_bytes(&self) -> usize {
        self.ring
    }

    fn word(&self, dir: usize, w: usize) -> &AtomicU64 {
        self.region.atomic_u64(CTRL + dir * CTRL_STRIDE + w)
    }

    /// Clear a waiting flag the peer set; whether it was set (then ring its doorbell).
    /// A plain load first: the common case, no one waiting, takes no read-modify-write.
    fn take_flag(&self, dir: usize, w: usize) -> bool {
        let flag = self.word(dir, w);
        flag.load(Ordering::SeqCst) != 0 && flag.swap(0, Ordering::SeqCst) != 0
    }

    fn data(&self, dir: usize) -> usize {
        DATA + dir * self.ring
    }

    /// Bytes the outbound ring holds (the peer has not read), checked.
    fn out_used(&self) -> Result<u64, RingError> {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.word(self.out_dir, C_HEAD).load(Ordering::Acquire);
        let used = tail.wrapping_sub(head);
        if used > self.ring as u64 {
            return Err(RingError {
                ring: self.ring,
                what: "read",
                gap: used,
            });
        }
        Ok(used)
    }

    /// Bytes waiting in the inbound ring, checked.
    fn in_avail(&self) -> Result<u64, RingError> {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.word(self.in_dir, C_TAIL).load(Ordering::Acquire);
        let avail = tail.wrapping_sub(head);
        if avail > self.ring as u64 {
            return Err(RingError {
                ring: self.ring,
                what: "write",
                gap: avail,
            });
        }
        Ok(avail)
    }

    /// Write as much of `slices` as the outbound ring takes (like a non-blocking
    /// socket: `WouldBlock` when it takes nothing). Returns the bytes written and whether
    /// the peer's loop sleeps and must be woken (ring its doorbell). A full ring asks
    /// the peer to ring back once it made room.
    pub(crate) fn write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<(usize, bool)> {
        let want: usize = slices.iter().map(|s| s.len()).sum();
        let mut free = self.ring as u64 - self.out_used()?;
        if free == 0 && want > 0 {
            // Ask for a wake-up, then look again: the peer may have read meanwhile.
            self.word(self.out_dir, C_WRITER_WAITING)
                .store(1, Ordering::SeqCst);
            free = self.ring as u64 - self.out_used()?;
            if free == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let mut tail = self.tail.load(Ordering::Relaxed);
        let mut written = 0usize;
        let base = self.data(self.out_dir);
        let mask = self.ring as u64 - 1;
        for s in slices {
            let mut src: &[u8] = s;
            while !src.is_empty() && free > 0 {
                let off = (tail & mask) as usize;
                let n = src.len().min(free as usize).min(self.ring - off);
                self.region.copy_in(base + off, &src[..n]);
                src = &src[n..];
                tail = tail.wrapping_add(n as u64);
                free -= n as u64;
                written += n;
            }
            if free == 0 {
                break;
            }
        }
        if written == 0 {
            return Ok((0, false));
        }
        self.tail.store(tail, Ordering::Relaxed);
        self.word(self.out_dir, C_TAIL)
            .store(tail, Ordering::SeqCst);
        if written < want {
            self.word(self.out_dir, C_WRITER_WAITING)
                .store(1, Ordering::SeqCst);
        }
        let wake = self.take_flag(self.out_dir, C_READER_WAITING);
        Ok((written, wake))
    }

    /// Read what the inbound ring holds into `buf` (`WouldBlock` when it is empty).
    /// Returns the bytes read and whether the peer waits for room (ring its doorbell).
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let avail = self.in_avail()?;
        if avail == 0 || buf.is_empty() {
            return if buf.is_empty() {
                Ok((0, false))
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let mut head = self.head.load(Ordering::Relaxed);
        let n = (avail as usize).min(buf.len());
        let base = self.data(self.in_dir);
        let mask = self.ring as u64 - 1;
        let mut done = 0;
        while done < n {
            let off = (head & mask) as usize;
            let k = (n - done).min(self.ring - off);
            self.region.copy_out(base + off, &mut buf[done..done + k]);
            done += k;
            head = head.wrapping_add(k as u64);
        }
        self.head.store(head, Ordering::Relaxed);
        self.word(self.in_dir, C_HEAD).store(head, Ordering::SeqCst);
        let wake = self.take_flag(self.in_dir, C_WRITER_WAITING);
        Ok((n, wake))
    }

    /// Whether the inbound ring holds bytes (a broken ring counts: reading reports it).
    pub(crate) fn readable(&self) -> bool {
        self.in_avail().map_or(true, |a| a > 0)
    }

    /// Whether the outbound ring has room (a broken ring counts: writing reports it).
    pub(crate) fn writable(&self) -> bool {
        self.out_used().map_or(true, |u| u < self.ring as u64)
    }

    /// Before this side's loop sleeps: ask to be woken when bytes arrive (and, with
    /// `for_room`, when room is made in the outbound ring), then say whether there is
    /// something to do already (then the loop must not sleep).
    pub(crate) fn arm(&self, for_room: bool) -> bool {
        self.word(self.in_dir, C_READER_WAITING)
            .store(1, Ordering::SeqCst);
        if for_room {
            self.word(self.out_dir, C_WRITER_WAITING)
                .store(1, Ordering::SeqCst);
        }
        self.readable() || (for_room && self.writable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ring: usize) -> (ShmPipe, ShmPipe) {
        let (a, offer) = ShmPipe::create(ring).expect("create");
        let b = ShmPipe::accept(&offer).expect("accept");
        (a, b)
    }

    #[test]
    fn hello_round_trips_and_refuses_garbage() {
        let (_a, offer) = ShmPipe::create(RING_MIN).expect("create");
        let back = Hello::decode(&offer.encode()).expect("decode");
        assert_eq!(back, offer);
        let mut bad = offer.encode();
        bad[5] = 9;
        assert!(Hello::decode(&bad).unwrap_err().contains("version 9"));
        bad = offer.encode();
        bad[4] = 7;
        assert!(Hello::decode(&bad).unwrap_err().contains("unknown kind"));
    }

    #[test]
    fn bytes_cross_both_ways_and_wrap() {
        let (a, b) = pair(RING_MIN);
        let mut buf = vec![0u8; RING_MIN];
        // Odd-sized chunks make the positions wrap at every offset.
        let mut sent = 0u64;
        let mut got = 0u64;
        for round in 0..200usize {
            let len = 1 + (round * 7919) % (RING_MIN - 1);
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
        // The other direction is independent.
        let (n, _) = b.write_vectored(&[IoSlice::new(b"pong")]).expect("write");
        assert_eq!(n, 4);
        let (k, _) = a.read(&mut buf).expect("read");
        assert_eq!(&buf[..k], b"pong");
        assert_eq!(
            a.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn a_full_ring_would_block_and_asks_for_a_wake_up() {
        let (a, b) = pair(RING_MIN);
        let big = vec![5u8; RING_MIN + 100];
        let (n, _) = a.write_vectored(&[IoSlice::new(&big)]).expect("write");
        assert_eq!(n, RING_MIN, "the ring takes what fits");
        assert_eq!(
            a.write_vectored(&[IoSlice::new(&big)]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut buf = vec![0u8; 10];
        let (k, wake) = b.read(&mut buf).expect("read");
        assert_eq!(k, 10);
        assert!(wake, "the reader that makes room wakes the waiting writer");
        let (_, wake) = b.read(&mut buf).expect("read");
        assert!(!wake, "one wake-up per wait");
    }

    #[test]
    fn a_sleeping_reader_is_woken_once() {
        let (a, b) = pair(RING_MIN);
        assert!(!b.arm(false), "nothing to read yet");
        let (_, wake) = a.write_vectored(&[IoSlice::new(b"x")]).expect("write");
        assert!(wake, "the reader armed: the writer must ring");
        let (_, wake) = a.write_vectored(&[IoSlice::new(b"y")]).expect("write");
        assert!(!wake, "the reader was woken already");
        assert!(b.arm(false), "bytes are waiting: the loop must not sleep");
    }

    #[test]
    fn positions_that_do_not_fit_the_ring_are_errors() {
        let (_a, b) = pair(RING_MIN);
        // A hostile peer moves its write position far ahead.
        b.word(CONNECTOR_OUT, C_TAIL)
            .store(10 * RING_MIN as u64, Ordering::SeqCst);
        let err = b.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("write position"), "{err}");
        // ... or its read position ahead of what was written.
        b.word(ACCEPTOR_OUT, C_HEAD).store(77, Ordering::SeqCst);
        let err = b.write_vectored(&[IoSlice::new(b"z")]).unwrap_err();
        assert!(err.to_string().contains("read position"), "{err}");
    }

    #[test]
    fn an_offer_for_another_region_is_refused() {
        let (_a, mut offer) = ShmPipe::create(RING_MIN).expect("create");
        offer.cookie ^= 1;
        assert_eq!(ShmPipe::accept(&offer).unwrap_err().0, Refusal::Mismatch);
        offer.cookie ^= 1;
        offer.ring = 3;
        assert_eq!(ShmPipe::accept(&offer).unwrap_err().0, Refusal::BadOffer);
        offer.ring = RING_MIN as u64;
        offer.locator = "/etc/passwd".into();
        assert_eq!(ShmPipe::accept(&offer).unwrap_err().0, Refusal::CannotOpen);
    }
}
