//! Cached key lists at the door: a request that names its key list
//! (`FLAG_KEYS_CACHED`) gets its keys back from the cache, and a list sent to be cached
//! (`FLAG_CACHE_KEYS`) is stored, before anything else (routing, the clock gate, the
//! store, replication) sees the request. See [`crate::keycache`].

use pserv_transport::wire::{FLAG_CACHE_KEYS, FLAG_KEYS_CACHED, FLAG_RANGE};
use pserv_transport::{Conn, Frame, OwnedFrame, RecvFrame};

use crate::keycache::{ListId, Lookup};
use crate::proto::{self, Status};

use super::{Core, Ready};

/// `frame` as the rest of the server serves it: unchanged, or with its named key list
/// resolved (then in its own buffer). `None` when it was answered here: a name this
/// server does not hold is refused as a cache miss, and nothing changed.
pub(super) fn resolve<'a>(
    core: &Core,
    ready: &Ready,
    conn: &Conn,
    frame: RecvFrame<'a>,
) -> Option<RecvFrame<'a>> {
    let f = frame.frame();
    let h = *f.header();
    if h.has(FLAG_KEYS_CACHED) {
        let Some(id) = ListId::from_words(f.keys()) else {
            // The wire checks hold three words; nothing else reaches here.
            let _ = conn.send(proto::error_answer(
                &h,
                ready.node_id,
                Status::BadRequest,
                "a cached-keys request carries exactly 3 key words",
            ));
            return None;
        };
        let keys = match core.key_cache.lookup(h.sender, id) {
            Lookup::Hit(keys) => keys,
            Lookup::Absent | Lookup::Mismatch => {
                tracing::debug!(
                    sender = h.sender,
                    list = id.lo,
                    len = id.len,
                    "key cache miss"
                );
                let _ = conn.send(proto::error_answer(
                    &h,
                    ready.node_id,
                    Status::KeyCacheMiss,
                    &format!(
                        "this server holds no key list {:016x}:{:016x} of {} keys from node {}: resend the keys",
                        id.lo, id.hi, id.len, h.sender
                    ),
                ));
                return None;
            }
        };
        return rebuilt(
            (core, ready, conn),
            &f,
            (FLAG_KEYS_CACHED, &keys),
            "the cached key list does not fit this request",
        );
    }
    if h.has(FLAG_CACHE_KEYS) {
        let keys = f.keys();
        let sorted = !h.has(FLAG_RANGE) && keys.windows(2).all(|w| w[0] < w[1]);
        if sorted && core.key_cache.store(h.sender, keys).is_some() {
            // The answer echoes the flag: the worker may name this list from now on.
            return Some(frame);
        }
        // Not stored (off, too long, or malformed keys that serving refuses): served
        // without the flag, so the answer does not claim it.
        return rebuilt(
            (core, ready, conn),
            &f,
            (FLAG_CACHE_KEYS, keys),
            "malformed request",
        );
    }
    Some(frame)
}

/// `f` in its own buffer, with `keys` and without header flag `clear`; a frame that does
/// not check is refused as a bad request, its reason after `why`.
fn rebuilt<'a>(
    (core, ready, conn): (&Core, &Ready, &Conn),
    f: &Frame<'_>,
    (clear, keys): (u16, &[u64]),
    why: &str,
) -> Option<RecvFrame<'a>> {
    let h = *f.header();
    let mut plain = h;
    plain.flags &= !clear;
    match OwnedFrame::assemble(&core.pool, plain, keys, f.values(), core.max_frame) {
        Ok(o) => Some(RecvFrame::Owned(o)),
        Err(e) => {
            let msg = format!("{why}: {e}");
            let _ = conn.send(proto::error_answer(
                &h,
                ready.node_id,
                Status::BadRequest,
                &msg,
            ));
            None
        }
    }
}
