//! Reporting to a restarted scheduler (`pserv scheduler --recover` on the same address):
//! one try to connect and send the node's `Rejoin`. How often to try, and for how long,
//! is the caller's business.

use std::net::SocketAddr;
use std::time::Duration;

use pserv_transport::{Conn, TransportError};

use crate::base::ids::{ConnTag, Holder};
use crate::placement::Partition;
use crate::proto::{Control, Role};

/// How long one try to connect to a restarted scheduler may take.
pub(crate) const TRY_TIMEOUT: Duration = Duration::from_millis(200);

/// What a node tells a restarted scheduler about itself.
#[derive(Debug)]
pub(crate) struct Report {
    /// Server or worker.
    pub(crate) role: Role,
    /// Its rank.
    pub(crate) rank: u32,
    /// The node id the first scheduler gave it.
    pub(crate) node_id: u32,
    /// Where it listens (servers).
    pub(crate) addr: Option<SocketAddr>,
    /// Its routing table.
    pub(crate) table: Partition,
    /// Barriers it passed (workers; 0 for servers).
    pub(crate) barriers: u64,
}

impl Report {
    fn into_control(self) -> Control {
        Control::Rejoin {
            role: self.role,
            rank: self.rank,
            node_id: self.node_id,
            addr: self.addr,
            pid: std::process::id(),
            table: self.table,
            barriers: self.barriers,
        }
    }
}

/// Try once to reach a restarted scheduler at `scheduler`: connect with `connect`
/// (within [`TRY_TIMEOUT`]), tag the connection as the scheduler's (in a process of kind
/// `holder`), and send the `Rejoin` that `report` makes (called once connected, so it
/// carries the table of then). The new connection if the report went out, else `None`.
pub(crate) fn rejoin(
    connect: impl FnOnce(SocketAddr, Duration) -> Result<Conn, TransportError>,
    scheduler: SocketAddr,
    holder: Holder,
    report: impl FnOnce() -> Report,
) -> Option<Conn> {
    let conn = connect(scheduler, TRY_TIMEOUT).ok()?;
    conn.set_tag(ConnTag::Scheduler.to_u64(holder));
    let report = report();
    let sender = report.node_id;
    conn.send(report.into_control().to_frame(sender)).ok()?;
    tracing::info!(scheduler = %scheduler, "reconnected to a restarted scheduler");
    Some(conn)
}
