"""The gateway's lean pub/sub connection (`store.subscriber`) against real Redis servers."""

from __future__ import annotations

import asyncio

import pytest
import redis as sync_redis

from store import Unavailable, embedded
from store.subscriber import Subscriber
from tests.support import t


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self._new = asyncio.Event()

    def __call__(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))
        self._new.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(t(5)):
            while len(self.messages) < count:
                self._new.clear()
                await self._new.wait()


async def test_messages_of_subscribed_channels_only_after_confirmation(redis_url: str) -> None:
    inbox = Inbox()
    subscriber = await Subscriber.open(redis_url, inbox)
    publisher = sync_redis.Redis.from_url(redis_url)
    try:
        assert await asyncio.wait_for(subscriber.subscribe("sub:a", "sub:b"), t(5)) is True
        assert publisher.publish("sub:a", b"1") == 1, "confirmed means the server counts us"
        publisher.publish("sub:other", b"not ours")
        publisher.publish("sub:b", b"2")
        await inbox.wait_for(2)
        subscriber.unsubscribe("sub:a")
        assert await asyncio.wait_for(subscriber.subscribe("sub:c"), t(5)) is True
        publisher.publish("sub:a", b"after unsubscribe")
        publisher.publish("sub:c", b"3")
        await inbox.wait_for(3)
        assert inbox.messages == [(b"sub:a", b"1"), (b"sub:b", b"2"), (b"sub:c", b"3")]
    finally:
        subscriber.close()
        publisher.close()
    assert await asyncio.wait_for(subscriber.closed, t(5)) is None


async def test_password_from_the_url_and_a_refused_one(own_redis: tuple[str, sync_redis.Redis]) -> None:
    url, admin = own_redis
    admin.config_set("requirepass", "s3cret")
    port = url.rsplit(":", 1)[1].split("/")[0]
    inbox = Inbox()
    good = await Subscriber.open(f"redis://:s3cret@127.0.0.1:{port}/0", inbox)
    try:
        assert await asyncio.wait_for(good.subscribe("pw:a"), t(5)) is True
    finally:
        good.close()
    bad = await Subscriber.open(f"redis://:wrong@127.0.0.1:{port}/0", inbox)
    confirmed = bad.subscribe("pw:a")
    error = await asyncio.wait_for(bad.closed, t(5))
    assert error is not None and ("WRONGPASS" in str(error) or "invalid password" in str(error)), error
    assert await confirmed is False


async def test_server_gone_ends_the_connection_and_pending_confirmations(
    own_redis: tuple[str, sync_redis.Redis],
) -> None:
    url, admin = own_redis
    subscriber = await Subscriber.open(url, Inbox())
    assert await asyncio.wait_for(subscriber.subscribe("gone:a"), t(5)) is True
    admin.client_kill_filter(_type="pubsub")
    await asyncio.wait_for(subscriber.closed, t(5))
    assert await subscriber.subscribe("gone:b") is False


async def test_nothing_listening_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        await Subscriber.open(f"redis://127.0.0.1:{embedded.free_port()}/0", Inbox())
