"""The terminal client (`python -m clients.chat`) and the demo page, through their public interfaces:
a real process reading stdin and writing stdout, and the page as the gateway serves it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from protocol.auth import mint_token
from tests.models import smollm2  # noqa: F401  (fixture)
from tests.support import REPO, client, gateway, http_get, t, wait_until, worker
from worker.engines.llama import LlamaEngine
from worker.engines.synthetic import WORDS, SyntheticEngine
from worker.model.choice import ModelFile
from worker.model.smollm2 import NAME

WORD_RE = re.compile(r"\b(?:" + "|".join(WORDS) + r")\b")
CHROMIUM = Path("/usr/bin/chromium")
SECRET = "test-secret-of-at-least-32-bytes-0123456789"


class Cli:
    """A `python -m clients.chat` process whose stdout is read incrementally."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = ""

    async def until(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(t(timeout)):
                while not predicate(self.out):
                    data = await self.proc.stdout.read(4096)
                    if not data:
                        raise AssertionError(f"stdout closed early (rc={await self.proc.wait()}): {self.out!r}")
                    self.out += data.decode(errors="replace")
        except TimeoutError:
            raise AssertionError(f"timed out; stdout so far: {self.out!r}") from None
        return self.out

    async def finish(self, stdin: bytes | None = None, timeout: float = 15.0) -> tuple[int, str, str]:
        """Feed `stdin` (then EOF) and wait for exit: (exit code, all of stdout, stderr)."""
        async with asyncio.timeout(t(timeout)):
            rest, err = await self.proc.communicate(stdin)
        self.out += rest.decode(errors="replace")
        assert self.proc.returncode is not None
        return self.proc.returncode, self.out, err.decode(errors="replace")


@contextlib.asynccontextmanager
async def cli(*args: str, interactive: bool = False) -> AsyncIterator[Cli]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.chat", *args,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE if interactive else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Cli(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def test_one_shot_streams_the_answer_and_exits_0(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url):
        async with cli("--url", url(gw.port), "--user", "alice", "--max-tokens", "5", "hello") as p:
            rc, out, err = await p.finish()
    assert rc == 0, (out, err)
    words = out.split()
    assert len(words) == 5 and set(words) <= set(WORDS), out


async def test_interactive_ctrl_c_cancels_the_streaming_answer_and_the_loop_goes_on(redis_url: str) -> None:
    session = f"cli-{os.urandom(4).hex()}"
    async with gateway(redis_url) as gw, worker(redis_url, engines=[SyntheticEngine(rate=5.0)] * 4):
        args = ("--url", url(gw.port), "--user", "alice", "--session", session, "--max-tokens", "50")
        async with cli(*args, interactive=True) as p:
            assert p.proc.stdin is not None
            p.proc.stdin.write(b"tell me a long story\n")
            await p.proc.stdin.drain()
            await p.until(lambda out: WORD_RE.search(out) is not None)
            p.proc.send_signal(signal.SIGINT)
            out = await p.until(lambda out: "[cancelled]" in out)
            answer = out.split("[cancelled]")[0]
            assert 1 <= len(WORD_RE.findall(answer)) < 50, out
            rc, out, err = await p.finish(b"/quit\n")
        assert rc == 0, (out, err)

        async with client(gw.port, "alice") as c:
            history = await c.request(type="history", session_id=session)
        assert history["type"] == "history", history
        turns = history["turns"]
        assert [(turn["role"], turn["status"]) for turn in turns] == [("user", "complete"), ("assistant", "cancelled")]
        assert turns[1]["text"].split() == WORD_RE.findall(answer)


async def test_one_shot_ctrl_c_exits_130(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url, engines=[SyntheticEngine(rate=5.0)] * 4):
        async with cli("--url", url(gw.port), "--user", "alice", "--max-tokens", "50", "hello") as p:
            await p.until(lambda out: WORD_RE.search(out) is not None)
            p.proc.send_signal(signal.SIGINT)
            rc, out, err = await p.finish()
    assert rc == 130, (out, err)
    assert "[cancelled]" in out


async def test_ctrl_c_before_accepted_cancels_by_session() -> None:
    """Against a stand-in gateway that holds back `accepted` until a cancel arrives: the
    cancel can only name the session, and the client still ends on the terminal event."""
    received: list[dict[str, Any]] = []
    chat_seen = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            received.append(frame)
            if frame["type"] == "chat":
                chat_seen.set()
            elif frame["type"] == "cancel":
                chat = received[0]
                await ws.send(json.dumps({"type": "accepted", "request_id": chat["request_id"],
                                          "session_id": chat["session_id"], "message_id": "m1"}))
                await ws.send(json.dumps({"type": "cancel_result", "status": "cancelling", "message_id": "m1",
                                          "session_id": chat["session_id"]}))
                await ws.send(json.dumps({"type": "cancelled", "message_id": "m1", "seq": 0}))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with cli("--url", url(port), "--session", "s-early", "hello") as p:
            async with asyncio.timeout(t(10)):
                await chat_seen.wait()
            p.proc.send_signal(signal.SIGINT)
            rc, out, err = await p.finish()
    assert rc == 130, (out, err)
    assert "[cancelled]" in out
    assert [f["type"] for f in received] == ["chat", "cancel"], received
    cancel = received[1]
    assert cancel["session_id"] == "s-early" and cancel.get("message_id") is None, cancel


async def test_history_and_clear_commands(redis_url: str) -> None:
    async with gateway(redis_url) as gw, worker(redis_url):
        args = ("--url", url(gw.port), "--user", "alice", "--session", "s-cmd", "--max-tokens", "3")
        async with cli(*args, interactive=True) as p:
            rc, out, err = await p.finish(b"first question\n/history\n/clear\n/history\n/quit\n")
    assert rc == 0, (out, err)
    assert "user: first question" in out
    assert re.search(r"assistant: (\w+ ){3}", out), out
    assert "[history of session s-cmd cleared]" in out
    assert "(session s-cmd has no history)" in out.split("cleared]")[1], out


async def test_token_auth(redis_url: str) -> None:
    async with gateway(redis_url, auth_secret=SECRET) as gw, worker(redis_url):
        token = mint_token(SECRET, "carol", time.time(), 600)
        async with cli("--url", url(gw.port), "--token", token, "--max-tokens", "2", "hi") as p:
            rc, out, err = await p.finish()
        assert rc == 0 and len(out.split()) == 2, (out, err)
        async with cli("--url", url(gw.port), "--token", "forged", "hi") as p:
            rc, out, err = await p.finish()
        assert rc == 1 and "authentication refused" in err, (out, err)


async def test_an_expired_token_is_minted_again_and_the_answer_resumes(redis_url: str, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    async with gateway(redis_url, auth_secret=SECRET) as gw, worker(redis_url, [SyntheticEngine(rate=20.0)] * 4):
        args = ("--url", url(gw.port), "--user", "carol", "--secret-file", str(secret_file), "--token-ttl", "3")
        async with cli(*args, "--max-tokens", "120", "hi") as p:
            rc, out, err = await p.finish(timeout=40)
    assert rc == 0, (out, err)
    assert "token expired" in err, err
    assert len(out.split()) == 120, out


async def test_an_expired_token_is_read_again_from_the_token_file(redis_url: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    async with gateway(redis_url, auth_secret=SECRET) as gw, worker(redis_url, [SyntheticEngine(rate=20.0)] * 4):
        token_file.write_text(mint_token(SECRET, "carol", time.time(), 4) + "\n")
        async with cli("--url", url(gw.port), "--token-file", str(token_file), "--max-tokens", "160", "hi") as p:
            await p.until(lambda out: len(out.split()) >= 2)
            token_file.write_text(mint_token(SECRET, "carol", time.time(), 600))
            rc, out, err = await p.finish(timeout=40)
    assert rc == 0, (out, err)
    assert "token expired" in err, err
    assert len(out.split()) == 160, out


async def test_an_expired_bare_token_stops_the_client_saying_what_to_do(redis_url: str) -> None:
    async with gateway(redis_url, auth_secret=SECRET) as gw, worker(redis_url, [SyntheticEngine(rate=20.0)] * 4):
        token = mint_token(SECRET, "carol", time.time(), 5)
        async with cli("--url", url(gw.port), "--token", token, "--max-tokens", "300", "hi") as p:
            rc, out, err = await p.finish(timeout=30)
    assert rc == 1 and "--token-file" in err and out.split(), (out, err)


async def test_demo_page_is_served_self_contained(redis_url: str) -> None:
    async with gateway(redis_url) as gw:
        status, page = await http_get(gw.port, "/")
    assert status == 200
    assert "<html" in page and 'id="stop"' in page
    for needle in ('"resume"', "after_seq", '"cancel"', '"heartbeat"', '"history"', '"clear_history"', "/ws"):
        assert needle in page, needle
    assert "innerHTML" not in page, "server text must go in through textContent"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no external resources"


# --- the page in a real browser (only where chromium is installed) -----------------------------


class Browser:
    """Headless chromium driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        await self.ws.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == number:
                assert "error" not in reply, reply
                result: dict[str, Any] = reply["result"]
                return result

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 15.0) -> None:
        async def holds() -> bool:
            return bool(await self.js(f"!!({expression})"))

        try:
            await wait_until(holds, timeout)
        except TimeoutError:
            body = await self.js("document.body.innerText")
            raise AssertionError(f"timed out waiting for {expression}; page: {body}") from None


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium in a process group of its own with a throwaway profile. The whole
    group is stopped at the end: its helper processes can outlive the main one and were seen
    writing into the profile while it was being removed."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            await wait_until(lambda: port_file.exists() and "\n" in port_file.read_text(), timeout=30)
            port = port_file.read_text().split()[0]
            listing = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read()
            )
            page = next(target for target in json.loads(listing) if target["type"] == "page")
            async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                yield Browser(ws)
        finally:
            await stop_group(proc)


async def stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the process group `proc` leads, then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), t(10))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class Proxy:
    """A TCP relay in front of the gateway: the page is loaded through it, and `cut()` drops
    every connection at once, as a network failure would (no close frame)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.websockets = 0
        """Connections that opened /ws."""
        self._pipes: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._pipes |= {writer, up_writer}
        first = await reader.read(65536)
        self.websockets += first.startswith(b"GET /ws")
        up_writer.write(first)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._pipes.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    def cut(self) -> None:
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()


async def screenshot(b: Browser, path: Path) -> None:
    shot = await b.call("Page.captureScreenshot", format="png")
    data = base64.b64decode(shot["data"])
    assert data.startswith(b"\x89PNG")
    path.write_bytes(data)


ASSISTANT = "document.querySelectorAll('#transcript > .turn.assistant')"


async def test_demo_page_in_a_browser_with_the_real_model(
    redis_url: str, smollm2: ModelFile, tmp_path: Path
) -> None:
    """The page as a person uses it, on SmolLM2: the model's name, a right answer, a long answer
    that survives a network drop (the page reconnects and resumes), Stop mid-answer, history.
    Screenshots mid-answer and after Stop go to `tmp_path` (docs/demo.png is one of them)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: the browser test must run, and {CHROMIUM} is missing (.ci/run installs it)")
        pytest.skip(f"needs {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    engines = [LlamaEngine(smollm2, n_ctx=2048)]
    async with gateway(redis_url) as gw, worker(redis_url, engines), Proxy(gw.port) as proxy, browser() as b:
        await b.call("Page.enable")
        await b.call("Emulation.setDeviceMetricsOverride", width=900, height=640, deviceScaleFactor=1, mobile=False)
        await b.call("Page.navigate", url=f"http://127.0.0.1:{proxy.port}/")
        await b.until("document.getElementById('conn')?.classList.contains('on')")
        await b.js("""document.getElementById('user').value = 'alice';
                      document.getElementById('session').value = 'web-test';
                      document.querySelector('#settings button').click()""")
        await b.until("document.getElementById('conn').textContent === 'connected as alice'")
        await b.until(f"document.getElementById('model').textContent === 'model: {NAME}'", timeout=20)

        await b.js("""document.getElementById('max-tokens').value = '60';
                      document.getElementById('temperature').value = '0';
                      document.getElementById('text').value = 'What is the capital of Japan?';
                      document.getElementById('send').click()""")
        await b.until(f"{ASSISTANT}[0]?.classList.contains('done')", timeout=60)
        assert "Tokyo" in await b.js(f"{ASSISTANT}[0].querySelector('.body').textContent")

        # A long answer: read mid-way, the network drops, the page reconnects and resumes it.
        await b.js("""document.getElementById('max-tokens').value = '600';
                      document.getElementById('text').value = 'Tell me a long story about a dragon.';
                      document.getElementById('send').click()""")
        story = f"{ASSISTANT}[1].querySelector('.body').textContent"
        await b.until(f"{story}.split(' ').length >= 12", timeout=60)
        await screenshot(b, tmp_path / "demo-mid-answer.png")
        connections = proxy.websockets
        proxy.cut()
        await b.until("!document.getElementById('conn').classList.contains('on')")
        await b.until("document.getElementById('conn').textContent === 'connected as alice'", timeout=30)
        assert proxy.websockets == connections + 1
        at_reconnect = len(await b.js(story))
        await b.until(f"{story}.length > {at_reconnect} + 20", timeout=60)  # live again
        assert await b.js(f"{ASSISTANT}[1].classList.contains('live')"), "the answer ended before Stop"

        await b.js("document.getElementById('stop').click()")
        await b.until(f"{ASSISTANT}[1].classList.contains('cancelled')", timeout=30)
        assert await b.js("document.getElementById('stop').disabled")
        await screenshot(b, tmp_path / "demo-stopped.png")
        shown = await b.js(story)

        # Stop at once, before `accepted` can have arrived: the cancel names the session.
        await b.js("""document.getElementById('text').value = 'stop <b>me</b>';
                      document.getElementById('send').click();
                      document.getElementById('stop').click()""")
        await b.until(f"{ASSISTANT}[2]?.classList.contains('cancelled')", timeout=30)
        user_turn = "document.querySelectorAll('#transcript > .turn.user')[2].querySelector('.body').textContent"
        assert await b.js(user_turn) == "stop <b>me</b>"

        await b.js("document.getElementById('history').click()")
        await b.until("document.querySelector('.history')")
        statuses = await b.js("[...document.querySelectorAll('.history .turn .meta')].map(e => e.textContent)")
        assert statuses == ["", "", "", "cancelled", "", "cancelled"], statuses

        async with client(gw.port, "alice") as c:
            history = await c.request(type="history", session_id="web-test")
    turns = history["turns"]
    assert [turn["status"] for turn in turns] == ["complete", "complete", "complete", "cancelled", "complete", "cancelled"]
    assert turns[3]["text"] == shown and len(shown.split()) >= 12  # nothing lost or repeated across the drop


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (not installed by the tests)")
async def test_demo_page_asks_for_a_new_token_after_4001_and_resumes(redis_url: str) -> None:
    async with gateway(redis_url, auth_secret=SECRET) as gw, worker(redis_url, engines=[SyntheticEngine(rate=20.0)] * 4):
        async with browser() as b:
            await b.call("Page.enable")
            await b.call("Page.navigate", url=f"http://127.0.0.1:{gw.port}/")
            await b.until("document.getElementById('token')")
            short = mint_token(SECRET, "carol", math.ceil(time.time()), 3)  # 3 to 4 seconds
            await b.js(f"""document.getElementById('token').value = '{short}';
                           document.getElementById('session').value = 'web-expiry';
                           document.querySelector('#settings button').click()""")
            await b.until("document.getElementById('conn').textContent === 'connected as carol'")
            await b.js("""document.getElementById('max-tokens').value = '100';
                          document.getElementById('text').value = 'a long one';
                          document.getElementById('send').click()""")
            await b.until("document.getElementById('conn').textContent === 'token expired'", timeout=20)
            assert "paste a new token" in await b.js("document.getElementById('status').textContent")
            assert await b.js("document.getElementById('token').value") == ""
            assert not await b.js("document.querySelector('.turn.assistant.done')"), "expired mid-answer"

            fresh = mint_token(SECRET, "carol", time.time(), 600)
            await b.js(f"""document.getElementById('token').value = '{fresh}';
                           document.querySelector('#settings button').click()""")
            await b.until("document.querySelector('.turn.assistant.done')", timeout=30)
            text = await b.js("document.querySelector('.turn.assistant .body').textContent")
            assert len(text.split()) == 100, text
