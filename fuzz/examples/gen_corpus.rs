//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/`: a handful of
//! small valid inputs each, made by the real encoders (the wire encoder, the codecs,
//! `Control::to_frame`, the descriptor and hello encoders). Run from the repository root
//! with `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`, then commit
//! what changed. Each file is named by a hash of its content, so a rerun with the same
//! encoders rewrites the same files.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;

use pserv_engine::keycache::ListId;
use pserv_engine::placement::Partition;
use pserv_engine::proto::{
    ClusterInfo, Control, PushRecord, ReplicaBatch, ReplicaPart, Role, ServerInfo, ValueType,
    WorkerStats,
};
use pserv_engine::update::UpdateSpec;
use pserv_engine::KeyRange;
use pserv_transport::compress::{self, Codec};
use pserv_transport::onesided::{shm, BackendKind, RegionDesc};
use pserv_transport::wire::{
    self, DType, Frame, Header, MessageKind, FLAG_CACHE_KEYS, FLAG_COMPRESSED, FLAG_KEYS_CACHED,
    FLAG_ORDERED, FLAG_RANGE, FLAG_RESPONSE,
};
use pserv_transport::{rdmapipe, shmpipe};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Vec<Vec<u8>>); 9] = [
        ("frame", frames()),
        ("compress", blocks()),
        ("control", controls().iter().map(control_body).collect()),
        (
            "replica_batch",
            batches().iter().map(control_body).collect(),
        ),
        ("onesided", descriptors()),
        ("pipe_hello", hellos()),
        ("libsvm", libsvm()),
        ("checkpoint", checkpoints()),
        ("auth", auth_exchanges()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for seed in &seeds {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            std::fs::write(dir.join(format!("seed-{:016x}", h.finish())), seed).expect("seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn header(kind: MessageKind, dtype: DType, value_len: u32, flags: u16) -> Header {
    let mut h = Header::new(kind, 7, 42);
    h.dtype = dtype as u8;
    h.value_len = value_len;
    h.flags = flags;
    h.epoch = 1;
    h
}

/// A frame whose values are one block in `codec` (what a compressing sender writes).
fn compressed(mut h: Header, keys: &[u64], values: &[u8], codec: Codec) -> Vec<u8> {
    let mut block = Vec::new();
    compress::encode(codec, values, &mut block);
    h.flags |= FLAG_COMPRESSED;
    wire::encode(&h, keys, &block)
}

fn frames() -> Vec<Vec<u8>> {
    let keys = [1u64, 5, 9, 1000];
    let vals = f32_bytes(&[1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 3.25, 8.0]);
    let zeros = vec![0u8; 4 * 2 * 64];
    let many: Vec<u64> = (0..64).map(|k| k * 3).collect();
    let push = header(MessageKind::Push, DType::F32, 2, 0);
    let mut out = vec![
        wire::encode(&push, &keys, &vals),
        wire::encode(&header(MessageKind::Pull, DType::F32, 2, 0), &keys, &[]),
        wire::encode(
            &header(MessageKind::Push, DType::F64, 1, FLAG_ORDERED),
            &[3, 4],
            &[0u8; 16],
        ),
        wire::encode(
            &header(MessageKind::PushPull, DType::F32, 2, FLAG_RANGE),
            &[100, 102],
            &vals[..16],
        ),
        wire::encode(
            &header(MessageKind::Push, DType::F32, 2, FLAG_CACHE_KEYS),
            &keys,
            &vals,
        ),
        wire::encode(
            &header(MessageKind::Push, DType::F32, 2, FLAG_KEYS_CACHED),
            &ListId::of(&keys).words(),
            &vals,
        ),
        wire::encode(
            &header(MessageKind::Pull, DType::F32, 2, FLAG_RESPONSE),
            &[],
            &vals,
        ),
        compressed(push, &many, &zeros, Codec::ZeroRuns),
        compressed(push, &many, &zeros, Codec::Lz4),
        compressed(push, &many, &zeros, Codec::Zstd { level: 1 }),
        compressed(push, &keys, &vals, Codec::None),
        compressed(
            header(MessageKind::Pull, DType::F32, 2, FLAG_RESPONSE),
            &[],
            &zeros,
            Codec::Lz4,
        ),
        compressed(
            header(MessageKind::Push, DType::F32, 2, FLAG_RANGE),
            &[0, 64],
            &zeros,
            Codec::ZeroRuns,
        ),
        compressed(
            header(MessageKind::Push, DType::F32, 2, FLAG_KEYS_CACHED),
            &ListId::of(&many).words(),
            &zeros,
            Codec::Lz4,
        ),
    ];
    let mut err = header(MessageKind::Pull, DType::Bytes, 0, FLAG_RESPONSE);
    err.status = 3;
    out.push(wire::encode(
        &err,
        &[],
        b"key 0x5 is not in this server's key range",
    ));
    // Two frames back to back, as a stream holds them.
    let two = [out[0].clone(), out[1].clone()].concat();
    out.push(two);
    out
}

fn blocks() -> Vec<Vec<u8>> {
    let text = b"pserv pserv pserv values values values 0000000000000000".to_vec();
    let sparse = f32_bytes(&[0.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 2.5, 0.0, 0.0, 0.0]);
    let mut out = Vec::new();
    for input in [&text[..], &sparse[..], &[7u8; 300][..], &[][..]] {
        for codec in [
            Codec::None,
            Codec::Lz4,
            Codec::Zstd { level: 3 },
            Codec::ZeroRuns,
        ] {
            // First byte odd: the target's limit is the frame bound.
            let mut seed = vec![1u8];
            compress::encode(codec, input, &mut seed);
            if !out.contains(&seed) {
                out.push(seed);
            }
        }
    }
    out
}

/// The values of the control frame that carries `msg`, as `Control::to_frame` makes it.
fn control_body(msg: &Control) -> Vec<u8> {
    let aligned = pserv_fuzz::Aligned::new(&msg.to_frame(0).to_bytes());
    let (frame, _) = Frame::new_checked(aligned.bytes(), usize::MAX).expect("a control frame");
    frame.values().to_vec()
}

fn controls() -> Vec<Control> {
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let table = Partition::even(3);
    vec![
        Control::Register {
            role: Role::Server,
            addr: Some(addr),
            rank: None,
            pid: 4242,
        },
        Control::Welcome {
            node_id: 9,
            rank: 1,
            cluster: Box::new(ClusterInfo {
                servers: vec![ServerInfo {
                    id: 9,
                    rank: 0,
                    addr,
                }],
                workers: 2,
                partition: table.clone(),
                value_type: ValueType::F32,
                value_len: 4,
                update: UpdateSpec::Sgd { lr: 0.1 },
                gone_workers: vec![],
                replace_workers: true,
            }),
            resume: Some(Box::new(pserv_engine::proto::Resume {
                barrier: 4,
                live: vec![0, 1],
                barrier_clock: 300,
                clock: 312,
            })),
        },
        Control::Ready,
        Control::Barrier { seq: 3, clock: 150 },
        Control::BarrierDone {
            seq: 3,
            live: vec![0, 1, 2],
            clock: 150,
        },
        Control::Replace { rank: 1, pid: 77 },
        Control::WorkerEnters {
            rank: 2,
            clock: 150,
        },
        Control::WorkerEntered { rank: 2 },
        Control::WorkerClock { rank: 1 },
        Control::WorkerClockIs {
            rank: 1,
            clock: 312,
        },
        Control::WorkerLeave { rank: 1 },
        Control::PleaseLeave,
        Control::Leaving { clock: 320 },
        Control::Shard {
            epoch: 3,
            rows: vec![(0, 100), (250, 300)],
            clock: 300,
        },
        Control::Table { partition: table },
        Control::OpenWindow {
            range: KeyRange::new(0, 1 << 20),
            host: "node-a".into(),
            offers: vec![(1, vec![1, 2, 3, 4])],
        },
        Control::Done {
            stats: WorkerStats {
                examples: 100,
                bytes_sent: 2048,
                bytes_received: 4096,
                seconds: 1.5,
                blocked_seconds: 0.25,
            },
        },
        Control::Join {
            addr,
            rank: Some(2),
            pid: 77,
        },
        Control::CompletedHere { clock: 5, epoch: 2 },
        Control::Compress {
            codec: "zstd:3".into(),
        },
        Control::Log {
            line: "worker 1: epoch 2 done".into(),
        },
        Control::ReplicaAck { seq: 11 },
    ]
}

fn batches() -> Vec<Control> {
    let w = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let s = f32_bytes(&[0.5, 0.5]);
    let keys: Vec<u8> = [5u64, 12].iter().flat_map(|k| k.to_le_bytes()).collect();
    let batch = |seq, rest: Vec<u32>, parts| Control::Replicate {
        batch: Box::new(ReplicaBatch {
            origin: 1,
            seq,
            epoch: 2,
            rest: rest.clone(),
            path: rest,
            pushes: vec![PushRecord {
                sender: 100,
                ts: 7,
                ranges: vec![KeyRange::new(0, 1 << 15)],
            }],
            parts,
        }),
    };
    vec![
        batch(
            1,
            vec![],
            vec![ReplicaPart::Keys {
                keys: keys.clone(),
                weights: w.clone(),
                state: s.clone(),
            }],
        ),
        batch(
            2,
            vec![3, 4],
            vec![ReplicaPart::Range {
                range: KeyRange::new(10, 12),
                weights: w.clone(),
                state: s.clone(),
            }],
        ),
        batch(
            3,
            vec![2],
            vec![
                ReplicaPart::Keys {
                    keys,
                    weights: w.clone(),
                    state: s.clone(),
                },
                ReplicaPart::Range {
                    range: KeyRange::new(40_000, 40_002),
                    weights: w,
                    state: s,
                },
            ],
        ),
        // A hand-off marker.
        batch(0, vec![2], vec![]),
    ]
}

fn descriptors() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        (BackendKind::Shm, b"/proc/4242/fd/9".to_vec()),
        (BackendKind::Rdma, Vec::new()),
    ]
    .into_iter()
    .map(|(kind, locator)| {
        RegionDesc {
            kind,
            region_id: 3,
            addr: 0x7f00_0000_0000,
            len: 1 << 20,
            key: 0xdead_beef,
            locator,
        }
        .encode()
    })
    .collect();
    out.extend(shm::sample_endpoints());
    out
}

fn hellos() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = shmpipe::sample_hellos()
        .iter()
        .map(|h| h.to_vec())
        .collect();
    out.extend(rdmapipe::sample_hellos().iter().map(|h| h.to_vec()));
    out.extend(rdmapipe::sample_rendezvous().iter().map(|d| d.to_vec()));
    out
}

/// Handshake-shaped inputs: a hello, a challenge, a proof and a verdict with the right
/// magics (the MACs are not the secret's: nothing made here may pass).
fn auth_exchanges() -> Vec<Vec<u8>> {
    use pserv_transport::auth::AUTH_MAGIC;
    let mut out = Vec::new();
    for (identity, code) in [(0u32, 0u32), (7, 1), (1 << 24, 2), (u32::MAX, 9)] {
        let mut b = Vec::new();
        b.extend_from_slice(&AUTH_MAGIC);
        b.extend_from_slice(&identity.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&[3u8; 32]);
        b.extend_from_slice(&AUTH_MAGIC);
        b.extend_from_slice(&[identity as u8; 64]);
        b.extend_from_slice(&[0x5a; 32]);
        b.extend_from_slice(b"PSVV");
        b.extend_from_slice(&code.to_le_bytes());
        out.push(b);
    }
    out
}

fn libsvm() -> Vec<Vec<u8>> {
    [
        "+1 1:0.5 3:1.25 10:-2\n-1 2:1 4:0.125\n",
        "1 7:1e-3 8:4 # trailing comment\n0 qid:3 7:2\n",
        "# a comment line\n\n-1.0 18446744073709551615:1\n",
        "1.0 5:1 6:2 7:3\n0.0 1:1\n+1 100:0.5\n",
        "-1 3:inf\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn checkpoints() -> Vec<Vec<u8>> {
    use pserv_engine::checkpoint::{encode_manifest, FileEntry, Manifest, ServerPart};
    let part = |keys: Vec<u64>, state_len: u32| {
        let n = keys.len();
        ServerPart {
            elem_bytes: 4,
            value_len: 1,
            state_len,
            epoch: 2,
            rank: 1,
            keys,
            weights: f32_bytes(&vec![0.5; n]),
            state: f32_bytes(&vec![0.25; n * state_len as usize]),
        }
        .encode()
    };
    let manifest = Manifest {
        version: pserv_engine::checkpoint::MANIFEST_VERSION,
        epoch: 2,
        value_type: pserv_engine::proto::ValueType::F32,
        value_len: 1,
        update: "adagrad:0.5:0.00000001".into(),
        state_len: 1,
        replicas: 1,
        partition: pserv_engine::Partition::even(2),
        job: None,
        files: vec![FileEntry {
            rank: 0,
            name: "server-0.ckpt".into(),
            bytes: 80,
            checksum: 7,
            keys: 2,
            state_len: 1,
        }],
    };
    vec![
        part(vec![1, 5, 1 << 40], 1),
        part(vec![], 0),
        part(vec![3, 4], 0),
        encode_manifest(&manifest),
    ]
}
