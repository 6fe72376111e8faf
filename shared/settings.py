"""Settings common to every Slipstream process, read from environment variables; and the one
reading of a Redis URL (plain, TLS, unix socket, or Sentinel).

Sentinel URLs (``redis+sentinel://``, ``rediss+sentinel://`` for TLS) name the sentinels, not
a server: every process asks them for the current master, and asks again after a failover::

    redis+sentinel://[[user]:password@]host1[:26379][,host2[:26379]...]/service[/db][?options]

``user``/``password`` log in to the master (and replicas); the sentinels take their own
``sentinel_username``/``sentinel_password`` options (most deployments protect them
separately). ``rediss+sentinel`` speaks TLS to both; ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile`` and ``ssl_cert_reqs`` (``required``, ``optional``, ``none``) tune it.

Cluster URLs (``redis+cluster://``, ``rediss+cluster://``) name some of a Redis Cluster's
nodes (any reachable one is enough; the client learns the rest and follows the slots)::

    redis+cluster://[[user]:password@]host1:port[,host2:port...][?options]

Redis Cluster has only database 0; the TLS options are the Sentinel URL's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from pydantic import Field, NonNegativeInt, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
SENTINEL_PORT = 26379
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = ("sentinel_username", "sentinel_password", *_TLS_OPTIONS)
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL: where the sentinels are and what to ask them."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)


def _host_port(part: str, default_port: int = SENTINEL_PORT) -> tuple[str, int]:
    if part.startswith("["):  # [::1]:26379
        host, _, rest = part[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = part.partition(":")
    if not host:
        raise ValueError(f"an address has no host: {part!r}")
    if port and not port.isdigit():
        raise ValueError(f"a port is not a number: {part!r}")
    return host, int(port) if port else default_port


def _userinfo(netloc: str) -> tuple[str, str, str]:
    """``(username, password, hosts)`` of ``[[user]:password@]hosts`` (percent-decoded)."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts, userinfo = netloc, ""
    username, colon, password = userinfo.partition(":")
    if not colon:  # "user@" alone is a password, as redis-py reads "redis://secret@host"
        username, password = "", username
    return unquote(username), unquote(password), hosts


def _options(query: str, allowed: tuple[str, ...], kind: str) -> dict[str, str]:
    """A URL's query options; an unknown one (a typo in a TLS option must not silently turn
    verification off) raises ``ValueError``."""
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} URL option(s): {', '.join(unknown)}")
    return options


def _split(url: str, schemes: dict[str, bool]) -> tuple[bool, str, str, str, str, str] | None:
    """``(tls, username, password, hosts, path, query)`` of a URL with one of ``schemes``
    (scheme -> TLS), or None for any other URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        return None
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    return (schemes[scheme.lower()], *_userinfo(netloc), path, query)


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The Sentinel URL's parts, or None when ``url`` is not a Sentinel URL (plain Redis).

    Raises ``ValueError`` for a malformed one: no sentinel, no service name, a bad db or an
    unknown option (a typo in a TLS option must not silently turn verification off)."""
    parts = _split(url, SENTINEL_SCHEMES)
    if parts is None:
        return None
    tls, username, password, hosts, path, query = parts
    sentinels = tuple(_host_port(h) for h in hosts.split(",") if h)
    service, _, db = path.strip("/").partition("/")
    if not sentinels or not service:
        raise ValueError("a Sentinel URL needs at least one sentinel and a service name")
    if db and not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    options = _options(query, _OPTIONS, "Sentinel")
    return SentinelUrl(
        sentinels=sentinels,
        service=unquote(service),
        db=int(db or 0),
        username=username or None,
        password=password or None,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        tls=tls,
        tls_options={k: v for k, v in options.items() if k in _TLS_OPTIONS},
    )


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL: nodes to start from, login and TLS."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)


def parse_cluster_url(url: str) -> ClusterUrl | None:
    """The Cluster URL's parts, or None when ``url`` is not a Cluster URL.

    Raises ``ValueError`` for a malformed one: no node, a database other than 0 (Redis
    Cluster has one), or an unknown option."""
    parts = _split(url, CLUSTER_SCHEMES)
    if parts is None:
        return None
    tls, username, password, hosts, path, query = parts
    nodes = tuple(_host_port(h, 6379) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError("a Cluster URL needs at least one node")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, not {path.strip('/')!r}")
    options = _options(query, _TLS_OPTIONS, "Cluster")
    return ClusterUrl(
        nodes=nodes,
        username=username or None,
        password=password or None,
        tls=tls,
        tls_options=options,
    )


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (no validation: ``parse_cluster_url`` does it)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


class CommonSettings(BaseSettings):
    """Connection and protocol timing shared by the gateway and the workers."""

    model_config = SettingsConfigDict(env_prefix="SLIPSTREAM_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias="REDIS_URL",
        description=(
            "Redis to meet in (redis://, rediss:// for TLS, unix://, or Sentinel: "
            "redis+sentinel://[:password@]host:26379,host2:26379/service[/db], "
            "rediss+sentinel:// for TLS; Redis Cluster: "
            "redis+cluster://[:password@]host:port,host2:port, rediss+cluster:// for TLS)"
        ),
    )
    redis_min_replicas: int = Field(
        default=0,
        ge=0,
        description=(
            "WAIT for this many replicas after each enqueue and each job's end "
            "(0: no wait; see docs/reliability.md)"
        ),
    )
    redis_replica_wait_ms: int = Field(
        default=500,
        gt=0,
        description="Longest WAIT for SLIPSTREAM_REDIS_MIN_REPLICAS (a shortfall is logged)",
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
    gc_thresholds: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] = Field(
        default=(50_000, 20, 100),
        description=(
            "Python's garbage collector thresholds, as JSON ([50000,20,100]); CPython's own are "
            "[700,10,10] (shared/gc_policy.py argues the default)"
        ),
    )

    @field_validator("redis_url")
    @classmethod
    def _known_url(cls, url: str) -> str:
        parse_sentinel_url(url)  # a malformed Sentinel URL fails at start, not at first use
        parse_cluster_url(url)
        return url

    @model_validator(mode="after")
    def _wait_needs_one_master(self) -> CommonSettings:
        if self.redis_min_replicas and is_cluster_url(self.redis_url):
            raise ValueError(
                "SLIPSTREAM_REDIS_MIN_REPLICAS is not supported with Redis Cluster: WAIT counts "
                "one connection's writes, and a cluster client spreads them over connections"
            )
        return self
