//! One-sided access over shared memory between real processes.
//!
//! Peer processes are this test binary run again (`--exact child_entry`) with
//! `PSERV_ONESIDED_ROLE` set; `child_entry` does nothing without it. Children print
//! `@@ <key> <value>` lines that the parent reads; every child is killed when its handle
//! drops, so a failing test leaves no process behind.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{hex, unhex, ChildProc, CHILD_WAIT, ROLE};

use pserv_transport::onesided::seqlock::{BlockLayout, Seqlock};
use pserv_transport::onesided::shm::{ShmBackend, ShmLocal, ShmPeer, ShmRemote};
use pserv_transport::onesided::{Memory, OneSided, OneSidedError, RegionDesc};

/// What a child reads from its environment: the owner's endpoint and descriptors.
struct ChildEnv {
    backend: ShmBackend,
    owner: ShmPeer,
    descs: Vec<RegionDesc>,
}

impl ChildEnv {
    fn from_env() -> Self {
        let backend = ShmBackend::new().unwrap();
        let (pending, ep) = backend.prepare().unwrap();
        // The owner may want to know us (to accept our notices): tell it first.
        println!("@@ ep {}", hex(&ep));
        let owner_ep = unhex(&std::env::var("PSERV_OWNER_EP").unwrap());
        let owner = backend.connect(pending, &owner_ep).unwrap();
        // Stay alive (our ring open) until the owner has mapped our ring too.
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

    fn attach(&self, i: usize) -> ShmRemote {
        self.backend.attach(&self.owner, &self.descs[i]).unwrap()
    }
}

/// The owner side of a test: a backend and the pending half for one child.
struct Owner {
    backend: ShmBackend,
}

impl Owner {
    fn new() -> Self {
        Self {
            backend: ShmBackend::new().unwrap(),
        }
    }

    /// Spawn a child in `role` that attaches `regions`; returns it and, once the child
    /// sent its endpoint, our peer for it (notices from it are accepted from then on).
    fn spawn(
        &self,
        role: &str,
        regions: &[&ShmLocal],
        extra: &[(&str, String)],
    ) -> (ChildProc, ShmPeer) {
        let (pending, ep) = self.backend.prepare().unwrap();
        let descs: Vec<String> = regions
            .iter()
            .map(|r| hex(&self.backend.describe(r).encode()))
            .collect();
        let mut env = vec![
            ("PSERV_OWNER_EP", hex(&ep)),
            ("PSERV_DESCS", descs.join(",")),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let mut child = ChildProc::spawn(role, &env);
        let child_ep = unhex(&child.expect("ep"));
        let peer = self.backend.connect(pending, &child_ep).unwrap();
        child.send_line("connected");
        (child, peer)
    }
}

/// Words of one whole-block state: all equal. Returns k, or panics naming the tear.
fn uniform_state(payload: &[u8], who: &str) -> u64 {
    let k = u64::from_le_bytes(payload[..8].try_into().unwrap());
    for (i, w) in payload.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        assert_eq!(
            v, k,
            "{who}: torn state accepted: word {i} is {v}, word 0 is {k}"
        );
    }
    k
}

/// Rounds of a tiny xorshift, for writer pacing.
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The child side of every test.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "stress_reader" => child_stress_reader(),
        "hog" => child_hog(),
        "pusher" => child_pusher(),
        "notifier" => child_notifier(),
        "bench" => child_bench(),
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Seqlock stress: one writer hammers a block with whole-block states; readers in this
// process and in another check every read they accept.

const STRESS_PAYLOAD: usize = 4096;
const STRESS_BLOCKS: usize = 2;
const STRESS_BLOCK: usize = 1;

fn stress_layout() -> BlockLayout {
    BlockLayout::new(STRESS_PAYLOAD, STRESS_BLOCKS)
}

#[derive(Default, Debug)]
struct ReaderCounts {
    ok: u64,
    retries: u64,
    busy: u64,
    max_k: u64,
}

/// Read the stressed block live until `stop` says so, checking each state.
fn live_reader(lock: &Seqlock<impl Memory>, who: &str, stop: impl Fn() -> bool) -> ReaderCounts {
    let mut c = ReaderCounts::default();
    let mut buf = vec![0u8; STRESS_PAYLOAD];
    let off = STRESS_BLOCK * STRESS_PAYLOAD;
    while !stop() {
        match lock.read(off, &mut buf) {
            Ok(st) => {
                let k = uniform_state(&buf, who);
                assert!(
                    k >= c.max_k,
                    "{who}: state went back from {} to {k}",
                    c.max_k
                );
                c.max_k = k;
                c.ok += 1;
                c.retries += st.retries;
            }
            Err(OneSidedError::Torn { retries, .. }) => {
                c.busy += 1;
                c.retries += u64::from(retries);
            }
            Err(e) => panic!("{who}: {e}"),
        }
    }
    c
}

fn child_stress_reader() {
    let env = ChildEnv::from_env();
    let remote = env.attach(0);
    let layout = stress_layout();
    let lock = Seqlock::new(layout, &remote).unwrap();
    let run_for = Duration::from_millis(std::env::var("PSERV_MS").unwrap().parse().unwrap());
    println!("@@ ready");
    // Half the time the live reader (shm's own path), half the verbs-style path: one
    // bulk copy of the whole physical block, validated afterwards.
    let t0 = Instant::now();
    let live = live_reader(&lock, "child live reader", || t0.elapsed() >= run_for / 2);
    let mut local = env.backend.register(layout.stride()).unwrap();
    let span = layout
        .physical_span(STRESS_BLOCK * STRESS_PAYLOAD, STRESS_PAYLOAD)
        .unwrap();
    let mut phys = vec![0u8; span.len()];
    let mut payload = vec![0u8; STRESS_PAYLOAD];
    let (mut copied_ok, mut copied_torn, mut max_k) = (0u64, 0u64, live.max_k);
    while t0.elapsed() < run_for {
        env.backend
            .read(&remote, span.start, &mut local, 0, span.len())
            .unwrap();
        local.copy_out(0, &mut phys);
        match layout.validate_copied(STRESS_BLOCK, &phys) {
            Ok(_) => {
                layout.extract(
                    STRESS_BLOCK,
                    &phys,
                    STRESS_BLOCK * STRESS_PAYLOAD,
                    &mut payload,
                );
                let k = uniform_state(&payload, "child copied reader");
                assert!(
                    k >= max_k,
                    "copied reader: state went back from {max_k} to {k}"
                );
                max_k = k;
                copied_ok += 1;
            }
            Err(OneSidedError::Torn { .. }) => copied_torn += 1,
            Err(e) => panic!("{e}"),
        }
    }
    println!("@@ live_ok {}", live.ok);
    println!("@@ live_retries {}", live.retries);
    println!("@@ live_busy {}", live.busy);
    println!("@@ copied_ok {copied_ok}");
    println!("@@ copied_torn {copied_torn}");
    println!("@@ max_k {max_k}");
}

#[test]
fn seqlock_stress_readers_in_a_thread_and_a_process_only_see_states_that_existed() {
    let owner = Owner::new();
    let layout = stress_layout();
    let store = owner.backend.register(layout.physical_len()).unwrap();
    let lock = Seqlock::new(layout, &store).unwrap();
    let (child, _peer) = owner.spawn("stress_reader", &[&store], &[("PSERV_MS", "1500".into())]);
    child.expect("ready");

    let stop = AtomicBool::new(false);
    let last_k = AtomicU64::new(0);
    let (thread_counts, writes) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut state = vec![0u8; STRESS_PAYLOAD];
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                for w in state.chunks_exact_mut(8) {
                    w.copy_from_slice(&k.to_le_bytes());
                }
                let w = lock.begin(STRESS_BLOCK);
                w.copy_in(0, &state);
                drop(w);
                last_k.store(k, Ordering::Relaxed);
                // Leave readers gaps of varying length (sometimes none).
                for _ in 0..xorshift(&mut rng) % 512 {
                    std::hint::spin_loop();
                }
            }
            k
        });
        let reader =
            s.spawn(|| live_reader(&lock, "thread reader", || stop.load(Ordering::Relaxed)));
        // The child reads for its time, then reports.
        let mut lines = Vec::new();
        for key in [
            "live_ok",
            "live_retries",
            "live_busy",
            "copied_ok",
            "copied_torn",
            "max_k",
        ] {
            lines.push(child.expect_u64(key));
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        let counts = reader.join().unwrap();
        child.finish();
        (counts, (writes, lines))
    });
    let (writes, child_counts) = writes;
    let [live_ok, live_retries, live_busy, copied_ok, copied_torn, child_max_k] = child_counts[..]
    else {
        unreachable!()
    };
    eprintln!(
        "writes {writes}; thread reader {thread_counts:?}; child live ok {live_ok} retries \
         {live_retries} busy {live_busy}; child copied ok {copied_ok} torn {copied_torn}"
    );
    assert!(writes > 1000, "the writer barely ran ({writes} writes)");
    assert!(
        thread_counts.ok > 0 && live_ok > 0 && copied_ok > 0,
        "a reader never succeeded"
    );
    assert!(child_max_k <= writes && thread_counts.max_k <= writes);
    // The point of the test: readers did meet blocks mid-update and refused them.
    assert!(
        thread_counts.retries + live_retries + copied_torn > 0,
        "no reader ever met a block mid-update: the stress did not stress"
    );
    // The final state is the writer's last.
    let mut buf = vec![0u8; STRESS_PAYLOAD];
    lock.read(STRESS_BLOCK * STRESS_PAYLOAD, &mut buf).unwrap();
    assert_eq!(uniform_state(&buf, "final"), last_k.load(Ordering::Relaxed));
}

// ---------------------------------------------------------------------------------------
// Refusals

#[test]
fn a_descriptor_with_a_wrong_key_or_an_out_of_range_offset_is_refused() {
    let owner = ShmBackend::new().unwrap();
    let peer = ShmBackend::new().unwrap();
    let (po, eo) = owner.prepare().unwrap();
    let (pp, ep) = peer.prepare().unwrap();
    let _o2p = owner.connect(po, &ep).unwrap();
    let to_owner = peer.connect(pp, &eo).unwrap();
    let store = owner.register(1 << 16).unwrap();
    let mut desc = RegionDesc::decode(&owner.describe(&store).encode()).unwrap();

    desc.key = desc.key.wrapping_add(1);
    let err = peer.attach(&to_owner, &desc).unwrap_err();
    assert!(matches!(err, OneSidedError::WrongKey { .. }), "{err}");
    eprintln!("wrong key: {err}");

    desc.key = desc.key.wrapping_sub(1);
    let remote = peer.attach(&to_owner, &desc).unwrap();
    let mut local = peer.register(4096).unwrap();
    let err = peer
        .read(&remote, (1 << 16) - 100, &mut local, 0, 4096)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "remote range [65436, 65436+4096) does not fit in a region of 65536 bytes"
    );
    let err = peer.write(&remote, 1 << 16, &local, 0, 1).unwrap_err();
    assert!(matches!(
        err,
        OneSidedError::OutOfRange { side: "remote", .. }
    ));
    let err = peer
        .write_notify(&remote, 0, &local, 0, 8192, 1)
        .unwrap_err();
    assert!(matches!(
        err,
        OneSidedError::OutOfRange { side: "local", .. }
    ));
    // Nothing was notified by the refused write_notify.
    assert_eq!(owner.poll_notice().unwrap(), None);

    // A layout read past the end is refused too.
    let layout = BlockLayout::for_len(1000, 512);
    let lock = Seqlock::new(layout, &remote).unwrap();
    let mut buf = vec![0u8; 100];
    assert!(matches!(
        lock.read(layout.logical_len() - 50, &mut buf),
        Err(OneSidedError::OutOfRange { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// A peer that dies

const HOG_LAYOUT_PAYLOAD: usize = 8192;
const HOG_BLOCKS: usize = 8;

fn hog_pattern() -> Vec<u8> {
    (0..HOG_LAYOUT_PAYLOAD * HOG_BLOCKS)
        .map(|i| (i * 31 % 253) as u8)
        .collect()
}

/// Maps the store and its landing area, then reads the store and scribbles over the
/// landing area (without notifying) until killed.
fn child_hog() {
    let env = ChildEnv::from_env();
    let store = env.attach(0);
    let landing = env.attach(1);
    let lock = Seqlock::new(BlockLayout::new(HOG_LAYOUT_PAYLOAD, HOG_BLOCKS), &store).unwrap();
    let mut buf = vec![0u8; HOG_LAYOUT_PAYLOAD * HOG_BLOCKS];
    let junk = vec![0xEEu8; landing.len()];
    println!("@@ ready");
    let deadline = Instant::now() + CHILD_WAIT;
    while Instant::now() < deadline {
        lock.read(0, &mut buf).unwrap();
        landing.copy_in(0, &junk);
    }
}

/// Writes a known pattern into its landing area and notifies the owner.
fn child_pusher() {
    let env = ChildEnv::from_env();
    let landing = env.attach(0);
    let mut local = env.backend.register(landing.len()).unwrap();
    let data: Vec<u8> = (0..landing.len()).map(|i| (i % 7) as u8).collect();
    local.copy_in(0, &data);
    env.backend
        .write_notify(&landing, 0, &local, 0, data.len(), 42)
        .unwrap();
    // Also prove it reads: the owner's store through the same interface.
    let _ = &mut local;
    println!("@@ pushed");
}

#[test]
fn a_peer_that_maps_regions_and_dies_does_not_corrupt_the_owner() {
    let owner = Owner::new();
    let layout = BlockLayout::new(HOG_LAYOUT_PAYLOAD, HOG_BLOCKS);
    let store = owner.backend.register(layout.physical_len()).unwrap();
    let lock = Seqlock::new(layout, &store).unwrap();
    let pattern = hog_pattern();
    lock.write(0, &pattern).unwrap();
    let landing_hog = owner.backend.register(1 << 16).unwrap();
    let landing_next = owner.backend.register(1 << 16).unwrap();

    let (hog, _hog_peer) = owner.spawn("hog", &[&store, &landing_hog], &[]);
    hog.expect("ready");
    std::thread::sleep(Duration::from_millis(100));
    // Kill it by pid, mid-loop, and reap it.
    let pid = hog.pid();
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    drop(hog);

    // The store is intact and consistent, at the version the owner left.
    let mut buf = vec![0u8; pattern.len()];
    lock.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern);
    for b in 0..HOG_BLOCKS {
        assert_eq!(lock.version(b), 2, "block {b}");
    }
    // The owner keeps publishing.
    lock.write(0, &pattern[..100]).unwrap();
    assert_eq!(owner.backend.poll_notice().unwrap(), None);

    // And serves another peer.
    let (pusher, next_peer) = owner.spawn("pusher", &[&landing_next], &[]);
    pusher.expect("pushed");
    let n = owner
        .backend
        .wait_notice(Duration::from_secs(10))
        .unwrap()
        .expect("the next peer's notice");
    assert_eq!((n.peer, n.imm), (owner.backend.peer_id(&next_peer), 42));
    let mut landed = vec![0u8; landing_next.len()];
    landing_next.copy_out(0, &mut landed);
    assert!(landed.iter().enumerate().all(|(i, &b)| b == (i % 7) as u8));
    pusher.finish();
}

// ---------------------------------------------------------------------------------------
// Notices

const NOTICES: u32 = 20_000;

/// Waits for the owner's go (a word in the region), then sends NOTICES notices.
fn child_notifier() {
    let env = ChildEnv::from_env();
    let region = env.attach(0);
    let go = region.atomic_u64(0);
    let deadline = Instant::now() + CHILD_WAIT;
    while go.load(Ordering::Acquire) == 0 {
        assert!(Instant::now() < deadline, "no go from the owner");
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 0..NOTICES {
        region.atomic_u64(8).store(u64::from(i), Ordering::Relaxed);
        env.backend.notify(&region, i).unwrap();
    }
    println!("@@ sent {NOTICES}");
}

#[test]
fn notices_from_another_process_arrive_in_order_after_the_data() {
    let owner = Owner::new();
    let region = owner.backend.register(4096).unwrap();
    let (child, peer) = owner.spawn("notifier", &[&region], &[]);
    region.atomic_u64(0).store(1, Ordering::Release);
    let mut next = 0u32;
    let deadline = Instant::now() + CHILD_WAIT;
    while next < NOTICES {
        assert!(Instant::now() < deadline, "only {next} notices arrived");
        // Alternate the busy-polling and the blocking way of receiving.
        let n = if next.is_multiple_of(2) {
            owner.backend.poll_notice().unwrap()
        } else {
            owner.backend.wait_notice(Duration::from_secs(1)).unwrap()
        };
        let Some(n) = n else { continue };
        assert_eq!(n.peer, owner.backend.peer_id(&peer));
        assert_eq!(n.imm, next, "notices out of order");
        // The word written before notice i is at least i.
        assert!(region.atomic_u64(8).load(Ordering::Relaxed) >= u64::from(next));
        next += 1;
    }
    assert_eq!(child.expect_u64("sent"), u64::from(NOTICES));
    child.finish();
    assert_eq!(owner.backend.poll_notice().unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// Measurements (not asserted): cargo test --release -p pserv-transport --test onesided
//   -- --ignored --nocapture measure

const BIG: usize = 16 << 20;
const BENCH_PAYLOAD: usize = 64 << 10;

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Median of `reps` timings of `f`.
fn median(reps: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .collect();
    t.sort();
    t[reps / 2]
}

fn child_bench() {
    let env = ChildEnv::from_env();
    let plain = env.attach(0);
    let versioned = env.attach(1);
    let landing = env.attach(2);
    // A region of ours the owner attaches to notify us back.
    let mine = env.backend.register(4096).unwrap();
    println!("@@ mine {}", hex(&env.backend.describe(&mine).encode()));

    let mut dst = vec![1u8; BIG];
    let src = vec![2u8; BIG];
    let memcpy = median(15, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    });
    let copy_out = median(15, || plain.copy_out(0, &mut dst));
    let copy_out2 = median(15, || versioned.copy_out(0, &mut dst));
    let mut dst2 = vec![1u8; BIG + 4096];
    let skip = 4096 - (dst2.as_ptr() as usize % 4096);
    let copy_out3 = median(15, || plain.copy_out(0, &mut dst2[skip..][..BIG]));
    eprintln!(
        "copy_out plain {} versioned {} aligned-dst {}",
        gbps(BIG, copy_out),
        gbps(BIG, copy_out2),
        gbps(BIG, copy_out3)
    );
    let mut local = env.backend.register(BIG).unwrap();
    let op_read = median(15, || {
        env.backend.read(&plain, 0, &mut local, 0, BIG).unwrap();
    });
    let layout = BlockLayout::for_len(BIG, BENCH_PAYLOAD);
    let lock = Seqlock::new(layout, &versioned).unwrap();
    let seq = median(15, || {
        lock.read(0, &mut dst).unwrap();
    });
    println!("@@ memcpy {}", gbps(BIG, memcpy));
    println!("@@ copy_out {}", gbps(BIG, copy_out));
    println!("@@ op_read {}", gbps(BIG, op_read));
    println!("@@ seqlock {}", gbps(BIG, seq));

    // 4 KiB pieces of the 64 KiB blocks (versions checked around each piece).
    let mut four = vec![0u8; 4096];
    let mut lat: Vec<u64> = (0..20_000)
        .map(|i| {
            let off = (i * 4096) % (1 << 20);
            let t0 = Instant::now();
            lock.read(off, &mut four).unwrap();
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    lat.sort_unstable();
    println!("@@ read4k_p50_ns {}", lat[lat.len() / 2]);
    println!("@@ read4k_p99_ns {}", lat[lat.len() * 99 / 100]);

    // Round trip: write 4 KiB + notify; the owner (busy-polling) reads it and notifies
    // back; we busy-poll for that.
    local.copy_in(0, &four);
    let mut rtt: Vec<u64> = Vec::with_capacity(5000);
    for i in 0..5000u32 {
        let t0 = Instant::now();
        env.backend
            .write_notify(&landing, 0, &local, 0, 4096, i)
            .unwrap();
        loop {
            if let Some(n) = env.backend.poll_notice().unwrap() {
                assert_eq!(n.imm, i);
                break;
            }
            std::hint::spin_loop();
        }
        rtt.push(t0.elapsed().as_nanos() as u64);
    }
    env.backend.notify(&landing, u32::MAX).unwrap();
    rtt.sort_unstable();
    println!("@@ rtt_p50_ns {}", rtt[rtt.len() / 2]);
    println!("@@ rtt_p99_ns {}", rtt[rtt.len() * 99 / 100]);
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture in release"]
fn measure() {
    let owner = Owner::new();
    let plain = owner.backend.register(BIG).unwrap();
    let layout = BlockLayout::for_len(BIG, BENCH_PAYLOAD);
    let versioned = owner.backend.register(layout.physical_len()).unwrap();
    let lock = Seqlock::new(layout, &versioned).unwrap();
    let data: Vec<u8> = (0..BIG).map(|i| i as u8).collect();
    plain.copy_in(0, &data);
    let publish = median(9, || lock.write(0, &data).unwrap());
    let landing = owner.backend.register(4096).unwrap();
    let (child, peer) = owner.spawn("bench", &[&plain, &versioned, &landing], &[]);
    let mine = RegionDesc::decode(&unhex(&child.expect("mine"))).unwrap();
    let back = owner.backend.attach(&peer, &mine).unwrap();

    let mut results = Vec::new();
    for key in ["memcpy", "copy_out", "op_read", "seqlock"] {
        results.push((key, child.expect(key)));
    }
    for key in ["read4k_p50_ns", "read4k_p99_ns"] {
        results.push((key, child.expect(key)));
    }
    // Serve the round trips: busy-poll, read the landing area, notify back.
    let mut four = vec![0u8; 4096];
    let deadline = Instant::now() + CHILD_WAIT;
    loop {
        assert!(Instant::now() < deadline);
        let Some(n) = owner.backend.poll_notice().unwrap() else {
            std::hint::spin_loop();
            continue;
        };
        if n.imm == u32::MAX {
            break;
        }
        landing.copy_out(0, &mut four);
        owner.backend.notify(&back, n.imm).unwrap();
    }
    for key in ["rtt_p50_ns", "rtt_p99_ns"] {
        results.push((key, child.expect(key)));
    }
    child.finish();
    println!(
        "owner: seqlock publish of 16 MiB (64 KiB blocks): {:.2} GB/s",
        gbps(BIG, publish)
    );
    for (k, v) in results {
        println!("peer process: {k} = {v}");
    }
}
