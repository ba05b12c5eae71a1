//! The child-process harness of the one-sided tests: peers are this test binary run
//! again (`--exact child_entry`) with `PSERV_ONESIDED_ROLE` set; children print
//! `@@ <key> <value>` lines that the parent reads and are killed when their handle
//! drops, so a failing test leaves no process behind.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that names a child's role.
pub const ROLE: &str = "PSERV_ONESIDED_ROLE";
/// The longest a parent waits for a child's line or exit.
pub const CHILD_WAIT: Duration = Duration::from_secs(60);

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A child process running `child_entry` in `role`; killed on drop.
pub struct ChildProc {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl ChildProc {
    pub fn spawn(role: &str, env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // libtest may have printed "test child_entry ... " on the same line.
                if let Some(i) = line.find("@@ ") {
                    if tx.send(line[i + 3..].to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        Self { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send the child one line on its stdin.
    pub fn send_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The value of the next `@@ key value` line, which must have this key.
    pub fn expect(&self, key: &str) -> String {
        let line = self
            .lines
            .recv_timeout(CHILD_WAIT)
            .unwrap_or_else(|_| panic!("child sent no {key:?} line"));
        let (k, v) = line.split_once(' ').unwrap_or((&line, ""));
        assert_eq!(k, key, "unexpected child line {line:?}");
        v.to_owned()
    }

    pub fn expect_u64(&self, key: &str) -> u64 {
        self.expect(key).parse().unwrap()
    }

    /// Wait (bounded) for a clean exit.
    pub fn finish(mut self) {
        let deadline = Instant::now() + CHILD_WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "child failed: {st}");
                return;
            }
            assert!(Instant::now() < deadline, "child did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
