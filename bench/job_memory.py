"""Redis memory held by ended jobs: N messages with 16,000-character prompts, each submitted,
claimed and finished through the store's scripts (no model, no WebSocket: the job stream,
the message hashes and the logs are what is measured), then `used_memory`.

The job stream keeps its last 100,000 entries (MAXLEN ~); an entry only names its message, and
the prompt leaves the message's hash at its end, so ended jobs hold almost nothing. Sessions
keep their last 200 user turns (the history a user sees), so the prompts of 50 sessions stay.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.cluster import Cluster, Figures, Row, progress
from protocol.jobs import Job
from protocol.messages import Done
from store.redis_store import Store, connect

NAME = "job_memory"
PROMPT_CHARS = 16_000
SESSIONS = 50
WORKER = "w-bench"


async def _session(store: Store, session: int, count: int, prompt: str) -> None:
    for n in range(count):
        mid = store.new_message_id("u")
        job = Job(message_id=mid, user="u", session_id=f"s{session}", text=prompt, max_tokens=1,
                  created_ms=int(time.time() * 1000))
        assert (await store.submit(job)).outcome == "ok"
        claimed = await store.claim(mid, WORKER, 0)
        assert claimed is not None
        done = Done(message_id=mid, seq=0, finish_reason="length")
        await store.finish(mid, WORKER, claimed[0], done, "", user="u", session_id=job.session_id)


async def _measure(quick: bool) -> dict[str, Any]:
    messages = 2_000 if quick else 100_000
    async with Cluster(NAME) as cluster:
        store = Store(connect(cluster.redis_url, timeout_s=30))
        try:
            before = int((await store.redis.info("memory"))["used_memory"])
            started = time.monotonic()
            prompt = "x" * PROMPT_CHARS
            await asyncio.gather(*(_session(store, s, messages // SESSIONS, prompt) for s in range(SESSIONS)))
            elapsed = time.monotonic() - started
            after = int((await store.redis.info("memory"))["used_memory"])
            keys = int(await store.redis.dbsize())
        finally:
            await store.close()
    return {"messages": messages, "prompt_chars": PROMPT_CHARS, "sessions": SESSIONS,
            "used_memory_before": before, "used_memory_after": after, "keys": keys, "elapsed_s": elapsed}


def run(quick: bool = False) -> tuple[Figures, list[Row]]:
    progress(f"{NAME}: ended jobs with {PROMPT_CHARS:,}-character prompts")
    figures = asyncio.run(_measure(quick))
    grown = (figures["used_memory_after"] - figures["used_memory_before"]) / 2**20
    history = SESSIONS * min(200, figures["messages"] // SESSIONS) * PROMPT_CHARS / 2**20
    rows = [
        Row(NAME, f"Redis memory after {figures['messages']:,} ended 16k-char jobs", f"+{grown:,.0f} MiB",
            f"of which ~{history:,.0f} MiB: the sessions' last user turns (history)", "", None),
    ]
    return figures, rows
