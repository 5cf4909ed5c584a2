"""Daemon cleanup after each test, and how its daemons start (tests/harness.py: forked from a
preloaded forkserver, or as console scripts where a test is marked `console_scripts` or
SHARDPS_TEST_SPAWN=exec)."""

import pytest

from tests import harness


def pytest_configure(config):
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
