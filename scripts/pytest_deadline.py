"""A per-test time limit for pytest with no extra package (pytest-timeout may be missing on a lent GPU machine).

    PYTHONPATH=scripts python -m pytest -p pytest_deadline --deadline 90 tests ...

Each test's setup, call and teardown get ``--deadline`` seconds (0: none). At the limit, SIGALRM raises
``DeadlineExceeded`` inside the test, which then fails with that message, and the session goes on. A test
stuck inside C code (a hung GPU kernel, a deadlock) only sees the alarm when control returns to Python:
``scripts/gpu_check.sh`` runs the tests in groups under ``timeout`` for that case, and pytest's own
``faulthandler_timeout`` dumps the stacks first. Main thread only, POSIX only (as SIGALRM).
"""
import contextlib
import signal

import pytest


class DeadlineExceeded(Exception):
    """Raised inside a test that ran past ``--deadline`` seconds."""


def pytest_addoption(parser):
    parser.addoption("--deadline", type=float, default=0.0,
                     help="fail a test whose setup, call or teardown runs longer than this many seconds (0: off)")


@contextlib.contextmanager
def _deadline(item, when):
    """``--deadline`` seconds for the ``when`` phase of ``item``: SIGALRM raises :class:`DeadlineExceeded`."""
    seconds = item.config.getoption("--deadline")
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise DeadlineExceeded(f"{item.nodeid}: {when} ran past the {seconds:g} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _deadline(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _deadline(item, "call"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    with _deadline(item, "teardown"):
        yield
