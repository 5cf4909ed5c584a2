from shardps.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_ALIVE: _ClassVar[NodeState]
    NODE_STATE_DEAD: _ClassVar[NodeState]

class ReshardState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESHARD_STATE_UNSPECIFIED: _ClassVar[ReshardState]
    RESHARD_STATE_RUNNING: _ClassVar[ReshardState]
    RESHARD_STATE_DONE: _ClassVar[ReshardState]
    RESHARD_STATE_FAILED: _ClassVar[ReshardState]

class WorkerAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ACTION_UNSPECIFIED: _ClassVar[WorkerAction]
    WORKER_ACTION_CONTINUE: _ClassVar[WorkerAction]
    WORKER_ACTION_STOP: _ClassVar[WorkerAction]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_ALIVE: NodeState
NODE_STATE_DEAD: NodeState
RESHARD_STATE_UNSPECIFIED: ReshardState
RESHARD_STATE_RUNNING: ReshardState
RESHARD_STATE_DONE: ReshardState
RESHARD_STATE_FAILED: ReshardState
WORKER_ACTION_UNSPECIFIED: WorkerAction
WORKER_ACTION_CONTINUE: WorkerAction
WORKER_ACTION_STOP: WorkerAction

class RegisterNodeRequest(_message.Message):
    __slots__ = ("role", "address", "node_id", "metrics_address", "device", "hostname", "restored", "stored", "frozen")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.Role
    address: str
    node_id: str
    metrics_address: str
    device: str
    hostname: str
    restored: _containers.RepeatedCompositeFieldContainer[ShardVersion]
    stored: _containers.RepeatedCompositeFieldContainer[ShardVersion]
    frozen: _containers.RepeatedCompositeFieldContainer[ShardVersion]
    def __init__(self, role: _Optional[_Union[_common_pb2.Role, str]] = ..., address: _Optional[str] = ..., node_id: _Optional[str] = ..., metrics_address: _Optional[str] = ..., device: _Optional[str] = ..., hostname: _Optional[str] = ..., restored: _Optional[_Iterable[_Union[ShardVersion, _Mapping]]] = ..., stored: _Optional[_Iterable[_Union[ShardVersion, _Mapping]]] = ..., frozen: _Optional[_Iterable[_Union[ShardVersion, _Mapping]]] = ...) -> None: ...

class ShardVersion(_message.Message):
    __slots__ = ("job_id", "shard_index", "version", "lost_updates")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOST_UPDATES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    version: int
    lost_updates: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., version: _Optional[int] = ..., lost_updates: _Optional[int] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node_id", "incarnation", "lease_ms", "jobs")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    lease_ms: int
    jobs: _containers.RepeatedCompositeFieldContainer[ServerJobView]
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., lease_ms: _Optional[int] = ..., jobs: _Optional[_Iterable[_Union[ServerJobView, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "incarnation", "shutting_down", "wait_for_assignment_ms", "restored", "frozen", "caught_up")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SHUTTING_DOWN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_ASSIGNMENT_MS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: int
    shutting_down: bool
    wait_for_assignment_ms: int
    restored: _containers.RepeatedCompositeFieldContainer[ShardVersion]
    frozen: _containers.RepeatedCompositeFieldContainer[ShardVersion]
    caught_up: _containers.RepeatedCompositeFieldContainer[ShardVersion]
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., shutting_down: _Optional[bool] = ..., wait_for_assignment_ms: _Optional[int] = ..., restored: _Optional[_Iterable[_Union[ShardVersion, _Mapping]]] = ..., frozen: _Optional[_Iterable[_Union[ShardVersion, _Mapping]]] = ..., caught_up: _Optional[_Iterable[_Union[ShardVersion, _Mapping]]] = ...) -> None: ...

class WorkerAssignment(_message.Message):
    __slots__ = ("job_id", "rank", "world_size", "epoch", "rollback_id", "rollback_version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    world_size: int
    epoch: int
    rollback_id: int
    rollback_version: int
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., epoch: _Optional[int] = ..., rollback_id: _Optional[int] = ..., rollback_version: _Optional[int] = ...) -> None: ...

class ServerJobView(_message.Message):
    __slots__ = ("job_id", "state", "epoch", "live_workers", "live_incarnations", "rollback_id", "rollback_version", "final_version", "shard_map")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_INCARNATIONS_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.JobState
    epoch: int
    live_workers: _containers.RepeatedScalarFieldContainer[str]
    live_incarnations: _containers.RepeatedScalarFieldContainer[int]
    rollback_id: int
    rollback_version: int
    final_version: int
    shard_map: _common_pb2.ShardMap
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., epoch: _Optional[int] = ..., live_workers: _Optional[_Iterable[str]] = ..., live_incarnations: _Optional[_Iterable[int]] = ..., rollback_id: _Optional[int] = ..., rollback_version: _Optional[int] = ..., final_version: _Optional[int] = ..., shard_map: _Optional[_Union[_common_pb2.ShardMap, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("unknown_node", "assignment", "jobs", "lease_ms")
    UNKNOWN_NODE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    unknown_node: bool
    assignment: WorkerAssignment
    jobs: _containers.RepeatedCompositeFieldContainer[ServerJobView]
    lease_ms: int
    def __init__(self, unknown_node: _Optional[bool] = ..., assignment: _Optional[_Union[WorkerAssignment, _Mapping]] = ..., jobs: _Optional[_Iterable[_Union[ServerJobView, _Mapping]]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_yaml", "resume_from")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    resume_from: str
    def __init__(self, spec_yaml: _Optional[str] = ..., resume_from: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "include_history", "wait_ms", "wait_while_state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    WAIT_WHILE_STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_history: bool
    wait_ms: int
    wait_while_state: _common_pb2.JobState
    def __init__(self, job_id: _Optional[str] = ..., include_history: _Optional[bool] = ..., wait_ms: _Optional[int] = ..., wait_while_state: _Optional[_Union[_common_pb2.JobState, str]] = ...) -> None: ...

class WorkerProgress(_message.Message):
    __slots__ = ("node_id", "rank", "step", "loss", "steps_per_s", "alive")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    rank: int
    step: int
    loss: float
    steps_per_s: float
    alive: bool
    def __init__(self, node_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., steps_per_s: _Optional[float] = ..., alive: _Optional[bool] = ...) -> None: ...

class LossPoint(_message.Message):
    __slots__ = ("step", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class EvalPoint(_message.Message):
    __slots__ = ("step", "metric", "value", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    metric: str
    value: float
    loss: float
    def __init__(self, step: _Optional[int] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., loss: _Optional[float] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "state", "reason", "spec_yaml", "created_ms", "ended_ms", "step", "max_steps", "loss", "metric", "metric_value", "best_metric", "best_step", "steps_per_s", "samples", "workers", "servers", "shard_map", "layout", "losses", "evals", "has_eval", "epoch", "resume_from", "rollback_id", "rollback_version", "final_version", "reshard")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    BEST_METRIC_FIELD_NUMBER: _ClassVar[int]
    BEST_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    HAS_EVAL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESHARD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: _common_pb2.JobState
    reason: str
    spec_yaml: str
    created_ms: int
    ended_ms: int
    step: int
    max_steps: int
    loss: float
    metric: str
    metric_value: float
    best_metric: float
    best_step: int
    steps_per_s: float
    samples: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerProgress]
    servers: _containers.RepeatedScalarFieldContainer[str]
    shard_map: _common_pb2.ShardMap
    layout: _common_pb2.Layout
    losses: _containers.RepeatedCompositeFieldContainer[LossPoint]
    evals: _containers.RepeatedCompositeFieldContainer[EvalPoint]
    has_eval: bool
    epoch: int
    resume_from: str
    rollback_id: int
    rollback_version: int
    final_version: int
    reshard: ReshardProgress
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., reason: _Optional[str] = ..., spec_yaml: _Optional[str] = ..., created_ms: _Optional[int] = ..., ended_ms: _Optional[int] = ..., step: _Optional[int] = ..., max_steps: _Optional[int] = ..., loss: _Optional[float] = ..., metric: _Optional[str] = ..., metric_value: _Optional[float] = ..., best_metric: _Optional[float] = ..., best_step: _Optional[int] = ..., steps_per_s: _Optional[float] = ..., samples: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerProgress, _Mapping]]] = ..., servers: _Optional[_Iterable[str]] = ..., shard_map: _Optional[_Union[_common_pb2.ShardMap, _Mapping]] = ..., layout: _Optional[_Union[_common_pb2.Layout, _Mapping]] = ..., losses: _Optional[_Iterable[_Union[LossPoint, _Mapping]]] = ..., evals: _Optional[_Iterable[_Union[EvalPoint, _Mapping]]] = ..., has_eval: _Optional[bool] = ..., epoch: _Optional[int] = ..., resume_from: _Optional[str] = ..., rollback_id: _Optional[int] = ..., rollback_version: _Optional[int] = ..., final_version: _Optional[int] = ..., reshard: _Optional[_Union[ReshardProgress, _Mapping]] = ...) -> None: ...

class ReshardRequest(_message.Message):
    __slots__ = ("job_id", "servers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    servers: int
    def __init__(self, job_id: _Optional[str] = ..., servers: _Optional[int] = ...) -> None: ...

class ReshardResponse(_message.Message):
    __slots__ = ("reshard",)
    RESHARD_FIELD_NUMBER: _ClassVar[int]
    reshard: ReshardProgress
    def __init__(self, reshard: _Optional[_Union[ReshardProgress, _Mapping]] = ...) -> None: ...

class ShardMove(_message.Message):
    __slots__ = ("shard_index", "source", "target", "primary", "phase")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    source: str
    target: str
    primary: bool
    phase: str
    def __init__(self, shard_index: _Optional[int] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., primary: _Optional[bool] = ..., phase: _Optional[str] = ...) -> None: ...

class ReshardProgress(_message.Message):
    __slots__ = ("state", "servers_before", "servers_after", "moves_total", "moves_done", "moves", "message", "elapsed_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVERS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SERVERS_AFTER_FIELD_NUMBER: _ClassVar[int]
    MOVES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MOVES_DONE_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    state: ReshardState
    servers_before: _containers.RepeatedScalarFieldContainer[str]
    servers_after: _containers.RepeatedScalarFieldContainer[str]
    moves_total: int
    moves_done: int
    moves: _containers.RepeatedCompositeFieldContainer[ShardMove]
    message: str
    elapsed_ms: int
    def __init__(self, state: _Optional[_Union[ReshardState, str]] = ..., servers_before: _Optional[_Iterable[str]] = ..., servers_after: _Optional[_Iterable[str]] = ..., moves_total: _Optional[int] = ..., moves_done: _Optional[int] = ..., moves: _Optional[_Iterable[_Union[ShardMove, _Mapping]]] = ..., message: _Optional[str] = ..., elapsed_ms: _Optional[int] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.JobState
    def __init__(self, state: _Optional[_Union[_common_pb2.JobState, str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "role", "address", "state", "incarnation", "last_seen_ms_ago", "job_id", "metrics_address", "device", "hostname", "jobs")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: _common_pb2.Role
    address: str
    state: NodeState
    incarnation: int
    last_seen_ms_ago: int
    job_id: str
    metrics_address: str
    device: str
    hostname: str
    jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., address: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., incarnation: _Optional[int] = ..., last_seen_ms_ago: _Optional[int] = ..., job_id: _Optional[str] = ..., metrics_address: _Optional[str] = ..., device: _Optional[str] = ..., hostname: _Optional[str] = ..., jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class SetLayoutRequest(_message.Message):
    __slots__ = ("job_id", "node_id", "incarnation", "layout")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    incarnation: int
    layout: _common_pb2.Layout
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., layout: _Optional[_Union[_common_pb2.Layout, _Mapping]] = ...) -> None: ...

class SetLayoutResponse(_message.Message):
    __slots__ = ("shard_map",)
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    shard_map: _common_pb2.ShardMap
    def __init__(self, shard_map: _Optional[_Union[_common_pb2.ShardMap, _Mapping]] = ...) -> None: ...

class ActivateJobRequest(_message.Message):
    __slots__ = ("job_id", "node_id", "incarnation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    incarnation: int
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class ActivateJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.JobState
    def __init__(self, state: _Optional[_Union[_common_pb2.JobState, str]] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "loss", "samples", "duration_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    samples: int
    duration_ms: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("job_id", "node_id", "incarnation", "steps", "evals", "finished", "failure", "rollback_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    incarnation: int
    steps: _containers.RepeatedCompositeFieldContainer[StepReport]
    evals: _containers.RepeatedCompositeFieldContainer[EvalPoint]
    finished: bool
    failure: str
    rollback_id: int
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ..., evals: _Optional[_Iterable[_Union[EvalPoint, _Mapping]]] = ..., finished: _Optional[bool] = ..., failure: _Optional[str] = ..., rollback_id: _Optional[int] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ("action", "state")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    action: WorkerAction
    state: _common_pb2.JobState
    def __init__(self, action: _Optional[_Union[WorkerAction, str]] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ...) -> None: ...
