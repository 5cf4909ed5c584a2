"""`shardps local`: a coordinator, N servers and M workers as subprocesses on loopback.

Starts the daemons (their own entry points, never imported here: subprocesses, or forks of a
fork server that imports them by name, see client/forkserver.py), runs one
job with live progress, prints the verdict and stops everything it started — also on Ctrl-C,
on failure and when a daemon dies.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import yaml

from shardps.client import cli
from shardps.client.api import SUCCESS_STATES, ClientError, CoordinatorClient, state_name
from shardps.client.forkserver import ForkedProcess, ForkServer, ForkServerError
from shardps.proto import exitcodes

# Entry points of the daemons, run as `python -c` so no console script must be on PATH.
ENTRY_POINTS = {
    "coordinator": "shardps.server.coordinator.daemon",
    "server": "shardps.server.ps.daemon",
    "worker": "shardps.worker.daemon",
}
LISTENING = re.compile(r"^listening on (\S+:\d+)$")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def default_spec_text() -> str:
    """The built-in example job (identical to examples/digits.yaml)."""
    return resources.files("shardps.client").joinpath("default_job.yaml").read_text()


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class Child:
    """One daemon process; its output goes to a log file, its address is read from it.

    It is a subprocess of ours, or (with a fork server) forked by the fork server; either
    way it runs in a session of its own, so Ctrl-C reaches us alone and we stop it in order.
    """

    def __init__(self, name: str, kind: str, args: list[str], log_dir: Path,
                 forks: ForkServer | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.address = ""
        self._ready = threading.Event()
        self.proc: subprocess.Popen | ForkedProcess
        if forks is not None:
            self.proc = forks.spawn(ENTRY_POINTS[kind], args)
        else:
            code = f"import sys; from {ENTRY_POINTS[kind]} import main; sys.exit(main())"
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=_child_env(),
                start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"log-{name}")
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                if not self.address and (m := LISTENING.match(line.strip())):
                    self.address = m.group(1)
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, deadline: float) -> str:
        self._ready.wait(max(0.0, deadline - time.monotonic()))
        if not self.address:
            raise ClientError(f"{self.name} did not start (exit code {self.proc.poll()}); "
                              f"see {self.log_path}")
        return self.address

    @property
    def exited(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended in the meantime
            self.proc.wait(10)
        self._reader.join(5)


class LocalCluster:
    """Starts and stops the daemons of one local cluster. Not thread-safe.

    With `fork_server` (on Linux), one process imports torch and the daemons' modules while
    the coordinator starts, then forks the servers and workers (client/forkserver.py);
    otherwise each is a fresh `python` subprocess that imports everything itself.
    """

    def __init__(self, servers: int, workers: int, log_dir: Path, lease_ms: int,
                 security_args: list[str] | None = None, fork_server: bool = True):
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.coordinator = ""
        self._servers, self._workers, self._lease_ms = servers, workers, lease_ms
        self._security_args = security_args or []
        self._fork_server = fork_server and sys.platform.startswith("linux")
        self._forks: ForkServer | None = None

    def start(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        if self._fork_server:  # it imports while the coordinator starts
            self._forks = ForkServer([ENTRY_POINTS["server"], ENTRY_POINTS["worker"]],
                                     self.log_dir / "forkserver.log", env=_child_env())
        coord = self._spawn("coordinator", "coordinator",
                            ["--port", "0", "--lease-ms", str(self._lease_ms)], fork=False)
        self.coordinator = coord.wait_ready(deadline)
        threads = max(1, (os.cpu_count() or 1) // max(1, self._workers))
        for i in range(self._servers):
            self._spawn(f"server-{i}", "server", ["--port", "0", "--coordinator", self.coordinator])
        for i in range(self._workers):
            self._spawn(f"worker-{i}", "worker", ["--port", "0", "--coordinator", self.coordinator,
                                                  "--threads", str(threads)])
        for child in self.children:
            child.wait_ready(deadline)
        return self.coordinator

    def _spawn(self, name: str, kind: str, args: list[str], fork: bool = True) -> Child:
        try:
            child = Child(name, kind, [*args, *self._security_args], self.log_dir,
                          self._forks if fork else None)
        except ForkServerError as exc:
            raise ClientError(f"cannot start {name}: {exc}") from None
        self.children.append(child)
        return child

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.exited is not None]

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
                child.reap(deadline)
        if self._forks is not None:
            self._forks.close()


def _job_text(args) -> str:
    text = cli.read_spec(args.spec) if args.spec else default_spec_text()
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
    from shardps.proto import rpc, tls

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
    live = cli.Live(min_interval_s=args.interval) if args.output != "json" else None
    started = time.monotonic()

    def on_update(info) -> None:
        dead = [c for c in cluster.dead_children() if c.name == "coordinator"]
        if dead:
            raise ClientError(f"the coordinator exited (code {dead[0].exited}); see {dead[0].log_path}")
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
        print(json.dumps({**cli.to_json(info), "elapsed_s": round(elapsed, 3)}, indent=2))
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
