"""What every part of one job's run on a worker shares: who the worker is, the stop flag, the
current assignment, the coordinator client and the Reporter."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from shardps.proto import coordinator_pb2, coordinator_pb2_grpc
from shardps.worker.coordclient import CoordinatorClient
from shardps.worker.metrics import WorkerMetrics
from shardps.worker.outcome import End
from shardps.worker.reports import Reporter

_T = TypeVar("_T")


class JobContext:
    """One job's run on this worker, as its setup, step loop and shards see it.

    Thread-safety: `stop()`, `update_assignment()` and `assignment()` may be called from any
    thread (the daemon's heartbeat thread); everything else belongs to the training thread.
    """

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, node_id: str,
                 incarnation: int, assignment: coordinator_pb2.WorkerAssignment,
                 device: torch.device, metrics: WorkerMetrics, clock: Callable[[], float]):
        self.job_id = assignment.job_id
        self.node_id = node_id
        self.incarnation = incarnation
        self.device = device
        self.metrics = metrics
        self.clock = clock
        self._stop = threading.Event()
        self._stop_reason = ""
        self._lock = threading.Lock()
        self._assignment = coordinator_pb2.WorkerAssignment()
        self._assignment.CopyFrom(assignment)
        self.coordinator = CoordinatorClient(stub, stop=self._stop)
        self.reports = Reporter(self.coordinator, self.job_id, node_id, incarnation,
                                assignment.rollback_id, metrics, clock, on_stop=self.stop)

    # -- any thread --

    def stop(self, reason: str) -> None:
        """Asks the run to end (thread-safe); the first reason given is the one recorded."""
        with self._lock:
            if not self._stop.is_set():
                self._stop_reason = reason
                self._stop.set()
        self.coordinator.cancel_waits()  # a GetJob long-poll ends now, not at its hold's end

    def update_assignment(self, assignment: coordinator_pb2.WorkerAssignment) -> None:
        """Takes a new rank / world size / epoch / rollback of the same job."""
        with self._lock:
            self._assignment.CopyFrom(assignment)

    def assignment(self) -> coordinator_pb2.WorkerAssignment:
        with self._lock:
            copy = coordinator_pb2.WorkerAssignment()
            copy.CopyFrom(self._assignment)
            return copy

    # -- the training thread --

    def stopped(self) -> End:
        """The End of a run that was told to stop."""
        return End("stopped", self._stop_reason)

    def check_stop(self) -> None:
        """Raises End("stopped") once `stop()` has been called."""
        if self._stop.is_set():
            raise self.stopped()

    def pause(self, seconds: float) -> bool:
        """Sleeps up to `seconds`; True (at once) if the run was told to stop meanwhile."""
        return self._stop.wait(seconds)

    def fail(self, reason: str) -> End:
        """Reports the job's failure and returns the exception that ends the run (raise it)."""
        return self.reports.fail(reason)

    def guard(self, what: str, fn: Callable[[], _T]) -> _T:
        """Runs a setup step whose errors are the user's (spec, dataset, model): reports them."""
        try:
            return fn()
        except Exception as exc:
            raise self.fail(f"{what}: {exc}") from None
