//! Small deterministic primitives for data generation: a 64-bit mixer, a SplitMix64
//! generator and an `exp` built from IEEE-754 basic operations only.
//!
//! Everything here uses only integer arithmetic and correctly rounded float operations
//! (`+ - * /`, `sqrt`, `round`, bit casts), never the platform's libm, so the same seed
//! gives bit-identical data on every machine and with every version of the `rand` crate.

use crate::base::keys::{Key, KEY_END};

/// The golden-ratio increment of SplitMix64.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// A bijective 64-bit mixer (the SplitMix64 / Stafford "variant 13" finaliser): every
/// output bit depends on every input bit, so consecutive inputs land all over the space.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The parameter key of feature id `id`: the id hashed with [`mix64`] (after adding the
/// SplitMix64 increment, so that id 0 does not map to key 0). Keys spread over the whole
/// `u64` space; the one id that would hash to the invalid key `u64::MAX` is mapped to
/// `u64::MAX - 1` instead, so the result is always a valid [`Key`].
#[inline]
pub fn feature_key(id: u64) -> Key {
    let key = mix64(id.wrapping_add(GOLDEN_GAMMA));
    if key == KEY_END {
        KEY_END - 1
    } else {
        key
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, fast generator with a 64-bit state that
/// passes BigCrush; plenty for synthetic data.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// A uniform `f64` in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `[0, n)` (Lemire's multiply-shift; the bias is below 2^-32
    /// for the `n` used here). Returns 0 when `n == 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// An approximately standard normal number derived from the 64 bits of `bits`: the sum of
/// four uniform 16-bit parts (Irwin-Hall), centred and scaled to unit variance. Values lie
/// in `[-2*sqrt(3), 2*sqrt(3)]`.
#[inline]
pub fn approx_normal(bits: u64) -> f64 {
    let sum = (bits & 0xFFFF) + ((bits >> 16) & 0xFFFF) + ((bits >> 32) & 0xFFFF) + (bits >> 48);
    // Each part is uniform on [0, 65535]: mean 32767.5, variance (65536^2 - 1) / 12.
    const SD_OF_SUM: f64 = 37_837.226_816_857_09; // sqrt(4 * (65536^2 - 1) / 12)
    (sum as f64 - 4.0 * 32_767.5) / SD_OF_SUM
}

/// `e^x` from basic IEEE operations only (range reduction by `ln 2`, a degree-13 Taylor
/// polynomial, an exact power-of-two scale), so its result is the same on every platform.
/// Relative error below 1e-15 on `[-708, 709]`; 0 below, infinity above.
pub fn det_exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < -708.0 {
        return 0.0;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    // ln 2 split in two (fdlibm's ln2_hi and ln2_lo), so that k * LN_2_HI is exact.
    let ln_2_hi = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    let ln_2_lo = f64::from_bits(0x3DEA_39EF_3579_3C76);
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * ln_2_hi) - k * ln_2_lo;
    let mut p = 1.0;
    for i in (1..=13).rev() {
        p = 1.0 + p * r / f64::from(i);
    }
    // 2^k, with k in [-1022, 1023] here, as an exact double.
    let k = k as i64;
    let (scale, k) = if k < -1000 {
        (f64::from_bits(((-1000 + 1023) as u64) << 52), k + 1000)
    } else {
        (1.0, k)
    };
    p * f64::from_bits(((k + 1023) as u64) << 52) * scale
}

/// The logistic function `1 / (1 + e^-x)` computed with [`det_exp`].
pub fn det_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + det_exp(-x))
    } else {
        let e = det_exp(x);
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn det_exp_matches_libm() {
        let mut x = -700.0;
        while x < 700.0 {
            let (a, b) = (det_exp(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-14, "exp({x}): {a} vs {b}");
            x += 0.37;
        }
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(det_exp(-1000.0), 0.0);
        assert!(det_exp(1000.0).is_infinite());
        assert!((det_sigmoid(0.0) - 0.5).abs() < 1e-16);
        assert!(det_sigmoid(-800.0) == 0.0 && det_sigmoid(800.0) == 1.0);
    }

    #[test]
    fn generator_is_pinned() {
        // SplitMix64 reference values for seed 1234567 (from the published C code).
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(rng.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn keys_are_valid_and_spread() {
        assert_ne!(feature_key(0), 0);
        let mut top_bits = [0u32; 16];
        for id in 0..16_000u64 {
            let key = feature_key(id);
            assert!(key < KEY_END);
            top_bits[(key >> 60) as usize] += 1;
        }
        // Each sixteenth of the key space gets about 1000 of the 16000 keys.
        assert!(
            top_bits.iter().all(|&n| (850..1150).contains(&n)),
            "{top_bits:?}"
        );
    }

    #[test]
    fn approx_normal_moments() {
        let mut rng = SplitMix64::new(7);
        let n = 200_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let z = approx_normal(rng.next_u64());
            s += z;
            s2 += z * z;
        }
        let mean = s / f64::from(n);
        let var = s2 / f64::from(n) - mean * mean;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
