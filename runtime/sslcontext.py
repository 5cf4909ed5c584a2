"""TLS contexts for raw sockets (the data plane) from the process's Security, the same
certificates, CA and rules as its gRPC channels and servers (shardps.runtime.rpc)."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from shardps.runtime import rpc


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads a certificate chain only from files: a private temporary directory."""
    with tempfile.TemporaryDirectory(prefix="shardps-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)


def server_context(security: rpc.Security) -> ssl.SSLContext | None:
    """TLS for a data-plane listener, as rpc.bind does for gRPC (None: plain TCP)."""
    if not (security.cert and security.key):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, security.cert, security.key)
    if security.ca:
        context.load_verify_locations(cadata=security.ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(security: rpc.Security) -> ssl.SSLContext | None:
    """TLS for data-plane connections, as rpc.make_channel does for gRPC (None: plain TCP)."""
    if not security.tls:
        return None
    context = ssl.create_default_context(cadata=security.ca.decode() if security.ca else None)
    if security.cert and security.key:
        _load_chain(context, security.cert, security.key)
    return context
