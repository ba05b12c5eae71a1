//! Safe RDMA verbs over `rdma-sys` (feature `rdma`).
//!
//! The ownership design follows jonhoo/rust-ibverbs: every verbs object is an owned Rust
//! value released on `Drop`, and children hold their parents alive through `Arc`s, so the
//! order the C library demands (queue pairs before their completion queue, memory regions
//! before their protection domain, everything before the device context) holds by
//! construction:
//!
//! ```text
//! Context ──► ProtectionDomain ──► MemoryRegion (owns its PinnedRegion)
//!    │               │
//!    └► CompletionQueue ◄── PreparedQueuePair ──handshake──► QueuePair
//! ```
//!
//! - [`devices`] lists the RDMA devices; on a machine without any (no HCA, no Soft-RoCE,
//!   or no InfiniBand support in the kernel at all) it returns `Ok(vec![])`: having no
//!   device is a normal outcome. [`Context::open`] on such a machine fails with
//!   [`RdmaError::NoDevice`].
//! - A [`MemoryRegion`] takes ownership of a [`PinnedRegion`](crate::PinnedRegion), so the
//!   memory cannot be unmapped while the NIC may still touch it. Its bytes are shared with
//!   remote peers (like a shared-memory mapping): local access goes through copies
//!   ([`MemoryRegion::read_at`], [`MemoryRegion::write_at`]) and atomics
//!   ([`MemoryRegion::atomic_u64`]); no Rust reference to the bytes is ever handed out.
//! - A [`BorrowedRegion`] registers memory the caller owns for as long as it borrows it
//!   mutably (no Rust access meanwhile) and deregisters it on drop, after which the
//!   device touches it no more: for RDMA READs straight into a caller's buffer
//!   ([`QueuePair::post_read_borrowed`]); registration per use costs a system call.
//! - A queue pair exists first as a [`PreparedQueuePair`] (state INIT), which can only
//!   tell its [`QpEndpoint`]; [`PreparedQueuePair::handshake`] with the peer's endpoint
//!   (exchanged out of band, for pserv over the TCP control connection) moves it through
//!   RTR to RTS and yields a [`QueuePair`], the only type that can post work.
//! - A [`QueuePair`] owns its [`CompletionQueue`]. Every posted work request keeps an
//!   `Arc` of its local [`MemoryRegion`] until its completion is polled (or the queue pair
//!   is destroyed), and the number of outstanding requests is bounded by the queue sizes:
//!   posting into a full queue is refused with [`RdmaError::QueueFull`].
//!
//! Nothing raw leaks out: no raw pointers, no file descriptors, no `unsafe fn`.

mod context;
mod cq;
mod endpoint;
mod ext;
mod mr;
mod qp;

use std::io;

pub use context::{
    devices, is_software_firmware, Context, DeviceInfo, DeviceLimits, PortInfo, ProtectionDomain,
};
pub use cq::{Completion, CompletionChannel, CompletionError, CompletionQueue, Opcode};
pub use endpoint::{DecodeError, QpEndpoint, RemoteRegion};
pub use ext::GidType;
pub use mr::{Access, BorrowedRegion, LocalRange, MemoryRegion};
pub use qp::{PreparedQueuePair, QpConfig, QueuePair};

/// Errors of the verbs layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// The machine has no RDMA device (no HCA, no Soft-RoCE link, or no kernel support).
    #[error("no RDMA device on this machine (ibv_get_device_list found none)")]
    NoDevice,
    /// A device was asked for by name and is not there.
    #[error("no RDMA device named {name:?} (devices: {available:?})")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The devices that do exist.
        available: Vec<String>,
    },
    /// Listing the devices failed for another reason than "there are none".
    #[error("listing RDMA devices failed")]
    DeviceList(#[source] io::Error),
    /// A verb failed.
    #[error("{op} failed on device {device}")]
    Verb {
        /// The verb, as named in libibverbs (`ibv_alloc_pd`, ...).
        op: &'static str,
        /// The device it ran on.
        device: String,
        /// The errno it reported.
        #[source]
        source: io::Error,
    },
    /// The port a queue pair should use is not up (GIDs and LIDs are only valid on an
    /// ACTIVE or ARMED port).
    #[error("port {port} of device {device} is {state}, not ACTIVE")]
    PortNotActive {
        /// The device.
        device: String,
        /// The port number (from 1).
        port: u8,
        /// The port state, as `ibv_port_state_str` names it.
        state: String,
    },
    /// A local or remote range does not lie inside its region.
    #[error("{what} range {offset}+{len} is outside its region of {region_len} bytes")]
    OutOfBounds {
        /// Which range: "local", "remote", ...
        what: &'static str,
        /// Start of the range in bytes from the region's start.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
        /// Length of the region in bytes.
        region_len: u64,
    },
    /// A message is longer than the port (or a work request's 32-bit length) allows.
    #[error("a message of {len} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// Requested length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The send or receive queue already holds its maximum of outstanding work requests;
    /// poll completions first.
    #[error("the {queue} queue is full ({max} outstanding work requests)")]
    QueueFull {
        /// "send" or "receive".
        queue: &'static str,
        /// The bound.
        max: usize,
    },
    /// A local memory region lacks the access right the operation needs.
    #[error("the local memory region lacks {needed} access")]
    AccessDenied {
        /// The missing right, e.g. "LOCAL_WRITE".
        needed: &'static str,
    },
    /// A local memory region was registered in another protection domain than the queue
    /// pair's.
    #[error("the memory region belongs to another protection domain than the queue pair")]
    ForeignRegion,
    /// A configuration value is out of range.
    #[error("invalid RDMA configuration: {0}")]
    Config(String),
    /// A peer's queue-pair endpoint is not usable.
    #[error("invalid remote endpoint: {0}")]
    Endpoint(#[from] DecodeError),
}

/// Result of the verbs layer.
pub type Result<T, E = RdmaError> = std::result::Result<T, E>;

/// Errno of a failed verb that returns a null pointer and sets `errno`.
fn last_errno(op: &'static str, device: &str) -> RdmaError {
    RdmaError::Verb {
        op,
        device: device.to_owned(),
        source: io::Error::last_os_error(),
    }
}

/// Error of a verb that returns its errno (`ibv_modify_qp`, `ibv_post_send`, ...).
fn returned_errno(op: &'static str, device: &str, rc: i32) -> RdmaError {
    // Some providers return -errno, some +errno.
    RdmaError::Verb {
        op,
        device: device.to_owned(),
        source: io::Error::from_raw_os_error(rc.abs()),
    }
}

/// Path MTU of a queue pair, as the verbs enumerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256 = 1,
    /// 512 bytes.
    Mtu512 = 2,
    /// 1024 bytes (the largest that fits a 1500-byte Ethernet frame with RoCE headers).
    Mtu1024 = 3,
    /// 2048 bytes.
    Mtu2048 = 4,
    /// 4096 bytes.
    Mtu4096 = 5,
}

impl Mtu {
    /// The verbs code (`IBV_MTU_*`), if it is one.
    pub fn from_code(code: u32) -> Option<Mtu> {
        Some(match code {
            1 => Mtu::Mtu256,
            2 => Mtu::Mtu512,
            3 => Mtu::Mtu1024,
            4 => Mtu::Mtu2048,
            5 => Mtu::Mtu4096,
            _ => return None,
        })
    }

    /// The verbs code (`IBV_MTU_*`).
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The MTU in bytes.
    pub fn bytes(self) -> usize {
        128 << (self as u32)
    }
}

/// Link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    /// InfiniBand: peers are addressed by LID (and GID across subnets).
    InfiniBand,
    /// Ethernet (RoCE, including Soft-RoCE `rxe`): peers are addressed by GID.
    Ethernet,
    /// The driver did not say (old drivers; treated as InfiniBand).
    Unspecified,
}

/// Plain C structs of the verbs ABI for which the all-zero bit pattern is a valid value
/// (and the value libibverbs documents as "unset" for every field we do not fill).
///
/// # Safety
///
/// Implement only for `repr(C)` types made solely of integers, raw pointers, and arrays
/// or unions of those: no references, no `NonNull`, no Rust enums, no `bool`.
pub(crate) unsafe trait Zeroable: Sized {}

// The impls below: each of these bindgen / rdma-sys structs consists only of integers,
// raw pointers, and nested structs, unions or arrays of the same (checked against the
// generated bindings of rdma-sys 0.3 and rdma-core's verbs.h).
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_port_attr {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_device_attr {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_qp_attr {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_qp_init_attr {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_send_wr {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_recv_wr {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_wc {}
// SAFETY: see above.
unsafe impl Zeroable for rdma_sys::ibv_gid {}

/// A zeroed verbs struct.
pub(crate) fn zeroed<T: Zeroable>() -> T {
    // SAFETY: `T: Zeroable` promises all-zero bytes are a valid `T`.
    unsafe { std::mem::zeroed() }
}
