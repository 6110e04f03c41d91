"""The load test: its protocol checker on crafted frames, and one short run against real
gateway and worker processes (3 + 2) with cancels and resumes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from bench.checker import Checker, check_stream
from bench.stats import percentiles
from tests.support import REPO, ProcessCluster, t

M = "m1"


def chunk(seq: int, mid: str = M, text: str = "alpha ") -> dict[str, object]:
    return {"type": "chunk", "message_id": mid, "seq": seq, "text": text}


def done(seq: int, mid: str = M) -> dict[str, object]:
    return {"type": "done", "message_id": mid, "seq": seq, "finish_reason": "length"}


def cancelled(seq: int, mid: str = M) -> dict[str, object]:
    return {"type": "cancelled", "message_id": mid, "seq": seq}


def resume(after_seq: int, mid: str = M) -> dict[str, object]:
    return {"type": "resume", "message_id": mid, "after_seq": after_seq}


def test_checker_accepts_a_clean_stream_and_a_clean_resume_seam() -> None:
    assert check_stream([chunk(1), chunk(2), chunk(3), done(3)], M) == []
    assert check_stream([cancelled(0)], M) == []
    assert check_stream([chunk(1), chunk(2), resume(2), chunk(3), cancelled(3)], M) == []
    error = {"type": "error", "code": "worker_lost", "message": "x", "message_id": M}
    assert check_stream([chunk(1), error], M) == []


def test_checker_catches_a_gap() -> None:
    violations = check_stream([chunk(1), chunk(3), done(3)], M)
    assert len(violations) == 1 and "gap" in violations[0] and "seq=3 after seq=1" in violations[0]


def test_checker_catches_a_gap_across_a_resume_seam() -> None:
    violations = check_stream([chunk(1), chunk(2), resume(2), chunk(4), done(4)], M)
    assert len(violations) == 1 and "gap" in violations[0]


def test_checker_catches_a_duplicate() -> None:
    violations = check_stream([chunk(1), chunk(2), chunk(2), chunk(3), done(3)], M)
    assert len(violations) == 1 and "duplicate chunk seq=2" in violations[0]


def test_checker_catches_a_replay_from_before_the_seam() -> None:
    violations = check_stream([chunk(1), chunk(2), resume(2), chunk(2), chunk(3), done(3)], M)
    assert len(violations) == 1 and "duplicate" in violations[0]


def test_checker_catches_two_terminals_and_events_after_a_terminal() -> None:
    violations = check_stream([chunk(1), done(1), cancelled(1)], M)
    assert len(violations) == 1 and "terminal cancelled" in violations[0] and "after terminal done" in violations[0]
    violations = check_stream([chunk(1), cancelled(1), chunk(2)], M)
    assert len(violations) == 1 and "after terminal" in violations[0]


def test_checker_catches_a_terminal_seq_that_is_not_the_last_chunk() -> None:
    violations = check_stream([chunk(1), chunk(2), done(1)], M)
    assert len(violations) == 1 and "seq=1" in violations[0] and "seq=2" in violations[0]


def test_checker_catches_a_missing_terminal_and_unknown_messages() -> None:
    violations = check_stream([chunk(1), chunk(2)], M)
    assert len(violations) == 1 and "no terminal" in violations[0]
    violations = check_stream([chunk(1, "other"), done(1, "other")], M)
    assert any("never accepted" in v for v in violations)


def test_checker_cancel_results() -> None:
    checker = Checker()
    checker.accepted(M)
    checker.cancel_result({"type": "cancel_result", "status": "not_found", "message_id": M}, M)
    checker.cancel_result({"type": "cancel_result", "status": "gone"}, M)
    checker.cancel_result({"type": "cancel_result", "status": "not_found", "message_id": "x"}, None)
    assert len(checker.violations) == 2
    assert "not_found" in checker.violations[0] and "unknown status" in checker.violations[1]
    checker = Checker()
    checker.accepted(M)
    checker.cancel_result({"type": "cancel_result", "status": "cancelling", "message_id": M}, M)
    checker.feed(done(0))
    assert checker.violations == [] and checker.anomalies["cancelling_then_done"] == 1


def test_percentiles_take_seconds_and_give_milliseconds() -> None:
    assert percentiles([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    figures = percentiles([i / 1000 for i in range(1, 101)])
    assert figures == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0}


async def test_load_run_against_three_gateways_and_two_workers(process_cluster: ProcessCluster, tmp_path: Path) -> None:
    for _ in range(3):
        process_cluster.add_gateway()
    for _ in range(2):
        process_cluster.add_worker()
    await process_cluster.wait_healthy()
    out = tmp_path / "out.json"
    urls = [arg for g in process_cluster.gateways for arg in ("--url", f"ws://127.0.0.1:{g.port}/ws")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadtest", *urls, "--clients", "20", "--messages", "3",
        "--max-tokens", "20", "--cancel-rate", "0.3", "--reconnect-rate", "0.2", "--heartbeat", "0.2",
        "--ramp", "0.2", "--seed", "7", "--quiet", "--json", str(out),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(t(60)):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode() + process_cluster.logs()
    figures = json.loads(out.read_text())
    assert figures["violations"] == []
    assert figures["messages"] == figures["accepted"] == 60
    assert sum(figures["terminals"].values()) == 60
    assert figures["terminals"]["cancelled"] > 0
    assert figures["reconnects"] > 0
    assert figures["tokens"] > 0 and figures["tokens_per_s"] > 0
    for key in ("ttft_ms", "cancel_latency_ms", "heartbeat_rtt_ms", "inter_chunk_gap_ms"):
        assert set(figures[key]) == {"p50", "p95", "p99", "max"}
    assert figures["cancel_latency_ms"]["max"] > 0 and figures["heartbeat_rtt_ms"]["max"] > 0
