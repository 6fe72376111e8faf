"""``python -m bench``: run the side-by-side benchmark and write its report.

python -m bench quick                    # ~10 min; writes docs/benchmarks.md + docs/bench_*.png
python -m bench full                     # the long version (same outputs)
python -m bench smoke --out /tmp/smoke   # seconds; the CI check that the harness works
python -m bench quick --only overhead,balance --reps 3 --seed 7
python -m bench full --only warm         # warm state (issue 11): only its block of the report
python -m bench report bench/results/quick-latest.json   # re-render from saved results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.experiments import EXPERIMENTS, plan_for, run_plan, save

ROOT = Path(__file__).resolve().parent.parent


def _raise_fd_limit() -> None:
    """Children inherit it: the streams experiment holds thousands of sockets per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every arm's finally: children are stopped


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["quick", "full", "smoke", "report"])
    parser.add_argument("results", nargs="?", help="report: the results JSON to render")
    parser.add_argument(
        "--only", default=",".join(EXPERIMENTS), help="experiments, comma-separated"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default: the plan's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the report (default: docs/; smoke: a temp dir)",
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-report", action="store_true", help="save results only")
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="results JSON to update: the experiments run now replace its ones, the rest stay",
    )
    return parser.parse_args(argv)


def _render(results: dict[str, Any], out: Path) -> None:
    from bench.report import write_report

    doc = write_report(results, out)
    print(f"[bench] wrote {doc}", flush=True)


def _merged(base: dict[str, Any], new: dict[str, Any], only: tuple[str, ...]) -> dict[str, Any]:
    """``base`` with the experiments in ``only`` taken from ``new`` (noted in ``merged``)."""
    out = {**base, **{k: new[k] for k in only if k in new}}
    out["seconds"] = {**base.get("seconds", {}), **new.get("seconds", {})}
    out["total_seconds"] = round(sum(out["seconds"].values()), 1)
    out["merged"] = [
        *base.get("merged", []),
        {"experiments": list(only), "machine": new["machine"], "mode": new["plan"]["mode"]},
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.mode == "report":
        if not args.results:
            raise SystemExit("report needs the results JSON")
        _render(json.loads(Path(args.results).read_text()), args.out or ROOT / "docs")
        return 0
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"unknown experiments: {', '.join(sorted(unknown))}")
    _raise_fd_limit()
    signal.signal(signal.SIGTERM, _on_sigterm)
    plan = plan_for(args.mode, reps=args.reps, seed=args.seed)
    started = time.monotonic()
    results = asyncio.run(run_plan(plan, only))
    results["total_seconds"] = round(time.monotonic() - started, 1)
    if args.merge is not None:
        results = _merged(json.loads(args.merge.read_text()), results, only)
    results_dir = args.out if args.mode == "smoke" and args.out else args.results_dir
    path = save(results, results_dir)
    print(f"[bench] results in {path} ({results['total_seconds']} s)", flush=True)
    if not args.no_report:
        out = args.out or (path.parent if args.mode == "smoke" else ROOT / "docs")
        _render(results, out)
    failed = [k for k in only if isinstance(results.get(k), dict) and "failed" in results[k]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
