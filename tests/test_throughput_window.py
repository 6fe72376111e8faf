"""The worker's throughput windows: buckets with a running total, not an entry per token."""

from __future__ import annotations

import pytest

from worker import job_runner
from worker.job_runner import Window


def test_a_window_counts_its_last_seconds_in_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(job_runner.time, "monotonic", lambda: now[0])
    window = Window(window_s=10.0, born=0.0)
    for _ in range(1000):  # 1,000 tokens within one bucket
        window.add(1)
        now[0] += 0.00005
    assert len(window.buckets) == 1
    assert window.rate() == pytest.approx(100.0)  # 1,000 over 10 s
    now[0] = 105.0
    window.add(500)
    assert window.rate() == pytest.approx(150.0)
    now[0] = 110.5  # the first bucket (at 100.0) left the window
    assert window.rate() == pytest.approx(50.0)
    now[0] = 200.0
    assert window.rate() == 0.0 and not window.buckets


def test_a_young_window_divides_by_its_age(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [3.0]
    monkeypatch.setattr(job_runner.time, "monotonic", lambda: now[0])
    window = Window(window_s=10.0, born=1.0)
    window.add(40)
    assert window.rate() == pytest.approx(20.0)  # 40 tokens over its 2 s of life
