//! CPU cores: how many there are and pinning the calling thread to one.

/// Number of CPU cores this process may run on (at least 1).
pub fn core_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Pin the calling thread to core `index % core_count()`.
///
/// Returns `false` (and changes nothing) when the platform refuses, for example inside a
/// container whose CPU set excludes the core; callers log it and carry on unpinned.
pub fn pin_current_thread(index: usize) -> bool {
    let Some(cores) = core_affinity::get_core_ids() else {
        return false;
    };
    if cores.is_empty() {
        return false;
    }
    core_affinity::set_for_current(cores[index % cores.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_keeps_the_thread_on_one_core() {
        let n = core_count();
        assert!(n >= 1);
        let handle = std::thread::spawn(move || {
            let ok = pin_current_thread(n - 1);
            // SAFETY-free check: sched_getcpu is not exposed; the affinity mask is.
            let ids = core_affinity::get_core_ids().unwrap_or_default();
            (ok, ids.len())
        });
        let (ok, visible) = handle.join().unwrap();
        assert!(ok, "pinning to an allowed core must succeed");
        // After pinning, the thread's allowed set is exactly one core.
        assert_eq!(visible, 1);
    }
}
