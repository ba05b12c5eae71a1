//! Answer filters: what a server sends of a pull's answer.
//!
//! A pull names an answer filter by id in its update-function field
//! ([`TaskOpts::func`](crate::worker::TaskOpts::func) on a pull; 0: none). The server
//! runs it on the answer's values, in the answer buffer, after reading them from the
//! store and before sending; the worker receives ordinary values. Such filters hold no
//! per-worker state, so they run on every server, replicas and new heads alike, and
//! need no memory of what a worker saw before. They pay where the values they produce
//! are cheaper to send: with value compression (`--compress`), zeros and short
//! mantissas shrink. Push-side filters (the rest of this module) are the worker's.
//!
//! Ids: [`ANSWER_BF16`] and [`ANSWER_ZERO_SMALL`] are built in; filters a server adds
//! ([`AnswerFilters::add`], through
//! [`ServerConfig::answer_filters`](crate::server::ServerConfig::answer_filters)) get
//! [`ANSWER_FIRST_USER`], `+ 1`, ... in the order added. Every server of a cluster
//! must add the same filters in the same order.

use std::sync::Arc;

use crate::base::keys::{Key, KeyRange};
use crate::base::value::Value;

/// No filter: the values as stored.
pub const ANSWER_NONE: u16 = 0;
/// Round every value to bfloat16 precision (8 significant bits, round to nearest
/// even): the low 16 bits of each f32 become zero. Relative error at most 2^-9.
pub const ANSWER_BF16: u16 = 1;
/// Answer values whose magnitude is below [`ZERO_SMALL_BELOW`] as 0 (weights an L1
/// model keeps near, but not at, zero).
pub const ANSWER_ZERO_SMALL: u16 = 2;
/// The first id of filters a server adds.
pub const ANSWER_FIRST_USER: u16 = 16;
/// The magnitude below which [`ANSWER_ZERO_SMALL`] answers 0.
pub const ZERO_SMALL_BELOW: f64 = 1e-6;

/// The keys of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerKeys<'a> {
    /// A sorted key list.
    List(&'a [Key]),
    /// Every key of a dense range.
    Range(KeyRange),
}

/// A filter a server runs on the values of a pull's answer before sending them.
///
/// ```
/// use pserv_engine::filter::{AnswerFilter, AnswerKeys};
///
/// /// Answers only the sign of each weight.
/// struct Sign;
/// impl AnswerFilter<f32> for Sign {
///     fn name(&self) -> &str {
///         "sign"
///     }
///     fn apply(&self, _keys: AnswerKeys<'_>, _value_len: usize, values: &mut [f32]) {
///         for v in values {
///             *v = if *v > 0.0 { 1.0 } else if *v < 0.0 { -1.0 } else { 0.0 };
///         }
///     }
/// }
/// let mut v = [0.5f32, -2.0, 0.0];
/// Sign.apply(AnswerKeys::List(&[1, 2, 3]), 1, &mut v);
/// assert_eq!(v, [1.0, -1.0, 0.0]);
/// ```
pub trait AnswerFilter<T: Value>: Send + Sync {
    /// A name for logs and errors.
    fn name(&self) -> &str;
    /// Change `values` (`value_len` per key of `keys`, key by key) in place.
    fn apply(&self, keys: AnswerKeys<'_>, value_len: usize, values: &mut [T]);
}

/// [`ANSWER_BF16`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Bf16Round;

/// `x` rounded to bfloat16 precision (NaN stays NaN; values beyond bfloat16's range
/// round to infinity, as a conversion to bfloat16 would).
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

impl<T: Value> AnswerFilter<T> for Bf16Round {
    fn name(&self) -> &str {
        "bf16"
    }

    fn apply(&self, _keys: AnswerKeys<'_>, _value_len: usize, values: &mut [T]) {
        for v in values {
            *v = T::from_f64(f64::from(round_bf16(v.to_f64() as f32)));
        }
    }
}

/// Values whose magnitude is below a threshold answered as 0 ([`ANSWER_ZERO_SMALL`]
/// with [`ZERO_SMALL_BELOW`]; other thresholds as a filter a server adds).
#[derive(Clone, Copy, Debug)]
pub struct ZeroBelow(pub f64);

impl<T: Value> AnswerFilter<T> for ZeroBelow {
    fn name(&self) -> &str {
        "zero-small"
    }

    fn apply(&self, _keys: AnswerKeys<'_>, _value_len: usize, values: &mut [T]) {
        for v in values {
            if v.to_f64().abs() < self.0 {
                *v = T::default();
            }
        }
    }
}

/// A server's answer filters by id: the built-ins and those it added.
pub struct AnswerFilters<T: Value> {
    user: Vec<Arc<dyn AnswerFilter<T>>>,
}

impl<T: Value> Clone for AnswerFilters<T> {
    fn clone(&self) -> Self {
        AnswerFilters {
            user: self.user.clone(),
        }
    }
}

impl<T: Value> Default for AnswerFilters<T> {
    fn default() -> Self {
        AnswerFilters { user: Vec::new() }
    }
}

impl<T: Value> std::fmt::Debug for AnswerFilters<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.user.iter().map(|a| a.name()).collect();
        f.debug_struct("AnswerFilters")
            .field("user", &names)
            .finish()
    }
}

impl<T: Value> AnswerFilters<T> {
    /// Add `filter`; returns its id.
    ///
    /// # Panics
    /// When every u16 id is taken.
    pub fn add(&mut self, filter: Arc<dyn AnswerFilter<T>>) -> u16 {
        self.user.push(filter);
        u16::try_from(self.user.len() - 1)
            .ok()
            .and_then(|i| ANSWER_FIRST_USER.checked_add(i))
            .expect("all u16 answer filter ids are taken")
    }

    /// Run filter `id` on `values`; `Err` names an id no filter has. Id 0 changes
    /// nothing.
    pub fn apply(
        &self,
        id: u16,
        keys: AnswerKeys<'_>,
        value_len: usize,
        values: &mut [T],
    ) -> Result<(), String> {
        match id {
            ANSWER_NONE => {}
            ANSWER_BF16 => Bf16Round.apply(keys, value_len, values),
            ANSWER_ZERO_SMALL => ZeroBelow(ZERO_SMALL_BELOW).apply(keys, value_len, values),
            _ => {
                let f = id
                    .checked_sub(ANSWER_FIRST_USER)
                    .and_then(|i| self.user.get(usize::from(i)))
                    .ok_or_else(|| {
                        format!(
                            "no answer filter with id {id} (built in: {ANSWER_BF16} bf16, \
                             {ANSWER_ZERO_SMALL} zero-small; this server added {})",
                            self.user.len()
                        )
                    })?;
                f.apply(keys, value_len, values);
            }
        }
        Ok(())
    }
}

/// The answer filters a server adds, per value type (the cluster's type decides which
/// set serves).
#[derive(Clone, Debug, Default)]
pub struct AnswerFilterSet {
    /// For clusters of `f32` values.
    pub f32: AnswerFilters<f32>,
    /// For clusters of `f64` values.
    pub f64: AnswerFilters<f64>,
}
