"""Prometheus metrics of a server's checkpoints: writes, copy and write times, restores."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class CheckpointMetrics:
    """Registered on one daemon's registry. Thread-safe (prometheus_client metrics are)."""

    def __init__(self, registry: CollectorRegistry):
        self.written = Counter("shardps_ps_checkpoints_total",
                               "Checkpoint writes, by result (written, failed, superseded)",
                               ["result"], registry=registry)
        self.seconds = Histogram("shardps_ps_checkpoint_seconds",
                                 "Time to write one checkpoint (outside the shard lock)",
                                 buckets=_SECONDS, registry=registry)
        self.copy_seconds = Histogram("shardps_ps_checkpoint_copy_seconds",
                                      "Time the shard lock is held to copy a checkpoint's state",
                                      buckets=_SECONDS, registry=registry)
        self.version = Gauge("shardps_ps_checkpoint_version",
                             "Version of the newest checkpoint written", ["job", "shard"],
                             registry=registry)
        # Age, the Prometheus way: time() - shardps_ps_checkpoint_timestamp_seconds.
        self.timestamp = Gauge("shardps_ps_checkpoint_timestamp_seconds",
                               "Unix time the newest checkpoint was written", ["job", "shard"],
                               registry=registry)
        self.restores = Counter("shardps_ps_restores_total",
                                "Shards restored from a checkpoint, by kind (startup, "
                                "rollback, resume)", ["kind"], registry=registry)
        self.fallbacks = Counter("shardps_ps_checkpoint_fallbacks_total",
                                 "Unusable checkpoints skipped for an older one (torn, "
                                 "corrupt)", registry=registry)
        self.lost = Counter("shardps_ps_lost_updates_total",
                            "Versions a shard had applied that its restored checkpoint lacks "
                            "(async/ssp: lost; sync: replayed by the workers)", ["job"],
                            registry=registry)
