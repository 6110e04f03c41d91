"""Owned background tasks: a crash is logged and stops the process, never vanishes."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("tasks")


def spawn(coro: Coroutine[Any, Any, None], name: str, stop: asyncio.Event | None = None) -> asyncio.Task[None]:
    """Start a long-lived task; if it dies with an exception, log it and set `stop`."""
    task = asyncio.create_task(coro, name=name)

    def _done(t: asyncio.Task[None]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("background_task_crashed", task=name, error=repr(exc), exc_info=exc)
            if stop is not None:
                stop.set()

    task.add_done_callback(_done)
    return task


async def cancel_all(tasks: list[asyncio.Task[None]], recancel_s: float = 0.1) -> None:
    """Cancel and wait. A task still alive after `recancel_s` is cancelled again: redis-py
    (8.1, Python 3.11) can swallow a cancellation that lands in the middle of a command, and
    the loop then carries on to its next sleep as if nothing happened."""
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    while pending:
        _done, pending = await asyncio.wait(pending, timeout=recancel_s)
        for task in pending:
            log.debug("recancel", task=task.get_name())
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
