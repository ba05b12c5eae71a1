//! [`ClusterSpec`]: the cluster's shape and settings, as every node learns them.

use crate::placement::Partition;
use crate::proto::ValueType;
use crate::update::UpdateSpec;

/// Cluster shape and settings every node learns from the scheduler.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of servers.
    pub servers: u32,
    /// Number of workers.
    pub workers: u32,
    /// Element type of the values.
    pub value_type: ValueType,
    /// Values per key.
    pub value_len: u32,
    /// The servers' default update function.
    pub update: UpdateSpec,
    /// Virtual nodes per server on the consistent-hashing ring that routes keys
    /// ([`crate::placement::ring`]); 0 splits the key space evenly instead (one range per server).
    pub vnodes: u32,
    /// Replicas of every range after its head (chain replication); needs
    /// the ring (`vnodes > 0`). With replicas, a server that fails is taken off the ring
    /// and its ranges pass to their replicas.
    pub replicas: u32,
}

impl ClusterSpec {
    /// The routing table this spec describes (epoch 1).
    pub fn partition(&self) -> Partition {
        let servers = self.servers as usize;
        match self.ring() {
            None => Partition::even(servers),
            Some(ring) => Partition::from_ring_chains(&ring, servers, self.replicas as usize),
        }
    }

    /// The ring of this spec (none for the even split).
    pub fn ring(&self) -> Option<crate::placement::ring::Ring> {
        let ids: Vec<u32> = (0..self.servers).collect();
        (self.vnodes > 0).then(|| crate::placement::ring::Ring::new(&ids, self.vnodes))
    }

    /// Check the settings fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.replicas > 0 && self.vnodes == 0 {
            return Err("--replicas needs the consistent-hashing ring (--vnodes above 0)".into());
        }
        if self.replicas >= self.servers && self.replicas > 0 {
            return Err(format!(
                "--replicas {} needs at least {} servers (a chain holds distinct servers)",
                self.replicas,
                self.replicas + 1
            ));
        }
        Ok(())
    }
}
