"""`tokenrelay-loadtest` / `python -m bench.loadtest`: many WebSocket clients against one or
more gateways, checking the protocol while they load it.

    python -m bench.loadtest --url ws://127.0.0.1:8411/ws --url ws://127.0.0.1:8412/ws \\
        --clients 200 --messages 5 --max-tokens 50 --cancel-rate 0.3 --reconnect-rate 0.1

Clients are assigned to the `--url`s round-robin, as a balancer would. All clients run on one
asyncio (uvloop) event loop in this process. Exit status 1 when any protocol violation was
seen (see `bench.checker`), else 0.

Figures: time to first chunk (chat sent → first chunk), inter-chunk gap (between consecutive
chunks of a message on one connection; the replay burst after a resume seam is left out),
cancel latency (cancel sent → terminal `cancelled` received; cancels whose message ended
otherwise are not counted), heartbeat RTT (`heartbeat` sent → `heartbeat_ack`), and
tokens/s: whitespace-separated tokens in all chunk texts received, over the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.checker import Checker
from bench.loadclient import LoadClient
from bench.loadconfig import LoadConfig, Results
from bench.stats import percentiles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokenrelay-loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", help="gateway WebSocket URL; repeat for several gateways "
                        "(default ws://127.0.0.1:8000/ws)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--messages", type=int, default=None, help="messages per client (default 5)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds to keep sending, instead of --messages")
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--cancel-rate", type=float, default=0.0, help="share of messages cancelled (0..1)")
    parser.add_argument("--reconnect-rate", type=float, default=0.0,
                        help="share of streams dropped mid-way and resumed on another gateway (0..1)")
    parser.add_argument("--heartbeat", type=float, default=0.0, help="heartbeat interval, seconds (0: none)")
    parser.add_argument("--terminal-timeout", type=float, default=30.0,
                        help="seconds after a message's last event before its missing terminal is a violation")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which clients connect")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write latency histograms (PNG) here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--user-prefix", default="lt-")
    parser.add_argument("--auth-secret", default=os.environ.get("TOKENRELAY_AUTH_SECRET"),
                        help="mint tokens with this secret (default: $TOKENRELAY_AUTH_SECRET; none: dev auth)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.messages is not None and args.duration is not None:
        parser.error("give --messages or --duration, not both")
    if args.messages is None and args.duration is None:
        args.messages = 5
    for name in ("cancel_rate", "reconnect_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.clients < 1 or args.max_tokens < 1:
        parser.error("--clients and --max-tokens must be at least 1")
    args.url = args.url or ["ws://127.0.0.1:8000/ws"]
    return args


def raise_open_files_limit() -> int:
    """Soft limit up to the hard limit: each client holds up to two sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run_load(
    config: LoadConfig,
    progress: Progress | None = None,
    checker: Checker | None = None,
    results: Results | None = None,
) -> tuple[Results, Checker, float]:
    """Run every client to its end; returns the figures, the checker and the wall time.
    `checker` and `results`, when given, are the ones to use (a caller that watches them
    while the load runs). A client that fails (a bug of the load test) is a violation; the
    others run on."""
    results = results if results is not None else Results()
    checker = checker if checker is not None else Checker()
    clients = [LoadClient(i, config, results, checker) for i in range(config.clients)]
    total = config.clients * config.messages if config.messages is not None else None
    task = progress.add_task("messages", total=total) if progress is not None else None

    def on_message() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    started = time.perf_counter()
    deadline = started + config.duration_s if config.duration_s is not None else None
    outcomes = await asyncio.gather(*(c.run(deadline, on_message) for c in clients), return_exceptions=True)
    for client, outcome in zip(clients, outcomes):
        if isinstance(outcome, BaseException):
            checker.violation(f"client {client.index} failed: {outcome!r}", "client_failed")
    return results, checker, time.perf_counter() - started


def summary(results: Results, checker: Checker, wall_s: float, config: LoadConfig) -> dict[str, Any]:
    return {
        "clients": config.clients,
        "urls": config.urls,
        "duration_s": round(wall_s, 3),
        "messages": results.messages,
        "accepted": results.accepted,
        "terminals": {k: results.terminals.get(k, 0) for k in ("done", "cancelled", "error")},
        "errors": dict(sorted(results.errors.items())),
        "cancels_sent": dict(sorted(results.cancels_sent.items())),
        "cancel_results": dict(sorted(results.cancel_results.items())),
        "reconnects": results.reconnects,
        "unplanned_reconnects": results.unplanned_reconnects,
        "closes": dict(results.closes),
        "chunks": results.chunks,
        "tokens": results.tokens,
        "tokens_per_s": round(results.tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "ttft_ms": percentiles(results.ttft_s),
        "inter_chunk_gap_ms": percentiles(results.gaps_s),
        "cancel_latency_ms": percentiles(results.cancel_latency_s),
        "heartbeat_rtt_ms": percentiles(results.heartbeat_rtt_s),
        "anomalies": dict(checker.anomalies),
        "anomaly_message_ids": {k: v[:50] for k, v in checker.anomaly_ids.items()},
        "violation_kinds": dict(sorted(checker.kinds.items())),
        "violations": checker.violations,
    }


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _pcts(figures: dict[str, float]) -> str:
    return " / ".join(f"{figures[k]:.1f}" for k in ("p50", "p95", "p99", "max"))


def render(console: Console, s: dict[str, Any]) -> None:
    table = Table(title=f"tokenrelay load test: {s['clients']} clients, {len(s['urls'])} gateway(s), "
                        f"{s['duration_s']:.1f} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("messages sent / accepted", f"{s['messages']} / {s['accepted']}"),
        ("terminals", _fmt(s["terminals"])),
        ("errors by code", _fmt(s["errors"])),
        ("cancels sent", _fmt(s["cancels_sent"])),
        ("cancel results", _fmt(s["cancel_results"])),
        ("reconnects (planned / unplanned)", f"{s['reconnects']} / {s['unplanned_reconnects']}"),
        ("time to first chunk ms p50/p95/p99/max", _pcts(s["ttft_ms"])),
        ("inter-chunk gap ms p50/p95/p99/max", _pcts(s["inter_chunk_gap_ms"])),
        ("cancel latency ms p50/p95/p99/max", _pcts(s["cancel_latency_ms"])),
        ("heartbeat RTT ms p50/p95/p99/max", _pcts(s["heartbeat_rtt_ms"])),
        ("chunks / tokens", f"{s['chunks']} / {s['tokens']}"),
        ("tokens/s (whitespace tokens in chunk texts)", f"{s['tokens_per_s']:.1f}"),
        ("anomalies", _fmt(s["anomalies"])),
        ("violations", f"[{'red' if s['violations'] else 'green'}]{len(s['violations'])}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for violation in s["violations"][:20]:
        console.print(f"[red]violation:[/red] {violation}", markup=True, highlight=False)
    if len(s["violations"]) > 20:
        console.print(f"... and {len(s['violations']) - 20} more (see --json)")


def plot(path: Path, results: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("time to first chunk", results.ttft_s),
        ("inter-chunk gap", results.gaps_s),
        ("cancel latency", results.cancel_latency_s),
        ("heartbeat RTT", results.heartbeat_rtt_s),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, values) in zip(axes.flat, series):
        ms = [v * 1000 for v in values]
        if ms:
            ax.hist(ms, bins=60)
        ax.set_title(f"{title} (n={len(ms)})")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wide_console() -> Console:
    """A console; piped output gets 120 columns rather than 80, so the table stays readable."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_open_files_limit()
    config = LoadConfig(
        urls=args.url, clients=args.clients, messages=args.messages, duration_s=args.duration,
        max_tokens=args.max_tokens, cancel_rate=args.cancel_rate, reconnect_rate=args.reconnect_rate,
        heartbeat_s=args.heartbeat, seed=args.seed, user_prefix=args.user_prefix,
        auth_secret=args.auth_secret or None, terminal_timeout_s=args.terminal_timeout, ramp_s=args.ramp,
        run_id=f"{int(time.time()):x}{os.getpid():x}",
    )
    console = wide_console()
    if args.quiet:
        results, checker, wall_s = uvloop.run(run_load(config))
    else:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            results, checker, wall_s = uvloop.run(run_load(config, progress))
    s = summary(results, checker, wall_s, config)
    render(console, s)
    if args.json is not None:
        args.json.write_text(json.dumps(s, indent=2) + "\n")
    if args.plot is not None:
        plot(args.plot, results)
    sys.exit(1 if s["violations"] else 0)


if __name__ == "__main__":
    main()
