//! Page-aligned, pre-populated, locked memory regions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use memmap2::{Advice, MmapMut, MmapOptions};

/// Regions of at least this many bytes ask the kernel for transparent huge pages.
const HUGE_PAGE_THRESHOLD: usize = 2 << 20;

static WARNED_UNLOCKED: AtomicBool = AtomicBool::new(false);

/// Errors of [`PinnedRegion`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The anonymous mapping itself failed (out of address space or memory).
    #[error("mapping {len} bytes of anonymous memory failed")]
    Map {
        /// Requested length in bytes.
        len: usize,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// The system page size in bytes.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions; it only reads a system constant.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v <= 0 {
            4096
        } else {
            v as usize
        }
    })
}

/// Current soft RLIMIT_MEMLOCK in bytes (`u64::MAX` when unlimited or unknown).
fn memlock_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass by valid pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_cur
    }
}

/// A page-aligned anonymous memory region whose pages are populated at creation and,
/// where the system allows, locked in RAM (`mlock`; [`populated`](Self::populated)
/// regions are never locked).
///
/// This is the memory parameter buffers live in: it is allocated once,
/// reused, and later registered with the one-sided transports. The region is zeroed.
///
/// Edge cases: a zero-length request maps one page; lengths are rounded up to whole pages,
/// and [`len`](Self::len) reports the rounded length. If locking fails (for example a
/// non-root user over the 8 MiB default RLIMIT_MEMLOCK), the region stays usable and
/// unlocked, [`is_locked`](Self::is_locked) returns `false`, and the first such failure in
/// the process is logged once.
pub struct PinnedRegion {
    map: MmapMut,
    locked: bool,
}

impl std::fmt::Debug for PinnedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedRegion")
            .field("len", &self.map.len())
            .field("locked", &self.locked)
            .finish()
    }
}

impl PinnedRegion {
    /// Map, populate and try to lock `len` bytes (rounded up to whole pages).
    pub fn new(len: usize) -> Result<Self, RegionError> {
        let mut region = Self::populated(len)?;
        region.locked = region.try_lock();
        Ok(region)
    }

    /// Map and populate `len` bytes (rounded up to whole pages) like [`new`](Self::new),
    /// without locking them: for large transient buffers (a frame being received) that
    /// should start populated, on huge pages where the kernel gives them, but need not
    /// stay resident. [`is_locked`](Self::is_locked) is `false`.
    ///
    /// A length that is a whole number of huge pages (2 MiB) gets a mapping the kernel
    /// aligns to them, so all of it can be huge pages.
    pub fn populated(len: usize) -> Result<Self, RegionError> {
        let page = page_size();
        let len = len.max(1).div_ceil(page) * page;
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|source| RegionError::Map { len, source })?;
        if len >= HUGE_PAGE_THRESHOLD {
            // Best effort: THP may be disabled; the region works either way.
            let _ = map.advise(Advice::HugePage);
        }
        let mut region = PinnedRegion { map, locked: false };
        region.populate();
        Ok(region)
    }

    fn populate(&mut self) {
        if self.map.advise(Advice::PopulateWrite).is_ok() {
            return;
        }
        // Older kernels: touch one byte per page (the mapping is zeroed, so writing a zero
        // changes nothing but faults the page in writable).
        let page = page_size();
        for off in (0..self.map.len()).step_by(page) {
            self.map[off] = 0;
        }
    }

    fn try_lock(&self) -> bool {
        match self.map.lock() {
            Ok(()) => true,
            Err(err) => {
                if !WARNED_UNLOCKED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        bytes = self.map.len(),
                        memlock_limit = memlock_limit(),
                        error = %err,
                        "could not mlock a parameter region (RLIMIT_MEMLOCK too low and no \
                         CAP_IPC_LOCK?); continuing with unlocked memory, further failures \
                         are not logged"
                    );
                }
                false
            }
        }
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always `false`: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// The region's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.map
    }

    /// The region's bytes, mutably.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// The whole region viewed as `T`s (the region is page-aligned and a whole number of
    /// pages, so any `Pod` type with alignment up to the page size fits exactly).
    pub fn as_slice<T: bytemuck::Pod>(&self) -> &[T] {
        bytemuck::cast_slice(&self.map)
    }

    /// The whole region viewed as mutable `T`s.
    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_pages_and_is_zeroed_and_aligned() {
        let r = PinnedRegion::new(10).unwrap();
        assert_eq!(r.len(), page_size());
        assert!(r.as_bytes().iter().all(|&b| b == 0));
        assert_eq!(r.as_bytes().as_ptr() as usize % page_size(), 0);
    }

    #[test]
    fn typed_views_cover_the_region() {
        let mut r = PinnedRegion::new(3 * page_size() + 1).unwrap();
        assert_eq!(r.len(), 4 * page_size());
        let n = r.len() / 4;
        let floats = r.as_mut_slice::<f32>();
        assert_eq!(floats.len(), n);
        floats[n - 1] = 2.5;
        assert_eq!(r.as_slice::<f32>()[n - 1], 2.5);
        assert_eq!(r.as_slice::<u64>().len(), r.len() / 8);
    }

    #[test]
    fn populated_regions_are_zeroed_and_never_locked() {
        let mut r = PinnedRegion::populated(4 << 20).unwrap();
        assert_eq!(r.len(), 4 << 20);
        assert!(!r.is_locked());
        assert!(r.as_slice::<u64>().iter().all(|&w| w == 0));
        r.as_mut_slice::<u64>()[7] = 7;
        assert_eq!(r.as_slice::<u64>()[7], 7);
    }

    #[test]
    fn large_regions_are_usable_whether_locked_or_not() {
        let mut r = PinnedRegion::new(16 << 20).unwrap();
        let v = r.as_mut_slice::<u64>();
        for (i, x) in v.iter_mut().enumerate() {
            *x = i as u64;
        }
        assert_eq!(r.as_slice::<u64>()[12345], 12345);
        // Running as root (CAP_IPC_LOCK) locks; otherwise the 8 MiB limit refuses 16 MiB.
        // Either way the answer must match what the kernel says about this process.
        let can_lock_everything = memlock_limit() == u64::MAX || is_root();
        if can_lock_everything {
            assert!(r.is_locked());
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}
