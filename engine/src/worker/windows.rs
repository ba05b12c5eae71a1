//! Dense ranges over one-sided windows: attaching them, and pushing and pulling through
//! them (with TCP for the parts outside).

use std::time::Duration;

use crate::base::error::EngineError;
use crate::base::keys::KeyRange;
use crate::base::value::Value;
use crate::proto::Control;

use super::config::TaskOpts;
use super::Worker;

impl Worker {
    /// Attach the servers' one-sided windows covering `range` (each server's part of it
    /// becomes its window; one window per server). Returns, per server part, whether it
    /// is one-sided and why: a server that runs over TCP only, or a backend the two ends
    /// do not share, leaves that part on TCP (logged). With `--transport tcp` nothing is
    /// attached. Call it once, before pushing and pulling the range, on every worker
    /// that wants the one-sided path.
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
    /// other parts go over TCP.
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
            let win = self
                .onesided
                .as_ref()
                .and_then(|os| os.window_for(server as u32, &piece).map(|w| (os, w)));
            if let Some((os, w)) = win {
                let one_sided = os
                    .wait_clock(&w, self.pull_min_clock(opts), self.timeout)
                    .and_then(|()| os.read(&w, piece, bytemuck::cast_slice_mut(dst)));
                match one_sided {
                    Ok(()) => continue,
                    // A broken path (a queue pair in error, a peer's NIC that stopped
                    // answering, a mapping that went away): the keys are still served over
                    // TCP, from the same window. Reads change nothing, so reading again
                    // is safe.
                    Err(e @ EngineError::OneSided(_)) => {
                        tracing::warn!(server, %piece, error = %e, "one-sided pull failed; this window goes over TCP from now on");
                        os.detach(server as u32);
                    }
                    Err(e) => return Err(e),
                }
            }
            let p = self.wait_pull::<T>(self.pull_range_opts::<T>(piece, opts))?;
            p.copy_to(dst);
        }
        Ok(())
    }

    /// Push dense values for `range` and return once the servers applied them. Parts
    /// inside attached one-sided windows go as one-sided writes into the worker's
    /// landing areas plus a notification, when the push is unclocked (this worker never
    /// ticked); clocked pushes and other parts go over TCP.
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
        let mut at = 0usize;
        let mut tcp = Vec::new();
        for (server, piece) in self.table().split_range(range) {
            let n = piece.len() as usize * vl;
            let src = &values[at..at + n];
            at += n;
            let win = self
                .onesided
                .as_ref()
                .filter(|_| self.clock() == 0 && opts.after.is_empty())
                .and_then(|os| os.window_for(server as u32, &piece).map(|w| (os, w)));
            if let Some((os, w)) = win {
                let pushed = os.push(
                    &w,
                    piece,
                    opts.func,
                    bytemuck::cast_slice(src),
                    self.timeout,
                );
                match pushed {
                    Ok(()) => continue,
                    // The path broke before any of this push reached the server: send it
                    // over TCP instead, and the window's keys from now on.
                    Err(f) if !f.notified && matches!(f.error, EngineError::OneSided(_)) => {
                        tracing::warn!(server, %piece, error = %f.error, "one-sided push failed before the server saw it; sent over TCP, and this window from now on");
                        os.detach(server as u32);
                    }
                    // It broke after the server may have applied part of it: sending it
                    // again could apply that part twice, so say so instead.
                    Err(f) if matches!(f.error, EngineError::OneSided(_)) => {
                        os.detach(server as u32);
                        return Err(EngineError::OneSided(format!(
                            "one-sided push of {piece} to server {server} failed after part of it \
                             was handed to the server, which may have applied that part (not \
                             resent, so nothing is applied twice; this window goes over TCP from \
                             now on): {}",
                            f.error
                        )));
                    }
                    Err(f) => return Err(f.error),
                }
            }
            tcp.push(self.push_range_opts::<T>(piece, src.to_vec(), opts));
        }
        for ts in tcp {
            self.wait(ts)?;
        }
        Ok(())
    }
}
