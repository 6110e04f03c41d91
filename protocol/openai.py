"""The OpenAI-compatible HTTP edge's wire format, pure (PROTOCOL.md, "OpenAI-compatible HTTP edge").

Requests (`POST /v1/chat/completions`, `POST /v1/responses`) are decoded leniently, as
OpenAI's own API does: fields that only tune what we do not have (`top_p`, `user`, `store`,
`stream_options`...) are ignored; fields whose meaning we cannot honour (several choices,
tools, stop sequences, JSON output, a `previous_response_id`) are refused with a
`bad_request`, so a client never gets a silently different answer. Either becomes a
`Prompt`: the conversation as the worker gets it (`protocol.jobs.ChatTurn`s) and the last
user turn.

Answers are built from the message's log frames (`Chunk`, then one terminal): chat
completions as `chat.completion` / `chat.completion.chunk` objects, responses as `response`
objects and their stream events. A response's events are numbered from its log alone, so
every gateway numbers them alike and `starting_after` resumes anywhere: 0-3 the opening
events, `3 + seq` the delta of chunk `seq`, and the four closing events right after the last
chunk (`closing_numbers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from protocol.errors import BadRequest
from protocol.jobs import ChatTurn
from protocol.messages import Cancelled, Chunk, Done, Error, Terminal
from protocol.validation import MAX_SEED, MAX_TEMPERATURE, MIN_SEED, MIN_TEMPERATURE, Limits

MAX_MESSAGES = 200
"""Messages in one request (a session keeps at most 200 turns too)."""
CONVERSATION_CHARS_FACTOR = 4
"""A whole conversation may be this many times `Limits.max_text_chars` (the worker fits
what its context takes, dropping the oldest exchanges first)."""
OPENING_EVENTS = 4
"""`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`: sequence numbers 0-3."""

# --- requests -----------------------------------------------------------------------------


class _Lenient(msgspec.Struct):
    """Unknown fields are ignored, as OpenAI-compatible servers do (clients send many)."""


class Part(_Lenient):
    type: str
    text: str | None = None


Content = str | list[Part] | None


class ChatMessageIn(_Lenient):
    role: str
    content: Content = None
    tool_calls: list[Any] | None = None


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessageIn]
    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stream: bool | None = False
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None


class InputItem(_Lenient):
    role: str | None = None
    content: Content = None
    type: str | None = None


class ResponsesRequest(_Lenient):
    input: str | list[InputItem]
    model: str = ""
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    """An extension (OpenAI's Responses API has none), as on chat completions."""
    stream: bool | None = False
    background: bool | None = False
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    text: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request, as a job needs it."""

    model: str
    conversation: tuple[ChatTurn, ...]
    """Turns before `text` (system first if any), oldest first."""
    text: str
    max_tokens: int | None
    temperature: float | None
    seed: int | None
    stream: bool
    background: bool = False


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_responses_decoder = msgspec.json.Decoder(ResponsesRequest)
ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
}
TEXT_PARTS = ("text", "input_text", "output_text")


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body must be a JSON object: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None


def _text_of(content: Content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if part.type not in TEXT_PARTS or part.text is None:
            raise BadRequest(f"{where}: only text content is supported, not {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def _refuse_unsupported(**fields: object) -> None:
    for name, value in fields.items():
        if value:
            raise BadRequest(f"{name!r} is not supported by this server")


def _check_sampling(max_tokens: int | None, temperature: float | None, seed: int | None, limits: Limits,
                    tokens_field: str) -> None:
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise BadRequest(f"{tokens_field} must be between 1 and {limits.max_tokens}, got {max_tokens}")
    if temperature is not None and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise BadRequest(
            f"temperature must be between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g} (0: greedy), got {temperature:g}"
        )
    if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be a signed 64-bit integer, got {seed}")


def conversation_of(turns: Sequence[ChatTurn], limits: Limits) -> tuple[tuple[ChatTurn, ...], str]:
    """(the turns before the last user turn, that turn's text), as a chat template wants
    them: system turns first (joined by the worker), then user and assistant alternating
    (a run of one role is joined into one turn). `BadRequest` when the conversation does not
    end with the user, or is too long."""
    if not turns:
        raise BadRequest("messages must not be empty")
    if len(turns) > MAX_MESSAGES:
        raise BadRequest(f"too many messages: {len(turns)}, the limit is {MAX_MESSAGES}")
    total = sum(len(turn.content) for turn in turns)
    if total > limits.max_text_chars * CONVERSATION_CHARS_FACTOR:
        raise BadRequest(
            f"the messages are too long: {total} characters, the limit is {limits.max_text_chars * CONVERSATION_CHARS_FACTOR}"
        )
    system = [turn for turn in turns if turn.role == "system"]
    merged: list[ChatTurn] = []
    for turn in turns:
        if turn.role == "system":
            continue
        if merged and merged[-1].role == turn.role:
            merged[-1] = ChatTurn(turn.role, f"{merged[-1].content}\n\n{turn.content}")
        else:
            merged.append(turn)
    if not merged or merged[-1].role != "user":
        raise BadRequest("the last message (other than system ones) must be the user's")
    text = merged[-1].content
    if not text.strip():
        raise BadRequest("the last user message must not be empty")
    if len(text) > limits.max_text_chars:
        raise BadRequest(f"the last user message is too long: {len(text)} characters, the limit is {limits.max_text_chars}")
    return tuple(system + merged[:-1]), text


def chat_prompt(body: bytes, limits: Limits) -> Prompt:
    """A `POST /v1/chat/completions` body as a `Prompt`, or `BadRequest`."""
    request: ChatCompletionRequest = _decode(_chat_decoder, body)
    if request.n not in (None, 1):
        raise BadRequest("'n' must be 1: this server answers with one choice")
    _refuse_unsupported(stop=request.stop, tools=request.tools, functions=request.functions,
                        logprobs=request.logprobs)
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise BadRequest("only text output is supported ('response_format' of type 'text')")
    turns: list[ChatTurn] = []
    for index, message in enumerate(request.messages):
        role = ROLES.get(message.role)
        if role is None or message.tool_calls:
            raise BadRequest(f"messages[{index}]: only system, developer, user and assistant text messages are supported")
        turns.append(ChatTurn(role, _text_of(message.content, f"messages[{index}]")))
    conversation, text = conversation_of(turns, limits)
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise BadRequest("give max_tokens or max_completion_tokens, not both")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    _check_sampling(max_tokens, request.temperature, request.seed, limits, field)
    return Prompt(request.model, conversation, text, max_tokens, request.temperature, request.seed,
                  bool(request.stream))


def responses_prompt(body: bytes, limits: Limits) -> Prompt:
    """A `POST /v1/responses` body as a `Prompt`, or `BadRequest`."""
    request: ResponsesRequest = _decode(_responses_decoder, body)
    _refuse_unsupported(tools=request.tools, previous_response_id=request.previous_response_id,
                        conversation=request.conversation)
    text_format = (request.text or {}).get("format") or {}
    if isinstance(text_format, dict) and text_format.get("type", "text") != "text":
        raise BadRequest("only text output is supported ('text.format' of type 'text')")
    turns = [ChatTurn("system", request.instructions)] if request.instructions else []
    if isinstance(request.input, str):
        turns.append(ChatTurn("user", request.input))
    else:
        for index, item in enumerate(request.input):
            role = ROLES.get(item.role or "")
            if item.type not in (None, "message") or role is None:
                raise BadRequest(f"input[{index}]: only messages of role system, developer, user or assistant are supported")
            turns.append(ChatTurn(role, _text_of(item.content, f"input[{index}]")))
    conversation, text = conversation_of(turns, limits)
    _check_sampling(request.max_output_tokens, request.temperature, request.seed, limits, "max_output_tokens")
    return Prompt(request.model, conversation, text, request.max_output_tokens, request.temperature, request.seed,
                  bool(request.stream), bool(request.background))


# --- errors -------------------------------------------------------------------------------

ERROR_STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "unauthorized": (401, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "overloaded": (503, "server_error"),
    "unavailable": (503, "server_error"),
    "worker_lost": (503, "server_error"),
    "cancelled": (503, "server_error"),
    "internal": (500, "server_error"),
}
"""Our error code → (HTTP status, OpenAI error type). `cancelled`: a chat completion that
something else stopped (a worker shutting down, a cancel by id)."""


def error_body(code: str, message: str) -> dict[str, Any]:
    """OpenAI's error object; `code` is ours (PROTOCOL.md's error codes)."""
    return {"error": {"message": message, "type": ERROR_STATUS.get(code, (500, "server_error"))[1],
                      "param": None, "code": code}}


# --- chat completions ---------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def sse(data: bytes, event: str | None = None) -> bytes:
    """One server-sent event (`data` is one line of JSON)."""
    return (b"event: " + event.encode() + b"\n" if event else b"") + b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def completion_id(message_id: str) -> str:
    return f"chatcmpl-{message_id}"


def terminal_problem(terminal: Terminal) -> tuple[str, str] | None:
    """(our error code, message) when the terminal is not a normal end, else None."""
    match terminal:
        case Done():
            return None
        case Cancelled():
            return "cancelled", "the generation was stopped before its end (a cancel, or a worker shutting down)"
        case Error(code=code, message=message):
            return code, message
    return "internal", "unknown terminal"


class ChatCompletion:
    """The `chat.completion` and `chat.completion.chunk` objects of one message."""

    def __init__(self, message_id: str, model: str, created: int) -> None:
        self.head = {"id": completion_id(message_id), "created": created, "model": model}
        start = encode({**self.head, "object": "chat.completion.chunk"})[:-1]
        self._delta = (b"data: " + start + b',"choices":[{"index":0,"delta":{"content":',
                       b'},"logprobs":null,"finish_reason":null}]}\n\n')
        """A text delta's event around its JSON string: built once, the same as `_chunk`'s."""

    def _chunk(self, delta: dict[str, str], finish_reason: str | None) -> bytes:
        return sse(encode({**self.head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}))

    def opening(self) -> bytes:
        """The first event: the assistant's role, as OpenAI sends it before any text."""
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str) -> bytes:
        return self._delta[0] + encode(text) + self._delta[1]

    def closing(self, terminal: Terminal) -> bytes:
        """The last events: the finish reason and `[DONE]`; an error object instead of the
        finish reason when the message did not end normally (the SDKs raise it)."""
        problem = terminal_problem(terminal)
        if problem is not None:
            return sse(encode(error_body(*problem))) + SSE_DONE
        assert isinstance(terminal, Done)
        return self._chunk({}, terminal.finish_reason) + SSE_DONE

    def whole(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {**self.head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
             "logprobs": None, "finish_reason": finish_reason}], "usage": None}


# --- responses ----------------------------------------------------------------------------

Status = Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    """What a `response` object says that the log does not."""

    message_id: str
    created_at: int
    model: str
    background: bool
    max_output_tokens: int | None = None
    temperature: float | None = None


def status_of(terminal: Terminal | None, state: str) -> Status:
    """A response's status from its terminal event, or the store's state without one."""
    match terminal:
        case Done(finish_reason="length"):
            return "incomplete"
        case Done():
            return "completed"
        case Cancelled():
            return "cancelled"
        case Error():
            return "failed"
    return "queued" if state == "queued" else "in_progress"


def item_id(message_id: str) -> str:
    return f"msg_{message_id}"


def _item(info: ResponseInfo, text: str, status: Status, with_content: bool = True) -> dict[str, Any]:
    item_status = {"completed": "completed", "queued": "in_progress", "in_progress": "in_progress"}.get(status, "incomplete")
    content = [_part(text)] if with_content else []
    return {"type": "message", "id": item_id(info.message_id), "status": item_status, "role": "assistant",
            "content": content}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(info: ResponseInfo, status: Status, text: str, terminal: Terminal | None = None) -> dict[str, Any]:
    """The `response` object: its one output message holds the text so far."""
    problem = terminal_problem(terminal) if isinstance(terminal, Error) else None
    return {
        "id": info.message_id, "object": "response", "created_at": info.created_at, "status": status,
        "background": info.background, "model": info.model,
        "output": [_item(info, text, status)] if text or terminal is not None else [],
        "error": {"code": "invalid_prompt" if problem[0] == "bad_request" else "server_error", "message": problem[1]}
        if problem else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None, "metadata": {}, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
        "temperature": info.temperature, "top_p": None, "max_output_tokens": info.max_output_tokens, "usage": None,
    }


FINAL_EVENT: dict[Status, str] = {
    "completed": "response.completed", "incomplete": "response.incomplete",
    "cancelled": "response.cancelled", "failed": "response.failed",
}
"""The last event of a response's stream. OpenAI's stream has no event for a cancelled
response; `response.cancelled` is its webhook's name for one."""


def closing_numbers(last_seq: int) -> range:
    """The sequence numbers of the four closing events after `last_seq` chunks."""
    first = OPENING_EVENTS + last_seq
    return range(first, first + 4)


class ResponseStream:
    """A response's stream events, each numbered as described in the module docstring;
    those numbered up to `after` (the client's `starting_after`) are left out."""

    def __init__(self, info: ResponseInfo, after: int = -1) -> None:
        self.info = info
        self.after = after
        kind = "response.output_text.delta"
        self._delta = (f'event: {kind}\ndata: {{"type":"{kind}","sequence_number":'.encode(),
                       b',"item_id":' + encode(item_id(info.message_id)) + b',"output_index":0,"content_index":0,"delta":',
                       b',"logprobs":[]}\n\n')
        """A text delta's event around its number and JSON string (built once, as `_event`'s)."""

    def _event(self, number: int, kind: str, fields: dict[str, Any]) -> bytes:
        if number <= self.after:
            return b""
        return sse(encode({"type": kind, "sequence_number": number, **fields}), kind)

    def opening(self) -> bytes:
        info = self.info
        text_ids = {"item_id": item_id(info.message_id), "output_index": 0, "content_index": 0}
        return b"".join([
            self._event(0, "response.created", {"response": response_object(info, "queued", "")}),
            self._event(1, "response.in_progress", {"response": response_object(info, "in_progress", "")}),
            self._event(2, "response.output_item.added",
                        {"output_index": 0, "item": _item(info, "", "in_progress", with_content=False)}),
            self._event(3, "response.content_part.added", {**text_ids, "part": _part("")}),
        ])

    def delta(self, seq: int, text: str) -> bytes:
        number = OPENING_EVENTS - 1 + seq
        if number <= self.after:
            return b""
        return self._delta[0] + str(number).encode() + self._delta[1] + encode(text) + self._delta[2]

    def closing(self, terminal: Terminal, text: str) -> bytes:
        """The four closing events; `text` is the whole answer."""
        info = self.info
        status = status_of(terminal, "")
        text_ids = {"item_id": item_id(info.message_id), "output_index": 0, "content_index": 0}
        n = closing_numbers(terminal.seq if terminal.seq is not None else 0)
        return b"".join([
            self._event(n[0], "response.output_text.done", {**text_ids, "text": text, "logprobs": []}),
            self._event(n[1], "response.content_part.done", {**text_ids, "part": _part(text)}),
            self._event(n[2], "response.output_item.done", {"output_index": 0, "item": _item(info, text, status)}),
            self._event(n[3], FINAL_EVENT[status], {"response": response_object(info, status, text, terminal)}),
        ])


def log_after(after: int) -> int:
    """The log position a resumed stream reads from, for `starting_after` = `after`: the
    chunks the client holds (0 while it has not seen every opening event)."""
    return max(0, after - (OPENING_EVENTS - 1))


def fold(frames: Sequence[object]) -> tuple[str, Terminal | None]:
    """The text of a message's chunks and its terminal, if it has one (a log's frames)."""
    parts: list[str] = []
    terminal: Terminal | None = None
    for frame in frames:
        match frame:
            case Chunk(text=text):
                parts.append(text)
            case Done() | Cancelled() | Error():
                terminal = frame
    return "".join(parts), terminal
