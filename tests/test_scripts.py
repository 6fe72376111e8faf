"""The Lua scripts' loader (``shared/scripts.py``): named KEYS and ARGV, read only in each
script's signature; key names from ``shared/keys.py`` only; every key in one hash slot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from shared import scripts
from shared.keys import Keys
from shared.models import Priority

LUA = Path(scripts.__file__).parent / "lua"


def test_every_script_file_is_loaded() -> None:
    """No ``.lua`` file is left out of ``SCRIPTS`` (the helpers are prepended, not run)."""
    loaded = {s.name.lower() for s in scripts.SCRIPTS}
    assert loaded == {p.stem for p in LUA.glob("*.lua")} - {"helpers"}


def test_a_call_names_every_argument() -> None:
    """A missing or unknown name fails in Python, before anything reaches Redis."""
    named: dict[str, Any] = {n: "x" for n in scripts.HANDBACK.names}
    keys, args = scripts.HANDBACK.bind(named)
    assert (len(keys), len(args)) == (3, 2)
    with pytest.raises(TypeError, match=r"missing \['job_id'\]"):
        scripts.HANDBACK.bind({n: v for n, v in named.items() if n != "job_id"})
    with pytest.raises(TypeError, match=r"unknown \['jobid'\]"):
        scripts.HANDBACK.bind({**named, "jobid": "x"})


async def test_a_list_past_luas_unpack_limit_fails_in_python(redis: Redis) -> None:
    """Redis answers "too many results to unpack" past ~8,000 items; ``bind`` refuses a list
    over ``MAX_TAIL`` first, and lists at the bound run."""
    ids = [f"j{i}" for i in range(scripts.MAX_TAIL // 2)]  # (id, fence) pairs: MAX_TAIL args
    named: dict[str, Any] = {"leases": "{m}:leases", "lease_ms": 1000}
    pairs = [x for i in ids for x in (i, 1)]
    reply = await scripts.RENEW.call(
        redis, **named, jobs=[f"{{m}}:{i}" for i in ids], id_fences=pairs
    )
    assert reply == [0] * len(ids)  # no such jobs: none held
    with pytest.raises(ValueError, match="id_fences holds over 4096"):
        scripts.RENEW.bind({**named, "jobs": ids, "id_fences": [*pairs, "j", 1]})


def test_keys_and_argv_are_read_in_the_signature_only(tmp_path: Path) -> None:
    """The loader refuses a script that reads KEYS or ARGV past its signature, skips an
    index, or binds a name without saying what it is."""
    good = "-- what it does\nlocal a = KEYS[1]  -- a key\nlocal b = ARGV[1]  -- an arg\n"
    names, tails, end = scripts._signature("good", good + "return a .. b\n")
    assert (names, tails, end) == ({"KEYS": ["a"], "ARGV": ["b"]}, {}, 3)
    for bad in (
        good + "return ARGV[2]\n",
        good + "local c = KEYS[3]  -- skips 2\n",
        "local a = KEYS[1]\nreturn a\n",  # no comment: not a signature line
    ):
        with pytest.raises(ValueError):
            scripts._signature("bad", bad)
    for script in scripts.SCRIPTS:  # and the real ones read them nowhere else
        body = script.source.split("\n")
        uses = [n for n, ln in enumerate(body) if re.search(r"\b(KEYS|ARGV)\b", ln.split("--")[0])]
        assert len(uses) == len(script.keys) + len(script.args) + bool(script.key_tail) + bool(
            script.arg_tail
        ), script.name


def test_no_key_name_is_written_in_lua() -> None:
    """Key names come from shared/keys.py (``K``), never from a string in a script."""
    names = "job|worker|warm|inbox|session|share|deferred|queue|fair|leases|reserved|members"
    names += "|dead|wake|backlog"
    # a name with its separator ('job:', ':log'), or one appended to a prefix (.. 'leases')
    fragments = re.compile(rf"'({names}):|':(log|events)'|\.\.\s*'({names})'")
    for path in LUA.glob("*.lua"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not fragments.search(line), f"{path.name}:{n}: {line}"


async def test_lua_builds_the_keys_keys_py_names(redis: Redis) -> None:
    """The keys a script builds at run time are the very names ``Keys`` gives Python."""
    k, model = Keys("pfx"), "m-1"
    mp = k.model_prefix(model)
    lua = scripts.lua_names() + (
        "local mp = ARGV[1]\n"
        "return {mp .. K.job .. 'j1', mp .. K.job .. 'j1' .. K.job_log,"
        " mp .. K.job .. 'j1' .. K.job_events, mp .. K.worker .. 'w1', mp .. K.warm .. 'w1',"
        " mp .. K.inbox .. 'w1', mp .. K.session .. 's1', mp .. K.share .. 'high',"
        " mp .. K.queue .. 'high', mp .. K.deferred .. 'high' .. K.part .. 'acme'}\n"
    )
    built = await redis.eval(lua, 0, mp)  # type: ignore[misc]
    hi = Priority.HIGH
    assert built == [
        k.job(model, "j1"),
        k.job_log(model, "j1"),
        k.job_channel(model, "j1"),
        k.worker_state(model, "w1"),
        k.warm(model, "w1"),
        k.inbox(model, "w1"),
        k.session(model, "s1"),
        k.share(model, hi),
        k.queue(model, hi),
        k.deferred(model, hi, "acme"),
    ]
