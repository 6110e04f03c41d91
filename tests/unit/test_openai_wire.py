"""The OpenAI-compatible edge's pure parts: requests into prompts, answers into objects and
numbered events, the per-user buckets, and the worker's side of a conversation."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from protocol import openai
from protocol.errors import BadRequest
from protocol.ids import issued_ms, new_message_id
from protocol.jobs import ChatTurn, Job, job_decoder, job_encoder
from protocol.limits import KeyedBuckets
from protocol.messages import Cancelled, Chunk, Done, Error
from protocol.validation import Limits
from worker.engines.base import Turn
from worker.job import JobServices, build_request
from worker.prompt import from_conversation

LIMITS = Limits()


def chat(**body: Any) -> openai.Prompt:
    return openai.chat_prompt(json.dumps({"model": "m", **body}).encode(), LIMITS)


def test_a_conversation_becomes_system_first_then_alternating_turns_and_the_last_user_text() -> None:
    prompt = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "system", "content": "in French"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
        {"role": "user", "content": "e"},
    ], max_completion_tokens=7, temperature=0, seed=3, stream=True, top_p=0.5, user="ignored")
    assert prompt.conversation == (ChatTurn("system", "be brief"), ChatTurn("system", "in French"),
                                   ChatTurn("user", "a\n\nb"), ChatTurn("assistant", "c"))
    assert prompt.text == "d\n\ne"
    assert (prompt.max_tokens, prompt.temperature, prompt.seed, prompt.stream) == (7, 0, 3, True)


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    ({"messages": [{"role": "system", "content": "x"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "  "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "x"}] * 201}, "too many"),
    ({"messages": [{"role": "system", "content": "x" * 64_000}, {"role": "user", "content": "y"}]}, "too long"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "'n'"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "max_completion_tokens": 1}, "not both"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "text output"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, r"messages\[0\]"),
    ({"messages": "hi"}, "invalid request body"),
])
def test_requests_we_cannot_answer_as_asked_are_bad_requests_saying_why(body: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        chat(**body)


def test_a_responses_request_takes_instructions_a_string_or_message_items() -> None:
    text_only = openai.responses_prompt(b'{"model": "m", "input": "hi", "instructions": "short"}', LIMITS)
    assert (text_only.conversation, text_only.text, text_only.background) == ((ChatTurn("system", "short"),), "hi", False)
    items = openai.responses_prompt(json.dumps({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
        {"role": "user", "content": "q2"}], "background": True, "stream": True, "max_output_tokens": 9}).encode(),
        LIMITS)
    assert items.conversation == (ChatTurn("user", "q"), ChatTurn("assistant", "a"))
    assert (items.text, items.background, items.stream, items.max_tokens) == ("q2", True, True, 9)
    with pytest.raises(BadRequest, match="input"):
        openai.responses_prompt(b'{"input": [{"role": "user", "content": [{"type": "input_image"}]}]}', LIMITS)


def info(after: int = -1) -> openai.ResponseStream:
    mid = new_message_id("s0x1")
    return openai.ResponseStream(openai.ResponseInfo(mid, issued_ms(mid) // 1000, "m", True), after)


def numbers(sse: bytes) -> list[tuple[int, str]]:
    events = [json.loads(line[6:]) for line in sse.decode().splitlines() if line.startswith("data: ")]
    return [(e["sequence_number"], e["type"]) for e in events]


def test_response_events_are_numbered_from_the_log_and_starting_after_leaves_out_what_was_seen() -> None:
    whole = info()
    mid = whole.info.message_id
    stream = whole.opening() + whole.delta(1, "a") + whole.delta(2, "b")
    stream += whole.closing(Done(message_id=mid, seq=2, finish_reason="stop"), "ab")
    assert numbers(stream) == [
        (0, "response.created"), (1, "response.in_progress"), (2, "response.output_item.added"),
        (3, "response.content_part.added"), (4, "response.output_text.delta"), (5, "response.output_text.delta"),
        (6, "response.output_text.done"), (7, "response.content_part.done"), (8, "response.output_item.done"),
        (9, "response.completed")]
    assert b"event: response.completed\ndata: " in stream
    delta = whole.delta(1, 'a "b"\n')
    assert delta == whole._event(4, "response.output_text.delta", {
        "item_id": openai.item_id(mid), "output_index": 0, "content_index": 0, "delta": 'a "b"\n', "logprobs": []})
    for after in range(-1, 10):
        resumed = openai.ResponseStream(whole.info, after)
        position = openai.log_after(after)
        assert position == max(0, after - 3)
        again = resumed.opening() + resumed.delta(1, "a") + resumed.delta(2, "b")
        again += resumed.closing(Done(message_id=mid, seq=2, finish_reason="stop"), "ab")
        assert numbers(again) == numbers(stream)[after + 1:]
    assert list(openai.closing_numbers(2)) == [6, 7, 8, 9]


@pytest.mark.parametrize("terminal, status, final", [
    (Done(message_id="m", seq=1, finish_reason="length"), "incomplete", "response.incomplete"),
    (Cancelled(message_id="m", seq=1), "cancelled", "response.cancelled"),
    (Error(code="worker_lost", message="gone", message_id="m", seq=1), "failed", "response.failed"),
])
def test_a_response_ends_with_its_status(terminal: Any, status: str, final: str) -> None:
    events = info()
    last = json.loads(events.closing(terminal, "x").decode().rsplit("data: ", 1)[1])
    assert last["type"] == final and last["response"]["status"] == status
    assert last["response"]["output"][0]["content"][0]["text"] == "x"
    assert openai.status_of(terminal, "running") == status
    assert (last["response"]["error"] is not None) == (status == "failed")
    assert openai.status_of(None, "queued") == "queued" and openai.status_of(None, "running") == "in_progress"


def test_a_chat_completion_streams_role_deltas_and_a_finish_or_an_error_then_done() -> None:
    completion = openai.ChatCompletion("m1", "model", 5)
    first = json.loads(completion.opening()[6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    delta = completion.delta('say "hi"\n')
    assert delta.startswith(b"data: ") and delta.endswith(b"\n\n")
    assert json.loads(delta[6:]) == json.loads(completion._chunk({"content": 'say "hi"\n'}, None)[6:])
    done = completion.closing(Done(message_id="m1", seq=1, finish_reason="stop"))
    assert done.endswith(b"data: [DONE]\n\n") and json.loads(done.split(b"\n\n")[0][6:])["choices"][0]["finish_reason"] == "stop"
    failed = completion.closing(Error(code="worker_lost", message="the worker died", message_id="m1"))
    assert json.loads(failed.split(b"\n\n")[0][6:]) == openai.error_body("worker_lost", "the worker died")
    assert completion.whole("hi", "length")["choices"][0]["message"]["content"] == "hi"


def test_fold_reads_a_logs_text_and_terminal() -> None:
    frames = [Chunk(message_id="m", seq=1, text="a"), Chunk(message_id="m", seq=2, text="b")]
    assert openai.fold(frames) == ("ab", None)
    end = Cancelled(message_id="m", seq=2)
    assert openai.fold([*frames, end]) == ("ab", end)


def test_keyed_buckets_limit_each_key_and_forget_those_full_again() -> None:
    buckets = KeyedBuckets(rate=1.0, burst=2)
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert buckets.take("b", 0.0) == 0.0
    buckets.prune(1.0)
    assert len(buckets) == 1, "b is full again (as a new one): forgotten; a is not"
    buckets.prune(2.5)
    assert len(buckets) == 0
    assert KeyedBuckets(0, 0).take("a", 0.0) == 0.0


def test_issued_ms_reads_the_time_an_id_was_minted() -> None:
    assert issued_ms(new_message_id("s0x1", now_s=1_700_000_000.123)) == 1_700_000_000_123


async def test_a_job_with_a_conversation_prompts_with_it_not_the_sessions_history() -> None:
    turns = (ChatTurn("system", "s1"), ChatTurn("system", "s2"), ChatTurn("user", "q"), ChatTurn("assistant", "a"))
    job = Job(message_id="m", user="u", session_id="~http.m", text="q2", max_tokens=5, conversation=turns)
    assert job_decoder.decode(job_encoder.encode(job)) == job
    old = msgspec.json.decode(job_encoder.encode(job))
    del old["conversation"]
    assert job_decoder.decode(msgspec.json.encode(old)).conversation is None, "a job from an older gateway"
    assert from_conversation(turns) == ("s1\n\ns2", [Turn("user", "q"), Turn("assistant", "a")])
    assert from_conversation(turns[2:]) == (None, [Turn("user", "q"), Turn("assistant", "a")])
    services = JobServices(store=None, writer=None, engine=None, worker_id="w", with_history=True)  # type: ignore[arg-type]
    request = await build_request(services, job)  # a store call would fail: there is none
    assert (request.system, request.history, request.text) == ("s1\n\ns2", [Turn("user", "q"), Turn("assistant", "a")], "q2")
