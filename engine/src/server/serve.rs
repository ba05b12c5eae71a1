//! Serving one data request against the store: checks, exactly-once, the update
//! function, the answer, and queueing the push for replication.

use std::time::Duration;

use pserv_transport::wire::{MessageKind, FLAG_RESPONSE};
use pserv_transport::{Conn, Frame, OutFrame, Payload};

use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::filter::AnswerKeys;
use crate::placement::Partition;
use crate::proto::{self, Status};
use crate::replication::{HeldPart, KeysRef};

use super::handler::{entries, keys_of, refuse};
use super::route::{route, unheld_keys, unheld_parts, Refusal};
use super::window::write_through;
use super::{AnyStore, Core, Ready, Typed};

/// Serve a data request and send the answer (or the refusal). `clock` goes into the
/// answer: the smallest worker clock the server had when it answered.
pub(super) fn answer_request(core: &Core, ready: &Ready, f: &Frame<'_>, conn: &Conn, clock: u64) {
    let h = *f.header();
    // The routing table stays as it is until the push is applied and queued for
    // replication: a table change then finds it queued, under the chains it was applied
    // for (and sends it before its hand-off markers).
    let table = ready.table.read();
    let is_write = h.kind == MessageKind::Push as u8 || h.kind == MessageKind::PushPull as u8;
    // Only a write is ordered against the replication flushes (a flush reads the entries
    // of whole pushes); a read takes no part in it, so it never waits for a flush.
    let writing = is_write.then(|| ready.repl.begin_write());
    let applying = is_write.then(|| ready.repl.applying());
    // A write to keys of a one-sided window shows in the window before it is answered.
    let touched = if is_write { keys_of(f) } else { None };
    let answer = write_through(ready, touched, || match &ready.store {
        AnyStore::F32(t) => serve(core, ready, &table, t, f, conn, clock),
        AnyStore::F64(t) => serve(core, ready, &table, t, f, conn, clock),
    });
    let out = match answer {
        Ok(Some(frame)) => frame,
        Ok(None) => return,
        Err(refusal) => {
            drop(applying);
            drop(table);
            return refuse(ready, conn, &h, refusal);
        }
    };
    if is_write && out.header().status == Status::Ok as u8 {
        // The answer waits until every replica of the touched ranges holds the push.
        let keys = match f.range() {
            Some((b, e)) => KeysRef::Range(KeyRange::new(b, e)),
            None => KeysRef::List(f.keys()),
        };
        let full = ready.repl.after_apply(
            &table,
            h.sender,
            proto::push_id(h.timestamp),
            keys,
            conn,
            out,
        );
        let epoch = table.epoch();
        drop(applying);
        drop(table);
        match writing {
            Some(w) => w.end(entries(ready), epoch, full),
            None => ready.repl.flush_chains(entries(ready), epoch, full),
        }
        return;
    }
    // A failed send means the worker is gone; the transport logs and closes it.
    let _ = conn.send(out);
}

/// The refusal of a push whose values hold NaN or an infinity, naming the first such
/// key; `None` when every value is finite, when the request carries no values of this
/// server's type (`serve` refuses those with their own reason), or when the server
/// applies such pushes (`--allow-non-finite`). Checked before the clock gate sees the
/// push, so a refused push is neither applied nor counted.
pub(super) fn non_finite(core: &Core, ready: &Ready, f: &Frame<'_>) -> Option<Refusal> {
    let h = f.header();
    let is_write = h.kind == MessageKind::Push as u8 || h.kind == MessageKind::PushPull as u8;
    if core.allow_non_finite || !is_write {
        return None;
    }
    let (at, value) = match &ready.store {
        AnyStore::F32(t) => first_non_finite::<f32>(f, t.store.value_len())?,
        AnyStore::F64(t) => first_non_finite::<f64>(f, t.store.value_len())?,
    };
    let key = match f.range() {
        Some((b, _)) => b.saturating_add(at),
        None => f.keys().get(at as usize).copied().unwrap_or(u64::MAX),
    };
    Some(Refusal(
        Status::BadRequest,
        format!(
            "the push holds a non-finite value ({value}) for key {key}: refused whole, \
             nothing applied (a server started with --allow-non-finite applies such pushes)"
        ),
    ))
}

/// The key index and value of the first non-finite value of `f`'s values as `T`
/// (`vlen` values per key).
fn first_non_finite<T: Value>(f: &Frame<'_>, vlen: usize) -> Option<(u64, f64)> {
    if f.header().dtype != T::DTYPE as u8 {
        return None;
    }
    let vals = f.values_as::<T>()?;
    // Whole chunks are tested without branches (the loop vectorises); only a chunk that
    // holds a bad value is searched.
    const CHUNK: usize = 1024;
    for (c, chunk) in vals.chunks(CHUNK).enumerate() {
        if chunk.iter().fold(false, |bad, v| bad | !v.is_finite()) {
            let i = chunk.iter().position(|v| !v.is_finite())?;
            let at = c * CHUNK + i;
            return Some(((at / vlen.max(1)) as u64, chunk[i].to_f64()));
        }
    }
    None
}

/// Range pulls of at least this many bytes are sent straight from the store.
pub(super) const BORROW_MIN_BYTES: usize = 256 << 10;
/// How long a loop may wait for a slow reader while sending from the store, before it
/// copies the rest and moves on.
pub(super) const BORROW_BLOCK_MAX: Duration = Duration::from_millis(50);

/// Serve one data request against the typed store. Returns the answer to send, or `None`
/// when the answer was sent already (large range pulls go straight from the store).
#[allow(clippy::too_many_arguments)]
pub(super) fn serve<T: Value>(
    core: &Core,
    ready: &Ready,
    table: &Partition,
    t: &Typed<T>,
    f: &Frame<'_>,
    conn: &Conn,
    clock: u64,
) -> Result<Option<OutFrame>, Refusal> {
    let mut answered = *f.header();
    answered.clock = clock;
    let h = &answered;
    let bad = |msg: String| Refusal(Status::BadRequest, msg);
    if h.has(FLAG_RESPONSE) {
        return Err(bad("servers do not take answers".into()));
    }
    if h.dtype != T::DTYPE as u8 {
        return Err(Refusal(
            Status::WrongType,
            format!(
                "values of type tag {}, this server stores {:?}",
                h.dtype,
                T::DTYPE
            ),
        ));
    }
    let vlen = t.store.value_len();
    if h.value_len as usize != vlen {
        return Err(bad(format!(
            "{} values per key, this server stores {vlen}",
            h.value_len
        )));
    }
    let kind = MessageKind::from_u8(h.kind).ok_or_else(|| bad("unknown kind".into()))?;
    let update = || {
        t.updates.get(h.func).ok_or_else(|| {
            Refusal(
                Status::UnknownFunction,
                format!("no update function with id {}", h.func),
            )
        })
    };
    let grads = || {
        f.values_as::<T>()
            .ok_or_else(|| bad("value bytes are not a whole number of values".into()))
    };
    let range = f.range().map(|(b, e)| KeyRange::new(b, e));
    let keys_here = match range {
        Some(r) => r.len(),
        None => f.keys().len() as u64,
    };
    let out_elems = keys_here
        .checked_mul(vlen as u64)
        .filter(|n| n.saturating_mul(std::mem::size_of::<T>() as u64) <= core.max_frame as u64)
        .ok_or_else(|| {
            bad(format!(
                "answer for {keys_here} keys would exceed the frame limit"
            ))
        })? as usize;
    let needs_values = matches!(kind, MessageKind::Push | MessageKind::PushPull);
    if needs_values && f.values().len() != out_elems * std::mem::size_of::<T>() {
        return Err(bad(format!(
            "{} value bytes for {keys_here} keys x {vlen} values",
            f.values().len()
        )));
    }
    if !needs_values && !f.values().is_empty() {
        return Err(bad("a pull carries no values".into()));
    }
    if kind == MessageKind::Control {
        return Err(bad("unexpected control message".into()));
    }
    let request_keys = match range {
        Some(r) => KeysRef::Range(r),
        None => KeysRef::List(f.keys()),
    };
    if let Some(refusal) = route(table, ready.rank as usize, h.epoch, request_keys, |k| {
        ready.repl.handoff_pending(k)
    }) {
        return Err(refusal);
    }
    // A push resent after a failover that this server holds already (as the old head's
    // replica): apply nothing, answer as applied (after re-replicating). Held in part (a
    // resent piece whose keys were split differently from the batches that brought some
    // of them): apply only the rest.
    let held = if matches!(kind, MessageKind::Push | MessageKind::PushPull)
        && (table.replicas() > 0 || ready.replace_workers)
    {
        ready
            .repl
            .held(h.sender, proto::push_id(h.timestamp), request_keys)
    } else {
        HeldPart::Nothing
    };
    if held != HeldPart::All && matches!(kind, MessageKind::Push | MessageKind::PushPull) {
        ready.repl.note_apply(table.epoch(), request_keys);
    }
    if held != HeldPart::Nothing {
        if let HeldPart::Part(held) = &held {
            let fun = update()?;
            let g = grads()?;
            match range {
                Some(r) => {
                    for part in unheld_parts(r, held) {
                        let at = (part.begin - r.begin) as usize * vlen;
                        let n = part.len() as usize * vlen;
                        t.store.push_range(part, &g[at..at + n], fun.as_ref())?;
                    }
                }
                None => {
                    let mut keys = Vec::new();
                    let mut vals = Vec::new();
                    for i in unheld_keys(f.keys(), held) {
                        keys.push(f.keys()[i]);
                        vals.extend_from_slice(&g[i * vlen..(i + 1) * vlen]);
                    }
                    t.store.push(&keys, &vals, fun.as_ref())?;
                }
            }
        }
        tracing::info!(
            sender = h.sender,
            ts = proto::push_id(h.timestamp),
            all = held == HeldPart::All,
            "push resent after a failover is here already (all of it, or the rest applied now)"
        );
        let mut buf = core.pool.take(if kind == MessageKind::PushPull {
            out_elems * std::mem::size_of::<T>()
        } else {
            0
        });
        if kind == MessageKind::PushPull {
            let out: &mut [T] = bytemuck::cast_slice_mut(buf.bytes_mut());
            match range {
                Some(r) => t.store.pull_range(r, out)?,
                None => t.store.pull(f.keys(), out)?,
            }
            return Ok(Some(proto::answer(
                h,
                ready.node_id,
                vlen as u32,
                Payload::owned(buf),
            )));
        }
        return Ok(Some(proto::answer(h, ready.node_id, 0, Payload::empty())));
    }
    // A sequential pull of a job that replaces failed workers: asked again (by the
    // replacement of the worker that asked it first), it gets the first answer.
    let kept_pull = ready.replace_workers
        && kind == MessageKind::Pull
        && range.is_none()
        && h.has(pserv_transport::wire::FLAG_ORDERED);
    let pull_id = proto::push_id(h.timestamp);
    if kept_pull {
        let kept = ready.pulls_answered.lock();
        let hit = kept.get(&h.sender).and_then(|q| {
            q.iter()
                .find(|(id, keys, _)| *id == pull_id && keys.as_slice() == f.keys())
        });
        if let Some((_, _, bytes)) = hit {
            let mut buf = core.pool.take(bytes.len());
            buf.bytes_mut().copy_from_slice(bytes);
            tracing::info!(
                sender = h.sender,
                ts = pull_id,
                "a sequential pull asked again (a replacement): answered as the first time"
            );
            return Ok(Some(proto::answer(
                h,
                ready.node_id,
                vlen as u32,
                Payload::owned(buf),
            )));
        }
    }
    match kind {
        MessageKind::Push => {
            let fun = update()?;
            match range {
                Some(r) => t.store.push_range(r, grads()?, fun.as_ref())?,
                None => t.store.push(f.keys(), grads()?, fun.as_ref())?,
            }
            if let Some(k) = crate::replication::trace_key() {
                if range.is_none() && f.keys().binary_search(&k).is_ok() {
                    let mut v = vec![T::default(); vlen];
                    let _ = t.store.pull(&[k], &mut v);
                    tracing::info!(sender = h.sender, stamp = h.timestamp, epoch = h.epoch, table = table.epoch(), value = ?v[0], "TRACE apply");
                }
            }
            Ok(Some(proto::answer(h, ready.node_id, 0, Payload::empty())))
        }
        MessageKind::Pull
            if range.is_some()
                && h.func == crate::filter::ANSWER_NONE
                && out_elems * std::mem::size_of::<T>() >= BORROW_MIN_BYTES =>
        {
            let r = range.expect("checked by the guard");
            let header = *proto::answer(h, ready.node_id, vlen as u32, Payload::empty()).header();
            // Zero copy: write the answer from the dense blocks, under their shards' locks.
            let sent = t.store.with_dense_range(r, |parts| {
                let bytes: Vec<&[u8]> = parts.iter().map(|p| bytemuck::cast_slice(p)).collect();
                conn.send_borrowed(header, Payload::empty(), &bytes, BORROW_BLOCK_MAX)
            })?;
            match sent {
                Some(_) => Ok(None),
                None => {
                    let mut buf = core.pool.take(out_elems * std::mem::size_of::<T>());
                    t.store
                        .pull_range(r, bytemuck::cast_slice_mut(buf.bytes_mut()))?;
                    Ok(Some(proto::answer(
                        h,
                        ready.node_id,
                        vlen as u32,
                        Payload::owned(buf),
                    )))
                }
            }
        }
        MessageKind::Pull | MessageKind::PushPull => {
            let mut buf = core.pool.take(out_elems * std::mem::size_of::<T>());
            {
                let out: &mut [T] = bytemuck::cast_slice_mut(buf.bytes_mut());
                match (kind, range) {
                    (MessageKind::Pull, Some(r)) => t.store.pull_range(r, out)?,
                    (MessageKind::Pull, None) => t.store.pull(f.keys(), out)?,
                    (_, Some(r)) => {
                        t.store
                            .push_pull_range(r, grads()?, update()?.as_ref(), out)?
                    }
                    (_, None) => t
                        .store
                        .push_pull(f.keys(), grads()?, update()?.as_ref(), out)?,
                }
                if kind == MessageKind::Pull {
                    filter_answer(t, h, range, f.keys(), out)?;
                }
            }
            if kept_pull {
                let mut kept = ready.pulls_answered.lock();
                let q = kept.entry(h.sender).or_default();
                q.push_back((pull_id, f.keys().to_vec(), buf.bytes().to_vec()));
                while q.len() > super::PULLS_KEPT {
                    q.pop_front();
                }
            }
            Ok(Some(proto::answer(
                h,
                ready.node_id,
                vlen as u32,
                Payload::owned(buf),
            )))
        }
        MessageKind::Control => Err(bad("unexpected control message".into())),
    }
}

/// Run the answer filter a pull names (its function id; 0: none) on its values.
pub(super) fn filter_answer<T: Value>(
    t: &Typed<T>,
    h: &pserv_transport::Header,
    range: Option<KeyRange>,
    keys: &[u64],
    out: &mut [T],
) -> Result<(), Refusal> {
    let keys = match range {
        Some(r) => AnswerKeys::Range(r),
        None => AnswerKeys::List(keys),
    };
    t.answers
        .apply(h.func, keys, t.store.value_len(), out)
        .map_err(|m| Refusal(Status::UnknownFunction, m))
}
