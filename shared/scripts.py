"""The Lua scripts that move jobs between states atomically, and how Python calls them.

Each script is a file in ``shared/lua/`` (package data), read once at import. It starts with
its signature: one line per KEYS and ARGV entry, ``local name = KEYS[i]  -- what it is`` (the
entry may be wrapped, as in ``tonumber(ARGV[3])``; a list-valued last entry is
``{unpack(KEYS, i)}``, at most ``MAX_TAIL`` items: Lua's ``unpack`` fails past its C stack,
~8,000 values, so a caller with more splits them over calls). No other line of a script
reads ``KEYS`` or ``ARGV``: the loader checks both at import, so a script that breaks the
rule fails every test at once. A caller passes every name as a keyword (``await
ENQUEUE.call(redis, job=..., queue=...)``); a missing or unknown name raises ``TypeError``
before anything reaches Redis, so no value can slip into another's position. The trade-off:
the names are checked when called, not by mypy.

Every key a script touches belongs to one model: the names carry the ``{model}`` hash tag
(one Redis Cluster slot). Keys known before the call come through KEYS; the few found only
at run time (a job id read from a queue, a worker id from ``members``) are built from the
model's prefix and the names in ``shared.keys.LUA_NAMES``, which the loader hands to the
scripts that move jobs as the table ``K``, together with the helpers of ``helpers.lua``.
Scripts without helpers pay for neither (a script's main chunk runs on every call). A line
number in a Redis error counts those prologue lines first (``len(Script.source.splitlines())``
minus the file's).

Job states: queued -> running -> completed | failed; queued|running -> cancelled | expired.
``fence`` grows on every claim; a write must carry the current fence (zombie fencing).
``leases`` (a sorted set, score = lease end in ms) is how expired jobs are found for takeover.
Every script is safe to repeat (redis-py replays a command whose reply was lost).

Redis runs a script by its SHA1 (``EVALSHA``, no script text on the wire); a master that does
not know it (restarted, or newly promoted) answers ``NOSCRIPT``, and ``Script.call`` loads it
and runs it again. Pipelines queue ``Script.queue`` and load with ``Script.load``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from shared.keys import LUA_NAMES
from shared.redis import RedisClient

# ``local name = <expression with KEYS[i] or ARGV[i]>  -- comment``, or a list-valued last
# entry ``local name = {unpack(KEYS, i)}  -- comment``
_BINDING = re.compile(r"local (\w+)\s*=\s*(.*?)\s*--\s*\S")
_ENTRY = re.compile(r"\b(KEYS|ARGV)\[(\d+)\]")
_TAIL = re.compile(r"^\{unpack\((KEYS|ARGV), (\d+)\)\}$")
_USE = re.compile(r"\b(KEYS|ARGV)\b")
# the most items a list-valued tail may hold: ``unpack`` raises "too many results to unpack"
# past LUAI_MAXCSTACK (8,000 in Redis's Lua 5.1), a limit found when 10,000 running jobs'
# leases went out in one RENEW and every renewal failed
MAX_TAIL = 4096


@dataclass(frozen=True, slots=True)
class Script:
    """One script: its full text and SHA1, and the names of its KEYS and ARGV in order
    (``key_tail``/``arg_tail``: a list-valued last entry, or '')."""

    name: str
    source: str
    sha: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    key_tail: str
    arg_tail: str
    names: frozenset[str]  # every name a call passes

    def bind(self, named: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV in the script's order; ``TypeError`` names what is missing or unknown."""
        if named.keys() != self.names:
            missing, unknown = sorted(self.names - named.keys()), sorted(named.keys() - self.names)
            raise TypeError(f"{self.name}: missing {missing}, unknown {unknown}")
        for tail in (self.key_tail, self.arg_tail):
            if tail and len(named[tail]) > MAX_TAIL:
                raise ValueError(f"{self.name}: {tail} holds over {MAX_TAIL} items; split it")
        keys = [named[n] for n in self.keys]
        if self.key_tail:
            keys.extend(named[self.key_tail])
        args = [named[n] for n in self.args]
        if self.arg_tail:
            args.extend(named[self.arg_tail])
        return keys, args

    async def call(self, redis: RedisClient, **named: Any) -> Any:
        """Run it by its hash; on ``NOSCRIPT`` load it and run it again."""
        keys, args = self.bind(named)
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]

    def queue(self, pipe: Any, **named: Any) -> None:
        """Queue a run by hash on a pipeline (its reply may be ``NoScriptError``: ``load``)."""
        keys, args = self.bind(named)
        # the raw command: redis-py's cluster pipeline refuses its ``evalsha`` method (it
        # cannot know the keys' slots, it says) but routes the command by them all the same
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, redis: RedisClient) -> None:
        """Make Redis know the script (``SCRIPT LOAD``; the hash is the same)."""
        await redis.script_load(self.source)


def _signature(name: str, text: str) -> tuple[dict[str, list[str]], dict[str, str], int]:
    """The names of the script's KEYS and ARGV entries in order, its list-valued tails, and
    the number of lines the signature takes; raises ``ValueError`` if the file breaks a rule."""
    names: dict[str, list[str]] = {"KEYS": [], "ARGV": []}
    tails: dict[str, str] = {}
    lines = text.splitlines()
    end = 0
    for end, line in enumerate(lines):  # noqa: B007 (``end``: the line it stops at)
        if not line.startswith("local "):
            if line.startswith("--") or not line:
                continue
            break
        binding = _BINDING.match(line)
        if binding is None:
            break
        local, expr = binding.groups()
        tail, entries = _TAIL.match(expr), _ENTRY.findall(expr)
        if tail:
            table, index = tail.groups()
        elif len(entries) == 1:
            table, index = entries[0]
        else:
            break
        if table in tails or int(index) != len(names[table]) + 1:
            raise ValueError(f"{name}.lua: {line!r} is not {table}[{len(names[table]) + 1}]")
        if tail:
            tails[table] = local
        names[table].append(local)
    else:
        end = len(lines)
    for number, line in enumerate(lines[end:], start=end + 1):
        if _USE.search(line.split("--", 1)[0]):
            raise ValueError(f"{name}.lua:{number}: KEYS and ARGV are read in the signature only")
    return names, tails, end


def lua_names() -> str:
    """The table ``K`` of key names (``shared.keys.LUA_NAMES``) as a Lua statement."""
    for name, value in LUA_NAMES:
        if not re.fullmatch(r"[A-Za-z0-9_:.-]*", value):
            raise ValueError(f"key name {name}={value!r} is not plain")
    return "local K = {" + ", ".join(f"{n} = '{v}'" for n, v in LUA_NAMES) + "}\n"


def _read(file: str) -> str:
    return resources.files("shared").joinpath("lua", file).read_text(encoding="utf-8")


def load(name: str, *, helpers: bool = False) -> Script:
    """The script ``shared/lua/<name>.lua``, after ``K`` and the helpers when ``helpers``."""
    text = _read(f"{name}.lua")
    prologue = lua_names() + _read("helpers.lua") if helpers else ""
    names, tails, _ = _signature(name, text)
    _signature("helpers", prologue)  # the helpers read no KEYS or ARGV either
    keys, args = names["KEYS"], names["ARGV"]
    key_tail, arg_tail = tails.get("KEYS", ""), tails.get("ARGV", "")
    every = [*keys, *args]
    if len(set(every)) != len(every):
        raise ValueError(f"{name}.lua: a name is both in KEYS and in ARGV")
    source = prologue + text
    return Script(
        name=name.upper(),
        source=source,
        sha=hashlib.sha1(source.encode()).hexdigest(),
        keys=tuple(k for k in keys if k != key_tail),
        args=tuple(a for a in args if a != arg_tail),
        key_tail=key_tail,
        arg_tail=arg_tail,
        names=frozenset(every),
    )


ENQUEUE = load("enqueue")
EMIT = load("emit", helpers=True)
CANCEL = load("cancel", helpers=True)
RENEW = load("renew")
HANDBACK = load("handback")
SWEEP = load("sweep", helpers=True)
PULL = load("pull", helpers=True)
RELEASE = load("release")
CHARGE = load("charge")  # the gateway's rate limits (gateway/ratelimit.py)

SCRIPTS: Sequence[Script] = (
    ENQUEUE, EMIT, CANCEL, RENEW, HANDBACK, SWEEP, PULL, RELEASE, CHARGE
)  # fmt: skip
