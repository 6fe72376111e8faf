"""deploy/prometheus/alerts.yml: valid rules, unit-tested with promtool on series that fire
and series that must not, and naming only metrics Slipstream exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from worker.metrics import WorkerMetrics

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")  # Debian's prometheus package (.ci/run installs it)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def exported_samples() -> set[str]:
    """Every sample name the gateway and a worker expose (``_total``, ``_bucket``, ...)."""
    gateway, worker = CollectorRegistry(), CollectorRegistry()  # each has process_* metrics
    GatewayMetrics(gateway)
    WorkerMetrics(worker, "m")
    names: set[str] = set()
    for registry in (gateway, worker):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":
                names.add(f"{family.name}_total")
            if family.type == "histogram":
                names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def test_every_alert_names_exported_metrics_and_says_what_to_do() -> None:
    exported = exported_samples() | {"up"}
    for rule in rules():
        expr = str(rule["expr"])
        used = set(re.findall(r"\b(slipstream_[a-z_]+|up)\b", expr))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
        labels = rule["labels"]
        assert isinstance(labels, dict) and labels["severity"] in {"warning", "critical"}
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and annotations["summary"]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


@needs_promtool
def test_alerts_fire_on_bad_series_and_stay_quiet_on_good_ones() -> None:
    """deploy/prometheus/alerts_test.yml: for each alert, a model (or target) that must fire
    it and one that must not, with its `for:` respected."""
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "alerts_test.yml").read_text()))
    assert tested == {str(rule["alert"]) for rule in rules()}, "an alert without a unit test"
