"""pserv: a parameter server (Li et al., OSDI 2014) in Rust, from Python.

- :class:`Worker`: connect to a cluster and push/pull numpy arrays of values by sorted
  ``uint64`` keys or dense key ranges; every request returns a timestamp at once,
  ``wait`` / ``wait_pull`` block (without the GIL).
- :class:`LocalCluster`: start a scheduler and servers on this machine.
- :func:`zeros`: arrays that pushes send without copying.
- Errors: :class:`PservError` and its subclasses (``pserv.TimeoutError``,
  ``pserv.ServerError``, ``pserv.DisconnectedError``, ...).

Example::

    import numpy as np, pserv

    with pserv.LocalCluster(servers=2, workers=1) as cluster:
        w = cluster.worker(0)
        keys = np.array([1, 5, 9], dtype=np.uint64)
        w.wait(w.push(keys, np.ones(3, dtype=np.float32)))
        print(w.wait_pull(w.pull(keys)))     # [1. 1. 1.]
        w.finish()
"""

from ._errors import (
    BinaryNotFoundError,
    ClosedError,
    ClusterError,
    ConfigError,
    DisconnectedError,
    InvalidRequestError,
    IoError,
    PservError,
    RegistrationError,
    SchedulerGoneError,
    ServerError,
    TimeoutError,
    TransportError,
    UnknownTimestampError,
)
from ._pserv import Buffer, PulledBuffer, Worker, __version__, is_shared, zeros
from ._cluster import LocalCluster, find_pserv_binary, pserv_command

__all__ = [
    "Worker",
    "LocalCluster",
    "find_pserv_binary",
    "pserv_command",
    "zeros",
    "is_shared",
    "Buffer",
    "PulledBuffer",
    "PservError",
    "TimeoutError",
    "ServerError",
    "DisconnectedError",
    "TransportError",
    "SchedulerGoneError",
    "RegistrationError",
    "InvalidRequestError",
    "UnknownTimestampError",
    "ConfigError",
    "IoError",
    "ClosedError",
    "ClusterError",
    "BinaryNotFoundError",
    "__version__",
]
