"""What one request came to, for every arm and the oracle alike, and how it is judged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OK = "ok"  # served, finished within its deadline
LATE = "late"  # served, finished after its deadline
REJECTED = "rejected"  # 429: refused up front
TIMEOUT = "timeout"  # 503/504, a deadline/queue-timeout error event, or the client gave up
ERROR = "error"  # anything else (connection refused, 5xx, error event)
OUTCOMES = (OK, LATE, REJECTED, TIMEOUT, ERROR)
TTFT_GOAL_MS = 500.0


@dataclass(slots=True)
class Result:
    idx: int
    at_s: float  # scheduled arrival (seconds after the run's start)
    priority: str
    max_tokens: int
    deadline_ms: int
    start_s: float = 0.0  # when the request was actually sent
    status: int = 0
    outcome: str = ERROR
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    tokens: int = 0
    backend: str | None = None
    job_id: str | None = None
    error: str | None = None
    itl_ms: list[float] = field(default_factory=list)  # gaps between token arrivals

    @property
    def served(self) -> bool:
        return self.outcome in (OK, LATE)

    def good(self, ttft_goal_ms: float = TTFT_GOAL_MS) -> bool:
        """Goodput: finished within the deadline with a first token within the goal."""
        return self.outcome == OK and self.ttft_ms is not None and self.ttft_ms <= ttft_goal_ms

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        gaps = row.pop("itl_ms")
        row["itl_max_ms"] = round(max(gaps), 3) if gaps else None
        return row


def outcome_for_status(status: int) -> str:
    if status == 429:
        return REJECTED
    if status in (503, 504, 408):
        return TIMEOUT
    return ERROR


def outcome_for_error(error: dict[str, Any]) -> str:
    code = str(error.get("code") or "")
    kind = str(error.get("type") or "")
    if code in ("rate_limited", "overloaded") or kind == "rate_limit_error":
        return REJECTED
    if "deadline" in code or kind == "timeout_error" or "timeout" in code:
        return TIMEOUT
    return ERROR
