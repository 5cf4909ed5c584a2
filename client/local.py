"""`shardps local`: a coordinator, N servers and M workers as processes on loopback.

Starts the daemons (their own entry points, never imported here: subprocesses, or forks of
multiprocessing's forkserver, through client/launcher.py), runs one job with live progress,
prints the verdict and stops everything it started — also on Ctrl-C, on failure and when a
daemon dies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml

from shardps.client import launcher, progress
from shardps.client.api import ClientError, CoordinatorClient, read_spec
from shardps.proto import exitcodes
from shardps.proto.states import SUCCESS_STATES, state_name

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def default_spec_text() -> str:
    """The built-in example job (identical to examples/digits.yaml)."""
    return resources.files("shardps.client").joinpath("default_job.yaml").read_text()


class LocalCluster:
    """Starts and stops the daemons of one local cluster. Not thread-safe.

    The coordinator is a fresh `python` subprocess (it does not import torch). With
    `fork_server` (where multiprocessing has one: Unix), multiprocessing's forkserver imports
    torch and the servers' and workers' modules while the coordinator starts, and forks each
    server and worker; otherwise each is a fresh `python` subprocess that imports them itself.
    """

    def __init__(self, servers: int, workers: int, log_dir: Path, lease_ms: int,
                 security_args: list[str] | None = None, fork_server: bool = True):
        self.log_dir = log_dir
        self.children: list[launcher.Daemon] = []
        self.coordinator = ""
        self._servers, self._workers, self._lease_ms = servers, workers, lease_ms
        self._security_args = security_args or []
        self._fork_server = fork_server and launcher.Forks.available()

    def start(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        forks = None
        if self._fork_server:  # it imports while the coordinator starts
            forks = launcher.Forks([launcher.SCRIPTS["shardps-server"], launcher.SCRIPTS["shardps-worker"]])
        coord = self._spawn("coordinator", "shardps-coordinator",
                            ["--port", "0", "--lease-ms", str(self._lease_ms)])
        self.coordinator = self._wait_ready(coord, deadline)
        threads = max(1, (os.cpu_count() or 1) // max(1, self._workers))
        for i in range(self._servers):
            self._spawn(f"server-{i}", "shardps-server", ["--port", "0", "--coordinator", self.coordinator],
                        forks)
        for i in range(self._workers):
            self._spawn(f"worker-{i}", "shardps-worker", ["--port", "0", "--coordinator", self.coordinator,
                                                          "--threads", str(threads)], forks)
        for child in self.children:
            self._wait_ready(child, deadline)
        return self.coordinator

    def _spawn(self, name: str, script: str, args: list[str],
               forks: launcher.Forks | None = None) -> launcher.Daemon:
        try:
            child = launcher.Daemon(name, script, [*args, *self._security_args],
                                    log_path=self.log_dir / f"{name}.log", keep_lines=0, forks=forks)
        except (OSError, EOFError) as exc:  # EOFError: the forkserver is gone
            raise ClientError(f"cannot start {name}: {exc}") from None
        self.children.append(child)
        return child

    @staticmethod
    def _wait_ready(child: launcher.Daemon, deadline: float) -> str:
        try:
            return child.wait_ready(deadline - time.monotonic()).address
        except launcher.StartError as exc:
            raise ClientError(exc.message) from None

    def dead_children(self) -> list[launcher.Daemon]:
        return [c for c in self.children if c.poll() is not None]

    def stop(self) -> None:
        """SIGTERM workers and servers, then, once they have exited, the coordinator (so their
        goodbye heartbeats reach it instead of waiting out their deadline); SIGKILL what
        outlives the deadline."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        nodes = [c for c in self.children if c.name != "coordinator"]
        for group in (nodes, [c for c in self.children if c.name == "coordinator"]):
            for child in reversed(group):
                child.terminate()
            for child in reversed(group):
                child.reap(deadline - time.monotonic())


def _job_text(args) -> str:
    text = read_spec(args.spec) if args.spec else default_spec_text()
    raw = yaml.safe_load(text)
    cluster = raw.setdefault("cluster", {}) or {}
    raw["cluster"] = cluster
    if args.servers is not None:
        cluster["servers"] = args.servers
    if args.workers is not None:
        cluster["workers"] = args.workers
    return yaml.safe_dump(raw, sort_keys=False)


def _secure(directory: Path) -> list[str]:
    """Writes development certificates and a token; configures this client to use them and
    returns the flags that make the daemons require them (mutual TLS + token)."""
    from shardps.runtime import rpc, tls

    tls.write_dev_certs(directory)
    token = secrets.token_urlsafe(32)
    token_file = directory / "token"
    token_file.touch(0o600)
    token_file.write_text(token + "\n")
    rpc.configure(rpc.Security(cert=(directory / "client.pem").read_bytes(),
                               key=(directory / "client-key.pem").read_bytes(),
                               ca=(directory / "ca.pem").read_bytes(), token=token))
    return ["--tls-cert", str(directory / "node.pem"), "--tls-key", str(directory / "node-key.pem"),
            "--tls-ca", str(directory / "ca.pem"), "--token-file", str(token_file)]


def run(args) -> int:
    text = _job_text(args)
    raw = yaml.safe_load(text)
    servers, workers = raw["cluster"].get("servers", 1), raw["cluster"].get("workers", 1)
    if servers < 1 or workers < 1:
        raise ClientError("--servers and --workers must be at least 1", usage=True)
    keep_logs = bool(args.log_dir)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="shardps-local-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    text_out = args.output != "json"
    cluster = LocalCluster(servers, workers, log_dir, args.lease_ms,
                           _secure(log_dir / "certs") if args.secure else None,
                           fork_server=args.fork_server)
    code = exitcodes.FAILURE
    job_id = ""
    try:
        if text_out:
            print(f"starting a coordinator, {servers} server(s) and {workers} worker(s) "
                  f"(logs in {log_dir})", flush=True)
        coordinator = cluster.start()
        with CoordinatorClient(coordinator) as client:
            job_id = client.submit(text)
            if text_out:
                print(f"coordinator at {coordinator}; submitted {job_id}", flush=True)
            code = _follow(client, cluster, job_id, args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the local cluster", file=sys.stderr, flush=True)
        code = exitcodes.INTERRUPTED
        keep_logs = True
    except ClientError:
        keep_logs = True
        raise
    finally:
        cluster.stop()
        if code != exitcodes.OK:
            keep_logs = True
        if keep_logs:
            if text_out:
                print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return code


def _follow(client: CoordinatorClient, cluster: LocalCluster, job_id: str, args) -> int:
    live = progress.Live(min_interval_s=args.interval) if args.output != "json" else None
    started = time.monotonic()

    def on_update(info) -> None:
        dead = [c for c in cluster.dead_children() if c.name == "coordinator"]
        if dead:
            raise ClientError(f"the coordinator exited (code {dead[0].poll()}); see {dead[0].log_path}")
        if live:
            live.update(info)

    try:
        info = client.wait(job_id, timeout_s=args.timeout or None, interval_s=min(args.interval, 0.5),
                           on_update=on_update)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.TIMEOUT
    elapsed = time.monotonic() - started
    if args.export and info.state in SUCCESS_STATES:
        client.export_to(job_id, Path(args.export))
    if args.output == "json":
        print(json.dumps({**progress.to_json(info), "elapsed_s": round(elapsed, 3)}, indent=2))
    else:
        result = f"{job_id} {state_name(info.state)} after {info.step} steps in {elapsed:.1f}s"
        if info.has_eval:
            result += f": {info.metric} {info.metric_value:.4f} (best {info.best_metric:.4f})"
        if info.reason:
            result += f" - {info.reason}"
        print(result)
        if args.export and info.state in SUCCESS_STATES:
            print(f"wrote {args.export}")
    return exitcodes.OK if info.state in SUCCESS_STATES else exitcodes.FAILURE
