"""The benchmarks run end to end (`python -m bench NAME --quick --json PATH`).

Only that they run and report every figure: speed targets live in the benchmarks, not in
tests. Each starts its own Redis, gateways, workers and client processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, t


def run_bench(name: str, tmp_path: Path, timeout_s: float = 90.0) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=t(timeout_s),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert name in proc.stdout  # the table was printed
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["quick"] is True
    figures: dict[str, Any] = data[name]
    return figures


def number(value: Any) -> float:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), value
    assert math.isfinite(value), value
    return float(value)


@pytest.mark.llama
@pytest.mark.real_model
def test_relay_overhead_quick(tmp_path: Path) -> None:
    """Both models in the same run: the built-in one and SmolLM2."""
    all_figures = run_bench("relay_overhead", tmp_path, timeout_s=180)
    assert {key: all_figures[key]["model"] for key in ("builtin", "smollm2")} == {
        "builtin": "builtin", "smollm2": "SmolLM2-135M-Instruct"}
    for figures in (all_figures["builtin"], all_figures["smollm2"]):
        for key in ("direct_tokens_per_s", "system_tokens_per_s", "system_share_pct", "first_chunk_overhead_ms",
                    "direct_first_token_ms", "system_first_chunk_ms", "system_tokens_median"):
            number(figures[key])
        assert number(figures["direct_tokens_per_s"]) > 0
        assert number(figures["system_tokens_per_s"]) > 0
        assert number(figures["worker_rss_mib"]) > 0
        assert figures["system_messages"]
        for message in figures["system_messages"]:
            assert message["terminal"] == "done"
            assert number(message["tokens"]) > 0


def test_cancel_latency_quick(tmp_path: Path) -> None:
    figures = run_bench("cancel_latency", tmp_path)
    for mode in ("push", "poll"):
        for window in ("idle", "concurrent", "moderate", "heavy"):
            result = figures[mode][window]
            for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "commands_per_token", "exists_per_token"):
                number(result[key])
            assert result["n"] > 0
            assert number(result["commands_per_token"]) > 0
        for window in ("moderate", "heavy"):
            assert number(figures[mode][window]["load_gaps"]["p99"]) > 0
            assert number(figures[mode][window]["streaming_commands_per_token"]) > 0


def test_pubsub_cost_quick(tmp_path: Path) -> None:
    figures = run_bench("pubsub_cost", tmp_path)
    for how in ("redis-py", "subscriber"):
        assert figures[how]["messages"] == 2_000
        assert number(figures[how]["cpu_us_per_message"]) > 0
        assert number(figures[how]["latency"]["p99"]) > 0


@pytest.mark.chaos
def test_chaos_quick(tmp_path: Path) -> None:
    """Every fault of the schedule is injected once under load and every figure is reported
    (the goals are the benchmark's to judge, not this test's)."""
    from bench.chaos import FAULTS

    figures = run_bench("chaos", tmp_path, timeout_s=240)
    assert figures["accepted"] > 0
    assert [f["kind"] for f in figures["faults"]] == list(FAULTS)
    assert [f["failed"] for f in figures["faults"]] == [""] * len(FAULTS)
    for key in ("without_one_terminal", "unfinished_in_redis", "seq_gaps", "faults_without_recovery"):
        assert number(figures[key]) >= 0
    number(figures["recovery_ms"]["p99"])
    for exit_ in figures["exits"]:
        assert exit_["name"] and exit_["evidence"]


@pytest.mark.llama
@pytest.mark.real_model
def test_openai_edge_quick(tmp_path: Path) -> None:
    """Both edges measured in the same run, on the synthetic engine and on SmolLM2, and the
    Stop by disconnect reaches the worker for every sample."""
    figures = run_bench("openai_edge", tmp_path, timeout_s=180)
    for section in ("synthetic", "smollm2"):
        for edge in ("ws", "http"):
            assert number(figures[section][edge]["first_token_ms"]["p50"]) > 0
            assert number(figures[section][edge]["tokens_per_s_median"]) > 0
        number(figures[section]["first_token_diff_pct"])
    assert all(number(x) > 0 for edge in ("ws", "http") for x in figures["load"]["tokens_per_s"][edge])
    stop = figures["stop"]
    assert stop["samples"] > 0 and stop["not_stopped"] == 0, stop
    assert number(stop["latency_ms"]["p99"]) > 0 and number(stop["tokens_after_cancel_max"]) >= 0


def test_cluster_compare_quick(tmp_path: Path) -> None:
    """One Redis, one Redis with a replica and a 3-master cluster (6.2, and 7 where Debian's is
    installed) in one run: every deployment delivers its streams, cancels complete on all, and
    Redis's CPU is read from every node; a replicated cluster is compared with the replicated
    single Redis."""
    from bench.cluster_compare import baseline_of
    from store import embedded

    figures = run_bench("cluster_compare", tmp_path, timeout_s=300)
    expected = ["single 6.2", "single 6.2 + replica", "cluster 6.2"]
    if embedded.redis7_server() is not None:
        expected += ["single 7", "single 7 + replica", "cluster 7", "cluster 7 no replicas"]
    assert figures["targets"] == expected
    for name in expected:
        step = figures[name]["throughput"][0]
        assert step["live"] == figures["streams"]
        assert number(step["tokens_per_s"]) > 0
        assert number(step["us_per_token"]) > 0
        nodes = step["redis_nodes"]
        replicas = 1 if name.endswith("+ replica") else 0 if not name.startswith("cluster") or name.endswith("no replicas") else 3
        assert sum(1 for node in nodes if "-master-" in node) == (3 if name.startswith("cluster") else 0)
        assert sum(1 for node in nodes if "-replica-" in node) == replicas
        assert number(step["replicas_us_per_token"]) >= 0
        cancel = figures[name]["cancel"][0]
        assert cancel["n"] == figures["cancels"] and cancel["failures"] == 0
        number(cancel["p99_ms"])
        assert len(cancel["latencies_ms"]) == cancel["n"] and all(number(ms) > 0 for ms in cancel["latencies_ms"])
        assert figures[name]["failed_over"] is False
        summary = figures["summary"][name]
        assert summary["capacity"]["tokens_per_s_per_master"] > 0
        if name.startswith("cluster"):
            assert baseline_of(name, expected) == (
                f"single {name.split()[1]}" + ("" if name.endswith("no replicas") else " + replica")
            )
            number(summary["cost_ratio"])
            assert len(summary["equal_load_cost_ratio_by_round"]) == figures["rounds"]
            assert number(summary["equal_load_cost_ratio"]) > 0
            number(summary["p99_extra_ms"])
            low, high = (number(x) for x in summary["p99_extra_ci_ms"])
            assert low <= high
            assert number(figures[name]["bus_latency"]["other_master"]["p50"]) > 0
