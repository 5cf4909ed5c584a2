"""deploy/: every file parses, every shardps command line in it is accepted by the real CLI,
and ports, addresses, volumes and secrets agree across compose, Prometheus, Grafana,
Kubernetes and systemd files.

How a command line is checked: `accepted()` calls the daemon's real `main(argv)` (its own
parser and its own checks after parsing, e.g. --lease-ms > 0, --device, --threads) and
stops it at `setup_logging`, the first thing each daemon does once its arguments are
accepted and before it reads a file, binds a port or creates a directory. So an unknown
flag, a bad value or a refused combination fails here exactly as it would at start-up,
without starting anything. The compose commands also run for real, as a local cluster
that trains a job, in tests/e2e/test_compose_commands.py.
"""

from __future__ import annotations

import argparse
import configparser
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import pytest
import yaml

from shardps.runtime import daemon as daemon_lib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
DAEMONS = {
    "shardps-coordinator": "shardps.server.coordinator.daemon",
    "shardps-server": "shardps.server.ps.daemon",
    "shardps-worker": "shardps.worker.daemon",
}
PROBE = "shardps-healthcheck"
SECURITY_ENV = ("SHARDPS_TLS_CERT", "SHARDPS_TLS_KEY", "SHARDPS_TLS_CA", "SHARDPS_TOKEN_FILE")
# What `shardps certs DIR` writes for daemons (checked against the real command below).
DAEMON_SECRET_FILES = {"ca.pem", "node.pem", "node-key.pem", "token"}


# ---------------------------------------------------------------------------- the real CLI

class _Accepted(Exception):
    """Raised where a daemon's main() would start doing things: its arguments passed."""


def accepted(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """Runs the real `main` of argv[0] on argv[1:] until its arguments are accepted.

    `env` is the environment the command runs with (flags default from SHARDPS_* variables).
    A `--device cuda[:N]` is checked as on a machine with 8 GPUs. Returns the parsed
    arguments; fails the test if the daemon refuses them.
    """
    program, *args = argv
    assert program in DAEMONS, f"not a shardps daemon: {program}"
    main = importlib.import_module(DAEMONS[program]).main
    parsed: list[argparse.Namespace] = []
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_args(self, *a, **kw):
        namespace = real_parse_args(self, *a, **kw)
        parsed.append(namespace)
        return namespace

    def stop(*a, **kw):
        raise _Accepted

    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}
    environ.update(env or {})
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, environ, clear=True))
        stack.enter_context(mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args))
        for name in ("setup_logging", "configure_security", "run_until_signal"):
            stack.enter_context(mock.patch.object(daemon_lib, name, stop))
        if any(re.fullmatch(r"cuda(:\d+)?", a) for a in args):
            import torch
            stack.enter_context(mock.patch.object(torch.cuda, "is_available", lambda: True))
            stack.enter_context(mock.patch.object(torch.cuda, "device_count", lambda: 8))
            stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        try:
            main(args)
        except _Accepted:
            return parsed[-1]
        except SystemExit as exc:
            pytest.fail(f"{shlex.join(argv)} is refused by the real CLI (exit {exc.code}); "
                        f"see the captured stderr")
    pytest.fail(f"{shlex.join(argv)}: main() returned before setting up logging")


def test_accepted_refuses_what_the_daemons_refuse():
    """The checker itself: an unknown flag, a bad value and a post-parse check all fail."""
    for bad in (["shardps-server", "--no-such-flag"], ["shardps-server", "--advertise", "server-0"],
                ["shardps-coordinator", "--lease-ms", "0"], ["shardps-worker", "--device", "tpu"]):
        with pytest.raises(pytest.fail.Exception):
            accepted(bad)
    assert accepted(["shardps-server", "--port", "7000"]).port == 7000


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> Path:
    """A directory written by the real `shardps certs`."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, "-c", "import sys; from shardps.client.cli import main; sys.exit(main())",
                    "certs", str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def dev_certs(certs_dir) -> set[str]:
    """The names of the files `shardps certs` really writes."""
    return {p.name for p in certs_dir.iterdir()}


def test_the_secret_files_deploy_expects_are_what_shardps_certs_writes(dev_certs):
    assert DAEMON_SECRET_FILES <= dev_certs


# ---------------------------------------------------------------------------- every file

def test_every_yaml_file_under_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


# ---------------------------------------------------------------------------- compose

def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose_daemons(path: Path) -> dict[str, dict]:
    """name -> service, for the services of a compose file that run a shardps daemon."""
    return {name: svc for name, svc in load_yaml(path)["services"].items()
            if svc.get("command") and svc["command"][0] in DAEMONS}


def container_port(mapping: str) -> int:
    """The container side of a compose `ports:` entry ("127.0.0.1:7070:7070" -> 7070)."""
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


def compose_args(svc: dict) -> argparse.Namespace:
    return accepted(svc["command"], {k: str(v) for k, v in svc.get("environment", {}).items()})


@pytest.mark.parametrize("file", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_commands_are_accepted_by_the_real_cli(file):
    services = compose_daemons(DEPLOY / file)
    assert services
    for svc in services.values():
        assert isinstance(svc["command"], list), "exec form, so no shell parses it"
        compose_args(svc)


def test_compose_ports_addresses_and_volumes_agree():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose_daemons(DEPLOY / "compose.yaml")
    roles = {name: svc["command"][0] for name, svc in services.items()}
    assert sorted(roles.values()) == sorted(["shardps-coordinator", *["shardps-server"] * 2,
                                            *["shardps-worker"] * 2])
    args = {name: compose_args(svc) for name, svc in services.items()}
    coordinator = next(n for n, r in roles.items() if r == "shardps-coordinator")
    coordinator_address = f"{coordinator}:{args[coordinator].port}"
    data_dirs = []
    for name, svc in services.items():
        a = args[name]
        assert a.host == "0.0.0.0", f"{name} must bind every interface in its container"
        assert a.port > 0 and a.metrics_port > 0, f"{name}: fixed ports"
        # what is published is what the daemon listens on
        assert all(container_port(p) == a.port for p in svc.get("ports", [])), name
        # the health check asks the daemon's own port, and compose stops it with SIGTERM
        assert svc["healthcheck"]["test"][1:] == [PROBE, str(a.port)], name
        assert svc["stop_signal"] == "SIGTERM"
        assert svc["environment"]["SHARDPS_COORDINATOR"] == coordinator_address
        if name != coordinator:
            assert a.coordinator == coordinator_address, name
            assert coordinator in svc["depends_on"], name
        if roles[name] == "shardps-server":
            assert a.advertise == f"{name}:{a.port}", "servers advertise their service name"
        # every directory a daemon writes is a named volume of its own
        mounts = dict(v.split(":")[1::-1] for v in svc.get("volumes", []))  # target -> source
        for flag in ("data_dir", "state_dir"):
            if path := getattr(a, flag, None):
                assert path in mounts, f"{name}: --{flag.replace('_', '-')} {path} is not a volume"
                assert mounts[path] in compose["volumes"], f"{name}: {mounts[path]} is not a named volume"
                data_dirs.append(mounts[path])
    assert len(data_dirs) == len(set(data_dirs)) == 3, "coordinator + 2 servers, none shared"


def test_compose_gpu_overlay_runs_cuda_workers_on_the_cuda_image():
    overlay = compose_daemons(DEPLOY / "compose.gpu.yaml")
    base = compose_daemons(DEPLOY / "compose.yaml")
    assert set(overlay) == {n for n, s in base.items() if s["command"][0] == "shardps-worker"}
    device_ids = []
    for name, svc in overlay.items():
        a, b = compose_args(svc), compose_args(base[name])
        assert a.device == "cuda" and (a.port, a.metrics_port, a.coordinator) == (b.port, b.metrics_port, b.coordinator)
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
        [device] = svc["deploy"]["resources"]["reservations"]["devices"]
        device_ids += device["device_ids"]
    assert len(device_ids) == len(set(device_ids)), "one GPU per worker"


def test_compose_secure_overlay_gives_every_daemon_mounted_tls_and_token(dev_certs):
    overlay = load_yaml(DEPLOY / "compose.secure.yaml")
    assert set(overlay["services"]) == set(compose_daemons(DEPLOY / "compose.yaml"))
    files = {name: Path(s["file"]) for name, s in overlay["secrets"].items()}
    assert {f.name for f in files.values()} == DAEMON_SECRET_FILES & dev_certs
    assert all(f.parent == Path("secrets") for f in files.values())
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "secrets/" in ignored, "keys written into deploy/secrets must never be committed"
    for name, svc in overlay["services"].items():
        env = svc["environment"]
        assert set(SECURITY_ENV) <= set(env), name
        for variable in SECURITY_ENV:
            secret = env[variable].removeprefix("/run/secrets/")
            assert env[variable] == f"/run/secrets/{secret}" and secret in svc["secrets"], (name, variable)
        # with those variables set, the daemon's flags pick them up
        a = accepted(compose_daemons(DEPLOY / "compose.yaml")[name]["command"], env)
        assert (a.tls_cert, a.token_file) == (env["SHARDPS_TLS_CERT"], env["SHARDPS_TOKEN_FILE"])


def test_compose_prometheus_scrapes_what_the_services_serve():
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose_daemons(DEPLOY / "compose.yaml")
    args = {name: compose_args(svc) for name, svc in services.items()}
    coordinator = next(n for n, s in services.items() if s["command"][0] == "shardps-coordinator")
    workers = sorted(n for n, s in services.items() if s["command"][0] == "shardps-worker")
    prom = compose["services"]["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert mounts[config_path] == "./compose/prometheus.yml"
    config = load_yaml(DEPLOY / "compose" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert all(j["honor_labels"] is True for j in jobs.values()), "the `job` label is the training job"
    metrics = f"{coordinator}:{args[coordinator].metrics_port}"
    assert jobs["shardps-coordinator"]["static_configs"][0]["targets"] == [metrics]
    assert jobs["shardps-nodes"]["http_sd_configs"][0]["url"] == f"http://{metrics}/sd"
    worker_targets = jobs["shardps-workers"]["static_configs"][0]["targets"]
    assert sorted(worker_targets) == [f"{w}:{args[w].metrics_port}" for w in workers]
    # servers are discovered: what they register is their advertised host with their metrics port
    assert all(args[n].advertise.startswith(f"{n}:") for n, s in services.items()
               if s["command"][0] == "shardps-server")


@pytest.mark.parametrize("config", ["compose/prometheus.yml", "prometheus.yml"])
def test_prometheus_configs_pass_promtool(config):
    promtool = shutil.which("promtool")
    if not promtool:
        if os.environ.get("SHARDPS_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("promtool is not installed but SHARDPS_REQUIRE_PROMETHEUS=1")
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisions_the_dashboard_and_the_compose_prometheus():
    compose = load_yaml(DEPLOY / "compose.yaml")
    grafana = compose["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source
            mounts[target] = DEPLOY / source
    provisioning = mounts["/etc/grafana/provisioning"]
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    prometheus_port = container_port(compose["services"]["prometheus"]["ports"][0])
    assert datasource["url"] == f"http://prometheus:{prometheus_port}" and datasource["type"] == "prometheus"
    [provider] = load_yaml(provisioning / "dashboards" / "shardps.yaml")["providers"]
    dashboards = [t for t, s in mounts.items() if s.suffix == ".json"]
    assert dashboards and all(Path(t).parent == Path(provider["options"]["path"]) for t in dashboards)
    assert all(json.loads(mounts[t].read_text())["panels"] for t in dashboards)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


# ---------------------------------------------------------------------------- Kubernetes

def k8s_objects() -> list[dict]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    objects = []
    for resource in kustomization["resources"]:
        objects += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return objects


def pod_templates() -> dict[str, tuple[dict, dict]]:
    """workload name -> (workload, its pod spec)."""
    return {o["metadata"]["name"]: (o, o["spec"]["template"]["spec"])
            for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")}


def k8s_command(container: dict, workload: dict) -> tuple[list[str], dict[str, str]]:
    """A container's command line with $(VAR) expanded, and its environment (sample values
    for downward-API fields: the first pod of the workload)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = f"{workload['metadata']['name']}-0"

    def expand(arg: str) -> str:
        for name in re.findall(r"\$\((\w+)\)", arg):
            assert name in env, f"$({name}) is not in the container's env"
            arg = arg.replace(f"$({name})", env[name])
        return arg

    return [expand(a) for a in [*container["command"], *container.get("args", [])]], env


def test_k8s_commands_are_accepted_by_the_real_cli():
    seen = set()
    for workload, pod in pod_templates().values():
        for container in pod["containers"]:
            argv, env = k8s_command(container, workload)
            accepted(argv, env)
            seen.add(argv[0])
    assert seen == set(DAEMONS)


def test_k8s_ports_services_probes_and_annotations_agree():
    objects = k8s_objects()
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    workloads = pod_templates()
    args = {}
    for name, (workload, pod) in workloads.items():
        [container] = pod["containers"]
        argv, env = k8s_command(container, workload)
        a = args[argv[0]] = accepted(argv, env)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"grpc": a.port, "metrics": a.metrics_port}
        if getattr(a, "data_port", None) is not None:  # servers: the data plane, on a fixed port
            expected["data"] = a.data_port
        assert a.host == "0.0.0.0" and ports == expected, name
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(a.metrics_port), name
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]
            if "grpc" in check:
                assert check["grpc"]["port"] == a.port, (name, probe)
            else:
                assert check["exec"]["command"] == [PROBE, str(a.port)], (name, probe)
        assert pod["securityContext"]["runAsNonRoot"] is True
        # every Service in front of this workload reaches the container's real ports
        for svc in services.values():
            if svc["spec"]["selector"].items() <= labels.items():
                for port in svc["spec"]["ports"]:
                    target = port["targetPort"]
                    assert (ports[target] if isinstance(target, str) else target) in ports.values()
                    assert port["port"] == ports[port["name"]], (svc["metadata"]["name"], port)
    # everyone dials the coordinator through its Service
    coordinator = services["shardps-coordinator"]
    grpc_port = next(p["port"] for p in coordinator["spec"]["ports"] if p["name"] == "grpc")
    for daemon in ("shardps-server", "shardps-worker"):
        assert args[daemon].coordinator == f"shardps-coordinator:{grpc_port}"
    # servers advertise their pod's stable name under the StatefulSet's headless Service
    statefulset, _ = workloads["shardps-server"]
    headless = services[statefulset["spec"]["serviceName"]]
    assert statefulset["kind"] == "StatefulSet" and headless["spec"]["clusterIP"] == "None"
    server = args["shardps-server"]
    assert server.advertise == f"shardps-server-0.{headless['metadata']['name']}:{server.port}"
    # GPU workers ask for a GPU and insist on CUDA
    [worker] = workloads["shardps-worker"][1]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and args["shardps-worker"].device == "cuda"


def test_k8s_volumes_and_secrets_agree(dev_certs):
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert all((K8S / r).is_file() for r in kustomization["resources"])
    generated = {g["name"]: {Path(f).name for f in g["files"]} for g in kustomization["secretGenerator"]}
    assert set().union(*generated.values()) == DAEMON_SECRET_FILES & dev_certs
    assert all(f.startswith("secrets/") for g in kustomization["secretGenerator"] for f in g["files"])
    assert "k8s/secrets/" in (DEPLOY / ".gitignore").read_text().split()
    for name, (workload, pod) in pod_templates().items():
        [container] = pod["containers"]
        argv, env = k8s_command(container, workload)
        a = accepted(argv, env)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if getattr(a, "data_dir", None):
            assert mounts.get(a.data_dir) in claims, f"{name}: --data-dir must be a PersistentVolumeClaim"
        if getattr(a, "state_dir", None):
            assert a.state_dir in mounts, name
        for variable in SECURITY_ENV:
            path = Path(env[variable])
            volume = volumes[mounts[str(path.parent)]]
            secret = volume["secret"]["secretName"]
            assert path.name in generated[secret], f"{name}: {variable}={path} is not in Secret {secret}"
    [server] = [w for w, _ in pod_templates().values() if w["kind"] == "StatefulSet"]
    assert server["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_kustomize_renders_the_manifests_with_the_generated_secrets(certs_dir, tmp_path):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed")
    shutil.copytree(K8S, tmp_path / "k8s")
    shutil.copytree(certs_dir, tmp_path / "k8s" / "secrets")
    out = subprocess.run([kubectl, "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    secrets = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Secret"}
    used = {v["secret"]["secretName"] for d in rendered if d["kind"] in ("Deployment", "StatefulSet")
            for v in d["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    assert used and used <= set(secrets), "every mounted Secret is one kustomize generates"
    assert all(set(s["data"]) <= DAEMON_SECRET_FILES for s in secrets.values())
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["Deployment", "Deployment", "Secret", "Secret", "Service", "Service", "StatefulSet"]


def test_k8s_monitoring_scrapes_the_named_metrics_ports_with_honor_labels():
    [monitor] = [d for d in yaml.safe_load_all((K8S / "monitoring.yaml").read_text()) if d]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True and endpoint["port"] == "metrics"
    for workload, pod in pod_templates().values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert any(p["name"] == "metrics" for p in pod["containers"][0]["ports"])


# ---------------------------------------------------------------------------- systemd

UNITS = ["shardps-coordinator.service", "shardps-server@.service", "shardps-worker@.service"]
# Instances the units are checked with, as `systemctl start shardps-worker@cuda:0` would run them.
INSTANCES = {"shardps-coordinator.service": [""], "shardps-server@.service": ["7000", "7001"],
             "shardps-worker@.service": ["cpu", "cuda", "cuda:1"]}


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((SYSTEMD / name).read_text())
    return unit


def env_file() -> dict[str, str]:
    lines = (SYSTEMD / "shardps.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def systemd_command(unit: configparser.ConfigParser, instance: str) -> list[str]:
    """ExecStart with the specifiers and ${VARS} systemd would expand."""
    line = unit["Service"]["ExecStart"]
    env = env_file()
    for name in re.findall(r"\$\{(\w+)\}", line):
        assert name in env, f"${{{name}}} is not set in deploy/systemd/shardps.env"
        line = line.replace(f"${{{name}}}", env[name])
    specifiers = {"%i": instance, "%I": instance, "%H": "node-a", "%S": "/var/lib", "%%": "%"}
    line = re.sub(r"%.", lambda m: specifiers[m.group(0)], line)
    argv = shlex.split(line)
    assert argv[0].startswith("/opt/shardps/bin/"), argv[0]
    return [Path(argv[0]).name, *argv[1:]]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_restart_stop_and_keep_state_as_a_service_should(name):
    service = read_unit(name)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "/etc/shardps/shardps.env"
    assert service["User"] == service["Group"] == "shardps"
    assert service["KillSignal"] == "SIGTERM" and service["TimeoutStopSec"].endswith("s")
    assert service["StateDirectory"].startswith("shardps/")
    assert read_unit(name)["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", UNITS)
def test_systemd_command_lines_are_accepted_by_the_real_cli(name):
    unit = read_unit(name)
    for instance in INSTANCES[name]:
        argv = systemd_command(unit, instance)
        a = accepted(argv, env_file())
        state = f"/var/lib/{unit['Service']['StateDirectory']}".replace("%i", instance)
        for flag in ("data_dir", "state_dir"):
            if getattr(a, flag, None):
                assert getattr(a, flag) == state, f"{name}: --{flag} is not its StateDirectory"
        if argv[0] == "shardps-server":
            assert a.port == int(instance) and a.advertise == f"node-a:{instance}"
            assert a.data_dir, "a server keeps checkpoints"
        if argv[0] == "shardps-worker":
            assert a.device == instance


def test_systemd_coordinator_matches_the_environment_file_and_prometheus():
    a = accepted(systemd_command(read_unit("shardps-coordinator.service"), ""), env_file())
    assert env_file()["SHARDPS_COORDINATOR"].rsplit(":", 1)[1] == str(a.port)
    # deploy/prometheus.yml scrapes a coordinator on its own machine
    config = load_yaml(DEPLOY / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["shardps-coordinator"]["static_configs"][0]["targets"] == [f"127.0.0.1:{a.metrics_port}"]
    assert jobs["shardps-nodes"]["http_sd_configs"][0]["url"] == f"http://127.0.0.1:{a.metrics_port}/sd"
    assert set(SECURITY_ENV) <= set(env_file())


# ---------------------------------------------------------------------------- Dockerfiles

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            steps.append((instruction, rest.strip()))
    return steps


@pytest.mark.parametrize("name, base", [("Dockerfile", "python:3.11-slim"),
                                        ("Dockerfile.cuda", "nvidia/cuda:")])
def test_dockerfiles_are_well_formed_and_copy_what_the_repository_has(name, base):
    steps = dockerfile(name)
    unknown = [i for i, _ in steps if i.upper() not in INSTRUCTIONS or i != i.upper()]
    assert not unknown, f"{name}: not Dockerfile instructions: {unknown}"
    assert steps[0][0] == "FROM" and steps[0][1].startswith(base)
    assert "runtime" in steps[0][1] or name == "Dockerfile"
    copies = [rest.split() for i, rest in steps if i in ("COPY", "ADD")]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert not source.startswith("--"), "no stage or chown tricks needed"
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
    assert ["deploy/healthcheck.py", f"/usr/local/bin/{PROBE}"] in copies, "the probe compose and k8s run"
    assert any(i == "RUN" and "torch==${TORCH_VERSION}" in r for i, r in steps)
    users = [r for i, r in steps if i == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "runs as a dedicated user"
    assert all(json.loads(r)[0] == "shardps" for i, r in steps if i == "ENTRYPOINT")
    cmd = json.loads(next(r for i, r in reversed(steps) if i == "CMD"))
    assert cmd[0] in {"shardps", *DAEMONS}
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    assert ".git" in ignore and "deploy/secrets" in ignore and "deploy/k8s/secrets" in ignore


def test_every_target_uses_the_same_ports_and_the_images_expose_them():
    """The README's one port table: compose and Kubernetes agree role by role."""
    compose = {s["command"][0]: (a.port, a.metrics_port) for s in compose_daemons(DEPLOY / "compose.yaml").values()
               for a in [compose_args(s)]}
    k8s = {}
    for workload, pod in pod_templates().values():
        argv, env = k8s_command(pod["containers"][0], workload)
        a = accepted(argv, env)
        k8s[argv[0]] = (a.port, a.metrics_port)
    assert compose == k8s and len(set(compose.values())) == 3
    cpu_exposed = {int(p) for i, r in dockerfile("Dockerfile") if i == "EXPOSE" for p in r.split()}
    assert cpu_exposed == {p for ports in compose.values() for p in ports}
    cuda_exposed = {int(p) for i, r in dockerfile("Dockerfile.cuda") if i == "EXPOSE" for p in r.split()}
    assert cuda_exposed == set(compose["shardps-worker"])


def test_deploy_files_use_the_images_the_dockerfiles_build():
    compose = load_yaml(DEPLOY / "compose.yaml")
    gpu = load_yaml(DEPLOY / "compose.gpu.yaml")
    built = {svc["image"]: svc["build"]["dockerfile"] for f in (compose, gpu)
             for svc in f["services"].values() if "build" in svc}
    assert built == {"shardps:0.1.0": "deploy/Dockerfile", "shardps:0.1.0-cuda": "deploy/Dockerfile.cuda"}
    for _, pod in pod_templates().values():
        assert all(c["image"] in built for c in pod["containers"])
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert all(image.split(":")[1].startswith(version) for image in built)
