//! The transport's wire frame, as a connection reads it from a socket or a shared-memory
//! or RDMA ring: frames back to back in an aligned buffer, each checked by
//! `Frame::new_checked` (header, then body), then what a server reads of a checked frame:
//! keys, range, values, flags; a compressed frame's value block decoded
//! (`tcp::decompress_checked`, bounded by the frame limit); the key cache's list names
//! (`ListId::from_words`, then a lookup) and lists to cache.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pserv_engine::keycache::{KeyCache, ListId};
use pserv_fuzz::{Aligned, MAX_FRAME};
use pserv_transport::wire::{
    Frame, Header, FLAG_CACHE_KEYS, FLAG_COMPRESSED, FLAG_KEYS_CACHED, FLAG_RANGE, HEADER_LEN,
};
use pserv_transport::BufPool;

fuzz_target!(|data: &[u8]| {
    let buf = Aligned::new(data);
    let mut bytes = buf.bytes();
    // The header alone, as a reader checks it before it reads the body.
    if let Some(head) = bytes.get(..HEADER_LEN) {
        let header = Header::from_bytes(head.try_into().expect("56 bytes"));
        if let Ok(layout) = header.layout(MAX_FRAME) {
            assert!(layout.frame_len() <= MAX_FRAME);
            assert_eq!(layout.frame_len() % 8, 0);
        }
    }
    let pool = BufPool::new(4);
    let cache = KeyCache::new(1 << 12);
    while let Ok((frame, n)) = Frame::new_checked(bytes, MAX_FRAME) {
        assert!(n <= bytes.len() && n % 8 == 0 && n >= HEADER_LEN);
        read_frame(&frame, &pool, &cache);
        bytes = &bytes[n..];
    }
});

fn read_frame(frame: &Frame<'_>, pool: &std::sync::Arc<BufPool>, cache: &KeyCache) {
    let h = *frame.header();
    let keys = frame.keys();
    let values = frame.values();
    assert_eq!(keys.len() as u64, h.key_count);
    assert_eq!(values.len() as u64, h.value_bytes);
    assert!(h.message_kind().is_some() && h.value_type().is_some());
    if let Some((begin, end)) = frame.range() {
        assert!(h.has(FLAG_RANGE) && begin < end);
    }
    let _ = frame.values_as::<f32>();
    let _ = frame.values_as::<f64>();
    if h.has(FLAG_COMPRESSED) {
        if let Ok((owned, info)) = pserv_transport::tcp::decompress_checked(frame, MAX_FRAME, pool)
        {
            let plain = owned.frame();
            let ph = plain.header();
            assert!(!ph.has(FLAG_COMPRESSED));
            assert_eq!(plain.values().len(), info.len);
            assert!(HEADER_LEN + plain.keys().len() * 8 + plain.values().len() <= MAX_FRAME);
            assert_eq!(plain.keys(), keys);
            read_plain(&plain, cache);
        }
    } else {
        read_plain(frame, cache);
    }
}

/// What the server's key resolution reads of an uncompressed frame.
fn read_plain(frame: &Frame<'_>, cache: &KeyCache) {
    let h = frame.header();
    if h.has(FLAG_KEYS_CACHED) {
        if let Some(id) = ListId::from_words(frame.keys()) {
            let _ = cache.lookup(h.sender, id);
        }
    } else if h.has(FLAG_CACHE_KEYS) {
        if let Some(id) = cache.store(h.sender, frame.keys()) {
            assert_eq!(id, ListId::of(frame.keys()));
            let _ = cache.lookup(h.sender, id);
        }
    }
}
