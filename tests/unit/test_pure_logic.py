"""Auth tokens, the relay's sequence tracker, the coalescer, the cancel token and the
cancelled frame the CANCEL script completes."""

from __future__ import annotations

import threading

import pytest

from protocol.auth import mint_token, verify_token
from protocol.coalesce import Coalescer
from protocol.errors import AuthError
from protocol.messages import Cancelled, encode_text
from protocol.relay import SeqTracker, Verdict
from store.redis_store import split_at_seq
from store.scripts import configured
from worker.cancel_token import CancelToken, Phase


def test_token_round_trip_and_every_kind_of_bad_token() -> None:
    token = mint_token("k", "alice", now=1000.0, ttl_s=60)
    assert verify_token("k", token, now=1059.0) == "alice"
    with pytest.raises(AuthError, match="expired"):
        verify_token("k", token, now=1061.0)
    with pytest.raises(AuthError, match="signature"):
        verify_token("other", token, now=1000.0)
    payload, sig = token.split(".")
    forged = mint_token("k", "mallory", now=1000.0).split(".")[0]
    with pytest.raises(AuthError, match="signature"):
        verify_token("k", f"{forged}.{sig}", now=1000.0)
    for junk in ("", "abc", "a.b.c", "!!!.???"):
        with pytest.raises(AuthError):
            verify_token("k", junk, now=1000.0)
    with pytest.raises(AuthError, match="user name"):
        mint_token("k", "a:b", now=0)


def test_tracker_delivers_in_order_drops_duplicates_and_reports_gaps() -> None:
    tracker = SeqTracker(last_seq=2)
    assert tracker.offer(2, terminal=False) is Verdict.DUPLICATE
    assert tracker.offer(4, terminal=False) is Verdict.GAP
    assert tracker.offer(3, terminal=False) is Verdict.DELIVER
    assert tracker.offer(4, terminal=False) is Verdict.DELIVER
    assert tracker.offer(5, terminal=True) is Verdict.GAP
    assert tracker.offer(3, terminal=True) is Verdict.DUPLICATE
    assert tracker.offer(4, terminal=True) is Verdict.DELIVER
    assert tracker.finished
    assert tracker.offer(5, terminal=False) is Verdict.DUPLICATE
    assert tracker.offer(4, terminal=True) is Verdict.DUPLICATE


def test_peek_answers_what_offer_will_and_changes_nothing() -> None:
    cases = [(s, term) for s in range(6) for term in (False, True)]
    for last_seq, finished in [(0, False), (2, False), (3, True)]:
        for seq, terminal in cases:
            probe = SeqTracker(last_seq=last_seq, finished=finished)
            answer = probe.peek(seq, terminal)
            assert probe == SeqTracker(last_seq=last_seq, finished=finished)
            assert answer is probe.offer(seq, terminal), (last_seq, finished, seq, terminal)


def test_tracker_terminal_with_no_chunks() -> None:
    tracker = SeqTracker()
    assert tracker.offer(0, terminal=True) is Verdict.DELIVER


def test_coalescer_sends_a_lone_token_at_once_and_joins_a_burst() -> None:
    c = Coalescer(window_s=0.25)
    assert c.add("a ", now=1.0) == "a "
    assert c.add("b ", now=1.0625) is None
    assert c.add("c ", now=1.125) is None
    assert c.deadline() == 1.25
    assert c.due(now=1.1875) is None
    assert c.due(now=1.25) == "b c "
    assert c.deadline() is None
    assert c.add("d ", now=2.0) == "d "
    assert c.add("e", now=2.0625) is None
    assert c.take(now=2.125) == "e"
    assert c.take(now=2.25) is None


def test_coalescer_flushes_when_full() -> None:
    c = Coalescer(window_s=10.0, max_chars=4)
    assert c.add("ab", now=0.0) == "ab"
    assert c.add("cd", now=0.1) is None
    assert c.add("ef", now=0.2) == "cdef"


def test_cancel_token_runs_callbacks_once_outside_the_lock() -> None:
    token = CancelToken()
    seen: list[tuple[str, bool]] = []
    token.set_phase(Phase.PROMPT)
    token.add_callback(lambda t: seen.append(("first", t.cancel("again"))))
    assert token.cancel("user")
    assert not token.cancel("user")
    assert seen == [("first", False)]
    assert token.cancelled and token.reason == "user" and token.phase_at_cancel is Phase.PROMPT
    late: list[str] = []
    token.add_callback(lambda t: late.append(t.reason))
    assert late == ["user"]


def test_cancel_token_is_safe_across_threads() -> None:
    token = CancelToken()
    calls: list[int] = []
    token.add_callback(lambda t: calls.append(1))
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(token.cancel())) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1 and calls == [1]


async def test_cancel_all_stops_a_task_that_swallowed_its_first_cancel() -> None:
    import asyncio

    from store.tasks import cancel_all

    swallowed = asyncio.Event()

    async def stubborn_loop() -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # as a library that turns a cancel into an error the loop retries

    task = asyncio.create_task(stubborn_loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all([task], recancel_s=0.01), 5)
    assert swallowed.is_set() and task.cancelled()


@pytest.mark.parametrize("seq", [0, 7, 123456])
def test_cancelled_frame_split_at_seq_rebuilds_any_seq(seq: int) -> None:
    frame = encode_text(Cancelled(message_id="m-1", seq=0))
    head, tail = split_at_seq(frame)
    assert head + str(seq) + tail == encode_text(Cancelled(message_id="m-1", seq=seq))


def test_split_at_seq_refuses_a_frame_without_a_single_seq_zero() -> None:
    with pytest.raises(ValueError):
        split_at_seq('{"type":"cancelled","message_id":"m","seq":5}')


def test_script_config_becomes_lua_constants_and_odd_strings_are_refused() -> None:
    assert configured("return C.ttl", {"meta": "tr:msg:", "ttl": 30}) == 'local C = {meta = "tr:msg:", ttl = 30}\nreturn C.ttl'
    for odd in ('tr:"x', "tr:\\x", "tr:\nx", "tr:é"):
        with pytest.raises(ValueError):
            configured("return 1", {"meta": odd})
