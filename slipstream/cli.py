"""``slipstream``: one console script for every role (gateway, worker, sim-server, up, status,
janitor, autoscale, worker-check).

Flags override environment variables (``REDIS_URL``, ``SLIPSTREAM_*``); a flag left unset
leaves the setting to the environment or its default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from slipstream import ops_commands
from slipstream.keys import app as keys_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(keys_app, name="keys")


def _given(**flags: Any) -> dict[str, Any]:
    """Only the flags the user set, so the rest fall through to env vars and defaults."""
    return {k: v for k, v in flags.items() if v is not None}


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Listen address")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port")] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Model accepted before any worker serves it")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="json or console")] = None,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="SLIPSTREAM_GATEWAY_PROCESSES",
            help="Gateway processes sharing the port (one per core that relaying needs)",
        ),
    ] = 1,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0,
            envvar="SLIPSTREAM_GATEWAY_METRICS_PORT",
            help="Process i also listens on this port + i, for scraping each one (0: off)",
        ),
    ] = 0,
) -> None:
    """Run the OpenAI-compatible gateway."""
    from gateway.main import main as run
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(**_given(host=host, port=port, models=model, log_format=log_format))
    run(settings, processes, metrics_port)


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="Model name to serve")] = None,
    engine: Annotated[str | None, typer.Option(help="sim, llama or openai")] = None,
    capacity_tokens: Annotated[int | None, typer.Option(help="Token budget in flight")] = None,
    max_seqs: Annotated[int | None, typer.Option(help="Most concurrent sequences")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Registry id")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Port for /metrics")] = None,
    sim_ttft_ms: Annotated[
        float | None, typer.Option(help="Simulator: time to first token")
    ] = None,
    sim_tokens_per_s: Annotated[float | None, typer.Option(help="Simulator: tokens/s")] = None,
    sim_slowdown: Annotated[float | None, typer.Option(help="Simulator: slowdown/seq")] = None,
    sim_prefill_tokens_per_s: Annotated[
        float | None, typer.Option(help="Simulator: prefill tokens/s of uncached prompt (0: free)")
    ] = None,
    sim_cache_tokens: Annotated[
        int | None, typer.Option(help="Simulator: prefix cache size in tokens")
    ] = None,
    model_path: Annotated[str | None, typer.Option(help="llama: a GGUF file")] = None,
    slots: Annotated[int | None, typer.Option(help="llama: deprecated, use --max-seqs")] = None,
    n_ctx: Annotated[int | None, typer.Option(help="llama: KV cells (all sequences)")] = None,
    threads: Annotated[int | None, typer.Option(help="llama: CPU threads (0: every core)")] = None,
    llama_cache_share: Annotated[
        float | None, typer.Option(help="llama: share of KV cells kept for finished prefixes")
    ] = None,
    upstream_url: Annotated[str | None, typer.Option(help="openai: upstream base URL")] = None,
    log_format: Annotated[str | None, typer.Option(help="json or console")] = None,
) -> None:
    """Run a worker that pulls jobs for one model."""
    from worker.main import main as run
    from worker.settings import WorkerSettings

    flags = _given(
        model=model,
        engine=engine,
        capacity_tokens=capacity_tokens,
        max_seqs=max_seqs,
        worker_id=worker_id,
        metrics_port=metrics_port,
        sim_ttft_ms=sim_ttft_ms,
        sim_tokens_per_s=sim_tokens_per_s,
        sim_slowdown=sim_slowdown,
        sim_prefill_tokens_per_s=sim_prefill_tokens_per_s,
        sim_cache_tokens=sim_cache_tokens,
        model_path=model_path,
        slots=slots,
        n_ctx=n_ctx,
        threads=threads,
        llama_cache_share=llama_cache_share,
        upstream_url=upstream_url,
        log_format=log_format,
    )
    run(WorkerSettings(**flags))


@app.command("sim-server")
def sim_server(
    host: Annotated[str, typer.Option(help="Listen address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port")] = 9000,
    model: Annotated[str, typer.Option(help="Model name it answers to")] = "sim-model",
    slots: Annotated[int, typer.Option(help="Sequences decoded at once; more queue")] = 8,
    sim_ttft_ms: Annotated[float, typer.Option(help="Time to first token")] = 20.0,
    sim_tokens_per_s: Annotated[float, typer.Option(help="Tokens/s of one sequence")] = 100.0,
    sim_slowdown: Annotated[float, typer.Option(help="Slowdown per extra sequence")] = 0.0,
    sim_prefill_tokens_per_s: Annotated[
        float, typer.Option(help="Prefill tokens/s of uncached prompt (0: free)")
    ] = 0.0,
    sim_cache_tokens: Annotated[int, typer.Option(help="Prefix cache size in tokens")] = 32768,
) -> None:
    """Serve the simulator as a standalone OpenAI-compatible server (benchmarks, tests)."""
    from worker.sim_server import serve_sim

    serve_sim(
        host,
        port,
        model,
        slots,
        sim_ttft_ms,
        sim_tokens_per_s,
        sim_slowdown,
        sim_prefill_tokens_per_s,
        sim_cache_tokens,
    )


@app.command()
def up(
    engine: Annotated[str, typer.Option(help="Engine of the local worker")] = "llama",
    model: Annotated[str | None, typer.Option(help="Model name")] = None,
    port: Annotated[int, typer.Option(help="Gateway port")] = 8000,
    workers: Annotated[int, typer.Option(help="Local workers to start")] = 1,
    gateway_processes: Annotated[
        int, typer.Option(min=1, help="Gateway processes on the port (gateway --processes)")
    ] = 1,
) -> None:
    """Everything for local use: Redis (if none answers), a gateway and workers."""
    from slipstream.local import run_local

    name = model or ("gemma-3-270m" if engine == "llama" else "sim-model")
    raise typer.Exit(run_local(_engine(engine), name, port, workers, gateway_processes))


@app.command()
def status(
    watch: Annotated[float, typer.Option(help="Refresh every N seconds (0: once)")] = 0.0,
) -> None:
    """Queue depth, pending and lag per model and priority; live workers and their capacity."""
    from slipstream.status import show_status

    show_status(watch)


ops_commands.register(app)  # janitor, autoscale, worker-check


def _engine(name: str) -> Literal["sim", "llama", "openai"]:
    if name not in ("sim", "llama", "openai"):
        raise typer.BadParameter("engine must be sim, llama or openai")
    return name  # type: ignore[return-value]


def main() -> None:
    app()
