"""The batched engine's pure parts: how a step's prefill budget is shared, and the worker's
`--batched` switch (one engine for all job slots)."""

from __future__ import annotations

from worker.__main__ import build_engines, parse_args
from worker.engines.llama import LlamaEngine
from worker.engines.batched import BatchedLlamaEngine, plan_prefill


def test_the_oldest_waiting_prompt_gets_a_chunk_aligned_at_its_start() -> None:
    assert plan_prefill([(0, 1000)], 128) == [128]
    assert plan_prefill([(896, 1000)], 128) == [104]  # its last piece
    assert plan_prefill([(0, 40), (0, 50), (0, 30)], 128) == [40, 50, 30]
    assert plan_prefill([], 128) == []


def test_a_later_prompt_joins_the_step_only_if_its_whole_piece_fits() -> None:
    assert plan_prefill([(0, 100), (0, 50), (0, 10)], 128) == [100]  # first come, first served
    assert plan_prefill([(0, 1000), (0, 10)], 128) == [128]
    assert plan_prefill([(1000, 1010), (0, 500)], 128) == [10]  # 500's first piece is a whole chunk
    assert plan_prefill([(1000, 1010), (0, 100)], 128) == [10, 100]


def test_pieces_never_cross_a_chunk_boundary() -> None:
    for done, length in [(0, 300), (128, 300), (256, 300), (0, 5)]:
        (piece,) = plan_prefill([(done, length)], 128)
        assert (done + piece) % 128 == 0 or done + piece == length
        assert 0 < piece <= 128


def test_llama_concurrency_above_one_is_one_batched_engine_for_every_slot() -> None:
    engines = build_engines(parse_args(["--model", "builtin", "--concurrency", "4", "--n-ctx", "1024"]))
    assert len(engines) == 4 and len({id(e) for e in engines}) == 1
    engine = engines[0]
    assert isinstance(engine, BatchedLlamaEngine) and (engine.n_seq, engine.n_ctx, engine.model) == (4, 1024, "builtin")
    (forced,) = build_engines(parse_args(["--model", "builtin", "--batched"]))
    assert isinstance(forced, BatchedLlamaEngine) and forced.n_seq == 1
    (single,) = build_engines(parse_args(["--model", "builtin"]))
    assert isinstance(single, LlamaEngine)
