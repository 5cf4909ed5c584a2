"""Compressed pulls (PullRequest.compress, fields 30-39) against real servers, over the data
plane and the Pull RPC: the first pull is dense, later ones are deltas a quarter the size
(int8), what a delta dropped comes with the next one, and a client whose copy the server
does not know (a lost reply, a new client) gets dense weights again."""

from __future__ import annotations

import grpc
import pytest
import torch

from shardps.proto import common_pb2, compress, dataplane, ps_pb2, ps_pb2_grpc
from shardps.psclient import PSClient
from shardps.runtime import rpc
from shardps.worker import recovery
from tests.integration.test_compressed_push import two_servers  # noqa: F401 (a fixture)
from tests.integration.test_ps import ASYNC, shard_config, shard_map

TOTAL = 20_000


def _truth(client: PSClient, total: int = TOTAL) -> torch.Tensor:
    dense = torch.empty(total)
    assert client.pull(dense).ready
    return dense


def test_pulls_are_deltas_against_the_workers_copy_and_catch_up(two_servers):  # noqa: F811
    smap = shard_map(two_servers, TOTAL)
    with PSClient("job", smap, worker_id="w0") as dense, \
            PSClient("job", smap, worker_id="w0", compress_pull="int8") as client:
        dense.init(torch.randn(TOTAL), shard_config(ASYNC))
        dest = torch.empty(TOTAL)
        first = client.pull(dest)
        assert first.ready and torch.equal(dest, _truth(dense))  # nothing to delta against
        assert first.wire_bytes == TOTAL * 4
        for step in range(3):
            dense.push(torch.randn(TOTAL), step=step, base_version=step, batch_size=1)
            result = client.pull(dest, min_version=step + 1)
            assert result.ready and result.versions == [step + 1] * 2
            # Two int8 deltas: n codes, a scale per 256, a 16-byte header each.
            assert result.wire_bytes == sum(16 + 4 * -(-s.length // 256) + s.length
                                            for s in smap.shards)
            error = (dest - _truth(dense)).abs().max()
            assert 0 < error < 1e-3  # lossy, but close (Adam moves each weight ~lr = 0.01)
        # With no new weights, each pull sends what the last one dropped: the copy converges.
        errors = []
        for _ in range(3):
            assert client.pull(dest, min_version=3).ready
            errors.append(float((dest - _truth(dense)).abs().max()))
        assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8
    # A new client (its copy unknown to the servers) is sent dense weights.
    with PSClient("job", smap, worker_id="w0", compress_pull="int8") as again:
        dest2 = torch.empty(TOTAL)
        assert again.pull(dest2).wire_bytes == TOTAL * 4
        with PSClient("job", smap) as dense:
            assert torch.equal(dest2, _truth(dense))


@pytest.mark.parametrize("setting", ["int8", "sign:32"])
def test_a_delta_added_chunk_by_chunk_as_it_lands_keeps_the_copy_in_step(two_servers, setting,  # noqa: F811
                                                                         monkeypatch):
    """A shard of several codec chunks, its deltas landing in 4 KiB pieces that the client
    adds to its copy as they come: the copy is bitwise the server's mirror of it."""
    monkeypatch.setattr(dataplane, "LANDING_BYTES", 4096)
    total = 3 * compress.CHUNK + 77
    smap = shard_map(two_servers[:1], total)
    with PSClient("job", smap, worker_id="w0") as dense, \
            PSClient("job", smap, worker_id="w0", compress_pull=setting) as client:
        dense.init(torch.randn(total), shard_config(ASYNC))
        dest = torch.empty(total)
        assert client.pull(dest).wire_bytes == total * 4
        for step in range(2):
            dense.push(torch.randn(total), step=step, base_version=step, batch_size=1)
            result = client.pull(dest, min_version=step + 1)
            assert result.ready and result.wire_bytes < total * 2  # a delta
            mirror = two_servers[0].shards.shards("job")[0].mirrors.copies(setting).held("w0")
            assert mirror is not None and torch.equal(dest, mirror)
            assert not torch.equal(dest, _truth(dense, total))  # lossy: the check means something


def _converges(client: PSClient, dense: PSClient, dest: torch.Tensor, version: int) -> None:
    """With no new weights, a few more pulls bring the copy to the weights: it and the
    server's mirror of it are in step (a copy out of step would keep its offset)."""
    for _ in range(4):
        assert client.pull(dest, min_version=version).ready
    assert float((dest - _truth(dense)).abs().max()) < 1e-8


def test_a_pull_sent_ahead_and_dropped_unread_leaves_the_copies_in_step(two_servers):  # noqa: F811
    smap = shard_map(two_servers, TOTAL)
    with PSClient("job", smap, worker_id="w0") as dense, \
            PSClient("job", smap, worker_id="w0", compress_pull="int8") as client:
        dense.init(torch.randn(TOTAL), shard_config(ASYNC))
        dest = torch.empty(TOTAL)
        assert client.pull(dest).ready
        for step in range(3):
            # The push sends a pull ahead over the data plane (the first server); a pull with
            # other arguments drops it unread, whether or not the server has answered it yet
            # (if it has, its mirror moved on and the next pull from it is dense).
            client.push(torch.randn(TOTAL), step=step, base_version=step, batch_size=1,
                        then_pull={"min_version": step + 1})
            assert client.pull(dest, min_version=0).ready
            _converges(client, dense, dest, step + 1)
        # And a pull sent ahead that is taken is a delta like any other.
        client.push(torch.randn(TOTAL), step=3, base_version=3, batch_size=1,
                    then_pull={"min_version": 4})
        result = client.pull(dest, min_version=4)
        assert result.ready and result.wire_bytes < TOTAL * 4 / 3
        _converges(client, dense, dest, 4)


@pytest.mark.parametrize("fields, words", [
    (dict(compress="gzip", reply_tag=1), "gzip"),
    (dict(compress="int8", reply_tag=1, dtype=common_pb2.DTYPE_BFLOAT16), "FLOAT32"),
    (dict(compress="int8", reply_tag=0), "reply_tag"),
    (dict(compress="int8", reply_tag=1, worker_id=""), "worker_id"),
])
def test_compressed_pulls_that_cannot_be_served_are_refused(two_servers, fields, words):  # noqa: F811
    server = two_servers[1]
    with PSClient("job", shard_map([server], TOTAL), worker_id="w0") as client:
        client.init(torch.randn(TOTAL), shard_config(ASYNC))
    request = ps_pb2.PullRequest(**{**dict(job_id="job", shard_index=0, worker_id="w0",
                                           dtype=common_pb2.DTYPE_FLOAT32, timeout_ms=1000),
                                    **fields})
    with rpc.make_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(ps_pb2_grpc.ParameterServerStub(channel).Pull(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_workers_pulling_the_same_versions_share_one_mirror_and_the_metric_counts_it(two_servers):  # noqa: F811
    """Two sync-like workers pulling every version get the same deltas (one encode), and each
    server's shardps_ps_pull_mirror_bytes counts one fp32 copy of its shard, not two."""
    smap = shard_map(two_servers, TOTAL)
    with PSClient("job", smap, worker_id="w0") as dense, \
            PSClient("job", smap, worker_id="a", compress_pull="sign:32") as a, \
            PSClient("job", smap, worker_id="b", compress_pull="sign:32") as b:
        dense.init(torch.randn(TOTAL), shard_config(ASYNC, workers=("w0", "a", "b")))
        dest_a, dest_b = torch.empty(TOTAL), torch.empty(TOTAL)
        for step in range(4):
            got_a, got_b = a.pull(dest_a, min_version=step), b.pull(dest_b, min_version=step)
            assert got_a.ready and got_b.ready and got_a.wire_bytes == got_b.wire_bytes
            assert got_a.wire_bytes == (TOTAL * 4 if step == 0 else  # dense, then sign:32 deltas
                                        sum(compress.Sign(32).size(s.length) for s in smap.shards))
            assert torch.equal(dest_a, dest_b)  # the same state: the same bytes were sent to both
            dense.push(torch.randn(TOTAL), step=step, base_version=step, batch_size=1)
        for server, shard in zip(two_servers, smap.shards, strict=True):
            held = server.metrics_registry.get_sample_value(
                "shardps_ps_pull_mirror_bytes", {"job": "job", "shard": str(shard.index)})
            assert held == shard.length * 4


def test_a_remapped_client_keeps_its_copy_so_shards_that_stayed_pull_deltas(two_servers):  # noqa: F811
    """The worker's RemappableClient on a new shard map (here shard 1's address spelled
    another way: the same server, so a new connection): the new PSClient takes the old copy
    and tags over, and the next pull is two deltas, not the dense weights."""
    smap = shard_map(two_servers, TOTAL)
    with PSClient("job", smap, worker_id="w0") as dense:
        dense.init(torch.randn(TOTAL), shard_config(ASYNC))
        client = recovery.RemappableClient(PSClient, "job", smap, worker_id="w0", compress_pull="int8")
        dest = torch.empty(TOTAL)
        assert client.pull(dest).wire_bytes == TOTAL * 4  # the first pull: dense
        moved = common_pb2.ShardMap()
        moved.CopyFrom(smap)
        moved.version = 2
        moved.shards[1].address = moved.shards[1].address.replace("127.0.0.1", "localhost")
        assert client.remap(moved)
        dense.push(torch.randn(TOTAL), step=0, base_version=0, batch_size=1)
        result = client.pull(dest, min_version=1)
        assert result.ready and result.wire_bytes == sum(16 + 4 * -(-s.length // 256) + s.length
                                                         for s in smap.shards)  # two int8 deltas
        _converges(client.client, dense, dest, 1)
        client.client.close()
