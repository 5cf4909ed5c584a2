import pytest

from tests import harness


@pytest.fixture(autouse=True)
def _kill_leftover_daemons():
    """Every test ends with no daemon subprocess of its own left running."""
    yield
    harness.kill_all()
