"""The OpenAI-compatible HTTP edge against the WebSocket edge, in the same run, and the Stop
by disconnect.

Cluster: one gateway serving both edges (`--http-port`), one synthetic worker
(`--synthetic-rate 1000`), one client process (`bench.openai_client`: minimal clients on
both edges, so that the figures are the gateway's). The gateway keeps its limits on (the
same Redis calls as in production), only raised so that the load window's chats fit one user.

- Idle, one chat at a time (`PAIRS` pairs of 300-token chats, the edges alternating which
  goes first): time to first token (send → first text on the client) and tokens/s (tokens
  over the time from the first text to the end), per edge; the figure is HTTP over WebSocket
  of the medians (goal: within 5%). The synthetic engine's first token comes at once, so the
  time to first token is the system's alone: the harshest case for a per-request cost.
- The same pairs on the default model (SmolLM2-135M-Instruct, one `--engine llama` worker
  with `--n-threads 1`, 48 tokens at temperature 0, a different prompt each, "tell me story
  number N", odd and even N going to each edge in turn): what a client of a real model sees.
  One thread: on a machine that others share, llama.cpp's threads wait for each other at
  every step whenever one of them is descheduled, and the time to first token swung from
  0.7 to 6 s with two. Tokens/s counts the tokens after the first, over the time from the
  first text to the end, for answers that ended `length` (48 tokens).
- Load: `LOAD_STREAMS` chats at once on one edge, then on the other, `LOAD_REPEATS` times:
  delivered tokens/s (all tokens over the wall time from the first send to the last end), the
  median time to first token, and the gateway's CPU per delivered token (what the edge costs,
  less at the mercy of other work on the machine than a time).
- Stop by disconnect, idle cluster: a streamed chat completion of 2,000 tokens, the client
  closes its connection after the 3rd text chunk; the latency runs from the client's close
  (wall clock, just before) to the worker's `job_finished` line (its timestamp: after the
  engine stopped and the terminal write returned, so an upper bound of the stop), with the
  tokens the engine made after the cancel reached it (goal: p99 under 20 ms). The gateway's
  part: from the close to its `cancel` line (disconnect seen, CANCEL run, worker pushed).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from datetime import datetime
from collections.abc import Callable
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
LOAD_REPEATS, QUICK_LOAD_REPEATS = 10, 1
STOPS, QUICK_STOPS = 100, 5
REAL_PAIRS, QUICK_REAL_PAIRS = 24, 2
REAL_TOKENS = 48
GOAL_RATIO_PCT = 5.0
GOAL_STOP_P99_MS = 20.0


def run(quick: bool) -> tuple[Figures, list[Row]]:
    synthetic = asyncio.run(_synthetic(quick))
    real = asyncio.run(_real_model(quick))
    return _figures(*synthetic, real)


async def _cluster(cluster: Cluster, *worker: str) -> tuple[int, int]:
    """One gateway with both edges (limits on, raised for one user's load), one worker."""
    http_port = free_port()
    gateway = cluster.add_gateway("--http-port", str(http_port), "--max-generations-per-user", "200",
                                  "--max-connections-per-user", "400", "--request-rate", "1000",
                                  "--request-burst", "1000")
    cluster.add_worker(*worker)
    await cluster.wait_ready(timeout_s=120)
    return gateway.port or 0, http_port


async def _synthetic(quick: bool) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], list[dict[str, Any]],
                                           dict[str, dict[str, Any]], dict[str, float]]:
    async with Cluster(NAME) as cluster:
        ws_port, http_port = await _cluster(cluster, "--engine", "synthetic", "--synthetic-rate", str(RATE),
                                            "--concurrency", "200")
        client = await cluster.client("openai_edge", {"ws_port": ws_port, "http_port": http_port})
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
                window = CpuMeter(cluster.pids())
                load = await client.request(
                    "load " + json.dumps({"edge": edge, "streams": streams, "max_tokens": LOAD_TOKENS}), "load", 120)
                loads[edge].append({**load, "cpu_percent": window.read()})
                await cluster.wait_workers_idle(30)
        progress(f"{NAME}: stops")
        stops = []
        for _ in range(QUICK_STOPS if quick else STOPS):
            stopped = await client.request("disconnect " + json.dumps({"wait_chunks": 3}), "stopped", 60)
            stops.append(stopped)
            await cluster.wait_workers_idle(10)
        await client.finish(30)
        worker_log, gateway_log = cluster.workers[0].log_path, cluster.gateways[0].log_path
        assert worker_log is not None and gateway_log is not None
        finished = _log_events(worker_log.read_text(), "job_finished")
        for mid, record in _log_events(gateway_log.read_text(), "cancel").items():
            if mid in finished and record.get("reason") == "disconnected":
                finished[mid]["gateway_timestamp"] = record["timestamp"]
    return pairs, loads, stops, finished, idle_cpu


async def _real_model(quick: bool) -> list[dict[str, Any]]:
    async with Cluster(NAME + "-smollm2") as cluster:
        ws_port, http_port = await _cluster(cluster, "--engine", "llama", "--n-threads", "1")
        client = await cluster.client("openai_edge", {"ws_port": ws_port, "http_port": http_port})
        await client.expect("ready", timeout_s=30)
        progress(f"{NAME}: SmolLM2 pairs")
        await client.request("pair " + json.dumps({"max_tokens": 8, "temperature": 0}), "pair", 120)  # warm-up
        pairs = []
        for i in range(QUICK_REAL_PAIRS if quick else REAL_PAIRS):
            prompts = [f"tell me story number {2 * i + 1}", f"tell me story number {2 * i + 2}"][::1 if i % 4 < 2 else -1]
            pairs.append(await client.request("pair " + json.dumps(
                {"max_tokens": REAL_TOKENS, "temperature": 0, "http_first": i % 2 == 1, "prompts": prompts}), "pair", 120))
        await client.finish(30)
    return pairs


def _log_events(log_text: str, event: str) -> dict[str, dict[str, Any]]:
    """The JSON log lines of `event`, by message id (the last one of each)."""
    records: dict[str, dict[str, Any]] = {}
    for line in log_text.splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event and "message_id" in record:
                records[record["message_id"]] = record
    return records


def _stamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _edges(pairs: list[dict[str, Any]], speed: Callable[[dict[str, Any]], float | None]) -> dict[str, Any]:
    """Per edge: time to first token percentiles and the median tokens/s; HTTP against WebSocket."""
    out: dict[str, Any] = {}
    for edge in ("ws", "http"):
        speeds = [x for x in (speed(p[edge]) for p in pairs) if x is not None]
        out[edge] = {"first_token_ms": percentiles([p[edge]["first_s"] for p in pairs]),
                     "tokens_per_s_median": statistics.median(speeds) if speeds else 0.0, "speed_samples": len(speeds)}
    ws, http = out["ws"], out["http"]
    out["first_token_diff_pct"] = 100.0 * (http["first_token_ms"]["p50"] / ws["first_token_ms"]["p50"] - 1)
    out["tokens_per_s_diff_pct"] = 100.0 * (http["tokens_per_s_median"] / ws["tokens_per_s_median"] - 1) \
        if ws["tokens_per_s_median"] else 0.0
    return out


def _edge_rows(label: str, figures: dict[str, Any]) -> list[Row]:
    ws, http = figures["ws"], figures["http"]
    ttft, speed = figures["first_token_diff_pct"], figures["tokens_per_s_diff_pct"]
    return [
        Row(NAME, f"{label}: time to first token p50 (HTTP)", f"{http['first_token_ms']['p50']:.2f} ms",
            f"WebSocket {ws['first_token_ms']['p50']:.2f} ms ({ttft:+.1f}%)", f"within {GOAL_RATIO_PCT:g}%",
            abs(ttft) <= GOAL_RATIO_PCT),
        Row(NAME, f"{label}: time to first token p95 (HTTP)", f"{http['first_token_ms']['p95']:.2f} ms",
            f"WebSocket {ws['first_token_ms']['p95']:.2f} ms"),
        Row(NAME, f"{label}: tokens/s of one stream, median (HTTP)", f"{http['tokens_per_s_median']:.0f}",
            f"WebSocket {ws['tokens_per_s_median']:.0f} ({speed:+.1f}%)", f"within {GOAL_RATIO_PCT:g}%",
            abs(speed) <= GOAL_RATIO_PCT),
    ]


def _figures(pairs: list[dict[str, Any]], loads: dict[str, list[dict[str, Any]]], stops: list[dict[str, Any]],
             finished: dict[str, dict[str, Any]], idle_cpu: dict[str, float],
             real: list[dict[str, Any]]) -> tuple[Figures, list[Row]]:
    synthetic = _edges(pairs, lambda r: r["tokens"] / (r["end_s"] - r["first_s"]))
    smollm2 = _edges(real, lambda r: (REAL_TOKENS - 1) / (r["end_s"] - r["first_s"])
                     if r.get("finish_reason") == "length" else None)
    figures: Figures = {"synthetic": {**synthetic, "pairs": len(pairs), "rate": RATE, "tokens": PAIR_TOKENS},
                        "smollm2": {**smollm2, "pairs": len(real), "tokens": REAL_TOKENS},
                        "cpu_percent_idle": idle_cpu}
    rows = _edge_rows("synthetic, idle", synthetic) + _edge_rows("SmolLM2, idle", smollm2)
    load = {edge: [round(x["tokens"] / x["wall_s"], 1) for x in loads[edge]] for edge in ("ws", "http")}
    streams = QUICK_LOAD_STREAMS if len(loads["ws"]) < LOAD_REPEATS else LOAD_STREAMS
    load_ws, load_http = statistics.median(load["ws"]), statistics.median(load["http"])
    load_ratio = 100.0 * (load_http / load_ws - 1)
    cpu_us = {edge: [round(x["cpu_percent"]["gateway-0"] / 100 * x["wall_s"] / x["tokens"] * 1e6, 2)
                     for x in loads[edge] if "cpu_percent" in x] for edge in ("ws", "http")}
    figures["load"] = {"streams": streams, "tokens_per_s": load, "diff_pct": load_ratio,
                       "gateway_cpu_us_per_token": cpu_us,
                       "first_token_ms_median": {edge: [round(statistics.median(x["first_s"]) * 1000, 3)
                                                        for x in loads[edge]] for edge in ("ws", "http")}}
    rows.append(Row(NAME, f"synthetic, load: tokens/s of {streams} streams, median (HTTP)", f"{load_http:.0f}",
                    f"WebSocket {load_ws:.0f} ({load_ratio:+.1f}%)", f"within {GOAL_RATIO_PCT:g}%",
                    abs(load_ratio) <= GOAL_RATIO_PCT))
    if cpu_us["ws"] and cpu_us["http"]:
        rows.append(Row(NAME, "synthetic, load: gateway CPU per token, median (HTTP)",
                        f"{statistics.median(cpu_us['http']):.1f} µs",
                        f"WebSocket {statistics.median(cpu_us['ws']):.1f} µs"))
    latencies: list[float] = []
    at_gateway: list[float] = []
    after: list[int] = []
    missing = 0
    for stop in stops:
        record = finished.get(stop["message_id"])
        if record is None or record.get("outcome") != "cancelled":
            missing += 1
            continue
        latencies.append(_stamp(record["timestamp"]) - stop["closed_wall"])
        if "gateway_timestamp" in record:
            at_gateway.append(_stamp(record["gateway_timestamp"]) - stop["closed_wall"])
        after.append(int(record.get("tokens_after_cancel") or 0))
    stop_ms = percentiles(latencies)
    figures["stop"] = {"samples": len(latencies), "not_stopped": missing, "latency_ms": stop_ms,
                       "gateway_done_ms": percentiles(at_gateway),
                       "tokens_after_cancel_max": max(after, default=0),
                       "tokens_after_cancel_mean": statistics.fmean(after) if after else 0.0}
    rows.append(Row(NAME, "Stop by disconnect: close → worker stopped, p99", f"{stop_ms['p99']:.2f} ms",
                    f"p50 {stop_ms['p50']:.2f}, max {stop_ms['max']:.2f} ms; {len(latencies)} stops, "
                    f"{missing} not stopped", f"< {GOAL_STOP_P99_MS:g} ms",
                    stop_ms["p99"] < GOAL_STOP_P99_MS and missing == 0))
    rows.append(Row(NAME, "Stop by disconnect: close → gateway's CANCEL and push done, p99",
                    f"{figures['stop']['gateway_done_ms']['p99']:.2f} ms",
                    f"p50 {figures['stop']['gateway_done_ms']['p50']:.2f} ms"))
    rows.append(Row(NAME, "Stop by disconnect: tokens after the cancel, max", str(max(after, default=0)),
                    f"idle CPU: {cpu_summary(idle_cpu)}"))
    return figures, rows
