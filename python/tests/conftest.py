"""Shared fixtures: a bound on every test, and LocalClusters that are always stopped."""

from __future__ import annotations

import os
import signal
import threading

import pytest

import pserv

# Every test is bounded: pytest-timeout when installed (scripts/test installs it), else
# an alarm in the main thread.
TEST_TIMEOUT = float(os.environ.get("PSERV_TEST_TIMEOUT", "120"))

try:
    import pytest_timeout  # noqa: F401

    HAVE_PYTEST_TIMEOUT = True
except ImportError:
    HAVE_PYTEST_TIMEOUT = False


def pytest_collection_modifyitems(config, items):
    if HAVE_PYTEST_TIMEOUT:
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture(autouse=True)
def _alarm_bound():
    """Without pytest-timeout: fail a test that runs past TEST_TIMEOUT."""
    if HAVE_PYTEST_TIMEOUT or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"test ran past {TEST_TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def make_cluster():
    """make_cluster(**kwargs) -> a started LocalCluster, stopped after the test."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("timeout", 20.0)
        c = pserv.LocalCluster(**kwargs)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
