//! `pserv.Worker`: the engine's worker, with numpy arrays.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use parking_lot::Mutex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

use pserv_engine::consistency::Consistency;
use pserv_engine::proto::ValueType;
use pserv_engine::worker::{Shared, TaskOpts, WorkerConfig};
use pserv_engine::{KeyRange, Security, Worker as EngineWorker};
use pserv_transport::compress::Codec;

use crate::buffer::{checked, shape_str, shared};
use crate::errors::{engine_error, guarded, nogil, pserv_error};
use crate::pulled::{copy_into, to_array, Val};

const KEYS_HINT: &str = " (numpy.asarray(keys, dtype=numpy.uint64) converts a list)";

/// What a keyed or ranged request does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Push,
    Pull,
    PushPull,
}

/// A worker node of a pserv cluster: push and pull numpy arrays of values for keys.
///
/// ``Worker(scheduler, rank=None, timeout=60.0, key_cache=False, compress="none", *,
/// consistency=None, threads=1, pin_cores=False, spin_us=100, secret_file=None,
/// insecure=False, tls_cert=None, tls_key=None, tls_ca=None)`` registers with the
/// scheduler at ``scheduler`` ("HOST:PORT"), waits for the cluster table (every server
/// and worker of the cluster registered) and connects to every server. Connecting blocks
/// (without the GIL) until the whole cluster is there, at most ``timeout`` seconds: start
/// the workers of one process on separate threads.
///
/// Every request returns a timestamp at once; ``wait(ts)`` / ``wait_pull(ts)`` block
/// (without the GIL) until it is done, at most ``timeout`` seconds, and raise a
/// ``pserv.PservError`` subclass when it failed (a Ctrl-C that comes meanwhile is raised
/// when the wait returns). Keys are 1-D C-contiguous
/// ``numpy.uint64`` arrays, sorted and distinct; values are C-contiguous arrays of the
/// cluster's value type (``worker.dtype``), ``len(keys) * value_len`` of them (1-D, or of
/// shape ``(len(keys), value_len)``). Bad input raises ``TypeError`` / ``ValueError``
/// before anything is sent.
///
/// Zero copy: arrays made by ``pserv.zeros`` (or ``worker.zeros``) are sent straight
/// from their memory; other arrays are copied once when the request is made. Do not
/// write into an array made by ``pserv.zeros`` while a push of it is in flight (until
/// ``wait`` returned for it).
///
/// Parameters:
///     scheduler: the scheduler's address, "HOST:PORT".
///     rank: the worker rank to ask for (``None``: the scheduler picks).
///     timeout: seconds ``wait``, ``wait_pull``, ``barrier`` and connecting may block;
///         also how long a request lost with a server may wait for a resend.
///     key_cache: send repeated key lists by name once a server cached them.
///     compress: value compression of requests and answers: "none", "lz4", "zstd",
///         "zstd:LEVEL" or "zeros".
///     consistency: the default consistency model of this worker's tasks:
///         "eventual" (default), "sequential" or "bounded:TAU".
///     threads: event-loop threads of this worker's transport.
///     pin_cores: pin those threads to cores.
///     spin_us: how long a wait spins before it parks the thread.
///     secret_file: the cluster secret file (default: the one ``PSERV_SECRET_FILE``
///         names; ``LocalCluster.secret_file`` for its clusters). Without one, and
///         without ``insecure=True``, connecting raises ``ConfigError``.
///     insecure: connect without authentication (to a cluster started ``--insecure``).
///     tls_cert, tls_key, tls_ca: the TLS files of a cluster that runs TLS (all three or
///         none; see ``pserv tls-certs``); ``LocalCluster(tls_dir=...)`` passes its own.
#[pyclass(frozen, weakref, module = "pserv._pserv", name = "Worker")]
pub struct Worker {
    inner: Mutex<Option<Arc<EngineWorker>>>,
    value_type: ValueType,
    rank: u32,
    node_id: u32,
    num_workers: u32,
    num_servers: usize,
    value_len: usize,
    scheduler: String,
    /// Pulls not yet collected: timestamp -> number of values.
    pulls: Mutex<HashMap<u64, usize>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(w) = self.inner.get_mut().take() {
            // Closing the connections joins threads: not with the GIL held.
            Python::attach(|py| py.detach(move || drop(w)));
        }
    }
}

fn parse_addr(s: &str) -> PyResult<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = |why: String| {
        PyValueError::new_err(format!("scheduler must be \"HOST:PORT\", got {s:?}: {why}"))
    };
    s.to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("no address".into()))
}

fn parse_consistency(c: Option<&str>) -> PyResult<Option<Consistency>> {
    c.map(|s| {
        s.parse::<Consistency>()
            .map_err(|e| PyValueError::new_err(e.to_string()))
    })
    .transpose()
}

fn seconds(what: &str, t: f64) -> PyResult<Duration> {
    if !(t.is_finite() && t > 0.0) {
        return Err(PyValueError::new_err(format!(
            "{what} must be a positive number of seconds, got {t}"
        )));
    }
    Duration::try_from_secs_f64(t).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// A key argument (range bounds): an int in [0, 2**64 - 1].
fn key_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    obj.extract::<u64>().map_err(|_| {
        let shown = obj.repr().map(|r| r.to_string()).unwrap_or_default();
        if obj.is_instance_of::<pyo3::types::PyInt>() {
            PyValueError::new_err(format!("{what} must be in [0, 2**64 - 1], got {shown}"))
        } else {
            PyTypeError::new_err(format!("{what} must be an int, got {shown}"))
        }
    })
}

/// Task options from the keyword arguments.
fn task_opts(
    after: Option<&Bound<'_, PyAny>>,
    consistency: Option<&str>,
    func: i64,
) -> PyResult<TaskOpts> {
    let after = match after {
        None => Vec::new(),
        Some(a) if a.is_none() => Vec::new(),
        Some(a) => {
            if let Ok(ts) = a.extract::<u64>() {
                vec![ts]
            } else {
                a.extract::<Vec<u64>>().map_err(|_| {
                    PyTypeError::new_err(
                        "after must be a timestamp or a sequence of timestamps (ints >= 0)",
                    )
                })?
            }
        }
    };
    let func = u16::try_from(func).map_err(|_| {
        PyValueError::new_err(format!(
            "func must be an update function id in [0, 65535], got {func}"
        ))
    })?;
    Ok(TaskOpts {
        after,
        consistency: parse_consistency(consistency)?,
        func,
    })
}

fn type_name(v: ValueType) -> &'static str {
    match v {
        ValueType::F32 => "f32",
        ValueType::F64 => "f64",
    }
}

impl Worker {
    fn engine(&self, py: Python<'_>) -> PyResult<Arc<EngineWorker>> {
        self.inner.lock().clone().ok_or_else(|| {
            pserv_error(
                py,
                "ClosedError",
                "this worker was finished or closed".into(),
                &[],
            )
        })
    }

    /// Checked keys: sorted, distinct, below u64::MAX.
    fn keys(&self, keys: &Bound<'_, PyAny>) -> PyResult<Shared<u64>> {
        let arr = checked::<u64>(keys, "keys", KEYS_HINT)?;
        if arr.ndim() != 1 {
            return Err(PyValueError::new_err(format!(
                "keys must be 1-D, got shape {}",
                shape_str(arr.shape())
            )));
        }
        let (k, _) = shared(arr)?;
        let s = k.as_slice();
        if let Some(i) = s.windows(2).position(|w| w[0] >= w[1]) {
            return Err(PyValueError::new_err(format!(
                "keys must be sorted and distinct: keys[{i}] = {} then keys[{}] = {} \
                 (numpy.unique sorts and dedups)",
                s[i],
                i + 1,
                s[i + 1]
            )));
        }
        if s.last() == Some(&u64::MAX) {
            return Err(PyValueError::new_err(
                "key 2**64 - 1 is outside the key space (keys are in [0, 2**64 - 1))",
            ));
        }
        Ok(k)
    }

    /// Checked values for `nkeys` keys.
    fn values<T: Val>(&self, values: &Bound<'_, PyAny>, nkeys: u64) -> PyResult<Shared<T>> {
        let hint = format!(" (the cluster stores {})", type_name(self.value_type));
        let arr = checked::<T>(values, "values", &hint)?;
        let vl = self.value_len;
        let want = nkeys.checked_mul(vl as u64).ok_or_else(|| {
            PyValueError::new_err(format!("{nkeys} keys x {vl} values per key is too many"))
        })?;
        let shape = arr.shape().to_vec();
        let ok_shape = match shape.as_slice() {
            [n] => *n as u64 == want,
            [n, l] => *n as u64 == nkeys && *l == vl,
            _ => false,
        };
        if !ok_shape {
            return Err(PyValueError::new_err(format!(
                "values must hold {want} values ({nkeys} keys x {vl} values per key), as a \
                 1-D array or of shape ({nkeys}, {vl}); got shape {}",
                shape_str(&shape)
            )));
        }
        Ok(shared(arr)?.0)
    }

    fn keyed<T: Val>(
        &self,
        py: Python<'_>,
        kind: Kind,
        keys: &Bound<'_, PyAny>,
        values: Option<&Bound<'_, PyAny>>,
        opts: TaskOpts,
    ) -> PyResult<u64> {
        let w = self.engine(py)?;
        let k = self.keys(keys)?;
        let n = k.len() as u64;
        let v = values.map(|v| self.values::<T>(v, n)).transpose()?;
        let ts = nogil(py, move || {
            Ok(match (kind, v) {
                (Kind::Push, Some(v)) => w.push_opts(k, v, &opts),
                (Kind::PushPull, Some(v)) => w.push_pull_opts(k, v, &opts),
                _ => w.pull_opts::<T>(k, &opts),
            })
        })?;
        if kind != Kind::Push {
            self.pulls.lock().insert(ts, n as usize * self.value_len);
        }
        Ok(ts)
    }

    fn ranged<T: Val>(
        &self,
        py: Python<'_>,
        kind: Kind,
        (begin, end): (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
        values: Option<&Bound<'_, PyAny>>,
        opts: TaskOpts,
    ) -> PyResult<u64> {
        let w = self.engine(py)?;
        let (b, e) = (key_arg(begin, "begin")?, key_arg(end, "end")?);
        if b > e {
            return Err(PyValueError::new_err(format!(
                "the range [{b}, {e}) runs backwards (begin must be <= end)"
            )));
        }
        let range = KeyRange::new(b, e);
        let total = range
            .len()
            .checked_mul(self.value_len as u64)
            .filter(|t| usize::try_from(*t).is_ok())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "the range [{b}, {e}) x {} values per key is too large",
                    self.value_len
                ))
            })?;
        let v = values
            .map(|v| self.values::<T>(v, range.len()))
            .transpose()?;
        let ts = nogil(py, move || {
            Ok(match v {
                Some(v) => w.push_range_opts(range, v, &opts),
                None => w.pull_range_opts::<T>(range, &opts),
            })
        })?;
        if kind != Kind::Push {
            self.pulls.lock().insert(ts, total as usize);
        }
        Ok(ts)
    }

    fn wait_pull_t<'py, T: Val>(
        &self,
        py: Python<'py>,
        ts: u64,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let w = self.engine(py)?;
        let Some(expect) = self.pulls.lock().get(&ts).copied() else {
            return Err(pserv_error(
                py,
                "UnknownTimestampError",
                format!(
                    "timestamp {ts} is not a pull of this worker waiting to be collected \
                     (a push, or already collected)"
                ),
                &[],
            ));
        };
        let out_arr = match out {
            None => None,
            Some(o) if o.is_none() => None,
            Some(o) => {
                let hint = format!(" (the cluster stores {})", type_name(self.value_type));
                let a = checked::<T>(o, "out", &hint)?;
                if a.len() != expect {
                    return Err(PyValueError::new_err(format!(
                        "out has {} elements, the pull returns {expect}",
                        a.len()
                    )));
                }
                drop(
                    a.try_readwrite()
                        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?,
                );
                Some(a.clone())
            }
        };
        let result = nogil(py, move || w.wait_pull::<T>(ts));
        self.forget_pull(py, ts, &result);
        let pulled = result?;
        match out_arr {
            Some(a) => {
                copy_into(&pulled, &a)?;
                Ok(a.into_any())
            }
            None => to_array(py, pulled),
        }
    }

    /// Forget a pull once its result was taken (a timeout leaves the task to wait on again).
    fn forget_pull<T>(&self, py: Python<'_>, ts: u64, r: &PyResult<T>) {
        let timed_out = match r {
            Err(e) => pyo3::types::PyAnyMethods::is_instance(
                e.value(py).as_any(),
                &py.get_type::<pyo3::exceptions::PyTimeoutError>(),
            )
            .unwrap_or(false),
            Ok(_) => false,
        };
        if !timed_out {
            self.pulls.lock().remove(&ts);
        }
    }
}

macro_rules! by_type {
    ($self:ident, $t:ident => $body:expr) => {
        match $self.value_type {
            ValueType::F32 => {
                type $t = f32;
                $body
            }
            ValueType::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}

#[pymethods]
impl Worker {
    #[new]
    #[pyo3(signature = (scheduler, rank=None, timeout=60.0, key_cache=false, compress="none", *,
                        consistency=None, threads=1, pin_cores=false, spin_us=100,
                        secret_file=None, insecure=false, tls_cert=None, tls_key=None,
                        tls_ca=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        scheduler: &str,
        rank: Option<u32>,
        timeout: f64,
        key_cache: bool,
        compress: &str,
        consistency: Option<&str>,
        threads: usize,
        pin_cores: bool,
        spin_us: u64,
        secret_file: Option<std::path::PathBuf>,
        insecure: bool,
        tls_cert: Option<std::path::PathBuf>,
        tls_key: Option<std::path::PathBuf>,
        tls_ca: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        guarded(py, || {
            let addr = parse_addr(scheduler)?;
            let timeout = seconds("timeout", timeout)?;
            let codec = compress
                .parse::<Codec>()
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            if threads == 0 {
                return Err(PyValueError::new_err("threads must be at least 1"));
            }
            let mut cfg = WorkerConfig::new(addr);
            cfg.security = match (secret_file, insecure) {
                (Some(_), true) => {
                    return Err(PyValueError::new_err(
                        "secret_file and insecure=True exclude each other",
                    ))
                }
                (Some(p), false) => Security::from_file(&p).map_err(|e| engine_error(py, e))?,
                (None, true) => Security::Insecure,
                (None, false) => Security::FromEnv,
            };
            cfg.tcp.tls = match (tls_cert, tls_key, tls_ca) {
                (None, None, None) => None,
                (Some(c), Some(k), Some(a)) => Some(
                    pserv_transport::TlsConfig::from_pem_files(&c, &k, &a)
                        .map_err(|e| pserv_error(py, "ConfigError", e.to_string(), &[]))?,
                ),
                _ => {
                    return Err(PyValueError::new_err(
                        "TLS needs all three of tls_cert, tls_key and tls_ca, or none",
                    ))
                }
            };
            cfg.rank = rank;
            cfg.timeout = timeout;
            cfg.register_timeout = timeout;
            cfg.key_cache = key_cache;
            cfg.compress = codec;
            cfg.spin_us = spin_us;
            cfg.tcp.threads = threads;
            cfg.tcp.pin_cores = pin_cores;
            if let Some(c) = parse_consistency(consistency)? {
                cfg.consistency = c;
            }
            Ok(()).and_then(|()| {
                let w = nogil(py, move || EngineWorker::connect(cfg))?;
                let cluster = w.cluster();
                Ok(Worker {
                    value_type: cluster.value_type,
                    rank: w.rank(),
                    node_id: w.node_id(),
                    num_workers: w.num_workers(),
                    num_servers: cluster.servers.len(),
                    value_len: w.value_len(),
                    scheduler: scheduler.to_owned(),
                    inner: Mutex::new(Some(Arc::new(w))),
                    pulls: Mutex::new(HashMap::new()),
                })
            })
        })
    }

    /// This worker's rank among the workers (0 .. num_workers - 1).
    #[getter]
    fn rank(&self) -> u32 {
        self.rank
    }

    /// This worker's node id in the cluster.
    #[getter]
    fn node_id(&self) -> u32 {
        self.node_id
    }

    /// Number of workers in the cluster.
    #[getter]
    fn num_workers(&self) -> u32 {
        self.num_workers
    }

    /// Number of servers when this worker connected.
    #[getter]
    fn num_servers(&self) -> usize {
        self.num_servers
    }

    /// Values per key.
    #[getter]
    fn value_len(&self) -> usize {
        self.value_len
    }

    /// The cluster's value type: "f32" or "f64".
    #[getter]
    fn value_type(&self) -> &'static str {
        type_name(self.value_type)
    }

    /// The numpy dtype of the cluster's values (float32 or float64).
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArrayDescr> {
        by_type!(self, T => numpy::dtype::<T>(py))
    }

    /// The scheduler address this worker connected to.
    #[getter]
    fn scheduler(&self) -> &str {
        &self.scheduler
    }

    /// Whether ``finish`` or ``close`` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().is_none()
    }

    /// This worker's consistency clock (0: never ticked; see ``tick``).
    #[getter]
    fn clock(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.engine(py)?.clock())
    }

    /// Advance this worker's consistency clock by one and return it. Once a worker
    /// ticks, its pushes carry its clock and its pulls wait on the servers until every
    /// worker's clock is within the task's bounded delay (tau) of it. Push once per tick.
    fn tick(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.engine(py)?.tick())
    }

    /// Bytes this worker wrote to and read from its sockets so far: ``(sent, received)``.
    fn traffic(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        Ok(self.engine(py)?.traffic())
    }

    /// A zeroed, writable 1-D array of ``n`` values of the cluster's dtype that pushes
    /// send without copying (``pserv.zeros(n, worker.dtype)``).
    fn zeros<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyAny>> {
        by_type!(self, T => crate::buffer::zeros::<T>(py, n))
    }

    /// push(keys, values, *, after=None, consistency=None, func=0) -> int
    ///
    /// Push ``values`` for the sorted, distinct ``keys`` (a 1-D ``numpy.uint64`` array);
    /// the servers apply their update function (``func``: an id, 0 for the cluster's
    /// default, e.g. sum). ``values``: ``len(keys) * value_len`` values of the cluster's
    /// dtype (1-D, or shape ``(len(keys), value_len)``). Returns a timestamp at once;
    /// ``wait(ts)`` blocks until the servers applied it.
    ///
    /// ``after``: timestamps (or one) of this worker's tasks that must finish before this
    /// one starts. ``consistency``: this task's model ("sequential", "eventual",
    /// "bounded:TAU"; default: the worker's).
    ///
    /// Raises TypeError (not a numpy array, wrong dtype) or ValueError (not contiguous,
    /// unsorted or repeated keys, wrong number of values) before anything is sent.
    /// Arrays made by ``pserv.zeros`` are sent without a copy: do not change them until
    /// ``wait`` returned for this push.
    #[pyo3(signature = (keys, values, *, after=None, consistency=None, func=0))]
    fn push(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        after: Option<&Bound<'_, PyAny>>,
        consistency: Option<&str>,
        func: i64,
    ) -> PyResult<u64> {
        guarded(py, || {
            let opts = task_opts(after, consistency, func)?;
            by_type!(self, T => self.keyed::<T>(py, Kind::Push, keys, Some(values), opts))
        })
    }

    /// pull(keys, *, dtype=None, after=None, consistency=None, func=0) -> int
    ///
    /// Pull the values of the sorted, distinct ``keys`` (a 1-D ``numpy.uint64`` array).
    /// Returns a timestamp at once; ``wait_pull(ts)`` returns the values
    /// (``len(keys) * value_len`` of them, in key order). Keys never pushed read as 0.
    ///
    /// ``dtype``: if given, must be the cluster's (a TypeError otherwise): a check, not a
    /// conversion. ``func``: the answer filter the servers apply (0: none).
    /// ``after``, ``consistency``: as for ``push``.
    #[pyo3(signature = (keys, *, dtype=None, after=None, consistency=None, func=0))]
    fn pull(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        after: Option<&Bound<'_, PyAny>>,
        consistency: Option<&str>,
        func: i64,
    ) -> PyResult<u64> {
        guarded(py, || {
            self.check_dtype(py, dtype)?;
            let opts = task_opts(after, consistency, func)?;
            by_type!(self, T => self.keyed::<T>(py, Kind::Pull, keys, None, opts))
        })
    }

    /// push_pull(keys, values, *, after=None, consistency=None, func=0) -> int
    ///
    /// Push ``values`` for ``keys``, then pull the updated values of the same keys, in one
    /// round trip per server. Collect them with ``wait_pull(ts)``. Arguments as for
    /// ``push``.
    #[pyo3(signature = (keys, values, *, after=None, consistency=None, func=0))]
    fn push_pull(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        after: Option<&Bound<'_, PyAny>>,
        consistency: Option<&str>,
        func: i64,
    ) -> PyResult<u64> {
        guarded(py, || {
            let opts = task_opts(after, consistency, func)?;
            by_type!(self, T => self.keyed::<T>(py, Kind::PushPull, keys, Some(values), opts))
        })
    }

    /// push_range(begin, end, values, *, after=None, consistency=None, func=0) -> int
    ///
    /// Push dense values for every key of ``[begin, end)``: ``(end - begin) * value_len``
    /// values in key order (1-D, or shape ``(end - begin, value_len)``). Returns a
    /// timestamp at once. Other arguments as for ``push``.
    #[pyo3(signature = (begin, end, values, *, after=None, consistency=None, func=0))]
    #[allow(clippy::too_many_arguments)]
    fn push_range(
        &self,
        py: Python<'_>,
        begin: &Bound<'_, PyAny>,
        end: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
        after: Option<&Bound<'_, PyAny>>,
        consistency: Option<&str>,
        func: i64,
    ) -> PyResult<u64> {
        guarded(py, || {
            let opts = task_opts(after, consistency, func)?;
            by_type!(self, T => self.ranged::<T>(py, Kind::Push, (begin, end), Some(values), opts))
        })
    }

    /// pull_range(begin, end, *, dtype=None, after=None, consistency=None, func=0) -> int
    ///
    /// Pull the dense values of every key of ``[begin, end)``; ``wait_pull(ts)`` returns
    /// ``(end - begin) * value_len`` values in key order. Other arguments as for ``pull``.
    #[pyo3(signature = (begin, end, *, dtype=None, after=None, consistency=None, func=0))]
    #[allow(clippy::too_many_arguments)]
    fn pull_range(
        &self,
        py: Python<'_>,
        begin: &Bound<'_, PyAny>,
        end: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        after: Option<&Bound<'_, PyAny>>,
        consistency: Option<&str>,
        func: i64,
    ) -> PyResult<u64> {
        guarded(py, || {
            self.check_dtype(py, dtype)?;
            let opts = task_opts(after, consistency, func)?;
            by_type!(self, T => self.ranged::<T>(py, Kind::Pull, (begin, end), None, opts))
        })
    }

    /// wait(ts) -> None
    ///
    /// Block (without the GIL, at most ``timeout`` seconds) until task ``ts`` is done.
    /// Raises the task's error: ``pserv.ServerError`` (a server refused it, ``.status``),
    /// ``pserv.DisconnectedError``, ``pserv.TimeoutError`` (no answer in time; the task
    /// can be waited on again), ... The values of a pull waited on this way are dropped.
    /// A Ctrl-C (KeyboardInterrupt) that comes during the wait is raised when it returns.
    fn wait(&self, py: Python<'_>, ts: u64) -> PyResult<()> {
        let w = self.engine(py)?;
        let r = nogil(py, move || w.wait(ts));
        self.forget_pull(py, ts, &r);
        r
    }

    /// wait_pull(ts, out=None) -> numpy.ndarray
    ///
    /// Block until pull (or push_pull) ``ts`` is done and return its values in key order:
    /// a read-only 1-D array of the cluster's dtype. When one server answered for all the
    /// keys the array views the received buffer (no copy); otherwise the answers are
    /// copied once into it. With ``out`` (a writable, C-contiguous array of the right
    /// dtype and size), the values are copied into ``out``, which is returned.
    /// Errors as for ``wait``.
    #[pyo3(signature = (ts, out=None))]
    fn wait_pull<'py>(
        &self,
        py: Python<'py>,
        ts: u64,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guarded(
            py,
            || by_type!(self, T => self.wait_pull_t::<T>(py, ts, out)),
        )
    }

    /// barrier() -> None
    ///
    /// Block (without the GIL, at most ``timeout`` seconds) until every worker of the
    /// cluster has called ``barrier`` as often as this one.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        let w = self.engine(py)?;
        nogil(py, move || w.barrier())
    }

    /// finish(examples=0) -> None
    ///
    /// Report to the scheduler that this worker is done (``examples``: how many examples
    /// it processed, for the job summary) and disconnect. The scheduler ends the job when
    /// every worker finished. The worker cannot be used afterwards.
    #[pyo3(signature = (examples=0))]
    fn finish(&self, py: Python<'_>, examples: u64) -> PyResult<()> {
        let Some(w) = self.inner.lock().take() else {
            return Err(pserv_error(
                py,
                "ClosedError",
                "this worker was already finished or closed".into(),
                &[],
            ));
        };
        match Arc::try_unwrap(w) {
            Ok(w) => nogil(py, move || w.finish(examples)),
            Err(w) => {
                *self.inner.lock() = Some(w);
                Err(pserv_error(
                    py,
                    "PservError",
                    "finish: another thread is using this worker (in wait, barrier, ...)".into(),
                    &[],
                ))
            }
        }
    }

    /// close() -> None
    ///
    /// Disconnect without reporting to the scheduler (the job then does not end on its
    /// own: see ``finish``). Does nothing if already closed.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(w) = self.inner.lock().take() {
            nogil(py, move || {
                drop(w);
                Ok(())
            })?;
        }
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Leaving a ``with`` block: ``finish()`` when it ended normally, ``close()`` on an
    /// exception.
    #[pyo3(signature = (exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyType>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        if self.inner.lock().is_some() {
            if exc_type.is_none() {
                self.finish(py, 0)?;
            } else {
                self.close(py)?;
            }
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<pserv.Worker rank={} of {} workers, {} servers, {} x {}, scheduler {}{}>",
            self.rank,
            self.num_workers,
            self.num_servers,
            self.value_len,
            type_name(self.value_type),
            self.scheduler,
            if self.inner.lock().is_none() {
                ", closed"
            } else {
                ""
            }
        )
    }
}

impl Worker {
    fn check_dtype(&self, py: Python<'_>, dtype: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let Some(d) = dtype.filter(|d| !d.is_none()) else {
            return Ok(());
        };
        let want = by_type!(self, T => numpy::dtype::<T>(py));
        let got = numpy::PyArrayDescr::new(py, d)
            .map_err(|e| PyTypeError::new_err(format!("dtype: {e}")))?;
        use numpy::PyArrayDescrMethods;
        if !got.is_equiv_to(&want) {
            return Err(PyTypeError::new_err(format!(
                "dtype {got} asked for, but the cluster stores {} ({want}): pulls return the \
                 cluster's type",
                type_name(self.value_type)
            )));
        }
        Ok(())
    }
}
