"""Operator commands of the ``slipstream`` CLI: ``janitor``, ``autoscale``, ``worker-check``.

Registered on the main Typer app by ``register(app)``; heavy imports stay inside the commands
so that ``slipstream --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer


def janitor(
    interval: Annotated[
        int | None, typer.Option(help="Seconds between chores (divides 60, or whole minutes)")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="json or console")] = None,
) -> None:
    """Run the janitor (arq cron): dead workers, lease sweep, safe stream trims, stats."""
    from pydantic import ValidationError

    from slipstream.janitor import JanitorSettings, main

    flags: dict[str, Any] = {"janitor_interval_s": interval, "log_format": log_format}
    try:
        settings = JanitorSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc.errors()[0]["msg"])) from None
    main(settings)


def autoscale(
    command: Annotated[list[str], typer.Argument(help="Worker command (after --)")],
    min_workers: Annotated[int, typer.Option("--min", help="Fewest workers")] = 1,
    max_workers: Annotated[int, typer.Option("--max", help="Most workers")] = 4,
    interval: Annotated[float, typer.Option(help="Seconds between looks at Redis")] = 2.0,
    model: Annotated[
        str | None, typer.Option(help="Model whose backlog to watch (default: the command's)")
    ] = None,
    up_ratio: Annotated[float, typer.Option(help="Scale up above backlog/capacity")] = 1.0,
    up_ticks: Annotated[int, typer.Option(help="Ticks of backlog before scaling up")] = 2,
    down_ticks: Annotated[int, typer.Option(help="Idle ticks before draining one")] = 5,
    down_util: Annotated[float, typer.Option(help="Use under which a fleet is idle")] = 0.3,
    up_cooldown: Annotated[float, typer.Option(help="Seconds between scale-ups")] = 5.0,
    down_cooldown: Annotated[
        float, typer.Option(help="Seconds after a change before a drain")
    ] = 15.0,
    max_step: Annotated[int, typer.Option(help="Most workers started at once")] = 2,
    worker_tokens: Annotated[
        int, typer.Option(help="One worker's token capacity until one registers")
    ] = 8192,
    drain_timeout: Annotated[float, typer.Option(help="SIGKILL a drain after this long")] = 120.0,
) -> None:
    """Start and drain local workers with the backlog: slipstream autoscale -- <worker cmd>."""
    import asyncio

    from slipstream.autoscale import WorkerCommandFailing, serve
    from slipstream.scaling import ScalePolicy

    try:
        policy = ScalePolicy(
            min_workers, max_workers, up_ratio, up_ticks, down_ticks, down_util,
            up_cooldown, down_cooldown, max_step, worker_tokens,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    name = model or _flag(command, "--model") or _env_model()
    coro = serve(policy, command, model=name, interval_s=interval, drain_timeout_s=drain_timeout)
    try:
        asyncio.run(coro)
    except WorkerCommandFailing as exc:
        typer.echo(f"autoscale: {exc}", err=True)
        raise typer.Exit(1) from None


def worker_check(
    worker_id: Annotated[
        str | None, typer.Option(help="Registry id (default: this host's)")
    ] = None,
    max_age: Annotated[float | None, typer.Option(help="Oldest heartbeat accepted (s)")] = None,
    redis_down_ok: Annotated[bool, typer.Option(help="Pass when Redis is unreachable")] = False,
) -> None:
    """Exit 0 if a worker on this host (or --worker-id) has a fresh heartbeat (exec probe)."""
    import asyncio

    from shared.settings import CommonSettings
    from slipstream.probe import check_worker

    ok, why = asyncio.run(
        check_worker(
            CommonSettings(), worker_id=worker_id, max_age_s=max_age, redis_down_ok=redis_down_ok
        )
    )
    typer.echo(why)
    raise typer.Exit(0 if ok else 1)


def _flag(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == name and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _env_model() -> str:
    from worker.settings import WorkerSettings

    return WorkerSettings().model


def register(app: typer.Typer) -> None:
    app.command()(janitor)
    app.command()(autoscale)
    app.command("worker-check")(worker_check)
