//! Helpers shared by the fuzz targets in `fuzz_targets/` (one per decoder of untrusted
//! bytes; see ARCHITECTURE.md "fuzz/").

/// The frame bound the targets decode under: small enough that a hostile length cannot
/// make a target allocate much, large enough for every seed.
pub const MAX_FRAME: usize = 1 << 20;

/// `bytes` copied into an 8-byte aligned buffer, as every receiver holds frames (the
/// wire decoder refuses a misaligned buffer, which would hide the rest of its checks).
pub struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    /// Copy `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Aligned {
            words,
            len: bytes.len(),
        }
    }

    /// The copied bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

/// `data` as the values of a `Control` frame, checked as a receiver checks it and decoded
/// with `Control::from_frame` (what every handler calls); `None` where either refuses.
pub fn control_from_values(data: &[u8]) -> Option<pserv_engine::proto::Control> {
    use pserv_transport::wire::{self, DType, Frame, Header, MessageKind};
    let mut h = Header::new(MessageKind::Control, 3, 0);
    h.dtype = DType::Bytes as u8;
    let buf = Aligned::new(&wire::encode(&h, &[], data));
    let (frame, _) = Frame::new_checked(buf.bytes(), MAX_FRAME).ok()?;
    pserv_engine::proto::Control::from_frame(&frame).ok()
}
