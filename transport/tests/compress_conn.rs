//! Value compression over real loopback connections: round trips of compressible and
//! incompressible values in every codec (what the handler sees is what was sent), the
//! counters, the server mirroring a client's codec, compressed range and cached-key
//! frames, and hostile compressed frames that must close only their own connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use pserv_transport::compress::{self, Codec};
use pserv_transport::tcp::{Stats, COMPRESS_MIN_BYTES};
use pserv_transport::wire::{
    self, DType, Header, MessageKind, FLAG_COMPRESSED, FLAG_KEYS_CACHED, FLAG_RANGE, FLAG_RESPONSE,
};
use pserv_transport::{
    CloseReason, Conn, Handler, OutFrame, Payload, RecvFrame, TcpConfig, TcpTransport,
};

const WAIT: Duration = Duration::from_secs(20);

/// A frame as a handler saw it, with the codec its connection had by then.
struct Seen {
    codec: Codec,
    owned: bool,
    header: Header,
    keys: Vec<u64>,
    values: Vec<u8>,
}

/// Records every frame (and every close); echoes it back flagged as a response if asked.
struct Record {
    frames: Sender<Seen>,
    closes: Sender<String>,
    echo: bool,
}

impl Handler for Record {
    fn on_frame(&mut self, conn: &Conn, frame: RecvFrame<'_>) {
        let owned = matches!(frame, RecvFrame::Owned(_));
        let f = frame.frame();
        let seen = Seen {
            codec: conn.codec(),
            owned,
            header: *f.header(),
            keys: f.keys().to_vec(),
            values: f.values().to_vec(),
        };
        if self.echo {
            let mut h = *f.header();
            h.flags |= FLAG_RESPONSE;
            let out = OutFrame::new(
                h,
                Payload::copy_from(bytemuck::cast_slice(f.keys())),
                Payload::copy_from(f.values()),
            );
            let _ = conn.send(out);
        }
        let _ = self.frames.send(seen);
    }

    fn on_close(&mut self, _conn: &Conn, reason: &CloseReason) {
        let _ = self.closes.send(reason.to_string());
    }
}

struct Node {
    t: TcpTransport,
    frames: Receiver<Seen>,
    closes: Receiver<String>,
}

impl Node {
    fn start(echo: bool, mirror_codec: bool) -> Node {
        let (ftx, frames) = unbounded();
        let (ctx, closes) = unbounded();
        let cfg = TcpConfig {
            threads: 2,
            pin_cores: false,
            mirror_codec,
            ..TcpConfig::default()
        };
        let t = TcpTransport::start(cfg, |_| Record {
            frames: ftx.clone(),
            closes: ctx.clone(),
            echo,
        })
        .unwrap();
        Node { t, frames, closes }
    }

    fn listen(&self) -> SocketAddr {
        self.t.listen("127.0.0.1:0").unwrap()
    }

    fn next(&self) -> Seen {
        self.frames.recv_timeout(WAIT).expect("a frame")
    }
}

/// The six compression counters, to compare before and after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    raw_out: u64,
    wire_out: u64,
    frames_out: u64,
    wire_in: u64,
    raw_in: u64,
    frames_in: u64,
}

fn counts(s: &Stats) -> Counts {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Counts {
        raw_out: l(&s.values_raw_out),
        wire_out: l(&s.values_wire_out),
        frames_out: l(&s.frames_compressed_out),
        wire_in: l(&s.values_wire_in),
        raw_in: l(&s.values_raw_in),
        frames_in: l(&s.frames_compressed_in),
    }
}

fn delta(after: Counts, before: Counts) -> Counts {
    Counts {
        raw_out: after.raw_out - before.raw_out,
        wire_out: after.wire_out - before.wire_out,
        frames_out: after.frames_out - before.frames_out,
        wire_in: after.wire_in - before.wire_in,
        raw_in: after.raw_in - before.raw_in,
        frames_in: after.frames_in - before.frames_in,
    }
}

/// splitmix64: reproducible values without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn data_header(kind: MessageKind, ts: u64, dtype: DType, value_len: u32) -> Header {
    let mut h = Header::new(kind, 3, ts);
    h.dtype = dtype as u8;
    h.value_len = value_len;
    h.epoch = 11;
    h.clock = ts * 10;
    h.func = 5;
    h
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// Sends `frame` on `conn`, waits for `server` to see it, and checks that the handler saw
/// exactly what was sent and that both sides counted what compression should have done.
/// Returns whether the frame went compressed.
fn send_and_check(
    client: &TcpTransport,
    conn: &Conn,
    server: &Node,
    header: Header,
    keys: Vec<u64>,
    values: Vec<u8>,
) -> bool {
    let frame = OutFrame::new(
        header,
        Payload::owned(keys.clone()),
        Payload::owned(values.clone()),
    );
    let sent = *frame.header();
    let h = sent;
    // The values the receiver expects: those of the keys, the range, or the cached list.
    let n = if h.has(FLAG_KEYS_CACHED) {
        keys[2]
    } else if h.has(FLAG_RANGE) {
        keys[1] - keys[0]
    } else {
        keys.len() as u64
    };
    let elem = h.value_type().map_or(1, DType::size) as u64;
    let candidate = conn.codec() != Codec::None
        && matches!(h.value_type(), Some(DType::F32 | DType::F64))
        && h.status == 0
        && values.len() >= COMPRESS_MIN_BYTES
        // Keyless frames (answers) decode to what their block claims.
        && ((keys.is_empty() && !h.has(FLAG_RANGE) && !h.has(FLAG_KEYS_CACHED))
            || n * u64::from(h.value_len) * elem == values.len() as u64);
    let mut block = Vec::new();
    let enc = compress::encode(conn.codec(), &values, &mut block);
    let compressed = candidate && enc.compressed();
    let (c0, s0) = (counts(client.stats()), counts(server.t.stats()));
    conn.send(frame).unwrap();
    let seen = server.next();
    assert_eq!(seen.header, sent, "the handler sees the header as sent");
    assert!(!seen.header.has(FLAG_COMPRESSED));
    assert_eq!(seen.keys, keys);
    assert!(seen.values == values, "values differ");
    if compressed {
        assert!(seen.owned, "a decompressed frame is handed over owned");
    }
    let (c, s) = (
        delta(counts(client.stats()), c0),
        delta(counts(server.t.stats()), s0),
    );
    let n = values.len() as u64;
    let wire = enc.bytes_out as u64;
    let want_client = match (candidate, compressed) {
        (false, _) => Counts::default(),
        (true, false) => Counts {
            raw_out: n,
            wire_out: n,
            ..Counts::default()
        },
        (true, true) => Counts {
            raw_out: n,
            wire_out: wire,
            frames_out: 1,
            ..Counts::default()
        },
    };
    assert_eq!(c, want_client, "client counters ({} {})", conn.codec(), n);
    let want_server = if compressed {
        Counts {
            wire_in: wire,
            raw_in: n,
            frames_in: 1,
            ..Counts::default()
        }
    } else {
        Counts::default()
    };
    assert_eq!(s, want_server, "server counters ({} {})", conn.codec(), n);
    compressed
}

#[test]
fn every_codec_round_trips_compressible_and_incompressible_values() {
    let server = Node::start(false, true);
    let addr = server.listen();
    let client = Node::start(false, true);
    let mut rng = Rng(7);
    let codecs = [
        Codec::Lz4,
        Codec::Zstd { level: 3 },
        Codec::Zstd { level: -3 },
        Codec::ZeroRuns,
    ];
    for (ci, codec) in codecs.into_iter().enumerate() {
        let conn = client.t.connect(addr, WAIT).unwrap();
        conn.set_codec(codec);
        assert_eq!(conn.codec(), codec);
        let ts = |i: u64| (ci as u64) << 32 | i;
        let keys = |n: u64| (0..n).map(|k| k * 5 + 1).collect::<Vec<u64>>();
        let f32h = |i, vl| data_header(MessageKind::Push, ts(i), DType::F32, vl);

        // Zeros: every codec compresses them.
        let zeros = f32_bytes(std::iter::repeat_n(0.0, 4000));
        assert!(send_and_check(
            &client.t,
            &conn,
            &server,
            f32h(1, 4),
            keys(1000),
            zeros
        ));

        // A repeated pattern (no zero in it): LZ4 and zstd compress it; zero runs cannot.
        let repeated = f32_bytes((0..4000).map(|i| (i % 7 + 1) as f32 * 0.25));
        let went = send_and_check(&client.t, &conn, &server, f32h(2, 4), keys(1000), repeated);
        assert_eq!(
            went,
            codec != Codec::ZeroRuns,
            "{codec} on a repeated pattern"
        );

        // Random bits: nothing pays, the frame goes raw.
        let random: Vec<u8> = (0..4000)
            .flat_map(|_| (rng.next_u64() as u32).to_le_bytes())
            .collect();
        let went = send_and_check(&client.t, &conn, &server, f32h(3, 4), keys(1000), random);
        assert!(!went, "{codec} compressed random bits");
        // Random gradients in [-1, 1): their exponent bytes repeat, so zstd may win a
        // little; whatever `encode` says is what must happen.
        let gradients = f32_bytes((0..4000).map(|_| rng.unit() as f32));
        send_and_check(
            &client.t,
            &conn,
            &server,
            f32h(10, 4),
            keys(1000),
            gradients,
        );

        // Below the minimum: not even tried.
        let small = f32_bytes(std::iter::repeat_n(0.0, COMPRESS_MIN_BYTES / 4 - 1));
        let n = small.len() as u64 / 4;
        assert!(!send_and_check(
            &client.t,
            &conn,
            &server,
            f32h(4, 1),
            keys(n),
            small
        ));

        // f64 values, 90% zero, large enough that the block is read as a large frame.
        let sparse: Vec<u8> = (0..(1 << 18))
            .flat_map(|_| {
                let x = rng.unit();
                (if x.abs() < 0.9 { 0.0 } else { x }).to_le_bytes()
            })
            .collect();
        let h = data_header(MessageKind::PushPull, ts(5), DType::F64, 2);
        assert!(send_and_check(
            &client.t,
            &conn,
            &server,
            h,
            keys(1 << 17),
            sparse
        ));

        // 4 MiB of f32, every other one zero: in zero runs, a block over 1 MiB, which the
        // connection's loop writes (whether the others pay, the helper asks `encode`).
        let half: Vec<u8> = f32_bytes((0..(1 << 20)).map(|i| {
            let x = rng.unit() as f32;
            if i % 2 == 0 {
                0.0
            } else {
                x
            }
        }));
        let went = send_and_check(&client.t, &conn, &server, f32h(6, 4), keys(1 << 18), half);
        assert!(went || codec != Codec::ZeroRuns);

        // Control bytes and error answers are never compressed.
        let mut bytes = data_header(MessageKind::Control, ts(7), DType::Bytes, 0);
        bytes.func = 1;
        assert!(!send_and_check(
            &client.t,
            &conn,
            &server,
            bytes,
            vec![],
            vec![0; 4096]
        ));
        let mut error = f32h(8, 4);
        error.status = 3;
        let zeros = f32_bytes(std::iter::repeat_n(0.0, 400));
        assert!(!send_and_check(
            &client.t,
            &conn,
            &server,
            error,
            keys(100),
            zeros
        ));

        // A frame without keys (an answer: the requester knows its keys) is compressed,
        // and decodes to the length its block claims.
        let zeros = f32_bytes(std::iter::repeat_n(0.0, 400));
        assert!(send_and_check(
            &client.t,
            &conn,
            &server,
            f32h(9, 4),
            vec![],
            zeros
        ));
        conn.close();
    }
}

#[test]
fn the_server_answers_compressed_only_after_the_client_compressed() {
    let server = Node::start(true, true);
    let addr = server.listen();
    let client = Node::start(false, true);
    let zeros = || f32_bytes(std::iter::repeat_n(0.0, 2048));
    let keys: Vec<u64> = (0..512).collect();
    let push = |ts| {
        OutFrame::new(
            data_header(MessageKind::PushPull, ts, DType::F32, 4),
            Payload::owned(keys.clone()),
            Payload::owned(zeros()),
        )
    };

    let conn = client.t.connect(addr, WAIT).unwrap();
    let plain = client.t.connect(addr, WAIT).unwrap();
    // Before the client compresses, the server answers raw.
    conn.send(push(1)).unwrap();
    let at_server = server.next();
    assert_eq!(at_server.codec, Codec::None);
    let answer = client.next();
    assert_eq!(answer.header.timestamp, 1);
    assert!(answer.header.has(FLAG_RESPONSE));
    assert_eq!(counts(client.t.stats()).frames_in, 0);
    assert_eq!(counts(server.t.stats()).frames_out, 0);

    // The client compresses: the server decodes, takes its codec, answers compressed.
    conn.set_codec(Codec::Lz4);
    conn.send(push(2)).unwrap();
    let at_server = server.next();
    assert_eq!(
        at_server.codec,
        Codec::Lz4,
        "mirrored before the handler ran"
    );
    let answer = client.next();
    assert_eq!(answer.header.timestamp, 2);
    assert!(answer.values == zeros());
    assert!(answer.owned);
    let (c, s) = (counts(client.t.stats()), counts(server.t.stats()));
    assert_eq!((c.frames_out, c.frames_in), (1, 1));
    assert_eq!((s.frames_in, s.frames_out), (1, 1));

    // Per connection: the other connection, which never compressed, still gets raw.
    plain.send(push(3)).unwrap();
    assert_eq!(server.next().codec, Codec::None);
    assert_eq!(client.next().header.timestamp, 3);
    assert_eq!(counts(client.t.stats()).frames_in, 1);

    // zstd is mirrored at the default level (blocks do not carry theirs).
    let z = client.t.connect(addr, WAIT).unwrap();
    z.set_codec(Codec::Zstd { level: 9 });
    z.send(push(4)).unwrap();
    assert_eq!(
        server.next().codec,
        Codec::Zstd {
            level: compress::ZSTD_DEFAULT_LEVEL
        }
    );
    assert_eq!(client.next().header.timestamp, 4);
    assert_eq!(counts(client.t.stats()).frames_in, 2);

    // Without mirroring, a server decodes compressed frames but answers raw.
    let quiet = Node::start(true, false);
    let qaddr = quiet.listen();
    let q = client.t.connect(qaddr, WAIT).unwrap();
    q.set_codec(Codec::ZeroRuns);
    q.send(push(5)).unwrap();
    assert_eq!(quiet.next().codec, Codec::None);
    assert_eq!(counts(quiet.t.stats()).frames_in, 1);
    let answer = client.next();
    assert_eq!(answer.header.timestamp, 5);
    assert!(answer.values == zeros());
    assert_eq!(counts(client.t.stats()).frames_in, 2);
    assert_eq!(counts(quiet.t.stats()).frames_out, 0);
}

#[test]
fn compressed_range_and_cached_key_frames_decode_to_their_length() {
    let server = Node::start(false, true);
    let addr = server.listen();
    let client = Node::start(false, true);
    let conn = client.t.connect(addr, WAIT).unwrap();
    conn.set_codec(Codec::Zstd { level: 1 });

    let mut cached = data_header(MessageKind::Push, 1, DType::F32, 2);
    cached.flags = FLAG_KEYS_CACHED;
    let values = f32_bytes((0..1000).map(|i| if i % 10 == 0 { i as f32 } else { 0.0 }));
    let went = send_and_check(
        &client.t,
        &conn,
        &server,
        cached,
        vec![0xabc, 0xdef, 500],
        values,
    );
    assert!(went);

    let mut range = data_header(MessageKind::PushPull, 2, DType::F64, 3);
    range.flags = FLAG_RANGE | FLAG_RESPONSE;
    let values: Vec<u8> = (0..900)
        .flat_map(|i| (if i % 3 == 0 { 1.5f64 } else { 0.0 }).to_le_bytes())
        .collect();
    assert!(send_and_check(
        &client.t,
        &conn,
        &server,
        range,
        vec![1000, 1300],
        values
    ));

    // A range frame whose values do not fit its range goes out raw, and is refused as
    // any such frame is.
    let before = counts(client.t.stats());
    let bad = OutFrame::new(
        range,
        Payload::owned(vec![1000u64, 1299]),
        Payload::owned(vec![0u8; 900 * 8]),
    );
    conn.send(bad).unwrap();
    let reason = server.closes.recv_timeout(WAIT).unwrap();
    assert!(
        reason.contains("malformed frame") && reason.contains("do not match"),
        "{reason}"
    );
    assert_eq!(
        counts(client.t.stats()),
        before,
        "not a compression candidate"
    );
}

/// A push of 2 keys x 4 f32 (32 bytes of values) whose value section is `block`.
fn hostile(block: &[u8]) -> Vec<u8> {
    let mut h = data_header(MessageKind::Push, 9, DType::F32, 4);
    h.flags = FLAG_COMPRESSED;
    wire::encode(&h, &[1, 2], block)
}

fn block(tag: u8, claimed: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&claimed.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

#[test]
fn hostile_compressed_frames_close_only_their_connection() {
    let server = Node::start(true, true);
    let addr = server.listen();
    let client = Node::start(false, true);
    let good = client.t.connect(addr, WAIT).unwrap();
    good.set_codec(Codec::Lz4);
    let ping = |ts| {
        OutFrame::new(
            data_header(MessageKind::Push, ts, DType::F32, 1),
            Payload::owned((0..100u64).collect::<Vec<_>>()),
            Payload::owned(vec![0.0f32; 100]),
        )
    };
    good.send(ping(1)).unwrap();
    server.next();
    assert_eq!(client.next().header.timestamp, 1);

    let mut lz4_short = Vec::new();
    compress::encode(Codec::Lz4, &[0u8; 16], &mut lz4_short);
    let mut lz4_32 = Vec::new();
    compress::encode(Codec::Lz4, &[0u8; 32], &mut lz4_32);
    let mut wrong_cut = lz4_32.clone();
    wrong_cut.pop();
    let mut range_overflow = data_header(MessageKind::Push, 9, DType::F32, u32::MAX);
    range_overflow.flags = FLAG_COMPRESSED | FLAG_RANGE;
    let mut range_huge = data_header(MessageKind::Push, 9, DType::F32, 1);
    range_huge.flags = FLAG_COMPRESSED | FLAG_RANGE;
    let mut cached_overflow = data_header(MessageKind::Push, 9, DType::F64, 2);
    cached_overflow.flags = FLAG_COMPRESSED | FLAG_KEYS_CACHED;
    let mut keyless = data_header(MessageKind::Pull, 9, DType::F32, 1);
    keyless.flags = FLAG_COMPRESSED | wire::FLAG_RESPONSE;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a bomb in a keyless answer",
            wire::encode(&keyless, &[], &block(1, 1 << 40, &[0x1f, 0, 1, 0xff, 0xff])),
            "more than the limit",
        ),
        (
            "a bomb",
            hostile(&block(1, 1 << 40, &[0x1f, 0, 1, 0xff, 0xff])),
            "1099511627776",
        ),
        (
            "a zero-runs bomb",
            hostile(&block(3, u64::MAX, &[0xff; 10])),
            "more than the limit of 32",
        ),
        (
            "an unknown tag",
            hostile(&block(7, 32, &[0; 8])),
            "unknown codec tag 7",
        ),
        (
            "a truncated header",
            hostile(&[1, 32, 0]),
            "truncated block",
        ),
        (
            "garbage lz4",
            hostile(&block(1, 32, &[0xf0, 0xf0, 0xf0, 1, 2, 3])),
            "does not decode",
        ),
        (
            "garbage zstd",
            hostile(&block(2, 32, &[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 9, 9, 9])),
            "malformed compressed frame",
        ),
        (
            "the wrong length",
            hostile(&lz4_short),
            "holds 16 bytes, the header calls for 32",
        ),
        ("a cut block", hostile(&wrong_cut), "value block"),
        (
            "zero runs past the end",
            hostile(&block(3, 32, &[9, 0])),
            "does not decode",
        ),
        (
            "a range whose values overflow",
            wire::encode(&range_overflow, &[0, u64::MAX], &lz4_32),
            "do not fit in 64 bits",
        ),
        (
            "a range decoding past the frame limit",
            wire::encode(&range_huge, &[0, 1 << 40], &lz4_32),
            "exceeds the maximum",
        ),
        (
            "a cached list whose values overflow",
            wire::encode(&cached_overflow, &[1, 2, u64::MAX / 4], &lz4_32),
            "do not fit in 64 bits",
        ),
    ];
    for (what, bytes, expect) in cases {
        let mut raw = TcpStream::connect(addr).unwrap();
        raw.write_all(&bytes).unwrap();
        let reason = server.closes.recv_timeout(WAIT).unwrap();
        assert!(
            reason.contains("malformed compressed frame") && reason.contains(expect),
            "{what}: {reason}"
        );
        // The server closed the socket: the peer reads its end.
        raw.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(raw.read(&mut buf), Ok(0) | Err(_)),
            "{what}: still open"
        );
        // Nothing of it reached the handler.
        assert!(server.frames.try_recv().is_err(), "{what} was delivered");
    }
    assert_eq!(counts(server.t.stats()).frames_in, 1);

    // A well-formed compressed frame on a raw socket is served.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.write_all(&hostile(&lz4_32)).unwrap();
    let seen = server.next();
    assert_eq!(seen.values, vec![0u8; 32]);
    assert_eq!(seen.header.value_bytes, 32);
    assert_eq!(seen.codec, Codec::Lz4, "mirrored from a raw peer too");

    // The good connection is still served, compressed both ways.
    good.send(ping(2)).unwrap();
    server.next();
    let answer = client.next();
    assert_eq!(answer.header.timestamp, 2);
    assert!(answer.values == vec![0u8; 400]);
    assert!(!good.is_closed());
    assert_eq!(counts(client.t.stats()).frames_in, 2);
}

#[test]
fn compressing_senders_on_many_threads_keep_their_order() {
    let server = Node::start(true, true);
    let addr = server.listen();
    let client = Node::start(false, true);
    let conn = client.t.connect(addr, WAIT).unwrap();
    conn.set_codec(Codec::Zstd { level: 1 });
    let threads = 3u64;
    let per = 200u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let conn = conn.clone();
            s.spawn(move || {
                for i in 0..per {
                    let ts = t << 32 | i;
                    let values: Vec<f32> = (0..512)
                        .map(|k| if k % 8 == 0 { (ts + k) as f32 } else { 0.0 })
                        .collect();
                    let f = OutFrame::new(
                        data_header(MessageKind::Push, ts, DType::F32, 2),
                        Payload::owned((0..256u64).collect::<Vec<_>>()),
                        Payload::owned(values),
                    );
                    conn.send(f).unwrap();
                }
            });
        }
    });
    let mut next = vec![0u64; threads as usize];
    for _ in 0..threads * per {
        let answer = client.next();
        let ts = answer.header.timestamp;
        let (t, i) = (ts >> 32, ts & 0xffff_ffff);
        assert_eq!(i, next[t as usize], "thread {t}'s frames out of order");
        next[t as usize] += 1;
        let v: &[f32] = bytemuck::cast_slice(&answer.values);
        assert_eq!(v.len(), 512);
        assert_eq!(v[8], (ts + 8) as f32);
        assert_eq!(v[9], 0.0);
    }
    for _ in 0..threads * per {
        server.next();
    }
    let (c, s) = (counts(client.t.stats()), counts(server.t.stats()));
    assert_eq!(c.frames_out, threads * per);
    assert_eq!(s.frames_in, threads * per);
    assert_eq!(
        s.frames_out,
        threads * per,
        "the server answered compressed"
    );
    assert_eq!(c.frames_in, threads * per);
    assert!(c.wire_out * 3 < c.raw_out, "{c:?}");
}
