"""The worker's command line: defaults that the benchmarks and `make run` rely on."""

from __future__ import annotations

import pytest

from protocol import coalesce
from worker.__main__ import event_loop, parse_args
from worker.engines.base import DEFAULT_TEMPERATURE
from worker.writer import WRITE_PACE_S


def test_llama_worker_runs_on_asyncios_loop_and_others_on_uvloop() -> None:
    assert event_loop(parse_args(["--engine", "llama"])) == "asyncio"
    assert event_loop(parse_args(["--engine", "synthetic"])) == "uvloop"
    assert event_loop(parse_args(["--engine", "llama", "--loop", "uvloop"])) == "uvloop"
    assert event_loop(parse_args(["--engine", "synthetic", "--loop", "asyncio"])) == "asyncio"


def test_coalescing_window_defaults_to_one_display_frame() -> None:
    assert parse_args(["--engine", "llama"]).coalesce_ms == coalesce.WINDOW_S * 1000 == 16.0
    assert parse_args(["--coalesce-ms", "5"]).coalesce_ms == 5.0


def test_write_pace_defaults_to_the_writers_and_zero_turns_it_off() -> None:
    assert parse_args([]).write_pace_ms == WRITE_PACE_S * 1000 > 0
    assert parse_args(["--write-pace-ms", "0"]).write_pace_ms == 0.0


def test_model_and_sampling_flags() -> None:
    args = parse_args([])
    assert (args.model, args.temperature, args.seed, args.system_prompt) == (None, DEFAULT_TEMPERATURE, None, None)
    args = parse_args(["--model", "builtin", "--temperature", "0", "--seed", "-4", "--system-prompt", "Be brief."])
    assert (args.model, args.temperature, args.seed, args.system_prompt) == ("builtin", 0.0, -4, "Be brief.")
    with pytest.raises(SystemExit):
        parse_args(["--temperature", "2.5"])
