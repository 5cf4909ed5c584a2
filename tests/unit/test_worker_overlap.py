"""Buckets of the overlapped push (worker/overlap.py): contiguous, at parameter boundaries."""

from __future__ import annotations

from torch import nn

from shardps.proto import layout as layout_lib
from shardps.worker.overlap import buckets_of


def _layout(*shapes: tuple[int, ...]):
    return layout_lib.make_layout((f"p{i}", shape) for i, shape in enumerate(shapes))


def test_buckets_cover_the_vector_in_order_and_close_at_parameter_boundaries():
    layout = _layout((1000,), (10,), (3000,), (10,), (5,))
    ranges, of_param = buckets_of(layout, bucket_bytes=4000)  # 1000 elements
    assert ranges == [(0, 1000), (1000, 4010), (4010, 4025)]
    assert of_param == [0, 1, 1, 2, 2]
    assert ranges[-1][1] == layout.total


def test_one_bucket_when_everything_fits_and_a_parameter_per_bucket_when_each_is_large():
    layout = layout_lib.layout_of(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert buckets_of(layout, bucket_bytes=1 << 20) == ([(0, layout.total)], [0, 0, 0, 0])
    ranges, of_param = buckets_of(_layout((2,), (3,), (4,)), bucket_bytes=4)
    assert ranges == [(0, 2), (2, 5), (5, 9)] and of_param == [0, 1, 2]
