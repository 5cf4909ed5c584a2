"""Fixtures shared by the integration tests (daemons in this process, on port 0)."""

import pytest

from shardps.client.api import ClientError, CoordinatorClient
from shardps.server.coordinator.daemon import CoordinatorDaemon
from tests.harness import poll


def _answers(client: CoordinatorClient) -> bool:
    try:
        client.nodes()
    except ClientError:
        return False
    return True


@pytest.fixture
def coordinators():
    """Starts coordinators in this process on port 0 (or a given port); stops them after.

    Calling it returns (daemon, client); a second call with the first one's port is a
    coordinator restart on the same address. Channels in one process share gRPC subchannels,
    and the one to a just-stopped coordinator is in reconnect backoff for a second or so, so
    a restart returns only once the new coordinator answers.
    """
    started = []

    def start(port=0, lease_ms=10_000):
        coordinator = CoordinatorDaemon("127.0.0.1", port, lease_ms=lease_ms).start()
        started.append(coordinator)
        client = CoordinatorClient(coordinator.address)
        if port:
            poll(lambda: _answers(client), 30, what="the restarted coordinator answering")
        return coordinator, client

    yield start
    for coordinator in started:
        coordinator.stop(0)
