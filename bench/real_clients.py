"""Helpers for bench/real_clients.sh, run by the scratch client virtualenv's Python (GuideLLM,
LiteLLM, transformers, tokenizers and faker live there, never in the project's venv).

  real_clients.py model BASE          the first model a live worker serves (empty when none)
  real_clients.py prepare WORK        prompts.jsonl and an offline tokenizer for GuideLLM
  real_clients.py litellm BASE/v1 MODEL ENGINE   LiteLLM: plain, streamed, unsupported param
  real_clients.py summary WORK        errors, usage, TTFT and ITL from GuideLLM's JSON reports

The tokenizer: GuideLLM's synthetic data needs a Hugging Face tokenizer to cut prompts to N
tokens, and there is no hub here. A byte-level BPE trained in seconds on Faker text (the text
GuideLLM's synthetic prompts are made of) is a real tokenizer that loads offline; its token
counts are GuideLLM's prompt lengths, not any served model's (Slipstream reports its own usage).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

TOPICS = [
    "queues",
    "load balancing",
    "Redis streams",
    "server-sent events",
    "tokenizers",
    "backpressure",
    "retries",
    "deadlines",
    "priorities",
    "prefix caches",
]


def served_model(base: str) -> str:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as response:
        data = json.load(response)["data"]
    return str(data[0]["id"]) if data else ""


def prepare(work: Path) -> None:
    """A prompts file (GuideLLM's json_file data, `prompt` column) and a local tokenizer."""
    from faker import Faker
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with (work / "prompts.jsonl").open("w") as f:
        for i in range(200):
            topic = TOPICS[i % len(TOPICS)]
            prompt = f"Explain {topic} to a new engineer in a few sentences. ({i})"
            f.write(json.dumps({"prompt": prompt}) + "\n")
    fake = Faker()
    Faker.seed(0)
    corpus = [fake.text(max_nb_chars=400) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(str(work / "tokenizer"))


def run_litellm(base: str, model: str, engine: str) -> int:
    """Non-streamed, streamed (with usage) and one parameter the engine lacks: a clear 400."""
    import litellm

    messages = [{"role": "user", "content": "Tell me about queues."}]
    common: dict[str, Any] = {
        "model": f"openai/{model}",
        "api_base": base,
        "api_key": "unused",
        "messages": messages,
        "max_tokens": 16,
    }
    failures = 0
    reply = litellm.completion(**common)
    usage = reply.usage
    print(
        f"litellm completion: {reply.choices[0].finish_reason}, usage prompt="
        f"{usage.prompt_tokens} completion={usage.completion_tokens}, "
        f"text={reply.choices[0].message.content[:40]!r}"
    )
    failures += usage.completion_tokens < 1
    stream = litellm.completion(**common, stream=True, stream_options={"include_usage": True})
    pieces: list[str] = []
    streamed_usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        streamed_usage = getattr(chunk, "usage", None) or streamed_usage
    print(
        f"litellm stream: {len(pieces)} content chunks, usage completion="
        f"{getattr(streamed_usage, 'completion_tokens', None)}, text={''.join(pieces)[:40]!r}"
    )
    failures += streamed_usage is None or not pieces
    # the sim engine implements no sampling features; llama does (then top_k is accepted)
    try:
        litellm.completion(**common, top_k=5)
        print(f"litellm top_k=5: accepted ({engine} implements top_k)")
        failures += engine == "sim"
    except litellm.BadRequestError as exc:
        print(f"litellm top_k=5: {exc.status_code} {exc.message}")
        failures += engine != "sim" or "top_k" not in exc.message
    return failures


def _figures(report: dict[str, Any]) -> list[str]:
    lines = []
    for bench in report["benchmarks"]:
        metrics = bench["metrics"]
        totals = metrics["request_totals"]
        ttft = metrics["time_to_first_token_ms"]["successful"]
        itl = metrics["inter_token_latency_ms"]["successful"]
        prompt = metrics["prompt_token_count"]["successful"]
        output = metrics["output_token_count"]["successful"]
        lines.append(
            f"  {bench['config']['strategy']['type_']:<12} requests ok={totals['successful']} "
            f"errored={totals['errored']} incomplete={totals['incomplete']} | usage: prompt "
            f"tokens {prompt['total_sum']:.0f} (mean {prompt['mean']:.1f}), output tokens "
            f"{output['total_sum']:.0f} (mean {output['mean']:.1f}) | TTFT ms median "
            f"{ttft['median']:.1f} p95 {ttft['percentiles']['p95']:.1f} | ITL ms median "
            f"{itl['median']:.2f} p95 {itl['percentiles']['p95']:.2f}"
        )
    return lines


def summary(work: Path) -> int:
    failures = 0
    for path in sorted(work.glob("guidellm_*.json")):
        report = json.loads(path.read_text())
        print(f"guidellm {path.stem.removeprefix('guidellm_')}:")
        for line in _figures(report):
            print(line)
        for bench in report["benchmarks"]:
            totals = bench["metrics"]["request_totals"]
            failures += totals["errored"] > 0 or totals["successful"] == 0
    if not list(work.glob("guidellm_*.json")):
        print("no GuideLLM report was written")
        failures += 1
    print(f"reports and logs: {work}")
    return failures


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "model":
        print(served_model(args[0]))
        return 0
    if command == "prepare":
        prepare(Path(args[0]))
        return 0
    if command == "litellm":
        return int(run_litellm(args[0], args[1], args[2]) > 0)
    if command == "summary":
        return int(summary(Path(args[0])) > 0)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
