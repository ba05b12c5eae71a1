//! `pserv-sys`: the only crate of pserv that contains `unsafe` code.
//!
//! It turns operating-system facilities into safe, owned types:
//!
//! - [`PinnedRegion`]: a page-aligned anonymous mapping, populated up front (writing into
//!   an unpopulated mapping runs an order of magnitude slower than into a populated one),
//!   backed by transparent huge pages where the kernel allows, and locked in RAM with
//!   `mlock` where `RLIMIT_MEMLOCK` / `CAP_IPC_LOCK` allow. When it cannot lock, it says so
//!   once in the log and carries on unlocked.
//! - [`SharedRegion`]: a sealed memfd mapping that other processes of the host map by its
//!   locator (`/proc/<pid>/fd/<n>`), accessed only through atomic words and racy copies
//!   (vector loads and stores in inline assembly), so peers' concurrent writes are never
//!   undefined behaviour.
//! - [`cpu`]: core counting and pinning the calling thread to a core.
//! - [`prefetch_read`]: a software prefetch hint for hash-table probes.
//! - [`fd::wait_writable`]: wait (bounded) until a socket can take more bytes.
//! - [`process::die_with_parent`]: children killed when their launcher dies.
//! - `rdma` (cargo feature `rdma`, needs rdma-core's libibverbs): safe, owned RDMA verbs
//!   over `rdma-sys`: devices, protection domains, memory regions over [`PinnedRegion`]s,
//!   completion queues, and reliable-connected queue pairs set up as a typestate.
//!
//! Nothing raw leaks out: no raw pointers, no file descriptors, no `unsafe fn`.

mod region;
mod shm;

pub mod cpu;
pub mod fd;
pub mod process;
#[cfg(feature = "rdma")]
pub mod rdma;

#[cfg(feature = "rdma")]
pub use rdma::RdmaError;
pub use region::{page_size, PinnedRegion, RegionError};
pub use shm::{SharedRegion, ShmError};

/// Hint the CPU to fetch the cache line holding `value` into all cache levels.
///
/// This is a pure performance hint: it never faults and never changes what a program
/// computes, so it is safe to call on any reference.
#[inline(always)]
pub fn prefetch_read<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `_mm_prefetch` only hints the cache hierarchy; it does not dereference
        // the pointer architecturally, and the pointer comes from a live reference anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                (value as *const T).cast::<i8>(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = value;
    }
}
