"""A small terminal client of the gateway (PROTOCOL.md).

    python -m clients.chat [--url ws://127.0.0.1:8000/ws] [--user NAME]
                           [--token TOKEN | --token-file PATH | --secret-file PATH]
                           [--session ID] [--max-tokens N] [TEXT]

With TEXT: one chat, the answer streamed to stdout; exit 0 on `done`, 130 when cancelled
(Ctrl-C), 1 on an error. Without TEXT: a prompt loop, one chat per line of stdin, all in one
session; Ctrl-C stops the answer that is streaming, Ctrl-C at the prompt exits. Commands:
/history, /clear, /quit.

A dropped connection is not a Stop: the client reconnects with backoff and resumes the
answer after the last chunk it printed (or re-sends the chat with the same request_id when
it was not accepted yet; the gateway deduplicates it).

Tokens expire: the gateway closes the connection with 4001, and the client reconnects with
a new token and resumes. It mints one itself when it has the auth secret (`--secret-file`
or TOKENRELAY_AUTH_SECRET, with `--user`), or reads `--token-file` again (keep the file
fresh, e.g. from cron with `python -m gateway token`). With a bare `--token` it stops and
says so.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import msgspec
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from protocol.auth import DEFAULT_TTL_S, mint_token
from protocol.errors import AuthError
from protocol.messages import (
    Auth,
    Cancel,
    Chat,
    ClearHistory,
    ClientMessage,
    History,
    Resume,
    encode_text,
)

T = TypeVar("T")
Event = dict[str, Any]
Outcome = Literal["done", "cancelled", "error", "abort"]

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130
PROMPT = "> "
RECONNECT_ATTEMPTS = 8
CLOSE_POLICY = 1008
CLOSE_TOKEN_EXPIRED = 4001
SECRET_ENV = "TOKENRELAY_AUTH_SECRET"

# Internal events share the queue with the server's frames; their types start with "_".
SIGINT_EVENT: Event = {"type": "_sigint"}
EOF_EVENT: Event = {"type": "_eof"}


class Fatal(Exception):
    """The client cannot go on (auth refused, gateway unreachable)."""


class Interrupted(Exception):
    """Ctrl-C while nothing could be cancelled: leave."""


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class Credentials:
    """What the client authenticates with, and how it gets a new token after 4001: minted
    with the secret, read again from the token file, or none (a bare token: `Fatal`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.user: str | None = args.user
        self.secret: str | None = read_secret(args.secret_file)
        self.token_file: str | None = args.token_file
        self.ttl_s: int = args.token_ttl
        self.token: str | None = args.token
        if self.token_file is not None or self.token is None:
            self.renew()

    def renew(self) -> None:
        """A token from the token file, else one minted with the secret (if either)."""
        if self.token_file is not None:
            try:
                with open(self.token_file, encoding="utf-8") as file:
                    self.token = file.read().strip()
            except OSError as exc:
                raise Fatal(f"cannot read the token file {self.token_file}: {exc.strerror}") from None
        elif self.secret is not None and self.user is not None:
            try:
                self.token = mint_token(self.secret, self.user, time.time(), self.ttl_s)
            except AuthError as exc:
                raise Fatal(str(exc)) from None

    def expired(self) -> None:
        """The gateway closed the connection with 4001: get a new token, or give up."""
        if self.token_file is None and (self.secret is None or self.user is None):
            raise Fatal(f"the token expired; pass --token-file PATH (read again on expiry) or give the secret "
                        f"(--secret-file or {SECRET_ENV}) and --user so the client can mint a new one")
        self.renew()

    def auth(self) -> Auth | None:
        """The `auth` message: the token, with the user name too (a gateway without a
        secret takes the name and ignores the token)."""
        if self.token or self.user:
            return Auth(token=self.token or None, user=self.user)
        return None


class ChatClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.credentials = Credentials(args)
        self.token_expired = False
        self.session: str = args.session
        self.max_tokens: int | None = args.max_tokens
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.typed_ahead: deque[str] = deque()
        self.stdin_closed = False
        self.ws: ClientConnection | None = None
        self.conn_no = 0
        self._reader: asyncio.Task[None] | None = None
        self._blocking: asyncio.Future[Any] | None = None
        self._blocking_interrupted = False

    # --- connection -----------------------------------------------------------------------

    def on_sigint(self) -> None:
        """While connecting, Ctrl-C abandons the attempt; otherwise it is an event."""
        if self._blocking is not None and not self._blocking.done():
            self._blocking_interrupted = True
            self._blocking.cancel()
        else:
            self.events.put_nowait(SIGINT_EVENT)

    async def _interruptible(self, aw: Awaitable[T]) -> T:
        task = asyncio.ensure_future(aw)
        self._blocking, self._blocking_interrupted = task, False
        try:
            return await task
        except asyncio.CancelledError:
            if self._blocking_interrupted:
                raise Interrupted from None
            raise
        finally:
            self._blocking = None

    async def _open(self) -> None:
        """Connect and authenticate; then a reader task feeds every frame into `events`."""
        try:
            ws = await connect(self.url, open_timeout=10, max_size=4 * 1024 * 1024)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionError(f"cannot connect to {self.url}: {exc}") from exc
        if self.token_expired:
            self.credentials.expired()
            self.token_expired = False
        auth = self.credentials.auth()
        if auth is not None:
            try:
                await ws.send(encode_text(auth))
                async with asyncio.timeout(15):
                    reply = decode(await ws.recv())
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == CLOSE_POLICY:
                    raise Fatal(f"authentication refused: {exc.rcvd.reason or 'policy violation'}") from None
                raise ConnectionError(f"connection closed during auth: {exc}") from exc
            except TimeoutError:
                await ws.close()
                raise ConnectionError("no answer to auth") from None
            if reply.get("type") != "auth_ok":
                await ws.close()
                raise Fatal(f"authentication refused: {describe_error(reply)}")
        self.ws = ws
        self.conn_no += 1
        self._reader = asyncio.create_task(self._read(ws, self.conn_no))

    async def _read(self, ws: ClientConnection, conn_no: int) -> None:
        try:
            async for raw in ws:
                try:
                    frame = decode(raw)
                except ValueError:
                    err(f"ignoring a malformed frame: {raw[:80]!r}")
                    continue
                self.events.put_nowait(frame)
        except ConnectionClosed:
            pass
        if ws.close_code == CLOSE_TOKEN_EXPIRED:
            err("[the token expired; reconnecting with a new one]")
            self.token_expired = True
        self.events.put_nowait(
            {"type": "_closed", "conn": conn_no, "code": ws.close_code, "reason": ws.close_reason}
        )

    async def connect(self, attempts: int = RECONNECT_ATTEMPTS) -> None:
        """(Re)connect with exponential backoff; Ctrl-C gives up (`Interrupted`)."""
        await self.disconnect()
        delay = 0.25
        for attempt in range(1, attempts + 1):
            try:
                await self._interruptible(self._open())
                return
            except ConnectionError as exc:
                if attempt == attempts:
                    raise Fatal(str(exc)) from None
                err(f"[{exc}; retrying in {delay:g}s]")
            await self._interruptible(asyncio.sleep(delay))
            delay = min(delay * 2, 5.0)

    async def disconnect(self) -> None:
        ws, reader = self.ws, self._reader
        self.ws, self._reader = None, None
        if ws is not None:
            await ws.close()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)

    async def send(self, message: ClientMessage) -> None:
        """Send on the current connection. Without one, drop it: the callers reconnect and
        re-send (`attach`) when they see the connection gone."""
        if self.ws is None:
            return
        try:
            await self.ws.send(encode_text(message))
        except ConnectionClosed:
            pass  # the reader reports the close as a `_closed` event

    async def ensure_connected(self, attached: int) -> bool:
        """Reconnect if the connection is gone; True when the caller must (re-)send its request
        because the current connection is not the one it was sent on (`attached`)."""
        if self.ws is None:
            await self.connect()
        return attached != self.conn_no

    def _common(self, event: Event) -> bool:
        """Handle events that mean the same in every state; True if `event` was consumed."""
        kind = event["type"]
        if kind == "_line":
            self.typed_ahead.append(event["text"])
        elif kind == "_eof":
            self.stdin_closed = True
        elif kind == "_closed":
            stale: bool = event["conn"] != self.conn_no
            if not stale:
                self.ws = None
            return stale  # a stale close is consumed, a current one is not
        elif kind == "error" and "message_id" not in event and "request_id" not in event:
            err(f"[{describe_error(event)}]")
        elif kind in ("heartbeat_ack", "auth_ok"):
            pass
        else:
            return False
        return True

    # --- one generation -------------------------------------------------------------------

    async def converse(self, text: str) -> Outcome:
        """Send one chat and stream its answer to stdout until its terminal event."""
        rid = f"cli-{uuid.uuid4().hex[:16]}"
        chat = Chat(session_id=self.session, text=text, request_id=rid, max_tokens=self.max_tokens)
        mid: str | None = None
        last_seq = 0
        stopping = False
        attached = 0
        while True:
            if await self.ensure_connected(attached):
                attached = self.conn_no
                # Not accepted yet: the same request_id answers with the same message_id.
                await self.send(Resume(message_id=mid, after_seq=last_seq) if mid else chat)
                if stopping:
                    await self.send(self._cancel(mid))
            event = await self.events.get()
            kind = event["type"]
            if kind == "_closed" and event["conn"] == self.conn_no:
                err("[connection lost; reconnecting]")
                self.ws = None
            elif self._common(event):
                continue
            elif kind == "_sigint":
                if stopping:
                    err("[gave up waiting for the cancellation]")
                    return "abort"
                stopping = True
                err("[stopping]")
                await self.send(self._cancel(mid))
            elif kind == "accepted" and event.get("request_id") == rid:
                mid = event["message_id"]
            elif kind == "error" and mid is None and event.get("request_id") == rid:
                err(f"[refused: {describe_error(event)}]")
                return "error"
            elif mid is None or event.get("message_id") != mid:
                continue  # another message's frame (or a late cancel_result)
            elif kind == "chunk":
                seq = int(event["seq"])
                if seq == last_seq + 1:
                    out(event["text"])
                    last_seq = seq
                elif seq > last_seq + 1:  # a gap: ask for everything after what we hold
                    await self.send(Resume(message_id=mid, after_seq=last_seq))
            elif kind in ("done", "cancelled") and int(event["seq"]) > last_seq:
                await self.send(Resume(message_id=mid, after_seq=last_seq))  # chunks are missing
            elif kind == "done":
                out("\n")
                return "done"
            elif kind == "cancelled":
                out("\n[cancelled]\n")
                return "cancelled"
            elif kind == "error":
                out("\n")
                err(f"[error: {describe_error(event)}]")
                return "error"
            elif kind == "cancel_result" and event["status"] != "cancelling":
                err(f"[cancel: {event['status']}]")

    def _cancel(self, message_id: str | None) -> Cancel:
        if message_id is not None:
            return Cancel(message_id=message_id)
        return Cancel(session_id=self.session)

    # --- requests with one reply ------------------------------------------------------------

    async def request(self, message: History | ClearHistory, reply_type: str) -> Event | None:
        attached = 0
        while True:
            if await self.ensure_connected(attached):
                attached = self.conn_no
                await self.send(message)
            event = await self.events.get()
            kind = event["type"]
            if kind == "_closed" and event["conn"] == self.conn_no:
                self.ws = None
            elif kind == "_sigint":
                return None
            elif kind == "error" and "message_id" not in event and "request_id" not in event:
                err(f"[{describe_error(event)}]")
                return None
            elif self._common(event):
                continue
            elif kind == reply_type and event.get("session_id") == message.session_id:
                return event

    async def show_history(self) -> None:
        reply = await self.request(History(session_id=self.session), "history")
        if reply is None:
            return
        turns: list[dict[str, Any]] = reply["turns"]
        if not turns:
            out(f"(session {self.session} has no history)\n")
        for turn in turns:
            status = "" if turn["status"] == "complete" else f" [{turn['status']}]"
            out(f"{turn['role']}{status}: {turn['text']}\n")

    async def clear_history(self) -> None:
        if await self.request(ClearHistory(session_id=self.session), "history_cleared") is not None:
            out(f"[history of session {self.session} cleared]\n")

    # --- modes ------------------------------------------------------------------------------

    async def one_shot(self, text: str) -> int:
        outcome = await self.converse(text)
        return {"done": EXIT_OK, "error": EXIT_ERROR}.get(outcome, EXIT_INTERRUPTED)

    async def next_line(self) -> str | None:
        """The next line of stdin; None at end of input; `Interrupted` on Ctrl-C."""
        out(PROMPT)
        while not self.typed_ahead:
            if self.stdin_closed:
                return None
            event = await self.events.get()
            if event["type"] == "_sigint":
                raise Interrupted
            self._common(event)
        return self.typed_ahead.popleft()

    async def loop(self) -> int:
        start_stdin_reader(asyncio.get_running_loop(), self.events)
        err(f"[session {self.session}; Ctrl-C stops an answer; /history /clear /quit]")
        while True:
            line = await self.next_line()
            if line is None:
                out("\n")
                return EXIT_OK
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return EXIT_OK
            if line == "/history":
                await self.show_history()
            elif line == "/clear":
                await self.clear_history()
            elif line.startswith("/"):
                err(f"[unknown command {line.split()[0]}; commands: /history /clear /quit]")
            elif await self.converse(line) == "abort":
                return EXIT_INTERRUPTED

    async def run(self, text: str | None) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.on_sigint)
        try:
            await self.connect()
            return await (self.one_shot(text) if text is not None else self.loop())
        except Interrupted:
            out("\n")
            return EXIT_INTERRUPTED
        except Fatal as exc:
            err(f"error: {exc}")
            return EXIT_ERROR
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            await self.disconnect()


def decode(raw: str | bytes) -> Event:
    try:
        frame = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ValueError("not a message")
    return frame


def describe_error(frame: Event) -> str:
    if frame.get("type") != "error":
        return f"unexpected {frame.get('type')} frame"
    return f"{frame.get('code')}: {frame.get('message')}"


def start_stdin_reader(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> None:
    """Lines of stdin as `_line` events, from a daemon thread.

    Raw `os.read` on fd 0 leaves the file's blocking mode alone (a terminal shares it with
    stdout) and holds no lock of `sys.stdin` that could block interpreter shutdown."""

    def post(event: Event) -> bool:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client is exiting
            return False
        return True

    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            pending += decoder.decode(data, final=not data)
            *lines, pending = pending.split("\n")
            for line in lines:
                if not post({"type": "_line", "text": line}):
                    return
            if not data:
                if pending:
                    post({"type": "_line", "text": pending})
                post(EOF_EVENT)
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()


def read_secret(path: str | None) -> str | None:
    """The auth secret from a file, else from the environment (never from a command line)."""
    if path is None:
        return os.environ.get(SECRET_ENV) or None
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip() or None
    except OSError as exc:
        raise Fatal(f"cannot read the secret file {path}: {exc.strerror}") from None


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.chat", description="chat with a tokenrelay gateway")
    p.add_argument("--url", default=os.environ.get("TOKENRELAY_URL", "ws://127.0.0.1:8000/ws"))
    p.add_argument("--user", help="user name (development mode, no auth secret)")
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=os.environ.get("TOKENRELAY_TOKEN"),
                        help="a token from `python -m gateway token` (once it expires the client stops)")
    tokens.add_argument("--token-file", metavar="PATH", help="read the token from this file, again after it expires")
    tokens.add_argument("--secret-file", metavar="PATH",
                        help=f"the auth secret (default: ${SECRET_ENV}): mint tokens for --user, "
                        "new ones as they expire")
    p.add_argument("--token-ttl", type=positive_int, default=DEFAULT_TTL_S, help="lifetime of minted tokens, seconds")
    p.add_argument("--session", default=f"cli-{uuid.uuid4().hex[:8]}", help="session id (default: a random one)")
    p.add_argument("--max-tokens", type=positive_int, help="answer length limit (default: the gateway's)")
    p.add_argument("text", nargs="*", help="send this one message and exit (default: a prompt loop)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    text = " ".join(args.text).strip() or None
    if args.text and text is None:
        parser().error("TEXT is empty")
    if args.secret_file and not args.user:
        parser().error("--secret-file needs --user (the user to mint tokens for)")
    try:
        return uvloop.run(ChatClient(args).run(text))
    except Fatal as exc:
        err(f"error: {exc}")
        return EXIT_ERROR
    except InvalidURI as exc:
        err(f"error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
