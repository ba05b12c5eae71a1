//! The one-sided window of a server: granting it, filling it, applying landed pushes,
//! and serving TCP requests for its keys from it.

use pserv_transport::wire::MessageKind;
use pserv_transport::{Conn, Frame, OutFrame, Payload};

use crate::base::ids::{NodeId, Who, WorkerRank};
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::onesided::Window;
use crate::proto::{self, Control, Status};

use super::route::Refusal;
use super::{AnyStore, Core, Ready, Typed};

/// A worker asks for the one-sided window on `range`: grant it (creating the window on
/// the first request, filled with the store's current values) or refuse, on `conn`.
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
        Some(ready) if ready.table.read().replicas() > 0 => Control::WindowRefused {
            reason: "the cluster replicates (--replicas): one-sided pushes would bypass the chain, so this range stays on tcp".into(),
        },
        Some(ready) => match &ready.onesided {
            None => Control::WindowRefused {
                reason: "the server runs with --transport tcp".into(),
            },
            Some(os) => match NodeId(sender).who(ready.servers) {
                Who::Worker(WorkerRank(worker)) => {
                    let init = |w: &Window| match &ready.store {
                        AnyStore::F32(t) => fill_window(t, w),
                        AnyStore::F64(t) => fill_window(t, w),
                    };
                    match os.grant(worker, range, host, offers, init) {
                        Ok(grant) => Control::WindowGranted { grant },
                        Err(reason) => Control::WindowRefused { reason },
                    }
                }
                _ => Control::WindowRefused {
                    reason: format!("node {sender} is not a worker: windows are granted to workers"),
                },
            },
        },
    };
    let _ = conn.send(answer.to_frame(core.ready.get().map_or(0, |r| r.node_id)));
}

/// Copy the store's values of the window's range into the new window.
pub(super) fn fill_window<T: Value>(t: &Typed<T>, w: &Window) {
    let mut vals = vec![T::default(); w.range.len() as usize * t.store.value_len()];
    if let Err(e) = t.store.pull_range(w.range, &mut vals) {
        tracing::warn!(error = %e, "could not copy the store into the window; it starts at zero");
        return;
    }
    w.init(bytemuck::cast_slice(&vals));
}

/// Apply a push that landed one-sidedly: function `func` on range `r` of the window,
/// with the gradients in `mem` at byte offset `off`.
pub(super) fn apply_landed<T: Value>(
    t: &Typed<T>,
    w: &Window,
    func: u16,
    r: KeyRange,
    mem: &dyn pserv_transport::onesided::Memory,
    off: usize,
) -> Result<(), String> {
    let f = t
        .updates
        .get(func)
        .ok_or_else(|| format!("no update function with id {func}"))?;
    w.check_rule(f.as_ref())?;
    w.push_range_landed(r, mem, off, f.as_ref());
    Ok(())
}

/// Serve a request whose keys all lie in the one-sided window.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve_window<T: Value>(
    core: &Core,
    ready: &Ready,
    t: &Typed<T>,
    w: &Window,
    f: &Frame<'_>,
    kind: MessageKind,
    range: Option<KeyRange>,
    out_elems: usize,
) -> Result<Option<OutFrame>, Refusal> {
    let h = f.header();
    let bad = |msg: String| Refusal(Status::BadRequest, msg);
    let grads = || {
        f.values_as::<T>()
            .ok_or_else(|| bad("value bytes are not a whole number of values".into()))
    };
    let update = || -> Result<_, Refusal> {
        let fun = t.updates.get(h.func).ok_or_else(|| {
            Refusal(
                Status::UnknownFunction,
                format!("no update function with id {}", h.func),
            )
        })?;
        w.check_rule(fun.as_ref()).map_err(bad)?;
        Ok(fun)
    };
    if matches!(kind, MessageKind::Push | MessageKind::PushPull) {
        let fun = update()?;
        match range {
            Some(r) => w.push_range(r, grads()?, fun.as_ref()),
            None => w.push_keys(f.keys(), grads()?, fun.as_ref()),
        }
        if kind == MessageKind::Push {
            return Ok(Some(proto::answer(h, ready.node_id, 0, Payload::empty())));
        }
    }
    let mut buf = core.pool.take(out_elems * std::mem::size_of::<T>());
    {
        let out: &mut [T] = bytemuck::cast_slice_mut(buf.bytes_mut());
        match range {
            Some(r) => w.pull_range(r, out),
            None => w.pull_keys(f.keys(), out),
        }
        .map_err(|e| Refusal(Status::BadRequest, e))?;
        if kind == MessageKind::Pull {
            super::serve::filter_answer(t, h, range, f.keys(), out)?;
        }
    }
    Ok(Some(proto::answer(
        h,
        ready.node_id,
        t.store.value_len() as u32,
        Payload::owned(buf),
    )))
}
