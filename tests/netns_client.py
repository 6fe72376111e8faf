"""HTTP client for tests/test_multihost_netns.py, run inside the test's "hub" namespace
(``ip netns exec <hub> python tests/netns_client.py ...``) so that the test's traffic stays in
the namespaces it made. Prints one JSON document on stdout.

  wait  --base URL [--timeout S]            until GET /readyz answers 200
  send  --base URL --n N --max-tokens T     N chat completions at once: status, job id, words
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx


async def wait_ready(base: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < end:
            try:
                if (await client.get(f"{base}/readyz")).status_code == 200:
                    return {"ready": True}
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    return {"ready": False}


async def one(client: httpx.AsyncClient, base: str, i: int, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": max_tokens,
    }
    try:
        response = await client.post(f"{base}/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return {"status": 0, "error": repr(exc), "job_id": None, "words": 0}
    words = 0
    if response.status_code == 200:
        words = len(response.json()["choices"][0]["message"]["content"].split())
    return {
        "status": response.status_code,
        "job_id": response.headers.get("x-slipstream-job-id"),
        "words": words,
    }


async def send(base: str, n: int, max_tokens: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=60.0) as client:
        return list(await asyncio.gather(*(one(client, base, i, max_tokens) for i in range(n))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["wait", "send"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    if args.action == "wait":
        result: Any = asyncio.run(wait_ready(args.base, args.timeout))
    else:
        result = asyncio.run(send(args.base, args.n, args.max_tokens))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
