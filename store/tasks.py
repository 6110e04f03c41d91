"""Owned background tasks: supervised (a failure is logged and the task restarts with capped
backoff, so no Redis error ends a process) and cancelled together at shutdown.

Only SIGTERM/SIGINT stop a gateway or worker; a task that keeps failing keeps being restarted,
and says so in its log line (`task_failed`, with the task's name and how many times in a row).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from store.retry import Backoff

log = structlog.get_logger("tasks")

HEALTHY_AFTER_S = 10.0
"""A task that ran this long before failing starts again from the shortest backoff."""


class Supervisor:
    """The owner of a process's long-lived tasks."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, run: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
        """Run `run()` under supervision until it returns or the supervisor closes."""
        task = asyncio.create_task(supervise(run, name), name=name)
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        await cancel_all(self._tasks)
        self._tasks.clear()


async def supervise(run: Callable[[], Awaitable[None]], name: str, backoff: Backoff | None = None) -> None:
    """Call `run()` again whenever it fails; return when it returns."""
    backoff = backoff or Backoff(base_s=0.1, cap_s=5.0)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await run()
            return
        except Exception as exc:  # the point of supervision: log it, restart
            if loop.time() - started >= HEALTHY_AFTER_S:
                backoff.reset()
            delay = backoff.next_delay()
            log.error("task_failed", task=name, error=repr(exc), failures=backoff.failures,
                      restart_in_s=round(delay, 3), exc_info=exc)
            await asyncio.sleep(delay)


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A short-lived task whose failure must not vanish: logged when it ends with an error."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)


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
