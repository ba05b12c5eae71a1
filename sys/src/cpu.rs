//! CPU cores: how many there are and pinning the calling thread to one.

/// Number of CPU cores this process may run on (at least 1).
pub fn core_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The cores this process may run on, read once: `core_affinity::get_core_ids` reads the
/// *calling thread's* mask, which after pinning holds a single core, so a thread that is
/// re-pinned must not ask again.
fn allowed_cores() -> &'static [core_affinity::CoreId] {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES.get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
}

/// Pin the calling thread to the `index % n`-th of the `n` cores the process may use
/// (a thread may be pinned again later, to another core).
///
/// Returns `false` (and changes nothing) when the platform refuses, for example inside a
/// container whose CPU set excludes the core; callers log it and carry on unpinned.
pub fn pin_current_thread(index: usize) -> bool {
    let cores = allowed_cores();
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

    #[test]
    fn a_pinned_thread_can_be_pinned_again_to_another_core() {
        let n = core_count();
        if n < 2 {
            return;
        }
        let ids = std::thread::spawn(move || {
            assert!(pin_current_thread(0));
            let first = core_affinity::get_core_ids().unwrap();
            assert!(pin_current_thread(1));
            let second = core_affinity::get_core_ids().unwrap();
            (first, second)
        })
        .join()
        .unwrap();
        assert_eq!(ids.0.len(), 1);
        assert_eq!(ids.1.len(), 1);
        assert_ne!(ids.0[0].id, ids.1[0].id, "re-pinning must move the thread");
    }
}
