"""CoordinatorClient: the worker's calls to the coordinator, each with a deadline and bounded
retries of transient (UNAVAILABLE) errors."""

from __future__ import annotations

import logging
import math
import threading
from typing import Literal, overload

import grpc
from google.protobuf.message import Message

from shardps.proto import coordinator_pb2 as pb
from shardps.proto import coordinator_pb2_grpc
from shardps.runtime import rpc
from shardps.runtime.backoff import Backoff

logger = logging.getLogger(__name__)

RETRY_WINDOW_S = 60.0  # an unavailable coordinator is retried this long (it may be restarting)
RETRY_BACKOFF_S = 0.5  # first pause between tries; doubles (a Backoff) up to RETRY_MAX_PAUSE_S
RETRY_MAX_PAUSE_S = 4.0


class Unreachable(Exception):
    """The coordinator did not answer after every retry; the message says which call and why."""


class Cancelled(Exception):
    """A cancellable call was ended by `cancel_waits()`."""


class CoordinatorClient:
    """A Coordinator stub plus deadlines and retries.

    Thread-safe (gRPC stubs are). `stop`, when set, cuts retry pauses short so a stopping
    daemon never waits out a backoff; `cancel_waits()` also ends long-polls in flight.
    """

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, *,
                 deadline_s: float = rpc.CONTROL_DEADLINE_S, attempts: int | None = None,
                 backoff_s: float = RETRY_BACKOFF_S, stop: threading.Event | None = None,
                 window_s: float = RETRY_WINDOW_S):
        self.stub = stub
        self.deadline_s = deadline_s
        self.attempts = attempts  # None: retry for window_s instead of a number of tries
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._waits: set[grpc.Future] = set()  # cancellable calls in flight

    @classmethod
    def connect(cls, address: str, *, stop: threading.Event | None = None
                ) -> tuple[CoordinatorClient, grpc.Channel]:
        """A client on a new channel to address; the caller closes the channel."""
        channel = rpc.make_channel(address)
        return cls(coordinator_pb2_grpc.CoordinatorStub(channel), stop=stop), channel

    # The RPCs a worker calls, each with its request and reply types (add one to call another).
    @overload
    def call(self, method: Literal["GetJob"], request: pb.GetJobRequest, *,
             attempts: int | None = None, deadline_s: float | None = None,
             cancellable: bool = False) -> pb.GetJobResponse: ...
    @overload
    def call(self, method: Literal["SetLayout"], request: pb.SetLayoutRequest, *,
             attempts: int | None = None, deadline_s: float | None = None,
             cancellable: bool = False) -> pb.SetLayoutResponse: ...
    @overload
    def call(self, method: Literal["ActivateJob"], request: pb.ActivateJobRequest, *,
             attempts: int | None = None, deadline_s: float | None = None,
             cancellable: bool = False) -> pb.ActivateJobResponse: ...
    @overload
    def call(self, method: Literal["ReportProgress"], request: pb.ReportProgressRequest, *,
             attempts: int | None = None, deadline_s: float | None = None,
             cancellable: bool = False) -> pb.ReportProgressResponse: ...

    def call(self, method: str, request: Message, *, attempts: int | None = None,
             deadline_s: float | None = None, cancellable: bool = False) -> Message:
        """Calls stub.<method>(request); retries UNAVAILABLE with doubling pauses.

        Retries `attempts` tries if given (here or to the constructor), else for `window_s`
        (a coordinator restart fits in it). Raises Unreachable once they are used up (or
        `stop` is set during a pause), and grpc.RpcError for any other status: those are
        answers, not outages. A `cancellable` call (a long-poll) raises Cancelled once `stop`
        is set and `cancel_waits()` called.
        """
        tries = attempts or self.attempts
        backoff = Backoff(self.backoff_s, RETRY_MAX_PAUSE_S,
                          math.inf if tries else self.window_s)
        while True:
            try:
                timeout = deadline_s or self.deadline_s
                if cancellable:
                    return self._wait(getattr(self.stub, method).future(request, timeout=timeout))
                return getattr(self.stub, method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                attempt = backoff.tries + 1
                if (attempt >= tries) if tries else backoff.expired():
                    raise Unreachable(f"coordinator {method}: unavailable after {attempt} tries "
                                      f"({exc.details()})") from None
                pause = backoff.next()
                if attempt == 1 or attempt % 5 == 0:
                    logger.warning("coordinator %s unavailable (%s); retrying (try %d) in %.1f s",
                                   method, exc.details(), attempt, pause)
                if self.stop.wait(pause):
                    raise Unreachable(f"coordinator {method}: unavailable, and stopping") from None

    def cancel_waits(self) -> None:
        """Cancels the cancellable calls in flight; set `stop` first (any thread)."""
        with self._lock:
            waits = list(self._waits)
        for future in waits:
            future.cancel()

    def _wait(self, future: grpc.Future) -> Message:
        with self._lock:
            self._waits.add(future)
        try:
            if self.stop.is_set():  # stop came before we were registered to be cancelled
                future.cancel()
            return future.result()
        except grpc.FutureCancelledError:
            raise Cancelled(f"{type(self).__name__}: call cancelled") from None
        finally:
            with self._lock:
                self._waits.discard(future)
