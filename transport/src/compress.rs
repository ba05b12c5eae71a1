//! Value compression: self-describing blocks that a connection can send in place of raw
//! value bytes, once both ends have agreed on a [`Codec`].
//!
//! A block is a 9-byte header (a 1-byte codec tag, then the uncompressed length as a
//! little-endian `u64`) followed by the codec's payload:
//!
//! | tag | codec        | payload                                                    |
//! |-----|--------------|------------------------------------------------------------|
//! | 0   | `none`       | the raw bytes                                              |
//! | 1   | `lz4`        | one LZ4 block (no frame, no checksum)                      |
//! | 2   | `zstd:LEVEL` | one zstd frame (the level is the sender's business)        |
//! | 3   | `zeros`      | zero runs over 4-byte words, see [`Codec::ZeroRuns`]       |
//!
//! [`encode`] compresses only when it pays: when the payload would not be smaller than
//! the input, it writes the `none` form instead, so a block is never longer than
//! [`max_block_len`] of its input. [`decode`] takes anything from the network: it checks
//! the claimed length against the caller's limit before allocating, and reports a
//! truncated, unknown or inconsistent block as a [`CodecError`], never a panic.
//!
//! [`encode_into`], [`compress_into`] and [`decode_into`] are the same codecs working in
//! the caller's buffers with a reusable [`Context`] (zstd's contexts cost more to make
//! than a small block costs to compress); [`inspect`] makes every check [`decode`] makes
//! before allocating, for a receiver that allocates the output itself.
//!
//! This module is pure: no connection state, no I/O.

use std::fmt;
use std::str::FromStr;

/// Bytes in a block's header: the codec tag and the uncompressed length (`u64` LE).
pub const HEADER_LEN: usize = 9;

/// The zstd level that `zstd` without `:LEVEL` means (zstd's own default).
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// The names [`Codec::from_str`] accepts, as its errors list them.
pub const CODEC_NAMES: &str = "none, lz4, zstd, zstd:LEVEL, zeros";

const TAG_NONE: u8 = 0;
const TAG_LZ4: u8 = 1;
const TAG_ZSTD: u8 = 2;
const TAG_ZERO_RUNS: u8 = 3;

/// The longest block [`encode`] writes for `input_len` bytes: the header and the raw
/// bytes (what it falls back to when compression does not pay).
pub const fn max_block_len(input_len: usize) -> usize {
    HEADER_LEN + input_len
}

/// How a block's payload is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The raw bytes (`none`).
    #[default]
    None,
    /// An LZ4 block (`lz4`): fast, for values with repeated byte sequences.
    Lz4,
    /// A zstd frame (`zstd`, `zstd:LEVEL`): slower, smaller.
    Zstd {
        /// zstd's compression level (negative: faster; up to 22: smaller). Decoding does
        /// not need it.
        level: i32,
    },
    /// Zero runs (`zeros`), for value buffers that filters leave mostly zero. The input
    /// is read as 4-byte words; the payload is a sequence of pairs, each a varint count
    /// of zero words, then a varint count of literal words followed by those words,
    /// until every whole word is covered; then the trailing `len % 4` bytes as they are.
    /// Varints are LEB128 (7 bits a byte, low bits first).
    ZeroRuns,
}

impl Codec {
    /// The codec's name without its parameters: `none`, `lz4`, `zstd` or `zeros`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd { .. } => "zstd",
            Codec::ZeroRuns => "zeros",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Codec::None => TAG_NONE,
            Codec::Lz4 => TAG_LZ4,
            Codec::Zstd { .. } => TAG_ZSTD,
            Codec::ZeroRuns => TAG_ZERO_RUNS,
        }
    }

    /// The codec in one word (for an atomic): the tag in the low byte, a zstd level's
    /// bits in the high half. [`from_bits`](Self::from_bits) reads it back.
    pub(crate) fn to_bits(self) -> u64 {
        let level = match self {
            Codec::Zstd { level } => level as u32,
            _ => 0,
        };
        u64::from(self.tag()) | u64::from(level) << 32
    }

    /// The codec [`to_bits`](Self::to_bits) made this word from.
    pub(crate) fn from_bits(bits: u64) -> Self {
        match bits as u8 {
            TAG_LZ4 => Codec::Lz4,
            TAG_ZSTD => Codec::Zstd {
                level: (bits >> 32) as u32 as i32,
            },
            TAG_ZERO_RUNS => Codec::ZeroRuns,
            _ => Codec::None,
        }
    }
}

/// `none`, `lz4`, `zstd:LEVEL` or `zeros`; what [`Codec::from_str`] reads back.
impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Zstd { level } => write!(f, "zstd:{level}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Reads `none`, `lz4`, `zstd` (level [`ZSTD_DEFAULT_LEVEL`]), `zstd:LEVEL` or `zeros`,
/// in any case, surrounding whitespace ignored.
impl FromStr for Codec {
    type Err = ParseCodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "none" => return Ok(Codec::None),
            "lz4" => return Ok(Codec::Lz4),
            "zstd" => {
                return Ok(Codec::Zstd {
                    level: ZSTD_DEFAULT_LEVEL,
                })
            }
            "zeros" => return Ok(Codec::ZeroRuns),
            _ => {}
        }
        let Some(level) = name.strip_prefix("zstd:") else {
            return Err(ParseCodecError::Unknown(s.to_owned()));
        };
        let range = zstd::compression_level_range();
        match level.parse::<i32>() {
            Ok(level) if range.contains(&level) => Ok(Codec::Zstd { level }),
            _ => Err(ParseCodecError::BadZstdLevel {
                input: s.to_owned(),
                min: *range.start(),
                max: *range.end(),
            }),
        }
    }
}

/// Why a codec name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseCodecError {
    /// Not a codec this module knows.
    #[error("unknown codec `{0}`: expected one of none, lz4, zstd, zstd:LEVEL, zeros")]
    Unknown(String),
    /// `zstd:` followed by something that is not a level zstd accepts.
    #[error("bad codec `{input}`: the zstd level must be an integer in {min}..={max}")]
    BadZstdLevel {
        /// The name as given.
        input: String,
        /// The lowest level zstd accepts.
        min: i32,
        /// The highest level zstd accepts.
        max: i32,
    },
}

/// What [`encode`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The codec the block is in: the one asked for, or [`Codec::None`] when compressing
    /// did not pay (the payload would not have been smaller than the input) and the raw
    /// bytes were written instead.
    pub codec_used: Codec,
    /// The input's length.
    pub bytes_in: usize,
    /// The block's length, header included.
    pub bytes_out: usize,
}

impl Encoded {
    /// Whether the block is compressed (not the `none` form).
    pub fn compressed(&self) -> bool {
        self.codec_used != Codec::None
    }

    /// `bytes_in / bytes_out`: above 1 when the block is smaller than its input.
    pub fn ratio(&self) -> f64 {
        self.bytes_in as f64 / self.bytes_out as f64
    }
}

/// Why a block could not be decoded. The codec names are those of [`Codec::name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The block ends before something it must contain.
    #[error("truncated block: the {what} needs {needed} bytes, only {got} are left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// The bytes it needs.
        needed: usize,
        /// The bytes the block has left.
        got: usize,
    },
    /// The tag is not one of the codecs this module knows.
    #[error("unknown codec tag {0} (known: 0 none, 1 lz4, 2 zstd, 3 zeros)")]
    UnknownTag(u8),
    /// The block claims more uncompressed bytes than the caller allows (a decompression
    /// bomb, or a peer that ignores the agreed limit); nothing was allocated.
    #[error("block claims {claimed} uncompressed bytes, more than the limit of {max}")]
    TooLarge {
        /// The claimed uncompressed length.
        claimed: u64,
        /// The caller's limit.
        max: usize,
    },
    /// The payload decodes to fewer bytes than the header claims.
    #[error("{codec} payload decodes to {actual} bytes, but the block claims {claimed}")]
    LengthMismatch {
        /// The codec.
        codec: &'static str,
        /// The claimed uncompressed length.
        claimed: u64,
        /// What the payload decodes (or says it decodes) to.
        actual: u64,
    },
    /// The payload decodes to more bytes than the header claims.
    #[error("{codec} payload decodes to more than the {claimed} bytes the block claims")]
    Overrun {
        /// The codec.
        codec: &'static str,
        /// The claimed uncompressed length.
        claimed: u64,
    },
    /// Bytes are left after a complete payload.
    #[error("{extra} bytes left over after the {codec} payload")]
    TrailingBytes {
        /// The codec.
        codec: &'static str,
        /// How many bytes are left over.
        extra: usize,
    },
    /// The payload is not valid for its codec.
    #[error("corrupt {codec} payload: {reason}")]
    Corrupt {
        /// The codec.
        codec: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The output buffer could not grow to the claimed length (within the limit, but
    /// more than the allocator would give).
    #[error("could not allocate {len} bytes for the decoded value")]
    OutOfMemory {
        /// The claimed uncompressed length.
        len: usize,
    },
}

/// What a block's header says, once [`inspect`] has checked it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// The block's codec. A block does not record a zstd level (decoding does not need
    /// it), so a zstd block reads as `zstd` at [`ZSTD_DEFAULT_LEVEL`].
    pub codec: Codec,
    /// The uncompressed length the block claims (at most the `max_len` it was checked
    /// against).
    pub len: usize,
}

/// Codec state worth keeping between blocks: a zstd compression context (with the level
/// it is set to) and a zstd decompression context, each made on first use. Making a zstd
/// context costs more than compressing a few KiB, so a thread that encodes or decodes
/// many blocks keeps one `Context` (the TCP transport keeps one per thread). LZ4 and zero
/// runs need no state. [`encode`] and [`decode`] make a fresh one per call.
#[derive(Default)]
pub struct Context {
    zstd_c: Option<(i32, zstd::bulk::Compressor<'static>)>,
    zstd_d: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("zstd_level", &self.zstd_c.as_ref().map(|(l, _)| *l))
            .field("zstd_decompressor", &self.zstd_d.is_some())
            .finish()
    }
}

impl Context {
    /// A context with no codec state yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The zstd compressor, set to `level`; `None` if zstd could not make or set it.
    fn compressor(&mut self, level: i32) -> Option<&mut zstd::bulk::Compressor<'static>> {
        match &mut self.zstd_c {
            Some((l, c)) => {
                if *l != level {
                    c.set_compression_level(level).ok()?;
                    *l = level;
                }
            }
            slot @ None => {
                *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
            }
        }
        self.zstd_c.as_mut().map(|(_, c)| c)
    }

    fn decompressor(&mut self) -> Option<&mut zstd::bulk::Decompressor<'static>> {
        if self.zstd_d.is_none() {
            self.zstd_d = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        self.zstd_d.as_mut()
    }
}

/// The room [`encode_into`] and [`compress_into`] need for `input_len` bytes: a block
/// header and LZ4's worst case (about 1.1 times the input), which covers every codec's.
/// At least [`max_block_len`]`(input_len)`; the block they write is at most that.
pub const fn encode_room(input_len: usize) -> usize {
    HEADER_LEN + lz4_flex::block::get_maximum_output_size(input_len)
}

/// Appends to `out` a block holding `input` in `codec`, or in the `none` form when that
/// codec would not make the payload smaller than the input (an empty input is always
/// written in the `none` form). The block is at most [`max_block_len`]`(input.len())`
/// bytes; what is in `out` before it is left alone. One-off use: it makes a fresh
/// [`Context`]; see [`encode_into`] to reuse one.
pub fn encode(codec: Codec, input: &[u8], out: &mut Vec<u8>) -> Encoded {
    let start = out.len();
    out.resize(start + encode_room(input.len()), 0);
    let enc = encode_into(&mut Context::new(), codec, input, &mut out[start..]);
    out.truncate(start + enc.bytes_out);
    enc
}

/// [`encode`] into the start of a slice, with a reusable [`Context`]: the block is
/// `out[..bytes_out]` (the rest of `out` is left in an unspecified state).
///
/// # Panics
/// If `out` is shorter than [`encode_room`]`(input.len())` (a caller bug).
pub fn encode_into(ctx: &mut Context, codec: Codec, input: &[u8], out: &mut [u8]) -> Encoded {
    if let Some(enc) = compress_into(ctx, codec, input, out) {
        return enc;
    }
    let block = HEADER_LEN + input.len();
    write_header(out, TAG_NONE, input.len());
    out[HEADER_LEN..block].copy_from_slice(input);
    Encoded {
        codec_used: Codec::None,
        bytes_in: input.len(),
        bytes_out: block,
    }
}

/// The compressing half of [`encode_into`]: writes a block in `codec` at the start of
/// `out` and returns what it wrote, if that block is smaller than the `none` form would
/// be; else returns `None` (having written nothing useful) and leaves the fallback to the
/// caller, which can often send the raw input instead of a copy of it. `codec` `none`
/// and an empty input always return `None`.
///
/// # Panics
/// If `out` is shorter than [`encode_room`]`(input.len())` (a caller bug).
pub fn compress_into(
    ctx: &mut Context,
    codec: Codec,
    input: &[u8],
    out: &mut [u8],
) -> Option<Encoded> {
    assert!(
        out.len() >= encode_room(input.len()),
        "an output of {} bytes for a block of {} input bytes (encode_room: {})",
        out.len(),
        input.len(),
        encode_room(input.len())
    );
    if codec == Codec::None || input.is_empty() {
        return None;
    }
    write_header(out, codec.tag(), input.len());
    let body = &mut out[HEADER_LEN..];
    let payload = match codec {
        Codec::None => None,
        Codec::Lz4 => compress_lz4(input, body),
        Codec::Zstd { level } => compress_zstd(ctx, level, input, body),
        Codec::ZeroRuns => compress_zero_runs(input, &mut body[..input.len() - 1]),
    }?;
    debug_assert!(payload < input.len(), "{codec} payload does not pay");
    Some(Encoded {
        codec_used: codec,
        bytes_in: input.len(),
        bytes_out: HEADER_LEN + payload,
    })
}

fn write_header(out: &mut [u8], tag: u8, len: usize) {
    out[0] = tag;
    out[1..HEADER_LEN].copy_from_slice(&(len as u64).to_le_bytes());
}

/// Writes an LZ4 block at the start of `body` (room for LZ4's worst case); its length if
/// it is smaller than the input.
fn compress_lz4(input: &[u8], body: &mut [u8]) -> Option<usize> {
    let room = lz4_flex::block::get_maximum_output_size(input.len());
    match lz4_flex::block::compress_into(input, &mut body[..room]) {
        Ok(n) if n < input.len() => Some(n),
        _ => None,
    }
}

/// Writes a zstd frame at the start of `body`; its length if it is smaller than the input.
fn compress_zstd(ctx: &mut Context, level: i32, input: &[u8], body: &mut [u8]) -> Option<usize> {
    // Room for one byte less than the input: zstd gives up (dstSize_tooSmall) as soon as
    // the frame would not pay, rather than finishing it.
    let room = &mut body[..input.len() - 1];
    ctx.compressor(level)?.compress_to_buffer(input, room).ok()
}

/// Bytes written at the start of a slice, refusing to run past its end.
struct Cursor<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(bytes.len())?;
        self.buf.get_mut(self.pos..end)?.copy_from_slice(bytes);
        self.pos = end;
        Some(())
    }

    fn put_varint(&mut self, mut v: u64) -> Option<()> {
        while v >= 0x80 {
            self.put(&[v as u8 | 0x80])?;
            v >>= 7;
        }
        self.put(&[v as u8])
    }
}

/// Writes the zero-runs payload into `room` (one byte less than the input); its length
/// if it fits, that is if it is smaller than the input. Stops as soon as it does not.
fn compress_zero_runs(input: &[u8], room: &mut [u8]) -> Option<usize> {
    let whole = input.len() / 4 * 4;
    let words: &[[u8; 4]] = bytemuck::cast_slice(&input[..whole]);
    let mut out = Cursor { buf: room, pos: 0 };
    let mut i = 0;
    while i < words.len() {
        let zeros = words[i..]
            .iter()
            .position(|w| *w != [0; 4])
            .unwrap_or(words.len() - i);
        i += zeros;
        let literals = words[i..]
            .iter()
            .position(|w| *w == [0; 4])
            .unwrap_or(words.len() - i);
        out.put_varint(zeros as u64)?;
        out.put_varint(literals as u64)?;
        out.put(&input[i * 4..(i + literals) * 4])?;
        i += literals;
    }
    out.put(&input[whole..])?;
    Some(out.pos)
}

/// Reads a LEB128 `u64` at `payload[*pos..]`, advancing `pos`.
fn get_varint(payload: &[u8], pos: &mut usize, what: &'static str) -> Result<u64, CodecError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = payload.get(*pos) else {
            return Err(CodecError::Truncated {
                what,
                needed: 1,
                got: 0,
            });
        };
        *pos += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            break;
        }
        v |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::Corrupt {
        codec: "zeros",
        reason: format!("the {what} does not fit in 64 bits"),
    })
}

/// Appends to `out` the bytes that `block` (exactly one block, nothing after it) holds,
/// after checking, before allocating anything, that their claimed length is at most
/// `max_len`. On an error, `out` is left as it was (its capacity may have grown). One-off
/// use: it makes a fresh [`Context`]; see [`decode_into`] to reuse one.
pub fn decode(block: &[u8], max_len: usize, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let parsed = parse(block, max_len)?;
    let start = out.len();
    out.try_reserve_exact(parsed.len)
        .map_err(|_| CodecError::OutOfMemory { len: parsed.len })?;
    out.resize(start + parsed.len, 0);
    let result = decode_payload(&mut Context::new(), &parsed, &mut out[start..]);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// [`decode`] into the start of a slice, with a reusable [`Context`]: the limit is
/// `out.len()`, the decoded bytes are `out[..n]` for the `n` it returns (the length the
/// block claims). On an error the contents of `out` are unspecified.
pub fn decode_into(ctx: &mut Context, block: &[u8], out: &mut [u8]) -> Result<usize, CodecError> {
    let parsed = parse(block, out.len())?;
    decode_payload(ctx, &parsed, &mut out[..parsed.len])?;
    Ok(parsed.len)
}

/// Every check of `block` that needs no output buffer, as [`decode`] makes them before it
/// allocates: a whole header, a known tag, a claimed length of at most `max_len`, and a
/// payload that can be that long (raw bytes: exactly; LZ4: at most 255 bytes out per byte
/// in; zstd: the frame header's content size, when it has one, is the claimed length).
/// A receiver that must allocate for the decoded bytes itself calls this first.
pub fn inspect(block: &[u8], max_len: usize) -> Result<BlockInfo, CodecError> {
    let parsed = parse(block, max_len)?;
    let codec = match parsed.tag {
        TAG_NONE => Codec::None,
        TAG_LZ4 => Codec::Lz4,
        TAG_ZSTD => Codec::Zstd {
            level: ZSTD_DEFAULT_LEVEL,
        },
        _ => Codec::ZeroRuns,
    };
    Ok(BlockInfo {
        codec,
        len: parsed.len,
    })
}

/// A block whose header passed [`inspect`]'s checks.
struct Parsed<'a> {
    tag: u8,
    claimed: u64,
    /// `claimed`, which is at most the caller's limit.
    len: usize,
    payload: &'a [u8],
}

fn parse(block: &[u8], max_len: usize) -> Result<Parsed<'_>, CodecError> {
    let Some((header, payload)) = block.split_first_chunk::<HEADER_LEN>() else {
        return Err(CodecError::Truncated {
            what: "block header",
            needed: HEADER_LEN,
            got: block.len(),
        });
    };
    let tag = header[0];
    let mut claimed = [0u8; 8];
    claimed.copy_from_slice(&header[1..]);
    let claimed = u64::from_le_bytes(claimed);
    if tag > TAG_ZERO_RUNS {
        return Err(CodecError::UnknownTag(tag));
    }
    if claimed > max_len as u64 {
        return Err(CodecError::TooLarge {
            claimed,
            max: max_len,
        });
    }
    let len = claimed as usize; // <= max_len, so it fits
    match tag {
        TAG_NONE => {
            if payload.len() < len {
                return Err(CodecError::Truncated {
                    what: "raw payload",
                    needed: len,
                    got: payload.len(),
                });
            }
            if payload.len() > len {
                return Err(CodecError::TrailingBytes {
                    codec: "none",
                    extra: payload.len() - len,
                });
            }
        }
        // An LZ4 sequence writes at most 255 bytes per byte it takes (a match-length byte
        // of 255), so a shorter payload cannot honestly claim this much.
        TAG_LZ4 if claimed > (payload.len() as u64).saturating_mul(255) => {
            return Err(CodecError::Corrupt {
                codec: "lz4",
                reason: format!(
                    "{} bytes of LZ4 cannot expand to the {claimed} the block claims",
                    payload.len()
                ),
            });
        }
        TAG_ZSTD => match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(n)) if n != claimed => {
                return Err(CodecError::LengthMismatch {
                    codec: "zstd",
                    claimed,
                    actual: n,
                })
            }
            Ok(_) => {}
            Err(_) => {
                return Err(CodecError::Corrupt {
                    codec: "zstd",
                    reason: "no valid zstd frame header".into(),
                })
            }
        },
        _ => {}
    }
    Ok(Parsed {
        tag,
        claimed,
        len,
        payload,
    })
}

/// Decodes a parsed block's payload into `out`, which is exactly `p.len` bytes long.
fn decode_payload(ctx: &mut Context, p: &Parsed<'_>, out: &mut [u8]) -> Result<(), CodecError> {
    debug_assert_eq!(out.len(), p.len, "decode output is not the claimed length");
    let (claimed, len, payload) = (p.claimed, p.len, p.payload);
    match p.tag {
        TAG_NONE => {
            out.copy_from_slice(payload);
            Ok(())
        }
        TAG_LZ4 => match lz4_flex::block::decompress_into(payload, out) {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(CodecError::LengthMismatch {
                codec: "lz4",
                claimed,
                actual: n as u64,
            }),
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) => {
                Err(CodecError::Overrun {
                    codec: "lz4",
                    claimed,
                })
            }
            Err(e) => Err(CodecError::Corrupt {
                codec: "lz4",
                reason: e.to_string(),
            }),
        },
        TAG_ZSTD => {
            let Some(d) = ctx.decompressor() else {
                return Err(CodecError::OutOfMemory { len });
            };
            match d.decompress_to_buffer(payload, out) {
                Ok(n) if n == len => Ok(()),
                Ok(n) => Err(CodecError::LengthMismatch {
                    codec: "zstd",
                    claimed,
                    actual: n as u64,
                }),
                Err(e) => Err(CodecError::Corrupt {
                    codec: "zstd",
                    reason: e.to_string(),
                }),
            }
        }
        _ => decode_zero_runs(payload, out),
    }
}

/// Decodes a zero-runs payload into `out` (the claimed length), writing every byte of it.
fn decode_zero_runs(payload: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let len = out.len();
    let words = len / 4;
    let mut done = 0;
    let mut pos = 0;
    while done < words {
        let zeros = get_varint(payload, &mut pos, "zero-run length")?;
        let literals = get_varint(payload, &mut pos, "literal-run length")?;
        let left = (words - done) as u64;
        if zeros > left || literals > left - zeros {
            return Err(CodecError::Overrun {
                codec: "zeros",
                claimed: len as u64,
            });
        }
        // Both fit in usize: together they are at most `words`.
        let (zeros, literals) = (zeros as usize, literals as usize);
        out[done * 4..(done + zeros) * 4].fill(0);
        done += zeros;
        let bytes = literals * 4;
        let Some(lit) = payload.get(pos..).and_then(|rest| rest.get(..bytes)) else {
            return Err(CodecError::Truncated {
                what: "literal words",
                needed: bytes,
                got: payload.len() - pos,
            });
        };
        out[done * 4..done * 4 + bytes].copy_from_slice(lit);
        pos += bytes;
        done += literals;
    }
    let rest = &payload[pos..];
    let tail = len % 4;
    if rest.len() < tail {
        return Err(CodecError::Truncated {
            what: "trailing partial word",
            needed: tail,
            got: rest.len(),
        });
    }
    if rest.len() > tail {
        return Err(CodecError::TrailingBytes {
            codec: "zeros",
            extra: rest.len() - tail,
        });
    }
    out[words * 4..].copy_from_slice(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Codec; 7] = [
        Codec::None,
        Codec::Lz4,
        Codec::Zstd { level: -5 },
        Codec::Zstd { level: 1 },
        Codec::Zstd { level: 3 },
        Codec::Zstd { level: 19 },
        Codec::ZeroRuns,
    ];

    /// splitmix64: reproducible test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn next_f64(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }

    /// Encodes after a prefix, checks the prefix, the size promise and `Encoded`, decodes
    /// after another prefix and compares. Returns what `encode` said and the block.
    fn round_trip(codec: Codec, data: &[u8]) -> (Encoded, Vec<u8>) {
        let mut out = vec![0xAA; 3];
        let enc = encode(codec, data, &mut out);
        assert_eq!(&out[..3], &[0xAA; 3], "{codec}: the prefix was touched");
        let block = out.split_off(3);
        assert_eq!(enc.bytes_in, data.len());
        assert_eq!(enc.bytes_out, block.len());
        assert!(block.len() <= max_block_len(data.len()), "{codec}: {enc:?}");
        if enc.compressed() {
            assert_eq!(enc.codec_used, codec);
            assert!(block.len() < max_block_len(data.len()), "{codec}: {enc:?}");
        } else {
            assert_eq!(block.len(), max_block_len(data.len()));
        }
        let mut dec = vec![0x55; 2];
        decode(&block, data.len(), &mut dec).unwrap_or_else(|e| panic!("{codec}: {e}"));
        assert_eq!(&dec[..2], &[0x55; 2]);
        assert!(dec[2..] == *data, "{codec}: round trip differs");
        if !data.is_empty() {
            let mut small = Vec::new();
            assert!(matches!(
                decode(&block, data.len() - 1, &mut small),
                Err(CodecError::TooLarge { .. })
            ));
        }
        (enc, block)
    }

    /// 4-byte words, `zero_share` of them zero, the others random non-zero floats.
    fn sparse_f32(rng: &mut Rng, words: usize, zero_share: f64) -> Vec<u8> {
        let mut v = Vec::with_capacity(words * 4);
        for _ in 0..words {
            let x = if rng.next_f64() < zero_share {
                0.0f32
            } else {
                ((rng.next_f64() - 0.5) * 0.02) as f32
            };
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn block(tag: u8, claimed: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![tag];
        b.extend_from_slice(&claimed.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn names_round_trip_and_errors_list_the_valid_ones() {
        for codec in ALL {
            assert_eq!(codec.to_string().parse::<Codec>(), Ok(codec));
        }
        assert_eq!("none".parse(), Ok(Codec::None));
        assert_eq!(" LZ4 ".parse(), Ok(Codec::Lz4));
        assert_eq!("zeros".parse(), Ok(Codec::ZeroRuns));
        assert_eq!(
            "zstd".parse(),
            Ok(Codec::Zstd {
                level: ZSTD_DEFAULT_LEVEL
            })
        );
        assert_eq!("zstd:-7".parse(), Ok(Codec::Zstd { level: -7 }));
        assert_eq!(Codec::Zstd { level: 9 }.to_string(), "zstd:9");
        assert_eq!(Codec::ZeroRuns.to_string(), "zeros");

        let err = "gzip".parse::<Codec>().unwrap_err();
        assert_eq!(err, ParseCodecError::Unknown("gzip".into()));
        let msg = err.to_string();
        assert!(msg.contains("`gzip`") && msg.contains(CODEC_NAMES), "{msg}");
        for bad in ["zstd:", "zstd:fast", "zstd:99", "zstd:3.5"] {
            let err = bad.parse::<Codec>().unwrap_err();
            assert!(
                matches!(err, ParseCodecError::BadZstdLevel { max: 22, .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains("zstd level"), "{err}");
        }
    }

    #[test]
    fn empty_input_is_the_none_form() {
        for codec in ALL {
            let (enc, block) = round_trip(codec, &[]);
            assert_eq!(enc.codec_used, Codec::None);
            assert_eq!(block, [0u8; 9]);
        }
    }

    #[test]
    fn all_zeros_compress_with_every_codec() {
        for len in [1usize, 3, 4, 5, 7, 64, 1000, 4096, 1 << 20] {
            let data = vec![0u8; len];
            for codec in ALL {
                let (enc, _) = round_trip(codec, &data);
                // Too short to pay for anything but zero runs of a few words.
                if codec != Codec::None && len >= 64 {
                    assert_eq!(enc.codec_used, codec, "len {len}");
                }
            }
            let (enc, block) = round_trip(Codec::ZeroRuns, &data);
            if len >= 8 {
                // One pair (the zero count's varint, a 0), then the tail.
                let varint = (64 - ((len / 4) as u64).leading_zeros()).div_ceil(7).max(1);
                let expect = HEADER_LEN + varint as usize + 1 + len % 4;
                assert_eq!(block.len(), expect, "{enc:?}");
            }
        }
    }

    #[test]
    fn incompressible_bytes_fall_back_to_none() {
        let mut rng = Rng(1);
        for len in [1usize, 5, 100, 4097, 64 << 10] {
            let data = rng.bytes(len);
            for codec in ALL {
                let (enc, block) = round_trip(codec, &data);
                assert_eq!(enc.codec_used, Codec::None, "{codec} on {len} random bytes");
                assert_eq!(enc.bytes_out, len + 9);
                assert_eq!(block[0], TAG_NONE);
                assert_eq!(&block[9..], &data[..]);
            }
        }
    }

    #[test]
    fn zero_runs_format_is_pinned() {
        let x = 0x0102_0304u32.to_le_bytes();
        let y = 0x0000_0100u32.to_le_bytes();
        // Words: 0, 0, x, y, 0, then a 1-byte tail.
        let mut data = vec![0u8; 8];
        data.extend_from_slice(&x);
        data.extend_from_slice(&y);
        data.extend_from_slice(&[0; 4]);
        data.push(7);
        let (enc, block) = round_trip(Codec::ZeroRuns, &data);
        assert_eq!(enc.codec_used, Codec::ZeroRuns);
        let mut expect = block_header(TAG_ZERO_RUNS, 21);
        expect.extend_from_slice(&[2, 2]);
        expect.extend_from_slice(&x);
        expect.extend_from_slice(&y);
        expect.extend_from_slice(&[1, 0, 7]);
        assert_eq!(block, expect);
    }

    fn block_header(tag: u8, len: u64) -> Vec<u8> {
        block(tag, len, &[])
    }

    #[test]
    fn mixed_zero_runs_and_odd_lengths() {
        let mut rng = Rng(2);
        for share in [0.0, 0.5, 0.9, 0.99, 1.0] {
            for words in [0usize, 1, 2, 31, 1000, 20_000] {
                let base = sparse_f32(&mut rng, words, share);
                for tail in 0..4 {
                    let mut data = base.clone();
                    data.extend(rng.bytes(tail));
                    for codec in ALL {
                        round_trip(codec, &data);
                    }
                }
            }
        }
        // Long runs of both kinds, with single zero words between literals.
        let mut data = vec![0u8; 400 * 4];
        data.extend(rng.bytes(12));
        data.extend_from_slice(&[0; 4]);
        data.extend_from_slice(&[9; 4]);
        data.extend(vec![0u8; 100_000 * 4]);
        data.extend_from_slice(&[1, 2, 3]);
        for codec in ALL {
            let (enc, _) = round_trip(codec, &data);
            assert_eq!(enc.codec_used, codec);
        }
        let (enc, _) = round_trip(Codec::ZeroRuns, &data);
        assert!(enc.bytes_out < 9 + 40, "{enc:?}");
    }

    #[test]
    fn a_bomb_is_refused_before_allocating() {
        const TIB: u64 = 1 << 40;
        for tag in [TAG_NONE, TAG_LZ4, TAG_ZSTD, TAG_ZERO_RUNS] {
            let bomb = block(tag, TIB, &[0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0]);
            let mut out = Vec::new();
            let err = decode(&bomb, 1 << 20, &mut out).unwrap_err();
            assert_eq!(
                err,
                CodecError::TooLarge {
                    claimed: TIB,
                    max: 1 << 20
                }
            );
            assert!(err.to_string().contains("1099511627776"), "{err}");
            assert_eq!(out.capacity(), 0);
        }
        // Even with no limit, the raw and LZ4 forms are refused by their payload's size.
        for tag in [TAG_NONE, TAG_LZ4] {
            let mut out = Vec::new();
            let bomb = block(tag, TIB, &[0x1f, 0, 1, 0xff, 0xff]);
            assert!(decode(&bomb, usize::MAX, &mut out).is_err());
            assert_eq!(out.capacity(), 0);
        }
        // A zstd frame whose header disagrees with the block is refused before allocating.
        let mut frame = Vec::new();
        encode(Codec::Zstd { level: 3 }, &[0u8; 4096], &mut frame);
        frame[1..9].copy_from_slice(&TIB.to_le_bytes());
        let mut out = Vec::new();
        assert_eq!(
            decode(&frame, usize::MAX, &mut out),
            Err(CodecError::LengthMismatch {
                codec: "zstd",
                claimed: TIB,
                actual: 4096
            })
        );
        assert_eq!(out.capacity(), 0);
    }

    #[test]
    fn unknown_tags_and_short_headers() {
        let mut out = Vec::new();
        assert_eq!(
            decode(&block(4, 0, &[]), 10, &mut out),
            Err(CodecError::UnknownTag(4))
        );
        assert_eq!(
            decode(&block(0xff, 1 << 40, &[]), 10, &mut out),
            Err(CodecError::UnknownTag(0xff))
        );
        for n in 0..HEADER_LEN {
            assert_eq!(
                decode(&[0; HEADER_LEN][..n], 10, &mut out),
                Err(CodecError::Truncated {
                    what: "block header",
                    needed: HEADER_LEN,
                    got: n
                })
            );
        }
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_and_corrupted_blocks_are_errors() {
        let mut rng = Rng(3);
        let mut data = sparse_f32(&mut rng, 2000, 0.9);
        data.extend_from_slice(&[5, 6]);
        for codec in ALL {
            let (enc, block) = round_trip(codec, &data);
            assert_eq!(enc.codec_used, codec);
            let mut out = vec![1, 2, 3];
            for cut in 0..block.len() {
                let r = decode(&block[..cut], usize::MAX, &mut out);
                assert!(r.is_err(), "{codec}: a {cut}-byte prefix decoded");
                assert_eq!(out, [1, 2, 3], "{codec}: out not restored");
            }
            let mut longer = block.clone();
            longer.push(0);
            assert!(decode(&longer, usize::MAX, &mut out).is_err(), "{codec}");
            for claimed in [data.len() - 1, data.len() + 1, data.len() + 4, 0] {
                let mut wrong = block.clone();
                wrong[1..9].copy_from_slice(&(claimed as u64).to_le_bytes());
                let r = decode(&wrong, usize::MAX, &mut out);
                assert!(r.is_err(), "{codec}: claiming {claimed} decoded");
            }
            assert_eq!(out, [1, 2, 3]);
        }
    }

    #[test]
    fn overlong_varints_are_errors() {
        let mut out = Vec::new();
        // An 11-byte varint, and a 10-byte one whose last byte overflows 64 bits.
        let mut long = vec![0xff; 10];
        long.push(0);
        assert!(matches!(
            decode(&block(TAG_ZERO_RUNS, 8, &long), 8, &mut out),
            Err(CodecError::Corrupt { codec: "zeros", .. })
        ));
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert!(matches!(
            decode(&block(TAG_ZERO_RUNS, 8, &over), 8, &mut out),
            Err(CodecError::Corrupt { codec: "zeros", .. })
        ));
        // Runs longer than the claimed length.
        assert_eq!(
            decode(&block(TAG_ZERO_RUNS, 8, &[3, 0]), 8, &mut out),
            Err(CodecError::Overrun {
                codec: "zeros",
                claimed: 8
            })
        );
        assert_eq!(out.len(), 0);
    }

    #[test]
    fn context_apis_agree_with_the_one_off_ones() {
        let mut rng = Rng(4);
        let mut repeated = Vec::new();
        for i in 0..3000u32 {
            repeated.extend_from_slice(&((i % 7) as f32).to_le_bytes());
        }
        let inputs = [
            vec![0u8; 10_000],
            sparse_f32(&mut rng, 5000, 0.9),
            rng.bytes(7777),
            repeated,
            vec![3u8; 1],
            Vec::new(),
        ];
        // One context for everything: zstd levels change under it, blocks of all codecs
        // are decoded with it.
        let mut ctx = Context::new();
        for data in &inputs {
            for codec in ALL {
                let mut one_off = Vec::new();
                let enc = encode(codec, data, &mut one_off);
                let mut out = vec![0xEE; encode_room(data.len())];
                let with = encode_into(&mut ctx, codec, data, &mut out);
                assert_eq!(with, enc, "{codec}");
                assert_eq!(&out[..with.bytes_out], &one_off[..], "{codec}");
                let compressed = compress_into(&mut ctx, codec, data, &mut out);
                assert_eq!(compressed.is_some(), enc.compressed(), "{codec}");
                if let Some(c) = compressed {
                    assert_eq!(c, enc);
                    assert_eq!(&out[..c.bytes_out], &one_off[..], "{codec}");
                }
                let info = inspect(&one_off, data.len()).unwrap();
                assert_eq!(info.len, data.len());
                let expect = match enc.codec_used {
                    Codec::Zstd { .. } => Codec::Zstd {
                        level: ZSTD_DEFAULT_LEVEL,
                    },
                    other => other,
                };
                assert_eq!(info.codec, expect);
                // Decoding into a dirty slice writes every byte; a longer slice is fine,
                // a shorter one is the limit.
                for extra in [0usize, 5] {
                    let mut dec = vec![0xAA; data.len() + extra];
                    let n = decode_into(&mut ctx, &one_off, &mut dec).unwrap();
                    assert_eq!(n, data.len());
                    assert!(dec[..n] == data[..], "{codec}: decode_into differs");
                }
                if !data.is_empty() {
                    let mut short = vec![0; data.len() - 1];
                    assert!(matches!(
                        decode_into(&mut ctx, &one_off, &mut short),
                        Err(CodecError::TooLarge { .. })
                    ));
                    assert!(matches!(
                        inspect(&one_off, data.len() - 1),
                        Err(CodecError::TooLarge { .. })
                    ));
                }
            }
        }
    }

    #[test]
    fn inspect_refuses_what_decode_refuses_before_allocating() {
        const TIB: u64 = 1 << 40;
        assert_eq!(
            inspect(&block(TAG_LZ4, TIB, &[0; 7]), 1 << 20),
            Err(CodecError::TooLarge {
                claimed: TIB,
                max: 1 << 20
            })
        );
        assert!(matches!(
            inspect(&block(TAG_LZ4, 4096, &[0; 7]), usize::MAX),
            Err(CodecError::Corrupt { codec: "lz4", .. })
        ));
        assert!(matches!(
            inspect(&block(TAG_NONE, 10, &[0; 7]), usize::MAX),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(
            inspect(&block(TAG_ZSTD, 10, &[1, 2, 3, 4]), usize::MAX),
            Err(CodecError::Corrupt { codec: "zstd", .. })
        ));
        assert_eq!(
            inspect(&block(9, 0, &[]), 10),
            Err(CodecError::UnknownTag(9))
        );
    }

    #[test]
    fn codecs_survive_their_atomic_word() {
        let range = zstd::compression_level_range();
        let mut codecs = ALL.to_vec();
        codecs.push(Codec::Zstd {
            level: *range.start(),
        });
        codecs.push(Codec::Zstd {
            level: *range.end(),
        });
        for codec in codecs {
            assert_eq!(Codec::from_bits(codec.to_bits()), codec);
        }
        assert_eq!(Codec::None.to_bits(), 0);
    }

    #[test]
    #[should_panic(expected = "encode_room")]
    fn too_little_room_is_a_caller_bug() {
        let mut out = vec![0; max_block_len(100)];
        compress_into(&mut Context::new(), Codec::Lz4, &[0; 100], &mut out);
    }

    fn some_codec() -> impl Strategy<Value = Codec> {
        prop::sample::select(ALL.to_vec())
    }

    proptest! {
        #[test]
        fn random_bytes_round_trip(
            codec in some_codec(),
            data in prop::collection::vec(any::<u8>(), 0..3000),
        ) {
            round_trip(codec, &data);
        }

        #[test]
        fn sparse_words_round_trip(
            codec in some_codec(),
            words in prop::collection::vec(prop::option::weighted(0.3, any::<u32>()), 0..2000),
            tail in prop::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut data: Vec<u8> = words
                .iter()
                .flat_map(|w| w.unwrap_or(0).to_le_bytes())
                .collect();
            data.extend(tail);
            round_trip(codec, &data);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut out = Vec::new();
            if decode(&bytes, 1 << 16, &mut out).is_ok() {
                let claimed = u64::from_le_bytes(bytes[1..9].try_into().unwrap());
                prop_assert_eq!(out.len() as u64, claimed);
            } else {
                prop_assert!(out.is_empty());
            }
        }

        #[test]
        fn garbage_payloads_never_panic(
            tag in 0u8..4,
            claimed in 0u64..5000,
            payload in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut out = Vec::new();
            if decode(&block(tag, claimed, &payload), 1 << 16, &mut out).is_ok() {
                prop_assert_eq!(out.len() as u64, claimed);
            } else {
                prop_assert!(out.is_empty());
            }
        }

        #[test]
        fn corrupted_blocks_never_panic(
            codec in some_codec(),
            words in prop::collection::vec(prop::option::weighted(0.2, any::<u32>()), 1..500),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let data: Vec<u8> = words
                .iter()
                .flat_map(|w| w.unwrap_or(0).to_le_bytes())
                .collect();
            let mut block = Vec::new();
            encode(codec, &data, &mut block);
            for (at, xor) in flips {
                let i = at.index(block.len());
                block[i] ^= xor;
            }
            let cut = cut.index(block.len() + 1);
            for b in [&block[..], &block[..cut]] {
                let mut out = Vec::new();
                if decode(b, 1 << 16, &mut out).is_ok() {
                    let claimed = u64::from_le_bytes(b[1..9].try_into().unwrap());
                    prop_assert_eq!(out.len() as u64, claimed);
                }
            }
        }
    }

    /// Not a check: prints each codec's ratio and speed (GB/s of uncompressed bytes) on
    /// 4 MiB of f32 gradients, 90 % of them zero, and on 4 MiB of random f32 gradients in
    /// [-1, 1), through the paths the TCP transport uses ([`compress_into`] and
    /// [`decode_into`] with one [`Context`], into buffers that are reused); then the cost
    /// of one call on small blocks (what `COMPRESS_MIN_BYTES` in `tcp` weighs). Best run
    /// in release:
    /// `cargo test --release -p pserv-transport ratios_report -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn ratios_report() {
        use std::time::{Duration, Instant};

        let mut rng = Rng(42);
        let words = (4 << 20) / 4;
        let sparse = sparse_f32(&mut rng, words, 0.9);
        let random: Vec<u8> = (0..words)
            .flat_map(|_| (((rng.next_f64() * 2.0) - 1.0) as f32).to_le_bytes())
            .collect();
        let codecs = [
            Codec::Lz4,
            Codec::ZeroRuns,
            Codec::Zstd { level: -5 },
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: 3 },
            Codec::Zstd { level: 9 },
        ];
        // Repeats `f` for at least `min` (and 3 times); returns seconds per call.
        fn per_call(min: Duration, mut f: impl FnMut()) -> f64 {
            let t = Instant::now();
            let mut n = 0u32;
            while n < 3 || t.elapsed() < min {
                f();
                n += 1;
            }
            t.elapsed().as_secs_f64() / f64::from(n)
        }
        let mut ctx = Context::new();
        for (name, data) in [
            ("4 MiB f32 gradients, 90% zero", &sparse),
            ("4 MiB random f32 gradients in [-1, 1)", &random),
        ] {
            println!("\n{name} ({} bytes)", data.len());
            println!(
                "{:<10} {:<8} {:>9} {:>8} {:>10} {:>10}",
                "codec", "used", "bytes", "ratio", "enc GB/s", "dec GB/s"
            );
            let gbs = |secs: f64| data.len() as f64 / secs / 1e9;
            let mut out = vec![0u8; encode_room(data.len())];
            let mut dec = vec![0u8; data.len()];
            let copy = per_call(Duration::from_millis(300), || {
                dec.copy_from_slice(data);
                std::hint::black_box(&dec);
            });
            println!(
                "{:<10} {:<8} {:>9} {:>8} {:>10.2} {:>10}",
                "memcpy",
                "",
                "",
                "",
                gbs(copy),
                ""
            );
            for codec in codecs {
                let enc = encode_into(&mut ctx, codec, data, &mut out);
                let block = out[..enc.bytes_out].to_vec();
                let enc_s = per_call(Duration::from_millis(300), || {
                    std::hint::black_box(compress_into(&mut ctx, codec, data, &mut out));
                });
                let dec_s = per_call(Duration::from_millis(300), || {
                    decode_into(&mut ctx, &block, &mut dec).unwrap();
                });
                assert!(dec == *data);
                println!(
                    "{:<10} {:<8} {:>9} {:>8.2} {:>10.2} {:>10}",
                    codec.to_string(),
                    enc.codec_used.to_string(),
                    enc.bytes_out,
                    enc.ratio(),
                    gbs(enc_s),
                    if enc.compressed() {
                        format!("{:.2}", gbs(dec_s))
                    } else {
                        "(raw)".into()
                    }
                );
            }
        }
        println!("\nsmall blocks of f32, 90% zero: microseconds per call (encode / decode)");
        print!("{:<10}", "codec");
        let sizes = [256usize, 1024, 4096, 65536];
        for n in sizes {
            print!(" {:>16}", format!("{n} B"));
        }
        println!();
        for codec in codecs {
            print!("{:<10}", codec.to_string());
            for n in sizes {
                let data = &sparse[..n];
                let mut out = vec![0u8; encode_room(n)];
                let enc = encode_into(&mut ctx, codec, data, &mut out);
                let block = out[..enc.bytes_out].to_vec();
                let e = per_call(Duration::from_millis(100), || {
                    std::hint::black_box(compress_into(&mut ctx, codec, data, &mut out));
                });
                let mut dec = vec![0u8; n];
                let d = per_call(Duration::from_millis(100), || {
                    decode_into(&mut ctx, &block, &mut dec).unwrap();
                });
                let cell = format!(
                    "{:.2}/{:.2}{}",
                    e * 1e6,
                    d * 1e6,
                    if enc.compressed() { "" } else { "*" }
                );
                print!(" {cell:>16}");
            }
            println!();
        }
        println!("(* compression did not pay: the decode is of the raw form)");
    }
}
