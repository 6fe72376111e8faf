"""Fault 1b: kill -9 a real llama worker mid-stream; the continued text equals an
uninterrupted greedy run of the same request."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.cluster import (
    Cluster,
    StreamRecord,
    check_stream,
    record_result,
    stream_completion,
    wait_frames,
)
from tests.faults.test_worker_faults import owner_of

pytestmark = pytest.mark.llama
MODEL = "gemma-3-270m"
LLAMA = ("--model", MODEL, "--engine", "llama", "--slots", "1", "--threads", "1", "--n-ctx", "512")


async def test_kill_9_llama_worker_continues_with_identical_text(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    procs = {"la": cluster.llama_worker("la", *LLAMA), "lb": cluster.llama_worker("lb", *LLAMA)}
    await cluster.wait_workers(2, timeout=60)
    base = f"http://127.0.0.1:{gateway.port}"
    prompt = "A short history of the bicycle:"
    reference = StreamRecord()
    await stream_completion(base, prompt, 32, reference, model=MODEL)
    check_stream(reference)
    interrupted = StreamRecord()
    task = asyncio.create_task(stream_completion(base, prompt, 32, interrupted, model=MODEL))
    await wait_frames(interrupted, 8)
    victim = await owner_of(cluster, interrupted.job_id, model=MODEL)
    procs[victim].kill()
    await asyncio.wait_for(task, 120)
    check_stream(interrupted, reference.text())
    record_result(
        "worker kill -9 mid-stream (llama, Gemma 3 270M)",
        trials=1,
        lost=0,
        duplicated=0,
        recovered=1,
        text_equal=True,
        recover_p50_s=interrupted.largest_gap_s(),
        recover_p99_s=interrupted.largest_gap_s(),
    )
