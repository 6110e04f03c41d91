"""Fixtures: one real redis-server per test session (or REDIS_URL), flushed before each test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from store import embedded
from tests.cluster import any_cluster, cluster_url, redis7_cluster, redis_cluster, redis_target  # noqa: F401 (fixtures)
from tests.support import ProcessCluster


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    port = embedded.free_port()
    proc = embedded.start(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A redis-server of the test's own, for tests that change its configuration: (url, admin)."""
    port = embedded.free_port()
    proc = embedded.start(port, tmp_path / "redis")
    client = redis.Redis(port=port)
    try:
        yield f"redis://127.0.0.1:{port}/0", client
    finally:
        client.close()
        proc.kill()
        proc.wait()


@pytest.fixture
async def process_cluster(redis_url: str, tmp_path: Path) -> AsyncIterator[ProcessCluster]:
    cluster = ProcessCluster(redis_url, tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
