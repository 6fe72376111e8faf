"""The collector policy the gateway and the workers start with (``shared/gc_policy.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import gc
from gateway.settings import GatewaySettings
from shared.gc_policy import tune_gc
settings = GatewaySettings()
tune_gc(settings.gc_thresholds)
print(gc.get_threshold(), gc.get_freeze_count() > 1000)
"""


def probe(env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), **env},
        timeout=60,
    ).stdout.strip()


def test_start_up_is_frozen_and_the_thresholds_raised() -> None:
    assert probe({}) == "(50000, 20, 100) True"


def test_the_thresholds_are_a_setting() -> None:
    assert probe({"SLIPSTREAM_GC_THRESHOLDS": "[700,10,10]"}) == "(700, 10, 10) True"
