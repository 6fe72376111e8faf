"""What can be checked of the deployment files without a Docker engine or a cluster.

docker-compose.yml, deploy/Dockerfile and deploy/k8s/*.yaml must agree with the code: every
command is a real CLI command (its options included), every environment variable is a real
settings field whose value validates, every probe points at an endpoint the process serves
on the port its settings give it, and KEDA watches the streams and group of shared/keys.py.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from pydantic_settings import BaseSettings
from starlette.routing import Match
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.keys import CONSUMER_GROUP, Keys
from shared.models import Priority
from shared.settings import CommonSettings
from slipstream.cli import app as cli
from slipstream.janitor import JanitorSettings
from slipstream.probe import check_worker
from tests.helpers import free_port, gateway_settings, running_gateway, running_worker
from tests.helpers import worker_settings as make_worker_settings
from worker.settings import WorkerSettings

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
ROLES: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "janitor": JanitorSettings,
    "status": CommonSettings,
    "worker-check": CommonSettings,
}


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = str(settings.model_config.get("env_prefix", ""))
    names = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def check_env(role: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> BaseSettings:
    """Every Slipstream variable is a field of the role's settings, and the values validate."""
    settings = ROLES[role]
    ours = {k: v for k, v in env.items() if k.startswith("SLIPSTREAM_") or k == "REDIS_URL"}
    unknown = set(ours) - env_names(settings)
    assert not unknown, f"{role}: not settings fields: {unknown}"
    with monkeypatch.context() as m:
        for k, v in ours.items():
            m.setenv(k, v)
        return settings()


def check_command(args: list[str]) -> None:
    """``slipstream <args> --help`` parses: the command and every option exist."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, f"slipstream {' '.join(args)}: {result.output}"


# --- docker compose ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def slipstream_services(compose: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, svc in compose["services"].items():
        if str(svc.get("image", "")).startswith("slipstream"):
            yield name, svc


def test_compose_services_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "gateway", "worker", "janitor", "prometheus", "grafana"} <= set(services)
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_compose_commands_env_and_dependencies(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    roles = set()
    for name, svc in slipstream_services(compose):
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        check_command(svc["command"])
        settings = check_env(svc["command"][0], svc["environment"], monkeypatch)
        assert urlparse(str(getattr(settings, "redis_url", ""))).hostname == "redis", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        roles.add(svc["command"][0])
    assert roles == {"gateway", "worker", "janitor"}


def test_compose_worker_scales_and_gateway_is_checked(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    assert worker["healthcheck"]["test"][1:] == ["slipstream", "worker-check"]
    check_command(worker["healthcheck"]["test"][2:])
    gateway = services["gateway"]
    settings = check_env("gateway", gateway["environment"], monkeypatch)
    assert isinstance(settings, GatewaySettings) and settings.auth_required is True
    probe = " ".join(gateway["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.port}/readyz" in probe
    assert serves("/readyz") and not serves("/no-such-path")
    assert gateway["ports"] == [f"{settings.port}:{settings.port}"]
    assert services["prometheus"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} is missing"
    assert (ROOT / "deploy/grafana/dashboards/slipstream.json").exists()


# --- Dockerfile ----------------------------------------------------------------------------
def test_dockerfile_is_multi_stage_and_runs_unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(stages) >= 2 and any(" AS builder" in s for s in stages)
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["slipstream"]' in lines
    assert "ARG EXTRAS=llama" in lines  # the default image has the llama engine and model
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                if "[" not in src:
                    assert (ROOT / src).exists(), src
    env = dict(re.findall(r"(SLIPSTREAM_[A-Z_]+)=(\S+)", DOCKERFILE.read_text()))
    assert env, "the image sets no Slipstream defaults"
    known = set().union(*(env_names(cls) for cls in ROLES.values()))
    assert set(env) <= known, set(env) - known  # image-wide: a field of some role
    for role in ("gateway", "worker", "janitor"):
        check_env(role, {k: v for k, v in env.items() if k in env_names(ROLES[role])}, monkeypatch)


# --- Kubernetes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    return env | {e["name"]: str(e["value"]) for e in container.get("env", [])}


def serves(path: str) -> bool:
    """The gateway app has a route that fully matches ``GET path``."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    app = create_app(GatewaySettings())
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def probe_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def test_manifests_are_well_formed(manifests: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d.get("metadata", {}).get("name")) for d in manifests}
    expected = {
        ("Deployment", "gateway"),
        ("Deployment", "worker"),
        ("Deployment", "janitor"),
        ("Service", "gateway"),
        ("StatefulSet", "redis"),
        ("ScaledObject", "worker"),
    }
    assert expected <= kinds
    for doc in manifests:
        assert doc["apiVersion"] and doc["kind"]
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] == "slipstream", doc["metadata"]["name"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_pods_run_real_commands_with_real_settings(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("gateway", "worker", "janitor"):
        pod = find(manifests, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        check_command(container["args"])
        settings = check_env(container["args"][0], container_env(manifests, container), monkeypatch)
        drain = getattr(settings, "drain_grace_s", 0.0)
        assert pod["terminationGracePeriodSeconds"] > drain, name
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            exec_probe = container.get(kind, {}).get("exec")
            if exec_probe and exec_probe["command"][0] == "slipstream":
                check_command(exec_probe["command"][1:])


def test_gateway_probes_and_service(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = find(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = check_env("gateway", container_env(manifests, container), monkeypatch)
    assert isinstance(settings, GatewaySettings)
    assert settings.auth_required is True and settings.host == "0.0.0.0"
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert serves(probe["path"])
        assert probe_port(container, probe["port"]) == settings.port
    assert "preStop" in container["lifecycle"]
    service = find(manifests, "Service", "gateway")
    assert probe_port(container, service["spec"]["ports"][0]["targetPort"]) == settings.port


def test_worker_probes(manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    pod = find(manifests, "Deployment", "worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = check_env("worker", container_env(manifests, container), monkeypatch)
    assert isinstance(settings, WorkerSettings) and settings.metrics_port is not None
    live = container["livenessProbe"]["httpGet"]
    assert live["path"] == "/metrics"
    assert probe_port(container, live["port"]) == settings.metrics_port
    for kind in ("startupProbe", "readinessProbe"):
        assert container[kind]["exec"]["command"] == ["slipstream", "worker-check"]


def test_redis_keeps_an_append_only_file(manifests: list[dict[str, Any]]) -> None:
    pod = find(manifests, "StatefulSet", "redis")["spec"]["template"]["spec"]
    args = " ".join(pod["containers"][0]["args"])
    assert "--appendonly yes" in args and "--appendfsync everysec" in args
    url = find(manifests, "ConfigMap", "slipstream-common")["data"]["REDIS_URL"]
    assert urlparse(url).hostname == "redis.slipstream.svc.cluster.local"


def test_keda_watches_the_real_streams_and_group(manifests: list[dict[str, Any]]) -> None:
    scaled = find(manifests, "ScaledObject", "worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "worker"
    assert scaled["minReplicaCount"] == 0
    worker = find(manifests, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    args = worker["args"]
    model = args[args.index("--model") + 1]
    queues = {Keys().queue(model, p) for p in Priority.ordered()}
    redis_host = urlparse(find(manifests, "ConfigMap", "slipstream-common")["data"]["REDIS_URL"])
    lagged = set()
    for trigger in scaled["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] in queues and meta["consumerGroup"] == CONSUMER_GROUP
        assert meta["address"] == f"{redis_host.hostname}:{redis_host.port}"
        if "lagCount" in meta:
            assert int(meta["activationLagCount"]) == 0 and int(meta["lagCount"]) > 0
            lagged.add(meta["stream"])
    assert lagged == queues


# --- the probes answer on real processes ----------------------------------------------------
async def test_probe_endpoints_answer(redis_url: str) -> None:
    gw = gateway_settings(redis_url)
    metrics_port = free_port()
    ws = make_worker_settings(redis_url, metrics_port=metrics_port)
    async with (
        running_gateway(gw) as base,
        running_worker(ws) as worker,
        httpx.AsyncClient(timeout=5) as client,
    ):
        assert (await client.get(f"{base}/healthz")).status_code == 200
        assert (await client.get(f"{base}/readyz")).status_code == 200
        metrics = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert metrics.status_code == 200
        common = CommonSettings(redis_url=redis_url)
        assert (await check_worker(common))[0] is True  # this host's worker
        assert (await check_worker(common, worker_id=worker.id))[0] is True
        assert (await check_worker(common, host="elsewhere"))[0] is False
    down = CommonSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert (await check_worker(down))[0] is False
    assert (await check_worker(down, redis_down_ok=True))[0] is True
