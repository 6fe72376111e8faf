"""The gateway's lifespan-owned resources, passed to routes through ``request.state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis
from starlette.requests import Request

from gateway.multiplexer import PubSubMultiplexer
from gateway.settings import GatewaySettings
from shared.jobs import JobStore
from shared.keys import Keys


@dataclass(slots=True)
class GatewayState:
    settings: GatewaySettings
    redis: Redis
    keys: Keys
    store: JobStore
    mux: PubSubMultiplexer
    draining: bool = False
    open_streams: set[str] = field(default_factory=set)


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state
