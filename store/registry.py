"""The instance registry: each gateway and worker keeps a record of itself in Redis.

`tr:inst:{kind}:{id}` (a hash, for monitoring) expires unless refreshed; a worker also keeps
its liveness key `tr:alive:{id}`, whose expiry tells other workers to take over its jobs.
A beat that Redis refuses is logged and tried again at the next one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from store import keys
from store.redis_store import Store
from store.topology import AnyRedis
from store.retry import REDIS_ERRORS

log = structlog.get_logger("store.registry")

Fields = Mapping[str, str | int | float]


async def read_instances(redis: AnyRedis, kind: str = "*") -> list[dict[str, str]]:
    """The records of the registered instances (of one kind, or all), as text."""
    names = [key async for key in redis.scan_iter(match=keys.instance(kind, "*"), count=500)]
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        records: list[dict[bytes, bytes]] = await pipe.execute()
    return [{k.decode(): v.decode() for k, v in record.items()} for record in records if record]


class Registry:
    def __init__(
        self,
        store: Store,
        kind: str,
        instance_id: str,
        describe: Callable[[], Fields],
        period_s: float,
        alive_ttl_ms: int | None = None,
    ) -> None:
        """`describe()`: the fields of the moment (load, capacity...); `alive_ttl_ms`: also
        keep the liveness key, with this lifetime."""
        self._store = store
        self._key = keys.instance(kind, instance_id)
        self._static: dict[str, str | int | float] = {
            "kind": kind, "id": instance_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
        }
        self._describe = describe
        self._period_s = period_s
        self._alive = (keys.alive(instance_id), alive_ttl_ms) if alive_ttl_ms else None

    async def run(self) -> None:
        """Beat every `period_s` until cancelled."""
        while True:
            try:
                await self.beat()
            except REDIS_ERRORS as exc:
                log.warning("beat_failed", error=str(exc))
            await asyncio.sleep(self._period_s)

    async def beat(self) -> None:
        ttl_s = self._store.lifetimes.instance_ttl_s
        async with self._store.redis.pipeline(transaction=False) as pipe:
            if self._alive is not None:
                pipe.set(self._alive[0], b"1", px=self._alive[1])
            fields: dict[Any, Any] = {**self._static, **self._describe(), "last_beat": time.time()}
            pipe.hset(self._key, mapping=fields)
            pipe.expire(self._key, ttl_s)
            await pipe.execute()

    async def remove(self) -> None:
        """Deregister (at shutdown); the keys would expire by themselves otherwise."""
        names = [self._key] + ([self._alive[0]] if self._alive is not None else [])
        try:
            await self._store.redis.delete(*names)
        except REDIS_ERRORS as exc:
            log.warning("deregister_failed", error=str(exc), note="the keys expire by their TTL")
