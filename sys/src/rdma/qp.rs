//! Reliable-connected queue pairs: `PreparedQueuePair` (INIT) -> `QueuePair` (RTS).

use std::collections::VecDeque;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdma_sys as ffi;

use super::{
    last_errno, returned_errno, zeroed, BorrowedRegion, Completion, CompletionQueue, LinkLayer,
    LocalRange, MemoryRegion, Mtu, Opcode, ProtectionDomain, QpEndpoint, RdmaError, RemoteRegion,
    Result,
};
use crate::rdma::Access;

/// Receive work requests carry this bit in the `wr_id` given to the device, so a
/// completion tells which queue it belongs to even when its opcode is undefined (errors).
const RECV_BIT: u64 = 1 << 63;
/// Upper bound on the responder / initiator RDMA READ depth we ask for.
const RD_ATOMIC_MAX: u8 = 16;

/// Settings of a reliable-connected queue pair. `Default` suits both InfiniBand and RoCE
/// v2 (including Soft-RoCE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpConfig {
    /// Port number (ports count from 1). Default 1.
    pub port: u8,
    /// GID index; `None` picks one (see [`Context::default_gid_index`](super::Context::default_gid_index):
    /// on RoCE the first RoCE v2 GID with an IPv4-mapped address).
    pub gid_index: Option<u8>,
    /// Largest path MTU; `None` uses the port's active MTU. The connection uses the
    /// smaller of both sides' values.
    pub path_mtu: Option<Mtu>,
    /// Most outstanding send-queue work requests (READ, WRITE, SEND). Default 256.
    pub max_send_wr: u32,
    /// Most outstanding receive work requests. Default 256.
    pub max_recv_wr: u32,
    /// Local ACK timeout exponent: 4.096 us * 2^timeout. Default 14 (about 67 ms).
    pub timeout: u8,
    /// Transport retries before a request fails. Default 7.
    pub retry_count: u8,
    /// Retries when the peer has no receive posted (7 = forever). Default 7.
    pub rnr_retry: u8,
    /// Receiver-not-ready back-off the peer is told (code, 12 = 0.64 ms). Default 12.
    pub min_rnr_timer: u8,
    /// Initiator RDMA READ depth; `None`: the device's maximum, at most 16.
    pub max_rd_atomic: Option<u8>,
    /// First send PSN (24 bits); `None` derives one from the clock and the QPN.
    pub psn: Option<u32>,
    /// GRH hop limit (RoCE, or InfiniBand across subnets). Default 64.
    pub hop_limit: u8,
    /// GRH traffic class. Default 0.
    pub traffic_class: u8,
    /// Service level. Default 0.
    pub service_level: u8,
    /// Use a GRH on InfiniBand too (always used on RoCE). Default false.
    pub force_global: bool,
}

impl Default for QpConfig {
    fn default() -> QpConfig {
        QpConfig {
            port: 1,
            gid_index: None,
            path_mtu: None,
            max_send_wr: 256,
            max_recv_wr: 256,
            timeout: 14,
            retry_count: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            max_rd_atomic: None,
            psn: None,
            hop_limit: 64,
            traffic_class: 0,
            service_level: 0,
            force_global: false,
        }
    }
}

/// The verbs QP together with what it must not outlive; destroyed first on drop.
struct QpHandle {
    qp: NonNull<ffi::ibv_qp>,
    // Dropped after the QP is destroyed (field order): the CQs, then the PD.
    /// The send CQ (and the receive CQ too when `rcq` is `None`).
    cq: CompletionQueue,
    /// A separate receive CQ (see [`ProtectionDomain::prepare_qp_split`]).
    rcq: Option<CompletionQueue>,
    pd: ProtectionDomain,
}

// SAFETY: the QP pointer is only passed to thread-safe verbs; posting and polling take
// `&mut` of the owning `QueuePair`.
unsafe impl Send for QpHandle {}
// SAFETY: no `&self` method changes the QP.
unsafe impl Sync for QpHandle {}

impl QpHandle {
    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        op: &'static str,
    ) -> Result<()> {
        // SAFETY: the QP is live; `attr` is a fully initialised attribute struct we own
        // and the mask names only fields we set.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as libc::c_int) };
        if rc != 0 {
            return Err(returned_errno(op, self.pd.context().name(), rc));
        }
        Ok(())
    }

    fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; `qp_num` is set at creation and never changes.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }
}

impl Drop for QpHandle {
    fn drop(&mut self) {
        // SAFETY: the QP is destroyed exactly once, before its CQ and PD (fields dropped
        // after this). After it returns the device no longer touches any buffer of its
        // work requests, so the `QueuePair` may then release them.
        let rc = unsafe { ffi::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            tracing::error!(device = %self.pd.context().name(), rc, "ibv_destroy_qp failed");
        }
    }
}

fn default_psn(qpn: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    (nanos ^ qpn.rotate_left(8)).wrapping_mul(0x9e37_79b1) >> 8
}

impl ProtectionDomain {
    /// Create a reliable-connected queue pair in state INIT that owns `cq` (used for both
    /// its send and receive completions).
    ///
    /// Checks: `cq` is from this PD's device and has room for every outstanding request
    /// (`depth >= max_send_wr + max_recv_wr`, so the CQ can never overrun), the queue
    /// sizes are within the device's limits, and the port is ACTIVE.
    pub fn prepare_qp(&self, cq: CompletionQueue, cfg: QpConfig) -> Result<PreparedQueuePair> {
        self.prepare(cq, None, cfg)
    }

    /// Like [`prepare_qp`](Self::prepare_qp), with receive completions on their own CQ
    /// `recv_cq` (which may sit on a completion channel shared with other queue pairs,
    /// so one thread can wait for the receives of many: see
    /// [`QueuePair::arm_recv`]). Checks `send_cq.depth() >= max_send_wr` and
    /// `recv_cq.depth() >= max_recv_wr`.
    pub fn prepare_qp_split(
        &self,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        cfg: QpConfig,
    ) -> Result<PreparedQueuePair> {
        self.prepare(send_cq, Some(recv_cq), cfg)
    }

    fn prepare(
        &self,
        cq: CompletionQueue,
        rcq: Option<CompletionQueue>,
        cfg: QpConfig,
    ) -> Result<PreparedQueuePair> {
        let ctx = self.context();
        let foreign = |q: &CompletionQueue| !Arc::ptr_eq(&q.context().inner, &ctx.inner);
        if foreign(&cq) || rcq.as_ref().is_some_and(foreign) {
            return Err(RdmaError::Config(
                "the completion queue belongs to another device context".into(),
            ));
        }
        let max_wr = ctx.limits().max_qp_wr;
        for (name, v) in [
            ("max_send_wr", cfg.max_send_wr),
            ("max_recv_wr", cfg.max_recv_wr),
        ] {
            if v == 0 || v > max_wr {
                return Err(RdmaError::Config(format!(
                    "{name} {v} outside 1..={max_wr}"
                )));
            }
        }
        match &rcq {
            None => {
                let needed = cfg.max_send_wr as usize + cfg.max_recv_wr as usize;
                if cq.depth() < needed {
                    return Err(RdmaError::Config(format!(
                        "completion queue depth {} below max_send_wr + max_recv_wr = {needed}",
                        cq.depth()
                    )));
                }
            }
            Some(r) => {
                if cq.depth() < cfg.max_send_wr as usize || r.depth() < cfg.max_recv_wr as usize {
                    return Err(RdmaError::Config(format!(
                        "completion queue depths {} (send) and {} (receive) below max_send_wr \
                         {} and max_recv_wr {}",
                        cq.depth(),
                        r.depth(),
                        cfg.max_send_wr,
                        cfg.max_recv_wr
                    )));
                }
            }
        }
        let port = ctx.port(cfg.port)?;
        if !port.active {
            return Err(RdmaError::PortNotActive {
                device: ctx.name().to_owned(),
                port: cfg.port,
                state: port.state,
            });
        }
        let gid_index = cfg
            .gid_index
            .unwrap_or_else(|| ctx.default_gid_index(&port));
        let gid = ctx.gid(cfg.port, gid_index.into())?;
        let port_mtu = port.active_mtu.unwrap_or(Mtu::Mtu1024);
        let mtu = cfg.path_mtu.map_or(port_mtu, |m| m.min(port_mtu));

        let mut init: ffi::ibv_qp_init_attr = zeroed();
        init.send_cq = cq.raw();
        init.recv_cq = rcq.as_ref().map_or(cq.raw(), |r| r.raw());
        init.cap.max_send_wr = cfg.max_send_wr;
        init.cap.max_recv_wr = cfg.max_recv_wr;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: PD and CQ are live (we hold both and the handle keeps them); `init` is
        // initialised; the QP is owned by `QpHandle` and destroyed once in its `Drop`.
        let qp = unsafe { ffi::ibv_create_qp(self.raw(), &mut init) };
        let Some(qp) = NonNull::new(qp) else {
            return Err(last_errno("ibv_create_qp", ctx.name()));
        };
        let handle = QpHandle {
            qp,
            cq,
            rcq,
            pd: self.clone(),
        };

        let mut attr: ffi::ibv_qp_attr = zeroed();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = cfg.port;
        attr.qp_access_flags = Access::ALL.bits();
        use ffi::ibv_qp_attr_mask as mask;
        handle.modify(
            &mut attr,
            mask::IBV_QP_STATE
                | mask::IBV_QP_PKEY_INDEX
                | mask::IBV_QP_PORT
                | mask::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        let qpn = handle.qpn();
        let psn = cfg.psn.unwrap_or_else(|| default_psn(qpn)) & 0x00ff_ffff;
        let limits = ctx.limits();
        let rd_atomic = cfg
            .max_rd_atomic
            .unwrap_or(limits.max_qp_init_rd_atom.min(RD_ATOMIC_MAX))
            .max(1);
        let dest_rd_atomic = limits.max_qp_rd_atom.clamp(1, RD_ATOMIC_MAX);
        Ok(PreparedQueuePair {
            local: QpEndpoint {
                qpn,
                lid: port.lid,
                gid,
                psn,
                mtu,
            },
            handle,
            link_layer: port.link_layer,
            gid_index,
            max_msg: port.max_msg_size,
            rd_atomic,
            dest_rd_atomic,
            cfg,
        })
    }
}

/// A queue pair in state INIT: it can tell its endpoint and be connected, not post.
pub struct PreparedQueuePair {
    handle: QpHandle,
    local: QpEndpoint,
    link_layer: LinkLayer,
    gid_index: u8,
    max_msg: u32,
    rd_atomic: u8,
    dest_rd_atomic: u8,
    cfg: QpConfig,
}

impl fmt::Debug for PreparedQueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedQueuePair")
            .field("local", &self.local)
            .field("link_layer", &self.link_layer)
            .field("gid_index", &self.gid_index)
            .finish()
    }
}

impl PreparedQueuePair {
    /// What the peer needs to connect to this queue pair.
    pub fn endpoint(&self) -> QpEndpoint {
        self.local
    }

    /// Connect to the peer's endpoint: INIT -> RTR -> RTS. On error the queue pair is
    /// destroyed (prepare a new one to retry).
    pub fn handshake(self, remote: QpEndpoint) -> Result<QueuePair> {
        remote.validate()?;
        let cfg = &self.cfg;
        let mtu = self.local.mtu.min(remote.mtu);
        use ffi::ibv_qp_attr_mask as mask;

        let mut attr: ffi::ibv_qp_attr = zeroed();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = mtu.code();
        attr.dest_qp_num = remote.qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = self.dest_rd_atomic;
        attr.min_rnr_timer = cfg.min_rnr_timer;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.sl = cfg.service_level;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = cfg.port;
        if self.link_layer == LinkLayer::Ethernet || cfg.force_global {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = remote.gid;
            attr.ah_attr.grh.sgid_index = self.gid_index;
            attr.ah_attr.grh.hop_limit = cfg.hop_limit;
            attr.ah_attr.grh.traffic_class = cfg.traffic_class;
            attr.ah_attr.grh.flow_label = 0;
        }
        self.handle.modify(
            &mut attr,
            mask::IBV_QP_STATE
                | mask::IBV_QP_AV
                | mask::IBV_QP_PATH_MTU
                | mask::IBV_QP_DEST_QPN
                | mask::IBV_QP_RQ_PSN
                | mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | mask::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        let mut attr: ffi::ibv_qp_attr = zeroed();
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = cfg.timeout;
        attr.retry_cnt = cfg.retry_count;
        attr.rnr_retry = cfg.rnr_retry;
        attr.sq_psn = self.local.psn;
        attr.max_rd_atomic = self.rd_atomic;
        self.handle.modify(
            &mut attr,
            mask::IBV_QP_STATE
                | mask::IBV_QP_TIMEOUT
                | mask::IBV_QP_RETRY_CNT
                | mask::IBV_QP_RNR_RETRY
                | mask::IBV_QP_SQ_PSN
                | mask::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )?;

        Ok(QueuePair {
            max_send: self.cfg.max_send_wr as usize,
            max_recv: self.cfg.max_recv_wr as usize,
            sends: VecDeque::with_capacity(self.cfg.max_send_wr as usize),
            recvs: VecDeque::with_capacity(self.cfg.max_recv_wr as usize),
            next_id: 0,
            max_msg: self.max_msg,
            local: self.local,
            remote,
            handle: self.handle,
        })
    }
}

/// A posted work request, kept until its completion is polled.
struct Pending {
    /// The id given to the device (unique per queue pair; `RECV_BIT` for receives).
    id: u64,
    /// The caller's id.
    wr_id: u64,
    opcode: Opcode,
    /// Keeps the local buffer registered and mapped while the device may use it.
    _mr: Option<Arc<MemoryRegion>>,
}

/// A connected (RTS) reliable queue pair: the only type that can post work.
///
/// Outstanding work is bounded by [`QpConfig::max_send_wr`] and
/// [`QpConfig::max_recv_wr`]; posting into a full queue fails with
/// [`RdmaError::QueueFull`]. Every posted request keeps an `Arc` of its local region
/// until its completion is polled with [`poll`](Self::poll) / [`wait`](Self::wait) (an
/// unsignaled request is released when a later request of its queue completes, as the
/// verbs complete each queue in order). When posting would fill the send queue, the
/// request is signaled even if asked not to be, so the queue always drains.
pub struct QueuePair {
    // Field order matters: the QP is destroyed (and with it every device access to the
    // buffers) before `sends` / `recvs` release their regions.
    handle: QpHandle,
    sends: VecDeque<Pending>,
    recvs: VecDeque<Pending>,
    next_id: u64,
    max_send: usize,
    max_recv: usize,
    max_msg: u32,
    local: QpEndpoint,
    remote: QpEndpoint,
}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("sends", &self.sends.len())
            .field("recvs", &self.recvs.len())
            .finish()
    }
}

/// What a send-queue request does, with the arguments it needs.
enum SendOp<'a> {
    Send,
    Write(&'a RemoteRegion, u64),
    WriteWithImm(&'a RemoteRegion, u64, u32),
    Read(&'a RemoteRegion, u64),
}

impl QueuePair {
    /// This side's endpoint.
    pub fn endpoint(&self) -> QpEndpoint {
        self.local
    }

    /// The peer's endpoint.
    pub fn remote_endpoint(&self) -> QpEndpoint {
        self.remote
    }

    /// The protection domain local regions must belong to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.handle.pd
    }

    /// Send-queue requests posted and not yet completed.
    pub fn outstanding_sends(&self) -> usize {
        self.sends.len()
    }

    /// Receives posted and not yet completed.
    pub fn outstanding_recvs(&self) -> usize {
        self.recvs.len()
    }

    /// The send-queue bound.
    pub fn max_send_wr(&self) -> usize {
        self.max_send
    }

    /// The receive-queue bound.
    pub fn max_recv_wr(&self) -> usize {
        self.max_recv
    }

    /// The longest message one work request may carry (the port's `max_msg_sz`: 1 or
    /// 2 GiB on InfiniBand HCAs, 8 MiB on Soft-RoCE); split longer transfers.
    pub fn max_message(&self) -> usize {
        self.max_msg as usize
    }

    /// RDMA READ `local.len()` bytes at `remote_offset` of `remote` into `local` (which
    /// needs LOCAL_WRITE).
    pub fn post_read(
        &mut self,
        wr_id: u64,
        local: LocalRange<'_>,
        remote: &RemoteRegion,
        remote_offset: u64,
        signaled: bool,
    ) -> Result<()> {
        self.post(
            wr_id,
            Some(local),
            SendOp::Read(remote, remote_offset),
            signaled,
        )
    }

    /// RDMA WRITE `local` to `remote_offset` of `remote`.
    pub fn post_write(
        &mut self,
        wr_id: u64,
        local: LocalRange<'_>,
        remote: &RemoteRegion,
        remote_offset: u64,
        signaled: bool,
    ) -> Result<()> {
        self.post(
            wr_id,
            Some(local),
            SendOp::Write(remote, remote_offset),
            signaled,
        )
    }

    /// RDMA WRITE with immediate data: writes `local` (may be empty, with `local = None`)
    /// to `remote_offset` of `remote`, then consumes one receive the peer posted, whose
    /// completion carries `imm` ([`Opcode::RecvWithImm`]). This is the notification that
    /// a write landed.
    pub fn post_write_with_imm(
        &mut self,
        wr_id: u64,
        local: Option<LocalRange<'_>>,
        remote: &RemoteRegion,
        remote_offset: u64,
        imm: u32,
        signaled: bool,
    ) -> Result<()> {
        self.post(
            wr_id,
            local,
            SendOp::WriteWithImm(remote, remote_offset, imm),
            signaled,
        )
    }

    /// SEND `local` into the next receive the peer posted.
    pub fn post_send(&mut self, wr_id: u64, local: LocalRange<'_>, signaled: bool) -> Result<()> {
        self.post(wr_id, Some(local), SendOp::Send, signaled)
    }

    /// Post a receive into `local` (LOCAL_WRITE needed), or without a buffer (`None`) to
    /// take WRITE_WITH_IMM notifications and empty SENDs. Receives always complete.
    pub fn post_recv(&mut self, wr_id: u64, local: Option<LocalRange<'_>>) -> Result<()> {
        if self.recvs.len() >= self.max_recv {
            return Err(RdmaError::QueueFull {
                queue: "receive",
                max: self.max_recv,
            });
        }
        let (mut sge, mr) = self.local_sge(local.as_ref(), true)?;
        let id = self.next_id | RECV_BIT;
        let mut wr: ffi::ibv_recv_wr = zeroed();
        wr.wr_id = id;
        if let Some(sge) = sge.as_mut() {
            wr.sg_list = sge;
            wr.num_sge = 1;
        }
        let mut bad: *mut ffi::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` are initialised locals that outlive the
        // call (the provider copies them). The buffer they name is inside a registered
        // region (checked by `local_sge`), and that region's `Arc` is kept in `recvs`
        // until the completion is polled or the QP is destroyed.
        let rc = unsafe { ffi::ibv_post_recv(self.handle.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(returned_errno(
                "ibv_post_recv",
                self.handle.pd.context().name(),
                rc,
            ));
        }
        self.next_id += 1;
        self.recvs.push_back(Pending {
            id,
            wr_id,
            opcode: Opcode::Recv,
            _mr: mr,
        });
        Ok(())
    }

    /// Check a local range (bounds, PD, rights) and build its scatter-gather entry
    /// (`None` for an absent or empty range).
    fn local_sge(
        &self,
        local: Option<&LocalRange<'_>>,
        device_writes: bool,
    ) -> Result<(Option<ffi::ibv_sge>, Option<Arc<MemoryRegion>>)> {
        let Some(local) = local else {
            return Ok((None, None));
        };
        let (addr, length, lkey) = local.sge()?;
        if !local.mr.pd().same_as(&self.handle.pd) {
            return Err(RdmaError::ForeignRegion);
        }
        if device_writes && !local.mr.access().contains(Access::LOCAL_WRITE) {
            return Err(RdmaError::AccessDenied {
                needed: "LOCAL_WRITE",
            });
        }
        if length > self.max_msg {
            return Err(RdmaError::MessageTooLarge {
                len: length.into(),
                max: self.max_msg.into(),
            });
        }
        if length == 0 {
            return Ok((None, None));
        }
        Ok((
            Some(ffi::ibv_sge { addr, length, lkey }),
            Some(Arc::clone(local.mr)),
        ))
    }

    fn post(
        &mut self,
        wr_id: u64,
        local: Option<LocalRange<'_>>,
        op: SendOp<'_>,
        signaled: bool,
    ) -> Result<()> {
        if self.sends.len() >= self.max_send {
            return Err(RdmaError::QueueFull {
                queue: "send",
                max: self.max_send,
            });
        }
        let device_writes = matches!(op, SendOp::Read(..));
        let (sge, mr) = self.local_sge(local.as_ref(), device_writes)?;
        self.post_sge(wr_id, sge, mr, op, signaled)
    }

    /// RDMA READ `range` of `local`'s length from `remote_offset` of `remote` into that
    /// range of a borrowed registration (which needs LOCAL_WRITE). Nothing keeps `local`
    /// registered until the completion: the caller waits for it before dropping `local`,
    /// or, if it gives up, the request fails once the registration is gone (see
    /// [`BorrowedRegion`]).
    pub fn post_read_borrowed(
        &mut self,
        wr_id: u64,
        local: &BorrowedRegion<'_>,
        range: std::ops::Range<usize>,
        remote: &RemoteRegion,
        remote_offset: u64,
        signaled: bool,
    ) -> Result<()> {
        if self.sends.len() >= self.max_send {
            return Err(RdmaError::QueueFull {
                queue: "send",
                max: self.max_send,
            });
        }
        let (addr, length, lkey) = local.sge(range)?;
        if !local.pd().same_as(&self.handle.pd) {
            return Err(RdmaError::ForeignRegion);
        }
        if !local.access().contains(Access::LOCAL_WRITE) {
            return Err(RdmaError::AccessDenied {
                needed: "LOCAL_WRITE",
            });
        }
        if length > self.max_msg {
            return Err(RdmaError::MessageTooLarge {
                len: length.into(),
                max: self.max_msg.into(),
            });
        }
        self.post_sge(
            wr_id,
            Some(ffi::ibv_sge { addr, length, lkey }),
            None,
            SendOp::Read(remote, remote_offset),
            signaled,
        )
    }

    /// Post a send-queue request whose local buffer was checked (`mr`: the region to
    /// keep until it completes, if any).
    fn post_sge(
        &mut self,
        wr_id: u64,
        mut sge: Option<ffi::ibv_sge>,
        mr: Option<Arc<MemoryRegion>>,
        op: SendOp<'_>,
        signaled: bool,
    ) -> Result<()> {
        let len = sge.map_or(0, |s| u64::from(s.length));
        let id = self.next_id;
        debug_assert_eq!(id & RECV_BIT, 0, "2^63 work requests");
        let mut wr: ffi::ibv_send_wr = zeroed();
        wr.wr_id = id;
        if let Some(sge) = sge.as_mut() {
            wr.sg_list = sge;
            wr.num_sge = 1;
        }
        use ffi::ibv_wr_opcode as wo;
        let (opcode, remote) = match op {
            SendOp::Send => (Opcode::Send, None),
            SendOp::Write(r, off) => (Opcode::Write, Some((r, off))),
            SendOp::WriteWithImm(r, off, imm) => {
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                (Opcode::WriteWithImm, Some((r, off)))
            }
            SendOp::Read(r, off) => (Opcode::Read, Some((r, off))),
        };
        wr.opcode = match opcode {
            Opcode::Send => wo::IBV_WR_SEND,
            Opcode::Write => wo::IBV_WR_RDMA_WRITE,
            Opcode::WriteWithImm => wo::IBV_WR_RDMA_WRITE_WITH_IMM,
            _ => wo::IBV_WR_RDMA_READ,
        };
        if let Some((region, offset)) = remote {
            let remote_addr = region.checked_addr(offset, len)?;
            wr.wr.rdma = ffi::rdma_t {
                remote_addr,
                rkey: region.rkey,
            };
        }
        // Never let the queue fill up with unsignaled requests: nothing would drain it.
        let signaled = signaled || self.sends.len() + 1 == self.max_send;
        if signaled {
            wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is live and connected; `wr` and `sge` are initialised locals
        // that outlive the call (the provider copies them). The local buffer is inside a
        // registered region of this PD (checked by `local_sge`), and its `Arc` is kept in
        // `sends` until this request, or a later one of the same queue, completes, or the
        // QP is destroyed; or it is a borrowed registration (checked by
        // `post_read_borrowed`), whose deregistration on drop ends the device's access
        // before the borrow ends. Remote ranges were checked against the advertised
        // length.
        let rc = unsafe { ffi::ibv_post_send(self.handle.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(returned_errno(
                "ibv_post_send",
                self.handle.pd.context().name(),
                rc,
            ));
        }
        self.next_id += 1;
        self.sends.push_back(Pending {
            id,
            wr_id,
            opcode,
            _mr: mr,
        });
        Ok(())
    }

    /// Fetch up to `out.len()` completions without blocking; returns how many were
    /// written to the front of `out`, with the callers' `wr_id`s and the opcodes that
    /// were posted. Releases the regions of completed requests.
    pub fn poll(&mut self, out: &mut [Completion]) -> Result<usize> {
        let mut n = self.handle.cq.poll(out)?;
        if let Some(r) = self.handle.rcq.as_mut() {
            n += r.poll(&mut out[n..])?;
        }
        for c in &mut out[..n] {
            self.settle(c);
        }
        Ok(n)
    }

    /// Ask for an event on the receive CQ's channel at its next completion (the receive
    /// CQ is the send CQ unless the queue pair was prepared with
    /// [`prepare_qp_split`](ProtectionDomain::prepare_qp_split)). Completions that
    /// arrived before arming raise none: poll once more after arming, then wait on the
    /// channel ([`CompletionChannel::wait`](super::CompletionChannel::wait)).
    pub fn arm_recv(&mut self) -> Result<()> {
        match self.handle.rcq.as_mut() {
            Some(r) => r.arm(),
            None => self.handle.cq.arm(),
        }
    }

    /// Whether the receive CQ sits on `channel`.
    pub fn recv_on(&self, channel: &super::CompletionChannel) -> bool {
        self.handle
            .rcq
            .as_ref()
            .unwrap_or(&self.handle.cq)
            .on_channel(channel)
    }

    /// Like [`poll`](Self::poll), but when nothing is ready waits up to `timeout` on the
    /// send CQ's completion channel (the thread sleeps; no busy polling). Returns 0 on
    /// timeout. With a separate receive CQ, receive completions do not wake this wait
    /// (they are polled when it wakes); wait for them with [`arm_recv`](Self::arm_recv).
    pub fn wait(&mut self, out: &mut [Completion], timeout: Duration) -> Result<usize> {
        let n = self.poll(out)?;
        if n > 0 || out.is_empty() {
            return Ok(n);
        }
        self.handle.cq.arm()?;
        let n = self.poll(out)?;
        if n > 0 || !self.handle.cq.wait_event(timeout)? {
            return Ok(n);
        }
        self.poll(out)
    }

    /// Map a device completion back to its request and release what it held.
    fn settle(&mut self, c: &mut Completion) {
        let id = c.wr_id;
        if id & RECV_BIT != 0 {
            // Receive queues of RC QPs complete in order.
            match self.recvs.front() {
                Some(p) if p.id == id => {
                    let p = self.recvs.pop_front().expect("front exists");
                    c.wr_id = p.wr_id;
                    c.opcode = if c.status.is_ok() && c.opcode == Opcode::RecvWithImm {
                        Opcode::RecvWithImm
                    } else {
                        Opcode::Recv
                    };
                }
                _ => unknown_completion(id),
            }
            return;
        }
        // Send queues complete in order; unsignaled requests before `id` are done too.
        while let Some(p) = self.sends.front() {
            if p.id < id {
                self.sends.pop_front();
                continue;
            }
            if p.id == id {
                let p = self.sends.pop_front().expect("front exists");
                c.wr_id = p.wr_id;
                c.opcode = p.opcode;
            } else {
                unknown_completion(id);
            }
            return;
        }
        unknown_completion(id);
    }
}

/// A completion for a request this queue pair never posted: the CQ is owned by the QP, so
/// only a driver bug can cause it.
fn unknown_completion(id: u64) {
    debug_assert!(false, "completion for unknown work request {id:#x}");
    tracing::error!(
        id,
        "completion for a work request this queue pair did not post"
    );
}
