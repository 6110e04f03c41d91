"""The OpenAI-compatible HTTP edge driven by the official `openai` Python SDK, a client nobody
here wrote, against 3 gateway processes (an auth secret, `--http-port`) and synthetic workers.

The synthetic engine's text is known in advance (`synthetic_token`), so every answer is
checked word for word; a Stop is checked at the worker (its `job_finished` log line) and in
the message's log in Redis (nothing after the `cancelled`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from protocol.auth import mint_token
from store import keys
from store.embedded import free_port
from tests.support import Proc, ProcessCluster, t, wait_until
from worker.engines.synthetic import synthetic_token

SECRET = "openai-edge-test-secret-0123456789abcdef"
DETACH_GRACE_S = 3
GENERATIONS = 3
SLOW_TOKENS = 2000
"""A generation long enough (at 50 tokens/s) to be stopped in the middle."""


@pytest.fixture(scope="module")
def cluster(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    c = ProcessCluster(redis_server, tmp_path_factory.mktemp("openai"), extra_env={"TOKENRELAY_AUTH_SECRET": SECRET})
    try:
        for _ in range(3):
            c.add_gateway("--http-port", str(free_port()), "--detach-grace", str(DETACH_GRACE_S),
                          "--max-generations-per-user", str(GENERATIONS))
        c.add_worker("--engine", "synthetic", "--synthetic-rate", "50", "--concurrency", "100",
                     "--orphan-check", "0.2")
        asyncio.run(c.wait_healthy())
        yield c
    finally:
        c.stop()


_users = itertools.count()
_open: list[openai.AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Every SDK client a test made is closed (its pooled connections) when it ends."""
    yield
    while _open:
        await _open.pop().close()


def sdk(cluster: ProcessCluster, gateway: int, user: str | None = None, token: str | None = None) -> openai.AsyncOpenAI:
    """The SDK on one gateway's HTTP edge, as `user` (a fresh one by default); no retries."""
    if token is None:
        token = mint_token(SECRET, user or f"sdk{next(_users)}-{random.randrange(1 << 30):x}", time.time(), 600)
    port = http_port(cluster.gateways[gateway])
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=t(30))
    _open.append(client)
    return client


def http_port(proc: Proc) -> int:
    return int(proc.args[proc.args.index("--http-port") + 1])


def expected(message_id: str, tokens: int) -> str:
    return "".join(synthetic_token(message_id, i) for i in range(tokens))


def log_records(procs: list[Proc], event: str, message_id: str) -> list[dict[str, Any]]:
    lines = (line for p in procs for line in p.log_path.read_text().splitlines() if line.startswith("{"))
    return [r for r in map(json.loads, lines) if r.get("event") == event and r.get("message_id") == message_id]


async def finished(cluster: ProcessCluster, message_id: str) -> dict[str, Any]:
    """The worker's `job_finished` line for the message, once it is written."""
    await wait_until(lambda: bool(log_records(cluster.workers, "job_finished", message_id)), timeout=10)
    return log_records(cluster.workers, "job_finished", message_id)[0]


async def message_log(cluster: ProcessCluster, message_id: str) -> list[dict[str, Any]]:
    r = aioredis.Redis.from_url(cluster.redis_url)
    try:
        entries = await r.xrange(keys.log(message_id))
    finally:
        await r.aclose()
    return [json.loads(fields[b"f"]) for _id, fields in entries]


async def test_models_lists_what_the_workers_serve(cluster: ProcessCluster) -> None:
    models = await sdk(cluster, 0).models.list()
    assert [m.id for m in models.data] == ["synthetic"]


async def test_a_chat_completion_whole_and_streamed_word_for_word(cluster: ProcessCluster) -> None:
    client = sdk(cluster, 0)
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "tell me more"}]
    whole = await client.chat.completions.create(model="synthetic", messages=messages, max_tokens=12)
    mid = whole.id.removeprefix("chatcmpl-")
    assert whole.object == "chat.completion" and whole.model == "synthetic"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected(mid, 12)
    assert whole.choices[0].finish_reason == "length"

    stream = await sdk(cluster, 1).chat.completions.create(
        model="synthetic", messages=messages, max_completion_tokens=20, stream=True)
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected(chunks[0].id.removeprefix("chatcmpl-"), 20)


async def test_closing_a_streamed_chat_completion_stops_the_worker(cluster: ProcessCluster) -> None:
    stream = await sdk(cluster, 2).chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": "a long story"}], max_tokens=SLOW_TOKENS, stream=True)
    received = []
    async for chunk in stream:
        received.append(chunk.choices[0].delta.content or "")
        if len(received) == 4:
            break
    mid = chunk.id.removeprefix("chatcmpl-")
    await stream.close()

    record = await finished(cluster, mid)
    # pushed by the gateway that saw the disconnect (an orphan's cancel has no source)
    assert (record["outcome"], record["cancel_source"]) == ("cancelled", "push"), record
    assert record["tokens_after_cancel"] <= 1, record
    assert record["seq"] < 40, "stopped long before its 2,000 tokens"
    frames = await message_log(cluster, mid)
    assert frames[-1]["type"] == "cancelled" and frames[-1]["seq"] == record["seq"]
    assert [f["seq"] for f in frames[:-1]] == list(range(1, record["seq"] + 1)), "contiguous, nothing after the end"
    assert "".join(f["text"] for f in frames[:-1]).startswith("".join(received))
    gateway_lines = log_records(cluster.gateways, "cancel", mid)
    assert [(r["reason"], r["status"]) for r in gateway_lines] == [("disconnected", "cancelling")]


async def test_a_background_stream_resumes_on_another_gateway_without_gap_or_duplicate(cluster: ProcessCluster) -> None:
    token = mint_token(SECRET, f"resumer-{random.randrange(1 << 30):x}", time.time(), 600)
    first = await sdk(cluster, 0, token=token).responses.create(
        model="synthetic", input=[{"role": "user", "content": "count"}], background=True, stream=True,
        max_output_tokens=60)
    seen: list[Any] = []
    async for event in first:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) >= 9:
            break
    await first.close()  # a disconnect: not a Stop for a background response
    rid = seen[0].response.id
    assert seen[0].type == "response.created" and seen[0].response.background is True
    last = seen[-1].sequence_number

    resumed = await sdk(cluster, 1, token=token).responses.retrieve(rid, stream=True, starting_after=last)
    rest = [event async for event in resumed]
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers))), "no gap, no duplicate"
    assert [e.type for e in rest[-4:]] == ["response.output_text.done", "response.content_part.done",
                                           "response.output_item.done", "response.incomplete"]
    deltas = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
    assert deltas == expected(rid, 60) == rest[-1].response.output_text
    assert rest[-1].response.incomplete_details.reason == "max_output_tokens"
    final = await sdk(cluster, 2, token=token).responses.retrieve(rid)
    assert final.status == "incomplete" and final.output_text == expected(rid, 60)


async def test_responses_cancel_from_another_gateway_stops_it_and_a_second_cancel_is_no_error(
    cluster: ProcessCluster,
) -> None:
    token = mint_token(SECRET, f"canceller-{random.randrange(1 << 30):x}", time.time(), 600)
    stream = await sdk(cluster, 0, token=token).responses.create(
        model="synthetic", input="a long story", background=True, stream=True, max_output_tokens=SLOW_TOKENS)
    events: list[Any] = []
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            break
    rid = events[0].response.id
    other = sdk(cluster, 1, token=token)
    cancelled = await other.responses.cancel(rid)
    assert cancelled.id == rid and cancelled.status == "cancelled"
    events += [event async for event in stream]
    # OpenAI's stream has no event type for this (the SDK keeps its `response` as a dict)
    assert events[-1].type == "response.cancelled" and events[-1].response["status"] == "cancelled"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    record = await finished(cluster, rid)
    assert record["outcome"] == "cancelled" and record["seq"] < 40, record
    again = await sdk(cluster, 2, token=token).responses.cancel(rid)
    assert again.status == "cancelled" and again.output_text == cancelled.output_text

    done = await other.responses.create(model="synthetic", input="short", max_output_tokens=3)
    assert done.status == "incomplete"
    assert (await other.responses.cancel(done.id)).status == "incomplete", "a finished response is returned as it is"


async def test_a_background_response_nobody_watches_is_cancelled_after_the_detach_grace(
    cluster: ProcessCluster,
) -> None:
    client = sdk(cluster, 0)
    created = await client.responses.create(model="synthetic", input="go", background=True,
                                            max_output_tokens=SLOW_TOKENS)
    assert created.status == "queued"
    record = await finished(cluster, created.id)
    assert record["outcome"] == "cancelled" and record["cancel_reason"] == "orphaned", record
    assert (await client.responses.retrieve(created.id)).status == "cancelled"


async def test_a_bad_token_is_401_and_generations_over_the_quota_are_429(cluster: ProcessCluster) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        await sdk(cluster, 0, token="not-a-token").chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401 and refused.value.code == "unauthorized"
    forged = mint_token("another-secret-that-is-long-enough-0123456789", "alice", time.time(), 600)
    with pytest.raises(openai.AuthenticationError):
        await sdk(cluster, 1, token=forged).models.list()

    user = f"greedy-{random.randrange(1 << 30):x}"
    clients = [sdk(cluster, i % 3, user=user) for i in range(GENERATIONS)]
    running = [await c.responses.create(model="synthetic", input="go", background=True, max_output_tokens=SLOW_TOKENS)
               for c in clients]
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk(cluster, 2, user=user).chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "one more"}])
    assert limited.value.status_code == 429 and limited.value.code == "rate_limited"
    assert limited.value.response.headers["retry-after"] == "1"
    for response in running:
        await clients[0].responses.cancel(response.id)
    answer = await sdk(cluster, 2, user=user).chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": "now"}], max_tokens=2)
    assert answer.choices[0].finish_reason == "length"
