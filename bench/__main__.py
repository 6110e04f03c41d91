"""`python -m bench [NAME ...] [--quick] [--json PATH] [--minutes N]`: run the benchmarks, print one table.

NAME is one or more of relay_overhead, cancel_latency, throughput, idle_memory, pubsub_cost, job_memory,
cluster_clients, cluster_pubsub, cluster_trips, cluster_compare, chaos, openai_edge, batched (default: all, what
`make bench` runs); `soak` runs only when named (`--minutes N`, default 30). `--quick` uses tiny sizes (the smoke test); `--json PATH` writes
every figure. Each benchmark starts its own Redis, gateways and workers as processes, runs its
clients in separate processes, and stops them all when it ends, fails or is interrupted.
Exit status: 0 when every benchmark ran (goals missed are reported, not failures), 1 when one
could not run, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

import bench.batched as batched
import bench.cancel_latency as cancel_latency
import bench.cluster_clients as cluster_clients
import bench.cluster_compare as cluster_compare
import bench.cluster_pubsub as cluster_pubsub
import bench.cluster_trips as cluster_trips
import bench.chaos as chaos
import bench.idle_memory as idle_memory
import bench.job_memory as job_memory
import bench.openai_edge as openai_edge
import bench.pubsub_cost as pubsub_cost
import bench.relay_overhead as relay_overhead
import bench.soak as soak
import bench.throughput as throughput
from bench.cluster import REPO, Figures, Row, progress
from protocol.logconfig import configure_logging

Benchmark = Callable[[bool], tuple[Figures, list[Row]]]
BENCHMARKS: dict[str, Benchmark] = {
    relay_overhead.NAME: relay_overhead.run,
    cancel_latency.NAME: cancel_latency.run,
    throughput.NAME: throughput.run,
    idle_memory.NAME: idle_memory.run,
    pubsub_cost.NAME: pubsub_cost.run,
    job_memory.NAME: job_memory.run,
    cluster_clients.NAME: cluster_clients.run,
    cluster_pubsub.NAME: cluster_pubsub.run,
    cluster_trips.NAME: cluster_trips.run,
    cluster_compare.NAME: cluster_compare.run,
    chaos.NAME: chaos.run,
    openai_edge.NAME: openai_edge.run,
    batched.NAME: batched.run,
}
OPT_IN: dict[str, Callable[[argparse.Namespace], tuple[Figures, list[Row]]]] = {
    soak.NAME: lambda args: soak.run(args.quick, args.minutes),
}
"""Benchmarks that run only when named (long, or with options of their own)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"one of: {', '.join([*BENCHMARKS, *OPT_IN])} (default: all but {', '.join(OPT_IN)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--minutes", type=float, default=30.0, help="soak: how long the load runs (default 30)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS and n not in OPT_IN]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join([*BENCHMARKS, *OPT_IN])}")
    return args


def table(rows: list[Row], title: str) -> Table:
    out = Table(title=title, show_lines=False)
    for column, justify in (("benchmark", "left"), ("measure", "left"), ("result", "right"),
                            ("compared with (same run)", "right"), ("goal", "right"), ("met", "center")):
        out.add_column(column, justify=justify)  # type: ignore[arg-type]
    previous = ""
    for row in rows:
        if previous and row.bench != previous:
            out.add_section()
        met = "" if row.met is None else ("[green]yes[/]" if row.met else "[red]no[/]")
        out.add_row(row.bench if row.bench != previous else "", row.measure, row.value, row.compared, row.goal, met)
        previous = row.bench
    return out


def _commit() -> str:
    """The checkout's commit (and `+dirty` when files differ from it), for the record."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup (finally, async with)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", process="bench")  # engines run in this process too (batched)
    signal.signal(signal.SIGTERM, _terminate)
    names = args.names or list(BENCHMARKS)
    figures: dict[str, Figures] = {}
    rows: list[Row] = []
    errors: dict[str, str] = {}
    started = time.monotonic()
    try:
        for name in names:
            begun = time.monotonic()
            try:
                result, bench_rows = OPT_IN[name](args) if name in OPT_IN else BENCHMARKS[name](args.quick)
            except Exception as exc:  # one broken benchmark does not hide the others
                traceback.print_exc()
                errors[name] = f"{type(exc).__name__}: {exc}"
                rows.append(Row(name, "did not run", type(exc).__name__, str(exc).splitlines()[0][:60] if str(exc) else ""))
                continue
            result["elapsed_s"] = round(time.monotonic() - begun, 1)
            progress(f"{name}: done in {result['elapsed_s']:.0f} s")
            figures[name] = result
            rows.extend(bench_rows)
    except KeyboardInterrupt:
        progress("interrupted; every process started was stopped")
        return 130
    total = time.monotonic() - started
    commit = _commit()
    title = (f"tokenrelay benchmarks{' (--quick)' if args.quick else ''} at {commit}: "
             f"{total:.0f} s, {os.cpu_count()} CPUs")
    Console(width=None if sys.stdout.isatty() else 200).print(table(rows, title))
    if args.json is not None:
        payload = {**figures, "errors": errors, "quick": args.quick, "elapsed_s": round(total, 1),
                   "commit": commit, "cpus": os.cpu_count()}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
