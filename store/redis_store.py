"""Typed operations on Redis for gateways and workers; each state change is one script call."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import msgspec
import redis.exceptions
import structlog

from protocol.ids import is_message_id, new_message_id, tag_of
from protocol.jobs import Job, StoredAnswer, StoredTurn, answer_decoder, job_decoder, job_encoder, turn_decoder
from protocol.messages import (
    CancelStatus,
    Cancelled,
    Chunk,
    HistoryTurn,
    Terminal,
    TurnStatus,
    encode_text,
    server_decoder,
    state_of,
)
from store import NotReplicated, Unavailable, keys, scripts
from store.cluster import CommandClient
from store.keys import Keyspace
from store.lean import Command, LeanClient, raised
from store.retry import is_unavailable
from store.settings import Lifetimes
from store.topology import AnyRedis, Redis, Topology, ready, single

log = structlog.get_logger("store")


def connect(url: str, *, timeout_s: float | None = 2.0, max_connections: int = 2_000) -> Redis:
    """redis-py's client of one Redis (see `Topology.client`)."""
    client = single(url).client(timeout_s, max_connections)
    assert isinstance(client, Redis)
    return client


@asynccontextmanager
async def guarded() -> AsyncIterator[None]:
    """Turn an unreachable Redis, or one refusing commands for now, into `Unavailable`."""
    try:
        yield
    except redis.exceptions.RedisError as exc:
        if is_unavailable(exc):
            raise Unavailable(f"redis unavailable: {exc}") from exc
        raise
    except OSError as exc:
        raise Unavailable(f"redis unreachable: {exc}") from exc


Ending = Literal["ended", "ended_cancelled", "cancelled_before", "not_ours"]
"""What `Store.finish` did: ended the message as asked; ended it `cancelled` instead (a
cancel raced the end); found it already cancelled by the store; refused (fenced)."""
_ENDINGS: dict[int, Ending] = {1: "ended", 2: "ended_cancelled", 3: "cancelled_before", 0: "not_ours"}

Append = Literal["written", "cancelled", "not_ours", "out_of_order"]
APPEND_RESULTS: dict[int, Append] = {1: "written", 2: "cancelled", 0: "not_ours", 3: "out_of_order"}
"""The APPEND script's reply: written; refused because the message was cancelled (stop
generating); refused because the job is no longer this worker's (fenced); refused because an
earlier chunk is missing (resend in order; `append_outcome` gives the store's last seq)."""


def append_outcome(reply: Any) -> tuple[Append, int | None]:
    """An APPEND reply (error replies raised) as (outcome, the store's last seq when the
    chunk came out of order)."""
    reply = raised(reply)
    if isinstance(reply, list):
        return "out_of_order", int(reply[1])
    return APPEND_RESULTS[int(reply)], None

_SEQ_ZERO = '"seq":0'

WAIT_MS = 1_000
"""How long an end waits for a replica (WAIT) before the worker tries again (`_ended`)."""

LOG_PAGE = 500
"""Log entries per XRANGE: a 10,000-chunk log is never held, or sent by Redis, at once."""


def split_at_seq(frame: str) -> tuple[str, str]:
    """A frame encoded with seq 0, split so that `head + str(seq) + tail` is the same frame
    with another seq (the CANCEL script fills in the last stored seq)."""
    head, found, tail = frame.partition(_SEQ_ZERO)
    if not found or _SEQ_ZERO in tail:
        raise ValueError(f"frame has no single seq 0: {frame}")
    return head + '"seq":', tail


@dataclass(frozen=True, slots=True)
class SubmitResult:
    outcome: Literal["ok", "dup", "busy", "rate_limited", "overloaded"]
    """`rate_limited`: the user has `generations_limit` queued or running already."""
    message_id: str


class Owner(NamedTuple):
    """Who a message belongs to, and its state."""

    user: str
    state: str
    session_id: str


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _script_call(script: Any, script_keys: list[str], args: Sequence[Any]) -> Command:
    """A registered script's EVALSHA, as the lean connection sends it."""
    return ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)


class Store:
    def __init__(
        self,
        client: AnyRedis,
        lifetimes: Lifetimes | None = None,
        cancel_ends: bool = True,
        keyspace: Keyspace | None = None,
        publish: str = "PUBLISH",
        lean: CommandClient | None = None,
        defer_ends: bool = False,
    ) -> None:
        """`cancel_ends`: a cancel of a running message ends it in the store at once (the
        default). False only for the polling baseline of the benchmarks: the cancel just sets
        the key, and the worker that polls it writes the terminal. `keyspace`, `publish`,
        `lean` and `defer_ends`: the deployment's (`open`); the defaults are one Redis with
        one shard. With `defer_ends`, a terminal event is published only once a replica of
        its master has it, if that master has one (`_ended`)."""
        self.redis = client
        self.keyspace = keyspace or Keyspace()
        self.lifetimes = lt = lifetimes or Lifetimes()
        config: dict[str, str | int] = {
            "log_maxlen": lt.log_maxlen,
            "jobs_maxlen": lt.jobs_maxlen,
            "message_ttl": lt.message_ttl_s,
            "ended_ttl": lt.ended_ttl_s,
            "grace_s": lt.grace_s,
            "hist_ttl": lt.history_ttl_s,
            "hist_max": lt.history_max_turns,
            "backlog_limit": max(1, -(-lt.backlog_limit // self.keyspace.shards)),
            "detach_ms": lt.detach_grace_ms,
            "cancel_ends": int(cancel_ends),
            "publish": publish,
            "defer_end": int(defer_ends),
        }
        self._publish = publish
        self._defer_ends = defer_ends
        self._replicated_tags: dict[str, bool] = {}
        """Shard tag → whether its master had a replica at the latest end here (ROLE); at most
        one entry per shard."""
        if lean is None:
            assert isinstance(client, Redis)
            pool = client.connection_pool
            lean = LeanClient(
                dict(pool.connection_kwargs, connection_class=pool.connection_class),
                timeout_s=pool.connection_kwargs.get("socket_timeout") or 2.0,
            )
        self.lean = lean
        """The hot paths (chunk writes, cancels) go through lean pipelined connections."""
        self._submit = client.register_script(scripts.configured(scripts.SUBMIT, config))
        self._cancel = client.register_script(scripts.configured(scripts.CANCEL, config))
        self._claim = client.register_script(scripts.CLAIM)
        self._takeover = client.register_script(scripts.TAKEOVER)
        self._append_text = scripts.configured(scripts.APPEND, config)
        self._append_sha = hashlib.sha1(self._append_text.encode()).hexdigest()
        self._finish = client.register_script(scripts.configured(scripts.FINISH, config))
        self._save_answer = client.register_script(scripts.configured(scripts.SAVE_ANSWER, config))
        self._end_log = client.register_script(scripts.configured(scripts.END_LOG, config))
        self._connect = client.register_script(scripts.CONNECT)

    @classmethod
    def open(
        cls, topology: Topology, lifetimes: Lifetimes | None = None, cancel_ends: bool = True, timeout_s: float = 2.0
    ) -> Store:
        """The store of a deployment: its clients, shards and publish command."""
        return cls(
            topology.client(timeout_s), lifetimes, cancel_ends, topology.keyspace, topology.publish,
            topology.lean(timeout_s), topology.defer_ends,
        )

    async def start(self) -> None:
        """Before the first concurrent calls (see `store.topology.ready`)."""
        await ready(self.redis)

    async def close(self) -> None:
        await self.lean.close()
        await self.redis.aclose()

    async def ping(self) -> bool:
        async with guarded():
            return bool(await self.redis.ping())

    # --- ids and keys ---------------------------------------------------------------------

    def new_message_id(self, user: str) -> str:
        """A fresh id for a message of `user` (it carries the user's shard tag)."""
        return new_message_id(self.keyspace.tag_of_user(user))

    def may_own(self, user: str, message_id: str) -> bool:
        """False for an id the server never issued to `user` (another form, or another
        shard than the user's): such a request is answered `not_found` without touching
        Redis."""
        return is_message_id(message_id) and tag_of(message_id) == self.keyspace.tag_of_user(user)

    def _ending_keys(self, message_id: str, user: str, session_id: str) -> list[str]:
        """KEYS[1..9] of the scripts that end a message (`store.scripts.PRELUDE`)."""
        ks = self.keyspace
        return [
            keys.meta(message_id),
            keys.log(message_id),
            keys.grace_record(message_id),
            keys.cancel_key(message_id),
            ks.backlog(tag_of(message_id)),
            ks.active(user, session_id),
            ks.history(user, session_id),
            ks.answers(user, session_id),
            ks.generations(user),
        ]

    # --- gateway side -------------------------------------------------------------------

    async def submit(self, job: Job, supersede: str = "", generations_limit: int = 0) -> SubmitResult:
        """Queue a job, unless the session is busy (with another message than `supersede`),
        the user has `generations_limit` generations queued or running (0: no limit), or
        the queue is full. The job's id must come from `new_message_id`."""
        ks, mid = self.keyspace, job.message_id
        turn = job_encoder.encode(StoredTurn(message_id=mid, text=job.text))
        request_key = ks.request(job.user, job.session_id, job.request_id) if job.request_id else keys.meta(mid)
        async with guarded():
            outcome, dup = await self._lean_script(
                self._submit,
                [
                    keys.meta(mid),
                    ks.active(job.user, job.session_id),
                    ks.history(job.user, job.session_id),
                    ks.answers(job.user, job.session_id),
                    request_key,
                    ks.jobs(tag_of(mid)),
                    keys.attach_lease(mid),
                    ks.backlog(tag_of(mid)),
                    ks.generations(job.user),
                ],
                args=[
                    mid,
                    job.user,
                    job.session_id,
                    turn,
                    job.request_id or "",
                    job_encoder.encode(job),
                    job.created_ms,
                    supersede,
                    mid,
                    generations_limit,
                ],
            )
        return SubmitResult(cast(Any, _s(outcome)), _s(dup))

    async def cancel(self, message_id: str, user: str, reason: str) -> tuple[CancelStatus, str]:
        """Cancel a message: (status, the worker to notify with `notify_worker`, or ""). The
        script needs the message's session keys, so its owner is read first (one round trip;
        the script checks them again)."""
        if not self.may_own(user, message_id):
            return "not_found", ""
        head, tail = split_at_seq(encode_text(Cancelled(message_id=message_id, seq=0)))
        async with guarded():
            owner, session_id = await self.lean.call("HMGET", keys.meta(message_id), "user", "session_id")
            if owner is None or _s(owner) != user or session_id is None:
                return "not_found", ""
            status, worker, _frame = await self._ended(
                self._cancel,
                self._ending_keys(message_id, user, _s(session_id)),
                [message_id, user, _s(session_id), reason, head, tail, keys.live_channel(message_id)],
                message_id,
                cancel=True,
            )
        return cast(CancelStatus, _s(status)), _s(worker)

    # --- connections per user (quota) ---------------------------------------------------

    async def add_connection(self, user: str, member: str, now_ms: int, lapse_ms: int, limit: int) -> bool:
        """Take one of the user's `limit` connection slots for `member` (gateway id:n) until
        `now_ms + lapse_ms`; False when they are all taken."""
        async with guarded():
            taken = await self._lean_script(
                self._connect, [self.keyspace.connections(user)], [member, now_ms, lapse_ms, limit]
            )
        return bool(taken)

    async def remove_connection(self, user: str, member: str) -> None:
        async with guarded():
            await self.lean.call("ZREM", self.keyspace.connections(user), member)

    async def renew_connections(self, members: dict[str, list[str]], now_ms: int, lapse_ms: int) -> None:
        """Move the lapse of these connections (user → members) to `now_ms + lapse_ms`;
        members already removed stay removed (ZADD XX)."""
        if not members:
            return
        lapse = now_ms + lapse_ms
        commands: list[Command] = []
        for user, names in members.items():
            key = self.keyspace.connections(user)
            commands.append(("ZADD", key, "XX", *[part for name in names for part in (lapse, name)]))
            commands.append(("PEXPIRE", key, lapse_ms))
        async with guarded():
            for reply in await self.lean.execute(commands):
                raised(reply)

    async def _lean_script(self, script: Any, script_keys: list[str], args: Sequence[Any]) -> Any:
        """Run a registered script by EVALSHA on the lean connection; redis-py's slower path
        (which loads it) only when Redis has lost its scripts (NOSCRIPT)."""
        try:
            return await self.lean.call(*_script_call(script, script_keys, args))
        except redis.exceptions.NoScriptError:
            return await script(keys=script_keys, args=args)

    async def _ended(
        self, script: Any, script_keys: list[str], args: list[Any], message_id: str, *, cancel: bool
    ) -> list[Any]:
        """Run a script that may end a message (its last reply: the terminal frame it wrote, or
        ''). With `defer_ends`, the script defers the end (`store.scripts.write_terminal`): it
        goes into the log and out to clients here (`publish_end`) once a replica of the
        message's master has it (WAIT), so no client sees an end a failover could lose (a
        master that has no replica now, as ROLE says, waits for none).

        `cancel`: a Stop's end goes out whatever the wait returns (the Stop must end the
        stream), and only a `cancelled` end does: a worker's end the Stop found still waiting
        for a replica stays held. A worker's end (not `cancel`) that no replica has in time is
        `NotReplicated` (the caller retries; the scripts answer a repeated call as the first)."""
        if not self._defer_ends:
            reply: list[Any] = await self._lean_script(script, script_keys, args)
            return reply
        tag = tag_of(message_id)
        only = ("cancelled",) if cancel else ()
        # a cancel on a master that had a replica last time: its wait and publish ride along
        along = cancel and self._replicated_tags.get(tag, False)
        # ROLE and WAIT go to the script's master
        tail = [("WAIT", 1, WAIT_MS), self._end_log_call(message_id, *only)] if along else []
        batch = [_script_call(script, script_keys, args), ("ROLE",), *tail]
        replies = await self.lean.execute(batch)
        try:
            reply = raised(replies[0])
        except redis.exceptions.NoScriptError:
            await self.redis.script_load(script.script)
            replies = await self.lean.execute(batch)
            reply = raised(replies[0])
        replicas = len(raised(replies[1])[2])
        self._replicated_tags[tag] = bool(replicas)
        if along:
            # published whatever the wait returned (END_LOG did nothing if no `cancelled` end)
            await self._published(replies[3], message_id, only)
            return reply
        if not reply[-1]:  # no end written (the message had ended, or is not ours)
            return reply
        wait = [("EXISTS", script_keys[0]), ("WAIT", 1, WAIT_MS)]  # EXISTS: WAIT goes to its master
        if not replicas:
            await self.publish_end(message_id, *only)
        elif cancel:  # published whatever the wait returns: in the same round trip, after it
            *_, published = await self.lean.execute([*wait, self._end_log_call(message_id, *only)])
            await self._published(published, message_id, only)
        else:
            _, acked = await self.lean.execute(wait)
            if int(raised(acked)) < 1:
                raise NotReplicated(f"the end of {message_id} is on no replica yet")
            await self.publish_end(message_id)
        return reply

    async def _published(self, reply: Any, message_id: str, only: tuple[str, ...]) -> None:
        """END_LOG's reply from a pipeline: run it again (loading it) if Redis lost the script."""
        try:
            raised(reply)
        except redis.exceptions.NoScriptError:
            await self.publish_end(message_id, *only)

    def _end_log_args(self, message_id: str, *state: str) -> tuple[list[str], list[str]]:
        """END_LOG's keys and arguments; with a `state`, it publishes only an end of it."""
        return [keys.meta(message_id), keys.log(message_id)], [keys.live_channel(message_id), *state]

    def _end_log_call(self, message_id: str, *state: str) -> Command:
        """`publish_end`'s script call, for a pipeline."""
        return _script_call(self._end_log, *self._end_log_args(message_id, *state))

    async def publish_end(self, message_id: str, *state: str) -> bool:
        """Put a message's deferred end into its log and out to clients (see `_ended`); with a
        `state`, only an end of it. False when it has none (it ended without deferring, or it
        has not ended)."""
        async with guarded():
            done = await self._lean_script(self._end_log, *self._end_log_args(message_id, *state))
        return bool(done)

    async def notify_worker(self, worker_id: str, message_id: str) -> None:
        """Push a cancel to the worker running the message (its cancel key is already set)."""
        async with guarded():
            await self.lean.call(self._publish, keys.cancel_channel(worker_id), message_id)

    async def active_message(self, user: str, session_id: str) -> str | None:
        async with guarded():
            mid = await self.redis.get(self.keyspace.active(user, session_id))
        return _s(mid) if mid is not None else None

    async def last_message(self, user: str, session_id: str) -> str | None:
        """The session's latest message, for a cancel by session after it ended."""
        async with guarded():
            raw = await self.redis.lindex(self.keyspace.history(user, session_id), -1)
        return turn_decoder.decode(raw).message_id if raw is not None else None

    async def message_owner(self, message_id: str) -> Owner | None:
        """Owner and state of a message, or None when it does not exist (anymore). On the lean
        connection: relays call it while their client may leave, and redis-py (8.1, Python
        3.11) can swallow a cancellation that lands in the middle of a command (the handler of
        a departed HTTP client then waits on for its message instead of stopping it)."""
        async with guarded():
            user, state, session_id = await self.lean.call("HMGET", keys.meta(message_id), "user", "state", "session_id")
        if user is None or state is None or session_id is None:
            return None
        return Owner(_s(user), _s(state), _s(session_id))

    async def read_log_page(self, message_id: str, after_position: int, count: int) -> list[tuple[int, bytes]]:
        """Up to `count` entries of a message's log at positions > `after_position`, in
        order, as (position, frame). Long logs are read a page at a time, and a reader sees
        a trimmed position as a jump in the positions."""
        async with guarded():
            entries = await self.lean.call(
                "XRANGE", keys.log(message_id), f"{after_position + 1}-0", "+", "COUNT", count
            )
        return [(int(entry_id[: entry_id.index(b"-")]), fields[1]) for entry_id, fields in entries]  # fields: [b"f", frame]

    async def read_log(self, message_id: str, after_position: int) -> list[bytes]:
        """Every frame (UTF-8 JSON) at positions > `after_position`, in order, read in pages."""
        frames: list[bytes] = []
        while True:
            page = await self.read_log_page(message_id, after_position, LOG_PAGE)
            frames.extend(frame for _position, frame in page)
            if len(page) < LOG_PAGE:
                return frames
            after_position = page[-1][0]

    async def exists_many(self, names: Sequence[str]) -> list[bool]:
        """Which of these keys exist, in one round trip (one per node on a cluster)."""
        if not names:
            return []
        async with guarded():
            replies = await self.lean.execute([("EXISTS", name) for name in names])
        return [bool(raised(reply)) for reply in replies]

    async def refresh_attach(self, message_ids: Sequence[str], lease_ms: int) -> None:
        if not message_ids:
            return
        async with guarded():
            for reply in await self.lean.execute([("SET", keys.attach_lease(mid), 1, "PX", lease_ms) for mid in message_ids]):
                raised(reply)

    async def history(self, user: str, session_id: str, before: str | None = None) -> list[HistoryTurn]:
        """The session's turns, oldest first; with `before`, only those of earlier messages
        (one round trip unless an earlier answer is still in flight)."""
        ks = self.keyspace
        async with guarded():
            raw_turns, raw_answers = map(
                raised,
                await self.lean.execute(
                    [("LRANGE", ks.history(user, session_id), 0, -1), ("HGETALL", ks.answers(user, session_id))]
                ),
            )
            answers = {
                _s(raw_answers[i]): answer_decoder.decode(raw_answers[i + 1]) for i in range(0, len(raw_answers), 2)
            }
            turns: list[HistoryTurn] = []
            for raw in raw_turns:
                stored = turn_decoder.decode(raw)
                if stored.message_id == before:
                    break
                turns.append(HistoryTurn(stored.message_id, "user", stored.text, "complete"))
                answer = answers.get(stored.message_id) or await self._in_flight(stored.message_id)
                if answer is not None:
                    status = cast(TurnStatus, answer.status)
                    turns.append(HistoryTurn(stored.message_id, "assistant", answer.text, status))
        return turns

    async def _in_flight(self, message_id: str) -> StoredAnswer | None:
        """A message with no stored answer yet: its partial text if it is still streaming."""
        state = await self.lean.call("HGET", keys.meta(message_id), "state")
        if state not in (b"queued", b"running", b"cancelled"):
            return None
        status = "cancelled" if state == b"cancelled" else "streaming"
        return StoredAnswer(text=await self.partial_text(message_id), status=status)

    async def partial_text(self, message_id: str) -> str:
        """The text of every chunk in a message's log so far."""
        frames = await self.read_log(message_id, 0)
        return "".join(e.text for e in map(server_decoder.decode, frames) if isinstance(e, Chunk))

    async def clear_history(self, user: str, session_id: str) -> None:
        async with guarded():
            await self.lean.call(
                "DEL", self.keyspace.history(user, session_id), self.keyspace.answers(user, session_id)
            )

    # --- worker side --------------------------------------------------------------------

    async def claim(self, message_id: str, worker_id: str, now_ms: int) -> tuple[int, Job] | None:
        """Move a queued message to running: (attempt number, job), or None if not to run."""
        async with guarded():
            outcome, attempt, job = await self._lean_script(
                self._claim,
                [keys.meta(message_id), self.keyspace.backlog(tag_of(message_id))],
                [worker_id, now_ms, message_id],
            )
        return (int(attempt), job_decoder.decode(job)) if _s(outcome) == "run" else None

    async def takeover(self, message_id: str, dead: str, worker_id: str) -> tuple[int, int, Job] | None:
        """(attempt, last_seq, job) once a dead worker's running message is ours; else None."""
        async with guarded():
            outcome, attempt, last_seq, job = await self._lean_script(
                self._takeover, [keys.meta(message_id)], [dead, worker_id]
            )
        if _s(outcome) != "run":
            return None
        return int(attempt), int(last_seq), job_decoder.decode(job)

    async def load_append_script(self) -> None:
        """Load APPEND (on every master of a cluster), so chunk batches send bare EVALSHA
        (redis-py's registered scripts cost a SCRIPT EXISTS round trip per pipeline)."""
        async with guarded():
            await self.redis.script_load(self._append_text)

    def append_command(self, message_id: str, worker_id: str, attempt: int, seq: int, frame: str) -> Command:
        """A fenced chunk write, for a batch on the lean connection (the worker batches the
        chunks of all its jobs). Its reply is an `APPEND_RESULTS` key; NOSCRIPT means Redis
        lost its scripts: `load_append_script`, then retry."""
        return (
            "EVALSHA",
            self._append_sha,
            2,
            keys.meta(message_id),
            keys.log(message_id),
            worker_id,
            attempt,
            seq,
            frame,
            keys.live_channel(message_id),
        )

    async def finish(
        self,
        message_id: str,
        worker_id: str,
        attempt: int,
        terminal: Terminal,
        text: str,
        *,
        user: str,
        session_id: str,
    ) -> Ending:
        """Write the terminal event (fenced), right after the last chunk the store accepted
        (its `seq` is set from the store's). A `done` becomes `cancelled` when a cancel was
        accepted meanwhile; a message the store already ended `cancelled` only gets its
        answer's text (`text`: the chunks the store accepted). `user` and `session_id`: the
        message's (its end frees the user's generation slot and updates the session)."""
        state = state_of(terminal)
        head, tail = split_at_seq(encode_text(msgspec.structs.replace(terminal, seq=0)))
        cancelled_head, cancelled_tail = split_at_seq(encode_text(Cancelled(message_id=message_id, seq=0)))
        history_status = {"done": "complete", "cancelled": "cancelled", "error": "error"}[state]
        grace_status = "cancelled" if state == "cancelled" else "completed"
        async with guarded():
            ok, _frame = await self._ended(
                self._finish,
                self._ending_keys(message_id, user, session_id),
                [
                    message_id,
                    worker_id,
                    attempt,
                    state,
                    head,
                    tail,
                    text,
                    history_status,
                    grace_status,
                    cancelled_head,
                    cancelled_tail,
                    keys.live_channel(message_id),
                ],
                message_id,
                cancel=False,
            )
        return _ENDINGS[int(ok)]

    async def ack(self, message_id: str, entry_id: bytes) -> None:
        """Acknowledge a message's job stream entry: its job ended here (or was not ours)."""
        await self.ack_in(self.keyspace.jobs(tag_of(message_id)), entry_id)

    async def ack_in(self, stream: str, entry_id: bytes) -> None:
        """Acknowledge an entry of a job stream."""
        async with guarded():
            await self.lean.call("XACK", stream, keys.WORKER_GROUP, entry_id)

    async def save_cancelled_answer(self, message_id: str, text: str, user: str, session_id: str) -> None:
        """History text of a message cancelled in the store, unless its worker saved it."""
        async with guarded():
            await self._lean_script(
                self._save_answer, self._ending_keys(message_id, user, session_id), [message_id, text]
            )

    async def session_turns(self, user: str, session_id: str, before: str) -> list[HistoryTurn]:
        """A session's complete and cancelled turns with text, before message `before`, oldest first."""
        turns = await self.history(user, session_id, before)
        return [turn for turn in turns if turn.status in ("complete", "cancelled") and turn.text]
