"""Do SmolLM2's answers stay as good in Q4_0 as in the shipped Q4_1? `python -m bench.answers`

Asks each file the same questions through `BatchedLlamaEngine` (8 at a time): greedily once,
and at a low temperature with `--seeds` seeds, and counts answers that contain the expected
word, and answers that end by themselves within `--max-tokens` (a small model that loops never
does). Not a benchmark of speed (nothing is timed): the quality side of choosing the model
file that `python -m bench batched` measures.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

from protocol.logconfig import configure_logging
from worker.cancel_token import CancelToken
from worker.engines.base import Finish, GenerationRequest
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
    ("What is the capital of Japan?", r"\bTokyo\b"),
    ("What is the capital of Germany?", r"\bBerlin\b"),
    ("What is the chemical symbol for water?", r"\bH2O\b"),
    ("How many legs does a spider have?", r"\b(8|eight)\b"),
    ("What is the freezing point of water in Fahrenheit?", r"\b32\b"),
    ("Who painted the Mona Lisa?", r"\bLeonardo\b"),
)


Answer = tuple[str, bool]
"""An answer's text, and whether it ended by itself (not at `max_tokens`)."""


async def ask(model: Path, temperature: float, seeds: list[int | None], max_tokens: int) -> list[list[Answer]]:
    """Answers per question, one per seed."""
    engine = BatchedLlamaEngine(model, n_seq=8, n_ctx=512, temperature=temperature)
    await engine.start()

    async def one(mid: str, question: str, seed: int | None) -> Answer:
        items = [item async for item in engine.generate(GenerationRequest(mid, question, max_tokens, seed=seed),
                                                        CancelToken())]
        ended = any(isinstance(item, Finish) and item.reason == "stop" for item in items)
        return "".join(item for item in items if isinstance(item, str)), ended

    try:
        return [list(await asyncio.gather(*(one(f"q{q}-s{s}", question, seed) for s, seed in enumerate(seeds))))
                for q, (question, _) in enumerate(QUESTIONS)]
    finally:
        await engine.close()


def hits(answers: list[list[Answer]]) -> list[int]:
    return [sum(bool(re.search(pattern, text, re.IGNORECASE)) for text, _ in per_seed)
            for (_, pattern), per_seed in zip(QUESTIONS, answers)]


def ended(answers: list[list[Answer]]) -> int:
    return sum(done for per_seed in answers for _, done in per_seed)


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
            answer = greedy[kind][q][0][0].replace("\n", " ")
            print(f"  {kind} greedy: {answer[:160]}")
    print()
    for kind in files:
        g, s = hits(greedy[kind]), hits(sampled[kind])
        print(f"{kind}: greedy {sum(g)}/{len(QUESTIONS)} right, {ended(greedy[kind])} ended within "
              f"{args.max_tokens} tokens; temperature {args.temperature}: {sum(s)}/{len(QUESTIONS) * args.seeds} "
              f"right (per question: {s}), {ended(sampled[kind])} ended")


if __name__ == "__main__":
    main()
