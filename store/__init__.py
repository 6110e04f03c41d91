"""Redis access shared by gateways and workers: key names, atomic scripts, the embedded server.

    StoreError
    └── Unavailable      Redis cannot be reached or refuses commands for now (answers `unavailable`)
        └── DeadlinePassed   it kept refusing an operation until its deadline (`store.retry`)
"""

from __future__ import annotations


class StoreError(Exception):
    pass


class Unavailable(StoreError):
    pass
