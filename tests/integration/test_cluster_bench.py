"""The Redis Cluster benchmarks run end to end and report every figure (`--quick`)."""

from __future__ import annotations

from pathlib import Path

from store import embedded
from tests.integration.test_bench_smoke import number, run_bench


def test_cluster_clients_quick(tmp_path: Path) -> None:
    figures = run_bench("cluster_clients", tmp_path)
    for client in ("single/lean", "single/redis-py", "cluster/lean", "cluster/redis-py"):
        for size in ("1", "32", "512"):
            result = figures[client][size]
            assert number(result["commands"]) >= 200
            assert number(result["cpu_us_per_command"]) > 0
            assert number(result["commands_per_s"]) > 0
            assert number(result["batch_latency"]["p99"]) > 0


def test_cluster_pubsub_quick(tmp_path: Path) -> None:
    figures = run_bench("cluster_pubsub", tmp_path)
    measured = ["single 6.2", "cluster 6.2"]
    if embedded.redis7_server() is not None:
        assert figures["redis7_available"] is True
        measured += ["cluster 7", "cluster 7 sharded"]
    for name in measured:
        result = figures[name]
        assert result["messages"] > 0
        number(result["script_node_cpu_us_per_message"])
        number(result["SPUBLISH_node_cpu_us_per_message" if "sharded" in name else "PUBLISH_node_cpu_us_per_message"])


def test_cluster_trips_quick(tmp_path: Path) -> None:
    figures = run_bench("cluster_trips", tmp_path)
    for name in ("single", "single_third", "cluster"):
        result = figures[name]
        assert result["writes"] > 0
        assert result["delivered"] == result["writes"], "every write published to the subscriber"
        assert number(result["us_per_write"]) > 0
    assert figures["single"]["writes_per_s"] > figures["single_third"]["writes_per_s"]
    number(figures["round_trip_us"])
    number(figures["cluster_predicted_us_per_write"])
