"""Pub/sub on a real Redis Cluster (`store.cluster_subscriber`): sharded (SSUBSCRIBE) on
Redis 7, SUBSCRIBE on 6.2, each channel on its slot's master; both heal after a lost node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.exceptions
from redis.connection import parse_url
from redis.crc import key_slot

from store import Unavailable, embedded
from store.cluster import ClusterClient
from store.cluster_subscriber import ClusterSubscriber
from store.embedded import ClusterNode, EmbeddedCluster
from tests.cluster import fail_over, finish_migration, other_master, restore, start_migration
from tests.support import t

CHANNELS = [f"tr:{{p{i}}}:live:m{i}" for i in range(12)]
"""Twelve tags: channels on every master."""


class Inbox:
    """Messages and re-subscriptions as the subscriber reports them."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.resubscribed: list[str] = []
        self._new = asyncio.Event()

    def __call__(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))
        self._new.set()

    def on_resubscribed(self, channels: list[str]) -> None:
        self.resubscribed.extend(channels)
        self._new.set()

    async def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(t(timeout)):
            while not condition():
                self._new.clear()
                await self._new.wait()

    def data(self, channel: str) -> list[bytes]:
        return [d for c, d in self.messages if c == channel.encode()]


class Publisher:
    """SPUBLISH on Redis 7, PUBLISH on 6.2, through the cluster client; the count of receivers."""

    def __init__(self, cluster: EmbeddedCluster) -> None:
        self.client = ClusterClient(parse_url(cluster.url))  # type: ignore[no-untyped-call]
        self.sharded = embedded.server_version(cluster.server) >= (7, 0)

    async def publish(self, channel: str, data: str) -> int:
        return int(await self.client.call("SPUBLISH" if self.sharded else "PUBLISH", channel, data))

    async def all_heard(self, channels: list[str], data: str, inbox: Inbox, timeout: float = 10.0) -> None:
        """Publish `data` to each channel until the subscriber has it: right after a heal the
        publisher's map may be the stale one, and a 6.2 PUBLISH counts only the receivers on
        its own node, so arrival is what tells."""
        async with asyncio.timeout(t(timeout)):
            for channel in channels:
                while data.encode() not in inbox.data(channel):
                    try:
                        await self.publish(channel, data)
                    except redis.exceptions.RedisError:
                        pass  # the publisher's own retry
                    try:
                        await inbox.wait(lambda: data.encode() in inbox.data(channel), timeout=0.2)
                    except TimeoutError:
                        continue


@pytest.fixture
async def publisher(any_cluster: EmbeddedCluster) -> AsyncIterator[Publisher]:
    publisher = Publisher(any_cluster)
    await publisher.client.refresh()  # knows every master before one is killed (the seed may be)
    yield publisher
    await publisher.client.close()


def subscribed_on(cluster: EmbeddedCluster, channel: str, sharded: bool) -> ClusterNode:
    """The node whose clients include our subscription to `channel`."""
    for node in cluster.masters():
        with node.client() as client:
            if sharded:
                counts = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            else:
                counts = client.execute_command("PUBSUB", "NUMSUB", channel)
        if counts[1] >= 1:
            return node
    raise AssertionError(f"nobody subscribes {channel}")


async def test_messages_of_channels_on_every_master(any_cluster: EmbeddedCluster, publisher: Publisher) -> None:
    inbox = Inbox()
    subscriber = await ClusterSubscriber.open(any_cluster.url, inbox, inbox.on_resubscribed)
    try:
        assert subscriber.sharded is publisher.sharded
        assert await asyncio.wait_for(subscriber.subscribe(*CHANNELS), t(5)) is True
        owners = {any_cluster.owner(key_slot(c.encode())).port for c in CHANNELS}
        assert len(owners) == 3
        for channel in CHANNELS:
            receivers = await publisher.publish(channel, channel)
            # on its channel's master, whose subscribers a PUBLISH counts (6.2) as SPUBLISH does
            assert receivers == 1, "confirmed: the server counts us"
        await inbox.wait(lambda: len(inbox.messages) == len(CHANNELS))
        assert sorted(inbox.messages) == sorted((c.encode(), c.encode()) for c in CHANNELS)
        subscriber.unsubscribe(CHANNELS[0])
        assert await asyncio.wait_for(subscriber.subscribe("tr:{p0}:live:other"), t(5)) is True
        await publisher.publish(CHANNELS[0], "after unsubscribe")
        await publisher.publish("tr:{p0}:live:other", "x")  # same slot, same path: after the other
        await inbox.wait(lambda: len(inbox.messages) == len(CHANNELS) + 1)
        assert inbox.messages[-1] == (b"tr:{p0}:live:other", b"x")
        assert inbox.resubscribed == []
    finally:
        subscriber.close()
    assert await asyncio.wait_for(subscriber.closed, t(5)) is None


async def test_a_dropped_connection_is_resubscribed_and_reported(
    any_cluster: EmbeddedCluster, publisher: Publisher
) -> None:
    inbox = Inbox()
    subscriber = await ClusterSubscriber.open(any_cluster.url, inbox, inbox.on_resubscribed)
    try:
        assert await asyncio.wait_for(subscriber.subscribe(*CHANNELS), t(5)) is True
        node = subscribed_on(any_cluster, CHANNELS[0], publisher.sharded)
        with node.client() as admin:
            assert admin.client_kill_filter(_type="pubsub") >= 1
        on_node = [c for c in CHANNELS if any_cluster.owner(key_slot(c.encode())).port == node.port]
        await inbox.wait(lambda: sorted(inbox.resubscribed) == sorted(on_node))
        await publisher.all_heard(CHANNELS, "again", inbox)
    finally:
        subscriber.close()


async def test_a_killed_master_heals_once_its_replica_took_over(
    any_cluster: EmbeddedCluster, publisher: Publisher
) -> None:
    inbox = Inbox()
    subscriber = await ClusterSubscriber.open(any_cluster.url, inbox, inbox.on_resubscribed)
    try:
        assert await asyncio.wait_for(subscriber.subscribe(*CHANNELS), t(5)) is True
        node = subscribed_on(any_cluster, CHANNELS[0], publisher.sharded)
        on_node = [c for c in CHANNELS if any_cluster.owner(key_slot(c.encode())).port == node.port]
        await fail_over(any_cluster, node)
        try:
            await inbox.wait(lambda: sorted(set(inbox.resubscribed)) == sorted(on_node), timeout=20)
            await publisher.all_heard(CHANNELS, "after failover", inbox)
        finally:
            await restore(any_cluster, node)
    finally:
        subscriber.close()


async def test_without_a_resubscribe_callback_closed_resolves_at_the_first_loss(
    any_cluster: EmbeddedCluster, publisher: Publisher
) -> None:
    subscriber = await ClusterSubscriber.open(any_cluster.url, Inbox())
    try:
        assert await asyncio.wait_for(subscriber.subscribe(*CHANNELS), t(5)) is True
        node = subscribed_on(any_cluster, CHANNELS[0], publisher.sharded)
        with node.client() as admin:
            admin.client_kill_filter(_type="pubsub")
        error = await asyncio.wait_for(subscriber.closed, t(5))
        assert error is not None
        assert await subscriber.subscribe(CHANNELS[1]) is False
    finally:
        subscriber.close()


async def test_a_migrated_slot_moves_the_subscription_with_it(
    any_cluster: EmbeddedCluster, publisher: Publisher
) -> None:
    """Redis 7 pushes `sunsubscribe` when a slot leaves a master: the channel is subscribed on
    the new owner and reported. On 6.2 the broadcast subscription does not care."""
    inbox = Inbox()
    channel = CHANNELS[3]
    slot = key_slot(channel.encode())
    subscriber = await ClusterSubscriber.open(any_cluster.url, inbox, inbox.on_resubscribed)
    try:
        assert await asyncio.wait_for(subscriber.subscribe(channel), t(5)) is True
        source = any_cluster.owner(slot)
        target = other_master(any_cluster, source)
        await asyncio.to_thread(start_migration, any_cluster, slot, target)
        await asyncio.to_thread(finish_migration, any_cluster, slot, source, target)
        if publisher.sharded:
            await inbox.wait(lambda: inbox.resubscribed == [channel])
            assert subscribed_on(any_cluster, channel, sharded=True).port == target.port
        await publisher.all_heard([channel], "moved", inbox)
        if not publisher.sharded:
            assert inbox.resubscribed == []
    finally:
        subscriber.close()


async def test_a_subscription_on_a_stale_map_follows_the_moved_reply(
    any_cluster: EmbeddedCluster, publisher: Publisher
) -> None:
    inbox = Inbox()
    channel = CHANNELS[5]
    slot = key_slot(channel.encode())
    subscriber = await ClusterSubscriber.open(any_cluster.url, inbox, inbox.on_resubscribed)
    try:
        source = any_cluster.owner(slot)
        target = other_master(any_cluster, source)
        await asyncio.to_thread(start_migration, any_cluster, slot, target)
        await asyncio.to_thread(finish_migration, any_cluster, slot, source, target)
        confirmed = await asyncio.wait_for(subscriber.subscribe(channel), t(5))
        if publisher.sharded:
            assert confirmed is False, "the old owner answers MOVED"
            await inbox.wait(lambda: inbox.resubscribed == [channel])
        else:
            assert confirmed is True
        await publisher.all_heard([channel], "found", inbox)
    finally:
        subscriber.close()


async def test_nothing_listening_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        await ClusterSubscriber.open(f"redis://127.0.0.1:{embedded.free_port()}/0", Inbox())
