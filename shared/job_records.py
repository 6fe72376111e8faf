"""The values ``JobStore``'s calls take and return: a claim, what ``PULL`` answered, a batch
to emit, an entry of a job's event log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from shared.models import EventBatch, Job, JobState, Priority


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job a worker now holds, with the fence token its writes must carry."""

    job: Job
    fence: int
    seq: int
    tokens_done: int


class _PullNeeds(TypedDict):
    free_tokens: int  # tokens the worker has free
    idle: bool  # it runs nothing (then it takes a job larger than ``free_tokens``)
    lease_ms: int  # how long a claim's lease lasts
    aging_ms: dict[Priority, int]  # per queue: after how long its head ranks first
    max_deliveries: int  # deliveries after which a job is poison


class PullOptions(_PullNeeds, total=False):
    """What a worker declares to ``PULL`` (``JobStore.pull``'s keywords)."""

    free_seqs: int  # sequence slots free (1)
    worker_ttl_ms: int  # how long its hash lives without a pull or heartbeat (5000)
    pull_id: str | None  # this call's id, the same when it is asked again (a fresh one)
    caps: int  # bit mask of the features its engine implements (0)


@dataclass(frozen=True, slots=True)
class PullResult:
    kind: Literal["empty", "full", "skipped", "job"]
    claimed: Claimed | None = None
    # 'empty', or 'job' with nothing else waiting: what to block on instead of pulling again
    last_ids: tuple[str, ...] = ()  # of the queues, then the wake stream
    next_lease_ms: int = -1  # until the next lease or reservation ends (-1: none)
    outcome: str = ""  # a claimed job: warm | cold | stolen | takeover
    affinity_wait_ms: int = 0  # how long it waited reserved for a warm worker


@dataclass(frozen=True, slots=True)
class Emit:
    """One job's batch of events to log and publish, fenced by the claim that made it."""

    claimed: Claimed
    batch: EventBatch
    new_tokens: int
    terminal: JobState | None = None


@dataclass(frozen=True, slots=True)
class LogEntry:
    stream_id: str
    batch: EventBatch


def pull_result(reply: Any) -> PullResult:
    """``PULL``'s reply, typed."""
    kind = reply[0]
    if kind == "empty":
        last = tuple(str(x) for x in reply[2:])
        return PullResult("empty", last_ids=last, next_lease_ms=int(reply[1]))
    if kind != "job":
        return PullResult(kind)
    _, _job_id, payload, fence, seq, ntok, outcome, waited, *marks = reply
    claimed = Claimed(Job.model_validate_json(payload), int(fence), int(seq), int(ntok))
    last = tuple(str(x) for x in marks[1:])  # empty: more is waiting
    return PullResult(
        "job",
        claimed=claimed,
        last_ids=last,
        next_lease_ms=int(marks[0]) if marks else -1,
        outcome=str(outcome),
        affinity_wait_ms=int(waited),
    )
