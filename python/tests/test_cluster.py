"""LocalCluster starts and always stops its processes."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pserv
from conftest import pid_alive


def gone(pids, within=15.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def test_processes_and_temp_dir_are_gone_after_exit():
    with pserv.LocalCluster(servers=2, workers=1, timeout=20) as c:
        pids = list(c.pids.values())
        assert len(pids) == 3 and c.scheduler_pid in pids and len(c.server_pids) == 2
        assert all(pid_alive(p) for p in pids)
        tmp = c._state.dir
        assert tmp is not None and tmp.is_dir()
        host, port = c.scheduler.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        w = c.worker()
        w.wait(w.push(np.array([1], np.uint64), np.ones(1, np.float32)))
        # worker left unfinished: the cluster closes it and stops the job itself
    assert gone(pids)
    assert not tmp.exists()
    assert w.closed
    assert not c.running


def test_stopped_on_exception_and_keyboard_interrupt():
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with pserv.LocalCluster(servers=1, workers=1) as c:
                pids = list(c.pids.values())
                raise exc
        assert gone(pids)


def test_stopped_when_collected():
    c = pserv.LocalCluster(servers=1, workers=1).start()
    pids = list(c.pids.values())
    del c
    gc.collect()
    assert gone(pids)


def test_stopped_at_interpreter_exit():
    script = textwrap.dedent(
        """
        import pserv, sys
        c = pserv.LocalCluster(servers=2, workers=1).start()
        print(" ".join(str(p) for p in c.pids.values()), flush=True)
        # exits without stopping it: the atexit finalizer does
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 3
    assert gone(pids)


def test_finished_job_ends_by_itself_with_a_summary():
    with pserv.LocalCluster(servers=2, workers=1, replicas=1) as c:
        w = c.worker()
        w.wait(w.push(np.arange(10, dtype=np.uint64), np.ones(10, np.float32)))
        w.finish(examples=10)
        summary = c.join(20)
        assert summary is not None
        assert summary["worker_examples"] == [10]
        assert summary["stored_keys"] >= 10
    assert c.summary == summary


def test_a_dead_server_is_reported(make_cluster):
    c = make_cluster(servers=2, workers=1)
    c.kill_server(0)
    with pytest.raises(pserv.ClusterError, match="server 0"):
        c.worker()


def test_binary_lookup_errors(monkeypatch):
    monkeypatch.setenv("PSERV_BIN", "/nonexistent/pserv")
    with pytest.raises(pserv.BinaryNotFoundError, match="cargo build --release"):
        pserv.find_pserv_binary()
    with pytest.raises(pserv.BinaryNotFoundError):
        pserv.LocalCluster().start()
    monkeypatch.delenv("PSERV_BIN")
    assert os.access(pserv.find_pserv_binary(), os.X_OK)


def test_bad_arguments():
    with pytest.raises(ValueError, match="servers"):
        pserv.LocalCluster(servers=0)
    with pytest.raises(ValueError, match="value_type"):
        pserv.LocalCluster(value_type="f16")
    with pytest.raises(TypeError, match="sequences"):
        pserv.LocalCluster(extra_args="--vnodes 0")


def test_scheduler_refusing_flags_is_a_clear_error():
    with pytest.raises(pserv.ClusterError, match="scheduler exited"):
        pserv.LocalCluster(extra_args=["--no-such-flag"]).start()


def test_the_package_runs_the_engine_without_an_executable(monkeypatch, tmp_path):
    # No pserv executable anywhere: the roles run as `python -m pserv`, the engine this
    # package carries.
    import pserv._cluster as cl

    def nowhere() -> str:
        raise pserv.BinaryNotFoundError("no executable in this test")

    monkeypatch.delenv("PSERV_BIN", raising=False)
    monkeypatch.setattr(cl, "find_pserv_binary", nowhere)
    assert pserv.pserv_command() == [sys.executable, "-m", "pserv"]
    with pserv.LocalCluster(servers=2, workers=1, timeout=20) as c:
        w = c.worker(0)
        keys = np.array([3, 7, 1 << 62], dtype=np.uint64)
        w.wait(w.push(keys, np.ones(3, dtype=np.float32)))
        w.wait(w.push(keys, np.full(3, 2.0, dtype=np.float32)))
        assert list(w.wait_pull(w.pull(keys))) == [3.0, 3.0, 3.0]
        w.finish()
        cmdlines = [open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:3]
                    for pid in c.pids.values() if pid_alive(pid)]
        assert cmdlines and all(cl_[1:3] == [b"-m", b"pserv"] for cl_ in cmdlines), cmdlines
    # An explicit PSERV_BIN that is wrong stays an error.
    monkeypatch.setenv("PSERV_BIN", "/nonexistent/pserv")
    with pytest.raises(pserv.BinaryNotFoundError):
        pserv.pserv_command()


def test_python_m_pserv_is_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pserv", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert pserv.__version__ in out.stdout
    # A whole local job, its processes started as `python -m pserv ROLE` too.
    summary = tmp_path / "summary.json"
    env = dict(os.environ)
    env.pop("PSERV_SELF_EXE", None)
    out = subprocess.run(
        [sys.executable, "-m", "pserv", "local", "--servers=1", "--workers=2",
         "--examples=3000", "--features=2000", "--epochs=1", "--threads=1",
         "--pin-cores=false", f"--summary-json={summary}", "--timeout-secs=60"],
        capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    import json
    s = json.loads(summary.read_text())
    assert s["workers_finished"] == 2
    assert s["test_accuracy"] > s["majority_rate"], s
    # A bad flag: a clear message and a failure status, as from the executable.
    out = subprocess.run([sys.executable, "-m", "pserv", "local", "--epochs=0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "epochs" in out.stderr
