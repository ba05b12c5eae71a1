//! One server's checkpoint file (`server-RANK.ckpt`): the keys it headed at the
//! checkpoint, with their weights and update-rule state, as the store holds them.
//!
//! Layout (little-endian), version 1:
//!
//! ```text
//!  0  magic  b"PSVCKPT\0"           8 bytes
//!  8  version                       u32 (1)
//! 12  bytes per element             u32 (4: f32, 8: f64)
//! 16  weights per key               u32
//! 20  state elements per key        u32
//! 24  epoch                         u64 (the job epoch the checkpoint follows)
//! 32  server rank                   u32
//! 36  reserved                      u32 (0)
//! 40  key count n                   u64
//! 48  keys                          n x u64, ascending, each below u64::MAX
//!     weights                       n x weights-per-key elements
//!     state                         n x state-per-key elements
//! end xxh3-64 of every byte before  u64
//! ```
//!
//! [`decode`] checks the length the header implies before anything else, then the
//! checksum, then the keys: a truncated, padded or bit-flipped file is an error naming
//! the file and what is wrong, never a panic and never an allocation beyond the file.

use std::path::Path;

use super::CheckpointError;

/// The first 8 bytes of a server checkpoint file.
pub const MAGIC: &[u8; 8] = b"PSVCKPT\0";
/// The file format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the keys.
pub const HEADER_LEN: usize = 48;
/// Bytes of the trailing checksum.
pub const TRAILER_LEN: usize = 8;

/// A server's part of a checkpoint, values as raw little-endian bytes of their element
/// type (so one type serves f32 and f64 stores).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerPart {
    /// Bytes per element (4 or 8).
    pub elem_bytes: u32,
    /// Weights per key.
    pub value_len: u32,
    /// Update-rule state elements per key.
    pub state_len: u32,
    /// The job epoch after which the checkpoint was taken.
    pub epoch: u64,
    /// The rank of the server that wrote it.
    pub rank: u32,
    /// Ascending keys.
    pub keys: Vec<u64>,
    /// `keys.len() * value_len` elements.
    pub weights: Vec<u8>,
    /// `keys.len() * state_len` elements.
    pub state: Vec<u8>,
}

/// The checksum the files and the manifest use.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl ServerPart {
    /// The file's bytes.
    ///
    /// # Panics
    /// If the weights or the state do not hold exactly the elements the key count and
    /// the shape say (a bug of the caller, not bad input).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.keys.len();
        let eb = self.elem_bytes as usize;
        assert_eq!(self.weights.len(), n * self.value_len as usize * eb);
        assert_eq!(self.state.len(), n * self.state_len as usize * eb);
        let mut out =
            Vec::with_capacity(HEADER_LEN + n * 8 + self.weights.len() + self.state.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.elem_bytes.to_le_bytes());
        out.extend_from_slice(&self.value_len.to_le_bytes());
        out.extend_from_slice(&self.state_len.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        for k in &self.keys {
            out.extend_from_slice(&k.to_le_bytes());
        }
        out.extend_from_slice(&self.weights);
        out.extend_from_slice(&self.state);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decode and verify the bytes of the file at `path` (named in every error).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<ServerPart, CheckpointError> {
    let file = path.display().to_string();
    let malformed = |why: String| CheckpointError::Malformed {
        file: file.clone(),
        why,
    };
    if bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] != MAGIC {
        return Err(malformed(
            "not a pserv server checkpoint file (bad magic bytes)".into(),
        ));
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(CheckpointError::Truncated {
            file,
            have: bytes.len() as u64,
            want: (HEADER_LEN + TRAILER_LEN) as u64,
        });
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(malformed(format!(
            "format version {version}; this build reads version {VERSION}"
        )));
    }
    let elem_bytes = u32_at(bytes, 12);
    let value_len = u32_at(bytes, 16);
    let state_len = u32_at(bytes, 20);
    let epoch = u64_at(bytes, 24);
    let rank = u32_at(bytes, 32);
    let n = u64_at(bytes, 40);
    if u32_at(bytes, 36) != 0 {
        return Err(malformed("reserved header bytes are not zero".into()));
    }
    if elem_bytes != 4 && elem_bytes != 8 {
        return Err(malformed(format!(
            "{elem_bytes} bytes per element (expected 4 or 8)"
        )));
    }
    // The length the header implies, without overflow.
    let per_key = 8u64
        .checked_add(u64::from(value_len) * u64::from(elem_bytes))
        .and_then(|x| x.checked_add(u64::from(state_len) * u64::from(elem_bytes)));
    let want = per_key
        .and_then(|p| p.checked_mul(n))
        .and_then(|b| b.checked_add((HEADER_LEN + TRAILER_LEN) as u64));
    let Some(want) = want else {
        return Err(malformed(format!("a header claiming {n} keys overflows")));
    };
    let have = bytes.len() as u64;
    if have < want {
        return Err(CheckpointError::Truncated { file, have, want });
    }
    if have > want {
        return Err(malformed(format!(
            "{have} bytes, {} more than its header's {n} keys take",
            have - want
        )));
    }
    let body = &bytes[..bytes.len() - TRAILER_LEN];
    let stored = u64_at(bytes, bytes.len() - TRAILER_LEN);
    let computed = checksum(body);
    if stored != computed {
        return Err(CheckpointError::Checksum {
            file,
            stored,
            computed,
        });
    }
    let n = n as usize;
    let keys_end = HEADER_LEN + n * 8;
    let keys: Vec<u64> = bytes[HEADER_LEN..keys_end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(i) = keys.windows(2).position(|p| p[0] >= p[1]) {
        return Err(malformed(format!(
            "keys not ascending at position {}: {:#x} then {:#x}",
            i + 1,
            keys[i],
            keys[i + 1]
        )));
    }
    if keys.last() == Some(&u64::MAX) {
        return Err(malformed("holds the reserved key u64::MAX".into()));
    }
    let wbytes = n * value_len as usize * elem_bytes as usize;
    let weights = bytes[keys_end..keys_end + wbytes].to_vec();
    let state = bytes[keys_end + wbytes..body.len()].to_vec();
    Ok(ServerPart {
        elem_bytes,
        value_len,
        state_len,
        epoch,
        rank,
        keys,
        weights,
        state,
    })
}
