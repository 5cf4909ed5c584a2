"""Reads a daemon's Prometheus metrics: what the tests and the benches check and measure."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(address: str, timeout_s: float = 10.0) -> str:
    """The text exposition served at http://ADDRESS/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:
        return reply.read().decode()


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` (a counter's with its `_total`, a summary's `_sum`...)
    in a text exposition whose labels include `labels`; 0 if there is none."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
