"""Fixtures shared by the integration tests (daemons in this process, on port 0)."""

import pytest

from shardps.client.api import CoordinatorClient
from shardps.server.coordinator.daemon import CoordinatorDaemon


@pytest.fixture
def coordinators():
    """Starts coordinators in this process on port 0 (or a given port); stops them after.

    Calling it returns (daemon, client); a second call with the first one's port is a
    coordinator restart on the same address.
    """
    started = []

    def start(port=0, lease_ms=10_000):
        coordinator = CoordinatorDaemon("127.0.0.1", port, lease_ms=lease_ms).start()
        started.append(coordinator)
        return coordinator, CoordinatorClient(coordinator.address)

    yield start
    for coordinator in started:
        coordinator.stop(0)
