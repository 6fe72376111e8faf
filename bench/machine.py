"""The machine and software versions a benchmark ran on, recorded with its results."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Any

import psutil

from bench.process import cpu_count


def _command_version(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else None


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _package(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _code() -> str | None:
    """The commit the run measured (with ``+changes`` when the tree differed from it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _command_version(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    if commit is None or " " in commit:  # no git, or not a checkout
        return None
    dirty = _command_version(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    return commit + ("+changes" if dirty else "")


def describe() -> dict[str, Any]:
    packages = [
        "slipstream",
        "uvicorn",
        "starlette",
        "fastapi",
        "redis",
        "hiredis",
        "uvloop",
        "httptools",
        "pydantic",
    ]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "code": _code(),
        "cpu": _cpu_model(),
        "cores": cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _package(p) for p in packages},
        "redis-server": _command_version(["redis-server", "--version"]),
        "nginx": _command_version(["nginx", "-v"]),
        "haproxy": _command_version(["haproxy", "-v"]),
    }
