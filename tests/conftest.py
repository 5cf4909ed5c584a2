"""Daemon cleanup after each test, and how its daemons start (tests/harness.py: forked from a
preloaded forkserver, or as console scripts where a test is marked `console_scripts` or
SHARDPS_TEST_SPAWN=exec)."""

import logging

import pytest

from tests import harness


def pytest_configure(config):
    # In-process clusters (tests/cluster.py) log from their daemons' threads, and one that logs
    # just as a test phase ends writes to pytest's capture handler as it is closed. Logging
    # then prints "--- Logging error ---" with a stack, and on Python 3.11 formatting a stack
    # runs ast.parse (the caret anchors), which, on that thread, races pytest's own ast.parse
    # of a failure's or xfail's source on the main one: CPython 3.11.7 then raises
    # "SystemError: AST constructor recursion depth mismatch" inside pytest, which crashed an
    # xdist worker (INTERNALERROR) in a full run. A line lost at a phase's end is nothing to
    # report: such handler errors are dropped (`logging.raiseExceptions`), exceptions that the
    # code under test logs are not.
    logging.raiseExceptions = False
    config.addinivalue_line(
        "markers", "console_scripts: start this test's daemons as console scripts run by a fresh "
        "python, as a user does (tests/harness.py), not as forks of the preloaded forkserver")
    try:
        harness.spawn_setting()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test (a module's cluster too) starts a daemon."""
    harness.use_console_scripts(item.get_closest_marker("console_scripts") is not None)


@pytest.fixture(autouse=True)
def _kill_leftover_daemons():
    """Every test ends with no daemon process of its own left running."""
    yield
    harness.kill_all()
