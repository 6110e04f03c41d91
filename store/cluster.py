"""The lean pipelined connection of `store.lean`, for a Redis Cluster: one connection per
master, each command sent to the master that serves its key's slot.

`ClusterClient` has `LeanClient`'s interface (`execute`, `call`, `close`; error replies as
values). It learns the slot map with CLUSTER SLOTS, splits a batch by master, writes every
part at once and puts the replies back in the batch's order. A command without a key (WAIT,
PING) goes to the master of the command before it in the batch (WAIT then waits for that
master's replicas), else to any master. Commands of one slot keep their
order: they go to one master, in one part, in batch order (the worker's chunk writes rely on
it). Redirections are followed inside `execute`: MOVED (the map is read again, the command
resent to the new owner), ASK (ASKING + the command, on the importing master), TRYAGAIN and
CLUSTERDOWN (resent after a short wait, until the call's deadline). A redirected command of a
slot is resent after the others of its slot that were answered: a slot only moves forward
(migrating → moved), so the commands after it in that slot are redirected too.

A lost or unreachable master fails the call with redis-py's `ConnectionError`, as a dropped
connection does on `LeanClient` (callers retry), and the next call reads the map again: after
a failover it names the promoted replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
import redis.exceptions
from redis.crc import key_slot

from store.lean import Command, Connection, LeanClient, open_connection, raised
from store.retry import Backoff

SLOTS = 16384
Address = tuple[str, int]

_KEYLESS = frozenset(
    (
        "PING ECHO SCRIPT INFO CLUSTER TIME CLIENT CONFIG DBSIZE FUNCTION HELLO AUTH COMMAND "
        "READONLY READWRITE ASKING WAIT FLUSHALL FLUSHDB LASTSAVE MEMORY SLOWLOG LATENCY PUBSUB ROLE "
        "RANDOMKEY SCAN KEYS"
    ).split()
)
_SCRIPTS = frozenset("EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO".split())
_KEY_AFTER_SUBCOMMAND = frozenset("XINFO OBJECT".split())
_NO_KEY = -1
_STREAMS = -2
_RETRY_LATER = (b"TRYAGAIN", b"CLUSTERDOWN", b"LOADING")
_REDIRECTIONS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "LOADING")
_MAX_MOVED = 5
"""MOVED rounds in one call: the map read after a MOVED should be right; ASK and TRYAGAIN
repeat until the migration ends or the call's deadline."""


async def has_sharded_pubsub(client: CommandClient) -> bool:
    """Whether the server has sharded pub/sub (SPUBLISH, SSUBSCRIBE): Redis 7 or later."""
    info = await client.call("INFO", "server")
    text = info.decode() if isinstance(info, bytes) else str(info)
    version = next(line for line in text.splitlines() if line.startswith("redis_version:"))
    return int(version.split(":")[1].split(".")[0]) >= 7


def lean_client(options: dict[str, Any], timeout_s: float = 2.0, *, cluster: bool = False) -> CommandClient:
    """The hot paths' client: `ClusterClient` on a Redis Cluster (`options` name any node),
    else `LeanClient`."""
    return ClusterClient(options, timeout_s) if cluster else LeanClient(options, timeout_s)


class CommandClient(Protocol):
    """What the hot paths need of a lean client: `LeanClient` (one Redis) or `ClusterClient`."""

    async def execute(self, commands: Sequence[Command]) -> list[Any]: ...

    async def call(self, *command: bytes | str | int | float) -> Any: ...

    async def close(self) -> None: ...


def _key_position(name: str) -> int:
    """Where a command's routing key is: an argument index, `_NO_KEY` or `_STREAMS`.
    A channel (argument 1 of PUBLISH and SPUBLISH) routes like a key: a 6.2 PUBLISH reaches
    every node from any node, but subscribers on its channel's master hear it without the
    cluster bus (`store.cluster_subscriber`)."""
    if name in _KEYLESS:
        return _NO_KEY
    if name in _SCRIPTS:
        return 3  # EVALSHA sha numkeys key ...
    if name in _KEY_AFTER_SUBCOMMAND:
        return 2
    if name in ("XREAD", "XREADGROUP"):
        return _STREAMS
    return 1


_positions: dict[bytes | str, int] = {}
_slots: dict[bytes | str, int] = {}
"""Slots of keys seen lately: a message's keys come back with each of its chunks."""


def key_slot_of(key: bytes | str) -> int:
    slot = _slots.get(key)
    if slot is None:
        if len(_slots) >= 65_536:
            _slots.clear()
        slot = _slots[key] = key_slot(key if isinstance(key, bytes) else key.encode())
    return slot


def command_slot(command: Command) -> int | None:
    """The slot a command must be sent to, or None when any master will do."""
    name = command[0]
    position = _positions.get(name)  # type: ignore[arg-type]
    if position is None:
        text = name.decode() if isinstance(name, bytes) else str(name)
        position = _key_position(text.upper())
        if len(_positions) < 512:
            _positions[name] = position  # type: ignore[index]
    if position == _NO_KEY:
        return None
    if position == _STREAMS:
        upper = [a.upper() if isinstance(a, (bytes, str)) else a for a in command]
        marker = "STREAMS" if "STREAMS" in upper else b"STREAMS"
        position = upper.index(marker) + 1 if marker in upper else len(command)
    elif position == 3 and command[2] != 1 and int(command[2]) == 0:
        return None  # a script with no keys
    if position >= len(command):
        return None
    key = command[position]
    return key_slot_of(key if isinstance(key, (bytes, str)) else str(key))


@dataclass(slots=True, eq=False)
class _Node:
    address: Address
    connection: Connection | None = None
    connecting: asyncio.Lock | None = None

    async def connect(self, options: dict[str, Any], timeout_s: float) -> Connection:
        if self.connection is not None and not self.connection.lost:
            return self.connection
        if self.connecting is None:
            self.connecting = asyncio.Lock()
        async with self.connecting:
            if self.connection is None or self.connection.lost:
                host, port = self.address
                self.connection = await open_connection(dict(options, host=host, port=port), timeout_s)
            return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def parse_slots(reply: list[Any], asked: Address) -> list[tuple[int, int, Address, list[Address]]]:
    """CLUSTER SLOTS → (first slot, last slot, master, replicas); an empty host means the node
    that was asked."""

    def address(node: list[Any]) -> Address:
        host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
        return (host or asked[0], int(node[1]))

    return [(int(e[0]), int(e[1]), address(e[2]), [address(r) for r in e[3:]]) for e in reply]


class ClusterClient:
    """One lean connection per master of a Redis Cluster, opened on first use."""

    def __init__(self, options: dict[str, Any], timeout_s: float = 2.0) -> None:
        """`options`: redis-py's parsed URL of any node (the seed)."""
        self._options = options
        self._timeout_s = timeout_s
        seed = (str(options.get("host", "localhost")), int(options.get("port", 6379)))
        self._seeds: dict[Address, None] = {seed: None}
        """Where to ask for the map when no known master answers: the seed and replicas."""
        self._nodes: dict[Address, _Node] = {}
        self._owners: list[_Node] | None = None
        """Slot → the master that serves it; None until learned, and after a lost master."""
        self._refreshing: asyncio.Future[list[_Node]] | None = None

    # --- the map -------------------------------------------------------------------------

    def owner(self, slot: int) -> Address | None:
        """The master that serves `slot` as last learned (None before the first call)."""
        return self._owners[slot].address if self._owners is not None else None

    def masters(self) -> list[Address]:
        return list(dict.fromkeys(node.address for node in self._owners or ()))

    async def refresh(self) -> None:
        """Read the slot map again now (one CLUSTER SLOTS shared by concurrent callers)."""
        await self._refresh()

    async def _refresh(self) -> list[_Node]:
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._read_map())
        refreshing = self._refreshing
        try:
            return await asyncio.shield(refreshing)
        finally:
            if self._refreshing is refreshing and refreshing.done():
                self._refreshing = None

    async def _read_map(self) -> list[_Node]:
        """Ask the connected nodes, the known masters, then the seed and replicas, until one
        answers CLUSTER SLOTS. A node that answers with an error is no cluster node:
        `ResponseError` (a configuration mistake, not an outage)."""
        errors: list[str] = []
        refused: redis.exceptions.ResponseError | None = None
        connected = [a for a, n in self._nodes.items() if n.connection is not None and not n.connection.lost]
        for address in dict.fromkeys([*connected, *self.masters(), *self._nodes, *self._seeds]):
            node = self._node(address)
            try:
                connection = await node.connect(self._options, self._timeout_s)
                async with asyncio.timeout(self._timeout_s):
                    (reply,) = await connection.send([("CLUSTER", "SLOTS")])
                ranges = parse_slots(raised(reply), address)
            except redis.exceptions.ResponseError as exc:
                refused = exc  # not a cluster node ("cluster support disabled")
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            except (redis.exceptions.RedisError, TimeoutError) as exc:
                node.close()
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            if any(master[0] == "?" for _f, _l, master, _r in ranges):
                errors.append(f"{address[0]}:{address[1]}: a master's endpoint is not known yet")
                continue  # Redis 7 answers "?" for a hostname it has not learned by gossip
            owners: list[_Node | None] = [None] * SLOTS
            for first, last, master, replicas in ranges:
                self._seeds.update(dict.fromkeys(replicas))
                owner = self._node(master)
                owners[first : last + 1] = [owner] * (last - first + 1)
            if any(owner is None for owner in owners):
                errors.append(f"{address[0]}:{address[1]}: not every slot is served")
                continue
            self._owners = [owner for owner in owners if owner is not None]
            return self._owners
        if refused is not None:
            raise redis.exceptions.ResponseError(f"not a redis cluster: {'; '.join(errors)}") from refused
        raise redis.exceptions.ConnectionError(f"no node of the redis cluster answers: {'; '.join(errors)}")

    def _node(self, address: Address) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node(address)
        return node

    # --- commands ------------------------------------------------------------------------

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Replies in the batch's order; error replies as `hiredis.ReplyError` values.
        Raises redis-py's `ConnectionError` / `TimeoutError` when a master cannot be reached
        or does not answer in time, or the cluster does not settle (redirections) by then."""
        if len(commands) == 1 and self._owners is not None:
            replies = await self._execute_one(commands, self._owners)
            if replies is not None:
                return replies
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        replies = [None] * len(commands)
        pending = list(range(len(commands)))
        asking: dict[int, Address] = {}
        backoff, redirects = Backoff(base_s=0.01, cap_s=0.2), 0
        while True:
            owners = self._owners if self._owners is not None else await self._refresh()
            await self._send(commands, pending, asking, owners, replies, deadline)
            retry, moved, later = self._redirected(replies, pending, asking)
            if not retry:
                return replies
            redirects += moved
            if redirects > _MAX_MOVED or loop.time() >= deadline:
                raise redis.exceptions.ConnectionError(f"redis cluster did not settle: {replies[retry[0]]}")
            if moved:
                self._owners = None
            if later:
                await asyncio.sleep(min(backoff.next_delay(), max(0.0, deadline - loop.time())))
            pending = retry

    async def _execute_one(self, commands: Sequence[Command], owners: list[_Node]) -> list[Any] | None:
        """A single command on an open connection, `LeanClient`'s way (a cancel is one): its
        reply, or None when it must take the general path (no connection yet, redirected)."""
        slot = command_slot(commands[0])
        node = owners[slot if slot is not None else 0]
        connection = node.connection
        if connection is None or connection.lost:
            return None
        future = connection.send(commands)
        try:
            async with asyncio.timeout(self._timeout_s):
                replies = await future
        except TimeoutError:
            node.close()
            raise redis.exceptions.TimeoutError(f"redis cluster did not answer within {self._timeout_s} s") from None
        except redis.exceptions.ConnectionError as exc:
            self._owners = None
            raise redis.exceptions.ConnectionError(f"{node.address[0]}:{node.address[1]}: {exc}") from exc
        reply = replies[0]
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith(_REDIRECTIONS):
            return None
        return replies

    async def call(self, *command: bytes | str | int | float) -> Any:
        """One command; an error reply is raised (see `store.lean.raised`)."""
        (reply,) = await self.execute([command])
        return raised(reply)

    async def close(self) -> None:
        self.disconnect()

    def disconnect(self) -> None:
        """Close every connection now (a later call opens them again)."""
        for node in self._nodes.values():
            node.close()
        self._owners = None
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None

    async def _send(
        self,
        commands: Sequence[Command],
        pending: list[int],
        asking: dict[int, Address],
        owners: list[_Node],
        replies: list[Any],
        deadline: float,
    ) -> None:
        """Send `pending` (indices into `commands`), one part per master, all parts written
        before any is awaited; each reply lands at its command's index."""
        node = owners[0]  # keyless commands go with the command before them, else here
        parts: dict[_Node, list[int]] = {}
        for index in pending:
            target = asking.get(index) if asking else None
            if target is not None:
                node = self._node(target)
            else:
                slot = command_slot(commands[index])
                if slot is not None:
                    node = owners[slot]
            part = parts.get(node)
            if part is None:
                parts[node] = [index]
            else:
                part.append(index)
        connections: list[tuple[_Node, Connection]] = []
        try:
            for node in parts:
                connection = node.connection
                if connection is None or connection.lost:
                    connection = await node.connect(self._options, self._timeout_s)
                connections.append((node, connection))
        except redis.exceptions.RedisError:
            self._owners = None
            raise
        sent: list[tuple[_Node, list[int], asyncio.Future[list[Any]]]] = []
        for node, connection in connections:
            indices = parts[node]
            if asking:
                batch: list[Command] = []
                for index in indices:
                    if index in asking:
                        batch.append(("ASKING",))
                    batch.append(commands[index])
            else:
                batch = [commands[index] for index in indices]
            sent.append((node, indices, connection.send(batch)))
        await self._wait(sent, deadline)
        for node, indices, future in sent:
            answers = future.result()
            if asking:
                position = iter(answers)
                for index in indices:
                    if index in asking:
                        next(position)  # ASKING's OK
                    replies[index] = next(position)
            else:
                for index, answer in zip(indices, answers):
                    replies[index] = answer

    async def _wait(self, sent: list[tuple[_Node, list[int], asyncio.Future[list[Any]]]], deadline: float) -> None:
        """Until every part is answered. A part not answered by the deadline closes its
        connection (its replies would belong to nobody); a lost connection forgets the map."""
        try:
            async with asyncio.timeout_at(deadline):
                if len(sent) == 1:
                    await sent[0][2]
                else:
                    await asyncio.wait([future for _n, _i, future in sent])
        except TimeoutError:
            for node, _indices, future in sent:
                if not future.done() or future.cancelled():
                    node.close()
            raise redis.exceptions.TimeoutError(f"redis cluster did not answer within {self._timeout_s} s") from None
        except redis.exceptions.ConnectionError:
            pass  # seen below
        for node, _indices, future in sent:
            if future.exception() is not None:
                self._owners = None
                raise redis.exceptions.ConnectionError(f"{node.address[0]}:{node.address[1]}: {future.exception()}")

    @staticmethod
    def _redirected(replies: list[Any], pending: list[int], asking: dict[int, Address]) -> tuple[list[int], bool, bool]:
        """The commands to send again, whether a MOVED was among them (read the map again)
        and whether one must wait (TRYAGAIN, CLUSTERDOWN, LOADING); ASK targets go to
        `asking`."""
        retry: list[int] = []
        moved = later = False
        asking.clear()
        for index in pending:
            reply = replies[index]
            if not isinstance(reply, hiredis.ReplyError):
                continue
            text = str(reply)
            if text.startswith("MOVED "):
                moved = True
            elif text.startswith("ASK "):
                host, _, port = text.split()[2].rpartition(":")
                asking[index] = (host, int(port))
            elif text.encode().startswith(_RETRY_LATER):
                later = True
            else:
                continue
            retry.append(index)
        return retry, moved, later
