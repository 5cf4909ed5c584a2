"""What a shard may be created from: its ShardConfig and its initial weights (InitShard, and a
checkpoint's config on restore)."""

from __future__ import annotations

import torch

from shardps.proto import codec, ps_pb2
from shardps.proto.states import MODE_NAMES

from . import schedule
from .errors import InvalidConfigError
from .tables import validate_tables


def validate_config(config: ps_pb2.ShardConfig) -> None:
    """Raises InvalidConfigError unless the config describes a shard this server can run."""
    if not config.job_id:
        raise InvalidConfigError("config.job_id is empty")
    if config.shard_index < 0 or config.offset < 0 or config.length <= 0:
        raise InvalidConfigError(
            f"bad range: index {config.shard_index}, offset {config.offset}, "
            f"length {config.length}")
    if config.total < config.offset + config.length:
        raise InvalidConfigError(
            f"range [{config.offset}, {config.offset + config.length}) exceeds total "
            f"{config.total}")
    if config.mode not in MODE_NAMES:
        raise InvalidConfigError(f"unknown consistency mode {config.mode}")
    if config.staleness < 0:
        raise InvalidConfigError(f"staleness must be >= 0, got {config.staleness}")
    if len(set(config.workers)) != len(config.workers):
        raise InvalidConfigError("worker ids are not unique")
    schedule.validate(config.optimizer)
    validate_tables(config)
    validate_replica_map(config)


def validate_replica_map(config: ps_pb2.ShardConfig) -> None:
    """Raises InvalidConfigError unless `replica_map` (replicated jobs only) names this shard
    once with a replica epoch, as many backup addresses as backup ids for every shard, and no
    server twice among a shard's copies. A shard with embedding tables is not replicated."""
    if not config.HasField("replica_map"):
        return
    field = "config.replica_map"
    if config.tables:
        raise InvalidConfigError(f"{field}: a shard with embedding tables cannot be "
                                 "replicated yet")
    mine = [s for s in config.replica_map.shards if s.index == config.shard_index]
    if len(mine) != 1 or mine[0].replica_epoch <= 0:
        raise InvalidConfigError(f"{field}: must name shard {config.shard_index} once, with "
                                 "replica_epoch > 0")
    for shard in config.replica_map.shards:
        if len(shard.backup_ids) != len(shard.backup_addresses):
            raise InvalidConfigError(
                f"{field}: shard {shard.index} has {len(shard.backup_ids)} backup_ids and "
                f"{len(shard.backup_addresses)} backup_addresses")
        copies = [shard.server_id, *shard.backup_ids]
        if shard.replica_epoch < 0 or len(set(copies)) != len(copies):
            raise InvalidConfigError(f"{field}: shard {shard.index} names a server twice "
                                     "among its copies, or has a negative replica_epoch")


def check_initial_weights(weights: torch.Tensor, length: int) -> None:
    """Raises InvalidConfigError unless `weights` is a finite fp32 vector of `length`."""
    if weights.dtype != torch.float32 or weights.dim() != 1 or weights.numel() != length:
        raise InvalidConfigError(f"initial weights must be fp32[{length}], got {weights.dtype} "
                                 f"{tuple(weights.shape)}")
    if not codec.finite(weights):
        raise InvalidConfigError("initial weights have non-finite values")
