"""Idle channels survive the keepalive pings that shardps's clients send.

Clients ping a channel that has no call in flight (`grpc.keepalive_permit_without_calls`), and
a server that did not permit that counted each ping as a strike and after two closed the
channel with GOAWAY `too_many_pings`: a worker idle between jobs found its channel gone.
The ping interval here is 11 s (the servers allow one per 10 s) rather than 30, so the
strikes would come within 35 s.
"""

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardps.runtime import rpc

IDLE_S = 36.0  # three pings at 11 s: two strikes and the GOAWAY, had the server refused them


def test_an_idle_channel_is_not_closed_for_its_keepalive_pings():
    server = rpc.make_server(max_workers=2)
    rpc.add_health(server)
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    channel = rpc.make_channel(f"127.0.0.1:{port}", [("grpc.keepalive_time_ms", 11_000)])
    states: list[grpc.ChannelConnectivity] = []
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        channel.subscribe(states.append)
        time.sleep(IDLE_S)
        # A GOAWAY takes a connected channel to IDLE; pinged and permitted, it stays READY.
        assert grpc.ChannelConnectivity.IDLE not in states, states
        assert states[-1] == grpc.ChannelConnectivity.READY, states
    finally:
        channel.close()
        server.stop(0)
