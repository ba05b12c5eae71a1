//! Servers a routing table left out, remembered for a grace before their connections are
//! closed (what servers and workers both do for a peer declared dead behind a
//! partition, whose TCP connection would stay open for many minutes).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::placement::Partition;

/// How long after a table that left a server out its connection stays open.
pub(crate) const DEPARTED_GRACE: Duration = Duration::from_secs(3);

/// Whether `server` holds any range of `table` (as head or replica).
pub(crate) fn in_table(table: &Partition, server: u32) -> bool {
    table.owners().contains(&server) || table.followers().iter().any(|f| f.contains(&server))
}

/// The servers the newest table left out, since when.
#[derive(Default)]
pub(crate) struct Departed(Mutex<HashMap<u32, Instant>>);

impl Departed {
    /// The table changed from `old` to `new`: note the servers it left out (never `me`),
    /// forget those it took back.
    pub(crate) fn table_changed(&self, old: &Partition, new: &Partition, me: Option<u32>) {
        let now = Instant::now();
        let mut d = self.0.lock();
        for &s in old.owners().iter().chain(old.followers().iter().flatten()) {
            if Some(s) != me && !in_table(new, s) {
                d.entry(s).or_insert(now);
            }
        }
        d.retain(|&s, _| !in_table(new, s));
    }

    /// The servers left out [`DEPARTED_GRACE`] ago or more, forgotten here.
    pub(crate) fn take_due(&self) -> Vec<u32> {
        let now = Instant::now();
        let mut d = self.0.lock();
        let due: Vec<u32> = d
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= DEPARTED_GRACE)
            .map(|(s, _)| *s)
            .collect();
        for s in &due {
            d.remove(s);
        }
        due
    }
}
