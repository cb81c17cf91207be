"""docker-compose.yml is valid and safe to run on a laptop: checked by docker-compose itself.

``docker-compose config`` validates and normalises the file without a Docker engine. On the
normalised form: host ports bind to 127.0.0.1, recloop's services share one image, every
recloop process opens a metrics port that Prometheus scrapes, and the files mounted into
Prometheus and Grafana exist and agree with each other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "recloop.json"

# The long-running recloop processes, by the CLI command their container runs.
PROCESS_COMMANDS = {"sim", "streams", "learn", "serve"}


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed; on Debian/Ubuntu: apt-get install docker-compose",
            pytrace=False,
        )
    return exe


def _yaml_to_data(text: str) -> object:
    """Parse YAML with the PyYAML that Debian's docker-compose itself runs on.

    recloop does not depend on PyYAML; docker-compose 1.x is a Python script that does, so its
    own interpreter can read YAML. The test asks for that docker-compose, not Compose v2.
    """
    exe = _docker_compose()
    first = Path(exe).read_bytes()[:200].split(b"\n", 1)[0]
    assert first.startswith(b"#!") and b"python" in first, (
        f"{exe} is not the Python docker-compose; install Debian's (apt-get install docker-compose)"
    )
    interpreter = first[2:].decode().split()
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    proc = subprocess.run(
        [*interpreter, "-c", code], input=text, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@cache
def _config() -> dict:
    proc = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose config rejected the file:\n{proc.stderr}"
    config = _yaml_to_data(proc.stdout)
    assert isinstance(config, dict)
    return config


def _services() -> dict[str, dict]:
    return _config()["services"]


def _recloop_services() -> dict[str, dict]:
    """Services built from this repository (the Dockerfile)."""
    return {name: svc for name, svc in _services().items() if "build" in svc}


def _process_services() -> dict[str, dict]:
    return {
        name: svc
        for name, svc in _recloop_services().items()
        if (svc.get("command") or [""])[0] in PROCESS_COMMANDS
    }


def _host_ip(port: str | dict) -> str | None:
    if isinstance(port, dict):  # long syntax
        return port.get("host_ip")
    parts = str(port).split(":")
    # HOST_IP:HOST_PORT:CONTAINER_PORT, HOST_PORT:CONTAINER_PORT, or CONTAINER_PORT
    return parts[0] if len(parts) == 3 else None


def test_compose_file_is_valid_for_docker_compose():
    services = _services()
    for name in ("kafka", "postgres", "topics", "sim", "streams", "learner", "serve", "demo",
                 "prometheus", "grafana", "kafka-ui"):  # fmt: skip
        assert name in services, f"service {name!r} missing from {COMPOSE.name}"


def test_every_published_port_is_bound_to_loopback():
    published = 0
    for name, svc in _services().items():
        assert svc.get("network_mode") != "host", f"{name} would expose every port it opens"
        for port in svc.get("ports", []):
            published += 1
            assert _host_ip(port) == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
    assert published >= 5  # kafka, postgres, prometheus, grafana, kafka-ui


def test_recloop_services_share_one_image():
    recloop = _recloop_services()
    assert {"topics", "sim", "streams", "learner", "serve", "demo"} <= set(recloop)
    images = {svc.get("image") for svc in recloop.values()}
    contexts = {svc["build"]["context"] for svc in recloop.values()}
    assert images == {"recloop:latest"}, images
    assert contexts == {str(ROOT)}, contexts
    # Nothing else may pose as recloop under a different build.
    others = {n for n, s in _services().items() if str(s.get("image", "")).startswith("recloop")}
    assert others == set(recloop)


def test_prometheus_scrapes_every_recloop_process():
    processes = _process_services()
    assert set(processes) == {"sim", "streams", "learner", "serve"}
    config = _yaml_to_data(PROMETHEUS_YML.read_text())
    assert isinstance(config, dict)
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for name, svc in processes.items():
        env = svc.get("environment", {})
        port = int(env.get("RECLOOP_METRICS_PORT", "0"))
        assert port > 0, f"{name} does not set RECLOOP_METRICS_PORT, so it serves no metrics"
        # 127.0.0.1 (the default) inside a container is unreachable from Prometheus's.
        assert env.get("RECLOOP_METRICS_HOST") == "0.0.0.0", name
        assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}:{port}"


def _bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in _services()[service].get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = str(volume).split(":")[:2]
        if source.startswith("/"):
            mounts[target] = Path(source)
    return mounts


def test_dashboard_files_are_mounted_where_the_provisioning_expects_them():
    prometheus = _bind_mounts("prometheus")
    assert prometheus["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    command = " ".join(_services()["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command

    grafana = _bind_mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    providers = _yaml_to_data((GRAFANA_PROVISIONING / "dashboards" / "recloop.yml").read_text())
    assert isinstance(providers, dict)
    (provider,) = providers["providers"]
    assert grafana[provider["options"]["path"]] == DASHBOARD.parent
    assert DASHBOARD.exists()

    sources = _yaml_to_data((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert isinstance(sources, dict)
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    # The dashboard names its datasource by uid; it must be the provisioned one.
    uids = {p["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert uids == {source["uid"]}


def test_kafka_ui_points_at_the_compose_broker():
    env = _services()["kafka-ui"]["environment"]
    assert env["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"] == "kafka:9092"
    assert "kafbat/kafka-ui" in _services()["kafka-ui"]["image"]


def test_every_recloop_service_command_is_one_the_cli_accepts():
    """Each service's command parses as the CLI would parse it (options, types, ranges),
    without running it: a renamed or mistyped option fails here, not in a container."""
    import typer

    from recloop.cli import _register, app

    _register()
    root = typer.main.get_command(app)
    parsed = {}
    for name, svc in _recloop_services().items():
        args = [str(a) for a in svc["command"]]
        ctx = root.make_context("recloop", list(args))
        command, rest = root, args
        while hasattr(command, "get_command"):  # a group: go down to the named command
            sub_name, rest = rest[0], rest[1:]
            command = command.get_command(ctx, sub_name)
            assert command is not None, f"{name}: recloop has no command {sub_name!r}"
            ctx = command.make_context(sub_name, list(rest), parent=ctx)
        parsed[name] = ctx.params
    assert parsed["sim"]["rate"] > 0  # unthrottled, the simulator outruns the learner
    assert set(parsed) >= {"topics", "sim", "streams", "learner", "serve", "demo"}
