//! Messages over RDMA queue pairs in a whole cluster: `pserv local --transport rdma`
//! (scheduler, servers and workers in separate processes, each with its own NIC, real
//! or emulated) moves every connection's frames from TCP to queue pairs after the `PRDM`
//! handshake, and builds exactly the model the same job builds over TCP.
//!
//! ```text
//! scripts/soft-rdma cargo test --release -p pserv-engine --features rdma --test rdma_messages -- --ignored
//! ```
#![cfg(feature = "rdma")]

mod common;

fn lr_job(dir: &common::Scratch, transport: &str) -> serde_json::Value {
    let summary = dir.path(&format!("{transport}.json"));
    let out = common::pserv_cmd()
        .args([
            "local",
            "--servers=2",
            "--replicas=0",
            "--workers=2",
            "--examples=4000",
            "--features=20000",
            "--hash-buckets=8192",
            "--epochs=2",
            "--lr=1",
            "--consistency=sequential",
            &format!("--transport={transport}"),
            &format!("--summary-json={}", summary.display()),
            "--timeout-secs=120",
        ])
        .args(common::base_net_flags())
        .output()
        .expect("pserv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{transport}: {stderr}");
    serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap()
}

#[test]
#[ignore = "needs an RDMA device (scripts/soft-rdma, or a NIC): pass --ignored"]
fn lr_job_over_rdma_sends_its_messages_over_queue_pairs() {
    let dir = common::Scratch::new("rdma-messages");
    let rdma = lr_job(&dir, "rdma");
    assert_eq!(rdma["workers_finished"], 2, "{rdma}");
    for w in 0..2 {
        let t = &rdma[format!("traffic_worker_{w}")];
        // The scheduler and both servers at least; nothing refused, nothing over shm.
        let n = t["rdma_connections"].as_u64().expect("rdma_connections");
        assert!(n >= 3, "worker {w}: {n} rdma connections: {t}");
        assert_eq!(t["rdma_refused"], 0, "worker {w}: {t}");
        assert_eq!(t["shm_connections"], 0, "worker {w}: {t}");
    }
    // Over TCP nothing moves; with sequential consistency the model is the same.
    let tcp = lr_job(&dir, "tcp");
    for w in 0..2 {
        assert_eq!(tcp[format!("traffic_worker_{w}")]["rdma_connections"], 0);
    }
    for k in ["test_logloss", "test_accuracy", "test_auc"] {
        let (a, b) = (rdma[k].as_f64().unwrap(), tcp[k].as_f64().unwrap());
        assert_eq!(a.to_bits(), b.to_bits(), "{k}: rdma {a} vs tcp {b}");
    }
    assert!(rdma["test_logloss"].as_f64().unwrap() < 0.69, "it learns");
}
