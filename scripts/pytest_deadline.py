"""A per-test time limit for pytest with no extra package (pytest-timeout may be missing on a lent GPU machine).

    PYTHONPATH=scripts python -m pytest -p pytest_deadline --deadline 90 tests ...

Each test's setup, call and teardown get ``--deadline`` seconds (0: none). At the limit, SIGALRM raises
``DeadlineExceeded`` inside the test, which then fails with that message, and the session goes on. A test
stuck inside C code (a hung GPU kernel, a deadlock) only sees the alarm when control returns to Python:
``scripts/gpu_check.sh`` runs the tests in groups under ``timeout`` for that case, and pytest's own
``faulthandler_timeout`` dumps the stacks first. Main thread only, POSIX only (as SIGALRM).
"""
import signal

import pytest


class DeadlineExceeded(Exception):
    """Raised inside a test that ran past ``--deadline`` seconds."""


def pytest_addoption(parser):
    parser.addoption("--deadline", type=float, default=0.0,
                     help="fail a test whose setup, call or teardown runs longer than this many seconds (0: off)")


def _arm(item, when):
    seconds = item.config.getoption("--deadline")
    if not seconds or not hasattr(signal, "SIGALRM"):
        return None

    def expire(signum, frame):
        raise DeadlineExceeded(f"{item.nodeid}: {when} ran past the {seconds:g} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return previous


def _disarm(previous):
    if previous is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    previous = _arm(item, "setup")
    try:
        yield
    finally:
        _disarm(previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    previous = _arm(item, "call")
    try:
        yield
    finally:
        _disarm(previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    previous = _arm(item, "teardown")
    try:
        yield
    finally:
        _disarm(previous)
