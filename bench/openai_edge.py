"""The OpenAI-compatible HTTP edge against the WebSocket edge, in the same run, and the Stop
by disconnect.

Cluster: one gateway serving both edges (`--http-port`), one synthetic worker
(`--synthetic-rate 1000`), one client process (`bench.openai_client`). The gateway keeps
its limits on (connection slots and generation counts cost the same Redis calls as in
production), only raised so that the load window's chats fit one user.

- Idle, one chat at a time (`PAIRS` pairs of 300-token chats, the edges alternating which
  goes first): time to first token (send → first text on the client) and tokens/s (tokens
  over the time from the first text to the end), per edge; the figure is HTTP over WebSocket
  of the medians (goal: within 5%).
- Load: `LOAD_STREAMS` chats at once on one edge, then on the other, `LOAD_REPEATS` times:
  delivered tokens/s (all tokens over the wall time from the first send to the last end) and
  the median time to first token.
- Stop by disconnect, idle cluster: a streamed chat completion of 2,000 tokens, the client
  closes its connection after the 3rd text chunk; the latency runs from the client's close
  (wall clock, just before) to the worker's `job_finished` line (its timestamp: after the
  engine stopped and the terminal write returned, so an upper bound of the stop), with the
  tokens the engine made after the cancel reached it (goal: p99 under 20 ms).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from datetime import datetime
from typing import Any

from bench.cluster import Cluster, CpuMeter, Figures, Row, cpu_summary, progress
from bench.stats import percentiles
from store.embedded import free_port

NAME = "openai_edge"
RATE = 1000
PAIRS, QUICK_PAIRS = 40, 4
PAIR_TOKENS = 300
LOAD_STREAMS, QUICK_LOAD_STREAMS = 40, 5
LOAD_TOKENS = 500
LOAD_REPEATS, QUICK_LOAD_REPEATS = 3, 1
STOPS, QUICK_STOPS = 100, 5
GOAL_RATIO_PCT = 5.0
GOAL_STOP_P99_MS = 20.0


def run(quick: bool) -> tuple[Figures, list[Row]]:
    return asyncio.run(_run(quick))


async def _run(quick: bool) -> tuple[Figures, list[Row]]:
    async with Cluster(NAME) as cluster:
        http_port = free_port()
        gateway = cluster.add_gateway("--http-port", str(http_port), "--max-generations-per-user", "200",
                                      "--max-connections-per-user", "400", "--request-rate", "1000",
                                      "--request-burst", "1000")
        cluster.add_worker("--engine", "synthetic", "--synthetic-rate", str(RATE), "--concurrency", "200")
        await cluster.wait_ready()
        client = await cluster.client("openai_edge", {"ws_port": gateway.port, "http_port": http_port})
        await client.expect("ready", timeout_s=30)
        cpu = CpuMeter(cluster.pids())
        progress(f"{NAME}: idle pairs")
        pairs = [await client.request("pair " + json.dumps({"max_tokens": PAIR_TOKENS, "http_first": i % 2 == 1}),
                                      "pair", 60) for i in range(QUICK_PAIRS if quick else PAIRS)]
        idle_cpu = cpu.read()
        progress(f"{NAME}: load")
        loads: dict[str, list[dict[str, Any]]] = {"ws": [], "http": []}
        for repeat in range(QUICK_LOAD_REPEATS if quick else LOAD_REPEATS):
            for edge in ("ws", "http") if repeat % 2 == 0 else ("http", "ws"):
                streams = QUICK_LOAD_STREAMS if quick else LOAD_STREAMS
                loads[edge].append(await client.request(
                    "load " + json.dumps({"edge": edge, "streams": streams, "max_tokens": LOAD_TOKENS}), "load", 120))
                await cluster.wait_workers_idle(30)
        progress(f"{NAME}: stops")
        stops = []
        for _ in range(QUICK_STOPS if quick else STOPS):
            stopped = await client.request("disconnect " + json.dumps({"wait_chunks": 3}), "stopped", 60)
            stops.append(stopped)
            await cluster.wait_workers_idle(10)
        await client.finish(30)
        worker_log = cluster.workers[0].log_path
        assert worker_log is not None
        finished = _job_finished(worker_log.read_text())
    return _figures(pairs, loads, stops, finished, idle_cpu)


def _job_finished(log_text: str) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for line in log_text.splitlines():
        if line.startswith("{") and '"job_finished"' in line:
            record = json.loads(line)
            records[record["message_id"]] = record
    return records


def _stamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _figures(pairs: list[dict[str, Any]], loads: dict[str, list[dict[str, Any]]], stops: list[dict[str, Any]],
             finished: dict[str, dict[str, Any]], idle_cpu: dict[str, float]) -> tuple[Figures, list[Row]]:
    figures: Figures = {"pairs": len(pairs), "rate": RATE, "pair_tokens": PAIR_TOKENS, "cpu_percent_idle": idle_cpu}
    rows: list[Row] = []
    for edge in ("ws", "http"):
        ttft = [p[edge]["first_s"] for p in pairs]
        speed = [p[edge]["tokens"] / (p[edge]["end_s"] - p[edge]["first_s"]) for p in pairs]
        figures[edge] = {"first_token_ms": percentiles(ttft), "tokens_per_s_median": statistics.median(speed),
                         "tokens": [p[edge]["tokens"] for p in pairs][:3]}
        load = loads[edge]
        figures[edge]["load"] = {
            "tokens_per_s": [round(x["tokens"] / x["wall_s"], 1) for x in load],
            "first_token_ms_median": [round(statistics.median(x["first_s"]) * 1000, 3) for x in load],
        }
    ws, http = figures["ws"], figures["http"]
    ttft_ratio = 100.0 * (http["first_token_ms"]["p50"] / ws["first_token_ms"]["p50"] - 1)
    speed_ratio = 100.0 * (http["tokens_per_s_median"] / ws["tokens_per_s_median"] - 1)
    load_ws = statistics.median(ws["load"]["tokens_per_s"])
    load_http = statistics.median(http["load"]["tokens_per_s"])
    load_ratio = 100.0 * (load_http / load_ws - 1)
    figures.update(first_token_diff_pct=ttft_ratio, tokens_per_s_diff_pct=speed_ratio, load_tokens_per_s_diff_pct=load_ratio)
    rows.append(Row(NAME, "idle: time to first token p50 (HTTP)", f"{http['first_token_ms']['p50']:.2f} ms",
                    f"WebSocket {ws['first_token_ms']['p50']:.2f} ms ({ttft_ratio:+.1f}%)", f"within {GOAL_RATIO_PCT:g}%",
                    abs(ttft_ratio) <= GOAL_RATIO_PCT))
    rows.append(Row(NAME, "idle: time to first token p95 (HTTP)", f"{http['first_token_ms']['p95']:.2f} ms",
                    f"WebSocket {ws['first_token_ms']['p95']:.2f} ms"))
    rows.append(Row(NAME, "idle: tokens/s of one stream, median (HTTP)", f"{http['tokens_per_s_median']:.0f}",
                    f"WebSocket {ws['tokens_per_s_median']:.0f} ({speed_ratio:+.1f}%)", f"within {GOAL_RATIO_PCT:g}%",
                    abs(speed_ratio) <= GOAL_RATIO_PCT))
    rows.append(Row(NAME, f"load: tokens/s of {LOAD_STREAMS} streams, median (HTTP)", f"{load_http:.0f}",
                    f"WebSocket {load_ws:.0f} ({load_ratio:+.1f}%)", f"within {GOAL_RATIO_PCT:g}%",
                    abs(load_ratio) <= GOAL_RATIO_PCT))
    latencies: list[float] = []
    after: list[int] = []
    missing = 0
    for stop in stops:
        record = finished.get(stop["message_id"])
        if record is None or record.get("outcome") != "cancelled":
            missing += 1
            continue
        latencies.append(_stamp(record["timestamp"]) - stop["closed_wall"])
        after.append(int(record.get("tokens_after_cancel") or 0))
    stop_ms = percentiles(latencies)
    figures["stop"] = {"samples": len(latencies), "not_stopped": missing, "latency_ms": stop_ms,
                       "tokens_after_cancel_max": max(after, default=0),
                       "tokens_after_cancel_mean": statistics.fmean(after) if after else 0.0}
    rows.append(Row(NAME, "Stop by disconnect: close → worker stopped, p99", f"{stop_ms['p99']:.2f} ms",
                    f"p50 {stop_ms['p50']:.2f}, max {stop_ms['max']:.2f} ms; {len(latencies)} stops, "
                    f"{missing} not stopped", f"< {GOAL_STOP_P99_MS:g} ms",
                    stop_ms["p99"] < GOAL_STOP_P99_MS and missing == 0))
    rows.append(Row(NAME, "Stop by disconnect: tokens after the cancel, max", str(max(after, default=0)),
                    f"idle CPU: {cpu_summary(idle_cpu)}"))
    return figures, rows
