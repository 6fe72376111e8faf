"""The gateway's lifespan-owned resources, passed to routes through ``request.state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from starlette.requests import Request

from gateway.admission import Admission
from gateway.metrics import GatewayMetrics
from gateway.multiplexer import PubSubMultiplexer
from gateway.ratelimit import RateLimits
from gateway.settings import GatewaySettings
from shared.jobs import JobStore
from shared.keys import Keys
from shared.redis import RedisClient


@dataclass(slots=True)
class GatewayState:
    settings: GatewaySettings
    redis: RedisClient
    keys: Keys
    store: JobStore
    mux: PubSubMultiplexer
    admission: Admission
    limits: RateLimits
    draining: bool = False
    open_streams: set[str] = field(default_factory=set)
    metrics: GatewayMetrics = field(default_factory=lambda: GatewayMetrics(CollectorRegistry()))


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state
