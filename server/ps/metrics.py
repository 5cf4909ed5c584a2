"""Prometheus metrics of the parameter server (labels: job, status, reason, shard, table only)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import REJECT_REASONS
from .registry import ShardRegistry
from .table_metrics import TableCollector

# Wire transfers of up to a few hundred MB; Adam of up to ~1 GB shards.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STALENESS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class PSMetrics:
    """The server's counters and histograms, registered on one daemon's registry.

    Thread-safe (prometheus_client metrics are). Versions and shard sizes are read from the
    ShardRegistry at scrape time, so dropped shards disappear from /metrics by themselves.
    """

    def __init__(self, registry: CollectorRegistry, shards: ShardRegistry):
        self.pushes = Counter("shardps_ps_pushes_total", "Pushes handled, by outcome",
                              ["job", "status"], registry=registry)
        self.pulls = Counter("shardps_ps_pulls_total", "Pulls answered", ["job"],
                             registry=registry)
        self.push_bytes = Counter("shardps_ps_push_bytes_total",
                                  "Gradient bytes received in pushes", ["job"], registry=registry)
        self.pull_bytes = Counter("shardps_ps_pull_bytes_total", "Weight bytes sent in pulls",
                                  ["job"], registry=registry)
        self.push_seconds = Histogram("shardps_ps_push_seconds",
                                      "Push handling time, first message to reply",
                                      buckets=_SECONDS, registry=registry)
        self.pull_seconds = Histogram("shardps_ps_pull_seconds",
                                      "Pull streaming time after the wait (snapshot and send)",
                                      buckets=_SECONDS, registry=registry)
        self.apply_seconds = Histogram("shardps_ps_apply_seconds",
                                       "Apply time of a push that ran an Adam step (lock, sync mean, Adam)",
                                       buckets=_SECONDS, registry=registry)
        self.staleness = Histogram("shardps_ps_staleness",
                                   "async/ssp: shard version minus the push's base version",
                                   ["job"], buckets=_STALENESS, registry=registry)
        self.rejected = Counter("shardps_ps_rejected_pushes_total",
                                "Pushes refused with an error status, by reason", ["reason"],
                                registry=registry)
        for reason in REJECT_REASONS:  # export every reason at 0, so rates exist before the first rejection
            self.rejected.labels(reason)
        self.transfers = Counter("shardps_ps_transfers_total",
                                 "Shard transfers this primary sent to joining copies, by result",
                                 ["result"], registry=registry)
        for result in ("done", "failed"):
            self.transfers.labels(result)
        self.forwards = Counter("shardps_ps_forwarded_pushes_total",
                                "Pushes this primary forwarded to its backups, by way: cut_through "
                                "(on as each piece arrived) or whole (once all of it was in)",
                                ["way"], registry=registry)
        for way in ("cut_through", "whole"):
            self.forwards.labels(way)
        self.shm_bytes = Counter("shardps_ps_shared_memory_bytes_total",
                                 "Element bytes of pushes and pulls that went through shared-memory "
                                 "segments (the data plane's same-host path; also counted in "
                                 "push and pull bytes), by direction", ["direction"], registry=registry)
        for direction in ("push", "pull"):
            self.shm_bytes.labels(direction)
        self.shm_segments = Gauge("shardps_ps_shared_memory_segments",
                                  "Shared-memory segments mapped now (one per data-plane "
                                  "connection on the same-host path)", registry=registry)
        self.shm_segment_bytes = Gauge("shardps_ps_shared_memory_segment_bytes",
                                       "Bytes of /dev/shm this server's segments hold, offered or "
                                       "mapped (at most 4 x its shards' fp32 bytes)",
                                       registry=registry)
        self._shard_collector = _ShardCollector(shards)
        registry.register(self._shard_collector)
        registry.register(TableCollector(shards))


class _ShardCollector(Collector):
    """Reports each shard's version, size, waiting pulls and consistency records at scrape time."""

    def __init__(self, shards: ShardRegistry):
        self._shards = shards

    def collect(self) -> Iterator[Metric]:
        version = GaugeMetricFamily("shardps_ps_version", "Shard version (Adam steps applied)",
                                    labels=["job", "shard"])
        size = GaugeMetricFamily("shardps_ps_shard_bytes",
                                 "Resident bytes of a shard: fp32 weights plus Adam m and v",
                                 labels=["job", "shard"])
        waiting = GaugeMetricFamily("shardps_ps_waiting_pulls",
                                    "Pulls blocked on a version or ssp clock right now",
                                    labels=["job", "shard"])
        live = GaugeMetricFamily("shardps_ps_live_workers",
                                 "Workers the shard counts in its rounds and clock gate now",
                                 labels=["job", "shard"])
        short = CounterMetricFamily("shardps_ps_short_rounds",
                                    "sync rounds completed with fewer workers than they opened "
                                    "with (a worker left mid-round)", labels=["job", "shard"])
        spread = GaugeMetricFamily("shardps_ps_max_clock_spread",
                                   "ssp: largest clock spread (puller minus slowest live worker) "
                                   "a pull was granted at", labels=["job", "shard"])
        mirrors = GaugeMetricFamily("shardps_ps_pull_mirror_bytes",
                                    "Bytes of a shard's mirrors of the workers' copies, for compressed "
                                    "pulls (workers at the same state share one)", labels=["job", "shard"])
        for shard in self._shards.shards():
            labels = [shard.job_id, str(shard.index)]
            info = shard.info()
            mirrors.add_metric(labels, shard.mirrors.held_bytes())
            version.add_metric(labels, info.version)
            size.add_metric(labels, shard.resident_bytes())
            waiting.add_metric(labels, shard.waiting_pulls)
            live.add_metric(labels, len(info.live_workers))
            short.add_metric(labels, info.short_rounds)
            spread.add_metric(labels, info.max_clock_spread)
        yield from (version, size, waiting, live, short, spread, mirrors)

    def describe(self) -> Iterator[Metric]:
        return iter(())
