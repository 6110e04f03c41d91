"""What the relay costs, on the built-in model and on SmolLM2 (the default), in the same run:
each model through the whole system vs called directly.

Direct: `bench.engine_direct.measure_direct` (LlamaEngine in this process). System: one
gateway and one `--engine llama` worker on the same model; a client process sends the same
prompts ("tell me story number N"), each in a fresh session, one after another, after one
warm-up message that is not counted. Both sides sample greedily (`temperature: 0`), so they
generate the same tokens for the same prompt. The two alternate in rounds (engine alone, then
the system), so background load on the machine weighs on both sides alike.

An answer may end early (end of turn: `finish_reason: stop`), so both sides are compared per
token, not per message: the direct side counts the tokens the engine generated; through the
system, an answer that ended with `length` has exactly `max_tokens` tokens and one that ended
with `stop` is re-tokenized with the model's own vocabulary (the count can differ from the
generated one by a token or so).

The speed of this VM drifts by ±10% over a minute, as much as the effect measured, so the
comparison is paired: per round, the median tokens/s through the system over the median tokens/s
of the engine alone in the same round; the figure is the median over the rounds (goal: at least
98%). The pooled medians over all rounds are printed beside it.

System time per message runs from sending `chat` to receiving the terminal event on the client
(submit, queue, claim, history read, prompt, generation, chunk writes, relay, terminal write);
direct time from calling `generate` to its end. Time to first chunk (client) is compared with
the engine's time to first token (goal: at most 5 ms more). The worker's resident memory is read
once the warm-up message has been answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench.cluster import Cluster, CpuMeter, Figures, Row, cpu_summary, progress, rss_kib
from bench.engine_direct import measure_direct
from worker.model.choice import BUILTIN, ModelFile, resolve_model

NAME = "relay_overhead"
GOAL_SHARE_PCT = 98.0
GOAL_FIRST_CHUNK_MS = 5.0
TEMPERATURE = 0.0
MODELS: tuple[tuple[str, str | None, int, int], ...] = (("builtin", BUILTIN, 500, 16), ("smollm2", None, 300, 8))
"""(key in the figures, `--model` value (None: the worker's default), max_tokens, rounds): SmolLM2
runs at ~1/50 of the built-in model's speed, so it gets shorter answers and fewer rounds."""


def _count_tokens(messages: list[dict[str, Any]], max_tokens: int, model: Path) -> None:
    import llama_cpp

    # A vocabulary-only load warns that the context exceeds the (absent) training context.
    logging.getLogger("tokenrelay.llama_cpp").setLevel(logging.ERROR)
    vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        for message in messages:
            if message.get("finish_reason") == "length":
                message["tokens"] = max_tokens
                message["tokens_exact"] = True
            else:
                text = str(message.get("text", ""))
                message["tokens"] = len(vocab.tokenize(text.encode(), add_bos=False, special=False)) if text else 0
                message["tokens_exact"] = False
    finally:
        vocab.close()


async def _interleaved(
    model: ModelFile, spec: str | None, tokens: int, rounds: int, per_round: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float], int]:
    """Rounds of (engine alone, then the same prompts through the system), so that both
    sides see the same background load of the machine. Also returns the worker's RSS (KiB)."""
    directs: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    async with Cluster(NAME) as cluster:
        gateway = cluster.add_gateway()
        worker = cluster.add_worker("--engine", "llama", *(["--model", spec] if spec else []))
        await cluster.wait_ready()
        client = await cluster.client("relay", {"port": gateway.port})
        await client.expect("ready", timeout_s=60)
        warm_up = {"prompt": "warm up please", "max_tokens": tokens, "temperature": TEMPERATURE}
        await client.request(f"send {json.dumps(warm_up)}", "message", 120)
        worker_rss = rss_kib(worker.pid)
        cpu_s = 0.0
        cpu: dict[str, float] = {}
        for _ in range(rounds):
            directs.append(await asyncio.to_thread(measure_direct, tokens, per_round, 1, None, model, TEMPERATURE))
            meter = CpuMeter(cluster.pids())
            begun = time.monotonic()
            for run in range(per_round):
                request = {"prompt": f"tell me story number {run}", "max_tokens": tokens, "temperature": TEMPERATURE}
                message = await client.request(f"send {json.dumps(request)}", "message", 120)
                message["round"] = len(directs) - 1
                messages.append(message)
            spent = time.monotonic() - begun
            for name, pct in meter.read().items():
                cpu[name] = cpu.get(name, 0.0) + pct * spent
            cpu_s += spent
        await client.finish(30)
    return directs, messages, {name: round(total / cpu_s, 1) for name, total in cpu.items()}, worker_rss


def _measure_model(spec: str | None, tokens: int, rounds: int, per_round: int) -> tuple[Figures, list[Row]]:
    model = resolve_model(spec)
    progress(f"{NAME} [{model.name}]: {rounds} rounds of {per_round} × ≤{tokens} tokens, engine alone then "
             "through gateway → Redis → worker → gateway")
    directs, messages, cpu_use, worker_rss = asyncio.run(_interleaved(model, spec, tokens, rounds, per_round))
    bad = [m for m in messages if m.get("terminal") != "done"]
    if bad:
        raise RuntimeError(f"messages did not end with done: {[(m.get('terminal'), m.get('code')) for m in bad]}")
    _count_tokens(messages, tokens, model.path)
    for message in messages:
        message["tokens_per_s"] = message["tokens"] / message["end_s"] if message["end_s"] > 0 else 0.0
        message["words"] = len(str(message["text"]).split())
        del message["text"]

    direct_rates = [rate for d in directs for rate in d["tokens_per_s_runs"]]
    direct_tps = statistics.median(direct_rates)
    system_tps = statistics.median(m["tokens_per_s"] for m in messages)
    pooled_pct = system_tps / direct_tps * 100.0
    paired = [
        statistics.median(m["tokens_per_s"] for m in messages if m["round"] == r)
        / statistics.median(d["tokens_per_s_runs"])
        * 100.0
        for r, d in enumerate(directs)
    ]
    share_pct = statistics.median(paired)
    ttfc_ms = statistics.median(m["first_s"] for m in messages if m["first_s"] is not None) * 1000.0
    ttft_ms = statistics.median(float(d["first_token_ms_median"]) for d in directs)
    first_chunk_extra_ms = ttfc_ms - ttft_ms
    figures: Figures = {
        "model": model.name,
        "model_sha256": model.sha256,
        "tokens": tokens,
        "runs": rounds * per_round,
        "direct_tokens_per_s": direct_tps,
        "direct_runs_tokens_per_s": direct_rates,
        "direct_first_token_ms": ttft_ms,
        "direct_cancel_decode_p50_ms": statistics.median(d["cancel_decode"]["p50_ms"] for d in directs),
        "system_tokens_per_s": system_tps,
        "system_first_chunk_ms": ttfc_ms,
        "system_accepted_ms": statistics.median(m["accepted_s"] for m in messages) * 1000.0,
        "system_tokens_median": statistics.median(m["tokens"] for m in messages),
        "system_messages": messages,
        "system_share_pct": share_pct,
        "system_share_rounds_pct": paired,
        "system_share_pooled_pct": pooled_pct,
        "first_chunk_overhead_ms": first_chunk_extra_ms,
        "worker_rss_mib": worker_rss / 1024,
        "system_cpu_percent": cpu_use,
    }
    finishes = ", ".join(sorted({str(m["finish_reason"]) for m in messages}))
    label = f"{model.name}:"
    rows = [
        Row(NAME, f"{label} tokens/s, {rounds * per_round} msgs × ≤{tokens} tok (median)",
            f"{system_tps:,.0f} through the system", f"{direct_tps:,.0f} engine alone", "", None),
        Row(NAME, f"{label} system speed / engine alone (median of {rounds} paired rounds)", f"{share_pct:.1f} %",
            f"pooled: {pooled_pct:.1f} %", f"≥ {GOAL_SHARE_PCT:.0f} %", share_pct >= GOAL_SHARE_PCT),
        Row(NAME, f"{label} time to first chunk (median)", f"{ttfc_ms:.1f} ms at the client",
            f"{ttft_ms:.1f} ms engine first token", f"≤ +{GOAL_FIRST_CHUNK_MS:.0f} ms",
            first_chunk_extra_ms <= GOAL_FIRST_CHUNK_MS),
        Row(NAME, f"{label} tokens per message (median)", f"{figures['system_tokens_median']:.0f}",
            f"finish_reason: {finishes}", "", None),
        Row(NAME, f"{label} worker RSS after the warm-up answer", f"{worker_rss / 1024:.0f} MiB", "", "", None),
        Row(NAME, f"{label} CPU while relaying (% of one core)", cpu_summary(cpu_use), "of 200% (2 cores)", "", None),
    ]
    return figures, rows


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    figures: Figures = {}
    rows: list[Row] = []
    for key, spec, tokens, rounds in MODELS:
        if quick:
            tokens, rounds = 60, 1
        figures[key], model_rows = _measure_model(spec, tokens, rounds, 2)
        rows += model_rows
    return figures, rows
