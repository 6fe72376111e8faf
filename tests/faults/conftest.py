from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.cluster import Cluster


@pytest.fixture
def trials(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--trials"))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster.start()
    try:
        yield c
    finally:
        c.stop()
