"""Bad input raises TypeError / ValueError before anything is sent; engine errors raise
pserv.PservError subclasses; a dead server is an exception, not a hang."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import pserv

KEYS = np.array([1, 2, 3], np.uint64)
VALS = np.array([1, 2, 3], np.float32)


@pytest.fixture
def worker(make_cluster):
    c = make_cluster(servers=2, workers=1)
    w = c.worker()
    w.wait(w.push(KEYS, VALS))
    yield w
    w.close()


BAD = [
    # (call, exception, message fragment)
    (lambda w: w.push([1, 2, 3], VALS), TypeError, "keys must be a numpy.ndarray of uint64, got a list"),
    (lambda w: w.push(KEYS.astype(np.int64), VALS), TypeError, "keys must have dtype uint64"),
    (lambda w: w.push(KEYS.astype(">u8"), VALS), TypeError, "keys must have dtype uint64"),
    (lambda w: w.push(np.array([3, 1, 2], np.uint64), VALS), ValueError, "sorted and distinct: keys[0] = 3 then keys[1] = 1"),
    (lambda w: w.push(np.array([1, 1, 2], np.uint64), VALS), ValueError, "sorted and distinct"),
    (lambda w: w.push(np.array([1, 2**64 - 1], np.uint64), VALS[:2]), ValueError, "outside the key space"),
    (lambda w: w.push(np.arange(6, dtype=np.uint64)[::2], VALS), ValueError, "C-contiguous"),
    (lambda w: w.push(KEYS.reshape(3, 1), VALS), ValueError, "keys must be 1-D"),
    (lambda w: w.push(KEYS, VALS.astype(np.float64)), TypeError, "values must have dtype float32, got a numpy array of dtype float64 and shape (3,) (the cluster stores f32)"),
    (lambda w: w.push(KEYS, [1.0, 2.0, 3.0]), TypeError, "values must be a numpy.ndarray of float32, got a list"),
    (lambda w: w.push(KEYS, VALS[:2]), ValueError, "values must hold 3 values (3 keys x 1 values per key)"),
    (lambda w: w.push(KEYS, np.arange(6, dtype=np.float32)[::2]), ValueError, "C-contiguous"),
    (lambda w: w.push(KEYS, np.frombuffer(b"\0" * 13, np.float32, 3, offset=1)), ValueError, "not aligned"),
    (lambda w: w.push(KEYS, VALS, func=70000), ValueError, "func must be"),
    (lambda w: w.push(KEYS, VALS, consistency="strict"), ValueError, "unknown consistency model"),
    (lambda w: w.push(KEYS, VALS, after="x"), TypeError, "after must be"),
    (lambda w: w.pull(KEYS, dtype=np.float64), TypeError, "the cluster stores f32"),
    (lambda w: w.push_range(10, 5, VALS[:0]), ValueError, "runs backwards"),
    (lambda w: w.push_range(-1, 2, VALS), ValueError, "begin must be in [0, 2**64 - 1]"),
    (lambda w: w.push_range(0, 2**64, VALS), ValueError, "end must be in"),
    (lambda w: w.push_range("0", 3, VALS), TypeError, "begin must be an int"),
    (lambda w: w.push_range(0, 4, VALS), ValueError, "values must hold 4 values"),
]


@pytest.mark.parametrize("call,exc,fragment", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_raises_before_sending(worker, call, exc, fragment):
    before = worker.traffic()
    with pytest.raises(exc) as info:
        call(worker)
    assert fragment in str(info.value), str(info.value)
    assert worker.traffic() == before, "something was sent"
    # Nothing changed on the servers.
    np.testing.assert_array_equal(worker.wait_pull(worker.pull(KEYS)), VALS)


def test_wait_pull_checks(worker):
    ts = worker.pull(KEYS)
    with pytest.raises(ValueError, match="out has 2 elements, the pull returns 3"):
        worker.wait_pull(ts, out=np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        worker.wait_pull(ts, out=np.zeros(3, np.float64))
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        worker.wait_pull(ts, out=ro)
    # The checks changed nothing: the pull is still there to collect.
    np.testing.assert_array_equal(worker.wait_pull(ts), VALS)
    with pytest.raises(pserv.UnknownTimestampError, match="already collected"):
        worker.wait_pull(ts)
    with pytest.raises(pserv.UnknownTimestampError):
        worker.wait_pull(worker.push(KEYS, VALS))  # a push has no values
    with pytest.raises(LookupError):  # UnknownTimestampError is a LookupError too
        worker.wait(10**9)


def test_error_classes():
    assert issubclass(pserv.TimeoutError, pserv.PservError)
    assert issubclass(pserv.TimeoutError, TimeoutError)
    assert issubclass(pserv.DisconnectedError, ConnectionError)
    assert issubclass(pserv.InvalidRequestError, ValueError)
    assert issubclass(pserv.ServerError, pserv.PservError)
    assert issubclass(pserv.BinaryNotFoundError, pserv.ClusterError)


def test_server_error_has_status(worker):
    # Function id 999 is registered on no server: the server refuses the push.
    with pytest.raises(pserv.ServerError) as info:
        worker.wait(worker.push(KEYS, VALS, func=999))
    e = info.value
    assert e.status == "UnknownFunction" and e.status_code == 3
    assert e.server in (0, 1)
    assert "refused" in str(e)


def test_huge_range_is_refused_by_the_servers(worker):
    with pytest.raises(pserv.ServerError, match="frame limit") as info:
        worker.wait_pull(worker.pull_range(0, 2**64 - 1))
    assert info.value.status == "BadRequest"


def test_closed_worker(make_cluster):
    c = make_cluster(servers=1, workers=1)
    w = c.worker()
    w.finish()
    for call in (lambda: w.push(KEYS, VALS), lambda: w.wait(1), lambda: w.barrier(), w.finish):
        with pytest.raises(pserv.ClosedError):
            call()
    w.close()  # closing again is fine


def test_no_scheduler_is_an_error_not_a_hang():
    start = time.monotonic()
    with pytest.raises(pserv.PservError):
        pserv.Worker("127.0.0.1:1", timeout=2.0, insecure=True)
    assert time.monotonic() - start < 15
    with pytest.raises(ValueError, match="HOST:PORT"):
        pserv.Worker("no port here")
    with pytest.raises(ValueError, match="timeout"):
        pserv.Worker("127.0.0.1:1", timeout=-1)
    with pytest.raises(ValueError, match="codec|compress|unknown"):
        pserv.Worker("127.0.0.1:1", compress="gzip")


@pytest.mark.parametrize("op", ["push", "pull", "barrier"])
def test_server_sigkilled_is_an_exception(make_cluster, op):
    """No replicas: the killed server's keys have no other home. Every wait ends with an
    error within about the worker's timeout."""
    c = make_cluster(servers=2, workers=1, replicas=0, timeout=2.0)
    w = c.worker()
    keys = np.arange(0, 2**64 - 2**58, 2**58, dtype=np.uint64)  # on both servers
    w.wait(w.push(keys, np.ones(len(keys), np.float32)))
    victim = c.server_pids[1]
    c.kill_server(1)
    from conftest import pid_alive

    assert not pid_alive(victim)
    start = time.monotonic()
    if op == "push":
        with pytest.raises((pserv.DisconnectedError, pserv.TimeoutError)):
            w.wait(w.push(keys, np.ones(len(keys), np.float32)))
    elif op == "pull":
        with pytest.raises((pserv.DisconnectedError, pserv.TimeoutError)):
            w.wait_pull(w.pull(keys))
    else:
        # The scheduler still runs: a barrier of the only worker passes.
        w.barrier()
    assert time.monotonic() - start < 15
    # Keys only on the live server still work.
    table_keys = keys[:1]
    try:
        w.wait_pull(w.pull(table_keys))
    except pserv.PservError:
        pass  # that key may have lived on the dead server


def test_authentication_is_required_and_checked(make_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("PSERV_SECRET_FILE", raising=False)
    c = make_cluster(servers=1, workers=1)
    assert c.secret_file is not None and os.stat(c.secret_file).st_mode & 0o077 == 0
    # No secret at all: a clear error before anything is sent.
    with pytest.raises(pserv.ConfigError, match="no cluster secret"):
        pserv.Worker(c.scheduler, timeout=5.0)
    # Another secret: refused, naming the scheduler, within the bound.
    other = tmp_path / "other"
    other.write_text("x" * 40)
    other.chmod(0o600)
    start = time.monotonic()
    with pytest.raises(pserv.PservError, match="does not hold this cluster's secret"):
        pserv.Worker(c.scheduler, timeout=5.0, secret_file=str(other))
    assert time.monotonic() - start < 15
    # A secret file others can read is refused.
    other.chmod(0o644)
    with pytest.raises(pserv.ConfigError, match="chmod 600"):
        pserv.Worker(c.scheduler, timeout=5.0, secret_file=str(other))
    # The cluster's own secret works (from the environment too), and the job still runs.
    monkeypatch.setenv("PSERV_SECRET_FILE", c.secret_file)
    w = pserv.Worker(c.scheduler, timeout=30.0)
    w.finish()
    assert c.join(20) is not None


def test_a_tls_cluster_serves_tls_workers_and_refuses_others(make_cluster, tmp_path):
    import subprocess

    from pserv._cluster import pserv_command

    certs = tmp_path / "certs"
    out = subprocess.run([*pserv_command(), "tls-certs", str(certs)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    c = make_cluster(servers=2, workers=1, tls_dir=str(certs))
    assert set(c.tls_files) == {"tls_cert", "tls_key", "tls_ca"}
    # A worker with the secret but without TLS: refused, with the reason, in time.
    start = time.monotonic()
    with pytest.raises(pserv.PservError):
        pserv.Worker(c.scheduler, timeout=5.0, secret_file=c.secret_file)
    assert time.monotonic() - start < 15
    # Half the TLS files: a clear error before connecting.
    with pytest.raises(ValueError, match="all three"):
        pserv.Worker(c.scheduler, timeout=5.0, tls_cert=c.tls_files["tls_cert"])
    w = c.worker(0)
    keys = np.arange(0, 2**64 - 2**50, 2**54, dtype=np.uint64)
    w.wait(w.push(keys, np.full(len(keys), 1.5, np.float32)))
    np.testing.assert_array_equal(w.wait_pull(w.pull(keys)), np.full(len(keys), 1.5, np.float32))
    w.finish()
    assert c.join(20) is not None
