//! The verbs backend between real processes (feature `rdma`; the tests need a device:
//! a NIC, Soft-RoCE, or the software device of `sys/softrdma`):
//!
//! ```text
//! PSERV_RDMA_DEVICE=soft0 scripts/soft-rdma \
//!     cargo test --release -p pserv-transport --features rdma --test rdma -- --ignored
//! ```
//!
//! The owner registers regions in one process and peers attach them from others, as a
//! server and its workers do. What runs here: reads, writes and notices across
//! processes; a wrong key and a range beyond the region refused by the owner's NIC while
//! the owner goes on serving; a peer SIGKILLed in the middle of writing; an owner that
//! dies under a peer's reads (the peer gets an error, not a hang); readers in another
//! process that only accept whole states of versioned blocks.
#![cfg(feature = "rdma")]

mod common;

use std::time::{Duration, Instant};

use common::{hex, unhex, ChildProc, CHILD_WAIT, ROLE};
use pserv_transport::onesided::rdma::{RdmaBackend, RdmaConfig, RdmaLocal, RdmaPeer, RdmaRemote};
use pserv_transport::onesided::seqlock::{BlockLayout, Seqlock};
use pserv_transport::onesided::{Memory, OneSided, OneSidedError, RegionDesc};

const DEVICE: &str = "PSERV_RDMA_DEVICE";

fn backend() -> RdmaBackend {
    let device = std::env::var(DEVICE).unwrap_or_else(|_| {
        panic!("{DEVICE} is not set: name an RDMA device (e.g. soft0, rxe0) to run these")
    });
    let mut cfg = RdmaConfig {
        device: Some(device),
        ..RdmaConfig::default()
    };
    if let Ok(g) = std::env::var("PSERV_RDMA_GID_INDEX") {
        cfg.qp.gid_index = Some(g.parse().expect("PSERV_RDMA_GID_INDEX is a u8"));
    }
    RdmaBackend::new(cfg).expect("open the RDMA device")
}

/// A peer process's view: its backend, its queue pair to the owner, the owner's regions.
struct ChildEnv {
    backend: RdmaBackend,
    owner: RdmaPeer,
    descs: Vec<RegionDesc>,
}

impl ChildEnv {
    fn from_env() -> Self {
        let backend = backend();
        let (pending, ep) = backend.prepare().unwrap();
        println!("@@ ep {}", hex(&ep));
        let owner_ep = unhex(&std::env::var("PSERV_OWNER_EP").unwrap());
        let owner = backend.connect(pending, &owner_ep).unwrap();
        // Send nothing before the owner's queue pair is ready to answer (RTS): a request
        // that reaches it in RTR is still executed, but a refused one (the forgeries
        // below) would put it in the error state before the owner finishes connecting,
        // as on a real NIC.
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected", "no handshake from the owner");
        let descs = std::env::var("PSERV_DESCS")
            .unwrap()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| RegionDesc::decode(&unhex(s)).unwrap())
            .collect();
        Self {
            backend,
            owner,
            descs,
        }
    }

    fn attach(&self, i: usize) -> RdmaRemote {
        self.backend.attach(&self.owner, &self.descs[i]).unwrap()
    }
}

/// Spawn a child in `role` attaching `descs`; returns it and our connected peer for it.
fn spawn(
    owner: &RdmaBackend,
    role: &str,
    descs: &[RegionDesc],
    extra: &[(&str, String)],
) -> (ChildProc, RdmaPeer) {
    let (pending, ep) = owner.prepare().unwrap();
    let descs: Vec<String> = descs.iter().map(|d| hex(&d.encode())).collect();
    let mut env = vec![
        ("PSERV_OWNER_EP", hex(&ep)),
        ("PSERV_DESCS", descs.join(",")),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let mut child = ChildProc::spawn(role, &env);
    let child_ep = unhex(&child.expect("ep"));
    let peer = owner.connect(pending, &child_ep).unwrap();
    child.send_line("connected");
    (child, peer)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The child side of every test.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "reader_writer" => child_reader_writer(),
        "forger" => child_forger(),
        "writer_loop" => child_writer_loop(),
        "owner" => child_owner(),
        "block_reader" => child_block_reader(),
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Reads, writes, notices

const STORE: usize = 3 << 20;
const LANDING: usize = 1 << 20;

fn child_reader_writer() {
    let env = ChildEnv::from_env();
    let store = env.attach(0);
    let landing = env.attach(1);
    let mut local = env.backend.register(STORE).unwrap();
    env.backend.read(&store, 0, &mut local, 0, STORE).unwrap();
    let mut got = vec![0u8; STORE];
    local.copy_out(0, &mut got);
    println!("@@ store_hash {}", fnv(&got));
    let data = pattern(LANDING, 9);
    local.copy_in(0, &data);
    env.backend
        .write_notify(&landing, 0, &local, 0, LANDING, 7)
        .unwrap();
    println!("@@ done");
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn peers_in_other_processes_read_write_and_notify() {
    let owner = backend();
    let store = owner.register(STORE).unwrap();
    let data = pattern(STORE, 1);
    store.copy_in(0, &data);
    let landing = owner.register(LANDING).unwrap();
    let descs = [owner.describe(&store), owner.describe(&landing)];
    let (child, peer) = spawn(&owner, "reader_writer", &descs, &[]);
    assert_eq!(
        child.expect_u64("store_hash"),
        fnv(&data),
        "the peer read the store"
    );
    let n = owner
        .wait_notice(CHILD_WAIT)
        .unwrap()
        .expect("the peer's notice");
    assert_eq!((n.peer, n.imm), (owner.peer_id(&peer), 7));
    let mut got = vec![0u8; LANDING];
    landing.copy_out(0, &mut got);
    assert!(
        got == pattern(LANDING, 9),
        "the written data landed before the notice"
    );
    assert_eq!(child.expect("done"), "");
    child.finish();
}

// ---------------------------------------------------------------------------------------
// Refusals: the owner's NIC checks keys and bounds; the owner goes on.

fn child_forger() {
    let env = ChildEnv::from_env();
    let mut local = env.backend.register(4096).unwrap();
    match std::env::var("PSERV_FORGE").unwrap().as_str() {
        "key" => {
            let mut d = env.descs[0].clone();
            d.key ^= 0x5a5a;
            let remote = env.backend.attach(&env.owner, &d).unwrap();
            let e = env.backend.read(&remote, 0, &mut local, 0, 64).unwrap_err();
            println!("@@ refused {}", matches!(e, OneSidedError::WrongKey { .. }));
            println!("@@ error {e}");
        }
        "range" => {
            // A descriptor that claims more than the owner registered: the local check
            // passes, the owner's NIC refuses.
            let mut d = env.descs[0].clone();
            d.len += 1 << 20;
            let remote = env.backend.attach(&env.owner, &d).unwrap();
            let e = env
                .backend
                .read(&remote, d.len as usize - 4096, &mut local, 0, 4096)
                .unwrap_err();
            println!("@@ refused {}", matches!(e, OneSidedError::WrongKey { .. }));
            println!("@@ error {e}");
        }
        other => panic!("unknown forgery {other}"),
    }
    // The queue pair is in the error state now and says so.
    let remote = env.attach(0);
    let e = env.backend.read(&remote, 0, &mut local, 0, 64).unwrap_err();
    println!("@@ after {}", e.to_string().contains("broken"));
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn a_wrong_key_and_a_range_beyond_the_region_are_refused_and_the_owner_goes_on() {
    let owner = backend();
    let store = owner.register(1 << 16).unwrap();
    let data = pattern(1 << 16, 3);
    store.copy_in(0, &data);
    let landing = owner.register(LANDING).unwrap();
    for forgery in ["key", "range"] {
        let (child, _peer) = spawn(
            &owner,
            "forger",
            &[owner.describe(&store)],
            &[("PSERV_FORGE", forgery.into())],
        );
        assert_eq!(child.expect("refused"), "true", "{forgery}");
        let e = child.expect("error");
        assert!(e.contains("key") || e.contains("refused"), "{forgery}: {e}");
        assert_eq!(child.expect("after"), "true", "{forgery}");
        child.finish();
    }
    // The store is untouched, and the next peer is served.
    let mut got = vec![0u8; 1 << 16];
    store.copy_out(0, &mut got);
    assert!(got == data);
    let big = owner.register(STORE).unwrap();
    big.copy_in(0, &pattern(STORE, 1));
    let (child, peer) = spawn(
        &owner,
        "reader_writer",
        &[owner.describe(&big), owner.describe(&landing)],
        &[],
    );
    assert_eq!(child.expect_u64("store_hash"), fnv(&pattern(STORE, 1)));
    let n = owner.wait_notice(CHILD_WAIT).unwrap().unwrap();
    assert_eq!((n.peer, n.imm), (owner.peer_id(&peer), 7));
    child.finish();
}

// ---------------------------------------------------------------------------------------
// A peer killed in the middle of writing.

fn child_writer_loop() {
    let env = ChildEnv::from_env();
    let landing = env.attach(0);
    let local = env.backend.register(LANDING).unwrap();
    let mut i = 0u32;
    loop {
        local.copy_in(0, &vec![(i % 251) as u8; LANDING]);
        env.backend
            .write_notify(&landing, 0, &local, 0, LANDING, i)
            .unwrap();
        if i == 3 {
            println!("@@ writing");
        }
        i += 1;
    }
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn a_peer_killed_mid_write_leaves_the_owner_serving() {
    let owner = backend();
    let store = owner.register(STORE).unwrap();
    store.copy_in(0, &pattern(STORE, 1));
    let landing = owner.register(LANDING).unwrap();
    let (child, _peer) = spawn(&owner, "writer_loop", &[owner.describe(&landing)], &[]);
    child.expect("writing");
    std::thread::sleep(Duration::from_millis(20));
    let st = std::process::Command::new("kill")
        .args(["-KILL", &child.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    drop(child);
    // What the dead peer had sent may still be arriving (as packets on a wire would);
    // then nothing more lands, and the notices that came are in order.
    let mut a = vec![0u8; LANDING];
    let mut b = vec![0u8; LANDING];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    let drain = |last: &mut Option<u32>| {
        while let Some(n) = owner.poll_notice().unwrap() {
            if let Some(l) = *last {
                assert_eq!(n.imm, l + 1, "notices in order");
            }
            *last = Some(n.imm);
        }
    };
    loop {
        drain(&mut last);
        landing.copy_out(0, &mut a);
        std::thread::sleep(Duration::from_millis(50));
        landing.copy_out(0, &mut b);
        if a == b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "data still landing 10 s after the peer died"
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    drain(&mut last);
    landing.copy_out(0, &mut b);
    assert!(
        a == b,
        "nothing lands once what the dead peer sent has arrived"
    );
    // The owner's memory is intact and a new peer is served.
    let (child, peer) = spawn(
        &owner,
        "reader_writer",
        &[owner.describe(&store), owner.describe(&landing)],
        &[],
    );
    assert_eq!(child.expect_u64("store_hash"), fnv(&pattern(STORE, 1)));
    let n = loop {
        let n = owner.wait_notice(CHILD_WAIT).unwrap().unwrap();
        if n.peer == owner.peer_id(&peer) {
            break n;
        }
    };
    assert_eq!(n.imm, 7);
    landing.copy_out(0, &mut a);
    assert!(a == pattern(LANDING, 9));
    child.finish();
}

// ---------------------------------------------------------------------------------------
// An owner that dies under its peer.

fn child_owner() {
    let owner = backend();
    let store = owner.register(STORE).unwrap();
    store.copy_in(0, &pattern(STORE, 5));
    println!("@@ desc {}", hex(&owner.describe(&store).encode()));
    let (pending, ep) = owner.prepare().unwrap();
    println!("@@ ep {}", hex(&ep));
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let _peer = owner.connect(pending, &unhex(line.trim())).unwrap();
    println!("@@ connected");
    std::thread::sleep(CHILD_WAIT);
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn an_owner_that_dies_fails_its_peers_reads_instead_of_hanging() {
    let mut child = ChildProc::spawn("owner", &[]);
    let desc = RegionDesc::decode(&unhex(&child.expect("desc"))).unwrap();
    let owner_ep = unhex(&child.expect("ep"));
    let me = backend();
    let (pending, ep) = me.prepare().unwrap();
    let to_owner = me.connect(pending, &owner_ep).unwrap();
    child.send_line(&hex(&ep));
    child.expect("connected");
    let remote = me.attach(&to_owner, &desc).unwrap();
    let mut local: RdmaLocal = me.register(STORE).unwrap();
    me.read(&remote, 0, &mut local, 0, STORE).unwrap();
    let mut got = vec![0u8; STORE];
    local.copy_out(0, &mut got);
    assert!(got == pattern(STORE, 5));
    let st = std::process::Command::new("kill")
        .args(["-KILL", &child.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    drop(child);
    // The next read fails with the transport's own timeout (about 8 x 67 ms with the
    // default settings), well before the backend's operation timeout.
    let t0 = Instant::now();
    let e = me.read(&remote, 0, &mut local, 0, 4096).unwrap_err();
    let waited = t0.elapsed();
    eprintln!("read from a dead owner: {e} after {waited:?}");
    assert!(
        e.to_string().contains("retry counter exceeded"),
        "the NIC gave up: {e}"
    );
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    let e = me.read(&remote, 0, &mut local, 0, 4096).unwrap_err();
    assert!(e.to_string().contains("broken"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Versioned blocks read by RDMA READ from another process while the owner writes.

const PAYLOAD: usize = 8192;
const BLOCKS: usize = 4;

fn layout() -> BlockLayout {
    BlockLayout::new(PAYLOAD, BLOCKS)
}

fn child_block_reader() {
    let env = ChildEnv::from_env();
    let remote = env.attach(0);
    let layout = layout();
    let mut local = env.backend.register(layout.physical_len()).unwrap();
    let mut phys = vec![0u8; layout.physical_len()];
    let mut block = vec![0u8; PAYLOAD];
    let (mut ok, mut torn, mut max_k) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        // One READ of every block, then each block judged on its own versions.
        env.backend
            .read(&remote, 0, &mut local, 0, layout.physical_len())
            .unwrap();
        local.copy_out(0, &mut phys);
        for b in 0..BLOCKS {
            let span = layout.physical_span(b * PAYLOAD, PAYLOAD).unwrap();
            match layout.validate_copied(b, &phys[span.clone()]) {
                Ok(_) => {
                    layout.extract(b, &phys[span], b * PAYLOAD, &mut block);
                    let k = u64::from_le_bytes(block[..8].try_into().unwrap());
                    assert!(
                        block
                            .chunks_exact(8)
                            .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == k),
                        "block {b} was accepted holding two states"
                    );
                    max_k = max_k.max(k);
                    ok += 1;
                }
                Err(OneSidedError::Torn { .. }) => torn += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }
    println!("@@ ok {ok}");
    println!("@@ torn {torn}");
    println!("@@ max_k {max_k}");
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn readers_in_another_process_accept_only_whole_block_states() {
    let owner = backend();
    let layout = layout();
    let store = owner.register(layout.physical_len()).unwrap();
    let lock = Seqlock::new(layout, &store).unwrap();
    let (child, _peer) = spawn(&owner, "block_reader", &[owner.describe(&store)], &[]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let writes = std::thread::scope(|s| {
        let w = s.spawn(|| {
            let mut k = 0u64;
            let mut state = vec![0u8; PAYLOAD];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                for w in state.chunks_exact_mut(8) {
                    w.copy_from_slice(&k.to_le_bytes());
                }
                for b in 0..BLOCKS {
                    lock.write(b * PAYLOAD, &state).unwrap();
                }
                // Gaps of varying length (often none), so that reads meet both quiet
                // blocks and blocks mid-update.
                if k.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(k % 7 * 50));
                }
            }
            k
        });
        let ok = child.expect_u64("ok");
        let torn = child.expect_u64("torn");
        let max_k = child.expect_u64("max_k");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let k = w.join().unwrap();
        eprintln!("{k} writes; the reader accepted {ok} blocks and refused {torn} torn ones");
        assert!(ok > 0, "the reader never got a whole state");
        assert!(max_k <= k);
        k
    });
    assert!(writes > 100, "the writer barely ran");
    child.finish();
}
