//! Pulled values as numpy arrays.
//!
//! When the answers came in one piece (one server held every key, or the range), the
//! array is a read-only view of the buffer the answer was received into: no copy (its
//! `base` is a [`PulledBuffer`] owning the received frame). Otherwise the answers are put
//! in key order into one new array: one copy, from the receive buffers. Both kinds are
//! read-only, so code never depends on which one it got (`.copy()` for a writable one, or
//! `wait_pull(ts, out=array)` to fill an array of your own).

use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use pserv_engine::{Pulled, Value};

use crate::buffer::Elem;

/// What a zero-copy pulled array views: the received answer.
pub enum PulledData {
    F32(Pulled<f32>),
    F64(Pulled<f64>),
}

/// Owner of a zero-copy pulled array's memory (the received frame): its `base`.
#[pyclass(frozen, module = "pserv._pserv", name = "PulledBuffer")]
pub struct PulledBuffer {
    data: PulledData,
}

#[pymethods]
impl PulledBuffer {
    /// The smallest worker clock the servers had reached when they answered.
    #[getter]
    fn server_clock(&self) -> u64 {
        match &self.data {
            PulledData::F32(p) => p.server_clock(),
            PulledData::F64(p) => p.server_clock(),
        }
    }

    fn __repr__(&self) -> String {
        let n = match &self.data {
            PulledData::F32(p) => p.len(),
            PulledData::F64(p) => p.len(),
        };
        format!("<pserv.PulledBuffer of {n} values>")
    }
}

/// A cluster value type: an [`Elem`] the engine stores.
pub trait Val: Elem + Value {
    fn wrap_pulled(p: Pulled<Self>) -> PulledData;
    fn slice(d: &PulledData) -> Option<&[Self]>;
}

impl Val for f32 {
    fn wrap_pulled(p: Pulled<Self>) -> PulledData {
        PulledData::F32(p)
    }
    fn slice(d: &PulledData) -> Option<&[Self]> {
        match d {
            PulledData::F32(p) => p.as_slice(),
            PulledData::F64(_) => None,
        }
    }
}

impl Val for f64 {
    fn wrap_pulled(p: Pulled<Self>) -> PulledData {
        PulledData::F64(p)
    }
    fn slice(d: &PulledData) -> Option<&[Self]> {
        match d {
            PulledData::F64(p) => p.as_slice(),
            PulledData::F32(_) => None,
        }
    }
}

fn read_only<T: Val>(arr: &Bound<'_, PyArray1<T>>) -> PyResult<()> {
    // Clearing WRITEABLE is always allowed.
    arr.getattr("flags")?.setattr("writeable", false)
}

/// The pulled values as a read-only array (a view when they came in one piece).
pub fn to_array<'py, T: Val>(py: Python<'py>, p: Pulled<T>) -> PyResult<Bound<'py, PyAny>> {
    if !p.is_empty() && p.as_slice().is_some() {
        let holder = Bound::new(
            py,
            PulledBuffer {
                data: T::wrap_pulled(p),
            },
        )?;
        let Some(slice) = T::slice(&holder.get().data) else {
            unreachable!("checked above")
        };
        let view = ArrayView1::from(slice);
        // SAFETY: the slice lives in the frame `holder` owns; `holder` becomes the
        // array's base, so it lives as long as the array, and the frame never moves or
        // changes. The array is made read-only before Python sees it.
        let arr = unsafe { PyArray1::<T>::borrow_from_array(&view, holder.clone().into_any()) };
        read_only(&arr)?;
        return Ok(arr.into_any());
    }
    let arr = PyArray1::<T>::zeros(py, p.len(), false);
    {
        let mut rw = arr
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let out = rw
            .as_slice_mut()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        p.copy_to(out);
    }
    read_only(&arr)?;
    Ok(arr.into_any())
}

/// Copy the pulled values into `out` (checked: writable, contiguous, of their length).
pub fn copy_into<T: Val>(p: &Pulled<T>, out: &Bound<'_, numpy::PyArrayDyn<T>>) -> PyResult<()> {
    let mut rw = out
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    let slice = rw
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    if slice.len() != p.len() {
        return Err(PyValueError::new_err(format!(
            "out has {} elements, the pull returned {}",
            slice.len(),
            p.len()
        )));
    }
    p.copy_to(slice);
    Ok(())
}
