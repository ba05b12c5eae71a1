//! TLS in a whole cluster: `pserv tls-certs` makes a CA and a node certificate, and
//! `pserv local` with them trains over TLS connections (the processes' log says so).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Scratch;

/// `pserv local --servers 2 --workers 2` with `--tls-*` from `pserv tls-certs` trains
/// to the end, every connection TLS; the keys `tls-certs` wrote are owner-only, and a
/// second `tls-certs` into the same folder overwrites nothing.
#[test]
fn a_local_cluster_trains_over_tls() {
    let dir = Scratch::new("tls");
    let certs = dir.path("certs");
    let out = common::pserv_cmd()
        .arg("tls-certs")
        .arg(&certs)
        .output()
        .expect("pserv runs");
    assert!(
        out.status.success(),
        "tls-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in ["ca.key", "node.key"] {
        let mode = std::fs::metadata(certs.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} is not owner-only");
    }
    let again = common::pserv_cmd()
        .arg("tls-certs")
        .arg(&certs)
        .output()
        .expect("pserv runs");
    assert!(!again.status.success(), "tls-certs overwrote its files");

    let summary = dir.path("summary.json");
    let out = common::pserv_cmd()
        .env("PSERV_LOG", "info")
        .arg("local")
        .args([
            "--servers=2",
            "--workers=2",
            "--examples=4000",
            "--features=20000",
            "--epochs=2",
            "--seed=7",
            "--timeout-secs=120",
        ])
        .args(common::net_flags())
        .arg(format!("--tls-cert={}", certs.join("node.pem").display()))
        .arg(format!("--tls-key={}", certs.join("node.key").display()))
        .arg(format!("--tls-ca={}", certs.join("ca.pem").display()))
        .arg(format!("--summary-json={}", summary.display()))
        .output()
        .expect("pserv runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pserv local with TLS failed: {log}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["workers_finished"], 2, "{s}");
    // Workers, servers and the scheduler: connections made and accepted over TLS, and
    // none moved to shared memory.
    let connected = log.matches("connected over TLS").count();
    let accepted = log.matches("accepted a TLS connection").count();
    assert!(connected >= 6, "{connected} TLS connections made: {log}");
    assert!(accepted >= 6, "{accepted} TLS connections accepted: {log}");
    assert!(!log.contains("frames move to shared memory"), "{log}");
    assert!(
        !log.contains("TLS handshake with"),
        "a handshake failed: {log}"
    );

    // Half the flags is an error that says what is needed.
    let out = common::pserv_cmd()
        .arg("local")
        .arg(format!("--tls-cert={}", certs.join("node.pem").display()))
        .output()
        .expect("pserv runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("all three of --tls-cert"), "{err}");
}
