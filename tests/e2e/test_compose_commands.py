"""deploy/compose.yaml's daemon services run as a local cluster and train a job.

Each service's command runs as a real process (tests/harness.py) with only what loopback
needs rewritten: `--host 0.0.0.0` -> 127.0.0.1, fixed ports -> 0 with the real addresses
substituted wherever another service names them (`coordinator:7070` -> 127.0.0.1:PORT),
and named volumes -> temporary directories. A server's `--advertise server-0:7000` is
dropped rather than rewritten: its port is only known once it is bound, and the address it
then advertises by default, 127.0.0.1:PORT, is exactly what the rewrite would give.
The services' compose health checks run against the live daemons, a digits job runs through
`shardps submit --wait`, and every daemon exits 0 on SIGTERM, as `docker compose down` asks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests import harness

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROBE = DEPLOY / "healthcheck.py"
DAEMONS = ("shardps-coordinator", "shardps-server", "shardps-worker")


def daemon_services(path: Path) -> dict[str, dict]:
    services = yaml.safe_load(path.read_text())["services"]
    return {n: s for n, s in services.items() if s.get("command") and s["command"][0] in DAEMONS}


def start_order(services: dict[str, dict]) -> list[list[str]]:
    """Waves of services whose depends_on are all in earlier waves."""
    waves: list[list[str]] = []
    done: set[str] = set()
    while len(done) < len(services):
        wave = sorted(n for n, s in services.items() if n not in done
                      and set(s.get("depends_on", [])) & set(services) <= done)
        assert wave, f"depends_on has a cycle among {set(services) - done}"
        waves.append(wave)
        done |= set(wave)
    return waves


class Loopback:
    """Rewrites compose command lines and environments for processes on this machine."""

    def __init__(self, services: dict[str, dict], tmp: Path):
        self.services = services
        self.tmp = tmp
        self.addresses: dict[str, str] = {}  # "service:port" as compose names it -> real address

    def volume(self, name: str, path: str) -> str:
        for volume in self.services[name].get("volumes", []):
            source, target = volume.split(":")[:2]
            if path == target or path.startswith(target + "/"):
                local = self.tmp / "volumes" / source
                local.mkdir(parents=True, exist_ok=True)
                return str(local) + path[len(target):]
        return path

    def value(self, name: str, value: str) -> str:
        if re.fullmatch(r"([\w-]+):\d+", value) and value.split(":")[0] in self.services:
            return self.addresses[value]  # a KeyError: depends_on does not order the services
        return self.volume(name, value) if value.startswith("/") else value

    def command(self, name: str) -> list[str]:
        program, *args = self.services[name]["command"]
        out: list[str] = []
        flags = iter(args)
        for flag in flags:
            value = next(flags)  # every flag compose passes takes a value
            if flag == "--advertise":
                assert value.startswith(f"{name}:"), "a server advertises its own service name"
                continue
            if flag == "--host":
                value = "127.0.0.1"
            elif flag in ("--port", "--metrics-port", "--data-port"):
                value = "0"
            else:
                value = self.value(name, value)
            out += [flag, value]
        return [program, *out]

    def env(self, name: str, extra: dict | None = None) -> dict[str, str]:
        env = {**self.services[name].get("environment", {}), **(extra or {})}
        # The coordinator's own SHARDPS_COORDINATOR (for `docker compose exec` clients) names
        # an address that exists only once it runs; the daemon does not read it.
        return {k: self.value(name, str(v)) for k, v in env.items() if not str(v).startswith(f"{name}:")}

    def started(self, name: str, daemon: harness.Daemon) -> None:
        port = self.services[name]["command"][self.services[name]["command"].index("--port") + 1]
        self.addresses[f"{name}:{port}"] = daemon.address


def probe(address: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}
    return subprocess.run([sys.executable, str(PROBE), address], capture_output=True, text=True,
                          timeout=30, env={**environ, **(env or {})})


def short_digits_spec(tmp: Path, servers: int, workers: int) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    spec["cluster"] = {"servers": servers, "workers": workers}
    spec["stop"] = {"max_steps": 60, "eval_every": 30}
    spec["checkpoint"] = {"every_steps": 30}
    path = tmp / "digits-short.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_compose_services_run_as_a_cluster_that_trains_digits(tmp_path):
    services = daemon_services(DEPLOY / "compose.yaml")
    loopback = Loopback(services, tmp_path)
    running: dict[str, harness.Daemon] = {}
    for wave in start_order(services):
        starting = {n: harness.Daemon(*loopback.command(n), env=loopback.env(n)) for n in wave}
        for name, daemon in starting.items():
            running[name] = daemon.wait_ready(120)
            loopback.started(name, daemon)

    for name in running:  # `healthcheck: test: [CMD, shardps-healthcheck, PORT]`, PORT rewritten
        command, program, port = services[name]["healthcheck"]["test"]
        assert (command, program) == ("CMD", "shardps-healthcheck")
        out = probe(loopback.addresses[f"{name}:{port}"])
        assert out.returncode == 0 and "SERVING" in out.stdout, out.stdout + out.stderr

    kinds = [s["command"][0] for s in services.values()]
    spec = short_digits_spec(tmp_path, kinds.count("shardps-server"), kinds.count("shardps-worker"))
    coordinator = next(running[n] for n, s in services.items() if s["command"][0] == "shardps-coordinator")
    done = harness.run_cli("submit", str(spec), "--wait", "--coordinator", coordinator.address, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr + "\n".join(d.output() for d in running.values())
    assert re.search(r"\b(COMPLETED|CONVERGED)\b", done.stdout), done.stdout

    for wave in reversed(start_order(services)):  # as `docker compose down` stops them
        for name in wave:
            running[name].signal(signal.SIGTERM)
        for name in wave:
            code = running[name].wait(30)  # stop_grace_period
            assert code == 0, f"{name} did not exit 0 on SIGTERM:\n{running[name].output()}"
    # the servers kept their state where compose mounts their named volumes
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            if svc["command"][0] == "shardps-server":
                local = tmp_path / "volumes" / volume.split(":")[0]
                assert any(local.iterdir()), f"{name} wrote nothing into its volume"


def test_the_secure_overlay_serves_mutual_tls_with_the_token(tmp_path):
    """compose.secure.yaml's environment, with its secrets from `shardps certs`: the coordinator
    serves mutual TLS, the health probe passes with the same environment (as compose and k8s
    run it) and fails without it, and a client is let in with the token and refused without."""
    certs = tmp_path / "secrets"
    made = harness.run_cli("certs", str(certs), timeout=60)
    assert made.returncode == 0, made.stderr
    overlay = yaml.safe_load((DEPLOY / "compose.secure.yaml").read_text())
    files = {f"/run/secrets/{name}": str(certs / Path(s["file"]).name) for name, s in overlay["secrets"].items()}
    services = daemon_services(DEPLOY / "compose.yaml")
    name = next(n for n, s in services.items() if s["command"][0] == "shardps-coordinator")
    secure_env = {k: files[v] for k, v in overlay["services"][name]["environment"].items()}
    loopback = Loopback(services, tmp_path)
    coordinator = harness.start(*loopback.command(name), env=loopback.env(name, secure_env))

    assert probe(coordinator.address, secure_env).returncode == 0
    refused = probe(coordinator.address)
    assert refused.returncode == 1 and "SERVING" not in refused.stdout
    inside = harness.run_cli("status", "--coordinator", coordinator.address, env=secure_env)
    assert inside.returncode == 0, inside.stderr
    no_token = {k: v for k, v in secure_env.items() if k != "SHARDPS_TOKEN_FILE"}
    outside = harness.run_cli("status", "--coordinator", coordinator.address, env=no_token)
    assert outside.returncode == 1 and "token" in outside.stderr
    assert coordinator.stop() == 0
