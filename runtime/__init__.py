"""Process plumbing every shardps daemon and the client share: channel and server factories
with TLS and the token (rpc), the guard on every gRPC call, daemon flags, logging, metrics
endpoint and signals (daemon), connection admission for raw TCP listeners (gate), TLS
contexts for raw sockets and development certificates."""
