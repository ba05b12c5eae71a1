"""Type stubs of the native module pserv._pserv (see the docstrings in the module)."""

from __future__ import annotations

from types import TracebackType
from typing import List, Optional, Sequence, Tuple, Type, Union, final

import numpy as np
import numpy.typing as npt

__all__ = ["Worker", "Buffer", "PulledBuffer", "zeros", "is_shared", "__version__", "_source_dir"]
__version__: str
_source_dir: str

_Timestamps = Union[int, Sequence[int], None]
_DType = Union[npt.DTypeLike, None]

@final
class Buffer:
    """The owner of a ``pserv.zeros`` array's memory (that array's ``base``)."""

    def __len__(self) -> int: ...

@final
class PulledBuffer:
    """The owner of a zero-copy pulled array's memory (the received answer)."""

    @property
    def server_clock(self) -> int: ...

def zeros(n: int, dtype: _DType = None) -> npt.NDArray[np.generic]:
    """A zeroed, writable 1-D array (float32, float64 or uint64) that pushes send
    without copying."""

def is_shared(array: object) -> bool:
    """Whether a push sends ``array`` without copying it."""

def _run_cli(args: List[str]) -> int:
    """Run the ``pserv`` command line in this process (``python -m pserv``); returns
    its exit status (0 or 1)."""

@final
class Worker:
    """A worker node of a pserv cluster: push and pull numpy arrays of values for keys."""

    def __new__(
        cls,
        scheduler: str,
        rank: Optional[int] = None,
        timeout: float = 60.0,
        key_cache: bool = False,
        compress: str = "none",
        *,
        consistency: Optional[str] = None,
        threads: int = 1,
        pin_cores: bool = False,
        spin_us: int = 100,
        secret_file: Optional[str] = None,
        insecure: bool = False,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_ca: Optional[str] = None,
    ) -> Worker: ...
    @property
    def rank(self) -> int: ...
    @property
    def node_id(self) -> int: ...
    @property
    def num_workers(self) -> int: ...
    @property
    def num_servers(self) -> int: ...
    @property
    def value_len(self) -> int: ...
    @property
    def value_type(self) -> str: ...
    @property
    def dtype(self) -> np.dtype[np.floating]: ...
    @property
    def scheduler(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def clock(self) -> int: ...
    def tick(self) -> int: ...
    def traffic(self) -> Tuple[int, int]: ...
    def zeros(self, n: int) -> npt.NDArray[np.floating]: ...
    def push(
        self,
        keys: npt.NDArray[np.uint64],
        values: npt.NDArray[np.floating],
        *,
        after: _Timestamps = None,
        consistency: Optional[str] = None,
        func: int = 0,
    ) -> int: ...
    def pull(
        self,
        keys: npt.NDArray[np.uint64],
        *,
        dtype: _DType = None,
        after: _Timestamps = None,
        consistency: Optional[str] = None,
        func: int = 0,
    ) -> int: ...
    def push_pull(
        self,
        keys: npt.NDArray[np.uint64],
        values: npt.NDArray[np.floating],
        *,
        after: _Timestamps = None,
        consistency: Optional[str] = None,
        func: int = 0,
    ) -> int: ...
    def push_range(
        self,
        begin: int,
        end: int,
        values: npt.NDArray[np.floating],
        *,
        after: _Timestamps = None,
        consistency: Optional[str] = None,
        func: int = 0,
    ) -> int: ...
    def pull_range(
        self,
        begin: int,
        end: int,
        *,
        dtype: _DType = None,
        after: _Timestamps = None,
        consistency: Optional[str] = None,
        func: int = 0,
    ) -> int: ...
    def wait(self, ts: int) -> None: ...
    def wait_pull(
        self, ts: int, out: Optional[npt.NDArray[np.floating]] = None
    ) -> npt.NDArray[np.floating]: ...
    def barrier(self) -> None: ...
    def finish(self, examples: int = 0) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Worker: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]] = None,
        _exc: Optional[BaseException] = None,
        _tb: Optional[TracebackType] = None,
    ) -> bool: ...
