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

/// Clock ticks per second of /proc/stat and /proc/self/stat (USER_HZ, 100 on Linux).
pub(crate) const TICKS_PER_S: f64 = 100.0;

/// CPU time counters: the whole machine's busy time and this process's own (itself and
/// its waited-for children, i.e. the cluster's subprocesses).
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    /// Busy ticks of all cores (user, nice, system, irq, softirq, steal).
    pub machine_busy: u64,
    /// Ticks of this process and its reaped children.
    pub own: u64,
    /// When the counters were read.
    pub at: std::time::Instant,
}

impl CpuTimes {
    /// Read the counters (zeros where /proc is not readable).
    pub fn now() -> Self {
        let machine_busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                (f.len() >= 8).then(|| f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
            })
            .unwrap_or(0);
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 1..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                // After the comm: state is field 3; utime..cstime are fields 14..17.
                let field = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
                Some(field(14)? + field(15)? + field(16)? + field(17)?)
            })
            .unwrap_or(0);
        CpuTimes {
            machine_busy,
            own,
            at: std::time::Instant::now(),
        }
    }

    /// Cores' worth of CPU that other processes used on average since `earlier`.
    pub fn others_since(&self, earlier: &CpuTimes) -> f64 {
        let secs = self.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        let busy = self.machine_busy.saturating_sub(earlier.machine_busy) as f64;
        let own = self.own.saturating_sub(earlier.own) as f64;
        ((busy - own) / TICKS_PER_S / secs).max(0.0)
    }
}

/// Wait up to `max` for the machine to be quiet: other processes using less than
/// `threshold` cores over each of 3 consecutive seconds. Returns the last reading (cores
/// used by others) and whether it was quiet.
pub fn wait_quiet(max: std::time::Duration, threshold: f64) -> (f64, bool) {
    let deadline = std::time::Instant::now() + max;
    let mut quiet_seconds = 0;
    loop {
        let a = CpuTimes::now();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let last = CpuTimes::now().others_since(&a);
        if last < threshold {
            quiet_seconds += 1;
            if quiet_seconds >= 3 {
                return (last, true);
            }
        } else {
            quiet_seconds = 0;
        }
        if std::time::Instant::now() > deadline {
            return (last, false);
        }
    }
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

    #[test]
    fn cpu_times_count_our_own_work() {
        let a = CpuTimes::now();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = CpuTimes::now();
        assert!(
            b.own >= a.own + 10,
            "200 ms of spinning is at least 10 ticks"
        );
        assert!(b.others_since(&a) >= 0.0);
    }
}
