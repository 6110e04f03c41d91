"""Tokens/s and cancel latency of a model (the built-in one by default), called directly through LlamaEngine.

`python -m bench.engine_direct [--model builtin|PATH] [--tokens 500] [--runs 5] [--cancels 20] [--temperature T]`

Cancel latency is measured from `token.cancel()` (`token.cancelled_at`) to the moment the
generation thread stopped touching the model (`GenerationStats.idle_at`), both from
`time.monotonic()`: once in the prompt phase (a ~1500-word prompt) and once while decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from worker.cancel_token import CancelToken, Phase
from worker.engines.base import Finish, GenerationRequest
from worker.engines.llama import GenerationStats, LlamaEngine
from worker.model.choice import BUILTIN, ModelFile, resolve_model

_SYLLABLES = ["ba", "no", "ki", "te", "lu", "ma", "so", "di", "fe", "ru"]
PREFILL_WORDS = 450
"""~1,400 tokens on either model's tokenizer: within the 2,048-token context with room to answer."""


def _long_prompt(words: int, variant: int) -> str:
    n = len(_SYLLABLES)
    return " ".join(
        _SYLLABLES[(i + variant) % n]
        + _SYLLABLES[(i * 3 + variant // n) % n]
        + _SYLLABLES[(i * 7 + 1) % n]
        for i in range(words)
    )


class _PromptSignal(CancelToken):
    """Sets an asyncio event, thread-safely, when the engine starts evaluating the prompt."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.in_prompt = asyncio.Event()

    def set_phase(self, phase: Phase) -> None:
        super().set_phase(phase)
        if phase is Phase.PROMPT:
            self._loop.call_soon_threadsafe(self.in_prompt.set)


def _stats(engine: LlamaEngine) -> GenerationStats:
    if engine.last_stats is None:
        raise RuntimeError("the engine recorded no job")
    return engine.last_stats


def _latency_ms(token: CancelToken, stats: GenerationStats) -> float:
    if token.cancelled_at is None or stats.idle_at is None:
        raise RuntimeError("cancel or idle time missing")
    return (stats.idle_at - token.cancelled_at) * 1000.0


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": statistics.median(samples),
        "max_ms": max(samples),
    }


async def _throughput(engine: LlamaEngine, tokens: int, runs: int, temperature: float | None) -> dict[str, Any]:
    rates: list[float] = []
    first_token_ms: list[float] = []
    for run in range(runs):
        req = GenerationRequest(f"tp-{run}", f"tell me story number {run}", tokens, temperature=temperature)
        started = time.perf_counter()
        first: float | None = None
        async for item in engine.generate(req, CancelToken()):
            if first is None and not isinstance(item, Finish):
                first = time.perf_counter()
        elapsed = time.perf_counter() - started
        rates.append(_stats(engine).generated_tokens / elapsed)
        if first is not None:
            first_token_ms.append((first - started) * 1000.0)
    return {
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_runs": rates,
        "first_token_ms_median": statistics.median(first_token_ms),
    }


async def _decode_cancels(engine: LlamaEngine, count: int) -> list[float]:
    """Cancel after 5..44 pieces; a run that ends on EOS before that is retried."""
    samples: list[float] = []
    attempt = 0
    while len(samples) < count:
        if attempt >= 3 * count:
            raise RuntimeError("too many generations ended before the cancel point")
        token = CancelToken()
        req = GenerationRequest(f"dc-{attempt}", f"keep talking {attempt}", 100_000)
        cancel_after = 5 + (7 * attempt) % 40
        attempt += 1
        received = 0
        async for _ in engine.generate(req, token):
            received += 1
            if received == cancel_after:
                token.cancel()
        if token.cancelled:
            samples.append(_latency_ms(token, _stats(engine)))
    return samples


async def _prefill_cancels(
    engine: LlamaEngine, count: int
) -> tuple[list[float], int, dict[str, float]]:
    """Cancel at points spread over the prefill of a ~2000-token prompt.

    Each prompt differs from its first word on, so no KV-cache prefix is reused and
    every prefill is a full one.
    """
    loop = asyncio.get_running_loop()
    token = _PromptSignal(loop)
    req = GenerationRequest("pc-probe", _long_prompt(PREFILL_WORDS, variant=count), 1)
    consumer = asyncio.create_task(_drain(engine, req, token))
    await token.in_prompt.wait()
    prompt_started = loop.time()
    await consumer
    prefill_s = loop.time() - prompt_started
    probe = {"tokens": float(_stats(engine).prompt_tokens), "ms": prefill_s * 1000.0}

    samples: list[float] = []
    aborted = 0
    for i in range(count):
        token = _PromptSignal(loop)
        req = GenerationRequest(f"pc-{i}", _long_prompt(PREFILL_WORDS, variant=i), 100)
        consumer = asyncio.create_task(_drain(engine, req, token))
        await token.in_prompt.wait()
        await asyncio.sleep(0.9 * prefill_s * i / count)
        token.cancel()
        await consumer
        stats = _stats(engine)
        aborted += stats.prefill_aborted
        samples.append(_latency_ms(token, stats))
    return samples, aborted, probe


async def _drain(engine: LlamaEngine, req: GenerationRequest, token: CancelToken) -> None:
    async for _ in engine.generate(req, token):
        pass


async def _measure(
    tokens: int, runs: int, cancels: int, n_threads: int | None, model: ModelFile | None, temperature: float | None
) -> dict[str, Any]:
    engine = LlamaEngine(model, n_threads=n_threads)
    started = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - started
    try:
        # Not counted, as a worker's first answer is not: the model's pages and buffers warm up.
        await _drain(engine, GenerationRequest("warm", "warm up please", tokens, temperature=temperature), CancelToken())
        result = await _throughput(engine, tokens, runs, temperature)
        decode = await _decode_cancels(engine, cancels)
        prefill, aborted, probe = await _prefill_cancels(engine, cancels)
    finally:
        await engine.close()
    result.update(
        load_s=load_s,
        prefill=probe,
        tokens=tokens,
        runs=runs,
        cancel_decode=_summary(decode),
        cancel_prefill=_summary(prefill) | {"prefill_aborted": aborted},
    )
    return result


def measure_direct(
    tokens: int,
    runs: int,
    cancels: int = 20,
    n_threads: int | None = None,
    model: ModelFile | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark on a fresh event loop; returns the numbers as a dict. `model` None:
    the built-in model; `temperature` None: the engine's default."""
    return asyncio.run(_measure(tokens, runs, cancels, n_threads, model, temperature))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--model", default=BUILTIN, help="builtin (default), or a GGUF path; '' for SmolLM2")
    parser.add_argument("--temperature", type=float, default=None, help="default: the engine's")
    parser.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    args = parser.parse_args()
    model = resolve_model(args.model or None)
    result = measure_direct(args.tokens, args.runs, args.cancels, args.threads, model, args.temperature)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model load            {result['load_s'] * 1000:8.1f} ms")
    print(f"throughput (median)   {result['tokens_per_s_median']:8.0f} tokens/s")
    print(f"first token (median)  {result['first_token_ms_median']:8.1f} ms")
    prefill = result["prefill"]
    print(f"prefill               {prefill['ms']:8.1f} ms for {prefill['tokens']:.0f} tokens")
    for phase in ("prefill", "decode"):
        row = result[f"cancel_{phase}"]
        print(
            f"cancel→idle {phase:8}  p50 {row['p50_ms']:6.2f} ms   max {row['max_ms']:6.2f} ms"
            f"   (n={row['n']})"
        )
    print(f"prefills aborted mid-eval: {result['cancel_prefill']['prefill_aborted']}"
          f"/{result['cancel_prefill']['n']}")


if __name__ == "__main__":
    main()
