"""API keys, stored in Redis by their SHA-256: tenant, allowed models, priority ceiling, limits.

A key is ``sk-slip-`` plus 43 random URL-safe characters (256 bits). Only its hash is stored
(``keys.api_key(hash)``, a hash; ``keys.api_keys``, the set of hashes), so neither Redis nor a
backup of it can give a key away. A plain SHA-256 is enough for a random secret of that size
(there is nothing to guess); the id shown by ``slipstream keys list`` is the hash's first
12 characters. Revoking marks the key, so ``list`` still shows it, and it answers 401 at once.

Scopes say what a key is for: ``inference`` (the ``/v1`` API, the default and what a key
stored before scopes existed has), ``metrics`` (read-only operator endpoints: ``/metrics``,
``/dashboard``) and ``admin`` (everything). A Prometheus token is a ``metrics``-only key, so a
leaked scrape token cannot spend GPU time or read jobs, and a tenant's key cannot read the
cluster's figures or the other tenants' recent requests on the dashboard.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from enum import StrEnum

from pydantic import BaseModel, Field

from shared.jobs import now_ms
from shared.keys import Keys
from shared.models import Priority
from shared.redis import RedisClient

KEY_PREFIX = "sk-slip-"
ID_CHARS = 12
TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Scope(StrEnum):
    INFERENCE = "inference"
    METRICS = "metrics"
    ADMIN = "admin"


class ApiKey(BaseModel):
    """What a key allows; ``rpm``/``tpm`` of 0 mean no limit, empty ``models`` means any."""

    key_hash: str
    tenant: str
    models: list[str] = Field(default_factory=list)
    max_priority: Priority = Priority.HIGH
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    revoked: bool = False
    created_at_ms: int = 0
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.INFERENCE])

    @property
    def id(self) -> str:
        return self.key_hash[:ID_CHARS]

    def allows(self, scope: Scope) -> bool:
        """Whether the key may do what ``scope`` names (``admin`` may do everything)."""
        return Scope.ADMIN in self.scopes or scope in self.scopes

    def fields(self) -> dict[str, str]:
        return {
            "tenant": self.tenant,
            "models": json.dumps(self.models),
            "max_priority": self.max_priority.value,
            "rpm": str(self.rpm),
            "tpm": str(self.tpm),
            "revoked": "1" if self.revoked else "0",
            "created_at": str(self.created_at_ms),
            "scopes": json.dumps([s.value for s in self.scopes]),
        }

    @classmethod
    def from_fields(cls, key_hash: str, raw: dict[str, str]) -> ApiKey:
        return cls(
            key_hash=key_hash,
            tenant=raw["tenant"],
            models=json.loads(raw.get("models") or "[]"),
            max_priority=Priority(raw.get("max_priority") or "high"),
            rpm=int(raw.get("rpm") or 0),
            tpm=int(raw.get("tpm") or 0),
            revoked=raw.get("revoked") == "1",
            created_at_ms=int(raw.get("created_at") or 0),
            scopes=json.loads(raw.get("scopes") or '["inference"]'),
        )


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(
    redis: RedisClient,
    keys: Keys,
    tenant: str,
    *,
    models: list[str] | None = None,
    max_priority: Priority = Priority.HIGH,
    rpm: int = 0,
    tpm: int = 0,
    scopes: list[Scope] | None = None,
) -> tuple[str, ApiKey]:
    """A new key: the secret (shown once, never stored) and its stored record."""
    if not TENANT.match(tenant):
        raise ValueError("a tenant name is 1-64 letters, digits, '.', '_' or '-'")
    if scopes is not None and not scopes:
        raise ValueError("a key needs at least one scope")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        key_hash=hash_key(secret),
        tenant=tenant,
        models=sorted(set(models or [])),
        max_priority=max_priority,
        rpm=rpm,
        tpm=tpm,
        created_at_ms=now_ms(),
        scopes=sorted(set(scopes or [Scope.INFERENCE])),
    )
    async with redis.pipeline(transaction=False) as pipe:  # the record first, then the index
        pipe.hset(keys.api_key(record.key_hash), mapping=record.fields())
        pipe.sadd(keys.api_keys, record.key_hash)
        await pipe.execute()
    return secret, record


async def lookup(redis: RedisClient, keys: Keys, secret: str) -> ApiKey | None:
    """The record of a presented key, or None when there is no such key."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
        return None
    key_hash = hash_key(secret)
    raw: dict[str, str] = await redis.hgetall(keys.api_key(key_hash))  # type: ignore[misc]
    return ApiKey.from_fields(key_hash, raw) if raw.get("tenant") else None


async def list_keys(redis: RedisClient, keys: Keys) -> list[ApiKey]:
    hashes: set[str] = await redis.smembers(keys.api_keys)  # type: ignore[misc]
    ordered = sorted(hashes)
    async with redis.pipeline(transaction=False) as pipe:
        for h in ordered:
            pipe.hgetall(keys.api_key(h))
        rows: list[dict[str, str]] = await pipe.execute()
    found = [ApiKey.from_fields(h, r) for h, r in zip(ordered, rows, strict=True) if r]
    return sorted(found, key=lambda k: (k.tenant, k.created_at_ms))


async def revoke_key(redis: RedisClient, keys: Keys, id_prefix: str) -> ApiKey:
    """Revoke the one key whose id starts with ``id_prefix`` (at least 6 characters)."""
    if len(id_prefix) < 6:
        raise ValueError("give at least 6 characters of the key id")
    matches = [k for k in await list_keys(redis, keys) if k.key_hash.startswith(id_prefix)]
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} keys match {id_prefix!r}; give exactly one id")
    await redis.hset(keys.api_key(matches[0].key_hash), "revoked", "1")  # type: ignore[misc]
    return matches[0].model_copy(update={"revoked": True})
