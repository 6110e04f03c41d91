"""The worker's command line: defaults that the benchmarks and `make run` rely on."""

from __future__ import annotations

from protocol import coalesce
from worker.__main__ import event_loop, parse_args


def test_llama_worker_runs_on_asyncios_loop_and_others_on_uvloop() -> None:
    assert event_loop(parse_args(["--engine", "llama"])) == "asyncio"
    assert event_loop(parse_args(["--engine", "synthetic"])) == "uvloop"
    assert event_loop(parse_args(["--engine", "llama", "--loop", "uvloop"])) == "uvloop"
    assert event_loop(parse_args(["--engine", "synthetic", "--loop", "asyncio"])) == "asyncio"


def test_coalescing_window_defaults_to_one_display_frame() -> None:
    assert parse_args(["--engine", "llama"]).coalesce_ms == coalesce.WINDOW_S * 1000 == 16.0
    assert parse_args(["--coalesce-ms", "5"]).coalesce_ms == 5.0
