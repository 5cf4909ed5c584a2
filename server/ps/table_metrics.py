"""Prometheus metrics of the embedding tables a server holds (docs/metrics.md), read from each
table shard's counters (TableShard.stats) at scrape time, labelled by job, shard and table."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .registry import ShardRegistry

_LABELS = ["job", "shard", "table"]


class TableCollector(Collector):
    """Rows held, bytes, admissions, evictions (by reason), unadmitted reads and dropped
    gradient rows of every table of every shard. Dropped shards disappear by themselves.
    Thread-safe: each table's stats() takes its lock."""

    def __init__(self, shards: ShardRegistry):
        self._shards = shards

    def collect(self) -> Iterator[Metric]:
        rows = GaugeMetricFamily("shardps_ps_table_rows", "Rows of the table this shard holds",
                                 labels=_LABELS)
        size = GaugeMetricFamily("shardps_ps_table_bytes",
                                 "Resident bytes of the table on this shard: rows, optimizer "
                                 "state, ids, index and admission sketch", labels=_LABELS)
        admitted = CounterMetricFamily("shardps_ps_table_admissions",
                                       "Dynamic table: rows created (ids admitted)", labels=_LABELS)
        evicted = CounterMetricFamily("shardps_ps_table_evictions",
                                      "Dynamic table: rows evicted, by reason (idle: untouched "
                                      "for evict_after_steps; cap: max_rows or max_bytes)",
                                      labels=[*_LABELS, "reason"])
        unadmitted = CounterMetricFamily("shardps_ps_table_unadmitted_reads",
                                         "Dynamic table: ids pulled that read as zeros (not "
                                         "admitted yet, or no room under the cap)", labels=_LABELS)
        dropped = CounterMetricFamily("shardps_ps_table_dropped_rows",
                                      "Dynamic table: gradient rows dropped (their id held no row)",
                                      labels=_LABELS)
        for shard in self._shards.shards():
            for spec in shard.config.tables:
                labels = [shard.job_id, str(shard.index), spec.name]
                stats = shard.rows.stats(spec.name)
                rows.add_metric(labels, stats.rows)
                size.add_metric(labels, stats.bytes)
                admitted.add_metric(labels, stats.admissions)
                evicted.add_metric([*labels, "idle"], stats.evicted_idle)
                evicted.add_metric([*labels, "cap"], stats.evicted_cap)
                unadmitted.add_metric(labels, stats.unadmitted_reads)
                dropped.add_metric(labels, stats.dropped_rows)
        yield from (rows, size, admitted, evicted, unadmitted, dropped)

    def describe(self) -> Iterator[Metric]:
        return iter(())
