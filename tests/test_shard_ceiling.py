"""The shard-ceiling benchmark (bench/shard_ceiling.py): its arithmetic, its reading of the
slowlog, and a short real run of its load against a redis-server.

The real run proves the load drives the product's code paths as the product does: every job
ends with all its batches written (none fenced off or out of sequence, which ``EMIT`` would
refuse), through gateways that hear them over pub/sub. It does not check any figure of the
ceiling, which ``bench.shard_ceiling`` measures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from bench.shard_ceiling import ceiling, fit, sizing
from bench.shard_load import Spec, batches_per_job, job_batches, run_load
from bench.shard_slowlog import breakdown, label, per_call
from shared import scripts
from shared.jobs import Claimed
from shared.models import DoneEvent, StartedEvent, TokenEvent
from tests.helpers import make_job


def test_batches_per_job_matches_the_batches_a_job_writes() -> None:
    assert batches_per_job(64, 6) == 12  # started + 1st token, then 63 tokens in 11 batches
    assert batches_per_job(256, 6) == 44
    assert batches_per_job(7, 6) == 2
    assert batches_per_job(8, 6) == 3
    assert batches_per_job(1, 6) == 2  # the done event goes in a batch of its own
    for tokens in (1, 2, 7, 64, 256):
        claimed = Claimed(make_job(), fence=1, seq=0, tokens_done=0)
        batches = job_batches(claimed, "w", tokens, 6)
        assert len(batches) == batches_per_job(tokens, 6)
        events = [e for b in batches for e in b]
        assert isinstance(events[0], StartedEvent) and isinstance(events[-1], DoneEvent)
        numbered = [e.s for e in events[1:]]
        assert numbered == list(range(1, tokens + 2))  # tokens 1..N, then done at N+1
        assert all(sum(isinstance(e, TokenEvent) for e in b) <= 6 for b in batches)


def test_fit_recovers_the_line_and_sizing_inverts_it() -> None:
    fixed, per_batch = fit([(12, 300 + 12 * 20), (44, 300 + 44 * 20)])
    assert fixed == pytest.approx(300) and per_batch == pytest.approx(20)
    row = sizing(fixed, per_batch, 64, 6)
    assert row["redis_us_per_job"] == pytest.approx(540)
    assert row["jobs_per_s"] == round(ceiling(540)) == 1852
    assert row["tokens_per_s"] == round(1e6 / 540 * 64)
    assert row["batches_per_s"] == round(1e6 / 540 * 12)


def _evalsha(script: scripts.Script, terminal: str = "") -> list[str]:
    args = ["EVALSHA", script.sha, "3", "k1", "k2", "k3", *["a"] * 6, terminal, "g", "id", "0"]
    return args


def test_slowlog_counts_inner_commands_in_their_script_once() -> None:
    emit, terminal = _evalsha(scripts.EMIT), _evalsha(scripts.EMIT, "completed")
    assert label(emit) == "EMIT" and label(terminal) == "EMIT (terminal)"
    assert label(["EVALSHA", scripts.PULL.sha, "0"]) == "PULL"
    assert label(["set", "k", "v"]) == "SET"
    entries: list[Any] = [
        [1, 0, 3, ["XADD", "log"], "?:0", ""],
        [2, 0, 2, ["SPUBLISH", "ch"], "?:0", ""],
        [3, 0, 21, emit, "127.0.0.1:1", ""],
        [4, 0, 4, ["SET", "idx", "m"], "127.0.0.1:2", ""],
        [5, 0, 40, terminal, "127.0.0.1:1", ""],
        [6, 0, 9, ["CONFIG", "SET"], "127.0.0.1:3", ""],
    ]
    times = per_call(entries, c=0.5)
    assert times == {"EMIT": [20.0], "SET": [4.0], "EMIT (terminal)": [40.0]}
    out = breakdown({"jobs": 2, "batches": 2, "entries": entries}, 0.5)
    assert out["commands"]["EMIT"]["median_us_per_job"] == 10.0
    assert out["command_us_per_job"] == pytest.approx((20 + 4 + 40) / 2)


class LocalCounters(list[int]):
    """The load's counters within one process (``mp.Array``'s interface)."""

    def __init__(self) -> None:
        super().__init__([0, 0, 0, 0])
        self.lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self.lock


@pytest.mark.parametrize(("subscribers", "per"), [(True, 6), (False, 6), (True, 1)])
async def test_the_load_runs_jobs_through_the_product_to_their_end(
    redis_url: str, subscribers: bool, per: int
) -> None:
    """Also with one token per batch: a stream reads many more times than it has batches
    (a stream cut short by the load's own bound would be cancelled, its writes fenced off)."""
    tokens = 150 if per == 1 else 20
    spec = Spec(
        url=redis_url, tokens=tokens, batch_tokens=per, subscribers=subscribers, streams=8,
        workers=2, slots=4, prompt_bytes=200, ttl_s=30, index=0,
    )  # fmt: skip
    counters, stop = LocalCounters(), asyncio.Event()
    task = asyncio.create_task(run_load(spec, counters, 1, stop))
    end = time.monotonic() + 30
    while counters[0] < 20 and time.monotonic() < end and not task.done():
        await asyncio.sleep(0.05)
    stop.set()  # the streams under way end, then the workers' jobs
    await asyncio.wait_for(task, 30)
    jobs, batches, _, fenced = counters
    assert jobs >= 20, f"only {jobs} jobs finished in 30 s"
    assert fenced == 0
    # every finished job wrote all its batches (jobs still running when stopped wrote some)
    assert batches >= jobs * batches_per_job(tokens, per)
