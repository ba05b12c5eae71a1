//! Dense ranges over one-sided windows: attaching them, and pushing and pulling through
//! them (with TCP for the parts outside).

use std::time::Duration;

use pserv_transport::wire::MessageKind;

use crate::base::error::EngineError;
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::onesided::{ClientOneSided, ClientWindow};
use crate::proto::Control;

use super::config::TaskOpts;
use super::request::Request;
use super::retry::Failure;
use super::shared::Shared;
use super::tasks::Outcome;
use super::Worker;

impl Worker {
    /// Attach the servers' one-sided windows covering `range`: each server's part of it
    /// (a run of the routing table's ranges it heads) becomes one of its windows; a
    /// server has as many windows as ranges asked for, disjoint. Returns, per server
    /// part, whether it is one-sided and why: a server that runs over TCP only, a backend
    /// the two ends do not share, a part that overlaps another window of the server
    /// without being it, or windows past the server's bound on registered bytes leave
    /// that part on TCP (logged). With `--transport tcp` nothing is attached. Call it
    /// before pushing and pulling the range, on every worker that wants the one-sided
    /// path; after a table change, calling it again attaches the new heads' windows.
    pub fn open_window(&self, range: KeyRange) -> Result<Vec<(u32, bool, String)>, EngineError> {
        let mut out = Vec::new();
        let table = self.table();
        let Some(os) = &self.onesided else {
            return Ok(table
                .split_range(range)
                .into_iter()
                .map(|(s, _)| (s as u32, false, "transport tcp".to_owned()))
                .collect());
        };
        let host = crate::onesided::host_id();
        for (server, piece) in table.split_range(range) {
            let server = server as u32;
            if os
                .window_for(server, &piece)
                .is_some_and(|w| w.range == piece)
            {
                out.push((
                    server,
                    true,
                    format!("{}: attached already", os.backend.kind()),
                ));
                continue;
            }
            let (pending, endpoint) = os.backend.prepare()?;
            let msg = Control::OpenWindow {
                range: piece,
                host: host.clone(),
                offers: vec![(os.backend.kind() as u8, endpoint)],
            };
            let conn = self
                .core
                .servers
                .read()
                .get(server as usize)
                .and_then(Option::clone)
                .ok_or(EngineError::Disconnected { server })?;
            conn.send(msg.to_frame(self.node_id))?;
            let answer = self
                .control
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| {
                    EngineError::Timeout(format!(
                        "server {server} did not answer the window request"
                    ))
                })?;
            match answer {
                Control::WindowGranted { grant } => {
                    os.attach(server, pending, &grant)?;
                    tracing::info!(
                        server,
                        range = %piece,
                        backend = %os.backend.kind(),
                        reason = %grant.reason,
                        "one-sided window attached"
                    );
                    out.push((
                        server,
                        true,
                        format!("{}: {}", os.backend.kind(), grant.reason),
                    ));
                }
                Control::WindowRefused { reason } => {
                    tracing::info!(server, range = %piece, %reason, "no one-sided window; this part stays on tcp");
                    out.push((server, false, reason));
                }
                other => {
                    return Err(EngineError::InvalidRequest(format!(
                        "unexpected answer to a window request: {other:?}"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The oldest clock a pull with these options may reflect (0: any).
    fn pull_min_clock(&self, opts: &TaskOpts) -> u64 {
        let clock = self.clock();
        if clock == 0 {
            0
        } else {
            opts.consistency
                .unwrap_or(self.consistency)
                .min_clock(clock)
        }
    }

    /// Pull the dense values of `range` straight into `out` (`range.len() * value_len`
    /// values) and return when they are there. Parts inside attached one-sided windows
    /// ([`open_window`](Self::open_window)) are one-sided reads of the servers' memory
    /// (after waiting, one-sidedly, for the servers' clock when the pull is clocked);
    /// other parts go over TCP. A window its server retired (it no longer heads the
    /// range, after a table change) or whose server's connection closed is detached and
    /// its part read over TCP instead, so a read never returns a window's stale values.
    pub fn pull_range_into<T: Value>(
        &self,
        range: KeyRange,
        out: &mut [T],
        opts: &TaskOpts,
    ) -> Result<(), EngineError> {
        self.check_types::<T>()?;
        let vl = self.value_len();
        if out.len() as u64 != range.len() * vl as u64 {
            return Err(EngineError::InvalidRequest(format!(
                "{} values for {} keys x {vl}",
                out.len(),
                range.len()
            )));
        }
        let mut at = 0usize;
        for (server, piece) in self.table().split_range(range) {
            let n = piece.len() as usize * vl;
            let dst = &mut out[at..at + n];
            at += n;
            let server = server as u32;
            if let Some(os) = self.onesided.as_ref() {
                if let Some(ws) = os.windows_covering(server, &piece) {
                    match self.pull_one_sided(os, server, &ws, piece, dst, opts) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        // A broken path (a queue pair in error, a peer's NIC that stopped
                        // answering, a mapping that went away): the keys are read over
                        // TCP. Reads change nothing, so reading again is safe.
                        Err(e @ EngineError::OneSided(_)) => {
                            tracing::warn!(server, %piece, error = %e, "one-sided pull failed; this server's windows go over TCP from now on");
                            os.detach(server);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let p = self.wait_pull::<T>(self.pull_range_opts::<T>(piece, opts))?;
            p.copy_to(dst);
        }
        Ok(())
    }

    /// Read `piece` of `server` from its windows `ws` (which cover it, in key order) into
    /// `dst`. `Ok(false)`: a window was retired or the server is gone (detached): read it
    /// over TCP.
    fn pull_one_sided<T: Value>(
        &self,
        os: &ClientOneSided,
        server: u32,
        ws: &[std::sync::Arc<ClientWindow>],
        piece: KeyRange,
        dst: &mut [T],
        opts: &TaskOpts,
    ) -> Result<bool, EngineError> {
        let vl = self.value_len();
        let min_clock = self.pull_min_clock(opts);
        for w in ws {
            let Some(part) = w.range.intersect(&piece) else {
                continue;
            };
            let from = (part.begin - piece.begin) as usize * vl;
            let to = from + part.len() as usize * vl;
            os.wait_clock(w, min_clock, self.timeout)?;
            os.read(w, part, bytemuck::cast_slice_mut(&mut dst[from..to]))?;
            // Checked after the read: a window retired (or a server gone) before it may
            // show values its range's new head has since changed.
            if os.retired(w)? {
                tracing::info!(server, range = %w.range, "the server retired this window (it no longer heads the range); its keys go over TCP");
                os.detach_window(server, w.range);
                return Ok(false);
            }
            if !self.core.alive(server) {
                tracing::info!(
                    server,
                    "the server's connection closed; its windows are detached"
                );
                os.detach(server);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Push dense values for `range` and return once the servers acknowledged them (with
    /// replication: once every replica holds them). Parts inside attached one-sided
    /// windows go as one-sided writes into the worker's landing areas plus a notification,
    /// when the push is unclocked (this worker never ticked); clocked pushes and other
    /// parts go over TCP. Each part is a piece of one task, identified as a TCP push is:
    /// a part whose server fails before acknowledging it is resent over TCP to the
    /// range's next head, which applies it only if the chain does not hold it already.
    pub fn push_range_now<T: Value>(
        &self,
        range: KeyRange,
        values: &[T],
        opts: &TaskOpts,
    ) -> Result<(), EngineError> {
        self.check_types::<T>()?;
        let vl = self.value_len();
        if values.len() as u64 != range.len() * vl as u64 {
            return Err(EngineError::InvalidRequest(format!(
                "{} values for {} keys x {vl}",
                values.len(),
                range.len()
            )));
        }
        let os = self
            .onesided
            .as_ref()
            .filter(|os| self.clock() == 0 && opts.after.is_empty() && os.any_window());
        let Some(os) = os else {
            return self.wait(self.push_range_opts::<T>(range, values.to_vec(), opts));
        };
        let table = self.table();
        let (ts, started) = self.launch_held(MessageKind::Push, T::DTYPE as u8, opts, || {
            Ok(Request::ranged(
                self.header::<T>(MessageKind::Push, opts),
                vl,
                false,
                range,
                Some(Shared::from(values.to_vec())),
            ))
        });
        let Some(frames) = started else {
            return self.wait(ts);
        };
        if frames.is_empty() {
            self.send_first(ts, frames);
            return self.wait(ts);
        }
        let pieces = table.split_range(range);
        let matches = frames.len() == pieces.len()
            && frames.iter().all(|(_, f)| {
                u64::from(f.header().epoch) == table.epoch().min(u64::from(u32::MAX))
            });
        let mut tcp = Vec::new();
        for (i, (server, frame)) in frames.into_iter().enumerate() {
            let piece = pieces
                .get(i)
                .filter(|(s, _)| matches && *s as u32 == server);
            let win = piece.and_then(|(_, p)| os.window_for(server, p).map(|w| (w, *p)));
            let Some((w, piece)) = win else {
                tcp.push((server, frame));
                continue;
            };
            let stamp = frame.header().timestamp;
            let from = (piece.begin - range.begin) as usize * vl;
            let src = &values[from..from + piece.len() as usize * vl];
            let alive = || self.core.alive(server);
            let pushed = os.push(
                &w,
                piece,
                (opts.func, stamp, u64::from(frame.header().epoch)),
                bytemuck::cast_slice(src),
                self.timeout,
                &alive,
            );
            match pushed {
                Ok(()) => self.core.settle(stamp, server, |_, _| Outcome::Done),
                // Nothing applied: the server does not serve it one-sidedly (another
                // table, a retired window, a range not handed over yet). Over TCP, it is
                // refused or redirected like any request.
                Err(f) if f.elsewhere => {
                    if os.retired(&w).unwrap_or(true) {
                        os.detach_window(server, w.range);
                    }
                    tracing::debug!(server, %piece, error = %f.error, "one-sided push not taken; sent over TCP");
                    tcp.push((server, frame));
                }
                // The path broke before any of this push reached the server: send it
                // over TCP instead, and the server's windows from now on.
                Err(f) if !f.notified && matches!(f.error, EngineError::OneSided(_)) => {
                    tracing::warn!(server, %piece, error = %f.error, "one-sided push failed before the server saw it; sent over TCP, and this server's windows from now on");
                    os.detach(server);
                    tcp.push((server, frame));
                }
                // It broke after the server may have applied it. With replication the
                // server remembers the push by its identity, as does every replica it
                // reached: resent over TCP (to whoever heads the range then), it is
                // applied only where it is not held. Without replication nothing would
                // notice a second apply, so it fails saying so.
                Err(f) if matches!(f.error, EngineError::OneSided(_)) => {
                    os.detach(server);
                    if table.replicas() > 0 {
                        tracing::warn!(server, %piece, error = %f.error, "one-sided push not acknowledged; resent over TCP (applied once: the chain remembers it)");
                        self.core.settle(stamp, server, |_, _| {
                            Outcome::Retry(Failure::Disconnected { server })
                        });
                    } else {
                        let error = EngineError::OneSided(format!(
                            "one-sided push of {piece} to server {server} failed after part of it \
                             was handed to the server, which may have applied that part (not \
                             resent, so nothing is applied twice; this server's windows go over \
                             TCP from now on): {}",
                            f.error
                        ));
                        self.core.settle(stamp, server, |st, _| {
                            st.error = Some(error);
                            Outcome::Done
                        });
                    }
                }
                Err(f) => self.core.settle(stamp, server, |st, _| {
                    st.error = Some(f.error);
                    Outcome::Done
                }),
            }
        }
        for (server, frame) in tcp {
            self.core.send(server, frame);
        }
        self.wait(ts)
    }
}
