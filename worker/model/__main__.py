"""`python -m worker.model [--out PATH] [--seed N]`: build the built-in model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from worker.model.builder import DEFAULT_SEED, ensure_builtin_model, write_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="write here (default: the cache folder)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.out is None:
        path = ensure_builtin_model(args.seed)
    else:
        path = args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, args.seed)
    elapsed = time.perf_counter() - started
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, {elapsed:.2f} s)")


if __name__ == "__main__":
    main()
