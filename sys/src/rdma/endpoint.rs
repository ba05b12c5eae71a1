//! What two peers exchange out of band: queue-pair endpoints and region descriptors.
//!
//! Both encodings are fixed-size little-endian records that start with a two-byte magic
//! and a version byte. Decoding checks length, magic, version and every field's range and
//! never panics, whatever the bytes.

use super::Mtu;

/// A queue pair's address, sent to the peer before [`handshake`](super::PreparedQueuePair::handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QpEndpoint {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// Local identifier of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Global identifier of the port (RoCE: the IPv4-mapped or IPv6 address).
    pub gid: [u8; 16],
    /// First packet sequence number the queue pair sends (24 bits).
    pub psn: u32,
    /// The largest path MTU this side can use; the connection uses the smaller of the
    /// two sides'.
    pub mtu: Mtu,
}

/// Why bytes from a peer are not a valid endpoint or descriptor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record has the wrong length.
    #[error("expected {expected} bytes, got {got}")]
    Length {
        /// The encoded length.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// The record does not start with the expected magic.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 2]),
    /// An encoding version this build does not know.
    #[error("unknown version {0}")]
    Version(u8),
    /// A field is out of its range.
    #[error("field {field} out of range: {value}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

const QP_MAGIC: [u8; 2] = *b"QP";
const MR_MAGIC: [u8; 2] = *b"MR";
const VERSION: u8 = 1;
const U24_MAX: u32 = (1 << 24) - 1;

fn u32_at(b: &[u8; 32], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn check_header(bytes: &[u8], magic: [u8; 2]) -> Result<(), DecodeError> {
    // Callers have checked the length.
    let got = [bytes[0], bytes[1]];
    if got != magic {
        return Err(DecodeError::Magic(got));
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::Version(bytes[2]));
    }
    Ok(())
}

impl QpEndpoint {
    /// Bytes of [`encode`](Self::encode)'s output.
    pub const ENCODED_LEN: usize = 32;

    /// Check the ranges the verbs require (24-bit QPN and PSN).
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.qpn > U24_MAX {
            return Err(DecodeError::Field {
                field: "qpn",
                value: self.qpn.into(),
            });
        }
        if self.psn > U24_MAX {
            return Err(DecodeError::Field {
                field: "psn",
                value: self.psn.into(),
            });
        }
        Ok(())
    }

    /// Encode: magic `QP`, version, MTU code, QPN, PSN (u32 LE each), LID (u16 LE), two
    /// zero bytes, the 16 GID bytes.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..2].copy_from_slice(&QP_MAGIC);
        b[2] = VERSION;
        b[3] = self.mtu.code() as u8;
        b[4..8].copy_from_slice(&self.qpn.to_le_bytes());
        b[8..12].copy_from_slice(&self.psn.to_le_bytes());
        b[12..14].copy_from_slice(&self.lid.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b
    }

    /// Decode bytes from a peer. Never panics; the result passes [`validate`](Self::validate).
    pub fn decode(bytes: &[u8]) -> Result<QpEndpoint, DecodeError> {
        let b: &[u8; Self::ENCODED_LEN] = bytes.try_into().map_err(|_| DecodeError::Length {
            expected: Self::ENCODED_LEN,
            got: bytes.len(),
        })?;
        check_header(b, QP_MAGIC)?;
        let mtu = Mtu::from_code(b[3].into()).ok_or(DecodeError::Field {
            field: "mtu",
            value: b[3].into(),
        })?;
        if b[14..16] != [0, 0] {
            return Err(DecodeError::Field {
                field: "reserved",
                value: u16::from_le_bytes([b[14], b[15]]).into(),
            });
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        let ep = QpEndpoint {
            qpn: u32_at(b, 4),
            psn: u32_at(b, 8),
            lid: u16::from_le_bytes([b[12], b[13]]),
            gid,
            mtu,
        };
        ep.validate()?;
        Ok(ep)
    }
}

/// A peer's registered memory as it advertises it: where the region starts in its
/// address space, how long it is, and the key that grants access.
///
/// Posting checks every remote range against `len` before anything reaches the NIC; the
/// peer's NIC checks the key and the bounds again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Virtual address of the region's first byte in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key of the registration.
    pub rkey: u32,
}

impl RemoteRegion {
    /// Bytes of [`encode`](Self::encode)'s output.
    pub const ENCODED_LEN: usize = 24;

    /// Encode: magic `MR`, version, a zero byte, rkey (u32 LE), addr, len (u64 LE).
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..2].copy_from_slice(&MR_MAGIC);
        b[2] = VERSION;
        b[4..8].copy_from_slice(&self.rkey.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode bytes from a peer. Never panics. Rejects a region whose end overflows the
    /// address space.
    pub fn decode(bytes: &[u8]) -> Result<RemoteRegion, DecodeError> {
        let b: &[u8; Self::ENCODED_LEN] = bytes.try_into().map_err(|_| DecodeError::Length {
            expected: Self::ENCODED_LEN,
            got: bytes.len(),
        })?;
        check_header(b, MR_MAGIC)?;
        if b[3] != 0 {
            return Err(DecodeError::Field {
                field: "reserved",
                value: b[3].into(),
            });
        }
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let region = RemoteRegion {
            rkey: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            addr: u64_at(8),
            len: u64_at(16),
        };
        if region.addr.checked_add(region.len).is_none() {
            return Err(DecodeError::Field {
                field: "len",
                value: region.len,
            });
        }
        Ok(region)
    }

    /// Check that `offset..offset + len` lies inside the region and return the remote
    /// address of its first byte.
    pub fn checked_addr(&self, offset: u64, len: u64) -> Result<u64, super::RdmaError> {
        let out = super::RdmaError::OutOfBounds {
            what: "remote",
            offset,
            len,
            region_len: self.len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.len => self.addr.checked_add(offset).ok_or(out),
            _ => Err(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> QpEndpoint {
        QpEndpoint {
            qpn: 0x12_3456,
            lid: 7,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1],
            psn: 0xab_cdef,
            mtu: Mtu::Mtu1024,
        }
    }

    #[test]
    fn endpoint_round_trips() {
        assert_eq!(QpEndpoint::decode(&ep().encode()), Ok(ep()));
    }

    #[test]
    fn endpoint_refuses_bad_records() {
        let good = ep().encode();
        assert!(matches!(
            QpEndpoint::decode(&good[..31]),
            Err(DecodeError::Length { got: 31, .. })
        ));
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(QpEndpoint::decode(&b), Err(DecodeError::Magic(_))));
        let mut b = good;
        b[2] = 9;
        assert_eq!(QpEndpoint::decode(&b), Err(DecodeError::Version(9)));
        let mut b = good;
        b[7] = 1; // qpn > 24 bits
        assert!(matches!(
            QpEndpoint::decode(&b),
            Err(DecodeError::Field { field: "qpn", .. })
        ));
        let mut b = good;
        b[3] = 6;
        assert!(matches!(
            QpEndpoint::decode(&b),
            Err(DecodeError::Field { field: "mtu", .. })
        ));
    }

    #[test]
    fn remote_region_round_trips_and_bounds() {
        let r = RemoteRegion {
            addr: 0x7f00_0000_1000,
            len: 4096,
            rkey: 0xdead_beef,
        };
        assert_eq!(RemoteRegion::decode(&r.encode()), Ok(r));
        assert_eq!(r.checked_addr(0, 4096).unwrap(), r.addr);
        assert_eq!(r.checked_addr(4095, 1).unwrap(), r.addr + 4095);
        assert!(r.checked_addr(4095, 2).is_err());
        assert!(r.checked_addr(u64::MAX, 2).is_err());
        assert!(r.checked_addr(4096, 0).is_ok());
        let overflowing = RemoteRegion {
            addr: u64::MAX,
            len: 2,
            rkey: 1,
        };
        assert!(RemoteRegion::decode(&overflowing.encode()).is_err());
    }
}
