"""Do SmolLM2's answers stay as good in Q4_0 as in the shipped Q4_1? `python -m bench.answers`

Asks each file the same questions through `BatchedLlamaEngine` (8 at a time): greedily once,
and at a low temperature with `--seeds` seeds, and counts answers that contain the expected
word. Not a benchmark of speed (nothing is timed): the quality side of choosing the model
file that `python -m bench batched` measures.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

from protocol.logconfig import configure_logging
from worker.cancel_token import CancelToken
from worker.engines.base import GenerationRequest
from worker.engines.batched import BatchedLlamaEngine

QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", r"\bParis\b"),
    ("What is the largest planet in our solar system?", r"\bJupiter\b"),
    ("How many days are there in a week?", r"\b(7|seven)\b"),
    ("What is the chemical symbol for gold?", r"\bAu\b"),
    ("Who wrote Romeo and Juliet?", r"\bShakespeare\b"),
    ("What is the boiling point of water in Celsius?", r"\b100\b"),
    ("What color is the sky on a clear day?", r"\bblue\b"),
    ("What is 2 + 2?", r"\b(4|four)\b"),
    ("Which animal is known as the king of the jungle?", r"\blions?\b"),
    ("What language is spoken in Brazil?", r"\bPortuguese\b"),
)


async def ask(model: Path, temperature: float, seeds: list[int | None], max_tokens: int) -> list[list[str]]:
    """Answers per question, one per seed."""
    engine = BatchedLlamaEngine(model, n_seq=8, n_ctx=512, temperature=temperature)
    await engine.start()

    async def one(mid: str, question: str, seed: int | None) -> str:
        pieces = [item async for item in engine.generate(
            GenerationRequest(mid, question, max_tokens, seed=seed), CancelToken()) if isinstance(item, str)]
        return "".join(pieces)

    try:
        return [list(await asyncio.gather(*(one(f"q{q}-s{s}", question, seed) for s, seed in enumerate(seeds))))
                for q, (question, _) in enumerate(QUESTIONS)]
    finally:
        await engine.close()


def hits(answers: list[list[str]]) -> list[int]:
    return [sum(bool(re.search(pattern, a, re.IGNORECASE)) for a in per_seed)
            for (_, pattern), per_seed in zip(QUESTIONS, answers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=60)
    args = parser.parse_args()
    configure_logging("warning", process="bench")  # the engine logs a line per answer
    from worker.model.smollm2 import ensure_smollm2, ensure_smollm2_q4_0

    files = {"Q4_1": ensure_smollm2(), "Q4_0": ensure_smollm2_q4_0()}
    greedy = {k: asyncio.run(ask(p, 0.0, [None], args.max_tokens)) for k, p in files.items()}
    sampled = {k: asyncio.run(ask(p, args.temperature, list(range(args.seeds)), args.max_tokens))
               for k, p in files.items()}
    for q, (question, _) in enumerate(QUESTIONS):
        print(f"Q: {question}")
        for kind in files:
            answer = greedy[kind][q][0].replace("\n", " ")
            print(f"  {kind} greedy: {answer[:160]}")
    print()
    for kind in files:
        g, s = hits(greedy[kind]), hits(sampled[kind])
        print(f"{kind}: greedy {sum(g)}/{len(QUESTIONS)} right; temperature {args.temperature}: "
              f"{sum(s)}/{len(QUESTIONS) * args.seeds} right (per question: {s})")


if __name__ == "__main__":
    main()
