"""What goes into a generation's prompt, independent of the engine that renders and counts it.

- Earlier turns go in as (user, assistant) exchanges, oldest first. A user turn without an
  answer (it ended in `error`, or was stopped before any text) goes out with it: the next user
  turn would otherwise follow a user turn, which strict chat templates refuse, and the user
  usually asked again anyway.
- An answer the user stopped is shown as what it is: its partial text followed by
  `STOPPED_NOTE`. Shown as a plain assistant turn, the model would take the cut-off text for
  a complete answer (and imitate answers that end mid-sentence); dropped, a "go on" would
  have nothing to refer to.
- The prompt gets `prompt_budget(n_ctx, max_tokens)` tokens. The oldest exchanges are left out
  until it fits; the current user turn is never cut. If it does not fit alone (with the system
  prompt), `PromptTooLong`.

Reusing the KV cache of the previous prompt changes how the rest is evaluated (a different
split into batches), and so the logits in their last bits: enough to change a sampled or even
a greedy answer. A request that must be reproducible (temperature 0, or a seed) keeps only the
cached prefix that a fresh evaluation would have computed the same way: prompt tokens (not
generated ones) evaluated in micro-batches aligned at the start (`reuse_length`,
`canonical_after`).

Messages are the `{"role", "content"}` dicts that chat templates take; the engine supplies
`measure` (render with the model's template, tokenize, count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol.jobs import ChatTurn
from worker import PromptTooLong
from worker.engines.base import Turn

Message = dict[str, str]
STOPPED_NOTE = "[stopped by the user]"
_PROBE = "TOKENRELAYPROBE"


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[Message]
    tokens: int
    dropped: int
    """Earlier exchanges left out to fit the context."""


def prompt_budget(n_ctx: int, max_tokens: int) -> int:
    """Tokens the prompt may take: the answer keeps room for `max_tokens`, but never more than
    a quarter of the context (a longer answer ends with `length` when the context is full)."""
    return n_ctx - min(max_tokens, n_ctx // 4)


def exchanges(history: Sequence[Turn]) -> list[tuple[Turn, Turn]]:
    """(user, answer) pairs, oldest first; unanswered user turns are left out."""
    pairs: list[tuple[Turn, Turn]] = []
    question: Turn | None = None
    for turn in history:
        if turn.role == "user":
            question = turn
        elif question is not None:
            pairs.append((question, turn))
            question = None
    return pairs


def present(turn: Turn) -> Message:
    """A turn as the model sees it: a stopped answer carries `STOPPED_NOTE`."""
    if turn.role == "assistant" and turn.status == "cancelled":
        return {"role": "assistant", "content": f"{turn.text.rstrip()} {STOPPED_NOTE}"}
    return {"role": turn.role, "content": turn.text}


def messages_for(pairs: Sequence[tuple[Turn, Turn]], text: str, system: str | None) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        messages += [present(question), present(answer)]
    messages.append({"role": "user", "content": text})
    return messages


def plain_form(messages: Sequence[Message]) -> str:
    """The prompt of a model without a chat template: `Role: content` lines, then `Assistant:`."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def fit(
    history: Sequence[Turn],
    text: str,
    system: str | None,
    measure: Callable[[list[Message]], int],
    budget: int,
    n_ctx: int,
) -> Prompt:
    """The prompt with as many of the latest exchanges as fit in `budget` tokens.

    `measure` is called once when everything fits, else O(log n) times (binary search over
    how many of the oldest exchanges to leave out: fewer messages never need more tokens)."""
    pairs = exchanges(history)
    tokens = measure(messages_for(pairs, text, system))
    if tokens <= budget:
        return Prompt(messages_for(pairs, text, system), tokens, 0)
    alone = measure(messages_for([], text, system))
    if alone > budget:
        raise PromptTooLong(alone, budget, n_ctx)
    fits, fits_tokens = len(pairs), alone  # leaving out `fits` exchanges is enough
    too_few = 0  # leaving out `too_few` is not
    while fits - too_few > 1:
        middle = (fits + too_few) // 2
        tokens = measure(messages_for(pairs[middle:], text, system))
        if tokens <= budget:
            fits, fits_tokens = middle, tokens
        else:
            too_few = middle
    return Prompt(messages_for(pairs[fits:], text, system), fits_tokens, fits)


def end_of_turn(render: Callable[[list[Message]], str]) -> str | None:
    """The text a chat template puts after an assistant turn (`<|im_end|>` for ChatML), found
    by rendering one exchange without the generation prompt; None when it is only whitespace
    or the template cannot render it."""
    try:
        text = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
    except Exception:  # a template may refuse the probe (its own raise_exception)
        return None
    _before, found, after = text.partition(_PROBE)
    words = after.split()
    return words[0] if found and words else None


def reuse_length(common: int, canonical: int, align: int, exact: bool) -> int:
    """How many cached tokens a prompt keeps, of the `common` it shares with the cache. `exact`:
    only the canonical part (see `canonical_after`), cut down to a multiple of the micro-batch
    size `align`, so that the rest is evaluated in the same micro-batches as from scratch."""
    return min(common, canonical) // align * align if exact else common


def canonical_after(keep: int, canonical: int, prompt_tokens: int, align: int) -> int:
    """The canonical length once a prompt of `prompt_tokens` has been evaluated after keeping
    `keep` cached tokens: the whole prompt if evaluation started at an aligned point of the
    canonical part, else only what was kept of that part."""
    if keep <= canonical and keep % align == 0:
        return prompt_tokens
    return min(canonical, keep)


def from_conversation(conversation: Sequence[ChatTurn]) -> tuple[str | None, list[Turn]]:
    """A conversation the client sent whole, as (system prompt, history): the system turns
    joined (None when there are none), the others in order."""
    system = [turn.content for turn in conversation if turn.role == "system"]
    history = [Turn(turn.role, turn.content) for turn in conversation if turn.role != "system"]
    return ("\n\n".join(system) if system else None), history
