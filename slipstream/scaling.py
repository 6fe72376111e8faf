"""The autoscaler's decision: a pure function of policy, memory, observation and time.

No I/O here: ``decide`` takes what the autoscaler observed (queued tokens and jobs, capacity
and use of live workers) and how many workers it runs, and says how many to start (+n) or
drain (-n). Hysteresis: scale up only after ``up_ticks`` consecutive ticks of backlog above
``up_ratio`` x capacity, down only after ``down_ticks`` consecutive idle ticks (nothing queued,
use low enough that one worker fewer would still sit under ``down_util``); cooldowns space
the changes. The bounds (``min_workers``/``max_workers``) are enforced at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    min_workers: int = 1
    max_workers: int = 4
    up_ratio: float = 1.0  # backlog above this many "fleets' worth" of tokens is pressure
    up_ticks: int = 2
    down_ticks: int = 5
    down_util: float = 0.3
    up_cooldown_s: float = 5.0
    down_cooldown_s: float = 15.0
    max_step: int = 2
    worker_tokens: int = 8192  # one worker's capacity until a live worker tells us

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError("need 0 <= min_workers <= max_workers and max_workers >= 1")
        if self.up_ticks < 1 or self.down_ticks < 1 or self.max_step < 1:
            raise ValueError("up_ticks, down_ticks and max_step must be at least 1")
        if self.up_ratio < 0 or not 0 <= self.down_util <= 1 or self.worker_tokens < 1:
            raise ValueError("up_ratio >= 0, 0 <= down_util <= 1 and worker_tokens >= 1")


@dataclass(frozen=True, slots=True)
class Observation:
    """One look at Redis: the model's backlog and its live workers."""

    queued_tokens: int
    queued_jobs: int
    capacity_tokens: int  # of live workers that are not draining
    tokens_in_use: int
    per_worker_tokens: int = 0  # average capacity of one live worker; 0: none seen


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What the decision remembers between ticks."""

    up_streak: int = 0
    down_streak: int = 0
    last_change_s: float = -math.inf
    last_up_s: float = -math.inf


@dataclass(frozen=True, slots=True)
class Decision:
    delta: int  # workers to start (> 0) or to drain (< 0)
    reason: str
    state: ScaleState


def effective_capacity(policy: ScalePolicy, obs: Observation, running: int) -> tuple[int, int]:
    """(capacity, one worker's capacity): workers still starting count at the estimate."""
    per = obs.per_worker_tokens or policy.worker_tokens
    return max(obs.capacity_tokens, running * per), per


def under_pressure(policy: ScalePolicy, obs: Observation, capacity: int) -> bool:
    if capacity == 0:
        return obs.queued_tokens > 0 or obs.queued_jobs > 0
    return obs.queued_tokens > policy.up_ratio * capacity


def is_idle(policy: ScalePolicy, obs: Observation, capacity: int, per: int) -> bool:
    """Nothing queued, and one worker fewer would still be under ``down_util``."""
    if obs.queued_tokens > 0 or obs.queued_jobs > 0:
        return False
    return obs.tokens_in_use <= policy.down_util * max(0, capacity - per)


def up_step(policy: ScalePolicy, obs: Observation, capacity: int, per: int, running: int) -> int:
    """Enough workers to absorb the backlog above the threshold, at most ``max_step``."""
    excess = obs.queued_tokens - policy.up_ratio * capacity
    wanted = max(1, math.ceil(excess / per))
    return max(0, min(wanted, policy.max_step, policy.max_workers - running))


def decide(
    policy: ScalePolicy, state: ScaleState, obs: Observation, running: int, now_s: float
) -> Decision:
    """How many workers to start or drain now, given ``running`` (not draining) workers."""
    if running < policy.min_workers:
        delta = policy.min_workers - running
        return Decision(delta, "below_min", ScaleState(0, 0, now_s, now_s))
    if running > policy.max_workers:
        delta = policy.max_workers - running
        return Decision(delta, "above_max", ScaleState(0, 0, now_s, state.last_up_s))
    capacity, per = effective_capacity(policy, obs, running)
    pressure = under_pressure(policy, obs, capacity)
    idle = is_idle(policy, obs, capacity, per)
    held = replace(
        state,
        up_streak=state.up_streak + 1 if pressure else 0,
        down_streak=state.down_streak + 1 if idle else 0,
    )
    if pressure and held.up_streak >= policy.up_ticks and running < policy.max_workers:
        if now_s - state.last_up_s < policy.up_cooldown_s:
            return Decision(0, "up_cooldown", held)
        step = up_step(policy, obs, capacity, per, running)
        return Decision(step, "backlog", ScaleState(0, 0, now_s, now_s))
    if idle and held.down_streak >= policy.down_ticks and running > policy.min_workers:
        if now_s - state.last_change_s < policy.down_cooldown_s:
            return Decision(0, "down_cooldown", held)
        return Decision(-1, "idle", ScaleState(0, 0, now_s, state.last_up_s))
    return Decision(0, "hold", held)
