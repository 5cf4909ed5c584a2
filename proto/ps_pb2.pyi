from shardps.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_STATUS_UNSPECIFIED: _ClassVar[PushStatus]
    PUSH_STATUS_APPLIED: _ClassVar[PushStatus]
    PUSH_STATUS_ACCEPTED: _ClassVar[PushStatus]
    PUSH_STATUS_DUPLICATE: _ClassVar[PushStatus]
    PUSH_STATUS_STALE: _ClassVar[PushStatus]
    PUSH_STATUS_JOB_DONE: _ClassVar[PushStatus]

class PushCompression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_COMPRESSION_NONE: _ClassVar[PushCompression]
    PUSH_COMPRESSION_TOPK: _ClassVar[PushCompression]
    PUSH_COMPRESSION_INT8: _ClassVar[PushCompression]
    PUSH_COMPRESSION_SIGN: _ClassVar[PushCompression]
PUSH_STATUS_UNSPECIFIED: PushStatus
PUSH_STATUS_APPLIED: PushStatus
PUSH_STATUS_ACCEPTED: PushStatus
PUSH_STATUS_DUPLICATE: PushStatus
PUSH_STATUS_STALE: PushStatus
PUSH_STATUS_JOB_DONE: PushStatus
PUSH_COMPRESSION_NONE: PushCompression
PUSH_COMPRESSION_TOPK: PushCompression
PUSH_COMPRESSION_INT8: PushCompression
PUSH_COMPRESSION_SIGN: PushCompression

class ShardConfig(_message.Message):
    __slots__ = ("job_id", "shard_index", "offset", "length", "total", "optimizer", "mode", "staleness", "workers", "epoch", "layout_fingerprint", "checkpoint_every_steps", "checkpoint_keep", "resume_from_job", "resume_version", "step_budget", "tables", "replica_map")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEEP_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_JOB_FIELD_NUMBER: _ClassVar[int]
    RESUME_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_BUDGET_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_MAP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    offset: int
    length: int
    total: int
    optimizer: _common_pb2.OptimizerConfig
    mode: _common_pb2.ConsistencyMode
    staleness: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    layout_fingerprint: str
    checkpoint_every_steps: int
    checkpoint_keep: int
    resume_from_job: str
    resume_version: int
    step_budget: int
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    replica_map: _common_pb2.ShardMap
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., total: _Optional[int] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerConfig, _Mapping]] = ..., mode: _Optional[_Union[_common_pb2.ConsistencyMode, str]] = ..., staleness: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ..., layout_fingerprint: _Optional[str] = ..., checkpoint_every_steps: _Optional[int] = ..., checkpoint_keep: _Optional[int] = ..., resume_from_job: _Optional[str] = ..., resume_version: _Optional[int] = ..., step_budget: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ..., replica_map: _Optional[_Union[_common_pb2.ShardMap, _Mapping]] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "dim", "num_embeddings", "num_shards", "optimizer", "lr", "beta1", "beta2", "eps", "weight_decay", "initial_accumulator_value", "seed", "init", "init_a", "init_b", "admit_after", "evict_after_steps", "max_rows", "max_bytes", "sketch_width", "sketch_depth", "sketch_halve_every", "server_init")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_A_FIELD_NUMBER: _ClassVar[int]
    INIT_B_FIELD_NUMBER: _ClassVar[int]
    ADMIT_AFTER_FIELD_NUMBER: _ClassVar[int]
    EVICT_AFTER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SKETCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SKETCH_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SKETCH_HALVE_EVERY_FIELD_NUMBER: _ClassVar[int]
    SERVER_INIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    num_embeddings: int
    num_shards: int
    optimizer: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    initial_accumulator_value: float
    seed: int
    init: str
    init_a: float
    init_b: float
    admit_after: int
    evict_after_steps: int
    max_rows: int
    max_bytes: int
    sketch_width: int
    sketch_depth: int
    sketch_halve_every: int
    server_init: ServerInit
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., num_embeddings: _Optional[int] = ..., num_shards: _Optional[int] = ..., optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., seed: _Optional[int] = ..., init: _Optional[str] = ..., init_a: _Optional[float] = ..., init_b: _Optional[float] = ..., admit_after: _Optional[int] = ..., evict_after_steps: _Optional[int] = ..., max_rows: _Optional[int] = ..., max_bytes: _Optional[int] = ..., sketch_width: _Optional[int] = ..., sketch_depth: _Optional[int] = ..., sketch_halve_every: _Optional[int] = ..., server_init: _Optional[_Union[ServerInit, _Mapping]] = ...) -> None: ...

class ServerInit(_message.Message):
    __slots__ = ("kind", "a", "b", "seed", "padding_idx")
    KIND_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PADDING_IDX_FIELD_NUMBER: _ClassVar[int]
    kind: str
    a: float
    b: float
    seed: int
    padding_idx: int
    def __init__(self, kind: _Optional[str] = ..., a: _Optional[float] = ..., b: _Optional[float] = ..., seed: _Optional[int] = ..., padding_idx: _Optional[int] = ...) -> None: ...

class InitShardRequest(_message.Message):
    __slots__ = ("config", "dtype", "chunk")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    config: ShardConfig
    dtype: _common_pb2.DType
    chunk: _common_pb2.TensorChunk
    def __init__(self, config: _Optional[_Union[ShardConfig, _Mapping]] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class InitShardResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("job_id", "shard_index", "worker_id", "incarnation", "step", "base_version", "dtype", "batch_size", "length", "compression", "compressed_bytes", "replica_epoch", "pieces", "rollback_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    worker_id: str
    incarnation: int
    step: int
    base_version: int
    dtype: _common_pb2.DType
    batch_size: int
    length: int
    compression: PushCompression
    compressed_bytes: int
    replica_epoch: int
    pieces: int
    rollback_id: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., worker_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., step: _Optional[int] = ..., base_version: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., batch_size: _Optional[int] = ..., length: _Optional[int] = ..., compression: _Optional[_Union[PushCompression, str]] = ..., compressed_bytes: _Optional[int] = ..., replica_epoch: _Optional[int] = ..., pieces: _Optional[int] = ..., rollback_id: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: _common_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("status", "version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    status: PushStatus
    version: int
    def __init__(self, status: _Optional[_Union[PushStatus, str]] = ..., version: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "dtype", "min_version", "timeout_ms", "worker_id", "clock", "chunk_bytes", "compress", "held_tag", "reply_tag")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    HELD_TAG_FIELD_NUMBER: _ClassVar[int]
    REPLY_TAG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    dtype: _common_pb2.DType
    min_version: int
    timeout_ms: int
    worker_id: str
    clock: int
    chunk_bytes: int
    compress: str
    held_tag: int
    reply_tag: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., min_version: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., compress: _Optional[str] = ..., held_tag: _Optional[int] = ..., reply_tag: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("ready", "version", "length", "job_done", "chunk", "delta_compression", "compressed_bytes")
    READY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    JOB_DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DELTA_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    version: int
    length: int
    job_done: bool
    chunk: _common_pb2.TensorChunk
    delta_compression: PushCompression
    compressed_bytes: int
    def __init__(self, ready: _Optional[bool] = ..., version: _Optional[int] = ..., length: _Optional[int] = ..., job_done: _Optional[bool] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ..., delta_compression: _Optional[_Union[PushCompression, str]] = ..., compressed_bytes: _Optional[int] = ...) -> None: ...

class GetShardInfoRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("job_id", "shard_index", "offset", "length", "version", "adam_step", "state", "pushes_applied", "worker_clocks", "max_clock_spread", "short_rounds", "live_workers", "epoch", "tables", "replica_epoch", "replica_role", "rollback_id")
    class WorkerClocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAM_STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    WORKER_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_SPREAD_FIELD_NUMBER: _ClassVar[int]
    SHORT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    offset: int
    length: int
    version: int
    adam_step: int
    state: _common_pb2.JobState
    pushes_applied: int
    worker_clocks: _containers.ScalarMap[str, int]
    max_clock_spread: int
    short_rounds: int
    live_workers: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    replica_epoch: int
    replica_role: str
    rollback_id: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., version: _Optional[int] = ..., adam_step: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., pushes_applied: _Optional[int] = ..., worker_clocks: _Optional[_Mapping[str, int]] = ..., max_clock_spread: _Optional[int] = ..., short_rounds: _Optional[int] = ..., live_workers: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ..., replica_epoch: _Optional[int] = ..., replica_role: _Optional[str] = ..., rollback_id: _Optional[int] = ...) -> None: ...

class GetShardInfoResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ...) -> None: ...

class GetPreconditionerRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "chunk_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    chunk_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class GetPreconditionerResponse(_message.Message):
    __slots__ = ("denominator", "offset_elements", "length_elements")
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    denominator: bytes
    offset_elements: int
    length_elements: int
    def __init__(self, denominator: _Optional[bytes] = ..., offset_elements: _Optional[int] = ..., length_elements: _Optional[int] = ...) -> None: ...

class DropJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DropJobResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job_id", "at_version", "timeout_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    at_version: int
    timeout_ms: int
    def __init__(self, job_id: _Optional[str] = ..., at_version: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ShardCheckpoint(_message.Message):
    __slots__ = ("job_id", "shard_index", "version", "path")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    version: int
    path: str
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., version: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardCheckpoint]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardCheckpoint, _Mapping]]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[ShardCheckpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[ShardCheckpoint, _Mapping]]] = ...) -> None: ...

class GetDataPlaneRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDataPlaneResponse(_message.Message):
    __slots__ = ("port", "protocol")
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    port: int
    protocol: int
    def __init__(self, port: _Optional[int] = ..., protocol: _Optional[int] = ...) -> None: ...

class InitRowsRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "table", "rows", "first_row")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ROW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    table: str
    rows: bytes
    first_row: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., table: _Optional[str] = ..., rows: _Optional[bytes] = ..., first_row: _Optional[int] = ...) -> None: ...

class InitRowsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PullRowsRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "table", "ids", "min_version", "timeout_ms", "clock", "no_count")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    NO_COUNT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    table: str
    ids: bytes
    min_version: int
    timeout_ms: int
    clock: int
    no_count: bool
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., table: _Optional[str] = ..., ids: _Optional[bytes] = ..., min_version: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., clock: _Optional[int] = ..., no_count: _Optional[bool] = ...) -> None: ...

class PullRowsResponse(_message.Message):
    __slots__ = ("ready", "version", "rows", "job_done")
    READY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    JOB_DONE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    version: int
    rows: bytes
    job_done: bool
    def __init__(self, ready: _Optional[bool] = ..., version: _Optional[int] = ..., rows: _Optional[bytes] = ..., job_done: _Optional[bool] = ...) -> None: ...

class PushRowsRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "table", "worker_id", "incarnation", "step", "batch_size", "ids", "rows", "dtype")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    table: str
    worker_id: str
    incarnation: int
    step: int
    batch_size: int
    ids: bytes
    rows: bytes
    dtype: _common_pb2.DType
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., table: _Optional[str] = ..., worker_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., step: _Optional[int] = ..., batch_size: _Optional[int] = ..., ids: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class ExportRowsRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "table", "min_version", "timeout_ms", "after_set", "after_id", "max_rows")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    AFTER_SET_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    table: str
    min_version: int
    timeout_ms: int
    after_set: bool
    after_id: int
    max_rows: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., table: _Optional[str] = ..., min_version: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., after_set: _Optional[bool] = ..., after_id: _Optional[int] = ..., max_rows: _Optional[int] = ...) -> None: ...

class ExportRowsResponse(_message.Message):
    __slots__ = ("ready", "version", "ids", "rows", "more")
    READY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    version: int
    ids: bytes
    rows: bytes
    more: bool
    def __init__(self, ready: _Optional[bool] = ..., version: _Optional[int] = ..., ids: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class PushRowsResponse(_message.Message):
    __slots__ = ("status", "version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    status: PushStatus
    version: int
    def __init__(self, status: _Optional[_Union[PushStatus, str]] = ..., version: _Optional[int] = ...) -> None: ...

class TransferShardRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "join_epoch", "file", "offset", "data")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    JOIN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    join_epoch: int
    file: str
    offset: int
    data: bytes
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., join_epoch: _Optional[int] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinShardRequest(_message.Message):
    __slots__ = ("job_id", "shard_index", "join_epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    JOIN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    shard_index: int
    join_epoch: int
    def __init__(self, job_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., join_epoch: _Optional[int] = ...) -> None: ...

class JoinShardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferShardResponse(_message.Message):
    __slots__ = ("version", "drained")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    version: int
    drained: int
    def __init__(self, version: _Optional[int] = ..., drained: _Optional[int] = ...) -> None: ...
