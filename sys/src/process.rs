//! Child processes that do not outlive the process that started them.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Make the child `cmd` will start receive SIGKILL when the thread that starts it exits
/// (`PR_SET_PDEATHSIG`): for a launcher, whose main thread starts its children, that is
/// when the launcher dies, however it dies (SIGKILL included). If the launcher is gone
/// already by the time the child runs (it died between the fork and the `prctl`), the
/// child kills itself at once.
///
/// The signal follows the *thread*, not the process: start children from a thread that
/// lives as long as they should (the main thread of a launcher).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: getpid has no preconditions; it runs here, in the parent.
    let parent = unsafe { libc::getpid() };
    // SAFETY: in the child, between fork and exec, the hook only calls prctl, getppid,
    // getpid and kill, all async-signal-safe, and touches no memory but its own copied
    // integer.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A grandchild started with `die_with_parent` by a child that then exits dies too.
    #[test]
    fn a_child_dies_with_the_thread_that_started_it() {
        // A thread starts `sleep 30` and exits: the sleep gets SIGKILL.
        let pid = std::thread::spawn(|| {
            let child = die_with_parent(Command::new("sleep").arg("30"))
                .spawn()
                .expect("sleep starts");
            let pid = child.id();
            // Not waited for here: the exit of this thread is what kills it.
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child's pid with a valid out pointer.
            let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            if r == pid as i32 {
                assert!(libc::WIFSIGNALED(status), "status {status}");
                assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
                return;
            }
            assert!(Instant::now() < deadline, "the child still runs after 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
