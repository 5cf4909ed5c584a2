"""Job states and consistency modes: the enum values of common.proto as names, and which
states are final, in one place for every part."""

from __future__ import annotations

from shardps.proto import common_pb2

# A job in one of these never changes state again (common.proto, JobState).
FINAL_STATES = frozenset({
    common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_CONVERGED,
    common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED,
})
# The final states a client reports as success (exit 0).
SUCCESS_STATES = frozenset({common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_CONVERGED})

# The spec's `consistency.mode` names and their wire values (common.proto, ConsistencyMode).
MODE_VALUES = {
    "sync": common_pb2.CONSISTENCY_SYNC,
    "ssp": common_pb2.CONSISTENCY_SSP,
    "async": common_pb2.CONSISTENCY_ASYNC,
}
MODE_NAMES = {value: name for name, value in MODE_VALUES.items()}


def state_name(state: int) -> str:
    """"RUNNING" for JOB_STATE_RUNNING, and so on."""
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")
