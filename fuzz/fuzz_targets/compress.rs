//! Value compression blocks (`compress::inspect`, `decode`, `decode_into`: none, lz4,
//! zstd, zero runs) from a hostile peer: every claimed length is checked against the
//! caller's limit before anything is allocated, and no block decodes to more than it.
//! The first input byte picks the limit, the rest is the block.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_fuzz::MAX_FRAME;
use pserv_transport::compress;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, block)) = data.split_first() else {
        return;
    };
    // Odd: the frame bound; even: a small limit, to reach the too-large paths.
    let max = if pick & 1 == 1 {
        MAX_FRAME
    } else {
        usize::from(pick) << 4
    };
    let inspected = compress::inspect(block, max);
    let mut out = vec![0xa5u8; 3];
    let decoded = compress::decode(block, max, &mut out);
    match &decoded {
        Ok(()) => {
            let info = inspected
                .as_ref()
                .expect("decode succeeded where inspect failed");
            assert!(info.len <= max);
            assert_eq!(out.len(), 3 + info.len);
        }
        Err(_) => assert_eq!(out, [0xa5; 3], "a failed decode changed its output"),
    }
    // As the transport decodes: inspect, then decode into exactly the claimed length.
    if let Ok(info) = inspected {
        let mut ctx = compress::Context::new();
        let mut v = vec![0u8; info.len];
        let got = compress::decode_into(&mut ctx, block, &mut v);
        assert_eq!(got.is_ok(), decoded.is_ok());
        if let Ok(n) = got {
            assert_eq!(n, info.len);
            assert_eq!(&out[3..], &v[..]);
        }
    }
});
