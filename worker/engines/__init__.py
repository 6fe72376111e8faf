"""Engines behind the ``worker.engine.Engine`` protocol; ``build_engine`` picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.settings import WorkerSettings


def build_engine(settings: WorkerSettings) -> Engine:
    """The engine named by ``settings.engine`` (imports heavy dependencies lazily)."""
    if settings.engine == "sim":
        from worker.engines.sim import SimEngine, SimProfile

        return SimEngine(SimProfile.from_settings(settings))
    if settings.engine == "llama":
        from worker.engines.llama import LlamaEngine

        return LlamaEngine.from_settings(settings)
    if settings.engine == "openai":
        from worker.engines.upstream import UpstreamEngine

        return UpstreamEngine.from_settings(settings)
    raise ValueError(f"unknown engine {settings.engine!r}")
