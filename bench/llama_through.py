"""The batching ``llama`` engine called directly vs through Slipstream, at 1, 2, 4, 8 concurrent
requests (issue 16: "at least 95% of the direct rate at every concurrency").

    flock /tmp/slipstream-bench.lock python -m bench.llama_through --runs 5

Side by side in one run: the engine in this process (bench.llama_batching's direct side:
``LlamaEngine``, 8 sequences, one context) and a gateway + Redis + one
``slipstream worker --engine llama --max-seqs 8`` with the same threads, on loopback. For each
run and concurrency the two paths take turns, with the same greedy prompts (tagged with the run,
so neither path finds them in its prefix cache). Aggregate decode tokens/s = all requests'
completion tokens / wall time from the first request sent to the last one finished (through
Slipstream: ``usage.completion_tokens`` of each stream). Writes
docs/llama_benchmark_through.json and its section of docs/llama_benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.llama_batching import PROMPTS, stream
from bench.llama_stack import MODEL, LlamaStack, write_section
from worker.engines.llama import LlamaConfig, LlamaEngine, packaged_model_path

MARK = "<!-- llama_through -->"
OUT = "docs/llama_benchmark_through.json"
HEADER = (
    "| llama threads | Concurrent requests | Engine directly | Through Slipstream "
    "| Through / direct (target ≥ 95%) |\n|---:|---:|---:|---:|---:|"
)
LEVELS = (1, 2, 4, 8)


def prompts(tag: str, n: int) -> list[str]:
    return [f"[{tag}.{i}] {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]


async def direct_rate(engine: LlamaEngine, tag: str, n: int, max_tokens: int) -> float:
    await engine.clear_cache()
    start = time.perf_counter()
    done = await asyncio.gather(*(stream(engine, p, max_tokens) for p in prompts(tag, n)))
    return sum(k for _, k in done) / (time.perf_counter() - start)


async def gateway_rate(
    client: httpx.AsyncClient, tag: str, n: int, max_tokens: int
) -> tuple[float, int]:
    """(tokens/s, requests that failed) of ``n`` concurrent streamed completions."""

    async def one(prompt: str) -> int | None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens = None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = int(usage["completion_tokens"])
        return tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts(tag, n)))
    wall = time.perf_counter() - start
    return sum(c or 0 for c in counts) / wall, sum(c is None for c in counts)


async def run(runs: int, max_tokens: int, threads: int) -> dict[str, Any]:
    engine = LlamaEngine(LlamaConfig(packaged_model_path(), max_seqs=8, n_ctx=8192,
                                     threads=threads))  # fmt: skip
    await engine.start()
    rates: dict[str, dict[int, list[float]]] = {"direct": {}, "slipstream": {}}
    failed = 0
    worker = ["--max-seqs", "8", "--n-ctx", "8192", "--threads", str(threads)]
    try:
        async with (
            LlamaStack([worker]) as stack,
            httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client,
        ):
            await direct_rate(engine, "warm-up", 1, 4)
            await gateway_rate(client, "warm-up", 1, 4)
            for run_no in range(runs):
                for n in LEVELS:  # the order of the two paths alternates from run to run
                    tag = f"r{run_no}n{n}"
                    for path in ("direct", "slipstream")[:: 1 if run_no % 2 == 0 else -1]:
                        if path == "direct":
                            rate = await direct_rate(engine, tag, n, max_tokens)
                        else:
                            rate, bad = await gateway_rate(client, tag, n, max_tokens)
                            failed += bad
                        rates[path].setdefault(n, []).append(rate)
                    print(f"[llama_through] run {run_no} n={n}: "
                          f"{rates['direct'][n][-1]:.1f} direct, "
                          f"{rates['slipstream'][n][-1]:.1f} through", flush=True)  # fmt: skip
    finally:
        await engine.close()
    medians = {
        k: {n: round(statistics.median(v), 1) for n, v in d.items()} for k, d in rates.items()
    }
    ratio = {n: round(medians["slipstream"][n] / medians["direct"][n], 3) for n in LEVELS}
    return {
        "runs": runs, "max_tokens": max_tokens, "threads": engine.threads,
        "cores": os.cpu_count(), "aggregate_tokens_per_s": medians, "ratio": ratio,
        "failed_requests": failed, "raw": {k: {n: [round(x, 2) for x in v] for n, v in d.items()}
                                           for k, d in rates.items()},
    }  # fmt: skip


def _ints(r: dict[str, Any]) -> dict[str, Any]:
    """A result read back from JSON, its concurrency keys ints again."""
    r["aggregate_tokens_per_s"] = {
        k: {int(n): v for n, v in d.items()} for k, d in r["aggregate_tokens_per_s"].items()
    }
    r["ratio"] = {int(n): v for n, v in r["ratio"].items()}
    return r


def results(out: str) -> list[dict[str, Any]]:
    """Every result beside ``out`` (one file per threads setting: ``--out`` names them), most
    threads first."""
    path = Path(out)
    found = [_ints(json.loads(p.read_text())) for p in path.parent.glob(f"{path.stem}*.json")]
    return sorted(found, key=lambda r: -r["threads"])


def markdown(found: list[dict[str, Any]]) -> str:
    rows, notes = [], []
    for r in found:
        m, ratio = r["aggregate_tokens_per_s"], r["ratio"]
        rows += [
            f"| {r['threads']} | {n} | {m['direct'][n]} | {m['slipstream'][n]} "
            f"| **{ratio[n]:.1%}** ({'met' if ratio[n] >= 0.95 else 'missed'}) |"
            for n in ratio
        ]
        notes.append(
            f"`flock /tmp/slipstream-bench.lock python -m bench.llama_through --runs {r['runs']} "
            f"--max-tokens {r['max_tokens']} --threads {r['threads']}"
            + ("" if r.get("out", OUT) == OUT else f" --out {r['out']}")
            + f"` (worst ratio {min(ratio.values()):.1%}, failed requests "
            f"{r['failed_requests']})"
        )
    r = found[0]
    table = "\n".join(rows)
    commands = "\n".join(f"- {n}" for n in notes)
    return f"""{MARK}
## The batching engine through Slipstream vs called directly (issue 16)

Gemma 3 270M Q4_K_M, greedy, {r["max_tokens"]} tokens per request (~20-token prompts),
{r["cores"]} cores, medians of {r["runs"]} runs, the same llama threads on both paths.
Direct: the batching `LlamaEngine` (8 sequences, one context) in the benchmark's process.
Through Slipstream: HTTP → gateway → Redis → one `slipstream worker --engine llama
--max-seqs 8` → SSE, on the same machine, so the gateway, Redis and the client take CPU from
the decode threads. The two paths take turns at each concurrency in every run (cold prefix
caches on both). **The machine was shared** with other agents (benchmarks serialised with
`flock`, but tests and builds were not). One run per threads setting; reproduce
(each writes its JSON beside docs/llama_benchmark_through.json and rewrites this section from
all of them):

{commands}

Aggregate decode tokens/s (all completion tokens / wall time of the burst):

{HEADER}
{table}

With as many llama threads as cores the decode threads have no core to spare, so the gateway,
Redis and the client's SSE parsing (which only the path through Slipstream has) take their CPU
from the model; with one llama thread a core is left for them, as a worker host that shares
its cores with a gateway would be configured (the single-sequence comparison above makes the
same point). Per-run rates are in the JSON files (`raw`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="llama threads (0: every core)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--render", action="store_true", help="only rewrite the doc from --out")
    parser.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    if args.render:
        write_section(MARK, markdown(results(args.out)))
        return
    result = asyncio.run(run(args.runs, args.max_tokens, args.threads)) | {"out": args.out}
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_write:
        Path(args.out).write_text(text + "\n")
        write_section(MARK, markdown(results(args.out)))


if __name__ == "__main__":
    main()
