"""`python -m bench batched --quick` runs end to end and reports every figure (on the built-in
model; the goals live in the benchmark's table, not here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_bench_smoke import number, run_bench

pytestmark = pytest.mark.llama


def test_batched_quick(tmp_path: Path) -> None:
    figures = run_bench("batched", tmp_path, timeout_s=180.0)
    summary = figures["builtin"]
    for key in ("alone_tokens_per_s", "aggregate_1", "aggregate_2", "speedup_2", "direct_2", "per_chat_2",
                "first_chunk_2_ms", "joiner_first_chunk_ms", "cancel_p50_ms", "worker_rss_mib"):
        assert number(summary[key]) > 0, (key, {k: v for k, v in summary.items() if k != "rounds"})
    assert number(summary["stall_ms"]) >= 0  # the built-in model may end its 7 streams before the join
    assert summary["cancel_n"] == 3
    assert summary["cancel_steps_after_max"] <= 1 and summary["cancel_tokens_after_max"] <= 1
