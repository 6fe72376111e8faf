"""deploy/prometheus/alerts.yml: valid rules, unit-tested with promtool on series that fire
and series that must not, naming only metrics Slipstream exports (and SLO thresholds that are
bucket boundaries of its histograms), loaded by the compose Prometheus, and the same groups as
the Kubernetes PrometheusRule."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")  # Debian's prometheus package (.ci/run installs it)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
BUCKET_LE = re.compile(r'\b([a-z_]+)_bucket\{[^}]*\ble="([^"]+)"')


def groups() -> list[dict[str, object]]:
    doc = yaml.safe_load((RULES / "alerts.yml").read_text())
    return list(doc["groups"])


def all_rules() -> list[dict[str, object]]:
    return [rule for group in groups() for rule in group["rules"]]  # type: ignore[attr-defined]


def rules() -> list[dict[str, object]]:
    """The alerting rules."""
    return [rule for rule in all_rules() if "alert" in rule]


def records() -> list[dict[str, object]]:
    return [rule for rule in all_rules() if "record" in rule]


def registries() -> list[CollectorRegistry]:
    gateway, worker = CollectorRegistry(), CollectorRegistry()  # each has process_* metrics
    metrics = GatewayMetrics(gateway)
    WorkerMetrics(worker, "m")
    # a labelled histogram shows its buckets only once it has a child
    for histogram in (metrics.ttft, metrics.queue_wait, metrics.duration):
        histogram.labels("m", "normal")
    return [gateway, worker]


def exported_samples() -> set[str]:
    """Every sample name the gateway and a worker expose (``_total``, ``_bucket``, ...)."""
    names: set[str] = set()
    for registry in registries():
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":
                names.add(f"{family.name}_total")
            if family.type == "histogram":
                names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def bucket_bounds() -> dict[str, set[str]]:
    """Histogram name -> its ``le`` label values exactly as ``/metrics`` writes them."""
    bounds: dict[str, set[str]] = {}
    for registry in registries():
        for family in registry.collect():
            if family.type == "histogram":
                les = {s.labels["le"] for s in family.samples if "le" in s.labels}
                bounds.setdefault(family.name, set()).update(les)
    return bounds


def names_in(expr: str) -> set[str]:
    """Metric and recorded names in ``expr`` (label values and templates stripped first)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return {n for n in NAME.findall(expr) if n.startswith(("slipstream", "model:")) or n == "up"}


def test_every_rule_names_exported_metrics_and_every_alert_says_what_to_do() -> None:
    exported = exported_samples() | {"up"}
    recorded = {str(rule["record"]) for rule in records()}
    for rule in all_rules():
        used = names_in(str(rule["expr"]))
        what = rule.get("alert") or rule["record"]
        assert used, what
        raw = {n for n in used if ":" not in n}
        assert raw <= exported, (what, raw - exported)
        assert used - raw <= recorded, (what, used - raw - recorded)
    for rule in rules():
        labels = rule["labels"]
        assert isinstance(labels, dict) and labels["severity"] in {"warning", "critical"}
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and annotations["summary"]


def test_slo_thresholds_are_bucket_boundaries() -> None:
    """An ``le`` that the gateway does not write would match no series: the SLO would be
    silently never missed (or always, for a ratio of 1 - 0/x)."""
    bounds = bucket_bounds()
    seen = 0
    for rule in all_rules():
        for histogram, le in BUCKET_LE.findall(str(rule["expr"])):
            assert le in bounds[histogram], (rule.get("record"), histogram, le, bounds[histogram])
            seen += 1
    assert seen >= 2  # queue wait and TTFT


def test_recorded_windows_match_their_names() -> None:
    """``...:ratio_rate1h`` takes every rate over 1h (the rules are written out by hand)."""
    for rule in records():
        name = str(rule["record"])
        window = re.fullmatch(r".*:ratio_rate(\w+)", name)
        if window:
            ranges = set(re.findall(r"\[(\w+)\]", str(rule["expr"])))
            assert ranges == {window.group(1)}, (name, ranges)


def test_every_burn_rate_alert_checks_a_long_and_a_short_window() -> None:
    burns = [rule for rule in rules() if "Budget" in str(rule["alert"])]
    assert len(burns) == 4
    for rule in burns:
        windows = re.findall(r":ratio_rate(\w+)", str(rule["expr"]))
        assert len(windows) == 4 and windows[0] != windows[1], (rule["alert"], windows)


def test_kubernetes_prometheusrule_has_the_same_groups() -> None:
    manifest = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheusrule.yaml").read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == groups()
    check = [sys.executable, str(RULES / "prometheusrule.py"), "--check"]
    out = subprocess.run(check, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((RULES / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {
        volume.split(":")[1]: volume.split(":")[0]
        for volume in compose["services"]["prometheus"]["volumes"]
    }
    for path in config["rule_files"]:
        assert (ROOT / mounts[path]).resolve() == (RULES / "alerts.yml").resolve()


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in out.stdout


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
