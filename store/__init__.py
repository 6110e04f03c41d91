"""Redis access shared by gateways and workers: key names, atomic scripts, the embedded server.

    StoreError
    ├── Unavailable      Redis cannot be reached or refuses commands for now (answers `unavailable`)
    │   ├── DeadlinePassed   it kept refusing an operation until its deadline (`store.retry`)
    │   └── NotReplicated    a message's end is on its master, on no replica yet (`store.redis_store`)
    └── ShardsMismatch   the deployment records another number of shards (`store.topology`)
"""

from __future__ import annotations


class StoreError(Exception):
    pass


class Unavailable(StoreError):
    pass


class DeadlinePassed(Unavailable):
    """Redis kept refusing an operation until its deadline."""


class NotReplicated(Unavailable):
    """A message's end is written on its master but on no replica yet."""


class ShardsMismatch(StoreError):
    """The deployment records another number of shards than this process was asked for."""
