"""Fixtures: one real redis-server per test session, emptied before each test.

The suite starts its own server on a free port. `TOKENRELAY_TEST_REDIS_URL` names another
one to use instead: its database is emptied (FLUSHDB) before every test, so point it only at
a Redis whose data may be lost. `REDIS_URL`, the product's own variable, is never used by the
tests: it is removed from the environment as the session starts, and once the suite's server
runs it names that server, so a process a test starts without an explicit URL cannot reach a
developer's Redis.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from store import embedded
from store.redis_store import Store, connect
from tests.cluster import any_cluster, cluster_url, redis7_cluster, redis_cluster, redis_target  # noqa: F401 (fixtures)
from tests.support import ProcessCluster

TEST_REDIS_ENV = "TOKENRELAY_TEST_REDIS_URL"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.pop("REDIS_URL", None)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env:
        url = os.environ.get(TEST_REDIS_ENV)
        if url:
            env.setenv("REDIS_URL", url)
            yield url
            return
        port = embedded.free_port()
        proc = embedded.start(port, tmp_path_factory.mktemp("redis"))
        url = f"redis://127.0.0.1:{port}/0"
        env.setenv("REDIS_URL", url)
        try:
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    client = redis.Redis.from_url(redis_server)
    try:
        client.flushdb()
    finally:
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


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    """The store of the test's Redis (one shard), its APPEND script loaded."""
    s = Store(connect(redis_url))
    await s.load_append_script()
    try:
        yield s
    finally:
        await s.close()
