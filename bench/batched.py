"""Batched decoding through the whole system: one llama worker at `--concurrency 8` (the batched
engine) serving many chats.

For each model file (SmolLM2-135M-Instruct as shipped, Q4_1, and its Q4_0 copy), in rounds,
on one gateway:
- the engine alone, in the benchmark's process: n chats decoded together, no relay;
- baseline: a worker at `--concurrency 1` (the one-at-a-time engine) answers chats one at a
  time (before and after the next one);
- the same worker at `--concurrency 8`: 1, 2, 4 and 8 chats sent at once (relay clients, one
  connection each). Aggregate tokens/s = all their tokens / (last terminal − send); per chat =
  a chat's tokens / (its terminal − its send); time to first chunk from its send;
- a 1,000-token prompt joining 7 running chats (a `streams` client): the longest gap between
  two chunks of a running chat while it joins, against the gaps of the seconds before; and
  the engine's own view from the worker's `sequence_ended` line (its worst prefill step);
- Stop of one chat in a batch of 8: the `cancels` client (one lane) beside 7 running chats:
  `cancel` sent → `cancelled` received, chunks after the cancel, and from the worker's log the
  tokens sampled after the cancel and the decode steps until its KV cells were removed.

Prompts ask for long stories and answers are capped at `TOKENS`, so nearly every chat ends
with `length` (exactly `TOKENS` tokens); one that ends earlier is counted by re-tokenizing its
text with the model. Sampling is the worker's default (`DEFAULT_TEMPERATURE`, random seed). The
machine is shared: each round measures both workers back to back, figures are medians over
rounds, and the CPU that other processes used meanwhile is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.cluster import ClientProc, Cluster, CpuMeter, Figures, Row, Server, progress, rss_kib
from bench.stats import percentiles
from protocol.logconfig import configure_logging

NAME = "batched"
GOALS = {"Q4_1": 1.5, "Q4_0": 2.3}
"""Aggregate tokens/s at 8 chats over one chat alone (issue 18)."""
CHATS = (1, 2, 4, 8)
TOKENS = 200
N_CTX = 1024
"""Tokens per sequence (`--n-ctx`); the context holds 8 times that."""
TOPICS = ("the sea", "a dragon", "a lighthouse", "the moon", "a forest", "a clockmaker", "a river", "a mountain")
JOIN_WORDS = 960
"""Words of the joining prompt: about 1,000 SmolLM2 tokens with the chat template."""


def _prompt(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]}."


def _long_prompt(words: int) -> str:
    sentence = "The old keeper climbed the stairs of the lighthouse and watched the ships pass by"
    parts = sentence.split()
    return "Summarize this text: " + " ".join(parts[i % len(parts)] for i in range(words))


class _Counter:
    """Tokens of an answer: `TOKENS` when it ended with `length`, else its re-tokenized text."""

    def __init__(self, model: Path | None) -> None:
        from worker.engines.llamacpp import Model
        from worker.model import ensure_builtin_model

        self.model = Model(model or ensure_builtin_model())

    def __call__(self, message: dict[str, Any], max_tokens: int) -> int:
        if message.get("finish_reason") == "length":
            return max_tokens
        text = str(message.get("text", ""))
        return len(self.model.tokenize(text, special=False)) if text else 0

    def close(self) -> None:
        self.model.close()


THREADS: int | None = None
"""`--n-threads` of the workers (None: the engine's default); `python -m bench.batched --threads N`."""


async def _start_worker(cluster: Cluster, model: Path | None, concurrency: int) -> Server:
    extra = ["--model", str(model) if model is not None else "builtin"]
    if THREADS is not None:
        extra += ["--n-threads", str(THREADS)]
    worker = cluster.add_worker("--engine", "llama", "--concurrency", str(concurrency),
                                "--n-ctx", str(N_CTX), *extra)
    await cluster.wait_ready(120)
    return worker


async def _chats(relays: list[ClientProc], n: int, tokens: int, offset: int = 0) -> list[dict[str, Any]]:
    """`n` chats sent at once, one per relay client; their records (times from their send)."""
    sends = [relay.send(f"send {json.dumps({'prompt': _prompt(offset + i), 'max_tokens': tokens})}")
             for i, relay in enumerate(relays[:n])]
    await asyncio.gather(*sends)
    return list(await asyncio.gather(*(relay.expect("message", 600) for relay in relays[:n])))


def _rates(messages: list[dict[str, Any]], count: _Counter, tokens: int) -> dict[str, Any]:
    bad = [m for m in messages if m.get("terminal") != "done"]
    if bad:
        raise RuntimeError(f"chats did not end with done: {[(m.get('terminal'), m.get('code')) for m in bad]}")
    counted = [count(m, tokens) for m in messages]
    per_chat = [n / m["end_s"] for n, m in zip(counted, messages)]
    return {
        "aggregate_tokens_per_s": sum(counted) / max(m["end_s"] for m in messages),
        "per_chat_tokens_per_s": statistics.median(per_chat),
        "first_chunk_ms": [round(m["first_s"] * 1000, 1) for m in messages],
        "tokens": counted,
        "finishes": [m.get("finish_reason") for m in messages],
    }


def _log_lines(worker: Server, event: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    if worker.log_path is None:
        return lines
    for raw in worker.log_path.read_text(errors="replace").splitlines():
        if f'"{event}"' in raw:
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return lines


async def _join(cluster: Cluster, port: int, joiner: ClientProc, worker: Server, quick: bool) -> dict[str, Any]:
    """A long prompt joins 7 running chats: their chunk gaps before and while it is prefilled."""
    loader = await cluster.client("streams", {"ports": [port], "streams": 7, "max_tokens": N_CTX - 200})
    await loader.expect("ready", timeout_s=120)
    await loader.request("mark", "mark")
    await asyncio.sleep(1.0 if quick else 3.0)
    before = await loader.request("report", "report")
    await loader.request("mark", "mark")
    words = 60 if quick else JOIN_WORDS
    message = await joiner.request(f"send {json.dumps({'prompt': _long_prompt(words), 'max_tokens': 8})}",
                                   "message", 300)
    during = await loader.request("report", "report")
    await loader.finish(60)
    await cluster.wait_workers_idle(30)
    ended = _log_lines(worker, "sequence_ended")  # the joiner has the longest prompt of this worker
    engine = max(ended, key=lambda line: int(line.get("prompt_tokens") or 0), default={})
    return {
        "gaps_before_ms": before["gaps"],
        "gaps_during_ms": during["gaps"],
        "live_during": during["live"],
        "stall_ms": during["gaps"]["max"],
        "joiner_first_chunk_ms": round(float(message["first_s"]) * 1000, 1),
        "joiner_prompt_tokens": engine.get("prompt_tokens"),
        "engine_worst_prefill_step_ms": engine.get("worst_prefill_step_ms"),
    }


async def _cancels(cluster: Cluster, port: int, worker: Server, quick: bool) -> dict[str, Any]:
    """Stop one chat in a batch of 8, again and again, while 7 others stream."""
    loader = await cluster.client("streams", {"ports": [port], "streams": 7, "max_tokens": N_CTX - 200})
    await loader.expect("ready", timeout_s=120)
    count = 3 if quick else 20
    canceller = await cluster.client("cancels", {"ports": [port], "cancels": count, "lanes": 1, "wait_chunks": 3,
                                                 "max_tokens": N_CTX - 200, "deadline_s": 120, "timeout_s": 60})
    await canceller.expect("ready", timeout_s=60)
    await loader.request("mark", "mark")
    await canceller.send("go")
    result = await canceller.expect("result", timeout_s=300)
    report = await loader.request("report", "report")
    await canceller.send("stop")
    await canceller.wait(20)
    cancelled = await _cancelled_lines(worker, len(result["latencies_s"]))  # before the loader's own cancels
    await loader.finish(60)
    await cluster.wait_workers_idle(30)
    return {
        "n": len(result["latencies_s"]),
        "latency_ms": percentiles(result["latencies_s"]),
        "chunks_after_cancel_max": max(result["chunks_after_cancel"], default=0),
        "failures": result["failures"],
        "engine_tokens_after_cancel_max": max((int(c["tokens_after_cancel"]) for c in cancelled), default=0),
        "engine_steps_after_cancel_max": max((int(c["steps_after_cancel"]) for c in cancelled), default=0),
        "engine_cancel_to_release_ms": percentiles([float(c["cancel_to_release_ms"]) / 1000 for c in cancelled]),
        "live_beside": report["live"],
    }


async def _cancelled_lines(worker: Server, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The worker's `sequence_ended` lines of cancelled sequences, once `count` are there (a
    sequence is released at the step after its cancel, maybe after the client's `cancelled`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in _log_lines(worker, "sequence_ended") if line.get("steps_after_cancel") is not None]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.05)


async def _direct(model: Path | None, chats: tuple[int, ...], tokens: int) -> dict[int, float]:
    """The engine alone, in this process (no worker running meanwhile): aggregate tokens/s of
    n chats decoded together, from their start to the last one's end, for each n."""
    from worker.cancel_token import CancelToken
    from worker.engines.base import GenerationRequest
    from worker.engines.batched import BatchedLlamaEngine

    engine = BatchedLlamaEngine(model, n_seq=max(chats), n_ctx=N_CTX, n_threads=THREADS)
    await engine.start()

    async def one(mid: str, text: str) -> int:
        async for _ in engine.generate(GenerationRequest(mid, text, tokens), CancelToken()):
            pass
        stats = engine.sequence_stats(mid)
        return stats.generated_tokens if stats else 0

    rates: dict[int, float] = {}
    try:
        await one("warm-up", _prompt(0))
        for n in chats:
            begun = time.perf_counter()
            counts = await asyncio.gather(*(one(f"direct-{n}-{i}", _prompt(i)) for i in range(n)))
            rates[n] = sum(counts) / (time.perf_counter() - begun)
    finally:
        await engine.close()
    return rates


async def _alone(cluster: Cluster, relays: list[ClientProc], model: Path | None, count: _Counter, tokens: int,
                 runs: int) -> list[dict[str, Any]]:
    """Chats one at a time on a `--concurrency 1` worker."""
    await _start_worker(cluster, model, 1)
    await _chats(relays, 1, 8)  # warm-up
    results = [_rates(await _chats(relays, 1, tokens, offset=i), count, tokens) for i in range(runs)]
    await cluster.stop_workers()
    return results


async def _round(cluster: Cluster, port: int, relays: list[ClientProc], model: Path | None, count: _Counter,
                 quick: bool, chats: tuple[int, ...], tokens: int, alone_runs: int) -> dict[str, Any]:
    """The `--concurrency 1` worker before and after the `--concurrency 8` one (its baseline is
    their median), so that a change in the machine's load between them weighs on both."""
    out: dict[str, Any] = {"direct": await _direct(model, chats, tokens)}
    alone = await _alone(cluster, relays, model, count, tokens, alone_runs)
    worker = await _start_worker(cluster, model, 8)
    await _chats(relays, 1, 8)
    out["worker_rss_mib"] = round(rss_kib(worker.pid) / 1024, 1)
    meter = CpuMeter(cluster.pids())
    for n in chats:
        out[f"chats_{n}"] = _rates(await _chats(relays, n, tokens), count, tokens)
        await cluster.wait_workers_idle(30)
    out["cpu_percent"] = meter.read()
    out["join"] = await _join(cluster, port, relays[0], worker, quick)
    out["cancel"] = await _cancels(cluster, port, worker, quick)
    await cluster.stop_workers()
    alone += await _alone(cluster, relays, model, count, tokens, alone_runs)
    out["alone_runs_tokens_per_s"] = [r["aggregate_tokens_per_s"] for r in alone]
    out["alone_tokens_per_s"] = statistics.median(out["alone_runs_tokens_per_s"])
    out["alone_first_chunk_ms"] = statistics.median(r["first_chunk_ms"][0] for r in alone)
    return out


async def _measure(label: str, model: Path | None, quick: bool, rounds: int) -> dict[str, Any]:
    chats, tokens, alone_runs = ((1, 2), 16, 1) if quick else (CHATS, TOKENS, 2)
    count = _Counter(model)
    results: list[dict[str, Any]] = []
    try:
        async with Cluster(f"{NAME}-{label}") as cluster:
            gateway = cluster.add_gateway()
            await cluster.wait_ready()
            port = gateway.port or 0
            relays = [await cluster.client("relay", {"port": port}) for _ in range(max(chats))]
            for relay in relays:
                await relay.expect("ready", timeout_s=60)
            for r in range(rounds):
                begun = time.monotonic()
                result = await _round(cluster, port, relays, model, count, quick, chats, tokens, alone_runs)
                results.append(result)
                top = result[f"chats_{max(chats)}"]["aggregate_tokens_per_s"]
                progress(f"{NAME} {label} round {r + 1}/{rounds}: alone {result['alone_tokens_per_s']:.0f} tok/s, "
                         f"{max(chats)} chats {top:.0f} tok/s ({top / result['alone_tokens_per_s']:.2f}×), "
                         f"others used {result['cpu_percent'].get('others', 0):.0f}% CPU, "
                         f"{time.monotonic() - begun:.0f} s")
            for relay in relays:
                await relay.finish(30)
    finally:
        count.close()
    return _summary(results, chats)


def _summary(results: list[dict[str, Any]], chats: tuple[int, ...]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    def ratio(values: list[float]) -> float:
        """Ratios keep their precision (a quick run's can be under 0.005); tables round them."""
        return float(statistics.median(values))

    alone = med([r["alone_tokens_per_s"] for r in results])
    summary: dict[str, Any] = {"rounds": results, "alone_tokens_per_s": alone,
                               "alone_first_chunk_ms": med([r["alone_first_chunk_ms"] for r in results])}
    for n in chats:
        summary[f"direct_{n}"] = med([r["direct"][n] for r in results])
        summary[f"direct_speedup_{n}"] = ratio([r["direct"][n] / r["direct"][1] for r in results])
        summary[f"aggregate_{n}"] = med([r[f"chats_{n}"]["aggregate_tokens_per_s"] for r in results])
        summary[f"per_chat_{n}"] = med([r[f"chats_{n}"]["per_chat_tokens_per_s"] for r in results])
        summary[f"speedup_{n}"] = ratio([r[f"chats_{n}"]["aggregate_tokens_per_s"] / r["alone_tokens_per_s"]
                                         for r in results])
        summary[f"first_chunk_{n}_ms"] = med([statistics.median(r[f"chats_{n}"]["first_chunk_ms"]) for r in results])
    summary["stall_ms"] = max(r["join"]["stall_ms"] for r in results)
    summary["stall_gap_p50_before_ms"] = med([r["join"]["gaps_before_ms"]["p50"] for r in results])
    summary["joiner_first_chunk_ms"] = med([r["join"]["joiner_first_chunk_ms"] for r in results])
    summary["engine_worst_prefill_step_ms"] = max(float(r["join"]["engine_worst_prefill_step_ms"] or 0) for r in results)
    latencies = [r["cancel"]["latency_ms"] for r in results]
    summary["cancel_p50_ms"] = med([l["p50"] for l in latencies])
    summary["cancel_max_ms"] = max(l["max"] for l in latencies)
    summary["cancel_n"] = sum(r["cancel"]["n"] for r in results)
    summary["cancel_chunks_after_max"] = max(r["cancel"]["chunks_after_cancel_max"] for r in results)
    summary["cancel_tokens_after_max"] = max(r["cancel"]["engine_tokens_after_cancel_max"] for r in results)
    summary["cancel_steps_after_max"] = max(r["cancel"]["engine_steps_after_cancel_max"] for r in results)
    summary["others_cpu_percent"] = med([r["cpu_percent"].get("others", 0.0) for r in results])
    summary["worker_rss_mib"] = max(r["worker_rss_mib"] for r in results)
    return summary


def _models(quick: bool) -> list[tuple[str, Path | None]]:
    if quick:
        return [("builtin", None)]
    from worker.model.smollm2 import ensure_smollm2, ensure_smollm2_q4_0

    return [("Q4_1", ensure_smollm2()), ("Q4_0", ensure_smollm2_q4_0())]


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    rounds = 1 if quick else 3
    figures: Figures = {"tokens": 16 if quick else TOKENS, "n_ctx": N_CTX, "threads": THREADS}
    rows: list[Row] = []
    for label, model in _models(quick):
        progress(f"{NAME}: {label} ({model.name if model else 'built-in model'}), {rounds} rounds")
        summary = asyncio.run(_measure(label, model, quick, rounds))
        figures[label] = summary
        rows.extend(_rows(label, summary, quick))
    return figures, rows


def _rows(label: str, s: dict[str, Any], quick: bool) -> list[Row]:
    chats = (1, 2) if quick else CHATS
    goal = GOALS.get(label)
    top = max(chats)
    rows = [Row(NAME, f"{label}: 1 chat on --concurrency 1", f"{s['alone_tokens_per_s']:.0f} tok/s",
                f"first chunk {s['alone_first_chunk_ms']:.0f} ms", "", None)]
    for n in chats:
        met = s[f"speedup_{n}"] >= goal if goal is not None and n == top == 8 else None
        rows.append(Row(NAME, f"{label}: {n} chats at once on --concurrency 8",
                        f"{s[f'aggregate_{n}']:.0f} tok/s ({s[f'speedup_{n}']:.2f}×)",
                        f"{s[f'per_chat_{n}']:.0f} tok/s per chat, first chunk {s[f'first_chunk_{n}_ms']:.0f} ms; "
                        f"engine alone {s[f'direct_{n}']:.0f} tok/s ({s[f'direct_speedup_{n}']:.2f}×)",
                        f"≥ {goal}×" if met is not None else "", met))
    rows += [
        Row(NAME, f"{label}: ~1,000-token prompt joins 7 chats",
            f"longest chunk gap {s['stall_ms']:.0f} ms", f"gap p50 before {s['stall_gap_p50_before_ms']:.0f} ms; "
            f"engine's worst prefill step {s['engine_worst_prefill_step_ms']:.0f} ms; its first chunk "
            f"{s['joiner_first_chunk_ms']:.0f} ms", "", None),
        Row(NAME, f"{label}: Stop one chat in a batch of 8 (n={s['cancel_n']})",
            f"p50 {s['cancel_p50_ms']:.1f} ms, max {s['cancel_max_ms']:.1f} ms",
            f"{s['cancel_chunks_after_max']} chunks, ≤ {s['cancel_tokens_after_max']} token sampled after; "
            f"cells removed within {s['cancel_steps_after_max']} step(s)",
            "≤ 1 step", s["cancel_steps_after_max"] <= 1),
        Row(NAME, f"{label}: machine", f"others used {s['others_cpu_percent']:.0f}% CPU",
            f"worker RSS {s['worker_rss_mib']:.0f} MiB at --concurrency 8", "of 200% (2 cores)", None),
    ]
    return rows


def main() -> None:
    """`python -m bench.batched [--threads N] [--quick]`: this benchmark alone, its table and JSON."""
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=None, help="the workers' --n-threads")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    configure_logging("warning", process="bench")
    THREADS = args.threads
    figures, rows = run(args.quick)
    for row in rows:
        print(f"{row.measure:48} {row.value:>28}   {row.compared}")
    print(json.dumps({k: v for k, v in figures.items() if k not in ("Q4_1", "Q4_0", "builtin")}))
    for label in ("Q4_1", "Q4_0", "builtin"):
        if label in figures:
            print(json.dumps({label: {k: v for k, v in figures[label].items() if k != "rounds"}}))


if __name__ == "__main__":
    main()
