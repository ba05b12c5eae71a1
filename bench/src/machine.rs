//! What machine a run was taken on: cores, CPU model, kernel, date and load, so a table
//! in RESULTS.md says where its numbers come from.

use std::process::Command;

/// The machine a run was taken on.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Cores this process may run on (`nproc`).
    pub cores: usize,
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Date and time of the run (UTC).
    pub date: String,
    /// Load averages (1, 5, 15 minutes) when the run started.
    pub load: String,
}

impl Machine {
    /// Look at this machine.
    pub fn detect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = command_line("uname", &["-r"])
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: pserv_sys::cpu::core_count(),
            cpu_model,
            kernel,
            date,
            load: load_average(),
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), kernel {}, {}; load average at start {}",
            self.cores, self.cpu_model, self.kernel, self.date, self.load
        )
    }
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The first line a command prints, if it runs and succeeds.
fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines().next().map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_something() {
        let m = Machine::detect();
        assert!(m.cores >= 1);
        assert!(!m.describe().is_empty());
    }
}
