"""Fault 1b: kill -9 a real (batching) llama worker mid-stream with several sequences in
flight; every continued text equals an uninterrupted greedy run of the same request."""

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
LLAMA = ("--model", MODEL, "--engine", "llama", "--max-seqs", "4", "--threads", "1")
PROMPTS = (
    "A short history of the bicycle:",
    "The three most useful things to pack for a long hike are",
    "Ten facts about the moon:",
)


async def test_kill_9_llama_worker_continues_with_identical_text(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    procs = {"la": cluster.llama_worker("la", *LLAMA), "lb": cluster.llama_worker("lb", *LLAMA)}
    await cluster.wait_workers(2, timeout=60)
    base = f"http://127.0.0.1:{gateway.port}"
    references = []
    for prompt in PROMPTS:
        reference = StreamRecord()
        await stream_completion(base, prompt, 32, reference, model=MODEL)
        check_stream(reference)
        references.append(reference)
    records = [StreamRecord() for _ in PROMPTS]
    tasks = [
        asyncio.create_task(stream_completion(base, prompt, 32, record, model=MODEL))
        for prompt, record in zip(PROMPTS, records, strict=True)
    ]
    interrupted = records[0]
    await wait_frames(interrupted, 8)
    victim = await owner_of(cluster, interrupted.job_id, model=MODEL)
    procs[victim].kill()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    for record, reference in zip(records, references, strict=True):
        check_stream(record, reference.text())
    record_result(
        "worker kill -9 mid-stream (llama, Gemma 3 270M)",
        trials=len(PROMPTS),
        lost=0,
        duplicated=0,
        recovered=len(PROMPTS),
        text_equal=True,
        recover_p50_s=interrupted.largest_gap_s(),
        recover_p99_s=interrupted.largest_gap_s(),
    )
