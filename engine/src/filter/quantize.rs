//! The quantising filter: values sent on a grid of `2^(bits-1) - 1` steps per sign with
//! one scale per push, the rounding error kept per key (error feedback).

use super::residuals::Residuals;
use super::{Entries, Filter, FilterStats};
use crate::base::value::Value;

/// Quantises each push to `bits` bits per value (sign included) with one scale per push
/// (its largest magnitude over `2^(bits-1) - 1`), round to nearest. What rounding took
/// off is kept per key and added to its next push (error feedback), so what was sent
/// plus what is held equals what was pushed. An entry whose values all round to 0 is
/// not sent at all (held whole). The values sent are few distinct numbers, which value
/// compression (`--compress zstd`) shrinks; the wire carries them as floats.
pub struct Quantize<T: Value> {
    bits: u32,
    residual: Residuals<T>,
    stats: FilterStats,
}

impl<T: Value> Quantize<T> {
    /// A filter of `bits` bits per value.
    ///
    /// # Panics
    /// Unless `2 <= bits <= 16`.
    pub fn new(bits: u32) -> Self {
        assert!((2..=16).contains(&bits), "quantize: bits in 2..=16");
        Quantize {
            bits,
            residual: Residuals::new(),
            stats: FilterStats::default(),
        }
    }

    /// The residual held back for `key`, if any.
    pub fn residual(&self, key: u64) -> Option<&[T]> {
        self.residual.get(key)
    }

    /// The grid's steps per sign.
    fn levels(&self) -> f64 {
        f64::from((1u32 << (self.bits - 1)) - 1)
    }
}

impl<T: Value> Filter<T> for Quantize<T> {
    fn name(&self) -> &str {
        "quantize"
    }

    fn push(&mut self, entries: Entries<T>) -> Entries<T> {
        let value_len = entries.value_len;
        // What each key would send: its push plus what it holds.
        let mut want: Vec<T> = entries.values.clone();
        for (i, k) in entries.keys.iter().enumerate() {
            if let Some(r) = self.residual.get(*k) {
                for (a, b) in want[i * value_len..(i + 1) * value_len].iter_mut().zip(r) {
                    *a += *b;
                }
            }
        }
        let top = want.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max);
        let scale = if top > 0.0 && top.is_finite() {
            top / self.levels()
        } else {
            0.0
        };
        let mut out = Entries::empty(value_len);
        let mut scratch: Vec<T> = Vec::with_capacity(value_len);
        for (i, &k) in entries.keys.iter().enumerate() {
            self.stats.offered += 1;
            let x = &want[i * value_len..(i + 1) * value_len];
            scratch.clear();
            let mut any = false;
            for &v in x {
                let q = if scale > 0.0 {
                    (v.to_f64() / scale).round()
                } else {
                    0.0
                };
                any |= q != 0.0;
                scratch.push(T::from_f64(q * scale));
            }
            // The old residual is in `x` now.
            let mut old = Vec::new();
            self.residual.take_into(k, &mut old);
            if any {
                out.keys.push(k);
                out.values.extend_from_slice(&scratch);
                self.stats.sent += 1;
                let rest: Vec<T> = x.iter().zip(&scratch).map(|(&a, &s)| a - s).collect();
                if rest.iter().any(|r| *r != T::default()) {
                    self.residual.insert(k, &rest);
                }
            } else {
                self.residual.insert(k, x);
            }
        }
        out
    }

    fn drain(&mut self, value_len: usize) -> Entries<T> {
        Entries::from_map(self.residual.drain(value_len), value_len)
    }

    fn stats(&self) -> FilterStats {
        self.stats
    }
}
