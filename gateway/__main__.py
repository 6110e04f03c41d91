"""`python -m gateway --host HOST --port PORT --redis-url URL [--http-port PORT] [--auth-secret-file PATH] ...`
and `python -m gateway token --user NAME [--secret-file PATH] [--ttl SECONDS]`.

The auth secret comes from `TOKENRELAY_AUTH_SECRET`, `--auth-secret-file PATH` or
`--auth-secret SECRET` (visible to every local user in the process list: prefer the other
two); it is never logged. Without one the gateway listens only on loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import gc
import os
import signal
import sys
import time
from pathlib import Path

import uvloop

from gateway.server import Gateway, GatewayConfig
from protocol.auth import DEFAULT_TTL_S, check_secret, mint_token
from protocol.errors import AuthError
from protocol.limits import Quotas
from protocol.logconfig import configure_logging
from store import topology
from store.embedded import default_redis_url
from store.settings import Lifetimes
from store import ShardsMismatch

SECRET_ENV = "TOKENRELAY_AUTH_SECRET"


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="tokenrelay WebSocket gateway")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="address to listen on; other than loopback only with an auth secret (or --insecure)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--http-port", type=int, default=0,
                        help="serve the OpenAI-compatible HTTP edge (/v1/...) on this port, same host and "
                        "auth; 0 (the default): off")
    parser.add_argument("--redis-url", default=default_redis_url(), help="default: $REDIS_URL, else the embedded Redis")
    topology.add_arguments(parser)
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--auth-secret", metavar="SECRET",
                        help=f"token signing secret, at least 32 bytes (default: ${SECRET_ENV}); prefer "
                        "--auth-secret-file or the variable: a command line is visible to every local user")
    secret.add_argument("--auth-secret-file", metavar="PATH", type=Path, help="read the secret from this file")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin (scheme://host[:port]) allowed besides the gateway's own; "
                        "repeatable; '*' allows any")
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a non-loopback address without an auth secret (anyone can act as any user)")
    parser.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a chat")
    parser.add_argument("--grace", type=int, default=30, help="completed-message grace window, seconds")
    parser.add_argument("--detach-grace", type=float, default=15.0, help="seconds an unwatched generation lives")
    parser.add_argument("--backlog-limit", type=int, default=10_000, help="queued jobs above which chat is refused")
    parser.add_argument("--instance-ttl", type=int, default=15,
                        help="seconds an instance's registration and its connections' slots live without a beat "
                        "(beats every third of it)")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--client-send-buffer", type=int, default=0, metavar="BYTES",
                        help="SO_SNDBUF of each client socket (0, the default: the kernel's autotuning, up to "
                        "net.ipv4.tcp_wmem's maximum); caps the kernel memory a client that does not read can hold")
    parser.add_argument(
        "--cancel-mode",
        choices=["push", "poll"],
        default="push",
        help="push (default): a cancel ends a running message at once and is pushed to its worker; "
        "poll: benchmark baseline, only the cancel key is set (run workers with --cancel-mode poll)",
    )
    limits = parser.add_argument_group("limits (0 = unlimited)")
    q = Quotas()
    limits.add_argument("--request-rate", type=float, default=q.request_rate,
                        help="chat/resume/history/clear_history per second and connection (default %(default)s)")
    limits.add_argument("--request-burst", type=int, default=q.request_burst, help="(default %(default)s)")
    limits.add_argument("--control-rate", type=float, default=q.control_rate,
                        help="cancel/heartbeat per second and connection (default %(default)s)")
    limits.add_argument("--control-burst", type=int, default=q.control_burst, help="(default %(default)s)")
    limits.add_argument("--max-generations-per-user", type=int, default=q.generations_per_user,
                        help="queued plus running generations of one user, across gateways (default %(default)s)")
    limits.add_argument("--max-connections-per-user", type=int, default=q.connections_per_user,
                        help="connections of one user, across gateways (default %(default)s)")
    limits.add_argument("--max-bad-requests", type=int, default=q.bad_requests,
                        help="bad_request errors within --bad-request-window that close a connection "
                        "(default %(default)s)")
    limits.add_argument("--bad-request-window", type=float, default=q.bad_request_window_s,
                        help="seconds (default %(default)s)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    return parser


def read_secret(flag: str | None, path: Path | None) -> str | None:
    """The secret from the flag, the file (surrounding whitespace dropped) or the environment."""
    if flag:
        return flag
    if path is not None:
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise ValueError(f"cannot read the auth secret file {path}: {exc.strerror}") from None
    return os.environ.get(SECRET_ENV) or None


def token_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway token", description="mint a user token")
    parser.add_argument("--user", required=True)
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--secret", help=f"the gateways' auth secret (default: ${SECRET_ENV})")
    secret.add_argument("--secret-file", type=Path, metavar="PATH", help="read the secret from this file")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="lifetime in seconds (default %(default)s)")
    args = parser.parse_args(argv)
    if args.ttl < 1:
        parser.error("--ttl must be at least 1 second")
    try:
        key = read_secret(args.secret, args.secret_file)
        if key is None:
            parser.error(f"--secret, --secret-file or {SECRET_ENV} is required")
        print(mint_token(check_secret(key), args.user, time.time(), args.ttl))
    except (ValueError, AuthError) as exc:
        sys.exit(f"{parser.prog}: error: {exc}")


def config_of(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's settings; `ValueError` saying what is wrong (an open gateway, a short secret)."""
    secret = read_secret(args.auth_secret, args.auth_secret_file)
    quotas = Quotas(
        request_rate=args.request_rate,
        request_burst=args.request_burst,
        control_rate=args.control_rate,
        control_burst=args.control_burst,
        generations_per_user=args.max_generations_per_user,
        connections_per_user=args.max_connections_per_user,
        bad_requests=args.max_bad_requests,
        bad_request_window_s=args.bad_request_window,
    )
    return GatewayConfig(
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        http_port=args.http_port or None,
        auth_secret=secret,
        insecure=args.insecure,
        allow_origins=tuple(args.allow_origin),
        quotas=quotas,
        default_max_tokens=args.max_tokens,
        ping_interval_s=args.ping_interval,
        ping_timeout_s=args.ping_interval,
        send_buffer_bytes=args.client_send_buffer or None,
        lifetimes=Lifetimes(grace_s=args.grace, detach_grace_s=args.detach_grace, backlog_limit=args.backlog_limit,
                            instance_ttl_s=args.instance_ttl),
        cancel_ends=args.cancel_mode == "push",
    )


async def serve(config: GatewayConfig, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        found = await topology.discover_for(args)
    except ShardsMismatch as exc:
        sys.exit(f"python -m gateway: error: {exc}")
    try:
        await Gateway(dataclasses.replace(config, topology=found)).run(stop)
    except OSError as exc:  # a port taken or not ours to bind: say so, without a traceback
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        sys.exit(f"python -m gateway: error: cannot listen: {exc.strerror or exc}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        token_main(argv[1:])
        return
    parser = serve_parser()
    args = parser.parse_args(argv)
    try:
        config = config_of(args)
    except ValueError as exc:
        sys.exit(f"{parser.prog}: error: {exc}")
    configure_logging(args.log_level, process="gateway")
    # Everything imported so far lives as long as the process: out of the collector's sight,
    # a full collection no longer walks it (a pause on every one; docs/PERFORMANCE.md).
    gc.freeze()
    uvloop.run(serve(config, args))


if __name__ == "__main__":
    main()
