"""Every Redis key, stream and channel name, defined once.

Lua scripts get their prefixes from here as constants written into their text
(`store.scripts.configured`). Key lifetimes are in `store.settings.Lifetimes`;
docs/ARCHITECTURE.md lists them all.
"""

from __future__ import annotations

NS = "tr:"

JOBS_STREAM = NS + "jobs"
"""Stream of job entries (each names a message; the job itself is in its meta hash); consumer
group `WORKER_GROUP`; trimmed with MAXLEN ~."""
DEAD_STREAM = NS + "jobs:dead"
"""Jobs that killed every worker that took them; trimmed with MAXLEN ~."""
WORKER_GROUP = "workers"
BACKLOG = NS + "backlog"
"""Sorted set: ids of messages accepted and not yet claimed, scored by acceptance time
(admission control: its size is the backlog)."""
CANCEL_CHANNEL_PREFIX = NS + "cancels:"

META_PREFIX = NS + "msg:"
LOG_PREFIX = NS + "log:"
LIVE_PREFIX = NS + "live:"
CANCEL_PREFIX = NS + "cancel:"
GRACE_PREFIX = NS + "grace:"
ATTACH_PREFIX = NS + "attach:"
ACTIVE_PREFIX = NS + "active:"
HISTORY_PREFIX = NS + "hist:"
ANSWERS_PREFIX = NS + "answers:"
REQUEST_PREFIX = NS + "req:"
INSTANCE_PREFIX = NS + "inst:"
ALIVE_PREFIX = NS + "alive:"
GENERATIONS_PREFIX = NS + "gens:"
CONNECTIONS_PREFIX = NS + "conns:"


def meta(message_id: str) -> str:
    """Hash: owner user, session, state (queued|running|done|cancelled|error), worker, attempt,
    last_seq, and the job itself (its prompt) until the message ends."""
    return META_PREFIX + message_id


def log(message_id: str) -> str:
    """Stream of the message's client frames; entry id `N-0` holds position N."""
    return LOG_PREFIX + message_id


def live_channel(message_id: str) -> str:
    """Pub/sub: each frame appended to the log, pushed to watching gateways."""
    return LIVE_PREFIX + message_id


def cancel_key(message_id: str) -> str:
    """The durable cancel flag of a running message."""
    return CANCEL_PREFIX + message_id


def cancel_channel(worker_id: str) -> str:
    """Pub/sub: ids of this worker's messages whose cancel key was just set. One channel per
    worker, so a Stop wakes only the process that runs the job."""
    return CANCEL_CHANNEL_PREFIX + worker_id


def grace_record(message_id: str) -> str:
    """`completed` or `cancelled` for a short window after the message ended."""
    return GRACE_PREFIX + message_id


def attach_lease(message_id: str) -> str:
    """Exists while some connection watches the message (or within the detach grace)."""
    return ATTACH_PREFIX + message_id


def session_scope(user: str, session_id: str) -> str:
    """User names cannot contain ':' so `user:session` is unambiguous."""
    return f"{user}:{session_id}"


def active(user: str, session_id: str) -> str:
    """The message id now queued or running in a session."""
    return ACTIVE_PREFIX + session_scope(user, session_id)


def history(user: str, session_id: str) -> str:
    """List of user turns (`StoredTurn`), bounded by SUBMIT (the oldest turns leave first)."""
    return HISTORY_PREFIX + session_scope(user, session_id)


def answers(user: str, session_id: str) -> str:
    """Hash message id → `StoredAnswer`; fields leave with their user turn."""
    return ANSWERS_PREFIX + session_scope(user, session_id)


def request(user: str, session_id: str, request_id: str) -> str:
    """Idempotency record: request id → message id. Session ids may contain ':' and request
    ids anything, so the session id's length goes in front of it: (`a:b`, `c`) and (`a`,
    `b:c`) are different keys."""
    return f"{REQUEST_PREFIX}{user}:{len(session_id)}:{session_id}:{request_id}"


def generations(user: str) -> str:
    """Sorted set: the user's queued and running message ids, scored by when their message
    key expires (ms). Added by SUBMIT, removed by every terminal; an entry whose message
    vanished without one is pruned once its score has passed."""
    return GENERATIONS_PREFIX + user


def connections(user: str) -> str:
    """Sorted set: the user's open connections (`gateway id:n`), scored by when the entry
    lapses (ms) unless its gateway's heartbeat renews it."""
    return CONNECTIONS_PREFIX + user


def instance(kind: str, instance_id: str) -> str:
    """Hash describing a running gateway or worker, refreshed by its heartbeat."""
    return f"{INSTANCE_PREFIX}{kind}:{instance_id}"


def alive(worker_id: str) -> str:
    """A worker's liveness key: while it exists, the worker's pending jobs are its own."""
    return ALIVE_PREFIX + worker_id
