//! The wire format: a fixed 56-byte header, then the key list, then the value bytes.
//!
//! ```text
//!  offset size field
//!   0     4   magic        "PSRV"
//!   4     1   version      VERSION
//!   5     1   kind         MessageKind
//!   6     1   dtype        DType of the values
//!   7     1   status       0 = ok; non-zero: an error answer, values hold its text
//!   8     4   sender       node id of the sender
//!  12     2   flags        RESPONSE, RANGE, ...
//!  14     2   func         update function id (pushes) / control sub-kind
//!  16     8   timestamp    the task timestamp; answers echo the request's
//!  24     8   key_count    number of u64 keys that follow the header
//!  32     8   value_bytes  number of value bytes that follow the keys
//!  40     4   value_len    values per key (0 when no values go with keys)
//!  44     4   epoch        routing epoch the sender used
//!  48     8   clock        consistency clock: a push's clock, a pull's required minimum
//!  56   8*k   keys         little-endian u64, sorted (checked by the engine)
//!   .     v   values       value_bytes, then zero padding to a multiple of 8
//! ```
//!
//! Every field is little-endian (pserv only builds for little-endian targets). Frames are
//! padded to a multiple of 8 bytes so the keys of the next frame in a buffer stay aligned:
//! receivers view keys and values in place, without copying.
//!
//! Anything read from the network goes through [`Header::layout`] and [`Frame::new_checked`]
//! first; after that no accessor panics. Decoding never allocates: the body length is
//! known and bounded by the receiver's maximal frame size before a byte of it is read.

use bytemuck::{Pod, Zeroable};

#[cfg(not(target_endian = "little"))]
compile_error!("pserv's wire format is little-endian and views frames in place");

/// "PSRV" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PSRV");
/// The wire format version this build speaks.
pub const VERSION: u8 = 2;
/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 56;
/// Default bound on a whole frame (header, keys, values, padding).
pub const DEFAULT_MAX_FRAME: usize = 512 << 20;

/// Header flag: this frame answers a request (same kind and timestamp).
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// Header flag: the key list is a range `[keys[0], keys[1])`, values cover every key in it.
pub const FLAG_RANGE: u16 = 1 << 1;
/// Header flag: a clocked request under sequential consistency. The server applies such
/// pushes in (clock, worker rank) order on every key range, so runs are deterministic;
/// and any such request says that every earlier task of its worker finished.
pub const FLAG_ORDERED: u16 = 1 << 2;
/// Header flag: the key section holds no key list but [`CACHED_KEY_WORDS`] words naming
/// one the receiver cached: the list's 128-bit hash (low word, high word) and its length.
/// The values are those of that many keys. Never with [`FLAG_RANGE`]; a receiver that
/// does not hold the list refuses the request (a cache miss) and changes nothing.
pub const FLAG_KEYS_CACHED: u16 = 1 << 3;
/// Header flag: the key list is a full one that the sender asks the receiver to cache
/// (the receiver hashes it itself; later requests may name it by [`FLAG_KEYS_CACHED`]).
pub const FLAG_CACHE_KEYS: u16 = 1 << 4;
/// Header flag: the value section is one compression block (see
/// [`compress`](crate::compress)) of `value_bytes` bytes, which decodes to the values the
/// key count and value length call for. The transport decodes it before a handler sees
/// the frame.
pub const FLAG_COMPRESSED: u16 = 1 << 5;
/// Flags this version knows; others are refused.
pub const KNOWN_FLAGS: u16 = FLAG_RESPONSE
    | FLAG_RANGE
    | FLAG_ORDERED
    | FLAG_KEYS_CACHED
    | FLAG_CACHE_KEYS
    | FLAG_COMPRESSED;
/// Words in the key section of a [`FLAG_KEYS_CACHED`] frame: hash low, hash high, length.
pub const CACHED_KEY_WORDS: u64 = 3;

/// What a frame asks for or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// Control plane: registration, cluster table, barriers, shutdown. Values carry the
    /// encoded control message; no keys.
    Control = 1,
    /// Push values for keys (or a range); the server applies its update function.
    Push = 2,
    /// Pull the values of keys (or a range).
    Pull = 3,
    /// Push, then answer with the updated values of the same keys.
    PushPull = 4,
}

impl MessageKind {
    /// Decode a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Control,
            2 => Self::Push,
            3 => Self::Pull,
            4 => Self::PushPull,
            _ => return None,
        })
    }
}

/// The element type of the values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// Opaque bytes (control payloads, error texts).
    Bytes = 0,
    /// 32-bit IEEE float.
    F32 = 1,
    /// 64-bit IEEE float.
    F64 = 2,
}

impl DType {
    /// Decode a dtype byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Bytes,
            1 => Self::F32,
            2 => Self::F64,
            _ => return None,
        })
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::Bytes => 1,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

/// The fixed frame header. See the module docs for the layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`VERSION`].
    pub version: u8,
    /// A [`MessageKind`] byte.
    pub kind: u8,
    /// A [`DType`] byte.
    pub dtype: u8,
    /// 0 = ok; otherwise an error code defined by the engine, values hold a UTF-8 text.
    pub status: u8,
    /// Node id of the sender.
    pub sender: u32,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Update function id for pushes, sub-kind for control messages.
    pub func: u16,
    /// Task timestamp; an answer echoes the request's.
    pub timestamp: u64,
    /// Number of keys after the header (2 for a range).
    pub key_count: u64,
    /// Number of value bytes after the keys (without padding).
    pub value_bytes: u64,
    /// Values per key; 0 when no values go with keys.
    pub value_len: u32,
    /// Routing epoch the sender used.
    pub epoch: u32,
    /// Consistency clock (0: none). A push carries the sender's clock; a pull the clock
    /// every worker must have reached on the keys before it is answered; an answer to a
    /// pull the smallest worker clock the server had when it answered.
    pub clock: u64,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_LEN);

/// Why a frame was refused. Each is a reason to close the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the header or than the header announces.
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number is wrong: not a pserv peer, or a desynchronised stream.
    #[error("bad magic {found:#010x} (expected {MAGIC:#010x})")]
    BadMagic {
        /// What was found.
        found: u32,
    },
    /// A wire version this build does not speak.
    #[error("unsupported wire version {found} (this build speaks {VERSION})")]
    BadVersion {
        /// What was found.
        found: u8,
    },
    /// Unknown message kind byte.
    #[error("unknown message kind {0}")]
    BadKind(u8),
    /// Unknown dtype byte.
    #[error("unknown value type {0}")]
    BadDType(u8),
    /// Unknown flag bits.
    #[error("unknown flag bits {0:#06x}")]
    BadFlags(u16),
    /// The frame would exceed the receiver's bound.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length (saturated at u64::MAX).
        len: u64,
        /// The receiver's bound.
        max: usize,
    },
    /// The value bytes do not fit the key count, value length and dtype.
    #[error(
        "{value_bytes} value bytes do not match {keys} keys x {value_len} values x {elem} bytes"
    )]
    ValueMismatch {
        /// Keys (for a range: keys in the range).
        keys: u64,
        /// Values per key.
        value_len: u32,
        /// Element size of the dtype.
        elem: usize,
        /// Announced value bytes.
        value_bytes: u64,
    },
    /// A range frame without exactly two keys, or with `begin >= end`.
    #[error("bad range frame: {0}")]
    BadRange(&'static str),
    /// A cached-keys frame whose key words or flags are inconsistent.
    #[error("bad cached-keys frame: {0}")]
    BadCachedKeys(&'static str),
    /// The buffer holding the frame is not 8-byte aligned (a receiver bug, not peer input).
    #[error("frame buffer is not 8-byte aligned")]
    Misaligned,
}

/// Sizes of a frame's parts, derived from a checked header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the key list.
    pub keys_len: usize,
    /// Bytes of the values (without padding).
    pub values_len: usize,
    /// Bytes after the header: keys, values and padding.
    pub body_len: usize,
}

impl Layout {
    /// Whole frame length, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }

    /// Debug-build check that this layout is `header`'s (as [`Header::layout`] made it):
    /// its parts are the header's, they lie within the body, and the body is padded to
    /// a multiple of 8 with less than 8 bytes.
    pub(crate) fn debug_check_against(&self, header: &Header) {
        debug_assert_eq!(
            self.keys_len as u64,
            header.key_count.wrapping_mul(8),
            "layout's key bytes are not the header's key count"
        );
        debug_assert_eq!(
            self.values_len as u64, header.value_bytes,
            "layout's value bytes are not the header's"
        );
        debug_assert!(
            self.keys_len + self.values_len <= self.body_len,
            "keys ({}) and values ({}) overrun a body of {} bytes",
            self.keys_len,
            self.values_len,
            self.body_len
        );
        debug_assert!(
            self.body_len - self.keys_len - self.values_len < 8,
            "a body of {} bytes pads {} + {} bytes by 8 or more",
            self.body_len,
            self.keys_len,
            self.values_len
        );
        debug_assert!(
            self.frame_len().is_multiple_of(8),
            "frame of {} bytes is not padded to 8",
            self.frame_len()
        );
    }
}

/// Round `n` up to a multiple of 8.
pub fn pad8(n: usize) -> usize {
    (n + 7) & !7
}

impl Header {
    /// A header for a new frame with the given kind; everything else zero / empty.
    pub fn new(kind: MessageKind, sender: u32, timestamp: u64) -> Self {
        Header {
            magic: MAGIC,
            version: VERSION,
            kind: kind as u8,
            sender,
            timestamp,
            ..Zeroable::zeroed()
        }
    }

    /// View 56 bytes as a header (no checks: call [`layout`](Self::layout) next).
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        bytemuck::pod_read_unaligned(bytes)
    }

    /// The header's bytes, ready to write.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }

    /// The decoded kind (valid after [`layout`](Self::layout) succeeded).
    pub fn message_kind(&self) -> Option<MessageKind> {
        MessageKind::from_u8(self.kind)
    }

    /// The decoded dtype (valid after [`layout`](Self::layout) succeeded).
    pub fn value_type(&self) -> Option<DType> {
        DType::from_u8(self.dtype)
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Check everything the header alone can tell and compute the frame's layout.
    ///
    /// After this succeeds the receiver may read exactly `body_len` more bytes, which is
    /// at most `max_frame - HEADER_LEN`.
    pub fn layout(&self, max_frame: usize) -> Result<Layout, WireError> {
        if self.magic != MAGIC {
            return Err(WireError::BadMagic { found: self.magic });
        }
        if self.version != VERSION {
            return Err(WireError::BadVersion {
                found: self.version,
            });
        }
        if MessageKind::from_u8(self.kind).is_none() {
            return Err(WireError::BadKind(self.kind));
        }
        let dtype = DType::from_u8(self.dtype).ok_or(WireError::BadDType(self.dtype))?;
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::BadFlags(self.flags & !KNOWN_FLAGS));
        }
        let too_large = |len: u64| WireError::TooLarge {
            len,
            max: max_frame,
        };
        let keys_len = self.key_count.checked_mul(8).ok_or(too_large(u64::MAX))?;
        let total = keys_len
            .checked_add(self.value_bytes)
            .and_then(|n| n.checked_add(HEADER_LEN as u64 + 7))
            .ok_or(too_large(u64::MAX))?
            & !7;
        if total > max_frame as u64 {
            return Err(too_large(total));
        }
        let elem = dtype.size();
        let mismatch = |keys: u64| WireError::ValueMismatch {
            keys,
            value_len: self.value_len,
            elem,
            value_bytes: self.value_bytes,
        };
        if self.has(FLAG_KEYS_CACHED) {
            if self.has(FLAG_RANGE) || self.has(FLAG_CACHE_KEYS) {
                return Err(WireError::BadCachedKeys(
                    "a cached-keys frame is neither a range nor a list to cache",
                ));
            }
            if self.key_count != CACHED_KEY_WORDS {
                return Err(WireError::BadCachedKeys(
                    "a cached-keys frame carries exactly 3 key words",
                ));
            }
        }
        if self.has(FLAG_CACHE_KEYS) && self.has(FLAG_RANGE) {
            return Err(WireError::BadCachedKeys(
                "a range is not a key list to cache",
            ));
        }
        if self.has(FLAG_RANGE) && self.key_count != 2 {
            return Err(WireError::BadRange("a range frame carries exactly 2 keys"));
        }
        if self.has(FLAG_COMPRESSED) || self.has(FLAG_KEYS_CACHED) {
            // The value bytes are a block (checked once decoded), or those of a key count
            // that sits in the key section (checked by `Frame::from_body`).
        } else if !self.value_bytes.is_multiple_of(elem as u64) {
            return Err(mismatch(self.key_count));
        } else if self.has(FLAG_RANGE) {
            // Checked against the range by `Frame::from_body`.
        } else if self.key_count > 0 && self.value_bytes > 0 {
            let want = self
                .key_count
                .checked_mul(u64::from(self.value_len))
                .and_then(|n| n.checked_mul(elem as u64));
            if self.value_len == 0 || want != Some(self.value_bytes) {
                return Err(mismatch(self.key_count));
            }
        }
        let keys_len = keys_len as usize;
        let values_len = self.value_bytes as usize;
        let layout = Layout {
            keys_len,
            values_len,
            body_len: total as usize - HEADER_LEN,
        };
        layout.debug_check_against(self);
        debug_assert!(
            layout.frame_len() <= max_frame,
            "a frame of {} bytes passed a bound of {max_frame}",
            layout.frame_len()
        );
        Ok(layout)
    }
}

/// A checked, zero-copy view of one frame.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    header: Header,
    keys: &'a [u64],
    values: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Check and view the frame at the start of `bytes` (8-byte aligned). Returns the frame
    /// and the number of bytes it occupies (a multiple of 8).
    pub fn new_checked(bytes: &'a [u8], max_frame: usize) -> Result<(Self, usize), WireError> {
        let head: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(WireError::Truncated {
                need: HEADER_LEN,
                have: bytes.len(),
            })?;
        let header = Header::from_bytes(head);
        let layout = header.layout(max_frame)?;
        let body = bytes
            .get(HEADER_LEN..layout.frame_len())
            .ok_or(WireError::Truncated {
                need: layout.frame_len(),
                have: bytes.len(),
            })?;
        Ok((Frame::from_body(header, &layout, body)?, layout.frame_len()))
    }

    /// Assemble a frame from a header already checked by [`Header::layout`] and its body
    /// (`layout.body_len` bytes, 8-byte aligned). Checks what needs the keys: ranges.
    pub fn from_body(header: Header, layout: &Layout, body: &'a [u8]) -> Result<Self, WireError> {
        // A caller's bug, not the peer's: the layout is this header's.
        layout.debug_check_against(&header);
        if body.len() < layout.body_len {
            return Err(WireError::Truncated {
                need: HEADER_LEN + layout.body_len,
                have: HEADER_LEN + body.len(),
            });
        }
        let keys: &[u64] = bytemuck::try_cast_slice(&body[..layout.keys_len])
            .map_err(|_| WireError::Misaligned)?;
        let values = &body[layout.keys_len..layout.keys_len + layout.values_len];
        if header.has(FLAG_KEYS_CACHED) {
            let count = keys[2];
            let elem = DType::from_u8(header.dtype).map_or(1, DType::size);
            let want = count
                .checked_mul(u64::from(header.value_len))
                .and_then(|n| n.checked_mul(elem as u64));
            if count == 0 {
                return Err(WireError::BadCachedKeys("a cached key list is never empty"));
            }
            if header.value_bytes > 0
                && !header.has(FLAG_COMPRESSED)
                && (header.value_len == 0 || want != Some(header.value_bytes))
            {
                return Err(WireError::ValueMismatch {
                    keys: count,
                    value_len: header.value_len,
                    elem,
                    value_bytes: header.value_bytes,
                });
            }
        }
        if header.has(FLAG_RANGE) {
            let (begin, end) = (keys[0], keys[1]);
            if begin >= end {
                return Err(WireError::BadRange("range begin must be below its end"));
            }
            if header.value_bytes > 0 && !header.has(FLAG_COMPRESSED) {
                let elem = DType::from_u8(header.dtype).map_or(1, DType::size);
                let want = (end - begin)
                    .checked_mul(u64::from(header.value_len))
                    .and_then(|n| n.checked_mul(elem as u64));
                if header.value_len == 0 || want != Some(header.value_bytes) {
                    return Err(WireError::ValueMismatch {
                        keys: end - begin,
                        value_len: header.value_len,
                        elem,
                        value_bytes: header.value_bytes,
                    });
                }
            }
        }
        Ok(Frame {
            header,
            keys,
            values,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The key list (for a range frame: `[begin, end]`).
    pub fn keys(&self) -> &'a [u64] {
        self.keys
    }

    /// The range `(begin, end)` of a range frame.
    pub fn range(&self) -> Option<(u64, u64)> {
        self.header
            .has(FLAG_RANGE)
            .then(|| (self.keys[0], self.keys[1]))
    }

    /// The raw value bytes.
    pub fn values(&self) -> &'a [u8] {
        self.values
    }

    /// The values as `T`s, when their size and alignment fit.
    pub fn values_as<T: Pod>(&self) -> Option<&'a [T]> {
        bytemuck::try_cast_slice(self.values).ok()
    }
}

/// Encode a whole frame into a new buffer (tests, control messages; the data path writes
/// header, keys and values with one vectored write instead). Sets `key_count` and
/// `value_bytes` from the slices.
pub fn encode(header: &Header, keys: &[u64], values: &[u8]) -> Vec<u8> {
    let mut h = *header;
    h.key_count = keys.len() as u64;
    h.value_bytes = values.len() as u64;
    let mut out = Vec::with_capacity(pad8(HEADER_LEN + keys.len() * 8 + values.len()));
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(bytemuck::cast_slice(keys));
    out.extend_from_slice(values);
    out.resize(pad8(out.len()), 0);
    out
}

/// Zero bytes used to pad frames on the wire.
pub const PADDING: [u8; 8] = [0; 8];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Copy into an 8-aligned buffer, as receivers hold frames.
    fn aligned(bytes: &[u8]) -> Vec<u64> {
        let mut v = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
        v
    }

    fn check(bytes: &[u8]) -> Result<(Header, Vec<u64>, Vec<u8>, usize), WireError> {
        let buf = aligned(bytes);
        let all = &bytemuck::cast_slice::<u64, u8>(&buf)[..bytes.len()];
        let (f, n) = Frame::new_checked(all, DEFAULT_MAX_FRAME)?;
        Ok((*f.header(), f.keys().to_vec(), f.values().to_vec(), n))
    }

    fn push_header(value_len: u32) -> Header {
        let mut h = Header::new(MessageKind::Push, 7, 42);
        h.dtype = DType::F32 as u8;
        h.value_len = value_len;
        h
    }

    #[test]
    fn round_trip_keys_and_values() {
        let vals: Vec<f32> = vec![1.0, 2.0, 3.0];
        let bytes = encode(&push_header(1), &[1, 5, 9], bytemuck::cast_slice(&vals));
        assert_eq!(bytes.len() % 8, 0);
        let (h, keys, values, n) = check(&bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(h.sender, 7);
        assert_eq!(h.timestamp, 42);
        assert_eq!(keys, vec![1, 5, 9]);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&values), &vals[..]);
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let good = encode(
            &push_header(1),
            &[1, 2],
            bytemuck::cast_slice(&[1.0f32, 2.0]),
        );
        let mut bad = good.clone();
        bad[0] ^= 0xff;
        assert!(matches!(check(&bad), Err(WireError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[4] = 99;
        assert_eq!(
            check(&bad).unwrap_err(),
            WireError::BadVersion { found: 99 }
        );
        let mut bad = good.clone();
        bad[5] = 200;
        assert_eq!(check(&bad).unwrap_err(), WireError::BadKind(200));
        let mut bad = good.clone();
        bad[6] = 77;
        assert_eq!(check(&bad).unwrap_err(), WireError::BadDType(77));
        let mut bad = good.clone();
        bad[13] = 0x80;
        assert!(matches!(check(&bad), Err(WireError::BadFlags(_))));
        assert!(matches!(
            check(&good[..30]),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            check(&good[..good.len() - 8]),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn oversize_and_overflowing_lengths_are_refused_before_reading() {
        let mut h = push_header(1);
        h.key_count = u64::MAX / 4;
        assert!(matches!(
            h.layout(DEFAULT_MAX_FRAME),
            Err(WireError::TooLarge { .. })
        ));
        h.key_count = 1;
        h.value_bytes = u64::MAX - 3;
        assert!(matches!(
            h.layout(DEFAULT_MAX_FRAME),
            Err(WireError::TooLarge { .. })
        ));
        h.value_bytes = 4096;
        h.value_len = 1024;
        assert!(matches!(h.layout(1024), Err(WireError::TooLarge { .. })));
        assert!(h.layout(8192).is_ok());
    }

    #[test]
    fn key_value_count_mismatch_is_refused() {
        let bytes = encode(
            &push_header(2),
            &[1, 2],
            bytemuck::cast_slice(&[1.0f32, 2.0]),
        );
        assert!(matches!(
            check(&bytes),
            Err(WireError::ValueMismatch { .. })
        ));
        let bytes = encode(
            &push_header(0),
            &[1, 2],
            bytemuck::cast_slice(&[1.0f32, 2.0]),
        );
        assert!(matches!(
            check(&bytes),
            Err(WireError::ValueMismatch { .. })
        ));
        // Values not a whole number of elements.
        let bytes = encode(&push_header(1), &[1], &[0u8; 3]);
        assert!(matches!(
            check(&bytes),
            Err(WireError::ValueMismatch { .. })
        ));
    }

    #[test]
    fn range_frames_are_checked() {
        let mut h = push_header(2);
        h.flags = FLAG_RANGE;
        let vals = vec![0f32; 2 * 10];
        let ok = encode(&h, &[100, 110], bytemuck::cast_slice(&vals));
        let (hh, keys, _, _) = check(&ok).unwrap();
        assert!(hh.has(FLAG_RANGE));
        assert_eq!(keys, vec![100, 110]);
        let wrong_len = encode(&h, &[100, 111], bytemuck::cast_slice(&vals));
        assert!(matches!(
            check(&wrong_len),
            Err(WireError::ValueMismatch { .. })
        ));
        let empty = encode(&h, &[5, 5], &[]);
        assert!(matches!(check(&empty), Err(WireError::BadRange(_))));
        let three = encode(&h, &[1, 2, 3], &[]);
        assert!(matches!(check(&three), Err(WireError::BadRange(_))));
    }

    #[test]
    fn cached_key_frames_are_checked() {
        let mut h = push_header(1);
        h.flags = FLAG_KEYS_CACHED;
        let vals = vec![0f32; 5];
        let ok = encode(&h, &[0xabc, 0xdef, 5], bytemuck::cast_slice(&vals));
        let (_, keys, values, _) = check(&ok).unwrap();
        assert_eq!(keys, vec![0xabc, 0xdef, 5]);
        assert_eq!(values.len(), 20);
        // The values must be those of the named list's length.
        let short = encode(&h, &[0xabc, 0xdef, 6], bytemuck::cast_slice(&vals));
        assert!(matches!(
            check(&short),
            Err(WireError::ValueMismatch { keys: 6, .. })
        ));
        let empty = encode(&h, &[0xabc, 0xdef, 0], &[]);
        assert!(matches!(check(&empty), Err(WireError::BadCachedKeys(_))));
        let two = encode(&h, &[0xabc, 5], bytemuck::cast_slice(&vals));
        assert!(matches!(check(&two), Err(WireError::BadCachedKeys(_))));
        h.flags = FLAG_KEYS_CACHED | FLAG_RANGE;
        let ranged = encode(&h, &[0xabc, 0xdef, 5], bytemuck::cast_slice(&vals));
        assert!(matches!(check(&ranged), Err(WireError::BadCachedKeys(_))));
        h.flags = FLAG_KEYS_CACHED | FLAG_CACHE_KEYS;
        let both = encode(&h, &[0xabc, 0xdef, 5], bytemuck::cast_slice(&vals));
        assert!(matches!(check(&both), Err(WireError::BadCachedKeys(_))));
        // A compressed frame's value bytes are a block: not checked against the keys.
        h.flags = FLAG_COMPRESSED;
        let block = encode(&h, &[1, 2, 3], &[7u8; 13]);
        assert!(check(&block).is_ok());
        h.flags = FLAG_COMPRESSED | FLAG_RANGE;
        let backwards = encode(&h, &[9, 3], &[7u8; 13]);
        assert!(matches!(check(&backwards), Err(WireError::BadRange(_))));
    }

    #[test]
    fn misaligned_buffers_are_refused_not_ub() {
        let bytes = encode(&push_header(1), &[1], bytemuck::cast_slice(&[1.0f32]));
        let buf = aligned(&[&[0u8; 4][..], &bytes].concat());
        let all = &bytemuck::cast_slice::<u64, u8>(&buf)[4..4 + bytes.len()];
        assert_eq!(
            Frame::new_checked(all, DEFAULT_MAX_FRAME).unwrap_err(),
            WireError::Misaligned
        );
    }

    fn any_header() -> impl Strategy<Value = Header> {
        (
            any::<u32>(),
            0u8..3,
            0u8..6,
            0u8..4,
            any::<u8>(),
            any::<u32>(),
            0u16..16,
            any::<u16>(),
            any::<u64>(),
            0u32..4,
            any::<u32>(),
        )
            .prop_map(
                |(m, ver, kind, dtype, status, sender, flags, func, ts, value_len, epoch)| Header {
                    magic: if m % 8 == 0 { m } else { MAGIC },
                    version: if ver == 0 { 0 } else { VERSION },
                    kind,
                    dtype,
                    status,
                    sender,
                    flags,
                    func,
                    timestamp: ts,
                    key_count: 0,
                    value_bytes: 0,
                    value_len,
                    epoch,
                    clock: ts.rotate_left(7),
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = check(&bytes);
        }

        #[test]
        fn arbitrary_headers_with_arbitrary_bodies_never_panic(
            h in any_header(),
            kc in 0u64..6,
            vb in 0u64..64,
            body in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut h = h;
            h.key_count = kc;
            h.value_bytes = vb;
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&body);
            if let Ok((hh, keys, values, n)) = check(&bytes) {
                    prop_assert_eq!(hh, h);
                    prop_assert_eq!(keys.len() as u64, kc);
                    prop_assert_eq!(values.len() as u64, vb);
                    prop_assert!(n <= bytes.len() && n % 8 == 0);
            }
        }

        #[test]
        fn encode_then_decode_is_identity(
            keys in proptest::collection::vec(any::<u64>(), 0..40),
            value_len in 1u32..4,
            ts in any::<u64>(),
            sender in any::<u32>(),
            f64s in any::<bool>(),
        ) {
            let mut h = Header::new(MessageKind::PushPull, sender, ts);
            let (dtype, elem) = if f64s { (DType::F64, 8) } else { (DType::F32, 4) };
            h.dtype = dtype as u8;
            h.value_len = value_len;
            let values: Vec<u8> = (0..keys.len() * value_len as usize * elem).map(|i| i as u8).collect();
            let bytes = encode(&h, &keys, &values);
            let (hh, kk, vv, n) = check(&bytes).unwrap();
            prop_assert_eq!(n, bytes.len());
            prop_assert_eq!(hh.timestamp, ts);
            prop_assert_eq!(hh.sender, sender);
            prop_assert_eq!(kk, keys);
            prop_assert_eq!(vv, values);
        }
    }
}
