//! The element types parameter values can have (dense vectors of a Pod
//! type, f32 first).

use pserv_transport::DType;

/// An element type of parameter values: plain old data with the arithmetic that update
/// functions need. Implemented for `f32` and `f64`.
pub trait Value:
    bytemuck::Pod
    + Default
    + PartialEq
    + PartialOrd
    + Send
    + Sync
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + 'static
{
    /// The wire type tag.
    const DTYPE: DType;
    /// Convert from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Convert to f64.
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// -1, 0 or 1.
    fn signum0(self) -> Self;
    /// Neither NaN nor an infinity.
    fn is_finite(self) -> bool;
}

macro_rules! impl_value {
    ($t:ty, $d:expr) => {
        impl Value for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            fn signum0(self) -> Self {
                if self > 0.0 {
                    1.0
                } else if self < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
        }
    };
}

impl_value!(f32, DType::F32);
impl_value!(f64, DType::F64);
