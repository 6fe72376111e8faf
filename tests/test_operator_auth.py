"""Prometheus scrapes the gateway as the shipped configuration says, with auth on.

``deploy/prometheus/prometheus.yml`` sends a bearer token read from a file that docker compose
mounts; the key in it is made with ``slipstream keys create --scope metrics`` (its stdout
redirected into that file, as the config's comment says). This test makes the key with the CLI,
reads the file as Prometheus does (whitespace trimmed) and scrapes a running gateway with it.
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import httpx
import yaml
from typer.testing import CliRunner

from slipstream.cli import app as cli
from tests.helpers import gateway_settings, running_gateway

ROOT = pathlib.Path(__file__).resolve().parent.parent


def gateway_job() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job: dict[str, Any] = next(
        j for j in config["scrape_configs"] if j["job_name"] == "slipstream-gateway"
    )
    return job


def test_compose_mounts_the_scrape_key_where_prometheus_reads_it() -> None:
    auth = gateway_job()["authorization"]
    assert auth["type"] == "Bearer"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = [v.split(":") for v in compose["services"]["prometheus"]["volumes"]]
    path = pathlib.PurePosixPath(auth["credentials_file"])
    [host] = [src for src, dst, *_ in mounts if path.parent == pathlib.PurePosixPath(dst)]
    assert (ROOT / host).is_dir()
    ignored = (ROOT / host / ".gitignore").read_text().split()
    assert "*" in ignored  # the key never lands in git


async def test_a_metrics_key_from_the_cli_scrapes_with_auth_on(redis_url: str) -> None:
    runner = CliRunner()
    made = await asyncio.to_thread(  # the CLI runs its own event loop
        runner.invoke,
        cli,
        ["keys", "create", "--tenant", "prometheus", "--scope", "metrics"],
        env={"REDIS_URL": redis_url},
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()  # what `> slipstream-metrics-key` holds, trimmed as Prometheus does
    listed = await asyncio.to_thread(
        runner.invoke, cli, ["keys", "list"], env={"REDIS_URL": redis_url}
    )
    assert "scopes=metrics" in listed.stdout
    job = gateway_job()
    async with (
        running_gateway(gateway_settings(redis_url, auth_required=True)) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        assert (await client.get(job["metrics_path"])).status_code == 401
        headers = {"Authorization": f"{job['authorization']['type']} {token}"}
        scraped = await client.get(job["metrics_path"], headers=headers)
        assert scraped.status_code == 200
        assert "slipstream_gateway_requests_total" in scraped.text
