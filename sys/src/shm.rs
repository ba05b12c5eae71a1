//! Shared-memory regions that other processes of the host map and access in place.
//!
//! # memfd, not a file under /dev/shm
//!
//! A [`SharedRegion`] is a `memfd` (an anonymous tmpfs file) that its owner keeps open;
//! peers reach it as `/proc/<owner pid>/fd/<n>` (its *locator*). Against a named file in
//! `/dev/shm` this buys:
//!
//! - **Nothing to clean up after a crash.** The memory is freed when the last descriptor
//!   and mapping go; a SIGKILLed owner leaves no file holding RAM in tmpfs.
//! - **Peers cannot shrink it.** The file is sealed (`F_SEAL_SHRINK | F_SEAL_GROW |
//!   F_SEAL_SEAL`) before anyone else can open it, so no peer, however buggy, can
//!   truncate it and make the owner's accesses fault with SIGBUS.
//! - **Access needs the owner's permission.** Opening `/proc/<pid>/fd/<n>` requires the
//!   right to inspect the owner process (same user, or privileged): no world-readable
//!   name to guess.
//!
//! The price: the locator is only valid while the owner is alive and keeps the region
//! (after [`Drop`] no new peer can open it; mapped peers keep theirs), and pid reuse could
//! make a stale locator name another process's file — which is why the transport checks
//! a header with a random key in every region it opens.
//!
//! # Racing accesses
//!
//! The bytes of a shared region can change at any moment (another process writes them),
//! so no `&[u8]` to them is ever handed out. Access goes through [`atomic_u64`]
//! (words for version counters and flags) and [`copy_out`] / [`copy_in`] (bulk copies
//! that may race with writers; the caller validates what it copied with a version
//! protocol).
//!
//! [`atomic_u64`]: SharedRegion::atomic_u64
//! [`copy_out`]: SharedRegion::copy_out
//! [`copy_in`]: SharedRegion::copy_in

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::region::page_size;

/// Regions of at least this many bytes ask the kernel for transparent huge pages (shmem
/// THP must also be enabled in `/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
const HUGE_PAGE_THRESHOLD: usize = 2 << 20;

/// Seals applied to every region: its size is fixed for good.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Errors of [`SharedRegion`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// Creating, sizing or sealing the memfd failed.
    #[error("creating a shared region of {len} bytes failed ({step})")]
    Create {
        /// Requested length in bytes.
        len: usize,
        /// Which step failed.
        step: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The locator is not of the form `/proc/<pid>/fd/<n>`.
    #[error("{locator:?} is not a shared-region locator (/proc/<pid>/fd/<n>)")]
    BadLocator {
        /// The locator as given (lossy UTF-8).
        locator: String,
    },
    /// Opening the locator failed (the owner exited or dropped the region, or this
    /// process may not inspect the owner).
    #[error("opening shared region {locator} failed")]
    Open {
        /// The locator.
        locator: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The region's size is not what the opener expected.
    #[error("shared region {locator} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The locator.
        locator: String,
        /// Length the opener asked for.
        expected: usize,
        /// Length of the file.
        actual: u64,
    },
    /// The file at the locator is not a sealed region (it can be resized under us).
    #[error("{locator} is not a sealed shared region")]
    NotSealed {
        /// The locator.
        locator: String,
    },
    /// Mapping the region failed.
    #[error("mapping shared region of {len} bytes failed")]
    Map {
        /// Length in bytes.
        len: usize,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// A page-aligned shared-memory mapping that other processes of the host can map too.
///
/// The owner makes one with [`create`](Self::create) (zeroed, populated, sealed to its
/// size) and hands out [`locator`](Self::locator); a peer maps it with
/// [`open`](Self::open). Both sides then use the same bytes through atomic words and
/// racy copies (see the module docs). Dropping the owner's region closes its descriptor:
/// peers that already mapped it keep a valid mapping; new opens fail.
///
/// Edge cases: lengths are rounded up to whole pages (a zero length gives one page);
/// [`len`](Self::len) is the rounded length, and `open` must be given that length.
pub struct SharedRegion {
    map: MmapRaw,
    /// The owner keeps the memfd open so the locator stays valid; peers close theirs
    /// after mapping.
    file: Option<File>,
    locator: String,
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("len", &self.map.len())
            .field("locator", &self.locator)
            .field("owner", &self.file.is_some())
            .finish()
    }
}

impl SharedRegion {
    /// Create a region of `len` bytes (rounded up to whole pages), zeroed, sealed to its
    /// size and populated.
    pub fn create(len: usize) -> Result<Self, ShmError> {
        let page = page_size();
        let len = len.max(1).div_ceil(page) * page;
        let err = |step, source| ShmError::Create { len, step, source };
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = CString::new(format!(
            "pserv-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
        .expect("no NUL in a formatted name");
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the
        // flags are valid memfd flags.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(err("memfd_create", io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it, so
        // the File becomes its only owner and closes it on drop.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|e| err("ftruncate", e))?;
        // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we own, with a valid seal mask; it
        // reads and writes no memory of ours.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) };
        if rc != 0 {
            return Err(err("sealing", io::Error::last_os_error()));
        }
        let locator = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        let map = map_shared(&file, len)?;
        Ok(SharedRegion {
            map,
            file: Some(file),
            locator,
        })
    }

    /// Map the region at `locator` (made by [`create`](Self::create) in another process,
    /// or this one) read-write. `len` must be its exact length.
    ///
    /// Refuses locators not of the form `/proc/<pid>/fd/<n>`, files whose size differs
    /// from `len`, and files that are not sealed against resizing.
    pub fn open(locator: &str, len: usize) -> Result<Self, ShmError> {
        let locator = canonical_locator(locator).ok_or_else(|| ShmError::BadLocator {
            locator: locator.to_owned(),
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&locator)
            .map_err(|source| ShmError::Open {
                locator: locator.clone(),
                source,
            })?;
        let actual = file
            .metadata()
            .map_err(|source| ShmError::Open {
                locator: locator.clone(),
                source,
            })?
            .len();
        if actual != len as u64 || len == 0 {
            return Err(ShmError::SizeMismatch {
                locator,
                expected: len,
                actual,
            });
        }
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor we own; it reads and writes no
        // memory of ours.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(ShmError::NotSealed { locator });
        }
        let map = map_shared(&file, len)?;
        // The mapping keeps the memory alive; the descriptor is not needed any more.
        drop(file);
        Ok(SharedRegion {
            map,
            file: None,
            locator,
        })
    }

    /// Where peers find this region: `/proc/<pid>/fd/<n>`.
    pub fn locator(&self) -> &str {
        &self.locator
    }

    /// Whether this process created the region (and keeps the locator valid).
    pub fn is_owner(&self) -> bool {
        self.file.is_some()
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always `false`: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The 8-byte word at `off` as an atomic.
    ///
    /// Panics unless `off` is a multiple of 8 and `off + 8 <= len()`.
    #[inline]
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off.checked_add(8).is_some_and(|end| end <= self.len()),
            "atomic_u64({off}) outside or misaligned in a region of {} bytes",
            self.len()
        );
        // SAFETY: the word lies inside the mapping (checked above), which is page-aligned
        // (so `off % 8 == 0` makes it 8-byte aligned) and stays mapped while `self` is
        // borrowed. `AtomicU64` has the size and alignment of u64 and every bit pattern is
        // valid. No `&`/`&mut` to these bytes exists anywhere: other threads and processes
        // access them only atomically or through `copy_out`/`copy_in` (machine-level
        // copies, see there), so handing out a shared atomic reference creates no
        // aliasing or data-race UB on our side.
        unsafe { &*self.map.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Copy `dst.len()` bytes at `off` into `dst`, at memcpy speed.
    ///
    /// Another process may write the same bytes meanwhile: `dst` then holds some mix of
    /// old and new bytes. That is sound for plain bytes; whether they form a consistent
    /// state is for the caller's version protocol to decide.
    ///
    /// Panics if `[off, off + dst.len())` is outside the region.
    #[inline]
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), "copy_out");
        // SAFETY: the source range is inside the live mapping (checked above) and `dst`
        // is an exclusive borrow of `dst.len()` bytes; they cannot overlap (`dst` is a
        // Rust reference, and no reference into the mapping is ever created). See
        // `racy_copy` for why racing with other writers is sound.
        unsafe { racy_copy(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copy `src` into the region at `off`, at memcpy speed. Racing readers (here or in
    /// other processes) may see a mix of old and new bytes.
    ///
    /// Panics if `[off, off + src.len())` is outside the region.
    #[inline]
    pub fn copy_in(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), "copy_in");
        // SAFETY: the destination range is inside the live mapping (checked above), which
        // is writable (mapped PROT_READ | PROT_WRITE, MAP_SHARED); `src` is a shared
        // borrow of `src.len()` bytes that cannot overlap the mapping (no reference into
        // the mapping exists). See `racy_copy` for why racing with others is sound.
        unsafe { racy_copy(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len()) }
    }

    /// Copy `len` bytes at `off` of this region into `dst` at `dst_off`, at memcpy
    /// speed. Either side may be written by others meanwhile (see
    /// [`copy_out`](Self::copy_out)). `dst` may be this region or another mapping of
    /// the same memory: overlapping ranges then leave unspecified bytes in the
    /// destination, nothing worse.
    ///
    /// Panics if either range is outside its region.
    #[inline]
    pub fn copy_to(&self, off: usize, dst: &SharedRegion, dst_off: usize, len: usize) {
        self.check(off, len, "copy_to (source)");
        dst.check(dst_off, len, "copy_to (destination)");
        // SAFETY: both ranges are inside live mappings (checked above), the destination
        // one writable; no Rust reference covers either (only atomics and copies are
        // ever handed out). Overlap is allowed by `racy_copy` (machine-level copy).
        unsafe {
            racy_copy(
                self.map.as_ptr().add(off),
                dst.map.as_mut_ptr().add(dst_off),
                len,
            )
        }
    }

    #[inline]
    fn check(&self, off: usize, len: usize, op: &str) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len()),
            "{op}({off}, {len}) outside a region of {} bytes",
            self.len()
        );
    }
}

/// Map `len` bytes of `file` shared and read-write, ask for huge pages where large, and
/// populate every page writable (first writes into a fresh mapping run ~10x slower).
fn map_shared(file: &File, len: usize) -> Result<MmapRaw, ShmError> {
    let map = MmapOptions::new()
        .len(len)
        .map_raw(file)
        .map_err(|source| ShmError::Map { len, source })?;
    if len >= HUGE_PAGE_THRESHOLD {
        // Best effort: shmem THP is often disabled; the region works either way.
        let _ = map.advise(Advice::HugePage);
    }
    if map.advise(Advice::PopulateWrite).is_err() {
        // Kernels before 5.14: fault every page in writable by touching it. An atomic
        // add of zero changes nothing, even if a peer writes the word at the same time.
        let page = page_size();
        for off in (0..len).step_by(page) {
            // SAFETY: `off` is page-aligned and inside the mapping, which outlives this
            // loop; the word is only accessed atomically here (see `atomic_u64`).
            let word = unsafe { &*map.as_ptr().add(off).cast::<AtomicU64>() };
            word.fetch_add(0, Ordering::Relaxed);
        }
    }
    Ok(map)
}

/// `/proc/<pid>/fd/<n>` rebuilt from its numbers, or `None` for anything else (so a
/// locator from the network can only ever open another process's descriptor).
fn canonical_locator(locator: &str) -> Option<String> {
    let rest = locator.strip_prefix("/proc/")?;
    let (pid, rest) = rest.split_once('/')?;
    let fd = rest.strip_prefix("fd/")?;
    let num = |s: &str| {
        if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse::<u32>().ok()
        }
    };
    Some(format!("/proc/{}/fd/{}", num(pid)?, num(fd)?))
}

/// Copy `len` bytes from `src` to `dst`, where either side may be shared memory that
/// other threads or processes access concurrently.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and no Rust
/// reference may cover `dst` (nor a `&mut` cover `src`) for the duration of the call.
/// The ranges may overlap (two mappings of the same pages cannot be told apart by their
/// addresses): the destination then holds unspecified bytes, as with any racing write.
///
/// Why racing is sound: a plain `copy_nonoverlapping` that races with another writer is
/// a data race, which the Rust abstract machine makes undefined behaviour. On x86-64 the
/// copy is done in inline assembly instead. Assembly is opaque to the compiler: it may
/// assume nothing about the bytes beyond the pointers it was given, and the effect of
/// the instructions is defined by the hardware, whose plain loads and stores of racing
/// bytes are well defined (each byte is some value that was stored; x86-TSO). The block
/// therefore behaves like a sequence of relaxed atomic accesses, which is legal Rust.
/// Elsewhere the copy falls back to relaxed atomic byte accesses (sound by construction,
/// slower).
///
/// Why not `rep movsb`: on these machines it (and glibc's memcpy, which uses it for some
/// sizes) drops from ~30 GB/s to ~3.5 GB/s when source and destination are misaligned by
/// 8 or 1 byte relative to each other (measured for 4 KiB and 16 MiB). An unaligned
/// 128-byte AVX load/store loop (32-byte SSE2 one without AVX) runs at memcpy speed for
/// every alignment; `rep movsb` only copies the tail of fewer than 128 bytes.
#[inline]
unsafe fn racy_copy(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if len >= 256 && std::is_x86_feature_detected!("avx") {
            // SAFETY: the caller's contract is passed on unchanged, and the CPU (with the
            // OS saving its state) supports AVX, checked just above.
            unsafe { copy_avx(src, dst, len) }
        } else {
            // SAFETY: the caller's contract is passed on unchanged; SSE2 is part of
            // x86-64.
            unsafe { copy_sse2(src, dst, len) }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::atomic::AtomicU8;
        for i in 0..len {
            // SAFETY: both bytes are in range by the contract; AtomicU8 has the layout
            // of u8, and atomic accesses may race with anything.
            unsafe {
                let v = (*src.add(i).cast::<AtomicU8>()).load(Ordering::Relaxed);
                (*dst.add(i).cast::<AtomicU8>()).store(v, Ordering::Relaxed);
            }
        }
    }
}

/// [`racy_copy`] with 128 bytes per iteration in AVX registers.
///
/// # Safety
///
/// The contract of [`racy_copy`], and the CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_avx(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the loop reads `[src, src + 128 * (len / 128))` and writes the same span of
    // `dst`, then `rep movsb` copies the remaining `len % 128` bytes (forward: the ABI
    // guarantees the direction flag is clear at a call boundary), so exactly the `len`
    // bytes the contract makes valid are touched. Unaligned `vmovdqu` has no alignment
    // requirement. Clobbered registers are declared; `vzeroupper` avoids AVX-SSE
    // transition stalls in the caller; no stack is used.
    unsafe {
        core::arch::asm!(
            "test {blocks}, {blocks}",
            "jz 3f",
            "2:",
            "vmovdqu ymm0, [rsi]",
            "vmovdqu ymm1, [rsi + 32]",
            "vmovdqu ymm2, [rsi + 64]",
            "vmovdqu ymm3, [rsi + 96]",
            "vmovdqu [rdi], ymm0",
            "vmovdqu [rdi + 32], ymm1",
            "vmovdqu [rdi + 64], ymm2",
            "vmovdqu [rdi + 96], ymm3",
            "add rsi, 128",
            "add rdi, 128",
            "dec {blocks}",
            "jnz 2b",
            "3:",
            "vzeroupper",
            "rep movsb",
            blocks = inout(reg) len / 128 => _,
            inout("rcx") len % 128 => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            out("ymm0") _,
            out("ymm1") _,
            out("ymm2") _,
            out("ymm3") _,
            options(nostack),
        );
    }
}

/// [`racy_copy`] with 32 bytes per iteration in SSE2 registers.
///
/// # Safety
///
/// The contract of [`racy_copy`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn copy_sse2(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: as in `copy_avx`, with 32-byte iterations: exactly `len` bytes of each
    // range are touched, `movdqu` has no alignment requirement, clobbers are declared,
    // no stack is used.
    unsafe {
        core::arch::asm!(
            "test {blocks}, {blocks}",
            "jz 3f",
            "2:",
            "movdqu xmm0, [rsi]",
            "movdqu xmm1, [rsi + 16]",
            "movdqu [rdi], xmm0",
            "movdqu [rdi + 16], xmm1",
            "add rsi, 32",
            "add rdi, 32",
            "dec {blocks}",
            "jnz 2b",
            "3:",
            "rep movsb",
            blocks = inout(reg) len / 32 => _,
            inout("rcx") len % 32 => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            out("xmm0") _,
            out("xmm1") _,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_share_bytes_and_words() {
        let a = SharedRegion::create(10).unwrap();
        assert_eq!(a.len(), page_size());
        assert!(a.is_owner());
        let b = SharedRegion::open(a.locator(), a.len()).unwrap();
        assert!(!b.is_owner());
        a.copy_in(100, b"hello");
        let mut out = [0u8; 5];
        b.copy_out(100, &mut out);
        assert_eq!(&out, b"hello");
        b.atomic_u64(8).store(42, Ordering::Release);
        assert_eq!(a.atomic_u64(8).load(Ordering::Acquire), 42);
        let mut zero = vec![1u8; a.len()];
        a.copy_out(0, &mut zero[..8]);
        assert_eq!(&zero[..8], &[0; 8]);
    }

    #[test]
    fn open_refuses_wrong_sizes_locators_and_unsealed_files() {
        let a = SharedRegion::create(3 * page_size()).unwrap();
        match SharedRegion::open(a.locator(), page_size()) {
            Err(ShmError::SizeMismatch { actual, .. }) => {
                assert_eq!(actual, 3 * page_size() as u64)
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "/etc/passwd",
            "/proc/1/fd/",
            "/proc/x/fd/3",
            "/proc/1/fd/3/..",
            "",
        ] {
            assert!(matches!(
                SharedRegion::open(bad, page_size()),
                Err(ShmError::BadLocator { .. })
            ));
        }
        // A plain file reached through /proc/self/fd is refused: it is not sealed.
        let path = std::env::temp_dir().join(format!("pserv-shm-test-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(page_size() as u64).unwrap();
        let loc = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
        let got = SharedRegion::open(&loc, page_size());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(got, Err(ShmError::NotSealed { .. })), "{got:?}");
    }

    #[test]
    fn peers_keep_their_mapping_after_the_owner_drops() {
        let a = SharedRegion::create(page_size()).unwrap();
        a.copy_in(0, b"kept");
        let loc = a.locator().to_owned();
        let b = SharedRegion::open(&loc, a.len()).unwrap();
        drop(a);
        let mut out = [0u8; 4];
        b.copy_out(0, &mut out);
        assert_eq!(&out, b"kept");
        assert!(SharedRegion::open(&loc, page_size()).is_err());
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_range_copies_panic() {
        let a = SharedRegion::create(page_size()).unwrap();
        a.copy_in(page_size() - 2, b"abc");
    }

    #[test]
    #[should_panic(expected = "misaligned")]
    fn misaligned_words_panic() {
        let a = SharedRegion::create(page_size()).unwrap();
        a.atomic_u64(4);
    }

    #[test]
    fn copy_to_moves_bytes_between_mappings() {
        let a = SharedRegion::create(page_size()).unwrap();
        let b = SharedRegion::create(page_size()).unwrap();
        a.copy_in(10, b"between");
        a.copy_to(10, &b, 100, 7);
        let mut out = [0u8; 7];
        b.copy_out(100, &mut out);
        assert_eq!(&out, b"between");
        // Overlapping copies within one region are allowed (bytes unspecified).
        a.copy_to(0, &a, 1, 64);
    }

    #[test]
    fn copies_of_every_alignment_and_length() {
        let a = SharedRegion::create(2 * page_size()).unwrap();
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in [0usize, 1, 7, 63, 4095] {
            for len in (0..300).chain([511, 512, 513, 1000]) {
                a.copy_in(off, &src[..len]);
                let mut out = vec![0u8; len + 2];
                a.copy_out(off, &mut out[1..=len]);
                assert_eq!(out[1..=len], src[..len], "off {off} len {len}");
                assert_eq!((out[0], out[len + 1]), (0, 0), "off {off} len {len}");
            }
        }
    }
}
