"""The parameter-server client library: PSClient (init, push, pull, over the data plane or the
gRPC RPCs) and the data plane's client connection."""

from shardps.psclient.client import PSClient, PullResult

__all__ = ["PSClient", "PullResult"]
