"""The launcher's table of console scripts and its readiness lines; summing scraped metrics."""

import re
from pathlib import Path

from shardps.client import launcher, scrape

ROOT = Path(__file__).resolve().parents[2]

EXPOSITION = """\
# HELP shardps_ps_pushes_total Pushes by outcome.
# TYPE shardps_ps_pushes_total counter
shardps_ps_pushes_total{job="a",status="applied"} 40.0
shardps_ps_pushes_total{job="a",status="duplicate"} 1.0
shardps_ps_pushes_total{job="b",status="applied"} 7.0
# HELP shardps_ps_pushes_total_extra Another metric whose name starts the same.
# TYPE shardps_ps_pushes_total_extra gauge
shardps_ps_pushes_total_extra{job="a"} 1000.0
# HELP shardps_ps_apply_seconds Time to apply a push.
# TYPE shardps_ps_apply_seconds summary
shardps_ps_apply_seconds_count{job="a"} 3.0
shardps_ps_apply_seconds_sum{job="a"} 0.25
"""


def test_the_scripts_are_the_console_scripts_of_pyproject():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    declared = dict(re.findall(r'^(\S+) = "([\w.]+):main"$', section, re.M))
    assert declared == launcher.SCRIPTS


def test_readiness_lines():
    assert launcher.LISTENING.match("listening on 127.0.0.1:4242").group(1) == "127.0.0.1:4242"
    assert launcher.LISTENING.match("listening on [::1]:80").group(1) == "[::1]:80"
    peer = "listening on 127.0.0.1:5 grpc=127.0.0.1:6"  # bench/peer.py says more after a space
    assert launcher.LISTENING.match(peer).group(1) == "127.0.0.1:5"
    assert not launcher.LISTENING.match("a log line: listening on 127.0.0.1:1")
    assert launcher.METRICS.match("metrics on 0.0.0.0:9100").group(1) == "0.0.0.0:9100"


def test_total_sums_the_samples_of_one_name_with_the_given_labels():
    assert scrape.total(EXPOSITION, "shardps_ps_pushes_total") == 48
    assert scrape.total(EXPOSITION, "shardps_ps_pushes_total", job="a") == 41
    assert scrape.total(EXPOSITION, "shardps_ps_pushes_total", job="a", status="duplicate") == 1
    assert scrape.total(EXPOSITION, "shardps_ps_apply_seconds_sum", job="a") == 0.25
    assert scrape.total(EXPOSITION, "shardps_ps_pushes_total", job="c") == 0
    assert scrape.total(EXPOSITION, "shardps_no_such_metric") == 0
