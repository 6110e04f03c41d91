"""Redis access shared by gateways and workers: key names, atomic scripts, the embedded server.

    StoreError
    ├── Unavailable      Redis cannot be reached (answers `unavailable`)
    └── Fenced           a write from a worker that no longer owns the job was refused
"""

from __future__ import annotations


class StoreError(Exception):
    pass


class Unavailable(StoreError):
    pass


class Fenced(StoreError):
    pass
