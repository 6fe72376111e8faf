"""Settings common to every Slipstream process, read from environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Connection and protocol timing shared by the gateway and the workers."""

    model_config = SettingsConfigDict(env_prefix="SLIPSTREAM_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias="REDIS_URL",
        description="Redis to meet in (redis://, rediss:// for TLS, unix://)",
    )
    prefix: str = Field(default="slip", description="Prefix of every Redis key")
    heartbeat_s: float = Field(default=1.0, gt=0, description="Worker heartbeat period")
    worker_ttl_s: float = Field(
        default=5.0, gt=0, description="A worker silent this long is dead to the registry"
    )
    lease_s: float = Field(
        default=5.0,
        gt=0,
        description="A job whose lease is not renewed for this long is taken over",
    )
    job_log_ttl_s: int = Field(
        default=3600, gt=0, description="How long a job's event log and state stay readable"
    )
    log_format: str = Field(default="json", description="json (one object per line) or console")
    log_level: str = Field(default="info", description="debug, info, warning or error")
