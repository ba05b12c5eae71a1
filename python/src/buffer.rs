//! Arrays the engine sends from without a copy, and the checks every array passes
//! before anything is sent.
//!
//! The engine sends a request's keys and values from a `Shared<T>`, which (today) is
//! built without a copy only from a `Vec<T>` moved in or an `Arc<Vec<T>>` shared. So
//! `pserv.zeros(n, dtype)` allocates an `Arc<Vec<T>>` here and hands Python a numpy
//! array *viewing* that memory (its `base` is a [`Buffer`] holding the `Arc`). Pushing
//! such an array (all of it) shares the `Arc` with the request: no byte is copied between
//! numpy and the socket. Any other array is copied once into a new `Vec<T>`.

use std::sync::Arc;

use numpy::ndarray::ArrayViewMut1;
use numpy::{
    dtype, Element, PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use pserv_engine::worker::Shared;

/// The memory behind a `pserv.zeros` array.
pub enum BufData {
    F32(Arc<Vec<f32>>),
    F64(Arc<Vec<f64>>),
    U64(Arc<Vec<u64>>),
}

/// The owner of a zero-copy array's memory: the `base` of every array `pserv.zeros`
/// returns. Requests share its memory (the `Arc`), so it outlives the array while a push
/// of it is in flight.
#[pyclass(frozen, module = "pserv._pserv", name = "Buffer")]
pub struct Buffer {
    data: BufData,
    /// Address of the first element (what a numpy array over all of it starts at).
    addr: usize,
    len: usize,
}

#[pymethods]
impl Buffer {
    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        let t = match self.data {
            BufData::F32(_) => "float32",
            BufData::F64(_) => "float64",
            BufData::U64(_) => "uint64",
        };
        format!("<pserv.Buffer of {} {t} at {:#x}>", self.len, self.addr)
    }
}

/// An element type of arrays sent to the engine.
pub trait Elem: Element + bytemuck::Pod + Send + Sync {
    /// numpy's name of it.
    const NAME: &'static str;
    fn wrap(v: Arc<Vec<Self>>) -> BufData;
    fn unwrap(d: &BufData) -> Option<&Arc<Vec<Self>>>;
}

macro_rules! elem {
    ($t:ty, $name:literal, $var:ident) => {
        impl Elem for $t {
            const NAME: &'static str = $name;
            fn wrap(v: Arc<Vec<Self>>) -> BufData {
                BufData::$var(v)
            }
            fn unwrap(d: &BufData) -> Option<&Arc<Vec<Self>>> {
                match d {
                    BufData::$var(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
elem!(f32, "float32", F32);
elem!(f64, "float64", F64);
elem!(u64, "uint64", U64);

/// A writable numpy array of `n` zeros whose memory pushes share instead of copying.
pub fn zeros<'py, T: Elem + Default + Clone>(
    py: Python<'py>,
    n: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let mut v = vec![T::default(); n];
    // The pointer numpy writes through is taken from the vector while it is still
    // uniquely owned, so writes through it are writes through a mutable pointer.
    let ptr = v.as_mut_ptr();
    let arc = Arc::new(v);
    let buf = Bound::new(
        py,
        Buffer {
            data: T::wrap(arc),
            addr: ptr as usize,
            len: n,
        },
    )?;
    // SAFETY: `ptr` points at `n` initialised elements of a vector that is never resized
    // or freed while `buf` (made the array's base) or any request holding the `Arc`
    // lives; the view's shape and strides are those of the contiguous vector.
    let arr = unsafe {
        let view = ArrayViewMut1::from_shape_ptr(n, ptr);
        PyArray1::<T>::borrow_from_array(&view, buf.into_any())
    };
    Ok(arr.into_any())
}

/// A short description of what `obj` is, for error messages.
pub fn describe(obj: &Bound<'_, PyAny>) -> String {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        let dt = a.dtype().str().map(|s| s.to_string()).unwrap_or_default();
        format!(
            "a numpy array of dtype {dt} and shape {}",
            shape_str(a.shape())
        )
    } else {
        obj.get_type()
            .name()
            .map(|n| format!("a {n}"))
            .unwrap_or_else(|_| "an object".into())
    }
}

/// A shape as Python writes it: `(3,)`, `(2, 3)`.
pub fn shape_str(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The checks every array passes (numpy array, dtype `T`, C-contiguous, aligned);
/// `what` names it in the errors ("keys", "values", "out").
pub fn checked<'a, 'py, T: Elem>(
    obj: &'a Bound<'py, PyAny>,
    what: &str,
    hint: &str,
) -> PyResult<&'a Bound<'py, PyArrayDyn<T>>> {
    let py = obj.py();
    let Ok(untyped) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a numpy.ndarray of {}, got {}{hint}",
            T::NAME,
            describe(obj)
        )));
    };
    if !untyped.dtype().is_equiv_to(&dtype::<T>(py)) {
        return Err(PyTypeError::new_err(format!(
            "{what} must have dtype {}, got {}{hint}",
            T::NAME,
            describe(obj)
        )));
    }
    if !untyped.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous (got a strided view of shape {}; \
             numpy.ascontiguousarray makes a contiguous copy)",
            shape_str(untyped.shape())
        )));
    }
    let arr = obj
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must have dtype {}", T::NAME)))?;
    if (arr.data() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(PyValueError::new_err(format!(
            "{what} is not aligned to its {}-byte elements (numpy.ascontiguousarray or \
             .copy() makes an aligned copy)",
            std::mem::align_of::<T>()
        )));
    }
    Ok(arr)
}

/// The array's elements as a `Shared<T>`: the `Arc` of a `pserv.zeros` buffer when the
/// array is all of it (no copy), else a copy. Returns it and whether it was shared.
pub fn shared<T: Elem>(arr: &Bound<'_, PyArrayDyn<T>>) -> PyResult<(Shared<T>, bool)> {
    if let Some(arc) = zero_copy_source::<T>(arr) {
        return Ok((Shared::from(arc), true));
    }
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("cannot read the array: {e}")))?;
    let s = ro
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("cannot read the array: {e}")))?;
    Ok((Shared::from(s), false))
}

/// The `Arc` behind `arr` when `arr` is a view of all of a [`Buffer`].
fn zero_copy_source<T: Elem>(arr: &Bound<'_, PyArrayDyn<T>>) -> Option<Arc<Vec<T>>> {
    // A view of a view has the first view as its base: walk down to the Buffer.
    let mut base = arr.getattr("base").ok()?;
    for _ in 0..32 {
        if base.is_instance_of::<Buffer>() || !base.is_instance_of::<PyUntypedArray>() {
            break;
        }
        base = base.getattr("base").ok()?;
    }
    let buf = base.cast::<Buffer>().ok()?.get();
    let arc = T::unwrap(&buf.data)?;
    (buf.addr == arr.data() as usize && buf.len == arr.len() && arc.len() == buf.len)
        .then(|| arc.clone())
}

/// Whether `obj` is an array a push sends without copying (see [`zeros`]).
pub fn is_shared(obj: &Bound<'_, PyAny>) -> bool {
    fn one<T: Elem>(obj: &Bound<'_, PyAny>) -> Option<bool> {
        let arr = obj.cast::<PyArrayDyn<T>>().ok()?;
        Some(arr.is_c_contiguous() && zero_copy_source::<T>(arr).is_some())
    }
    one::<f32>(obj)
        .or_else(|| one::<f64>(obj))
        .or_else(|| one::<u64>(obj))
        .unwrap_or(false)
}
