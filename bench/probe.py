"""A separate process that times ``GET <url>`` at a fixed rate: the gateway's event-loop lag
as a client sees it, measured from outside the (busy) load generator.

    python -m bench.probe --url http://127.0.0.1:8000/healthz --seconds 10 --hz 20

prints one JSON object: round-trip percentiles in ms, count and failures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from urllib.parse import urlsplit


def probe(url: str, seconds: float, hz: float) -> dict[str, object]:
    parts = urlsplit(url)
    rtts: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
            conn.request("GET", parts.path or "/")
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        if ok:
            rtts.append((time.perf_counter() - started) * 1000)
        else:
            failures += 1
        next_at += 1 / hz
        time.sleep(max(0.0, next_at - time.monotonic()))
    rtts.sort()

    def q(p: float) -> float | None:
        return round(rtts[min(len(rtts) - 1, int(p / 100 * len(rtts)))], 3) if rtts else None

    return {
        "count": len(rtts),
        "failures": failures,
        "p50_ms": q(50),
        "p99_ms": q(99),
        "max_ms": round(rtts[-1], 3) if rtts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="time GET requests at a fixed rate")
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hz", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps(probe(args.url, args.seconds, args.hz)))


if __name__ == "__main__":
    main()
