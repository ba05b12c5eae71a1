//! The baselines every pserv figure is compared with, measured in the same run:
//!
//! - [`tcp_stream`]: a raw single-stream TCP loopback transfer with plain `std::net`, no
//!   framing. The sender writes the transfer in 1 MiB writes; the receiver reads it into
//!   a reused buffer of the transfer's size and answers one byte. What it measures is what
//!   one pserv push of the same size could at best achieve over one connection.
//! - [`tcp_ping_pong`]: a request of N bytes answered by 8 bytes, blocking sockets,
//!   `TCP_NODELAY`: the latency floor of one request/answer on loopback.
//! - [`memcpy`]: one thread copying N bytes into a pre-populated buffer: what moving the
//!   bytes once costs, for reference.
//! - [`sum_f32`]: one thread adding N bytes of f32 into another buffer: what the
//!   server's `sum` update of a dense push costs at least, for reference.
//!
//! The socket baselines run their two ends on two threads of this process, placed three
//! ways ([`Placement`]): where the operating system puts them, both pinned to one core,
//! and pinned to two cores. Which is fastest depends on the machine (on a 2-vCPU VM that
//! is otherwise idle, waking a halted vCPU costs about 25 us, so one core wins latency),
//! so the bench measures all three and compares pserv with the best.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

use crate::stats::{run_pipelined, Budget, Sample};

/// Size of each `write` of the raw stream sender.
pub const STREAM_WRITE_BYTES: usize = 1 << 20;

/// Bytes of the ping-pong answer.
pub const PONG_BYTES: usize = 8;

/// Where the two ends of a socket baseline run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Unpinned: the operating system places both threads.
    Os,
    /// Both threads pinned to core 0.
    SameCore,
    /// Client pinned to core 0, peer to core 1.
    TwoCores,
}

impl Placement {
    /// All placements.
    pub const ALL: [Placement; 3] = [Placement::Os, Placement::SameCore, Placement::TwoCores];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Os => "OS-placed",
            Placement::SameCore => "one core",
            Placement::TwoCores => "two cores",
        }
    }

    /// Cores of (client, peer), if pinned.
    fn cores(self) -> (Option<usize>, Option<usize>) {
        match self {
            Placement::Os => (None, None),
            Placement::SameCore => (Some(0), Some(0)),
            Placement::TwoCores => (Some(0), Some(1)),
        }
    }
}

fn pin(core: Option<usize>) {
    if let Some(c) = core {
        if !pserv_sys::cpu::pin_current_thread(c) {
            tracing::warn!(core = c, "could not pin a baseline thread");
        }
    }
}

/// A connected loopback pair: (client side, server side).
fn pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

/// A buffer of `len` bytes whose pages are populated (written), so the first transfer
/// does not pay page faults that later ones do not.
fn populated(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.fill(0x5a);
    v
}

/// Read exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first.
fn read_all_or_eof(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Run `client` against a peer thread that runs `server` on the other end of a fresh
/// loopback connection, both on threads placed as `placement` says; the peer stops when
/// the client side closes.
fn with_peer<R: Send>(
    placement: Placement,
    server: impl FnOnce(TcpStream) -> io::Result<()> + Send,
    client: impl FnOnce(&mut TcpStream) -> R + Send,
) -> io::Result<R> {
    let (mut c, s) = pair()?;
    let (client_core, peer_core) = placement.cores();
    thread::scope(|scope| {
        let peer = thread::Builder::new()
            .name("baseline-peer".into())
            .spawn_scoped(scope, move || {
                pin(peer_core);
                server(s)
            })?;
        let me = thread::Builder::new()
            .name("baseline-client".into())
            .spawn_scoped(scope, move || {
                pin(client_core);
                let out = client(&mut c);
                drop(c);
                out
            })?;
        let out = me
            .join()
            .map_err(|_| io::Error::other("baseline client thread panicked"))?;
        peer.join()
            .map_err(|_| io::Error::other("baseline peer thread panicked"))??;
        Ok(out)
    })
}

/// Raw single-stream TCP transfers of `size` bytes, one at a time: GB/s and the time of
/// each transfer (first byte written to the receiver's one-byte answer read).
pub fn tcp_stream(size: usize, budget: &Budget, placement: Placement) -> io::Result<Sample> {
    let server = move |mut s: TcpStream| -> io::Result<()> {
        let mut buf = populated(size);
        while read_all_or_eof(&mut s, &mut buf)? {
            s.write_all(&[1])?;
        }
        Ok(())
    };
    let src = populated(size);
    let sample = with_peer(placement, server, |c| -> io::Result<Sample> {
        let mut failed: Option<io::Error> = None;
        let mut ack = [0u8; 1];
        let s = run_pipelined(
            budget,
            1,
            size as u64,
            0,
            || {
                if failed.is_some() {
                    return;
                }
                let result = src
                    .chunks(STREAM_WRITE_BYTES)
                    .try_for_each(|chunk| c.write_all(chunk))
                    .and_then(|()| c.read_exact(&mut ack));
                if let Err(e) = result {
                    failed = Some(e);
                }
            },
            |()| {},
        );
        match failed {
            Some(e) => Err(e),
            None => Ok(s),
        }
    })??;
    Ok(sample)
}

/// Raw TCP ping-pong: a request of `size` bytes, an answer of [`PONG_BYTES`]; the
/// round-trip time of each.
pub fn tcp_ping_pong(size: usize, budget: &Budget, placement: Placement) -> io::Result<Sample> {
    let server = move |mut s: TcpStream| -> io::Result<()> {
        let mut buf = populated(size);
        let pong = [7u8; PONG_BYTES];
        while read_all_or_eof(&mut s, &mut buf)? {
            s.write_all(&pong)?;
        }
        Ok(())
    };
    let ping = populated(size);
    with_peer(placement, server, |c| -> io::Result<Sample> {
        let mut failed: Option<io::Error> = None;
        let mut pong = [0u8; PONG_BYTES];
        let s = run_pipelined(
            budget,
            1,
            size as u64,
            0,
            || {
                if failed.is_none() {
                    if let Err(e) = c.write_all(&ping).and_then(|()| c.read_exact(&mut pong)) {
                        failed = Some(e);
                    }
                }
            },
            |()| {},
        );
        match failed {
            Some(e) => Err(e),
            None => Ok(s),
        }
    })?
}

/// Single-thread memcpy of `size` bytes into a pre-populated buffer. Small copies are
/// timed in batches (at least 1 MiB per timed batch) so the clock does not dominate; the
/// latency histogram holds the per-batch time divided by the batch's copies.
pub fn memcpy(size: usize, budget: &Budget) -> Sample {
    let src = populated(size);
    let mut dst = populated(size);
    let batch = (STREAM_WRITE_BYTES / size.max(1)).max(1);
    let mut sample = Sample::new();
    let mut copy_batch = || {
        for _ in 0..batch {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
    };
    let warm = Instant::now();
    while warm.elapsed() < budget.warmup {
        copy_batch();
    }
    let start = Instant::now();
    let mut batches = 0u64;
    while batches == 0 || start.elapsed() < budget.measure {
        let t0 = Instant::now();
        copy_batch();
        sample.record(t0.elapsed() / batch as u32);
        batches += 1;
    }
    sample.elapsed = start.elapsed();
    sample.ops = batches * batch as u64;
    sample.bytes = sample.ops * size as u64;
    sample
}

/// Single-thread `dst[i] += src[i]` over `size` bytes of f32 (the server's `sum` update
/// on a dense range, without the store around it), timed like [`memcpy`]: what applying
/// a push of this size costs at least, for reference.
pub fn sum_f32(size: usize, budget: &Budget) -> Sample {
    let n = size / std::mem::size_of::<f32>();
    let src = vec![0.5f32; n];
    let mut dst = vec![1.0f32; n];
    let batch = (STREAM_WRITE_BYTES / size.max(1)).max(1);
    let mut sample = Sample::new();
    let mut sum_batch = || {
        for _ in 0..batch {
            for (d, s) in dst.iter_mut().zip(std::hint::black_box(&src)) {
                *d += *s;
            }
            std::hint::black_box(&mut dst);
        }
    };
    let warm = Instant::now();
    while warm.elapsed() < budget.warmup {
        sum_batch();
    }
    let start = Instant::now();
    let mut batches = 0u64;
    while batches == 0 || start.elapsed() < budget.measure {
        let t0 = Instant::now();
        sum_batch();
        sample.record(t0.elapsed() / batch as u32);
        batches += 1;
    }
    sample.elapsed = start.elapsed();
    sample.ops = batches * batch as u64;
    sample.bytes = sample.ops * size as u64;
    sample
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tiny() -> Budget {
        Budget {
            warmup: Duration::from_millis(2),
            measure: Duration::from_millis(10),
            min_ops: 3,
            max_ops: 1000,
        }
    }

    #[test]
    fn stream_moves_whole_transfers() {
        // Not a multiple of the write size, so the last write is partial.
        let size = STREAM_WRITE_BYTES + 12_345;
        for placement in Placement::ALL {
            let s = tcp_stream(size, &tiny(), placement).unwrap();
            assert!(s.ops >= 3);
            assert_eq!(s.bytes, s.ops * size as u64);
            assert!(s.gb_per_s() > 0.0);
        }
    }

    #[test]
    fn ping_pong_round_trips() {
        for placement in Placement::ALL {
            let s = tcp_ping_pong(4096, &tiny(), placement).unwrap();
            assert!(s.ops >= 3);
            assert!(s.latency_us_p50() > 0.0);
            assert!(s.latency_us_p50() <= s.latency_us_p99());
        }
    }

    #[test]
    fn memcpy_counts_batches() {
        let s = memcpy(4096, &tiny());
        assert_eq!(s.ops % 256, 0, "4 KiB copies come in batches of 256");
        assert!(s.gb_per_s() > 0.0);
    }
}
