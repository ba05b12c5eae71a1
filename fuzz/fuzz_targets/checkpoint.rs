//! Checkpoint files read on `--restore`: a server's part (`checkpoint::format::decode`)
//! and the manifest (`checkpoint::decode_manifest`), whichever the bytes are; the first
//! byte of the input picks the decoder (the seeds of both start as they do on disk). A
//! truncated, padded or corrupted file is an error naming the file; nothing panics or
//! allocates past the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pserv_engine::checkpoint::{decode_manifest, format};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/checkpoint");
    if data.first() == Some(&b'P') && data.get(1) == Some(&b'S') {
        if let Ok(p) = format::decode(path, data) {
            assert!(p.keys.windows(2).all(|w| w[0] < w[1]));
            assert!(p.keys.len() * 8 + p.weights.len() + p.state.len() <= data.len());
            // What decodes encodes back to the same bytes.
            assert_eq!(p.encode(), data);
        }
    } else if let Err(e) = decode_manifest(path, data) {
        assert!(e.to_string().contains("/fuzz/checkpoint"));
    }
});
