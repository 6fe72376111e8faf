"""The autoscaler's pure decision: bounds, hysteresis, cooldowns, step size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.scaling import Decision, Observation, ScalePolicy, ScaleState, decide

POLICY = ScalePolicy(
    min_workers=1,
    max_workers=5,
    up_ratio=1.0,
    up_ticks=2,
    down_ticks=3,
    down_util=0.3,
    up_cooldown_s=5.0,
    down_cooldown_s=10.0,
    max_step=2,
    worker_tokens=100,
)


def obs(
    queued: int = 0, capacity: int = 100, in_use: int = 0, jobs: int | None = None
) -> Observation:
    per = 100 if capacity else 0
    return Observation(queued, (queued + 49) // 50 if jobs is None else jobs, capacity, in_use, per)


def run(
    ticks: list[tuple[Observation, int, float]], state: ScaleState | None = None
) -> list[Decision]:
    state = state or ScaleState()
    out = []
    for o, running, now in ticks:
        d = decide(POLICY, state, o, running, now)
        state = d.state
        out.append(d)
    return out


def test_bounds_apply_at_once() -> None:
    assert decide(POLICY, ScaleState(), obs(), 0, 0.0).delta == 1
    assert decide(POLICY, ScaleState(), obs(), 7, 0.0).delta == -2
    zero = ScalePolicy(min_workers=0, max_workers=2, worker_tokens=100)
    assert decide(zero, ScaleState(), obs(capacity=0), 0, 0.0).delta == 0


def test_scale_up_needs_consecutive_ticks_of_backlog() -> None:
    flicker = run([(obs(500), 1, 0.0), (obs(0), 1, 1.0), (obs(500), 1, 2.0), (obs(0), 1, 3.0)])
    assert [d.delta for d in flicker] == [0, 0, 0, 0]
    steady = run([(obs(500), 1, 0.0), (obs(500), 1, 1.0)])
    assert [d.delta for d in steady] == [0, 2]  # excess 400 tokens: 4 workers, step capped at 2
    assert steady[1].reason == "backlog"


def test_step_is_sized_by_the_excess_and_capped_by_max() -> None:
    small = run([(obs(150), 1, 0.0), (obs(150), 1, 1.0)])
    assert small[1].delta == 1
    near_max = run([(obs(5000, 400), 4, 0.0), (obs(5000, 400), 4, 1.0)])
    assert near_max[1].delta == 1
    at_max = run([(obs(5000, 500), 5, 0.0), (obs(5000, 500), 5, 1.0)])
    assert at_max[1].delta == 0


def test_up_cooldown_spaces_scale_ups() -> None:
    ticks = [(obs(900, 100), 1, 0.0), (obs(900, 100), 1, 1.0)]
    ticks += [(obs(900, 300), 3, t) for t in (2.0, 3.0, 4.0, 5.0, 6.0)]
    deltas = [d.delta for d in run(ticks)]
    assert deltas == [0, 2, 0, 0, 0, 0, 2]  # next step only 5 s after the first


def test_workers_still_starting_count_towards_capacity() -> None:
    # three workers running, none registered yet: 300 tokens of capacity are on their way
    ticks = [(obs(250, capacity=0, jobs=5), 3, t) for t in (0.0, 1.0, 2.0)]
    assert [d.delta for d in run(ticks)] == [0, 0, 0]


def test_scale_from_zero_on_any_backlog() -> None:
    zero = ScalePolicy(min_workers=0, max_workers=3, up_ticks=1, worker_tokens=100)
    d = decide(zero, ScaleState(), obs(0, capacity=0, jobs=1), 0, 0.0)
    assert d.delta == 1


def test_scale_down_after_idle_ticks_one_at_a_time_with_cooldown() -> None:
    start = ScaleState(last_change_s=0.0, last_up_s=0.0)
    ticks = [(obs(0, 300, in_use=10), 3, float(t)) for t in range(8, 15)]
    deltas = [d.delta for d in run(ticks, start)]
    assert deltas == [0, 0, -1, 0, 0, 0, 0]  # 3 idle ticks, then cooldown after the drain
    later = run([(obs(0, 200), 2, t) for t in (20.0, 21.0, 22.0)], ScaleState(0, 0, 10.0, 0.0))
    assert [d.delta for d in later] == [0, 0, -1]
    floor = run([(obs(0, 100), 1, t) for t in (40.0, 41.0, 42.0, 43.0)])
    assert all(d.delta == 0 for d in floor)


def test_busy_fleet_is_not_idle() -> None:
    # nothing queued but 150 of 300 tokens in use: one worker fewer would be 75 % busy
    ticks = [(obs(0, 300, in_use=150), 3, float(t)) for t in range(20, 30)]
    assert all(d.delta == 0 for d in run(ticks))
    queued = [(obs(0, 300, jobs=1), 3, float(t)) for t in range(20, 30)]
    assert all(d.delta == 0 for d in run(queued))


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        ScalePolicy(min_workers=3, max_workers=2)
    with pytest.raises(ValueError):
        ScalePolicy(up_ticks=0)
    with pytest.raises(ValueError):
        ScalePolicy(down_util=1.5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2000), st.integers(0, 500), st.floats(0.1, 3.0)),
        min_size=1,
        max_size=60,
    )
)
def test_any_history_stays_in_bounds_and_respects_cooldowns(
    history: list[tuple[int, int, float]],
) -> None:
    running, now, state = 0, 0.0, ScaleState()
    ups: list[float] = []
    downs: list[float] = []
    for queued, in_use, dt in history:
        now += dt
        o = Observation(queued, (queued + 49) // 50, running * 100, min(in_use, running * 100), 100)
        d = decide(POLICY, state, o, running, now)
        state = d.state
        if d.delta > 0 and running >= POLICY.min_workers:
            assert d.delta <= POLICY.max_step
            assert not ups or now - ups[-1] >= POLICY.up_cooldown_s
            ups.append(now)
        if d.delta < 0:
            assert d.delta == -1 and queued == 0
            assert not downs or now - downs[-1] >= POLICY.down_cooldown_s
            downs.append(now)
        running += d.delta
        assert POLICY.min_workers <= running <= POLICY.max_workers
