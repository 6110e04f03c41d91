"""Every Redis key, stream and channel name, defined once.

Keys that one script touches share one hash slot (Redis Cluster runs a script on one node):
a user's messages, sessions and quotas, and the job stream and backlog of the user's shard,
all carry the shard's hash tag `{s<k>x<n>}`. A message id ends with its tag
(`protocol.ids`), so a message's keys are found from its id alone; a user's tag comes from the
user name and the number of shards (`Keyspace`), which every process of a deployment shares
(`tr:config`). Keys no script touches (instance records, liveness, the dead-letter stream) are
plain. Lua scripts get every key in KEYS; key lifetimes are in `store.settings.Lifetimes`;
docs/ARCHITECTURE.md lists them all.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

from redis.crc import key_slot

from protocol.ids import tag_of

NS = "tr:"
SLOTS = 16384
MAX_SHARDS = 1024

WORKER_GROUP = "workers"
CONFIG = NS + "config"
"""Hash: `shards`, the number every gateway and worker of the deployment must use."""
DEAD_STREAM = NS + "jobs:dead"
"""Jobs that killed every worker that took them; trimmed with MAXLEN ~."""
INSTANCE_PREFIX = NS + "inst:"
ALIVE_PREFIX = NS + "alive:"


@functools.cache
def shard_tags(shards: int) -> tuple[str, ...]:
    """One hash tag per shard, each hashing into its own even range of slots, so that shards
    spread evenly over masters holding even slot ranges (as `redis-cli --cluster create`
    makes them)."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    tags = []
    for shard in range(shards):
        low, high = shard * SLOTS // shards, (shard + 1) * SLOTS // shards
        n = 0
        while not low <= key_slot(f"s{shard}x{n}".encode()) < high:
            n += 1
        tags.append(f"s{shard}x{n}")
    return tuple(tags)


def _tagged(tag: str, kind: str, rest: str = "") -> str:
    return f"{NS}{{{tag}}}:{kind}" + (f":{rest}" if rest else "")


# --- a message's keys: the tag is in its id ----------------------------------------------


def meta(message_id: str) -> str:
    """Hash: owner user, session, state (queued|running|done|cancelled|error), worker, attempt,
    last_seq, and the job itself (its prompt) until the message ends."""
    return _tagged(tag_of(message_id), "msg", message_id)


def log(message_id: str) -> str:
    """Stream of the message's client frames; entry id `N-0` holds position N."""
    return _tagged(tag_of(message_id), "log", message_id)


def live_channel(message_id: str) -> str:
    """Pub/sub (sharded on Redis 7 clusters): each frame appended to the log, pushed to the
    gateways that watch the message."""
    return _tagged(tag_of(message_id), "live", message_id)


META_PATTERN = NS + "{*}:msg:*"
"""SCAN MATCH pattern of every message's meta hash (tools; the product never scans)."""


def message_of_key(key: bytes | str) -> str:
    """The message id a key of a message is named after."""
    text = key.decode() if isinstance(key, bytes) else key
    return text.rsplit(":", 1)[1]


def message_of_live_channel(channel: bytes) -> str:
    """The message id a live channel is named after."""
    return channel.rsplit(b":", 1)[1].decode()


def cancel_key(message_id: str) -> str:
    """The durable cancel flag of a running message."""
    return _tagged(tag_of(message_id), "cancel", message_id)


def grace_record(message_id: str) -> str:
    """`completed` or `cancelled` for a short window after the message ended."""
    return _tagged(tag_of(message_id), "grace", message_id)


def attach_lease(message_id: str) -> str:
    """Exists while some connection watches the message (or within the detach grace)."""
    return _tagged(tag_of(message_id), "attach", message_id)


# --- workers and instances -----------------------------------------------------------------


def cancel_channel(worker_id: str) -> str:
    """Pub/sub: ids of this worker's messages whose cancel key was just set. One channel per
    worker, so a Stop wakes only the process that runs the job; its own tag, so on a cluster
    it lives on one node."""
    return f"{NS}{{w:{worker_id}}}:cancels"


def instance(kind: str, instance_id: str) -> str:
    """Hash describing a running gateway or worker, refreshed by its heartbeat."""
    return f"{INSTANCE_PREFIX}{kind}:{instance_id}"


def alive(worker_id: str) -> str:
    """A worker's liveness key: while it exists, the worker's pending jobs are its own."""
    return ALIVE_PREFIX + worker_id


# --- a deployment's shards: users, sessions, job streams -------------------------------------


@dataclass(frozen=True)
class Keyspace:
    """The keys whose slot depends on the number of shards."""

    shards: int = 1
    tags: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", shard_tags(self.shards))

    def tag_of_user(self, user: str) -> str:
        """The tag of every key of `user` (and of the ids of their messages)."""
        return self.tags[zlib.crc32(user.encode()) % self.shards]

    def jobs(self, tag: str) -> str:
        """A shard's stream of job entries (each names a message; the job itself is in its meta
        hash); consumer group `WORKER_GROUP`; trimmed with MAXLEN ~."""
        return _tagged(tag, "jobs")

    def job_streams(self) -> list[str]:
        return [self.jobs(tag) for tag in self.tags]

    def backlog(self, tag: str) -> str:
        """A shard's sorted set of messages accepted and not yet claimed, scored by acceptance
        time (admission control: its size is the shard's backlog)."""
        return _tagged(tag, "backlog")

    def backlogs(self) -> list[str]:
        return [self.backlog(tag) for tag in self.tags]

    def active(self, user: str, session_id: str) -> str:
        """The message id now queued or running in a session. User names cannot contain ':'
        so `user:session` is unambiguous."""
        return _tagged(self.tag_of_user(user), "active", f"{user}:{session_id}")

    def history(self, user: str, session_id: str) -> str:
        """List of user turns (`StoredTurn`), bounded by SUBMIT (the oldest turns leave first)."""
        return _tagged(self.tag_of_user(user), "hist", f"{user}:{session_id}")

    def answers(self, user: str, session_id: str) -> str:
        """Hash message id → `StoredAnswer`; fields leave with their user turn."""
        return _tagged(self.tag_of_user(user), "answers", f"{user}:{session_id}")

    def request(self, user: str, session_id: str, request_id: str) -> str:
        """Idempotency record: request id → message id. Session ids may contain ':' and
        request ids anything, so the session id's length goes in front of it: (`a:b`, `c`) and
        (`a`, `b:c`) are different keys."""
        return _tagged(self.tag_of_user(user), "req", f"{user}:{len(session_id)}:{session_id}:{request_id}")

    def generations(self, user: str) -> str:
        """Sorted set: the user's queued and running message ids, scored by when their message
        key expires (ms). Added by SUBMIT, removed by every terminal; an entry whose message
        vanished without one is pruned once its score has passed."""
        return _tagged(self.tag_of_user(user), "gens", user)

    def connections(self, user: str) -> str:
        """Sorted set: the user's open connections (`gateway id:n`), scored by when the entry
        lapses (ms) unless its gateway's heartbeat renews it."""
        return _tagged(self.tag_of_user(user), "conns", user)
