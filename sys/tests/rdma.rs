//! RDMA verbs tests (feature `rdma`).
//!
//! The first group runs everywhere, including machines without any RDMA device (no
//! device must be a normal outcome). The device tests are `#[ignore]`d: run them on a
//! machine with an RDMA NIC or Soft-RoCE (`rdma link add rxe0 type rxe netdev IFACE`):
//!
//! ```text
//! PSERV_RDMA_DEVICE=rxe0 cargo test -p pserv-sys --features rdma --test rdma -- --ignored
//! ```
//!
//! Optional: `PSERV_RDMA_PORT` (default 1), `PSERV_RDMA_GID_INDEX` (default: automatic).
#![cfg(feature = "rdma")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use pserv_sys::rdma::{
    devices, Access, Completion, Context, DecodeError, MemoryRegion, Mtu, Opcode, QpConfig,
    QpEndpoint, QueuePair, RdmaError, RemoteRegion,
};
use pserv_sys::PinnedRegion;

const DEVICE_ENV: &str = "PSERV_RDMA_DEVICE";

// ---------------------------------------------------------------- without a device

#[test]
fn devices_lists_without_error() {
    let devs = devices().expect("listing devices is not an error, even with none");
    for d in &devs {
        assert!(!d.name.is_empty());
        assert_eq!(d.guid_string().len(), 19);
    }
    // Kernel devices appear under /sys/class/infiniband; the software device of
    // sys/softrdma (a replacement library) has no sysfs entries and says so in its
    // firmware string.
    let kernel_devs: Vec<_> = devs
        .iter()
        .filter(|d| !pserv_sys::rdma::is_software_firmware(&d.firmware))
        .collect();
    if std::env::var_os(DEVICE_ENV).is_none()
        && !std::path::Path::new("/sys/class/infiniband").exists()
    {
        assert!(
            kernel_devs.is_empty(),
            "no sysfs RDMA class but devices {devs:?}"
        );
    }
}

#[test]
fn open_without_a_device_says_so() {
    if !devices().unwrap().is_empty() {
        eprintln!("skipped: this machine has RDMA devices");
        return;
    }
    let err = Context::open(None).unwrap_err();
    assert!(matches!(err, RdmaError::NoDevice), "{err:?}");
    assert!(err.to_string().contains("no RDMA device"), "{err}");
    let err = Context::open(Some("mlx5_0")).unwrap_err();
    assert!(matches!(err, RdmaError::NoDevice), "{err:?}");
}

#[test]
fn open_unknown_name_lists_the_devices() {
    let devs = devices().unwrap();
    if devs.is_empty() {
        eprintln!("skipped: no RDMA device");
        return;
    }
    match Context::open(Some("no-such-device")).unwrap_err() {
        RdmaError::DeviceNotFound { name, available } => {
            assert_eq!(name, "no-such-device");
            assert_eq!(available.len(), devs.len());
        }
        other => panic!("{other:?}"),
    }
}

fn mtu() -> impl Strategy<Value = Mtu> {
    prop_oneof![
        Just(Mtu::Mtu256),
        Just(Mtu::Mtu512),
        Just(Mtu::Mtu1024),
        Just(Mtu::Mtu2048),
        Just(Mtu::Mtu4096),
    ]
}

fn endpoint() -> impl Strategy<Value = QpEndpoint> {
    (
        0u32..1 << 24,
        any::<u16>(),
        any::<[u8; 16]>(),
        0u32..1 << 24,
        mtu(),
    )
        .prop_map(|(qpn, lid, gid, psn, mtu)| QpEndpoint {
            qpn,
            lid,
            gid,
            psn,
            mtu,
        })
}

proptest! {
    #[test]
    fn endpoint_round_trips(ep in endpoint()) {
        let bytes = ep.encode();
        prop_assert_eq!(bytes.len(), QpEndpoint::ENCODED_LEN);
        prop_assert_eq!(QpEndpoint::decode(&bytes), Ok(ep));
    }

    #[test]
    fn endpoint_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(ep) = QpEndpoint::decode(&bytes) {
            prop_assert!(ep.validate().is_ok());
            prop_assert_eq!(&ep.encode()[..], &bytes[..]);
        }
    }

    #[test]
    fn endpoint_decode_of_corrupted_record_never_panics(
        ep in endpoint(), at in 0usize..32, byte in any::<u8>()
    ) {
        let mut bytes = ep.encode();
        bytes[at] = byte;
        if let Ok(back) = QpEndpoint::decode(&bytes) {
            prop_assert_eq!(back.encode(), bytes);
        }
    }

    #[test]
    fn remote_region_round_trips(addr in any::<u64>(), len in any::<u64>(), rkey in any::<u32>()) {
        let r = RemoteRegion { addr, len, rkey };
        match RemoteRegion::decode(&r.encode()) {
            Ok(back) => prop_assert_eq!(back, r),
            Err(e) => {
                prop_assert!(addr.checked_add(len).is_none());
                let is_len = matches!(e, DecodeError::Field { field: "len", .. });
                prop_assert!(is_len, "{:?}", e);
            }
        }
    }

    #[test]
    fn remote_region_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
        if let Ok(r) = RemoteRegion::decode(&bytes) {
            prop_assert_eq!(&r.encode()[..], &bytes[..]);
        }
    }

    #[test]
    fn remote_bounds_are_exact(len in 0u64..1 << 40, offset in any::<u64>(), n in any::<u64>()) {
        let r = RemoteRegion { addr: 1 << 40, len, rkey: 1 };
        let inside = offset.checked_add(n).is_some_and(|end| end <= len);
        prop_assert_eq!(r.checked_addr(offset, n).is_ok(), inside);
    }
}

#[test]
fn access_flags_compose() {
    let a = Access::REMOTE_READ | Access::LOCAL_WRITE;
    assert!(a.contains(Access::REMOTE_READ));
    assert!(!a.contains(Access::REMOTE_WRITE));
    assert!(Access::ALL.contains(a));
    assert_eq!(format!("{a:?}"), "Access(LOCAL_WRITE|REMOTE_READ)");
}

#[test]
fn mtu_codes() {
    for code in 1..=5 {
        let m = Mtu::from_code(code).unwrap();
        assert_eq!(m.code(), code);
        assert_eq!(m.bytes(), 128 << code);
    }
    assert_eq!(Mtu::from_code(0), None);
    assert_eq!(Mtu::from_code(6), None);
}

// ---------------------------------------------------------------- with a device

fn device_name() -> String {
    std::env::var(DEVICE_ENV).unwrap_or_else(|_| {
        panic!(
            "{DEVICE_ENV} is not set: name an RDMA device (e.g. rxe0 after \
             `rdma link add rxe0 type rxe netdev IFACE`) to run the device tests"
        )
    })
}

fn config() -> QpConfig {
    let env_u8 = |key: &str| {
        std::env::var(key).ok().map(|v| {
            v.parse::<u8>()
                .unwrap_or_else(|_| panic!("{key}={v} is not a u8"))
        })
    };
    QpConfig {
        port: env_u8("PSERV_RDMA_PORT").unwrap_or(1),
        gid_index: env_u8("PSERV_RDMA_GID_INDEX"),
        max_send_wr: 16,
        max_recv_wr: 16,
        ..QpConfig::default()
    }
}

struct Loopback {
    a: QueuePair,
    b: QueuePair,
    a_mr: Arc<MemoryRegion>,
    b_mr: Arc<MemoryRegion>,
}

fn loopback(cfg: QpConfig) -> Loopback {
    let ctx = Context::open(Some(&device_name())).expect("open the device");
    eprintln!("device {} ports {:?}", ctx.name(), ctx.ports());
    let pd = ctx.alloc_pd().unwrap();
    let depth = (cfg.max_send_wr + cfg.max_recv_wr) as usize;
    let pa = pd
        .prepare_qp(ctx.create_cq(depth).unwrap(), cfg.clone())
        .unwrap();
    let pb = pd.prepare_qp(ctx.create_cq(depth).unwrap(), cfg).unwrap();
    let (ea, eb) = (pa.endpoint(), pb.endpoint());
    // Exchange as bytes, as peers do over TCP.
    let ea = QpEndpoint::decode(&ea.encode()).unwrap();
    let eb = QpEndpoint::decode(&eb.encode()).unwrap();
    let a = pa.handshake(eb).expect("handshake a -> b");
    let b = pb.handshake(ea).expect("handshake b -> a");
    let a_mr = Arc::new(
        pd.register(PinnedRegion::new(4 * 4096).unwrap(), Access::ALL)
            .unwrap(),
    );
    let b_mr = Arc::new(
        pd.register(PinnedRegion::new(4 * 4096).unwrap(), Access::ALL)
            .unwrap(),
    );
    Loopback { a, b, a_mr, b_mr }
}

fn wait_one(qp: &mut QueuePair) -> Completion {
    let mut out = [Completion::default(); 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if qp.wait(&mut out, Duration::from_millis(100)).unwrap() == 1 {
            return out[0];
        }
        assert!(Instant::now() < deadline, "no completion within 10 s");
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn device_lists_itself() {
    let name = device_name();
    let devs = devices().unwrap();
    let d = devs
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("{name} not in {devs:?}"));
    assert!(!d.ports.is_empty(), "{d:?}");
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn loopback_write_read_imm_send() {
    let Loopback {
        mut a,
        mut b,
        a_mr,
        b_mr,
    } = loopback(config());
    let remote_b = b_mr.remote();

    // RDMA WRITE a[0..4096] -> b[4096..8192].
    let data = pattern(1, 4096);
    a_mr.write_at(0, &data).unwrap();
    a.post_write(11, a_mr.slice(0..4096), &remote_b, 4096, true)
        .unwrap();
    let c = wait_one(&mut a);
    assert_eq!((c.wr_id, c.opcode, c.status), (11, Opcode::Write, Ok(())));
    assert_eq!(a.outstanding_sends(), 0);
    let mut got = vec![0u8; 4096];
    b_mr.read_at(4096, &mut got).unwrap();
    assert_eq!(got, data);

    // RDMA READ b[0..4096] -> a[8192..12288].
    let data = pattern(2, 4096);
    b_mr.write_at(0, &data).unwrap();
    a.post_read(12, a_mr.slice(8192..12288), &remote_b, 0, true)
        .unwrap();
    let c = wait_one(&mut a);
    assert_eq!((c.wr_id, c.opcode, c.status), (12, Opcode::Read, Ok(())));
    a_mr.read_at(8192, &mut got).unwrap();
    assert_eq!(got, data);

    // WRITE_WITH_IMM a[0..100] -> b[12288..], consuming a buffer-less receive on b.
    let data = pattern(3, 100);
    a_mr.write_at(0, &data).unwrap();
    b.post_recv(21, None).unwrap();
    a.post_write_with_imm(
        13,
        Some(a_mr.slice(0..100)),
        &remote_b,
        12288,
        0xabcd_0123,
        true,
    )
    .unwrap();
    let c = wait_one(&mut a);
    assert_eq!(
        (c.wr_id, c.opcode, c.status),
        (13, Opcode::WriteWithImm, Ok(()))
    );
    let c = wait_one(&mut b);
    assert_eq!(c.wr_id, 21);
    assert_eq!(c.status, Ok(()));
    assert_eq!(c.opcode, Opcode::RecvWithImm);
    assert_eq!(c.imm_data, Some(0xabcd_0123));
    assert_eq!(c.byte_len, 100);
    let mut got = vec![0u8; 100];
    b_mr.read_at(12288, &mut got).unwrap();
    assert_eq!(got, data);

    // SEND a[0..256] into a receive of b at b[0..256]; unsignaled writes before it are
    // released with it.
    let data = pattern(4, 256);
    a_mr.write_at(0, &data).unwrap();
    b.post_recv(22, Some(b_mr.slice(0..256))).unwrap();
    a.post_write(14, a_mr.slice(0..8), &remote_b, 8192, false)
        .unwrap();
    a.post_send(15, a_mr.slice(0..256), true).unwrap();
    let c = wait_one(&mut a);
    assert_eq!((c.wr_id, c.opcode, c.status), (15, Opcode::Send, Ok(())));
    assert_eq!(
        a.outstanding_sends(),
        0,
        "the unsignaled write was released too"
    );
    let c = wait_one(&mut b);
    assert_eq!((c.wr_id, c.opcode, c.byte_len), (22, Opcode::Recv, 256));
    let mut got = vec![0u8; 256];
    b_mr.read_at(0, &mut got).unwrap();
    assert_eq!(got, data);

    // Refused before posting: remote range past the advertised length, local range past
    // the region.
    let err = a
        .post_write(
            16,
            a_mr.slice(0..4096),
            &remote_b,
            remote_b.len - 4095,
            true,
        )
        .unwrap_err();
    assert!(
        matches!(err, RdmaError::OutOfBounds { what: "remote", .. }),
        "{err:?}"
    );
    let err = a
        .post_read(17, a_mr.slice(0..a_mr.len() + 1), &remote_b, 0, true)
        .unwrap_err();
    assert!(
        matches!(err, RdmaError::OutOfBounds { what: "local", .. }),
        "{err:?}"
    );
    assert_eq!(a.outstanding_sends(), 0);

    // Regions go back to their owner once nothing holds them.
    drop((a, b));
    assert!(MemoryRegion::into_region(a_mr).is_ok());
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn loopback_bounds_queue_and_wrong_key() {
    let cfg = QpConfig {
        max_send_wr: 4,
        ..config()
    };
    let Loopback {
        mut a,
        b,
        a_mr,
        b_mr,
        ..
    } = loopback(cfg);
    let remote_b = b_mr.remote();

    // The send queue holds at most 4; the 4th is signaled even though asked not to be.
    for i in 0..4 {
        a.post_write(i, a_mr.slice(0..64), &remote_b, 0, false)
            .unwrap();
    }
    let err = a
        .post_write(4, a_mr.slice(0..64), &remote_b, 0, false)
        .unwrap_err();
    assert!(
        matches!(err, RdmaError::QueueFull { max: 4, .. }),
        "{err:?}"
    );
    // While requests are in flight the region cannot be taken back.
    let a_mr = MemoryRegion::into_region(a_mr).unwrap_err();
    let c = wait_one(&mut a);
    assert_eq!((c.wr_id, c.status), (3, Ok(())));
    assert_eq!(a.outstanding_sends(), 0);

    // A wrong rkey is refused by the peer's NIC: a completion error, not a crash.
    let forged = RemoteRegion {
        rkey: remote_b.rkey ^ 0x5a5a,
        ..remote_b
    };
    a.post_write(9, a_mr.slice(0..64), &forged, 0, true)
        .unwrap();
    let c = wait_one(&mut a);
    assert_eq!(c.wr_id, 9);
    let err = c.status.unwrap_err();
    assert!(err.is_remote_access(), "{err}");
    eprintln!("wrong key: {err}");
    drop(b);
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn receive_queues_of_several_queue_pairs_share_one_channel() {
    let ctx = Context::open(Some(&device_name())).expect("open the device");
    let pd = ctx.alloc_pd().unwrap();
    let shared = ctx.create_channel().unwrap();
    let cfg = config();
    let (s, r) = (cfg.max_send_wr as usize, cfg.max_recv_wr as usize);
    // Two connected pairs; the receivers' receive CQs sit on `shared`.
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let tx = pd
            .prepare_qp(ctx.create_cq(s + r).unwrap(), cfg.clone())
            .unwrap();
        let rx = pd
            .prepare_qp_split(
                ctx.create_cq(s).unwrap(),
                ctx.create_cq_on(r, &shared).unwrap(),
                cfg.clone(),
            )
            .unwrap();
        let (et, er) = (tx.endpoint(), rx.endpoint());
        let tx = tx.handshake(er).unwrap();
        let rx = rx.handshake(et).unwrap();
        assert!(rx.recv_on(&shared) && !tx.recv_on(&shared));
        pairs.push((tx, rx));
    }
    let mr = Arc::new(
        pd.register(PinnedRegion::new(4096).unwrap(), Access::ALL)
            .unwrap(),
    );
    let mut out = [Completion::default(); 4];
    // Nothing armed, nothing arrives: the channel stays quiet.
    assert!(!shared.wait(Duration::from_millis(20)).unwrap());
    for (i, (tx, rx)) in pairs.iter_mut().enumerate() {
        rx.post_recv(100 + i as u64, None).unwrap();
        rx.arm_recv().unwrap();
        assert_eq!(rx.poll(&mut out).unwrap(), 0);
        tx.post_write_with_imm(i as u64, None, &mr.remote(), 0, 7 + i as u32, true)
            .unwrap();
    }
    // Both notices arrive; the shared channel wakes for them, and each receiver's poll
    // finds its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "notices {got:?}");
        shared.wait(Duration::from_millis(100)).unwrap();
        for (rx_i, (_, rx)) in pairs.iter_mut().enumerate() {
            let n = rx.poll(&mut out).unwrap();
            for c in &out[..n] {
                assert_eq!(c.opcode, Opcode::RecvWithImm);
                got.push((rx_i, c.wr_id, c.imm_data));
            }
            rx.arm_recv().unwrap();
        }
    }
    got.sort();
    assert_eq!(got, vec![(0, 100, Some(7)), (1, 101, Some(8))]);
    for (tx, _) in &mut pairs {
        assert_eq!(wait_one(tx).status, Ok(()));
    }
}

#[test]
#[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
fn loopback_read_into_a_borrowed_buffer() {
    // `_b` is held: its queue pair answers the READs.
    let Loopback {
        mut a, b: _b, b_mr, ..
    } = loopback(config());
    let remote_b = b_mr.remote();
    let data = pattern(5, 10_000);
    b_mr.write_at(0, &data).unwrap();
    let pd = a.pd().clone();
    // A heap buffer, not page aligned: only the borrowed part is written.
    let mut buf = vec![0u8; 12_345];
    {
        let local = pd
            .register_borrowed(&mut buf[100..10_100], Access::LOCAL_WRITE)
            .unwrap();
        assert_eq!(local.len(), 10_000);
        a.post_read_borrowed(21, &local, 0..6000, &remote_b, 0, false)
            .unwrap();
        a.post_read_borrowed(22, &local, 6000..10_000, &remote_b, 6000, true)
            .unwrap();
        let c = wait_one(&mut a);
        assert_eq!((c.wr_id, c.opcode, c.status), (22, Opcode::Read, Ok(())));
        // Ranges outside the borrowed buffer, or empty, are refused before posting.
        assert!(matches!(
            a.post_read_borrowed(23, &local, 9000..10_001, &remote_b, 0, true),
            Err(RdmaError::OutOfBounds { .. })
        ));
        assert!(matches!(
            a.post_read_borrowed(23, &local, 5..5, &remote_b, 0, true),
            Err(RdmaError::OutOfBounds { .. })
        ));
    }
    assert_eq!(buf[100..10_100], data[..]);
    assert!(buf[..100].iter().chain(&buf[10_100..]).all(|&b| b == 0));
    // A READ needs LOCAL_WRITE; an empty buffer is not registered.
    let read_only = pd
        .register_borrowed(&mut buf[..64], Access::empty())
        .unwrap();
    assert!(matches!(
        a.post_read_borrowed(24, &read_only, 0..64, &remote_b, 0, true),
        Err(RdmaError::AccessDenied { .. })
    ));
    drop(read_only);
    assert!(pd.register_borrowed(&mut [], Access::LOCAL_WRITE).is_err());
    assert_eq!(a.outstanding_sends(), 0);
}
