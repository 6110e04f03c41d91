"""The engine-independent prompt rules (`worker.prompt`): turns, stopped answers, trimming."""

from __future__ import annotations

import pytest

from worker import PromptTooLong
from worker.engines.base import Turn
from worker.prompt import (
    STOPPED_NOTE,
    Message,
    canonical_after,
    end_of_turn,
    exchanges,
    fit,
    messages_for,
    present,
    prompt_budget,
    reuse_length,
)


def words(messages: list[Message]) -> int:
    """A stand-in tokenizer: one token per word, plus 2 per message for the template."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def exchange(n: int, size: int = 10) -> list[Turn]:
    return [Turn("user", f"q{n} " + "w " * (size - 1)), Turn("assistant", f"a{n} " + "w " * (size - 1))]


def history(count: int) -> list[Turn]:
    return [turn for n in range(count) for turn in exchange(n)]


def test_everything_goes_in_when_it_fits() -> None:
    calls: list[int] = []

    def measure(messages: list[Message]) -> int:
        calls.append(len(messages))
        return words(messages)

    result = fit(history(3), "now what", None, measure, budget=1000, n_ctx=2000)
    assert [m["content"].split()[0] for m in result.messages] == ["q0", "a0", "q1", "a1", "q2", "a2", "now"]
    assert result.dropped == 0 and result.tokens == words(result.messages)
    assert calls == [7]  # measured once


@pytest.mark.parametrize("count", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("budget", [8, 17, 40, 41, 100, 333])
def test_the_oldest_exchanges_go_first_and_no_more_than_needed(count: int, budget: int) -> None:
    turns = history(count)
    result = fit(turns, "latest question", "be brief", words, budget, n_ctx=4096)
    kept = len(result.messages) - 2  # system + current turn
    assert result.messages[0] == {"role": "system", "content": "be brief"}
    assert result.messages[-1] == {"role": "user", "content": "latest question"}
    assert result.dropped * 2 + kept == len(turns)
    assert result.messages[1:-1] == [present(t) for t in turns[2 * result.dropped :]]  # the latest ones
    assert result.tokens == words(result.messages) <= budget
    if result.dropped:  # one exchange more would not have fit
        one_more = messages_for(exchanges(turns)[result.dropped - 1 :], "latest question", "be brief")
        assert words(one_more) > budget


def test_the_current_turn_is_never_cut_a_prompt_that_cannot_fit_is_refused() -> None:
    with pytest.raises(PromptTooLong) as info:
        fit(history(4), "a very long question indeed", None, words, budget=6, n_ctx=10)
    assert (info.value.tokens, info.value.budget) == (7, 6)
    assert "too long" in str(info.value) and "10 tokens" in str(info.value)


def test_a_stopped_answer_is_shown_as_stopped() -> None:
    stopped = Turn("assistant", "Once upon a time there  ", "cancelled")
    assert present(stopped) == {"role": "assistant", "content": f"Once upon a time there {STOPPED_NOTE}"}
    assert present(Turn("assistant", "Done.")) == {"role": "assistant", "content": "Done."}
    assert present(Turn("user", "hi")) == {"role": "user", "content": "hi"}


def test_user_turns_without_an_answer_are_left_out() -> None:
    q1, a1, q2, q3, a3 = (Turn("user", "1"), Turn("assistant", "one"), Turn("user", "2"),
                          Turn("user", "3"), Turn("assistant", "three", "cancelled"))
    assert exchanges([q1, a1, q2, q3, a3]) == [(q1, a1), (q3, a3)]
    assert exchanges([q2]) == []
    assert exchanges([a1, q1]) == []  # an answer without its question is left out too


def test_budget_leaves_room_for_the_answer_but_at_most_a_quarter_of_the_context() -> None:
    assert prompt_budget(2048, 256) == 1792
    assert prompt_budget(2048, 2048) == 1536
    assert prompt_budget(2048, 1) == 2047


def test_end_of_turn_is_what_the_template_writes_after_an_answer() -> None:
    def chatml(messages: list[Message]) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

    def plain(messages: list[Message]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

    def refuses(messages: list[Message]) -> str:
        raise ValueError("roles must alternate")

    assert end_of_turn(chatml) == "<|im_end|>"
    assert end_of_turn(plain) is None
    assert end_of_turn(refuses) is None


def test_reproducible_requests_reuse_only_the_canonical_aligned_prefix() -> None:
    # free sampling: every shared token
    assert reuse_length(common=300, canonical=100, align=128, exact=False) == 300
    # exact: only what a fresh evaluation would have computed alike, in whole micro-batches
    assert reuse_length(common=300, canonical=1000, align=128, exact=True) == 256
    assert reuse_length(common=300, canonical=200, align=128, exact=True) == 128
    assert reuse_length(common=100, canonical=1000, align=128, exact=True) == 0
    # an evaluation that starts at an aligned canonical point makes the whole prompt canonical
    assert canonical_after(keep=256, canonical=300, prompt_tokens=900, align=128) == 900
    assert canonical_after(keep=0, canonical=0, prompt_tokens=50, align=128) == 50
    # one that starts elsewhere leaves only what it kept of the canonical part
    assert canonical_after(keep=300, canonical=900, prompt_tokens=950, align=128) == 300
    assert canonical_after(keep=256, canonical=200, prompt_tokens=950, align=128) == 200
