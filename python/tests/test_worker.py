"""Push and pull through pserv.Worker against a LocalCluster."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest

import pserv

# Keys spread over the whole key space, so every server holds some.
SPREAD = np.unique((np.arange(1, 2001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def run_threads(workers, fn):
    """Run fn(worker) in one thread per worker; re-raise the first error."""
    results = [None] * len(workers)
    errors = []

    def body(i, w):
        try:
            results[i] = fn(w)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i, w)) for i, w in enumerate(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in ts), "a worker thread hung"
    return results


def test_single_worker_push_pull_and_properties(make_cluster):
    c = make_cluster(servers=2, workers=1)
    w = c.worker(0)
    assert (w.rank, w.num_workers, w.num_servers, w.value_len) == (0, 1, 2, 1)
    assert w.value_type == "f32" and w.dtype == np.float32
    assert "rank=0" in repr(w)
    keys = np.array([3, 17, 2**40, 2**63 + 5], dtype=np.uint64)
    w.wait(w.push(keys, np.array([1, 2, 3, 4], dtype=np.float32)))
    w.wait(w.push(keys, np.array([10, 20, 30, 40], dtype=np.float32)))
    got = w.wait_pull(w.pull(keys, dtype=np.float32))
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_array_equal(got, [11, 22, 33, 44])
    assert not got.flags.writeable
    # Keys never pushed read as zero; an empty pull is an empty array.
    np.testing.assert_array_equal(w.wait_pull(w.pull(np.array([4, 5], np.uint64))), [0, 0])
    assert w.wait_pull(w.pull(np.array([], np.uint64))).shape == (0,)
    # push_pull: the updated values in one round trip.
    np.testing.assert_array_equal(
        w.wait_pull(w.push_pull(keys, np.ones(4, np.float32))), [12, 23, 34, 45]
    )
    # out=: into an array of your own.
    out = np.full(4, -1, np.float32)
    assert w.wait_pull(w.pull(keys), out=out) is out
    np.testing.assert_array_equal(out, [12, 23, 34, 45])
    sent, received = w.traffic()
    assert sent > 0 and received > 0
    w.finish()
    assert w.closed
    summary = c.join(20)
    assert summary is not None and summary["workers_finished"] == 1


def test_two_workers_in_threads_sum(make_cluster):
    c = make_cluster(servers=2, workers=2)
    workers = c.connect_workers()
    assert sorted(w.rank for w in workers) == [0, 1]

    def train(w):
        vals = np.full(len(SPREAD), w.rank + 1, dtype=np.float32)
        for _ in range(5):
            w.wait(w.push(SPREAD, vals))
        w.barrier()
        got = w.wait_pull(w.pull(SPREAD))
        w.barrier()
        w.finish(examples=5)
        return got

    for got in run_threads(workers, train):
        # 5 pushes of 1 (rank 0) and 5 of 2 (rank 1) per key.
        np.testing.assert_array_equal(got, np.full(len(SPREAD), 15, np.float32))
    summary = c.join(20)
    assert summary is not None and summary["workers_finished"] == 2


def _process_worker(addr, secret_file, rank, q):
    import numpy as np

    import pserv

    try:
        w = pserv.Worker(addr, rank, timeout=30, secret_file=secret_file)
        keys = np.arange(0, 2**64 - 2**50, 2**54, dtype=np.uint64)
        w.wait(w.push(keys, np.full(len(keys), 0.5 * (rank + 1), np.float32)))
        w.barrier()
        got = w.wait_pull(w.pull(keys))
        w.finish()
        q.put((rank, got.tolist()))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, repr(e)))


def test_two_workers_in_processes_sum(make_cluster):
    c = make_cluster(servers=2, workers=2)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(c.scheduler, c.secret_file, r, q))
             for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        assert isinstance(results[rank], list), results[rank]
        assert results[rank] == [1.5] * len(results[rank])
    assert c.join(20) is not None


def test_ranges_and_value_len(make_cluster):
    c = make_cluster(servers=2, workers=1, value_len=3, update="sum")
    w = c.worker()
    n = 1000
    begin = 2**63 - 500  # across the middle of the key space
    vals = np.arange(n * 3, dtype=np.float32)
    w.wait(w.push_range(begin, begin + n, vals))
    w.wait(w.push_range(begin, begin + n, vals.reshape(n, 3)))  # (keys, value_len) works too
    got = w.wait_pull(w.pull_range(begin, begin + n))
    np.testing.assert_array_equal(got, 2 * vals)
    # Keyed reads see what ranged pushes wrote.
    keys = np.array([begin, begin + 7, begin + n - 1], np.uint64)
    got = w.wait_pull(w.pull(keys))
    np.testing.assert_array_equal(got.reshape(3, 3), 2 * vals.reshape(n, 3)[[0, 7, n - 1]])
    assert w.wait_pull(w.pull_range(5, 5)).shape == (0,)
    w.finish()


def test_f64_cluster(make_cluster):
    c = make_cluster(servers=2, workers=1, value_type="f64", update="assign")
    w = c.worker()
    assert w.value_type == "f64" and w.dtype == np.float64
    vals = np.linspace(0, 1, len(SPREAD), dtype=np.float64) + 1e-12
    w.wait(w.push(SPREAD, vals))
    got = w.wait_pull(w.pull(SPREAD, dtype="float64"))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, vals)  # bit for bit: no f32 on the way
    with pytest.raises(TypeError, match="float32.*f64|f64"):
        w.push(SPREAD, vals.astype(np.float32))
    w.finish()


def test_dependencies_and_consistency(make_cluster):
    c = make_cluster(servers=1, workers=1, update="assign", consistency="sequential")
    w = c.worker()
    keys = np.array([1, 2, 3], np.uint64)
    a = w.push(keys, np.full(3, 1, np.float32))
    b = w.push(keys, np.full(3, 2, np.float32), after=a)
    p = w.pull(keys, after=[a, b], consistency="eventual")
    np.testing.assert_array_equal(w.wait_pull(p), [2, 2, 2])
    w.wait(a)
    w.wait(b)
    assert w.tick() == 1 and w.clock == 1
    w.finish()


def test_wait_releases_the_gil(make_cluster):
    """While one thread waits (here on a server that is gone), others run Python."""
    c = make_cluster(servers=2, workers=1, replicas=0, timeout=1.5)
    w = c.worker()
    c.kill_server(1)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    start = time.monotonic()
    try:
        with pytest.raises(pserv.PservError):
            w.wait(w.push(SPREAD, np.ones(len(SPREAD), np.float32)))
    finally:
        stop.set()
        t.join()
    assert time.monotonic() - start < 10
    assert counter[0] > 10_000, "the other thread did not run while wait blocked"
