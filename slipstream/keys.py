"""``slipstream keys create|list|revoke``: manage API keys in Redis (``REDIS_URL``).

``create`` prints the key once: only its SHA-256 is stored. ``list`` never prints a secret;
it shows each key's id (the hash's first 12 characters), which ``revoke`` takes (any unique
prefix of at least 6 characters). Gateways check keys only with ``SLIPSTREAM_AUTH_REQUIRED=true``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from gateway.apikeys import ApiKey, Scope, create_key, list_keys, revoke_key
from shared.keys import Keys
from shared.models import Priority
from shared.redis import RedisClient, connect
from shared.settings import CommonSettings

app = typer.Typer(no_args_is_help=True, help="Manage API keys (stored hashed in Redis).")
T = TypeVar("T")


def _run(action: Callable[[RedisClient, Keys], Awaitable[T]]) -> T:
    settings = CommonSettings()

    async def go() -> T:
        redis = connect(settings.redis_url, client_name="slipstream-keys")
        try:
            return await action(redis, Keys(settings.prefix))
        finally:
            await redis.aclose()

    return asyncio.run(go())


def describe(key: ApiKey) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.created_at_ms / 1000))
    models = ",".join(key.models) or "*"
    status = "revoked" if key.revoked else "active"
    return (
        f"{key.id}  {key.tenant:<16} {status:<8} models={models} max_priority="
        f"{key.max_priority.value} rpm={key.rpm or '-'} tpm={key.tpm or '-'} "
        f"scopes={','.join(key.scopes)} created={created}Z"
    )


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to")],
    model: Annotated[
        list[str] | None, typer.Option(help="A model the key may use (repeat; none: any)")
    ] = None,
    max_priority: Annotated[
        Priority, typer.Option(help="Highest priority; higher requests are lowered to it")
    ] = Priority.HIGH,
    rpm: Annotated[int, typer.Option(min=0, help="Requests per minute (0: no limit)")] = 0,
    tpm: Annotated[int, typer.Option(min=0, help="Tokens per minute (0: no limit)")] = 0,
    scope: Annotated[
        list[Scope] | None,
        typer.Option(help="inference (/v1, the default), metrics (/metrics, /dashboard), admin"),
    ] = None,
) -> None:
    """Create a key and print it (the only time it is shown)."""
    try:
        secret, record = _run(
            lambda r, k: create_key(
                r,
                k,
                tenant,
                models=model,
                max_priority=max_priority,
                rpm=rpm,
                tpm=tpm,
                scopes=scope,
            )
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tenant") from None
    typer.echo(secret)
    typer.echo(f"# id {record.id}, tenant {record.tenant}: store the key now", err=True)


@app.command("list")
def list_() -> None:
    """Every key's id, tenant, status, models and limits (never the key itself)."""
    for key in _run(list_keys):
        typer.echo(describe(key))


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="Key id (or a unique prefix)")]) -> None:
    """Revoke a key: it answers 401 from the next request on."""
    try:
        key = _run(lambda r, k: revoke_key(r, k, key_id))
    except (ValueError, LookupError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key.id} ({key.tenant})")
