"""What the llama engines rely on in llama.cpp, through `worker.engines.llamacpp`: decode
return codes, one sequence removed without touching the others or moved to another slot, logits that do not depend on
the batch's other sequences, one pass for a step over consecutive slots, seeded samplers, requantizing, log routing; and for the
one-at-a-time engine, a kept prefix of a high-level `Llama`'s cache and its abort.

An upgrade of llama-cpp-python that changes any of this fails here first."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import pytest

from worker.model.smollm2 import ensure_smollm2, ensure_smollm2_q4_0
from worker.engines.llamacpp import (
    Batch, Context, DecodeError, DecodeStatus, LlamaPrefix, Model, Sampler, requantize, requantized_path,
)
from worker.model import ensure_builtin_model

pytestmark = pytest.mark.llama

CHUNK = 32


@pytest.fixture(scope="module")
def builtin() -> Iterator[Model]:
    model = Model(ensure_builtin_model())
    yield model
    model.close()


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Model]:
    model = Model(ensure_smollm2_q4_0())
    yield model
    model.close()


@dataclass
class Run:
    """One sequence of a hand-driven batch: prompt chunks in calls of their own, then one
    greedy (or seeded) token per decode step, as the batched engine does."""

    seq: int
    prompt: list[int]
    sampler: Sampler
    pos: int = 0
    out: list[int] = field(default_factory=list)
    logits: list[bytes] = field(default_factory=list)
    """The raw logits each token was sampled from."""

    def sample(self, ctx: Context, index: int) -> None:
        row = llama_cpp.llama_get_logits_ith(ctx.ptr, index)
        self.logits.append(ctypes.string_at(row, ctx.model.n_vocab * ctypes.sizeof(ctypes.c_float)))
        self.out.append(self.sampler.sample(ctx, index))


def drive(model: Model, ctx: Context, prompts: dict[int, list[int]], steps: int, *,
          joins: dict[int, tuple[int, list[int]]] | None = None, removes: dict[int, int] | None = None,
          temperature: float = 0.0, seed: int | None = None) -> dict[int, Run]:
    """Run `steps` steps; `joins`: step → (seq, prompt) admitted then; `removes`: step → seq
    removed then. Returns each sequence's run (sampled tokens, logits)."""
    ctx.clear()
    batch = Batch(max(CHUNK, ctx.n_seq))
    runs: dict[int, Run] = {}
    outputs: dict[int, Run] = {}

    def admit(seq: int, prompt: list[int]) -> None:
        runs[seq] = Run(seq, prompt, Sampler(model, banned=[], temperature=temperature, seed=seed))
        outputs[seq] = runs[seq]

    for seq, prompt in prompts.items():
        admit(seq, prompt)
    try:
        for step in range(steps):
            if joins and step in joins:
                admit(*joins[step])
            if removes and step in removes:
                run = runs.pop(removes[step])
                ctx.remove(run.seq)
                run.sampler.close()
            decoding = [r for r in runs.values() if r.out and r.pos >= len(r.prompt)]
            batch.clear()
            indexes = [batch.add(r.out[-1], r.pos, r.seq, logits=True) for r in decoding]
            if decoding:
                ctx.decode(batch)
                for run, index in zip(decoding, indexes):
                    run.pos += 1
                    run.sample(ctx, index)
            for run in runs.values():
                if run.pos < len(run.prompt):
                    start, end = run.pos, min(run.pos + CHUNK, len(run.prompt))
                    batch.clear()
                    for pos in range(start, end):
                        batch.add(run.prompt[pos], pos, run.seq, logits=pos == len(run.prompt) - 1)
                    ctx.decode(batch)
                    run.pos = end
                    if end == len(run.prompt):
                        run.sample(ctx, end - 1 - start)
    finally:
        for run in runs.values():
            run.sampler.close()
        batch.close()
    return outputs


def chat(model: Model, text: str) -> list[int]:
    return model.with_bos(model.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"))


def test_decode_return_codes(builtin: Model) -> None:
    ctx = Context(builtin, n_seq=2, n_ctx_seq=256, n_batch=64)
    batch = Batch(64)
    try:
        assert (ctx.n_seq, ctx.n_ctx_seq) == (2, 256)
        batch.add(5, 0, 2, logits=True)  # sequence 2 of 2
        with pytest.raises(DecodeError) as invalid:
            ctx.decode(batch)
        assert invalid.value.code == DecodeStatus.INVALID_BATCH
        for start in range(0, 256, 64):  # fill sequence 0's own 256 cells
            batch.clear()
            for pos in range(start, start + 64):
                batch.add(5, pos, 0, logits=pos == start + 63)
            ctx.decode(batch)
        batch.clear()
        batch.add(5, 256, 0, logits=True)
        with pytest.raises(DecodeError) as full:
            ctx.decode(batch)
        assert full.value.code == DecodeStatus.NO_KV_SLOT
        assert ctx.positions(0) == 256  # refused as a whole: the cache is as it was
        batch.clear()
        batch.add(5, 0, 1, logits=True)  # sequence 1 still has all of its own room
        ctx.decode(batch)
        assert ctx.positions(1) == 1
        ctx.remove(0)
        assert (ctx.positions(0), ctx.positions(1)) == (0, 1)
    finally:
        batch.close()
        ctx.close()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_removing_one_sequence_leaves_the_others_token_identical(builtin: Model, temperature: float) -> None:
    ctx = Context(builtin, n_seq=3, n_ctx_seq=512, n_batch=CHUNK)
    try:
        prompts = {s: builtin.with_bos(builtin.tokenize(f"User: chat number {s} {'ba no ki ' * s}\nAssistant:"))
                   for s in range(3)}
        together = drive(builtin, ctx, prompts, 60, temperature=temperature, seed=11)
        removed = drive(builtin, ctx, prompts, 60, removes={20: 1}, temperature=temperature, seed=11)
        assert len(together[0].out) == 60 and len(removed[1].out) < 25
        for s in (0, 2):  # float32 weights: the last bits of the logits may change, the tokens do not
            assert removed[s].out == together[s].out
        assert len({tuple(together[s].out) for s in range(3)}) == 3  # three different answers
    finally:
        ctx.close()


def test_a_sequences_logits_do_not_depend_on_its_neighbours(smollm2: Model) -> None:
    """Quantized weights (Q4_0's own matmul kernels), prompts in other slots, a prompt of more
    than 256 tokens joining three running chats: every sequence's logits are bit for bit those
    of its run alone (in slot 0), so its greedy or seeded tokens are too. With flash attention
    on (which the context turns off), the joining sequence's logits differ from its first
    decoded token on."""
    ctx = Context(smollm2, n_seq=4, n_ctx_seq=512, n_batch=CHUNK)
    try:
        chats = {s: chat(smollm2, q) for s, q in enumerate(
            ["What is the capital of France?", "Tell me a story about the sea.", "Name three colors."])}
        story = " ".join(f"The {w} sat on mat {i}." for i, w in enumerate(["cat", "dog", "owl", "fox"] * 12))
        long = chat(smollm2, "Summarize: " + story)
        assert len(long) > 400
        steps = 2 + -(-len(long) // CHUNK) + 10  # joins at step 2, prefills, then 10 tokens
        together = drive(smollm2, ctx, chats, steps, joins={2: (3, long)})
        for seq, prompt in [*chats.items(), (3, long)]:
            alone = drive(smollm2, ctx, {0: prompt}, steps)[0]
            joined = together[seq]
            assert len(joined.out) >= 8
            assert joined.logits == alone.logits[: len(joined.logits)]
            assert joined.out == alone.out[: len(joined.out)]
    finally:
        ctx.close()


def ubatches(ctx: Context, batch: Batch, caplog: pytest.LogCaptureFixture) -> int:
    """How many passes (ubatches) llama.cpp makes of `batch`, from its batch debug log."""
    caplog.clear()
    ctx.decode(batch)
    return sum("added ubatch to split" in r.getMessage() for r in caplog.records)


def test_a_decode_step_is_one_pass_only_for_consecutive_slots_in_order(
    builtin: Model, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Over separate KV streams llama.cpp evaluates one token of each sequence in one pass
    only when the sequence ids are consecutive and in increasing order; otherwise it splits
    the batch into several passes of one token on one thread each (the batched engine made 4×
    fewer tokens/s at 8 chats until it sorted its step by slot and took the lowest free slot)."""
    monkeypatch.setenv("LLAMA_BATCH_DEBUG", "1")  # read when a context is created
    caplog.set_level(logging.DEBUG, logger="tokenrelay.llama_cpp")
    ctx = Context(builtin, n_seq=4, n_ctx_seq=64, n_batch=CHUNK)
    batch = Batch(CHUNK)

    def step(slots: list[int]) -> int:
        batch.clear()
        for slot in slots:
            batch.add(5, ctx.positions(slot), slot, logits=True)
        return ubatches(ctx, batch, caplog)

    try:
        assert step([0, 1, 2, 3]) == 1
        assert step([1, 0, 3, 2]) == 3  # 1 and 2, then 0, then 3
        assert step([0, 1, 3]) == 2
        assert step([2, 3]) == 1
    finally:
        batch.close()
        ctx.close()


def test_a_sequence_moved_to_another_slot_continues_bit_for_bit(smollm2: Model) -> None:
    """`Context.move` (the batched engine closes holes in its busy slots with it, across KV
    streams): the moved sequence's logits are bit for bit those it gets when it stays, its
    neighbour's too, and the slot it left takes a new prompt like a fresh context does."""
    prompts = {1: chat(smollm2, "Tell me a story about the sea."), 3: chat(smollm2, "Name three colors.")}
    late = chat(smollm2, "What is the capital of France?")

    def run(move: bool) -> tuple[dict[int, list[bytes]], list[bytes]]:
        ctx = Context(smollm2, n_seq=4, n_ctx_seq=256, n_batch=CHUNK)
        runs = {s: Run(s, p, Sampler(smollm2, banned=[], temperature=0.0, seed=None)) for s, p in prompts.items()}
        newcomer = Run(3 if move else 2, late, Sampler(smollm2, banned=[], temperature=0.0, seed=None))
        batch = Batch(CHUNK)
        try:
            for r in runs.values():
                prefill(ctx, batch, r)
            for step in range(24):
                if step == 8 and move:
                    ctx.move(3, 0)
                    runs[3].seq = 0
                if step == 10:
                    prefill(ctx, batch, newcomer)
                live = sorted([*runs.values(), *([newcomer] if step >= 10 else [])], key=lambda r: r.seq)
                batch.clear()
                indexes = [batch.add(r.out[-1], r.pos, r.seq, logits=True) for r in live]
                ctx.decode(batch)
                for r, index in zip(live, indexes):
                    r.pos += 1
                    r.sample(ctx, index)
            assert ctx.positions(runs[3].seq) == runs[3].pos and ctx.positions(newcomer.seq) == newcomer.pos
            return {s: r.logits for s, r in runs.items()}, newcomer.logits
        finally:
            for r in (*runs.values(), newcomer):
                r.sampler.close()
            batch.close()
            ctx.close()

    stayed, stayed_late = run(move=False)
    moved, moved_late = run(move=True)
    assert moved == stayed and moved_late == stayed_late
    assert len(moved[3]) == 25 and len(moved_late) == 15


def prefill(ctx: Context, batch: Batch, run: Run) -> None:
    """The whole prompt in one call, then its first token."""
    batch.clear()
    for pos, token in enumerate(run.prompt):
        batch.add(token, pos, run.seq, logits=pos == len(run.prompt) - 1)
    ctx.decode(batch)
    run.pos = len(run.prompt)
    run.sample(ctx, len(run.prompt) - 1)


def test_a_seeded_sampler_draws_the_same_tokens_every_time(builtin: Model) -> None:
    ctx = Context(builtin, n_seq=2, n_ctx_seq=256, n_batch=CHUNK)
    try:
        prompt = builtin.with_bos(builtin.tokenize("User: tell me anything\nAssistant:"))
        first = drive(builtin, ctx, {0: prompt, 1: prompt}, 40, temperature=0.9, seed=5)
        again = drive(builtin, ctx, {0: prompt}, 40, temperature=0.9, seed=5)
        other = drive(builtin, ctx, {0: prompt}, 40, temperature=0.9, seed=6)
        assert first[0].out == first[1].out == again[0].out
        assert other[0].out != first[0].out
    finally:
        ctx.close()


def test_requantize_writes_a_loadable_q4_0_once(tmp_path: Path) -> None:
    shipped = ensure_smollm2()
    target = requantize(shipped, tmp_path / "copy.Q4_0.gguf")
    model, original = Model(target), Model(shipped)
    try:
        assert (model.description()[-4:], original.description()[-4:]) == ("Q4_0", "Q4_1")
        assert model.tokenize("Hello, world") == original.tokenize("Hello, world")
    finally:
        model.close()
        original.close()
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind
    assert requantized_path(shipped, "Q4_0").name == "SmolLM2-135M-Instruct.Q4_0.gguf"


def test_llama_cpp_logs_go_to_logging_not_stderr(
    builtin: Model, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="tokenrelay.llama_cpp"):
        Context(builtin, n_seq=2, n_ctx_seq=256, n_batch=32).close()
    assert capfd.readouterr().err == ""
    assert len([r for r in caplog.records if r.name == "tokenrelay.llama_cpp"]) > 10


def last_logits(prefix: LlamaPrefix, n_vocab: int) -> bytes:
    row = llama_cpp.llama_get_logits_ith(prefix.ctx, -1)
    return ctypes.string_at(row, n_vocab * ctypes.sizeof(ctypes.c_float))


def test_a_kept_prefix_continues_as_a_fresh_evaluation_and_an_abort_is_told_apart(builtin: Model) -> None:
    """`LlamaPrefix` sets a `Llama`'s `n_tokens` to keep a prefix and reads `input_ids`; the
    next evaluation after the kept prefix gives the logits of a fresh one, bit for bit (same
    chunks), and llama.cpp's abort is the RuntimeError `LlamaPrefix.ABORTED` names."""
    llm = llama_cpp.Llama(model_path=str(ensure_builtin_model()), n_ctx=512, n_batch=64, n_ubatch=64, verbose=False)
    prefix = LlamaPrefix(llm)
    try:
        shared = builtin.with_bos(builtin.tokenize("User: " + "ba no ki " * 30))[:64]
        first, second = shared + [7, 8, 9, 10], shared + [11, 12, 13]
        assert len(shared) == 64 and prefix.evaluate(first) and prefix.length == len(first)
        assert prefix.common_prefix(second, len(second)) == 64
        assert prefix.common_prefix(second, 10) == 10
        assert prefix.keep(64) and prefix.length == 64
        assert prefix.evaluate(second[64:]) and prefix.length == len(second)
        continued = last_logits(prefix, builtin.n_vocab)
        prefix.clear()
        assert prefix.length == 0 and prefix.common_prefix(second, len(second)) == 0
        assert prefix.evaluate(second)
        assert last_logits(prefix, builtin.n_vocab) == continued

        calls: list[int] = []

        def abort(_data: object) -> bool:
            calls.append(1)
            return True

        callback = llama_cpp.ggml_abort_callback(abort)
        prefix.set_abort(callback)
        assert prefix.evaluate(first) is False and calls
        assert prefix.length == 0  # an aborted evaluation clears the cache
        prefix.set_abort(None)
        assert prefix.evaluate(first) and prefix.length == len(first)
    finally:
        llm.close()
