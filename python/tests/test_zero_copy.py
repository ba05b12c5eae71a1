"""Pushes of pserv.zeros arrays send their memory without a copy; pulls answered by one
server are views of the receive buffer. Measured by the worker process's peak RSS in a
fresh process per case (VmHWM), against an ordinary numpy array (one copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pserv

MIB = 1 << 20

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import pserv

    mode = sys.argv[1]
    VL = 1024                           # 4 KiB of f32 per key
    N = 1 << 16                         # 65536 keys: 256 MiB of values
    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    # The peak RSS of this process image: VmHWM, not getrusage's ru_maxrss, which a
    # child starts with its parent's RSS at fork (a pytest process that imported torch
    # holds 500 MiB), so it hides a copy smaller than that.
    peak = lambda: status("VmHWM")
    rss = lambda: status("VmRSS")
    with pserv.LocalCluster(servers=1, workers=1, replicas=0, value_len=VL, timeout=60) as c:
        w = c.worker()
        if mode == "shared":
            keys = pserv.zeros(N, np.uint64)
            keys[:] = np.arange(N, dtype=np.uint64)
            vals = pserv.zeros(N * VL, np.float32)
            vals[:] = 1.5                   # fill in place: touches every page
        else:
            keys = np.arange(N, dtype=np.uint64)
            vals = np.full(N * VL, 1.5, np.float32)
        out = {"shared": pserv.is_shared(vals) and pserv.is_shared(keys), "bytes": vals.nbytes}
        # Warm up the connection with one key, then measure the peak RSS a 256 MiB push
        # adds (a copy would add 256 MiB: the values array is already resident).
        w.wait(w.push(np.zeros(1, np.uint64), np.ones(VL, np.float32)))
        before = peak()
        w.wait(w.push(keys, vals))
        out["push_growth"] = peak() - before
        # A pull: the 256 MiB receive buffer, and nothing more when the array views it.
        before = rss()
        got = w.wait_pull(w.pull(keys))
        out["pull_growth"] = rss() - before
        out["pull_view"] = type(got.base).__name__
        out["pull_ok"] = bool(got[0] == 2.5 and got[VL] == 1.5 and got[-1] == 1.5)
        del got
        w.finish()
    print(json.dumps(out))
    """
)


def run_child(mode):
    env = dict(os.environ)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=100, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_push_of_zeros_array_is_not_copied():
    shared = run_child("shared")
    copied = run_child("copy")
    print("shared:", shared, "copied:", copied)
    assert shared["shared"] and not copied["shared"]
    assert shared["bytes"] == 256 * MIB
    # An ordinary array is copied once (the measure sees 256 MiB more) ...
    assert copied["push_growth"] >= 200 * MIB, copied
    # ... a pserv.zeros array not at all.
    assert shared["push_growth"] < 16 * MIB, shared
    # Pull answered by one server: a view of the 256 MiB receive buffer, no second copy.
    for r in (shared, copied):
        assert r["pull_ok"], r
        assert r["pull_view"] == "PulledBuffer", r
        assert r["pull_growth"] < 256 * MIB + 32 * MIB, r


def test_zeros_and_is_shared():
    a = pserv.zeros(10)
    assert a.dtype == np.float32 and a.shape == (10,) and a.flags.writeable
    assert not a.any()
    assert isinstance(a.base, pserv.Buffer) and len(a.base) == 10
    assert pserv.is_shared(a)
    assert pserv.is_shared(a.view())  # a view of all of it is still shared
    assert not pserv.is_shared(a[1:])  # part of it is copied
    assert not pserv.is_shared(np.zeros(10, np.float32))
    assert pserv.zeros(4, "float64").dtype == np.float64
    assert pserv.zeros(4, np.uint64).dtype == np.uint64
    with pytest.raises(TypeError, match="float32, float64 or uint64"):
        pserv.zeros(4, np.int32)
    # The memory outlives the array while something holds it.
    b = pserv.zeros(3, np.float64)
    b[:] = [1, 2, 3]
    base = b.base
    del b
    assert len(base) == 3


def test_zero_copy_keys_and_values_round_trip(make_cluster):
    c = make_cluster(servers=2, workers=1)
    w = c.worker()
    keys = pserv.zeros(1000, np.uint64)
    keys[:] = np.arange(1000, dtype=np.uint64) * np.uint64(2**50)
    vals = w.zeros(1000)
    assert pserv.is_shared(keys) and pserv.is_shared(vals)
    for step in range(3):
        vals[:] = step + 1
        w.wait(w.push(keys, vals))  # then vals may be written again
    np.testing.assert_array_equal(w.wait_pull(w.pull(keys)), np.full(1000, 6, np.float32))
    w.finish()
