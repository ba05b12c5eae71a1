//! `pserv._pserv`: the native part of the `pserv` Python package (see `pserv/__init__.py`).

mod buffer;
mod errors;
mod pulled;
mod worker;

use numpy::{dtype, PyArrayDescr, PyArrayDescrMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// zeros(n, dtype="float32") -> numpy.ndarray
///
/// A zeroed, writable 1-D array of ``n`` elements (dtype float32, float64 or uint64)
/// whose memory pushes send without copying: the engine shares it with the request
/// instead of copying it (``pserv.is_shared`` tells). Use it for values (and keys) you
/// push repeatedly: fill it in place (``np.multiply(..., out=buf)``, ``buf[:] = ...``).
/// Do not write into it while a push of it is in flight (until ``wait`` returned).
#[pyfunction]
#[pyo3(signature = (n, dtype=None))]
fn zeros<'py>(
    py: Python<'py>,
    n: usize,
    dtype: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let d = match dtype.filter(|d| !d.is_none()) {
        Some(d) => PyArrayDescr::new(py, d)?,
        None => numpy::dtype::<f32>(py),
    };
    if d.is_equiv_to(&numpy::dtype::<f32>(py)) {
        buffer::zeros::<f32>(py, n)
    } else if d.is_equiv_to(&numpy::dtype::<f64>(py)) {
        buffer::zeros::<f64>(py, n)
    } else if d.is_equiv_to(&numpy::dtype::<u64>(py)) {
        buffer::zeros::<u64>(py, n)
    } else {
        Err(PyTypeError::new_err(format!(
            "pserv.zeros makes float32, float64 or uint64 arrays, not {d}"
        )))
    }
}

/// is_shared(array) -> bool
///
/// Whether a push sends ``array`` without copying it: an array made by ``pserv.zeros``
/// (or a view of all of it). Other arrays are copied once when the push is made.
/// _run_cli(args) -> int
///
/// Run the ``pserv`` command line (``scheduler``, ``server``, ``worker``, ``local``,
/// ``status``, ``launch``, ...) in this process with ``args`` (without the program name)
/// and return its exit status: 0 on success, 1 on failure. The package carries the whole
/// engine, so ``python -m pserv ARGS`` is the ``pserv`` executable; ``pserv local``
/// started this way starts its processes as ``$PSERV_SELF_EXE -m pserv ROLE ...``. The
/// GIL is released while it runs. Parse errors, ``--help`` and ``--version`` print and
/// exit the process, as the executable does.
#[pyfunction]
fn _run_cli(py: Python<'_>, args: Vec<String>) -> i32 {
    let argv: Vec<std::ffi::OsString> = std::iter::once("pserv".into())
        .chain(args.into_iter().map(Into::into))
        .collect();
    let code = py
        .detach(|| pserv_engine::cli::app::main(argv, vec!["-m".to_string(), "pserv".to_string()]));
    if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    }
}

#[pyfunction]
fn is_shared(array: &Bound<'_, PyAny>) -> bool {
    buffer::is_shared(array)
}

#[pymodule]
fn _pserv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let _ = dtype::<f32>; // numpy's C API is loaded on first use
    m.add_class::<worker::Worker>()?;
    m.add_class::<buffer::Buffer>()?;
    m.add_class::<pulled::PulledBuffer>()?;
    m.add_function(wrap_pyfunction!(zeros, m)?)?;
    m.add_function(wrap_pyfunction!(is_shared, m)?)?;
    m.add_function(wrap_pyfunction!(_run_cli, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Where this crate was built from: LocalCluster looks for ../target/release/pserv.
    m.add("_source_dir", env!("CARGO_MANIFEST_DIR"))?;
    Ok(())
}
