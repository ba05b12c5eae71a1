"""``LocalCluster``: a pserv cluster (a scheduler and servers, each its own process) on
this machine, for tests, notebooks and single-host training."""

from __future__ import annotations

import os
import shutil
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ._errors import BinaryNotFoundError, ClusterError
from . import _pserv

__all__ = ["LocalCluster", "find_pserv_binary", "pserv_command"]

_HOW_TO_GET = (
    "build it with `cargo build --release` in the pserv repository and set "
    "PSERV_BIN=/path/to/pserv/target/release/pserv, or put `pserv` on PATH"
)


def pserv_command() -> List[str]:
    """The command :class:`LocalCluster` starts roles with: ``[find_pserv_binary()]``
    when there is an executable, else ``[sys.executable, "-m", "pserv"]``: the engine
    this package carries, which needs nothing beyond the installed package. An explicit
    ``PSERV_BIN`` that is not an executable is an error, not a fallback."""
    try:
        return [find_pserv_binary()]
    except BinaryNotFoundError:
        if os.environ.get("PSERV_BIN"):
            raise
        return [sys.executable, "-m", "pserv"]


def find_pserv_binary() -> str:
    """The ``pserv`` executable :class:`LocalCluster` runs.

    Looked for, in order: the environment variable ``PSERV_BIN``; ``pserv/bin/pserv``
    inside this package (when a wheel bundles it); ``pserv`` on ``PATH``; and
    ``target/release/pserv`` of the repository this package was built from. Raises
    :class:`pserv.BinaryNotFoundError` saying how to get one otherwise.
    """
    env = os.environ.get("PSERV_BIN")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return os.path.abspath(env)
        raise BinaryNotFoundError(f"PSERV_BIN={env!r} is not an executable file; {_HOW_TO_GET}")
    tried = ["$PSERV_BIN (unset)"]
    bundled = Path(__file__).resolve().parent / "bin" / "pserv"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    tried.append(str(bundled))
    on_path = shutil.which("pserv")
    if on_path:
        return on_path
    tried.append("`pserv` on PATH")
    source = getattr(_pserv, "_source_dir", None)
    if source:
        built = Path(source).resolve().parent / "target" / "release" / "pserv"
        if built.is_file() and os.access(built, os.X_OK):
            return str(built)
        tried.append(str(built))
    raise BinaryNotFoundError(
        "cannot find the pserv executable (tried " + ", ".join(tried) + "); " + _HOW_TO_GET
    )


class _Proc:
    """One child process and its log file."""

    def __init__(self, name: str, popen: "subprocess.Popen[bytes]", log: Path):
        self.name = name
        self.popen = popen
        self.log = log

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


class _State:
    """What a cluster started: its children and its temp dir. Kept apart from the
    LocalCluster so a finalizer can stop them without keeping the cluster alive."""

    def __init__(self) -> None:
        self.procs: List[_Proc] = []
        self.dir: Optional[Path] = None
        self.summary: Optional[Dict[str, Any]] = None
        self.lock = threading.Lock()
        self.workers: "weakref.WeakSet[_pserv.Worker]" = weakref.WeakSet()

    def stop(self, stop_timeout: float) -> None:
        """Close the workers made by this cluster, let the job end (if it is over), then
        SIGTERM the servers still running, then the scheduler, each SIGKILLed if still
        there ``stop_timeout`` seconds later; reap them all and remove the temp dir. Safe to call again; always finishes (a
        KeyboardInterrupt while waiting goes straight to SIGKILL)."""
        with self.lock:
            for w in list(self.workers):
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            try:
                alive = [p for p in self.procs if p.popen.poll() is None]
                sched = self.procs[0] if self.procs else None
                if alive and sched is not None and sched.popen.poll() is not None:
                    # The job ended (every worker finished): the servers stop on their own.
                    _wait_all(alive, time.monotonic() + stop_timeout)
                    alive = [p for p in alive if p.popen.poll() is None]
                # The servers first, while the scheduler is there to let them leave (a
                # server whose scheduler is gone first tries to reach a restarted one),
                # then the scheduler.
                for group in ([p for p in alive if p.name != "scheduler"],
                              [p for p in alive if p.name == "scheduler"]):
                    for p in group:
                        _signal(p, signal.SIGTERM)
                    _wait_all(group, time.monotonic() + stop_timeout)
            finally:
                for p in self.procs:
                    if p.popen.poll() is None:
                        _signal(p, signal.SIGKILL)
                for p in self.procs:
                    try:
                        p.popen.wait(timeout=10)
                    except (subprocess.TimeoutExpired, KeyboardInterrupt):
                        pass
                self._read_summary()
                if self.dir is not None:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    self.dir = None

    def _read_summary(self) -> None:
        if self.dir is None or self.summary is not None:
            return
        import json

        try:
            self.summary = json.loads((self.dir / "summary.json").read_text())
        except (OSError, ValueError):
            pass


def _signal(p: _Proc, sig: int) -> None:
    try:
        p.popen.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


def _wait_all(procs: Sequence[_Proc], deadline: float) -> None:
    for p in procs:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            p.popen.wait(timeout=left)
        except subprocess.TimeoutExpired:
            return


def _new_secret(path: Path) -> Path:
    """Write a fresh cluster secret (64 hexadecimal digits) to a new file readable by
    its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


class LocalCluster:
    """A pserv cluster on this machine: one ``pserv scheduler`` and ``servers``
    ``pserv server`` processes on 127.0.0.1, for ``workers`` workers that you connect
    from Python (``cluster.worker(rank)``).

    Use it as a context manager::

        with pserv.LocalCluster(servers=2, workers=1) as cluster:
            w = cluster.worker(0)
            ...
            w.finish()

    On leaving the block (also on an exception or KeyboardInterrupt, at interpreter
    exit, or when the object is collected) it closes the workers it made, stops every
    process it started (SIGTERM, then SIGKILL after ``stop_timeout`` seconds) and removes
    its temp dir. ``cluster.summary`` then holds the job summary the scheduler wrote, if
    the job ended (every worker called ``finish``).

    Parameters:
        servers: number of server processes.
        workers: number of workers the cluster waits for (each ``Worker`` you connect
            is one; connecting blocks until all of them registered).
        replicas: replicas of every key range after its head (``None``: the scheduler's
            default, 1 with two or more servers).
        value_type: "f32" or "f64".
        value_len: values per key.
        update: the servers' update function, as `pserv scheduler --update`: "sum",
            "assign", "sgd[:LR]", "adagrad[:LR[:EPSILON]]" or "ftrl[:ALPHA:BETA:L1:L2]".
        consistency: the default consistency model of the workers ``worker()`` makes
            ("eventual", "sequential", "bounded:TAU"; ``None``: eventual).
        extra_args: more flags for the scheduler (``pserv scheduler --help``).
        server_args: more flags for every server (``pserv server --help``).
        threads: event-loop threads of every process (cores are not pinned).
        timeout: the default ``timeout`` of the workers ``worker()`` makes.
        start_timeout: seconds to wait for the scheduler's address.
        stop_timeout: seconds between SIGTERM and SIGKILL when stopping.
        binary: the pserv executable (default: ``pserv_command()``: the executable
            ``find_pserv_binary()`` finds, else ``python -m pserv``, the engine in this
            package).
        log: log filter of every process (``PSERV_LOG`` syntax, e.g. "info").
        secret_file: the cluster secret file (``pserv secret FILE`` makes one). ``None``
            (the default): the cluster makes a fresh secret in its temp dir (readable by
            its owner only) and its processes get it in ``PSERV_SECRET_FILE``; the
            workers ``worker()`` makes use it, and :attr:`secret_file` names it for
            workers of other processes (``pserv.Worker(addr, secret_file=...)``).
        insecure: run without authentication (anyone who can reach the ports can read
            and change the model).
        tls_dir: run TLS between all its processes and workers, with the files
            ``pserv tls-certs DIR`` writes there (``node.pem``, ``node.key``, ``ca.pem``);
            workers of other processes get them from :attr:`tls_files`.
    """

    def __init__(
        self,
        servers: int = 2,
        workers: int = 1,
        replicas: Optional[int] = None,
        value_type: str = "f32",
        value_len: int = 1,
        update: str = "sum",
        consistency: Optional[str] = None,
        extra_args: Sequence[str] = (),
        *,
        server_args: Sequence[str] = (),
        threads: int = 1,
        timeout: float = 60.0,
        start_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        binary: Optional[str] = None,
        log: Optional[str] = None,
        secret_file: Optional[str] = None,
        insecure: bool = False,
        tls_dir: Optional[str] = None,
    ) -> None:
        for name, v, low in (("servers", servers, 1), ("workers", workers, 1),
                             ("value_len", value_len, 1), ("threads", threads, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if replicas is not None and (not isinstance(replicas, int) or replicas < 0):
            raise ValueError(f"replicas must be None or an int >= 0, got {replicas!r}")
        if value_type not in ("f32", "f64"):
            raise ValueError(f"value_type must be 'f32' or 'f64', got {value_type!r}")
        if isinstance(extra_args, str) or isinstance(server_args, str):
            raise TypeError("extra_args and server_args are sequences of strings, not a string")
        self.num_servers = servers
        self.num_workers = workers
        self.replicas = replicas
        self.value_type = value_type
        self.value_len = value_len
        self.update = update
        self.consistency = consistency
        self.extra_args = [str(a) for a in extra_args]
        self.server_args = [str(a) for a in server_args]
        self.threads = threads
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = binary
        self.log = log
        if secret_file is not None and insecure:
            raise ValueError("secret_file and insecure=True exclude each other")
        self.insecure = bool(insecure)
        self._secret_file: Optional[str] = None if secret_file is None else str(secret_file)
        self._env: Dict[str, str] = {}
        self._tls: Optional[Dict[str, str]] = None
        if tls_dir is not None:
            d = Path(tls_dir)
            self._tls = {"tls_cert": str((d / "node.pem").resolve()),
                         "tls_key": str((d / "node.key").resolve()),
                         "tls_ca": str((d / "ca.pem").resolve())}
        self._scheduler: Optional[str] = None
        self._state = _State()
        self._finalizer = weakref.finalize(self, self._state.stop, stop_timeout)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalCluster":
        """Start the scheduler and the servers and wait for the scheduler's address.
        Stops whatever it started if anything fails (or on KeyboardInterrupt)."""
        if self._scheduler is not None:
            return self
        if not self._finalizer.alive:
            raise ClusterError("this LocalCluster was stopped; make a new one")
        exe = [self.binary] if self.binary else pserv_command()
        st = self._state
        try:
            st.dir = Path(tempfile.mkdtemp(prefix="pserv-py-"))
            port_file = st.dir / "scheduler.addr"
            common = ["--threads", str(self.threads), "--pin-cores=false"]
            env = {k: v for k, v in os.environ.items()
                   if k not in ("PSERV_SECRET_FILE", "PSERV_INSECURE")}
            if self._tls is not None:
                common += [f"--{k.replace('_', '-')}={v}" for k, v in self._tls.items()]
            if self.insecure:
                common.append("--insecure")
            else:
                if self._secret_file is None:
                    self._secret_file = str(_new_secret(st.dir / "secret"))
                env["PSERV_SECRET_FILE"] = self._secret_file
            self._env = env
            if self.log:
                common += ["--log", self.log]
            args = [
                "--listen", "127.0.0.1:0",
                "--servers", str(self.num_servers),
                "--workers", str(self.num_workers),
                "--value-type", self.value_type,
                "--value-len", str(self.value_len),
                "--update", self.update,
                "--port-file", str(port_file),
                "--summary-json", str(st.dir / "summary.json"),
            ]
            if self.replicas is not None:
                args += ["--replicas", str(self.replicas)]
            self._spawn(exe, "scheduler", ["scheduler", *args, *common, *self.extra_args])
            addr = self._wait_port_file(port_file)
            for rank in range(self.num_servers):
                self._spawn(exe, f"server {rank}", [
                    "server", "--scheduler", addr, "--listen", "127.0.0.1:0",
                    "--rank", str(rank), *common, *self.server_args,
                ])
            self._scheduler = addr
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process this cluster started and remove its temp dir (see the
        class doc). Safe to call more than once."""
        self._finalizer()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, exe: List[str], name: str, args: List[str]) -> None:
        assert self._state.dir is not None
        log = self._state.dir / (name.replace(" ", "-") + ".log")
        with open(log, "wb") as out:
            try:
                popen = subprocess.Popen(
                    [*exe, *args], stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, close_fds=True, env=self._env,
                )
            except OSError as e:
                raise ClusterError(f"cannot start {name} ({exe}): {e}") from e
        self._state.procs.append(_Proc(name, popen, log))

    def _wait_port_file(self, port_file: Path) -> str:
        deadline = time.monotonic() + self.start_timeout
        sched = self._state.procs[0]
        while True:
            try:
                text = port_file.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text:
                return text
            if sched.popen.poll() is not None:
                raise ClusterError(
                    f"the scheduler exited with status {sched.popen.returncode} before "
                    f"listening:\n{sched.tail()}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the scheduler wrote no address within {self.start_timeout} s:\n{sched.tail()}"
                )
            time.sleep(0.01)

    # ------------------------------------------------------------------ use
    @property
    def scheduler(self) -> str:
        """The scheduler's address, "127.0.0.1:PORT" (starts the cluster if needed)."""
        if self._scheduler is None:
            self.start()
        assert self._scheduler is not None
        return self._scheduler

    @property
    def secret_file(self) -> Optional[str]:
        """The cluster secret file its processes and workers use (``None`` with
        ``insecure=True``; starts the cluster if needed). Hand it to workers of other
        processes: ``pserv.Worker(cluster.scheduler, secret_file=cluster.secret_file)``."""
        self.scheduler
        return self._secret_file

    @property
    def tls_files(self) -> Dict[str, str]:
        """The TLS files as ``Worker`` keyword arguments (``tls_cert``, ``tls_key``,
        ``tls_ca``; empty without ``tls_dir``)."""
        return dict(self._tls or {})

    def worker(self, rank: Optional[int] = None, **kwargs: object) -> "_pserv.Worker":
        """Connect a :class:`pserv.Worker` to this cluster (``rank``: the rank to ask
        for). Blocks until all ``workers`` of the cluster registered: connect the workers
        of one process from separate threads (or use :meth:`connect_workers`). Keyword
        arguments go to ``Worker`` (default ``timeout`` and ``consistency``: the
        cluster's). Raises :class:`pserv.ClusterError` if a process of the cluster died."""
        addr = self.scheduler
        self.check()
        kwargs.setdefault("timeout", self.timeout)
        if self.insecure:
            kwargs.setdefault("insecure", True)
        else:
            kwargs.setdefault("secret_file", self._secret_file)
        for k, v in (self._tls or {}).items():
            kwargs.setdefault(k, v)
        if self.consistency is not None:
            kwargs.setdefault("consistency", self.consistency)
        w = _pserv.Worker(addr, rank, **kwargs)  # type: ignore[arg-type]
        self._state.workers.add(w)
        return w

    def connect_workers(self, **kwargs: object) -> List["_pserv.Worker"]:
        """Connect all ``workers`` workers of the cluster at once (one thread each, since
        each waits for the others) and return them in rank order."""
        n = self.num_workers
        out: List[Optional[_pserv.Worker]] = [None] * n
        errors: List[BaseException] = []

        def connect(rank: int) -> None:
            try:
                out[rank] = self.worker(rank, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=connect, args=(r,), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for w in out:
                if w is not None:
                    w.close()
            raise errors[0]
        return [w for w in out if w is not None]

    def check(self) -> None:
        """Raise :class:`pserv.ClusterError` (with the end of its log) if a process of
        the cluster exited before the job ended."""
        procs = self._state.procs
        if procs and procs[0].popen.poll() is not None:
            return  # the job is over: the servers stop too
        for p in procs:
            if p.popen.poll() is not None:
                raise ClusterError(
                    f"{p.name} (pid {p.popen.pid}) exited with status {p.popen.returncode}:\n"
                    f"{p.tail()}"
                )

    def join(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Wait (at most ``timeout`` seconds) for the job to end, i.e. for every worker to
        call ``finish``, and return the scheduler's job summary (``None`` if it did not
        end in time)."""
        procs = self._state.procs
        if not procs:
            return None
        try:
            procs[0].popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        deadline = time.monotonic() + self.stop_timeout
        _wait_all(procs[1:], deadline)
        self._state._read_summary()
        return self._state.summary

    @property
    def summary(self) -> Optional[Dict[str, Any]]:
        """The job summary the scheduler wrote when the job ended (``None`` before)."""
        self._state._read_summary()
        return self._state.summary

    @property
    def running(self) -> bool:
        """Whether the cluster was started and not stopped."""
        return self._scheduler is not None and self._finalizer.alive

    @property
    def scheduler_pid(self) -> Optional[int]:
        """The scheduler's process id."""
        procs = self._state.procs
        return procs[0].popen.pid if procs else None

    @property
    def server_pids(self) -> List[int]:
        """The servers' process ids, by rank."""
        return [p.popen.pid for p in self._state.procs if p.name.startswith("server ")]

    @property
    def pids(self) -> Dict[str, int]:
        """Every process this cluster started: name ("scheduler", "server 0", ...) -> pid."""
        return {p.name: p.popen.pid for p in self._state.procs}

    def kill_server(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) to server ``rank`` and reap it if it died."""
        for p in self._state.procs:
            if p.name == f"server {rank}":
                _signal(p, sig)
                if sig == signal.SIGKILL:
                    p.popen.wait(timeout=10)
                return
        raise ValueError(f"no server {rank} (the cluster has {self.num_servers})")

    def log_tail(self, name: str = "scheduler", lines: int = 20) -> str:
        """The last ``lines`` lines a process ("scheduler", "server 0", ...) printed."""
        for p in self._state.procs:
            if p.name == name:
                return p.tail(lines)
        raise ValueError(f"no process {name!r} (have {[p.name for p in self._state.procs]})")

    def __repr__(self) -> str:
        state = f"scheduler {self._scheduler}" if self.running else "not running"
        return (f"<pserv.LocalCluster {self.num_servers} servers, {self.num_workers} workers, "
                f"{self.value_len} x {self.value_type}, {state}>")

