"""A short run of ``bench/faults.py`` (the figures in docs/reliability.md come from its long
run): two trials of lost replies under load and two of ``kill -9`` + AOF restart of Redis,
fewer streams. The SIGSTOP fault needs more than the 10 s socket timeout per trial, so only
the benchmark runs it."""

from __future__ import annotations

from bench.faults import LEASE_S, Trial, lossy, restart


def check(trials: list[Trial]) -> None:
    assert len(trials) == 2
    for trial in trials:
        assert not trial.errors, trial.errors
        assert trial.completed == trial.streams and trial.wrongly_failed == 0, trial
        assert trial.tokens_lost == trial.tokens_duplicated == trial.text_wrong == 0, trial
        # every stream recovers; how fast (target lease + 1 s) is the benchmark's figure, not a
        # timed assertion on a shared CI machine: here only a bound that catches a hang
        assert trial.recover_s and max(trial.recover_s) <= LEASE_S + 15.0, trial.recover_s


async def test_lost_replies_under_load() -> None:
    trials = await lossy(2, streams=5, tokens=30)
    check(trials)
    assert sum(t.detail["replies_lost"] for t in trials) >= 2  # the fault really happened


async def test_redis_restart_with_aof_under_load() -> None:
    check(await restart(2, streams=10, tokens=30))
