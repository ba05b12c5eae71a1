//! Waiting on file descriptors.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Block until `fd` is writable or `timeout` passes. Returns whether it is writable (an
/// error or hang-up condition also counts as "writable": the next write reports it).
pub fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is a valid pollfd we own, the count is 1, and the descriptor is kept
    // open by the `BorrowedFd` for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        -1 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn a_fresh_socket_is_writable_and_a_full_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _peer = l.accept().unwrap();
        assert!(wait_writable(c.as_fd(), Duration::from_millis(100)).unwrap());
        c.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while c.write(&chunk).is_ok() {}
        let t = std::time::Instant::now();
        assert!(!wait_writable(c.as_fd(), Duration::from_millis(50)).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(40));
    }
}
