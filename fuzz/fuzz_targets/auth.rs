//! The authentication handshake every connection starts with (`pserv_transport::auth`):
//! the input's first 48 bytes as a connector's hello (what an acceptor decodes), the
//! next 72 as the challenge a connector checks against a hello of its own, the next 32 as
//! a proof an acceptor checks, the next 8 as a verdict. Nothing may panic, and nothing
//! made without the secret may pass a check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_transport::auth::{
    self, AuthHello, Secret, AUTH_HELLO_LEN, CHALLENGE_LEN, PROOF_LEN, VERDICT_LEN,
};

fuzz_target!(|data: &[u8]| {
    let secret = Secret::from_bytes(b"the fuzzed cluster's secret").expect("long enough");
    let (hello_b, rest) = data.split_at(data.len().min(AUTH_HELLO_LEN));
    if let Ok(b) = <&[u8; AUTH_HELLO_LEN]>::try_from(hello_b) {
        let _ = AuthHello::decode(b);
    }
    let mine = AuthHello {
        identity: 7,
        nonce: [3u8; 32],
    };
    let (ch_b, rest) = rest.split_at(rest.len().min(CHALLENGE_LEN));
    if let Ok(ch) = <&[u8; CHALLENGE_LEN]>::try_from(ch_b) {
        // Forging the acceptor's MAC is what the check exists to stop.
        assert!(auth::check_challenge(&secret, &mine, ch).is_err());
    }
    let (proof_b, rest) = rest.split_at(rest.len().min(PROOF_LEN));
    if let Ok(p) = <&[u8; PROOF_LEN]>::try_from(proof_b) {
        assert!(!auth::check_proof(&secret, &mine, &[9u8; 32], p));
    }
    if let Some(v) = rest.get(..VERDICT_LEN) {
        let _ = auth::decode_verdict(v.try_into().expect("8 bytes"));
    }
});
