//! Completion queues and work completions.

use std::collections::HashSet;
use std::ffi::CStr;
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdma_sys as ffi;

use super::{last_errno, returned_errno, Context, RdmaError, Result};

/// Work completions fetched from the device per `ibv_poll_cq` call.
const POLL_BATCH: usize = 32;

/// What a completed work request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Opcode {
    /// A SEND.
    #[default]
    Send,
    /// An RDMA WRITE.
    Write,
    /// An RDMA WRITE with immediate data.
    WriteWithImm,
    /// An RDMA READ.
    Read,
    /// A receive that a peer's SEND filled.
    Recv,
    /// A receive that a peer's WRITE_WITH_IMM consumed (the data went to the written
    /// range; the receive buffer is untouched).
    RecvWithImm,
    /// Anything else the device reported (code of `ibv_wc_opcode`).
    Other(u32),
}

impl Opcode {
    fn from_wc(code: ffi::ibv_wc_opcode::Type) -> Opcode {
        use ffi::ibv_wc_opcode as op;
        match code {
            op::IBV_WC_SEND => Opcode::Send,
            op::IBV_WC_RDMA_WRITE => Opcode::Write,
            op::IBV_WC_RDMA_READ => Opcode::Read,
            op::IBV_WC_RECV => Opcode::Recv,
            op::IBV_WC_RECV_RDMA_WITH_IMM => Opcode::RecvWithImm,
            other => Opcode::Other(other),
        }
    }

    /// Whether this completes a receive-queue request.
    pub fn is_recv(self) -> bool {
        matches!(self, Opcode::Recv | Opcode::RecvWithImm)
    }
}

/// A work request that completed with an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("work request failed: {message} (status {status}, vendor error {vendor_err:#x})")]
pub struct CompletionError {
    /// The `ibv_wc_status` code.
    pub status: u32,
    /// The provider's own error code.
    pub vendor_err: u32,
    /// `ibv_wc_status_str` of the status.
    pub message: &'static str,
}

impl CompletionError {
    fn new(status: u32, vendor_err: u32) -> CompletionError {
        // SAFETY: `ibv_wc_status_str` returns a pointer into a static table of
        // NUL-terminated strings (or to "unknown") for any value.
        let msg = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(status)) };
        CompletionError {
            status,
            vendor_err,
            message: msg.to_str().unwrap_or("unknown"),
        }
    }

    /// The request was flushed because the queue pair went to the error state (an
    /// earlier request failed, or the queue pair is being torn down).
    pub fn is_flush(&self) -> bool {
        self.status == ffi::ibv_wc_status::IBV_WC_WR_FLUSH_ERR
    }

    /// The peer refused the access (wrong rkey, range outside its region, missing
    /// right).
    pub fn is_remote_access(&self) -> bool {
        self.status == ffi::ibv_wc_status::IBV_WC_REM_ACCESS_ERR
    }
}

/// One work completion. `Default` is a placeholder for output buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The `wr_id` the request was posted with.
    pub wr_id: u64,
    /// `Ok` or the failure.
    pub status: std::result::Result<(), CompletionError>,
    /// What the request did. For requests polled through a [`QueuePair`](super::QueuePair)
    /// this is what was posted (the device leaves the opcode undefined on errors).
    pub opcode: Opcode,
    /// Bytes transferred (receives and READs; for RecvWithImm the length written).
    pub byte_len: u32,
    /// Immediate data (host order) of a SEND / WRITE with immediate, when present.
    pub imm_data: Option<u32>,
    /// The local queue pair number the request belonged to.
    pub qp_num: u32,
}

impl Default for Completion {
    fn default() -> Completion {
        Completion {
            wr_id: 0,
            status: Ok(()),
            opcode: Opcode::Send,
            byte_len: 0,
            imm_data: None,
            qp_num: 0,
        }
    }
}

impl Completion {
    fn from_wc(wc: &ffi::ibv_wc) -> Completion {
        let ok = wc.status == ffi::ibv_wc_status::IBV_WC_SUCCESS;
        let with_imm = wc.wc_flags & ffi::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        Completion {
            wr_id: wc.wr_id,
            status: if ok {
                Ok(())
            } else {
                Err(CompletionError::new(wc.status, wc.vendor_err))
            },
            opcode: Opcode::from_wc(wc.opcode),
            byte_len: wc.byte_len,
            imm_data: (ok && with_imm).then(|| {
                // SAFETY: both members of the union are `u32`, so either view is valid;
                // with IBV_WC_WITH_IMM set the device stored the immediate (big-endian).
                u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
            }),
            qp_num: wc.qp_num,
        }
    }
}

/// A completion channel: the file descriptor that completion events of the CQs attached
/// to it arrive on, so that a thread can sleep until one of them has work. Several
/// completion queues may share one channel ([`Context::create_cq_on`]); one thread can
/// then wait for all of them at once ([`CompletionChannel::wait`]). Cheap to clone (an
/// `Arc`); destroyed when the last clone and the last CQ attached to it are gone.
#[derive(Clone)]
pub struct CompletionChannel {
    inner: Arc<ChannelInner>,
}

struct ChannelInner {
    channel: NonNull<ffi::ibv_comp_channel>,
    /// The CQs attached (their `ibv_cq` addresses). An event is acknowledged only for a
    /// CQ in this set, under its lock; a CQ leaves it (under the lock) before it is
    /// destroyed, so no acknowledgement can touch a destroyed CQ and `ibv_destroy_cq`
    /// never waits for one.
    live: Mutex<HashSet<usize>>,
    ctx: Context,
}

// SAFETY: the channel is only passed to thread-safe verbs and its fd is only polled;
// the set of live CQs is behind a mutex.
unsafe impl Send for ChannelInner {}
// SAFETY: as for `Send`.
unsafe impl Sync for ChannelInner {}

impl fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionChannel")
            .field("device", &self.inner.ctx.name())
            .field("cqs", &self.inner.live().len())
            .finish()
    }
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: every CQ attached holds an `Arc` of this channel, so none is left (the
        // library refuses with EBUSY otherwise); destroyed exactly once.
        let rc = unsafe { ffi::ibv_destroy_comp_channel(self.channel.as_ptr()) };
        if rc != 0 {
            tracing::error!(device = %self.ctx.name(), rc, "ibv_destroy_comp_channel failed");
        }
    }
}

impl CompletionChannel {
    /// Wait up to `timeout` for a completion event of any CQ on this channel; consume and
    /// acknowledge it. Returns whether one came. Only CQs armed since their last event
    /// raise one (see [`CompletionQueue`]'s waiting notes): arm, poll once more, then
    /// wait.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        self.inner.wait(timeout)
    }
}

impl ChannelInner {
    /// The live set (a panic while holding it leaves nothing half-done: take it anyway).
    fn live(&self) -> MutexGuard<'_, HashSet<usize>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, timeout: Duration) -> Result<bool> {
        // SAFETY: the channel is live; its fd is read only to poll it.
        let fd = unsafe { (*self.channel.as_ptr()).fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is a live pollfd we own; the count is 1; the fd stays open while
        // we hold `&self` (it closes only in `Drop`).
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(RdmaError::Verb {
                op: "poll on completion channel",
                device: self.ctx.name().to_owned(),
                source: err,
            });
        }
        if rc == 0 {
            return Ok(false);
        }
        let live = self.live();
        let mut ev_cq: *mut ffi::ibv_cq = std::ptr::null_mut();
        let mut ev_ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; the out-pointers are live locals.
        let rc = unsafe { ffi::ibv_get_cq_event(self.channel.as_ptr(), &mut ev_cq, &mut ev_ctx) };
        if rc != 0 {
            // EAGAIN: another waiter took it, or a spurious wake-up; not an error.
            return Ok(false);
        }
        if live.contains(&(ev_cq as usize)) {
            // SAFETY: the CQ is attached and cannot be destroyed while we hold `live`
            // (it leaves the set first); acknowledging keeps `ibv_destroy_cq` from
            // waiting forever.
            unsafe { ffi::ibv_ack_cq_events(ev_cq, 1) };
        }
        Ok(true)
    }
}

/// A completion queue on a completion channel (its own, or one shared with other CQs).
///
/// Not `Clone`: a [`QueuePair`](super::QueuePair) takes its CQs by value so that nobody
/// else can consume its completions (it needs every one to release the buffers of its
/// work requests). A CQ on its own can be polled directly.
///
/// Waiting: [`wait`](Self::wait) arms the CQ (one event for the next completion only),
/// polls once more (a completion that arrived before arming raises no event), then sleeps
/// on the channel. With a shared channel, an event may belong to another CQ; waiters
/// re-poll their CQ after each wake-up.
pub struct CompletionQueue {
    cq: NonNull<ffi::ibv_cq>,
    depth: usize,
    ctx: Context,
    // Dropped after the CQ is destroyed (in `Drop`): the channel outlives its CQs.
    channel: Arc<ChannelInner>,
}

// SAFETY: the CQ and channel are only passed to thread-safe verbs; polling takes `&mut`.
unsafe impl Send for CompletionQueue {}
// SAFETY: no `&self` method touches the CQ's state.
unsafe impl Sync for CompletionQueue {}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("device", &self.ctx.name())
            .field("depth", &self.depth)
            .finish()
    }
}

impl Context {
    /// Create a completion channel that CQs can share ([`Context::create_cq_on`]).
    pub fn create_channel(&self) -> Result<CompletionChannel> {
        // SAFETY: the context is open; the channel is owned by the returned value and
        // destroyed once, after every CQ attached to it (they hold `Arc`s of it).
        let channel = unsafe { ffi::ibv_create_comp_channel(self.inner.raw()) };
        let Some(channel) = NonNull::new(channel) else {
            return Err(last_errno("ibv_create_comp_channel", self.name()));
        };
        // SAFETY: the channel was just created and is live; its fd belongs to it.
        let fd = unsafe { (*channel.as_ptr()).fd };
        // SAFETY: `fd` is the channel's open descriptor; F_GETFL/F_SETFL only change its
        // flags. Non-blocking so that `ibv_get_cq_event` never blocks after a spurious
        // wake-up or when another waiter took the event.
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        let inner = Arc::new(ChannelInner {
            channel,
            live: Mutex::new(HashSet::new()),
            ctx: self.clone(),
        });
        if rc != 0 {
            return Err(last_errno(
                "fcntl(O_NONBLOCK) on completion channel",
                self.name(),
            ));
        }
        Ok(CompletionChannel { inner })
    }

    /// Create a completion queue of at least `depth` entries (at most the device's
    /// `max_cqe`), with a completion channel of its own for [`CompletionQueue::wait`].
    pub fn create_cq(&self, depth: usize) -> Result<CompletionQueue> {
        let channel = self.create_channel()?;
        self.create_cq_on(depth, &channel)
    }

    /// Create a completion queue of at least `depth` entries on `channel` (which other
    /// CQs may share).
    pub fn create_cq_on(
        &self,
        depth: usize,
        channel: &CompletionChannel,
    ) -> Result<CompletionQueue> {
        let max = self.limits().max_cqe as usize;
        if depth == 0 || depth > max {
            return Err(RdmaError::Config(format!(
                "completion queue depth {depth} outside 1..={max} of device {}",
                self.name()
            )));
        }
        if !Arc::ptr_eq(&channel.inner.ctx.inner, &self.inner) {
            return Err(RdmaError::Config(
                "the completion channel belongs to another device context".into(),
            ));
        }
        let depth_c = libc::c_int::try_from(depth).expect("depth <= max_cqe, an int");
        // SAFETY: context and channel are live (the CQ keeps an `Arc` of the channel);
        // the CQ is owned by the returned value and destroyed exactly once in `Drop`.
        let cq = unsafe {
            ffi::ibv_create_cq(
                self.inner.raw(),
                depth_c,
                std::ptr::null_mut(),
                channel.inner.channel.as_ptr(),
                0,
            )
        };
        let Some(cq) = NonNull::new(cq) else {
            return Err(last_errno("ibv_create_cq", self.name()));
        };
        channel.inner.live().insert(cq.as_ptr() as usize);
        Ok(CompletionQueue {
            cq,
            depth,
            ctx: self.clone(),
            channel: channel.inner.clone(),
        })
    }
}

impl CompletionQueue {
    /// The number of entries asked for at creation.
    pub fn depth(&self) -> usize {
        self.depth
    }

    pub(super) fn raw(&self) -> *mut ffi::ibv_cq {
        self.cq.as_ptr()
    }

    pub(super) fn context(&self) -> &Context {
        &self.ctx
    }

    /// Fetch up to `out.len()` completions without blocking; returns how many were
    /// written to the front of `out`. `wr_id`s are as the device reports them.
    pub fn poll(&mut self, out: &mut [Completion]) -> Result<usize> {
        let mut done = 0;
        while done < out.len() {
            let want = (out.len() - done).min(POLL_BATCH);
            let mut wcs: [MaybeUninit<ffi::ibv_wc>; POLL_BATCH] =
                [const { MaybeUninit::uninit() }; POLL_BATCH];
            // SAFETY: the CQ is live; `wcs` has room for `want` entries, and the provider
            // writes only the first `n` it returns.
            let n = unsafe { ffi::ibv_poll_cq(self.cq.as_ptr(), want as i32, wcs[0].as_mut_ptr()) };
            if n < 0 {
                return Err(returned_errno("ibv_poll_cq", self.ctx.name(), n));
            }
            let n = n as usize;
            for (slot, wc) in out[done..].iter_mut().zip(&wcs[..n]) {
                // SAFETY: the first `n` entries were initialised by `ibv_poll_cq`.
                *slot = Completion::from_wc(unsafe { wc.assume_init_ref() });
            }
            done += n;
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    /// Fetch up to `out.len()` completions, waiting up to `timeout` on the completion
    /// channel (no busy polling) when none is ready. Returns 0 on timeout.
    pub fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<usize> {
        let n = self.poll(out)?;
        if n > 0 || out.is_empty() {
            return Ok(n);
        }
        self.arm()?;
        // A completion that arrived before arming raises no event: look once more.
        let n = self.poll(out)?;
        if n > 0 || !self.wait_event(timeout)? {
            return Ok(n);
        }
        self.poll(out)
    }

    /// Ask for an event on the channel at the next completion. Completions that arrived
    /// before arming raise none, so callers poll once after arming and before waiting.
    pub(super) fn arm(&mut self) -> Result<()> {
        // SAFETY: the CQ is live; arming has no memory-safety preconditions.
        let rc = unsafe { ffi::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(returned_errno("ibv_req_notify_cq", self.ctx.name(), rc));
        }
        Ok(())
    }

    /// Wait up to `timeout` for a completion event on this CQ's channel (for this CQ,
    /// or, with a shared channel, for another one); consume and acknowledge it. Returns
    /// whether one came.
    pub(super) fn wait_event(&mut self, timeout: Duration) -> Result<bool> {
        self.channel.wait(timeout)
    }

    /// Whether `self` sits on `channel`.
    pub fn on_channel(&self, channel: &CompletionChannel) -> bool {
        Arc::ptr_eq(&self.channel, &channel.inner)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // Leave the channel's live set first: from now on no waiter acknowledges an
        // event of this CQ, and every event acknowledged so far was acknowledged, so
        // `ibv_destroy_cq` (which waits for that) does not wait.
        self.channel.live().remove(&(self.cq.as_ptr() as usize));
        // SAFETY: queue pairs own their CQs and destroy themselves first (see
        // `QpHandle`); the CQ is destroyed exactly once, before its channel (a field,
        // dropped after this).
        let rc = unsafe { ffi::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            tracing::error!(device = %self.ctx.name(), rc, "ibv_destroy_cq failed");
        }
    }
}
