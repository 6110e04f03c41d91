"""PROTOCOL.md's "Security and limits" and token refresh, line by line, through real WebSocket
clients on real multi-gateway clusters (gateway and worker processes, as an operator runs them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from protocol.auth import mint_token
from store.embedded import free_port
from tests.support import KEYSPACE, REPO, Client, ProcessCluster, http_get, message_id, t, wait_until

SECRET = "tokenrelay-test-secret-0123456789abcdef"
SLOW = ("--engine", "synthetic", "--synthetic-rate", "20", "--drain-timeout", "1")


@contextlib.asynccontextmanager
async def ws_client(port: int, **kw: Any) -> AsyncIterator[Client]:
    c = Client(await connect(f"ws://127.0.0.1:{port}/ws", **kw))
    try:
        yield c
    finally:
        await c.close()


async def dev_client(port: int, user: str) -> Client:
    c = Client(await connect(f"ws://127.0.0.1:{port}/ws"))
    assert await c.request(type="auth", user=user) == {"type": "auth_ok", "user": user}
    return c


async def closed_with(c: Client, timeout: float = 10.0) -> int | None:
    """The close code the gateway sent, once the connection has closed."""
    async with asyncio.timeout(t(timeout)):
        await c.ws.wait_closed()
    return c.ws.close_code


async def metric(port: int, name: str, labels: str) -> float:
    status, body = await http_get(port, "/metrics")
    assert status == 200
    found = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", body, re.M)
    return float(found.group(1)) if found else 0.0


async def refusals(ports: list[int], limit: str) -> float:
    return sum([await metric(p, "tokenrelay_gateway_refusals_total", f'limit="{limit}"') for p in ports])


def ports(cluster: ProcessCluster) -> list[int]:
    return [g.port or 0 for g in cluster.gateways]


async def start(cluster: ProcessCluster, gateways: int, *extra: str, workers: int = 1,
                worker_args: tuple[str, ...] = SLOW) -> list[int]:
    for _ in range(gateways):
        cluster.add_gateway(*extra)
    for _ in range(workers):
        cluster.add_worker(*worker_args)
    await cluster.wait_healthy()
    return ports(cluster)


# --- Origin ----------------------------------------------------------------------------------


async def test_a_foreign_origin_gets_403_before_any_frame(process_cluster: ProcessCluster) -> None:
    plain = process_cluster.add_gateway()
    allowing = process_cluster.add_gateway("--allow-origin", "https://app.example",
                                           "--allow-origin", "http://other.example:3000")
    anything = process_cluster.add_gateway("--allow-origin", "*")
    await process_cluster.wait_healthy()
    for gw in (plain, allowing, anything):
        own = f"http://127.0.0.1:{gw.port}"
        for origin in (None, own):  # not a browser; the page the gateway serves at /
            async with ws_client(gw.port or 0, origin=origin) as c:
                assert (await c.request(type="heartbeat", ts=1))["type"] == "heartbeat_ack"
    for gw, origin in ((plain, "http://evil.example"), (plain, "https://app.example"),
                       (allowing, "http://evil.example"), (allowing, f"http://127.0.0.1:{(plain.port or 0) + 1}"),
                       (plain, "null")):
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{gw.port}/ws", origin=origin)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403, origin
    for origin in ("https://app.example", "http://other.example:3000"):  # --allow-origin is repeatable
        async with ws_client(allowing.port or 0, origin=origin) as c:  # type: ignore[arg-type]
            assert (await c.request(type="heartbeat"))["type"] == "heartbeat_ack"
    async with ws_client(anything.port or 0, origin="http://evil.example") as c:  # type: ignore[arg-type]
        assert (await c.request(type="heartbeat"))["type"] == "heartbeat_ack"
    assert await refusals([plain.port or 0], "origin") == 3
    assert await refusals([allowing.port or 0], "origin") == 2
    assert "origin_refused" in plain.log_path.read_text()


async def test_the_origin_check_uses_the_forwarded_scheme_and_the_host_with_its_port(
    process_cluster: ProcessCluster,
) -> None:
    """Behind a TLS-terminating proxy (deploy/nginx.conf) the page's origin is https."""
    gw = process_cluster.add_gateway()
    await process_cluster.wait_healthy()
    headers = {"Host": "chat.example:8443", "X-Forwarded-Proto": "https"}
    for origin, ok in (("https://chat.example:8443", True), ("http://chat.example:8443", False),
                       ("https://chat.example", False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        lines = [f"{k}: {v}" for k, v in {**headers, "Origin": origin}.items()]
        writer.write(("GET /ws HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        status = (await reader.readline()).decode()
        writer.close()
        assert status.split()[1] == ("101" if ok else "403"), (origin, status)


# --- no open gateway by accident ------------------------------------------------------------------


def run_gateway(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "TOKENRELAY_AUTH_SECRET"}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=t(timeout))


def test_host_0_0_0_0_without_a_secret_exits_non_zero_naming_auth_secret(redis_url: str) -> None:
    done = run_gateway("--host", "0.0.0.0", "--port", str(free_port()), "--redis-url", redis_url)
    assert done.returncode != 0
    assert "--auth-secret" in done.stderr and "--insecure" in done.stderr, done.stderr
    for host in ("::", "10.1.2.3", "gateway.example"):
        assert run_gateway("--host", host, "--port", str(free_port()), "--redis-url", redis_url).returncode != 0


def test_a_port_already_taken_exits_non_zero_saying_so(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_gateway("--host", "127.0.0.1", "--port", str(taken.getsockname()[1]), "--redis-url", redis_url)
    assert done.returncode == 1
    assert "cannot listen" in done.stderr and "address already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_a_short_secret_is_refused_saying_how_to_make_one(redis_url: str, tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short\n")
    for args, env in ((["--auth-secret-file", str(short)], None), ([], {"TOKENRELAY_AUTH_SECRET": "x" * 31}),
                      (["--auth-secret", "x" * 31], None)):
        done = run_gateway("--port", str(free_port()), "--redis-url", redis_url, *args, env=env)
        assert done.returncode != 0 and "at least 32" in done.stderr and "token_urlsafe" in done.stderr, done.stderr
    done = run_gateway("token", "--user", "alice", "--secret-file", str(short))
    assert done.returncode != 0 and "at least 32" in done.stderr


async def test_an_open_gateway_starts_with_a_secret_from_a_file_or_the_environment_or_insecure(
    process_cluster: ProcessCluster, tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    from_file = process_cluster.add_gateway("--host", "0.0.0.0", "--auth-secret-file", str(secret_file))
    process_cluster.extra_env["TOKENRELAY_AUTH_SECRET"] = SECRET
    from_env = process_cluster.add_gateway("--host", "0.0.0.0")
    del process_cluster.extra_env["TOKENRELAY_AUTH_SECRET"]
    insecure = process_cluster.add_gateway("--host", "0.0.0.0", "--insecure")
    process_cluster.add_worker(*SLOW)
    await process_cluster.wait_healthy()
    token = mint_token(SECRET, "alice", time.time())
    for gw in (from_file, from_env):
        async with ws_client(gw.port or 0) as c:
            assert (await c.request(type="auth", token=token))["user"] == "alice"
            mid = await c.chat("s", max_tokens=2)
            assert (await c.terminal(mid))["type"] == "done"
    async with ws_client(insecure.port or 0) as c:
        assert await c.request(type="auth", user="bob") == {"type": "auth_ok", "user": "bob"}
    assert "INSECURE_OPEN_GATEWAY" in insecure.log_path.read_text()
    for gw in process_cluster.gateways:
        assert SECRET not in gw.log_path.read_text(), "the secret is never logged"
        assert gw.popen is not None and not any(SECRET in arg for arg in gw.args)


# --- tokens: expiry and refresh --------------------------------------------------------------------


def test_the_token_command_mints_a_1_hour_token_from_a_flag_a_file_or_the_environment(tmp_path: Path) -> None:
    from protocol.auth import verify_claims

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    for args, env in ((["--secret", SECRET], None), (["--secret-file", str(secret_file)], None),
                      ([], {"TOKENRELAY_AUTH_SECRET": SECRET})):
        before = time.time()
        done = run_gateway("token", "--user", "alice", *args, env=env)
        assert done.returncode == 0, done.stderr
        claims = verify_claims(SECRET, done.stdout.strip(), time.time())
        assert claims.user == "alice" and int(before) + 3600 <= claims.exp <= time.time() + 3600
    done = run_gateway("token", "--user", "alice", "--secret", SECRET, "--ttl", "5")
    assert verify_claims(SECRET, done.stdout.strip(), time.time()).exp <= time.time() + 5
    assert run_gateway("token", "--user", "alice").returncode != 0, "no secret, no token"


async def token_client(port: int, token: str) -> tuple[Client, dict[str, Any]]:
    c = Client(await connect(f"ws://127.0.0.1:{port}/ws"))
    return c, await c.request(type="auth", token=token)


async def test_a_3_second_token_closes_with_4001_and_a_refreshed_one_does_not(
    process_cluster: ProcessCluster,
) -> None:
    process_cluster.extra_env["TOKENRELAY_AUTH_SECRET"] = SECRET
    gw_a, gw_b = await start(process_cluster, 2)
    expires = math.ceil(time.time()) + 3  # 3 to 4 seconds from now
    short = mint_token(SECRET, "alice", expires - 3, 3)
    a, ok_a = await token_client(gw_a, short)
    b, ok_b = await token_client(gw_b, short)
    minted = time.time()
    refreshed = await b.request(type="auth", token=mint_token(SECRET, "alice", minted, 600))
    witness, _ = await token_client(gw_b, short)  # same gateway as b, not refreshed
    try:
        assert ok_a == ok_b == {"type": "auth_ok", "user": "alice", "expires_at": expires}
        assert refreshed == {"type": "auth_ok", "user": "alice", "expires_at": int(minted) + 600}
        mid = await a.chat("s", max_tokens=160)
        await a.wait_for(lambda f: f["type"] == "chunk")

        assert await closed_with(a) == 4001
        assert time.time() >= expires, "not before the token expired"
        assert await closed_with(witness) == 4001  # gateway b swept its expired connections too
        assert (await b.request(type="heartbeat", ts=7))["type"] == "heartbeat_ack"

        # A closed connection is not a Stop: a new token on the other gateway resumes it.
        last = a.chunks(mid)[-1]["seq"]
        await b.send(type="resume", message_id=mid, after_seq=last)
        end = await b.terminal(mid, timeout=40)
        assert end["type"] == "done"
        seqs = [f["seq"] for f in b.chunks(mid)]
        assert seqs == list(range(last + 1, end["seq"] + 1))
    finally:
        for c in (a, b, witness):
            await c.close()
    assert await metric(gw_a, "tokenrelay_gateway_closed_total", 'reason="token_expired"') == 1


async def test_tokens_that_are_not_good_enough_answer_unauthorized_then_close_1008(
    process_cluster: ProcessCluster,
) -> None:
    process_cluster.extra_env["TOKENRELAY_AUTH_SECRET"] = SECRET
    (port,) = await start(process_cluster, 1, workers=0)
    now = time.time()
    alice = mint_token(SECRET, "alice", now, 600)
    for token in (mint_token(SECRET, "alice", now - 100, 10), alice + "x", "not-a-token",
                  mint_token("another-secret-that-is-long-enough-000", "alice", now)):
        c, reply = await token_client(port, token)
        assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
        assert await closed_with(c) == 1008
    # refresh with another user's token, with a bad one, and without one
    for refresh in ({"token": mint_token(SECRET, "mallory", now, 600)}, {"token": alice[:-2]}, {"user": "alice"}):
        c, reply = await token_client(port, alice)
        assert reply["type"] == "auth_ok"
        reply = await c.request(type="auth", **refresh)
        assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
        assert await closed_with(c) == 1008


async def test_development_mode_auth_ok_has_no_expiry_and_a_connection_keeps_its_user(
    process_cluster: ProcessCluster,
) -> None:
    (port,) = await start(process_cluster, 1, workers=0)
    c = await dev_client(port, "alice")
    assert await c.request(type="auth", user="alice") == {"type": "auth_ok", "user": "alice"}
    reply = await c.request(type="auth", user="mallory")
    assert reply["code"] == "unauthorized"
    assert await closed_with(c) == 1008


# --- concurrent generations per user ----------------------------------------------------------------


async def chat_reply(c: Client, session: str, **extra: Any) -> dict[str, Any]:
    start_at = len(c.frames)
    rid = f"r-{session}-{time.monotonic_ns()}"
    await c.send(type="chat", session_id=session, text="hello", request_id=rid, **extra)
    return await c.wait_for(lambda f: f.get("request_id") == rid and f["type"] in ("accepted", "error"), 10, start_at)


async def test_12_concurrent_chats_of_one_user_get_8_accepted_and_4_rate_limited(
    process_cluster: ProcessCluster,
) -> None:
    gw_a, gw_b = await start(process_cluster, 2)
    alice = [await dev_client(port, "alice") for port in (gw_a, gw_b)]
    bob = await dev_client(gw_b, "bob")
    try:
        replies = await asyncio.gather(*(chat_reply(alice[n % 2], f"s{n}", max_tokens=2000) for n in range(12)))
        accepted = [r for r in replies if r["type"] == "accepted"]
        refused = [r for r in replies if r["type"] == "error"]
        assert len(accepted) == 8 and len(refused) == 4, replies
        for r in refused:
            assert r["code"] == "rate_limited" and r["retry_after_ms"] > 0 and "8 generations" in r["message"]
        assert await refusals([gw_a, gw_b], "generations") == 4
        for n, r in enumerate(replies):  # a refused chat starts nothing
            if r["type"] == "error":
                assert (await alice[0].request(type="history", session_id=f"s{n}"))["turns"] == []

        mid = await bob.chat("b", max_tokens=3)  # another user is unaffected
        assert (await bob.terminal(mid))["type"] == "done"

        # A chat that replaces the running generation of its own session does not count twice.
        running = accepted[0]
        owner = alice[0] if any(f.get("message_id") == running["message_id"] for f in alice[0].frames) else alice[1]
        replacing = await chat_reply(owner, running["session_id"], max_tokens=2000)
        assert replacing["type"] == "accepted", replacing
        assert (await owner.terminal(running["message_id"]))["type"] == "cancelled"
        assert (await chat_reply(alice[1], "s-new"))["code"] == "rate_limited"

        # A generation that ends frees its slot at once.
        assert (await owner.cancel(message_id=replacing["message_id"]))["status"] == "cancelling"
        assert (await chat_reply(alice[1], "s-new", max_tokens=2))["type"] == "accepted"
    finally:
        for c in (*alice, bob):
            await c.close()


async def test_generation_slots_come_back_after_a_gateway_and_a_worker_are_killed(
    process_cluster: ProcessCluster,
) -> None:
    gw_a, gw_b = await start(process_cluster, 2, "--detach-grace", "1", workers=2,
                             worker_args=(*SLOW, "--concurrency", "4"))  # 4 of the 8 on each worker
    a = await dev_client(gw_a, "alice")
    mids = [await a.chat(f"s{n}", max_tokens=2000) for n in range(8)]
    for mid in mids:
        await a.wait_for(lambda f, mid=mid: f["type"] == "chunk" and f["message_id"] == mid, timeout=20)
    process_cluster.gateways[0].signal(signal.SIGKILL)
    process_cluster.workers[0].signal(signal.SIGKILL)
    await a.close()

    b = await dev_client(gw_b, "alice")
    try:
        assert (await chat_reply(b, "x"))["code"] == "rate_limited", "the 8 are still counted"
        r = aioredis.Redis.from_url(process_cluster.redis_url)
        try:
            # the dead worker's jobs are reaped, the live worker's are orphaned (detach grace)
            await wait_until(lambda: _no_generations(r, "alice"), timeout=40)
        finally:
            await r.aclose()
        ends = [(await b.request(type="history", session_id=f"s{n}"))["turns"][-1]["status"] for n in range(8)]
        assert sorted(ends) == ["cancelled"] * 4 + ["error"] * 4, "4 orphaned on the live worker, 4 reaped"
        replies = [await chat_reply(b, f"again{n}", max_tokens=2000) for n in range(9)]
        assert [r["type"] for r in replies] == ["accepted"] * 8 + ["error"], replies
    finally:
        await b.close()


async def _no_generations(r: aioredis.Redis, user: str) -> bool:
    return int(await r.zcard(KEYSPACE.generations(user))) == 0


# --- connections per user ------------------------------------------------------------------------------


async def test_70_connections_of_one_user_get_6_closed_with_4029(process_cluster: ProcessCluster) -> None:
    gw_ports = await start(process_cluster, 2, "--instance-ttl", "3", workers=0)

    async def open_one(n: int) -> tuple[Client, dict[str, Any] | None]:
        c = Client(await connect(f"ws://127.0.0.1:{gw_ports[n % 2]}/ws"))
        await c.send(type="auth", user="alice")
        try:
            return c, await c.wait_for(lambda f: True)
        except ConnectionError:
            return c, None

    opened = await asyncio.gather(*(open_one(n) for n in range(70)))
    ok = [c for c, reply in opened if reply == {"type": "auth_ok", "user": "alice"}]
    refused = [c for c, reply in opened if reply is None]
    try:
        assert len(ok) == 64 and len(refused) == 6
        assert [await closed_with(c) for c in refused] == [4029] * 6
        assert await refusals(gw_ports, "connections") == 6
        bob = await dev_client(gw_ports[0], "bob")  # another user is unaffected
        await bob.close()

        # a closed connection frees its slot
        for c in ok[:2]:
            await c.close()
        ok = ok[2:] + [await dev_client(gw_ports[1], "alice")]

        # a killed gateway frees its users' slots once its heartbeat stops renewing them
        process_cluster.gateways[0].signal(signal.SIGKILL)
        survivors = [c for c in ok if c.ws.remote_address[1] == gw_ports[1]]
        fresh: list[Client] = []

        async def another_fits() -> bool:
            c, reply = await open_one(1)
            if reply is None:
                await c.close()
                return False
            fresh.append(c)
            return len(survivors) + len(fresh) == 64

        await wait_until(another_fits, timeout=30, interval=0.2)
        ok = survivors + fresh
        c, reply = await open_one(1)
        refused.append(c)
        assert reply is None and await closed_with(c) == 4029
    finally:
        for c in ok + refused:
            await c.close()


# --- request rates and bad input ----------------------------------------------------------------------------


async def test_a_flood_of_200_requests_is_rate_limited_and_a_cancel_in_it_is_answered(
    process_cluster: ProcessCluster,
) -> None:
    gw, _ = await start(process_cluster, 2)
    a = await dev_client(gw, "alice")
    try:
        mid = await a.chat("s", max_tokens=2000)
        await a.wait_for(lambda f: f["type"] == "chunk")
        start_at = len(a.frames)
        flood = [json.dumps({"type": "history", "session_id": "s"})] * 200
        flood[100] = json.dumps({"type": "cancel", "message_id": mid})
        started = time.monotonic()
        for frame in flood:
            await a.ws.send(frame)
        await a.send(type="heartbeat", ts=42)
        result = await a.wait_for(lambda f: f["type"] == "cancel_result", 20, start_at)
        assert result == {"type": "cancel_result", "status": "cancelling", "message_id": mid}
        assert (await a.terminal(mid))["type"] == "cancelled"
        await a.wait_for(lambda f: f.get("type") == "heartbeat_ack" and f.get("ts") == 42, 20, start_at)

        async def all_answered() -> bool:
            return len([f for f in a.frames[start_at:] if f["type"] in ("history", "error")]) == 199

        await wait_until(all_answered, timeout=20)
        elapsed = time.monotonic() - started  # the gateway read the flood within this
        answers = [f for f in a.frames[start_at:] if f["type"] in ("history", "error")]
        limited = [f for f in answers if f["type"] == "error"]
        assert {f["code"] for f in limited} == {"rate_limited"}
        assert all(isinstance(f["retry_after_ms"], int) and 0 < f["retry_after_ms"] <= 100 for f in limited)
        passed = len(answers) - len(limited)  # the burst (30, one taken by the chat), then 10 a second
        assert 29 <= passed <= 30 + 10 * elapsed, (passed, elapsed)
        assert limited, "refused while over the bucket"
        assert await refusals([gw], "requests_rate") == len(limited)
        log_lines = [line for line in process_cluster.gateways[0].log_path.read_text().splitlines()
                     if "limit_refused" in line and "requests_rate" in line]
        assert len(log_lines) == 1, "logged once per connection per minute, not per frame"
    finally:
        await a.close()


async def test_cancel_and_heartbeat_have_their_own_bucket(process_cluster: ProcessCluster) -> None:
    (gw,) = await start(process_cluster, 1, workers=0)
    a = await dev_client(gw, "alice")
    try:
        started = time.monotonic()
        for _ in range(300):
            await a.send(type="heartbeat")
        await wait_until(lambda: len(a.frames) >= 301, timeout=20)
        elapsed = time.monotonic() - started
        acks = [f for f in a.frames if f["type"] == "heartbeat_ack"]
        limited = [f for f in a.frames if f.get("code") == "rate_limited"]
        assert len(acks) + len(limited) == 300 and limited
        assert 100 <= len(acks) <= 101 + 50 * elapsed, (len(acks), elapsed)  # burst 100, then 50 a second
        assert all(0 < f["retry_after_ms"] <= 20 for f in limited)
        assert (await a.request(type="history", session_id="s"))["type"] == "history", "requests are unaffected"
    finally:
        await a.close()


async def test_50_bad_requests_within_60_s_close_with_1008(process_cluster: ProcessCluster) -> None:
    (gw,) = await start(process_cluster, 1, workers=0)
    a = await dev_client(gw, "alice")
    for n in range(49):
        reply = await a.request(type="fly" if n % 2 else "chat")
        assert reply["code"] == "bad_request"
    assert (await a.request(type="heartbeat"))["type"] == "heartbeat_ack"
    await a.ws.send("{not json")
    assert await closed_with(a) == 1008
    assert a.frames[-1]["code"] == "bad_request"
    assert await refusals([gw], "bad_input") == 1


# --- ids ----------------------------------------------------------------------------------------------------------


async def test_message_ids_never_issued_answer_not_found_without_touching_redis(
    process_cluster: ProcessCluster,
) -> None:
    (gw,) = await start(process_cluster, 1)
    bogus = ["m1", "tr:evil", "m" + "0" * 27 + "*", "{alice}", message_id("alice").upper(), "x" * 64]
    r = aioredis.Redis.from_url(process_cluster.redis_url)
    seen: list[str] = []
    async with r.monitor() as monitor:
        async def record() -> None:
            async for command in monitor.listen():
                seen.append(str(command.get("command", "")))

        recorder = asyncio.create_task(record())
        a = await dev_client(gw, "alice")
        try:
            for mid in bogus:
                assert (await a.cancel(message_id=mid)) == {"type": "cancel_result", "status": "not_found",
                                                            "message_id": mid}
                start_at = len(a.frames)
                await a.send(type="resume", message_id=mid, after_seq=0)
                reply = await a.wait_for(lambda f: f["type"] == "error", 10, start_at)
                assert reply["code"] == "not_found" and reply["message_id"] == mid
            unknown = message_id("alice")  # well-formed, never issued: Redis is asked, answers nothing
            assert (await a.cancel(message_id=unknown))["status"] == "not_found"
            await wait_until(lambda: any(unknown in command for command in seen))
        finally:
            await a.close()
            recorder.cancel()
    await r.aclose()
    arguments = {argument for command in seen for argument in command.split()}
    for mid in bogus:
        assert not any(argument == mid or argument.endswith(":" + mid) for argument in arguments), mid


async def test_request_ids_with_colons_do_not_collide_across_sessions(process_cluster: ProcessCluster) -> None:
    (gw,) = await start(process_cluster, 1)
    a = await dev_client(gw, "alice")
    try:
        first = await a.chat("a:b", max_tokens=2, request_id="c")
        second = await a.chat("a", max_tokens=2, request_id="b:c")
        assert first != second
        assert (await a.terminal(first))["type"] == "done" and (await a.terminal(second))["type"] == "done"
        assert await a.chat("a:b", max_tokens=2, request_id="c") == first, "a real duplicate still is one"
    finally:
        await a.close()

