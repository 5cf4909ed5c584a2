"""CoordinatorClient: the worker's calls to the coordinator, each with a deadline and bounded
retries of transient (UNAVAILABLE) errors."""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from shardps.proto import coordinator_pb2_grpc, rpc

logger = logging.getLogger(__name__)

RETRY_ATTEMPTS = 4     # tries per call before a transient error becomes the caller's problem
RETRY_BACKOFF_S = 0.5  # first pause between tries; doubles each time (0.5, 1, 2 s)


class Unreachable(Exception):
    """The coordinator did not answer after every retry; the message says which call and why."""


class CoordinatorClient:
    """A Coordinator stub plus deadlines and retries.

    Thread-safe (gRPC stubs are). `stop`, when set, cuts retry pauses short so a stopping
    daemon never waits out a backoff.
    """

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, *,
                 deadline_s: float = rpc.CONTROL_DEADLINE_S, attempts: int = RETRY_ATTEMPTS,
                 backoff_s: float = RETRY_BACKOFF_S, stop: threading.Event | None = None):
        self.stub = stub
        self.deadline_s = deadline_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.stop = stop or threading.Event()

    @classmethod
    def connect(cls, address: str, **kwargs: Any) -> tuple[CoordinatorClient, grpc.Channel]:
        """A client on a new channel to address; the caller closes the channel."""
        channel = rpc.make_channel(address)
        return cls(coordinator_pb2_grpc.CoordinatorStub(channel), **kwargs), channel

    def call(self, method: str, request: Any, *, attempts: int | None = None,
             deadline_s: float | None = None) -> Any:
        """Calls stub.<method>(request); retries UNAVAILABLE with doubling pauses.

        Raises Unreachable once the tries are used up (or `stop` is set during a pause), and
        grpc.RpcError for any other status: those are answers, not outages.
        """
        tries = attempts or self.attempts
        pause = self.backoff_s
        for attempt in range(1, tries + 1):
            try:
                return getattr(self.stub, method)(request, timeout=deadline_s or self.deadline_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if attempt == tries:
                    raise Unreachable(f"coordinator {method}: unavailable after {tries} tries "
                                      f"({exc.details()})") from None
                logger.warning("coordinator %s unavailable (%s); retry %d/%d in %.1f s",
                               method, exc.details(), attempt, tries - 1, pause)
                if self.stop.wait(pause):
                    raise Unreachable(f"coordinator {method}: unavailable, and stopping") from None
                pause *= 2
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
