#!/usr/bin/env python3
"""gRPC health probe for shardps daemons: `shardps-healthcheck [HOST:]PORT`.

Exits 0 when the daemon at HOST:PORT (default host: localhost) answers SERVING to
grpc.health.v1 Check, 1 when it answers anything else or does not answer within 3 s.
Health needs no token. TLS comes from the daemon's own environment ($SHARDPS_TLS_CERT,
$SHARDPS_TLS_KEY, $SHARDPS_TLS_CA), so the probe presents the node certificate that a
mutual-TLS daemon demands; that is why it exists: Kubernetes' built-in `grpc:` probe and
Docker cannot present a client certificate. The node certificate must name `localhost`
(`shardps certs` does). Installed in the images as /usr/local/bin/shardps-healthcheck.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEADLINE_S = 3.0


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable)
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def check(address: str) -> str:
    """The health status name the daemon at address reports (raises grpc.RpcError)."""
    cert, key, ca = _read("SHARDPS_TLS_CERT"), _read("SHARDPS_TLS_KEY"), _read("SHARDPS_TLS_CA")
    if ca or cert:
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: shardps-healthcheck [HOST:]PORT", file=sys.stderr)
        return 2
    address = argv[0] if ":" in argv[0] else f"localhost:{argv[0]}"
    try:
        status = check(address)
    except (grpc.RpcError, OSError) as exc:
        code = exc.code().name if isinstance(exc, grpc.RpcError) else exc
        print(f"{address}: {code}", file=sys.stderr)
        return 1
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
