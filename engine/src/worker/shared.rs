//! The typed buffers requests send from without copying.

use std::marker::PhantomData;
use std::sync::Arc;

use pserv_transport::{AsBytes, Payload};

/// A shared, typed buffer that requests send from without copying.
///
/// Made from a `Vec<T>` (moved in), an `Arc<Vec<T>>` (shared), or a slice (copied once).
pub struct Shared<T> {
    buf: Arc<dyn AsBytes>,
    _t: PhantomData<T>,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            buf: self.buf.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: bytemuck::Pod + Send + Sync> Shared<T> {
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        bytemuck::cast_slice(self.buf.as_bytes())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.buf.as_bytes().len() / std::mem::size_of::<T>()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn payload(&self, elems: std::ops::Range<usize>) -> Payload {
        let sz = std::mem::size_of::<T>();
        Payload::shared(self.buf.clone(), elems.start * sz..elems.end * sz)
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<Vec<T>> for Shared<T> {
    fn from(v: Vec<T>) -> Self {
        Shared {
            buf: Arc::new(v),
            _t: PhantomData,
        }
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<Arc<Vec<T>>> for Shared<T> {
    fn from(v: Arc<Vec<T>>) -> Self {
        Shared {
            buf: v,
            _t: PhantomData,
        }
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<&[T]> for Shared<T> {
    fn from(v: &[T]) -> Self {
        Shared::from(v.to_vec())
    }
}

impl<T: bytemuck::Pod + Send + Sync> From<&Vec<T>> for Shared<T> {
    fn from(v: &Vec<T>) -> Self {
        Shared::from(v.clone())
    }
}
