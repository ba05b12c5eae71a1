//! The one-sided windows of a server: granting them (one per dense range a worker asks
//! for, inside what this server heads), keeping them equal to the store (every write to
//! their keys updates the store, then the window), retiring them when the table moves
//! their range, and applying pushes that land (replicated like any other push).

use std::sync::Arc;

use pserv_transport::Conn;

use crate::base::ids::{NodeId, Who, WorkerRank};
use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;
use crate::onesided::{LandedPush, Refused, Window, REFUSED_ELSEWHERE, REFUSED_ERROR};
use crate::placement::Partition;
use crate::proto::{self, Control, ReplicaPart};
use crate::replication::{EntryStore, HeldPart, KeysRef};

use super::handler::entries;
use super::route::{route, unheld_parts, Refusal};
use super::{AnyStore, Core, Ready, Typed};

/// Whether server `rank` heads every key of `r` under `table`.
pub(super) fn heads_all(table: &Partition, rank: u32, r: KeyRange) -> bool {
    matches!(table.split_range(r).as_slice(), [(s, p)] if *s == rank as usize && *p == r)
}

/// A worker asks for a one-sided window on `range`: grant it (creating the window on the
/// first request for the range, filled with the store's current values) or refuse, on
/// `conn`.
pub(super) fn open_window(
    core: &Core,
    conn: &Conn,
    sender: u32,
    range: KeyRange,
    host: &str,
    offers: &[(u8, Vec<u8>)],
) {
    let answer = match core.ready.get() {
        None => Control::WindowRefused {
            reason: "server has no cluster table yet".into(),
        },
        Some(ready) => match &ready.onesided {
            None => Control::WindowRefused {
                reason: "the server runs with --transport tcp".into(),
            },
            Some(os) => match NodeId(sender).who(ready.servers) {
                Who::Worker(WorkerRank(worker)) => {
                    // The table stays as it is until the window is listed: a switch that
                    // takes the range away then finds it, and retires it.
                    let table = ready.table.read();
                    if !heads_all(&table, ready.rank, range) {
                        Control::WindowRefused {
                            reason: format!(
                                "this server does not head all of {range} under routing table {}",
                                table.epoch()
                            ),
                        }
                    } else if let Some(from) = ready.repl.handoff_pending(KeysRef::Range(range)) {
                        Control::WindowRefused {
                            reason: format!(
                                "{range} is not handed over by server {from} yet; ask again later"
                            ),
                        }
                    } else {
                        let init = |w: &Window| match &ready.store {
                            AnyStore::F32(t) => fill_window(t, w),
                            AnyStore::F64(t) => fill_window(t, w),
                        };
                        match os.grant(worker, range, host, offers, init) {
                            Ok(grant) => Control::WindowGranted { grant },
                            Err(reason) => Control::WindowRefused { reason },
                        }
                    }
                }
                _ => Control::WindowRefused {
                    reason: format!(
                        "node {sender} is not a worker: windows are granted to workers"
                    ),
                },
            },
        },
    };
    let _ = conn.send(answer.to_frame(core.ready.get().map_or(0, |r| r.node_id)));
}

/// Copy the store's values of the window's range into the new window.
fn fill_window<T: Value>(t: &Typed<T>, w: &Window) {
    let mut vals = vec![T::default(); w.range.len() as usize * t.store.value_len()];
    if let Err(e) = t.store.pull_range(w.range, &mut vals) {
        tracing::warn!(error = %e, "could not copy the store into the window; it starts at zero");
        return;
    }
    w.init(bytemuck::cast_slice(&vals));
}

/// The smallest range holding every key of `keys` (None: no keys).
pub(super) fn span_of(keys: KeysRef<'_>) -> Option<KeyRange> {
    match keys {
        KeysRef::Range(r) => (!r.is_empty()).then_some(r),
        KeysRef::List(k) => match (k.first(), k.last()) {
            (Some(&a), Some(&b)) if a <= b && b < Key::MAX => Some(KeyRange::new(a, b + 1)),
            _ => None,
        },
    }
}

/// Run `write` (a store update of `keys`) so that every window holding some of them
/// shows its effect before this returns: the windows' writer locks are held across the
/// update and the copy of the new values into them.
pub(super) fn write_through<R>(
    ready: &Ready,
    keys: Option<KeysRef<'_>>,
    write: impl FnOnce() -> R,
) -> R {
    let windows = touched_windows(ready, keys);
    if windows.is_empty() {
        return write();
    }
    let guards: Vec<_> = windows.iter().map(|(w, _)| w.lock_writes()).collect();
    let out = write();
    refresh_all(ready, &windows);
    drop(guards);
    out
}

/// The windows holding some of `keys`, each with the part of it `keys` span.
fn touched_windows(ready: &Ready, keys: Option<KeysRef<'_>>) -> Vec<(Arc<Window>, KeyRange)> {
    let (Some(os), Some(keys)) = (ready.onesided.as_ref(), keys) else {
        return Vec::new();
    };
    let Some(span) = span_of(keys) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for w in os.windows_touching(span) {
        let part = match keys {
            KeysRef::Range(r) => w.range.intersect(&r),
            KeysRef::List(k) => {
                let a = k.partition_point(|&x| x < w.range.begin);
                let b = k.partition_point(|&x| x < w.range.end);
                (a < b).then(|| KeyRange::new(k[a], k[b - 1] + 1))
            }
        };
        if let Some(part) = part {
            out.push((w, part));
        }
    }
    out
}

fn refresh_all(ready: &Ready, windows: &[(Arc<Window>, KeyRange)]) {
    for (w, part) in windows {
        match &ready.store {
            AnyStore::F32(t) => refresh(t, w, *part),
            AnyStore::F64(t) => refresh(t, w, *part),
        }
    }
}

/// Copy the store's values of `part` into window `w` (its writer lock held).
fn refresh<T: Value>(t: &Typed<T>, w: &Window, part: KeyRange) {
    let mut vals = vec![T::default(); part.len() as usize * t.store.value_len()];
    match t.store.pull_range(part, &mut vals) {
        Ok(()) => w.refresh(part, bytemuck::cast_slice(&vals)),
        Err(e) => tracing::error!(error = %e, %part, "could not copy the store into a window"),
    }
}

/// Replication sees the store through the server, so that installing a batch into keys
/// of a window (a range handed over while a window on it was being set up) updates the
/// window too.
impl EntryStore for Ready {
    fn read_keys(&self, keys: &[Key]) -> (Vec<u8>, Vec<u8>) {
        store_entries(self).read_keys(keys)
    }

    fn read_range(&self, range: KeyRange) -> (Vec<u8>, Vec<u8>) {
        store_entries(self).read_range(range)
    }

    fn install(&self, part: &ReplicaPart) -> Result<(), String> {
        let list: Vec<Key>;
        let keys = match part {
            ReplicaPart::Range { range, .. } => Some(KeysRef::Range(*range)),
            ReplicaPart::Keys { keys, .. } if keys.len().is_multiple_of(8) => {
                list = crate::replication::entries::pod_vec(keys);
                list.windows(2)
                    .all(|p| p[0] < p[1])
                    .then_some(KeysRef::List(&list))
            }
            ReplicaPart::Keys { .. } => None,
        };
        let windows = touched_windows(self, keys);
        if windows.is_empty() {
            return store_entries(self).install(part);
        }
        // Installs run under the replication core's lock, and a push to a window's keys
        // holds the window's writer lock while it asks the core whether it holds the
        // push: so the writer locks are only tried here. A window that cannot be locked
        // at once is retired (its readers go over TCP, to the store) rather than left
        // without the installed values.
        let mut guards = Vec::new();
        let mut kept = Vec::new();
        for (w, p) in &windows {
            match w.try_lock_writes() {
                Some(g) => {
                    guards.push(g);
                    kept.push((w.clone(), *p));
                }
                None => {
                    if let Some(os) = &self.onesided {
                        os.retire_now(w);
                    }
                }
            }
        }
        let out = store_entries(self).install(part);
        refresh_all(self, &kept);
        drop(guards);
        out
    }

    fn stored_keys(&self, ranges: &[KeyRange]) -> Vec<Key> {
        store_entries(self).stored_keys(ranges)
    }

    fn shape(&self) -> (usize, usize, usize) {
        store_entries(self).shape()
    }
}

fn store_entries(ready: &Ready) -> &dyn EntryStore {
    match &ready.store {
        AnyStore::F32(t) => &t.store,
        AnyStore::F64(t) => &t.store,
    }
}

/// Apply one chunk of a push that landed one-sidedly, as a TCP push is applied: routed
/// (epoch, ownership, hand-off), applied to the store and the window, then queued for
/// replication; its done word is written once every replica of its ranges holds it (at
/// once without replication). Where the table replicates, the push is applied whole at
/// its last chunk (a batch never carries part of a push); without, chunk by chunk as
/// they land.
pub(super) fn apply_landed(
    ready: &Ready,
    push: &LandedPush<'_>,
    allow_non_finite: bool,
) -> Result<(), Refused> {
    let error = |msg: String| Refused {
        code: REFUSED_ERROR,
        msg,
    };
    let first = push.chunk == 0;
    let last = push.chunk + 1 == push.chunks;
    let func_known = match &ready.store {
        AnyStore::F32(t) => t.updates.get(push.func).is_some(),
        AnyStore::F64(t) => t.updates.get(push.func).is_some(),
    };
    if !func_known {
        return Err(error(format!("no update function with id {}", push.func)));
    }
    if first {
        let bad = match (&ready.store, allow_non_finite) {
            (_, true) => None,
            (AnyStore::F32(t), false) => non_finite_landed(t, push),
            (AnyStore::F64(t), false) => non_finite_landed(t, push),
        };
        push.set_refused(bad.is_some());
        if let Some(msg) = bad {
            return Err(error(msg));
        }
    } else if push.refused() {
        return Err(error(
            "an earlier chunk of this one-sided push was refused: nothing of it is applied".into(),
        ));
    }
    let table = ready.table.read();
    if first {
        push.set_whole(table.replicas() > 0);
    }
    let whole = push.whole();
    // What is applied now: the whole push at its last chunk, or this chunk.
    let (apply, off) = match (whole, last) {
        (true, false) => return Ok(()),
        (true, true) => (push.range, push.values_off()),
        (false, _) => (push.part, push.part_off),
    };
    // Routing is checked before anything of the push is applied (the first chunk, or the
    // whole push): then it is applied to the end.
    if first || whole {
        if push.window.is_retired() {
            return Err(Refused {
                code: REFUSED_ELSEWHERE,
                msg: format!(
                    "window {} retired: this server no longer heads it",
                    push.window.range
                ),
            });
        }
        let epoch = u32::try_from(push.epoch).unwrap_or(u32::MAX);
        if let Some(Refusal(status, msg)) = route(
            &table,
            ready.rank as usize,
            epoch,
            KeysRef::Range(push.range),
            |k| ready.repl.handoff_pending(k),
        ) {
            return Err(Refused {
                code: REFUSED_ELSEWHERE,
                msg: format!("{status}: {msg}"),
            });
        }
    }
    let sender = NodeId::worker(WorkerRank(push.worker), ready.servers).0;
    let writing = ready.repl.begin_write();
    let applying = ready.repl.applying();
    // The same piece resent over TCP (its acknowledgement came too late) and applied
    // already: only what is not held is applied (as for a TCP push resent).
    let held = if whole {
        ready.repl.held(
            sender,
            proto::push_id(push.timestamp),
            KeysRef::Range(push.range),
        )
    } else {
        HeldPart::Nothing
    };
    let parts = match &held {
        HeldPart::Nothing => vec![apply],
        HeldPart::All => Vec::new(),
        HeldPart::Part(h) => unheld_parts(apply, h),
    };
    if held != HeldPart::All {
        ready.repl.note_apply(table.epoch(), KeysRef::Range(apply));
    }
    let applied = match &ready.store {
        AnyStore::F32(t) => apply_parts(ready, t, push, &parts, apply, off),
        AnyStore::F64(t) => apply_parts(ready, t, push, &parts, apply, off),
    };
    if let Err(msg) = applied {
        return Err(error(msg));
    }
    if !last {
        return Ok(());
    }
    let done = push.done();
    let full = ready.repl.after_apply_with(
        &table,
        sender,
        proto::push_id(push.timestamp),
        KeysRef::Range(push.range),
        Box::new(move || done.finish()),
    );
    let epoch = table.epoch();
    drop(applying);
    drop(table);
    writing.end(entries(ready), epoch, full);
    Ok(())
}

/// Apply the gradients of the key ranges `parts` of `apply`, whose values landed from
/// byte offset `off` of the landing area on.
fn apply_parts<T: Value>(
    ready: &Ready,
    t: &Typed<T>,
    push: &LandedPush<'_>,
    parts: &[KeyRange],
    apply: KeyRange,
    off: usize,
) -> Result<(), String> {
    let f = t
        .updates
        .get(push.func)
        .ok_or_else(|| format!("no update function with id {}", push.func))?;
    let vlen = t.store.value_len();
    for &part in parts {
        let at = off + (part.begin - apply.begin) as usize * push.value_bytes();
        let mut g = vec![T::default(); part.len() as usize * vlen];
        push.mem.copy_out(at, bytemuck::cast_slice_mut(&mut g));
        write_through(ready, Some(KeysRef::Range(part)), || {
            t.store.push_range(part, &g, f.as_ref())
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The refusal of a landed push holding NaN or an infinity, naming the key; every value
/// of the whole push has landed by its first chunk, so it is refused whole, before any
/// chunk is applied, like a TCP push.
fn non_finite_landed<T: Value>(t: &Typed<T>, push: &LandedPush<'_>) -> Option<String> {
    let vlen = t.store.value_len().max(1);
    // In pieces of at most 1 MiB of values: a bounded buffer for any push.
    let per = ((1 << 20) / (vlen * std::mem::size_of::<T>())).max(1) as u64;
    let mut g: Vec<T> = Vec::new();
    let mut begin = push.range.begin;
    while begin < push.range.end {
        let end = push.range.end.min(begin + per);
        g.clear();
        g.resize((end - begin) as usize * vlen, T::default());
        let at = push.values_off() + (begin - push.range.begin) as usize * push.value_bytes();
        push.mem.copy_out(at, bytemuck::cast_slice_mut(&mut g));
        if g.iter().fold(false, |bad, v| bad | !v.is_finite()) {
            let i = g.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Some(format!(
                "the one-sided push holds a non-finite value ({}) for key {}: refused whole, \
                 nothing applied (a server started with --allow-non-finite applies such pushes)",
                g[i].to_f64(),
                begin + (i / vlen) as u64
            ));
        }
        begin = end;
    }
    None
}
