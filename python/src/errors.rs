//! `EngineError` to Python exceptions, and panics kept on this side of the FFI boundary.
//!
//! The exception classes live in `pserv/_errors.py` (so they can also derive from the
//! matching built-in: `pserv.TimeoutError` is a `TimeoutError`, `pserv.DisconnectedError`
//! a `ConnectionError`, ...); this module builds instances of them.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use pserv_engine::EngineError;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// An instance of `pserv._errors.<class>` with message `msg` and the attributes `attrs`,
/// as a `PyErr` (a plain `RuntimeError` should the module not import: never expected).
pub fn pserv_error(py: Python<'_>, class: &str, msg: String, attrs: &[(&str, Py<PyAny>)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let module = ERRORS.get_or_try_init(py, || {
            PyModule::import(py, "pserv._errors").map(Bound::unbind)
        })?;
        let cls = module.bind(py).getattr(class)?;
        let inst = cls.call1((msg.clone(),))?;
        for (name, value) in attrs {
            inst.setattr(*name, value.bind(py))?;
        }
        Ok(PyErr::from_value(inst))
    };
    build().unwrap_or_else(|e| {
        PyRuntimeError::new_err(format!("{msg} (and pserv._errors.{class} is missing: {e})"))
    })
}

fn int(py: Python<'_>, v: u64) -> Py<PyAny> {
    v.into_pyobject(py)
        .map(|b| b.into_any().unbind())
        .unwrap_or_else(|_| py.None())
}

fn text(py: Python<'_>, v: &str) -> Py<PyAny> {
    pyo3::types::PyString::new(py, v).into_any().unbind()
}

/// The Python exception for an engine error.
pub fn engine_error(py: Python<'_>, e: EngineError) -> PyErr {
    let msg = e.to_string();
    match &e {
        EngineError::Timeout(_) => pserv_error(py, "TimeoutError", msg, &[]),
        EngineError::Server {
            server,
            status,
            message,
        } => {
            let attrs = [
                ("server", int(py, u64::from(*server))),
                ("status", text(py, &status.to_string())),
                ("status_code", int(py, *status as u8 as u64)),
                ("server_message", text(py, message)),
            ];
            pserv_error(py, "ServerError", msg, &attrs)
        }
        EngineError::Disconnected { server } => pserv_error(
            py,
            "DisconnectedError",
            msg,
            &[("server", int(py, u64::from(*server)))],
        ),
        EngineError::Transport(_) => pserv_error(py, "TransportError", msg, &[]),
        EngineError::InvalidRequest(_) => pserv_error(py, "InvalidRequestError", msg, &[]),
        EngineError::UnknownTimestamp(ts) => pserv_error(
            py,
            "UnknownTimestampError",
            msg,
            &[("timestamp", int(py, *ts))],
        ),
        EngineError::Registration(_) => pserv_error(py, "RegistrationError", msg, &[]),
        EngineError::SchedulerGone => pserv_error(py, "SchedulerGoneError", msg, &[]),
        EngineError::Config(_) => pserv_error(py, "ConfigError", msg, &[]),
        EngineError::Io { .. } => {
            // The cause too: "starting x: No such file or directory".
            let full = match std::error::Error::source(&e) {
                Some(src) => format!("{msg}: {src}"),
                None => msg,
            };
            pserv_error(py, "IoError", full, &[])
        }
        _ => pserv_error(py, "PservError", msg, &[]),
    }
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Run `f` without the GIL (other Python threads run meanwhile); its engine error becomes
/// the matching exception, and a panic (a bug) a `pserv.PservError` instead of unwinding
/// into Python.
pub fn nogil<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> Result<T, EngineError> + Send,
{
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(engine_error(py, e)),
        Err(p) => Err(internal(py, &*p)),
    }
}

/// [`nogil`] for code that needs the GIL (and cannot fail with an engine error).
pub fn guarded<T>(py: Python<'_>, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(internal(py, &*p)),
    }
}

fn internal(py: Python<'_>, p: &(dyn std::any::Any + Send)) -> PyErr {
    pserv_error(
        py,
        "PservError",
        format!(
            "internal error in pserv (a bug, please report it): {}",
            panic_message(p)
        ),
        &[],
    )
}
