"""The suite never touches data it did not create: a developer's `REDIS_URL` is neither
flushed nor handed to the processes tests start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.support import REPO, ProcessCluster, gateway_pid, t

PROBE = '''
import subprocess, sys
import redis

def test_probe(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).set("written-by-the-suite", "1")
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('REDIS_URL'))"],
        capture_output=True, text=True, check=True,
    )
    assert child.stdout.strip() == redis_url
'''


def test_a_developers_redis_url_is_neither_flushed_nor_inherited(
    own_redis: tuple[str, redis.Redis], tmp_path: Path
) -> None:
    """A test run with REDIS_URL naming a Redis that holds data: the suite uses its own
    server, and a process started by a test sees the suite's server as REDIS_URL."""
    developer_url, developer = own_redis
    developer.set("precious", "kept")
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TOKENRELAY_TEST_REDIS_URL"}
    env["REDIS_URL"] = developer_url
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "-p", "tests.conftest",
         "-q", "-p", "no:cacheprovider", str(probe)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=t(60),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout
    assert developer.keys("*") == [b"precious"]
    assert developer.get("precious") == b"kept"


async def test_a_gateway_whose_port_another_process_took_is_started_again_elsewhere(
    redis_url: str, tmp_path: Path
) -> None:
    """Two suites on one machine can pick the same free port: the test's gateway then exits
    (address in use) while the other process answers there. `wait_healthy` must not take the
    other one for the test's own gateway."""
    other = ProcessCluster(redis_url, tmp_path / "other")
    ours = ProcessCluster(redis_url, tmp_path / "ours")
    (tmp_path / "other").mkdir()
    (tmp_path / "ours").mkdir()
    try:
        taken = other.add_gateway()
        await other.wait_healthy()
        proc = ours.add_gateway()
        assert proc.popen is not None
        proc.stop()  # started again on the taken port, as a collision would have it
        proc.args[proc.args.index("--port") + 1] = str(taken.port)
        proc.port = taken.port
        proc.start(ours.env())
        await ours.wait_healthy()
        assert proc.port != taken.port
        assert await gateway_pid(proc.port or 0) == proc.popen.pid
        assert await gateway_pid(taken.port or 0) == (taken.popen.pid if taken.popen else None)
    finally:
        ours.stop()
        other.stop()
