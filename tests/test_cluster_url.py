"""Reading a Redis Cluster URL, and the settings Redis Cluster cannot honour refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import CommonSettings, parse_cluster_url
from slipstream.janitor import JanitorSettings


def test_cluster_url_parts() -> None:
    url = "rediss+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2,[::1]:7002?ssl_ca_certs=/ca.pem"
    parsed = parse_cluster_url(url)
    assert parsed is not None
    assert parsed.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (parsed.username, parsed.password, parsed.tls) == ("app", "s@cret", True)
    assert parsed.tls_options == {"ssl_ca_certs": "/ca.pem"}
    plain = parse_cluster_url("redis+cluster://:pw@h:1/0")
    assert plain is not None and (plain.username, plain.password, plain.tls) == (None, "pw", False)
    assert parse_cluster_url("redis://h:1/0") is None
    assert parse_cluster_url("redis+sentinel://h:26379/mymaster") is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",  # no node
        "redis+cluster://h:1/3",  # Redis Cluster has only database 0
        "redis+cluster://h:port",  # port not a number
        "redis+cluster://h:1?ssl_ca_cert=/typo",  # unknown option
    ],
)
def test_malformed_cluster_urls_fail_at_start(url: str) -> None:
    with pytest.raises(ValidationError):
        CommonSettings(REDIS_URL=url)


def test_min_replicas_refused_with_a_cluster() -> None:
    with pytest.raises(ValidationError, match="not supported with Redis Cluster"):
        CommonSettings(REDIS_URL="redis+cluster://h:1", redis_min_replicas=1)
    assert CommonSettings(REDIS_URL="redis://h:1/0", redis_min_replicas=1).redis_min_replicas == 1


def test_janitor_needs_a_control_redis_beside_a_cluster() -> None:
    with pytest.raises(ValidationError, match="SLIPSTREAM_CONTROL_REDIS_URL"):
        JanitorSettings(REDIS_URL="redis+cluster://h:1")
    with pytest.raises(ValidationError, match="SLIPSTREAM_CONTROL_REDIS_URL"):
        JanitorSettings(REDIS_URL="redis://h:1/0", control_redis_url="redis+cluster://h:1")
    settings = JanitorSettings(REDIS_URL="redis+cluster://h:1", control_redis_url="redis://c:2/0")
    assert settings.arq_url == "redis://c:2/0"
    assert JanitorSettings(REDIS_URL="redis://h:1/0").arq_url == "redis://h:1/0"
