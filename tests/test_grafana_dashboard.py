"""Every metric the Grafana dashboard queries exists in a running gateway's or worker's /metrics.

Also checks the Prometheus config scrapes the gateway and the workers' metrics port, and the
provisioning files point Grafana at that Prometheus and at the dashboards folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    free_port,
    gateway_settings,
    running_gateway,
    running_worker,
    worker_settings,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "slipstream.json"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        for inner in panel.get("panels", []):  # collapsed rows keep their panels inside
            exprs += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # dashboard variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def template_metrics(dashboard: dict[str, Any]) -> set[str]:
    names = set()
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names |= set(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", text))
    return names


def exported(text: str) -> set[str]:
    """Every series name a /metrics page can show, including families with no sample yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, priority) (rate(a_bucket{model=~"$model"}'
        "[$__rate_interval]))) / on (model) group_left b + sum(c_total offset 5m)"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c_total"}


async def test_dashboard_metrics_exist(redis_url: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = template_metrics(dashboard)
    for expr in expressions(dashboard):
        wanted |= metric_names(expr)
    assert len(wanted) >= 20, wanted
    port = free_port()
    worker = worker_settings(redis_url, metrics_port=port, metrics_host="127.0.0.1")
    async with (
        running_gateway(gateway_settings(redis_url)) as base,
        running_worker(worker),
        httpx.AsyncClient(timeout=10) as client,
    ):
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 4}
        assert (await client.post(f"{base}/v1/completions", json=body)).status_code == 200
        have = exported((await client.get(f"{base}/metrics")).text)
        have |= exported((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
    missing = sorted(wanted - have)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"


def test_prometheus_scrapes_gateway_and_workers() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["slipstream-gateway"]
    assert gateway["static_configs"][0]["targets"] == ["gateway:8000"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    worker = jobs["slipstream-worker"]
    assert worker["dns_sd_configs"][0]["names"] == ["worker"]
    assert worker["dns_sd_configs"][0]["port"] == 9101
    # every job matches the dashboard's process-memory panel selector
    assert all(re.fullmatch(r"slipstream.*", name) for name in jobs)


def test_grafana_provisioning() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "slipstream.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "slipstream"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
