"""Gateway and Redis faults with real processes: kill -9 + resume elsewhere, pub/sub loss,
Redis kill -9 with AOF, slow readers, client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import httpx

from shared.keys import Keys
from shared.redis import connect
from tests.faults.cluster import (
    Cluster,
    StreamRecord,
    check_stream,
    percentile,
    record_result,
    resume,
    stream_completion,
    wait_frames,
)
from worker.engines.sim import greedy_text as sim_text

SIM = ("--max-seqs", "8", "--sim-ttft-ms", "5", "--sim-tokens-per-s", "50")


async def test_gateway_kill_9_client_resumes_on_another(cluster: Cluster, trials: int) -> None:
    cluster.worker("w", *SIM)
    await cluster.wait_workers(1)
    gaps: list[float] = []
    second = cluster.gateway()
    for trial in range(max(3, trials // 4)):
        first = cluster.gateway()
        record, prompt = StreamRecord(), f"gateway crash {trial}"
        task = asyncio.create_task(
            stream_completion(f"http://127.0.0.1:{first.port}", prompt, 40, record)
        )
        await wait_frames(record, 5 + trial % 10)
        first.kill()
        with contextlib.suppress(httpx.HTTPError):
            await task
        cut = time.monotonic()
        await resume(f"http://127.0.0.1:{second.port}", record)
        check_stream(record, sim_text(prompt, 40))
        after = [t for _, _, t in record.frames if t > cut]
        gaps.append(after[0] - cut)
    record_result(
        "gateway kill -9, resume on a second gateway (Last-Event-ID)",
        trials=len(gaps),
        lost=0,
        duplicated=0,
        recovered=len(gaps),
        recover_p50_s=percentile(gaps, 0.5),
        recover_p99_s=percentile(gaps, 0.99),
    )


async def test_pubsub_connection_killed_streams_repair_from_log(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    cluster.worker("w", *SIM)
    await cluster.wait_workers(1)
    base = f"http://127.0.0.1:{gateway.port}"
    records = [StreamRecord() for _ in range(6)]
    tasks = [
        asyncio.create_task(stream_completion(base, f"pubsub {i}", 60, r))
        for i, r in enumerate(records)
    ]
    for r in records:
        await wait_frames(r, 3)
    redis = connect(cluster.redis.url)
    try:
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    finally:
        await redis.aclose()
    assert int(killed) >= 1
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for i, r in enumerate(records):
        check_stream(r, sim_text(f"pubsub {i}", 60))
    gaps = [r.largest_gap_s() for r in records]
    record_result(
        "CLIENT KILL TYPE pubsub (gateway's pub/sub dropped)",
        trials=len(records),
        lost=0,
        duplicated=0,
        recovered=len(records),
        recover_p50_s=percentile(gaps, 0.5),
        recover_p99_s=percentile(gaps, 0.99),
    )


async def test_redis_kill_9_and_restart_with_aof() -> None:
    cluster = Cluster.start(aof=True)
    try:
        gateway = cluster.gateway()
        cluster.worker("a", *SIM)
        cluster.worker("b", *SIM)
        await cluster.wait_workers(2)
        base = f"http://127.0.0.1:{gateway.port}"
        records = [StreamRecord() for _ in range(10)]
        tasks = [
            asyncio.create_task(stream_completion(base, f"redis crash {i}", 60, r))
            for i, r in enumerate(records)
        ]
        for r in records:  # every job accepted (streaming), then the crash
            await wait_frames(r, 2)
        cluster.redis.stop(kill=True)
        await asyncio.sleep(0.3)
        cluster.redis.restart()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        assert not [r for r in results if isinstance(r, BaseException)], results
        for i, r in enumerate(records):
            check_stream(r, sim_text(f"redis crash {i}", 60))
        gaps = [r.largest_gap_s() for r in records]
        record_result(
            "redis kill -9 under load, restart with AOF everysec",
            trials=len(records),
            lost=0,
            duplicated=0,
            recovered=len(records),
            recover_p50_s=percentile(gaps, 0.5),
            recover_p99_s=percentile(gaps, 0.99),
        )
    finally:
        cluster.stop()


async def subscribers(cluster: Cluster, job_ids: list[str]) -> int:
    """How many gateway streams still follow these jobs (pub/sub subscriptions)."""
    redis = connect(cluster.redis.url)
    try:
        channels = [Keys().job_channel("sim-model", j) for j in job_ids]
        counts = await redis.pubsub_shardnumsub(*channels)
        return sum(int(n) for _, n in counts)
    finally:
        await redis.aclose()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def slow_reader(port: int, job_id: str, seconds: float) -> tuple[int, bool]:
    """Read a job's events at ~50 bytes/s through a tiny receive buffer; (bytes, closed?)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await loop.sock_sendall(sock, request)
    received, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 10), 5)
            if not chunk:
                return received, True
            received += len(chunk)
            await asyncio.sleep(0.2)
        return received, False
    finally:
        sock.close()


async def test_slow_readers_are_cut_and_memory_stays_bounded(cluster: Cluster) -> None:
    gateway = cluster.gateway(SLIPSTREAM_SEND_TIMEOUT_S="1.5")
    cluster.worker(
        "fast", "--max-seqs", "16", "--sim-tokens-per-s", "2000", "--capacity-tokens", "200000"
    )
    cluster.worker("steady", *SIM)
    await cluster.wait_workers(2)
    base = f"http://127.0.0.1:{gateway.port}"
    assert gateway.popen.pid and gateway.port
    before = rss_kib(gateway.popen.pid)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        body = {"model": "sim-model", "prompt": "flood", "max_tokens": 2500}
        job_ids = [(await client.post("/v1/jobs", json=body)).json()["id"] for _ in range(4)]
    slow = [asyncio.create_task(slow_reader(gateway.port, j, 25)) for j in job_ids]
    normal = [StreamRecord() for _ in range(4)]
    await asyncio.gather(
        *[stream_completion(base, f"normal {i}", 100, r) for i, r in enumerate(normal)]
    )
    end = time.monotonic() + 30
    while (released := await subscribers(cluster, job_ids)) and time.monotonic() < end:
        await asyncio.sleep(0.2)  # laggards are still connected and reading meanwhile
    peak = rss_kib(gateway.popen.pid)
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    itl = [
        b - a
        for r in normal
        for (_, _, a), (_, _, b) in zip(r.frames[1:-3], r.frames[2:-2], strict=False)
    ]
    for i, r in enumerate(normal):
        check_stream(r, sim_text(f"normal {i}", 100))
    assert released == 0, "the gateway let go of every laggard after the send timeout"
    assert peak - before < 40 * 1024, f"gateway grew {peak - before} KiB"
    assert percentile(itl, 0.99) < 0.5, "normal readers must not stall behind laggards"
    laggard = StreamRecord(job_id=job_ids[0], frames=[])
    await resume(base, laggard)  # a cut laggard resumes (here: from the start)
    assert laggard.ids() == list(range(1, 2502))
    record_result(
        "slow SSE readers beside normal ones",
        trials=len(job_ids),
        lost=0,
        duplicated=0,
        recovered=len(job_ids),
        rss_growth_kib=peak - before,
        normal_itl_p50_ms=round(percentile(itl, 0.5) * 1000, 1),
        normal_itl_p99_ms=round(percentile(itl, 0.99) * 1000, 1),
    )


async def test_client_disconnect_frees_capacity_within_a_token(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    cluster.worker("w", "--sim-tokens-per-s", "50", "--max-seqs", "1")
    await cluster.wait_workers(1)
    base = f"http://127.0.0.1:{gateway.port}"
    record = StreamRecord()
    await stream_completion(base, "disconnect me", 500, record, stop_after=10)
    cut = time.monotonic()
    follow = StreamRecord()
    await stream_completion(base, "next in line", 5, follow)  # needs the only slot
    check_stream(follow, sim_text("next in line", 5))
    redis = connect(cluster.redis.url)
    try:
        job = await redis.hgetall(Keys().job("sim-model", record.job_id))
    finally:
        await redis.aclose()
    assert job["state"] == "cancelled" and int(job["ntok"]) <= 12
    freed = follow.frames[0][2] - cut
    record_result(
        "client disconnect at token k",
        trials=1,
        lost=0,
        duplicated=0,
        recovered=1,
        tokens_after_disconnect=int(job["ntok"]) - 10,
        slot_reused_after_s=round(freed, 3),
    )
