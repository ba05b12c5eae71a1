//! `pserv tls-certs DIR`: a cluster CA and one node certificate for TLS between nodes
//! (see `pserv_transport::tls`), so a user can start; for production, sign one
//! certificate per node with the CA (each must carry the DNS name `pserv`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use pserv_transport::tls::TLS_SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::base::error::EngineError;

/// Write a new file (never overwriting one) with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EngineError> {
    let err = |e: std::io::Error| EngineError::Config(format!("{}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)
}

/// Make `dir` (if needed) and write `ca.pem`, `ca.key`, `node.pem`, `node.key` into it:
/// a self-signed CA and a node certificate it signed for the name `pserv`, usable for
/// both ends of a connection. Keys are readable by their owner only; an existing file
/// is an error (nothing is overwritten).
pub fn write(dir: &Path) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::Config(format!("{}: {e}", dir.display())))?;
    let names = ["ca.pem", "ca.key", "node.pem", "node.key"];
    for n in names {
        if dir.join(n).exists() {
            return Err(EngineError::Config(format!(
                "{} exists already; nothing was written (remove it, or pick another folder)",
                dir.join(n).display()
            )));
        }
    }
    let gen = |e: rcgen::Error| EngineError::Config(format!("making a certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pserv cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let node_key = KeyPair::generate().map_err(gen)?;
    let mut node = CertificateParams::new(vec![TLS_SERVER_NAME.to_string()]).map_err(gen)?;
    node.distinguished_name
        .push(DnType::CommonName, "pserv node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node_cert = node.signed_by(&node_key, &ca_cert, &ca_key).map_err(gen)?;
    write_new(
        &dir.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join("node.key"),
        node_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join("node.pem"), node_cert.pem().as_bytes(), 0o644)?;
    Ok(())
}
