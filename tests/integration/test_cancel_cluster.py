"""Distributed cancellation on a real cluster: 3 gateway processes, 2 worker processes, on a
single Redis and on a Redis Cluster (3 masters, 3 replicas: every test runs on both).

Clients are spread over the gateways round-robin, as a balancer would; a Stop is sent on a
different gateway than the stream it stops wherever that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import (
    TERMINALS,
    Client,
    Proc,
    ProcessCluster,
    assert_stream_ok,
    client,
    http_get,
    t,
    wait_until,
)

GRACE_S = 3


@pytest.fixture(scope="module", params=["single", "cluster"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    on_cluster = request.param == "cluster"
    if on_cluster:
        embedded = request.getfixturevalue("redis_cluster")
        embedded.wait_healthy(t(30))  # an earlier failover test may have left it recovering
        url = embedded.url
    else:
        url = request.getfixturevalue("redis_server")
    c = ProcessCluster(url, tmp_path_factory.mktemp("cluster"), cluster=on_cluster)
    try:
        for _ in range(3):
            c.add_gateway("--grace", str(GRACE_S))
        for _ in range(2):
            c.add_worker("--engine", "synthetic", "--synthetic-rate", "50", "--concurrency", "150", "--grace", str(GRACE_S))
        asyncio.run(c.wait_healthy())
        yield c
    finally:
        c.stop()


_users = itertools.count()


def user() -> str:
    return f"u{next(_users)}-{random.randrange(1 << 30):x}"


def log_lines(procs: list[Proc], event: str, message_id: str) -> list[dict[str, Any]]:
    """The JSON log lines of `procs` for `event` about `message_id`."""
    lines = (line for p in procs for line in p.log_path.read_text().splitlines() if line.startswith("{") and line.endswith("}"))
    return [
        record for record in map(json.loads, lines)
        if record.get("event") == event and record.get("message_id") == message_id
    ]


def ports(cluster: ProcessCluster) -> list[int]:
    return [g.port or 0 for g in cluster.gateways]


async def test_every_instance_is_healthy(cluster: ProcessCluster) -> None:
    for port in ports(cluster):
        status, body = await http_get(port, "/healthz")
        assert status == 200 and '"redis": true' in body


async def test_immediate_cancel_from_another_gateway(cluster: ProcessCluster) -> None:
    a_port, b_port, _ = ports(cluster)
    name = user()
    async with client(a_port, name) as a, client(b_port, name) as b:
        mid = await a.chat("s", max_tokens=1000)
        result = await b.cancel(message_id=mid)
        assert result["status"] == "cancelling"
        end = await a.terminal(mid)
        assert end["type"] == "cancelled"
        assert_stream_ok(a, mid)
        assert len(a.chunks(mid)) < 1000


async def test_rapid_repeated_clicks_from_several_gateways_end_once(cluster: ProcessCluster) -> None:
    name = user()
    async with client(ports(cluster)[0], name) as a, contextlib.AsyncExitStack() as stack:
        clickers = [await stack.enter_async_context(client(p, name)) for p in ports(cluster) for _ in range(2)]
        mid = await a.chat("s", max_tokens=1000)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
        results = await asyncio.gather(
            *(c.cancel(message_id=mid) for c in clickers for _ in range(3))
        )
        statuses = {r["status"] for r in results}
        assert statuses <= {"cancelling", "already_cancelled"}, statuses
        assert "cancelling" in statuses
        await a.terminal(mid)
        assert [f["type"] for f in a.events(mid) if f["type"] in TERMINALS] == ["cancelled"]
        assert_stream_ok(a, mid)
        late = await clickers[0].cancel(message_id=mid)
        assert late["status"] == "already_cancelled"


async def test_cancel_after_completion_is_already_completed_then_not_found(cluster: ProcessCluster) -> None:
    a_port, b_port, _ = ports(cluster)
    name = user()
    async with client(a_port, name) as a, client(b_port, name) as b:
        mid = await a.chat("s", max_tokens=3)
        assert (await a.terminal(mid))["type"] == "done"
        assert (await b.cancel(message_id=mid))["status"] == "already_completed"
        assert (await b.cancel(session_id="s"))["status"] == "already_completed"
        async def forgotten() -> bool:
            return bool((await b.cancel(message_id=mid))["status"] == "not_found")

        await wait_until(forgotten, timeout=GRACE_S + 10, interval=0.2)
        assert [f["type"] for f in a.events(mid) if f["type"] in TERMINALS] == ["done"]


async def test_cancel_during_a_long_stream(cluster: ProcessCluster) -> None:
    a_port, _, c_port = ports(cluster)
    name = user()
    async with client(a_port, name) as a, client(c_port, name) as b:
        mid = await a.chat("s", max_tokens=2000)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid and f["seq"] >= 20)
        assert (await b.cancel(session_id="s"))["status"] == "cancelling"
        end = await a.terminal(mid)
        assert end["type"] == "cancelled" and end["seq"] >= 20
        assert_stream_ok(a, mid)
        history = await b.request(type="history", session_id="s")
        assert history["turns"][-1]["status"] == "cancelled"
        assert history["turns"][-1]["text"] == a.text(mid)
    # Logged on each process it passed through, with the ids and the phase it hit.
    await wait_until(lambda: bool(log_lines(cluster.workers, "job_finished", mid)))
    (finished,) = log_lines(cluster.workers, "job_finished", mid)
    assert (finished["outcome"], finished["cancel_phase"]) == ("cancelled", "generating")
    # the push; on a cluster the cancel waits for a replica before it pushes, and the worker's
    # next chunk, refused, may tell it first
    assert finished["cancel_source"] in (("push", "refused_write") if cluster.cluster else ("push",)), finished
    (cancel,) = log_lines(cluster.gateways, "cancel", mid)
    assert cancel["status"] == "cancelling" and cancel["worker_id"] == finished["worker_id"]
    assert cancel["gateway_id"] and cancel["session_id"] == "s"


async def test_on_the_watching_connection_cancel_result_comes_before_cancelled(cluster: ProcessCluster) -> None:
    """PROTOCOL.md: `cancelling` means the terminal `cancelled` follows. The store publishes
    that terminal before it answers the gateway, so without care it could overtake the answer."""
    name = user()
    async with client(ports(cluster)[0], name) as a:
        for round_ in range(20):
            mid = await a.chat(f"order-{round_}", max_tokens=2000)
            await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == mid)
            assert (await a.cancel(message_id=mid))["status"] == "cancelling"
            await a.terminal(mid)
            order = [f["type"] for f in a.frames if f.get("message_id") == mid and f["type"] in ("cancel_result", "cancelled")]
            assert order == ["cancel_result", "cancelled"], (round_, order)


async def test_cancel_before_accepted_by_session(cluster: ProcessCluster) -> None:
    name = user()
    async with client(ports(cluster)[1], name) as a:
        await a.send(type="chat", session_id="s", text="hi", max_tokens=1000, request_id="r")
        await a.send(type="cancel", session_id="s")
        accepted = await a.wait_for(lambda f: f["type"] == "accepted")
        result = await a.wait_for(lambda f: f["type"] == "cancel_result")
        assert result["status"] == "cancelling" and result["session_id"] == "s"
        assert result["message_id"] == accepted["message_id"]
        end = await a.terminal(accepted["message_id"])
        assert end["type"] == "cancelled"
        assert_stream_ok(a, accepted["message_id"])


async def test_other_users_cannot_cancel_or_see_a_message(cluster: ProcessCluster) -> None:
    a_port, b_port, _ = ports(cluster)
    alice, mallory = user(), user()
    async with client(a_port, alice) as a, client(b_port, mallory) as m:
        mid = await a.chat("s", max_tokens=60)
        assert (await m.cancel(message_id=mid))["status"] == "not_found"
        assert (await m.cancel(session_id="s"))["status"] == "not_found"
        await m.send(type="resume", message_id=mid, after_seq=0)
        error = await m.wait_for(lambda f: f["type"] == "error")
        assert error["code"] == "not_found" and error["message_id"] == mid
        assert (await a.terminal(mid))["type"] == "done"
        assert (await m.request(type="history", session_id="s"))["turns"] == []


async def test_new_chat_in_a_session_cancels_the_running_one(cluster: ProcessCluster) -> None:
    name = user()
    async with client(ports(cluster)[2], name) as a:
        first = await a.chat("s", max_tokens=1000)
        await a.wait_for(lambda f: f["type"] == "chunk" and f["message_id"] == first)
        second = await a.chat("s", max_tokens=5)
        assert (await a.terminal(first))["type"] == "cancelled"
        assert (await a.terminal(second))["type"] == "done"
        history = await a.request(type="history", session_id="s")
        assert [(t["message_id"], t["role"], t["status"]) for t in history["turns"]] == [
            (first, "user", "complete"),
            (first, "assistant", "cancelled"),
            (second, "user", "complete"),
            (second, "assistant", "complete"),
        ]


async def _race_one(a: Client, b: Client, session: str, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    moment = rng.choice(["before_accepted", "at_accept", "after_chunks", "near_end", "after_end"])
    max_tokens = rng.randint(5, 40)
    if moment == "before_accepted":
        start = len(a.frames)
        await a.send(type="chat", session_id=session, text="x", max_tokens=max_tokens)
        results = [await a.cancel(session_id=session)]
        mid = (await a.wait_for(lambda f: f["type"] == "accepted", start=start))["message_id"]
    else:
        mid = await a.chat(session, max_tokens=max_tokens)
        if moment == "after_chunks":
            await a.wait_for(lambda f: f.get("message_id") == mid and f["type"] in ("chunk",) + TERMINALS)
        elif moment == "near_end":
            await a.wait_for(
                lambda f: f.get("message_id") == mid
                and (f["type"] in TERMINALS or f["type"] == "chunk" and f["seq"] >= max_tokens - 1)
            )
        elif moment == "after_end":
            await a.terminal(mid)
        results = list(
            await asyncio.gather(*(c.cancel(message_id=mid) for c in rng.sample([a, b, b], 2)))
        )
    await a.terminal(mid)
    return mid, results


async def test_race_200_messages_cancelled_at_random_moments(cluster: ProcessCluster) -> None:
    rng = random.Random(20261123)
    port_cycle = itertools.cycle(ports(cluster))
    async with contextlib.AsyncExitStack() as stack:
        pairs = []
        for _ in range(10):
            name = user()
            a = await stack.enter_async_context(client(next(port_cycle), name))
            b = await stack.enter_async_context(client(next(port_cycle), name))
            pairs.append((a, b))
        async def run_pair(index: int, a: Client, b: Client) -> list[tuple[str, list[dict[str, Any]]]]:
            return [await _race_one(a, b, f"s{index}-{n}", rng) for n in range(20)]

        outcomes = await asyncio.gather(*(run_pair(i, a, b) for i, (a, b) in enumerate(pairs)))
        total = 0
        for (a, _b), runs in zip(pairs, outcomes):
            for mid, results in runs:
                total += 1
                terminal = assert_stream_ok(a, mid)
                for result in results:
                    assert result["status"] != "not_found", (mid, result)
                    assert result["status"] in ("cancelling", "already_cancelled", "already_completed")
                if terminal["type"] == "done":
                    assert all(r["status"] == "already_completed" for r in results), (mid, results)
                if any(r["status"] == "cancelling" for r in results):
                    assert terminal["type"] == "cancelled", (mid, results, terminal)
                if any(r["status"] == "already_cancelled" for r in results):
                    assert terminal["type"] == "cancelled"
        assert total == 200
