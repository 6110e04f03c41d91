"""Message ids: their one format, minted and checked here.

`m`, the creation time in milliseconds as 11 hex digits, 64 random bits as 16 hex digits, a
dot, then the tag of the owner's shard (`store.keys`): time-ordered, unguessable, and naming the
Redis hash slot of every key of the message. A `message_id` from a client that does not have
this exact form was never issued, so it is answered `not_found` without building a Redis key
from it (PROTOCOL.md, "Ids").
"""

from __future__ import annotations

import os
import re
import time

TAG_PATTERN = r"s[0-9]{1,4}x[0-9]{1,7}"
MESSAGE_ID_RE = re.compile(rf"m[0-9a-f]{{11}}[0-9a-f]{{16}}\.(?P<tag>{TAG_PATTERN})")
TAG_RE = re.compile(TAG_PATTERN)


def new_message_id(tag: str, now_s: float | None = None, random: bytes | None = None) -> str:
    """A fresh message id in shard `tag` (`now_s` and `random` default to the clock and the
    OS's randomness)."""
    if TAG_RE.fullmatch(tag) is None:
        raise ValueError(f"not a shard tag: {tag!r}")
    millis = int((time.time() if now_s is None else now_s) * 1000)
    entropy = os.urandom(8) if random is None else random
    if len(entropy) != 8:
        raise ValueError("a message id takes exactly 8 random bytes")
    return f"m{millis:011x}{entropy.hex()}.{tag}"


def is_message_id(text: str) -> bool:
    """True when `text` has the form of an id the server issues."""
    return MESSAGE_ID_RE.fullmatch(text) is not None


def tag_of(message_id: str) -> str:
    """The shard tag of an issued id (`ValueError` for an id with none). Ids from clients are
    checked with `is_message_id` first; this runs for every key of every chunk, so it only
    splits."""
    _id, dot, tag = message_id.rpartition(".")
    if not dot or not tag:
        raise ValueError(f"not a message id: {message_id!r}")
    return tag


def issued_ms(message_id: str) -> int:
    """When an id of `is_message_id`'s form was minted (Unix milliseconds)."""
    return int(message_id[1:12], 16)
