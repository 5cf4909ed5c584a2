from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SERVER: _ClassVar[Role]
    ROLE_WORKER: _ClassVar[Role]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_CONVERGED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class ConsistencyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_UNSPECIFIED: _ClassVar[ConsistencyMode]
    CONSISTENCY_SYNC: _ClassVar[ConsistencyMode]
    CONSISTENCY_SSP: _ClassVar[ConsistencyMode]
    CONSISTENCY_ASYNC: _ClassVar[ConsistencyMode]
ROLE_UNSPECIFIED: Role
ROLE_SERVER: Role
ROLE_WORKER: Role
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_CONVERGED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
CONSISTENCY_UNSPECIFIED: ConsistencyMode
CONSISTENCY_SYNC: ConsistencyMode
CONSISTENCY_SSP: ConsistencyMode
CONSISTENCY_ASYNC: ConsistencyMode

class ParamEntry(_message.Message):
    __slots__ = ("name", "shape", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("params", "total", "fingerprint", "tables")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamEntry]
    total: int
    fingerprint: str
    tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, params: _Optional[_Iterable[_Union[ParamEntry, _Mapping]]] = ..., total: _Optional[int] = ..., fingerprint: _Optional[str] = ..., tables: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardRange(_message.Message):
    __slots__ = ("index", "server_id", "address", "offset", "length", "backup_ids", "backup_addresses", "replica_epoch", "joining_ids", "joining_addresses", "joining_epochs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKUP_IDS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOINING_IDS_FIELD_NUMBER: _ClassVar[int]
    JOINING_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    JOINING_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    index: int
    server_id: str
    address: str
    offset: int
    length: int
    backup_ids: _containers.RepeatedScalarFieldContainer[str]
    backup_addresses: _containers.RepeatedScalarFieldContainer[str]
    replica_epoch: int
    joining_ids: _containers.RepeatedScalarFieldContainer[str]
    joining_addresses: _containers.RepeatedScalarFieldContainer[str]
    joining_epochs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., server_id: _Optional[str] = ..., address: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., backup_ids: _Optional[_Iterable[str]] = ..., backup_addresses: _Optional[_Iterable[str]] = ..., replica_epoch: _Optional[int] = ..., joining_ids: _Optional[_Iterable[str]] = ..., joining_addresses: _Optional[_Iterable[str]] = ..., joining_epochs: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("version", "shards")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardRange]
    def __init__(self, version: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardRange, _Mapping]]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "lr", "beta1", "beta2", "eps", "weight_decay", "schedule", "warmup_steps", "total_steps", "min_lr", "freeze_variance_after", "precondition_pushes", "worker_momentum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    FREEZE_VARIANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    PRECONDITION_PUSHES_FIELD_NUMBER: _ClassVar[int]
    WORKER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    total_steps: int
    min_lr: float
    freeze_variance_after: int
    precondition_pushes: bool
    worker_momentum: bool
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr: _Optional[float] = ..., freeze_variance_after: _Optional[int] = ..., precondition_pushes: _Optional[bool] = ..., worker_momentum: _Optional[bool] = ...) -> None: ...
