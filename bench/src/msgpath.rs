//! The message paths the `messages` and `job` sections compare: every message over TCP
//! (`tcp`), over the shared-memory rings (`shm`), or over RDMA verbs queue pairs
//! (`rdma`, `TcpConfig::rdma_messages = RdmaMessages::AllPeers`); whether the rdma path
//! can run here and, if not, the one line that says why; the check that a run's
//! messages really took its path (from a worker's transport counters, or from the
//! `traffic_worker_N` objects of `pserv local --summary-json`); and the RESULTS.md
//! section a run writes (a run on the software device of `sys/softrdma` never replaces
//! the sections measured on the plain machine).

use serde_json::Value;

/// A path messages take between the bench's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgPath {
    /// Every message over TCP (`ShmMessages::Off`, `RdmaMessages::Off`).
    Tcp,
    /// Messages over the shared-memory rings (`ShmMessages::SameHost`).
    Shm,
    /// Messages over RDMA verbs queue pairs, with every peer (`RdmaMessages::AllPeers`).
    Rdma,
}

impl MsgPath {
    /// Its name in the tables: `tcp`, `shm`, `rdma`.
    pub fn name(self) -> &'static str {
        match self {
            MsgPath::Tcp => "tcp",
            MsgPath::Shm => "shm",
            MsgPath::Rdma => "rdma",
        }
    }

    /// Whether `c` (one worker's counters, after its work) shows that its messages went
    /// over this path: at least `peers` connections moved to shm (rdma) and none refused
    /// nor moved elsewhere; for `tcp`, nothing moved at all. `Err` says what was seen.
    pub fn check(self, c: &PathCounts, peers: u64) -> Result<(), String> {
        let ok = match self {
            MsgPath::Tcp => c.shm_connections == 0 && c.rdma_connections == 0,
            MsgPath::Shm => {
                c.shm_connections >= peers && c.shm_refused == 0 && c.rdma_connections == 0
            }
            MsgPath::Rdma => {
                c.rdma_connections >= peers && c.rdma_refused == 0 && c.shm_connections == 0
            }
        };
        if ok {
            return Ok(());
        }
        let want = match self {
            MsgPath::Tcp => "no connection moved off TCP".to_string(),
            MsgPath::Shm => format!("at least {peers} connections over shm, none refused"),
            MsgPath::Rdma => {
                format!("at least {peers} connections over rdma queue pairs, none refused")
            }
        };
        Err(format!(
            "the messages did not go over {}: wanted {want}, the worker counted {}",
            self.name(),
            c.describe()
        ))
    }
}

/// The message-path counters of one worker's transport (`pserv_transport::tcp::Stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Connections whose frames moved to shared memory.
    pub shm_connections: u64,
    /// Shared-memory offers refused.
    pub shm_refused: u64,
    /// Connections whose frames moved to RDMA queue pairs.
    pub rdma_connections: u64,
    /// RDMA offers refused.
    pub rdma_refused: u64,
}

impl PathCounts {
    /// The counters of a live transport.
    pub fn of(stats: &pserv_transport::tcp::Stats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        PathCounts {
            shm_connections: stats.shm_connections.load(Relaxed),
            shm_refused: stats.shm_refused.load(Relaxed),
            rdma_connections: stats.rdma_connections.load(Relaxed),
            rdma_refused: stats.rdma_refused.load(Relaxed),
        }
    }

    /// The counters of one `traffic_worker_N` object of a job summary; `None` when one
    /// of them is missing.
    pub fn from_summary(traffic: &Value) -> Option<Self> {
        let n = |k: &str| traffic.get(k).and_then(Value::as_u64);
        Some(PathCounts {
            shm_connections: n("shm_connections")?,
            shm_refused: n("shm_refused")?,
            rdma_connections: n("rdma_connections")?,
            rdma_refused: n("rdma_refused")?,
        })
    }

    /// The counters in words, e.g. "shm 0 (0 refused), rdma 3 (0 refused)".
    pub fn describe(&self) -> String {
        format!(
            "shm {} ({} refused), rdma {} ({} refused)",
            self.shm_connections, self.shm_refused, self.rdma_connections, self.rdma_refused
        )
    }
}

/// Check that every worker of a `pserv local --summary-json` summary (`traffic_worker_0`
/// up to `workers - 1`) sent its messages over `path`, to at least `peers` peers.
pub fn check_summary(
    summary: &Value,
    workers: u32,
    path: MsgPath,
    peers: u64,
) -> Result<(), String> {
    for w in 0..workers {
        let key = format!("traffic_worker_{w}");
        let counts = PathCounts::from_summary(&summary[&key])
            .ok_or_else(|| format!("the summary has no message-path counters in {key}"))?;
        path.check(&counts, peers)
            .map_err(|e| format!("worker {w}: {e}"))?;
    }
    Ok(())
}

/// Whether the rdma path can run in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RdmaAvailability {
    /// The bench was built without its `rdma` feature.
    NotBuilt,
    /// Built with it, but no usable device (why not).
    NoDevice(String),
    /// A usable device.
    Device {
        /// Whether the first usable device (the one the path opens) is the software
        /// device of `sys/softrdma`.
        software: bool,
        /// The usable devices in words.
        devices: Vec<String>,
    },
}

impl RdmaAvailability {
    /// What this build finds on this machine.
    pub fn detect() -> Self {
        if !cfg!(feature = "rdma") {
            return RdmaAvailability::NotBuilt;
        }
        match pserv_engine::onesided::rdma_available() {
            Err(why) => RdmaAvailability::NoDevice(why),
            Ok(_) => RdmaAvailability::Device {
                software: pserv_engine::onesided::rdma_is_software_device(),
                devices: pserv_engine::onesided::rdma_devices_described().unwrap_or_default(),
            },
        }
    }

    /// Whether the rdma column runs.
    pub fn usable(&self) -> bool {
        matches!(self, RdmaAvailability::Device { .. })
    }

    /// Whether the rdma column runs on the software device (its figures say nothing
    /// about speed).
    pub fn software(&self) -> bool {
        matches!(self, RdmaAvailability::Device { software: true, .. })
    }

    /// The one line a section prints about its rdma column: `rdma: not built (...)`,
    /// `rdma: no device (why)`, or `rdma: DEVICES`.
    pub fn line(&self) -> String {
        match self {
            RdmaAvailability::NotBuilt => {
                "rdma: not built (the bench was built without `--features rdma`)".into()
            }
            RdmaAvailability::NoDevice(why) => format!("rdma: no device ({why})"),
            RdmaAvailability::Device { devices, .. } if devices.is_empty() => {
                "rdma: a usable device".into()
            }
            RdmaAvailability::Device { devices, .. } => format!("rdma: {}", devices.join(", ")),
        }
    }
}

/// The heading a section on the software device carries (after its own title).
pub const SOFTWARE_HEADING: &str = "software RDMA device: correctness only, no speed claims";

/// The RESULTS.md section a run writes: `base`, `base-quick`, and `base-softrdma`,
/// `base-softrdma-quick` when the rdma column ran on the software device (so such a run
/// never replaces the sections measured on the plain machine); `given` (a `--section`
/// flag) wins.
pub fn section_name(base: &str, quick: bool, software_rdma: bool, given: Option<&str>) -> String {
    if let Some(s) = given {
        return s.to_string();
    }
    let mut s = base.to_string();
    if software_rdma {
        s.push_str("-softrdma");
    }
    if quick {
        s.push_str("-quick");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(shm: u64, rdma: u64) -> PathCounts {
        PathCounts {
            shm_connections: shm,
            rdma_connections: rdma,
            ..PathCounts::default()
        }
    }

    #[test]
    fn each_path_accepts_only_its_own_counters() {
        assert!(MsgPath::Tcp.check(&counts(0, 0), 2).is_ok());
        assert!(MsgPath::Tcp.check(&counts(1, 0), 2).is_err());
        assert!(MsgPath::Tcp.check(&counts(0, 1), 2).is_err());
        assert!(MsgPath::Shm.check(&counts(2, 0), 2).is_ok());
        assert!(MsgPath::Shm.check(&counts(1, 0), 2).is_err());
        assert!(MsgPath::Rdma.check(&counts(0, 3), 3).is_ok());
        assert!(MsgPath::Rdma.check(&counts(0, 2), 3).is_err());
        let e = MsgPath::Rdma.check(&counts(0, 0), 2).unwrap_err();
        assert!(e.contains("did not go over rdma"), "{e}");
        assert!(e.contains("rdma 0 (0 refused)"), "{e}");
        let refused = PathCounts {
            rdma_refused: 1,
            ..counts(0, 2)
        };
        assert!(MsgPath::Rdma.check(&refused, 2).is_err());
        assert!(MsgPath::Rdma.check(&counts(1, 2), 2).is_err());
    }

    #[test]
    fn summaries_are_checked_worker_by_worker() {
        let t = |rdma: u64| {
            serde_json::json!({"shm_connections": 0, "shm_refused": 0,
                               "rdma_connections": rdma, "rdma_refused": 0})
        };
        let s = serde_json::json!({"traffic_worker_0": t(3), "traffic_worker_1": t(3)});
        assert!(check_summary(&s, 2, MsgPath::Rdma, 3).is_ok());
        assert!(check_summary(&s, 2, MsgPath::Tcp, 3).is_err());
        let s = serde_json::json!({"traffic_worker_0": t(3), "traffic_worker_1": t(0)});
        let e = check_summary(&s, 2, MsgPath::Rdma, 3).unwrap_err();
        assert!(e.starts_with("worker 1: "), "{e}");
        let e = check_summary(&serde_json::json!({}), 1, MsgPath::Rdma, 3).unwrap_err();
        assert!(e.contains("traffic_worker_0"), "{e}");
    }

    #[test]
    fn the_availability_line_says_why_rdma_is_absent() {
        assert_eq!(
            RdmaAvailability::NotBuilt.line(),
            "rdma: not built (the bench was built without `--features rdma`)"
        );
        let none = RdmaAvailability::NoDevice("no RDMA device found".into());
        assert_eq!(none.line(), "rdma: no device (no RDMA device found)");
        assert!(!none.usable() && !none.software());
        let soft = RdmaAvailability::Device {
            software: true,
            devices: vec!["soft0 (firmware softrdma 1.0)".into()],
        };
        assert!(soft.usable() && soft.software());
        assert_eq!(soft.line(), "rdma: soft0 (firmware softrdma 1.0)");
        // This build's own answer is one of the three, and says so in one line.
        let here = RdmaAvailability::detect();
        if !cfg!(feature = "rdma") {
            assert_eq!(here, RdmaAvailability::NotBuilt);
        }
        assert!(here.line().starts_with("rdma: ") && !here.line().contains('\n'));
    }

    #[test]
    fn software_device_runs_get_their_own_section() {
        assert_eq!(section_name("messages", false, false, None), "messages");
        assert_eq!(
            section_name("messages", true, false, None),
            "messages-quick"
        );
        assert_eq!(section_name("job", false, true, None), "job-softrdma");
        assert_eq!(section_name("job", true, true, None), "job-softrdma-quick");
        assert_eq!(section_name("job", false, true, Some("mine")), "mine");
    }
}
