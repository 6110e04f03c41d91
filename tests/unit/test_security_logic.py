"""The pure parts of PROTOCOL.md's "Security and limits": ids, buckets, strikes, origins,
secrets, tokens with expiry, start-up guards, key names."""

from __future__ import annotations

import pytest

from gateway.guards import exposure_problem, is_loopback
from protocol.auth import MIN_SECRET_BYTES, check_secret, mint_token, verify_claims
from protocol.errors import AuthError
from protocol.ids import is_message_id, new_message_id, tag_of
from protocol.limits import UNLIMITED, LogThrottle, Quotas, Strikes, TokenBucket, bucket_of, retry_after_ms
from protocol.messages import Auth, Cancel, Chat, ClearHistory, Heartbeat, History, Resume
from protocol.origin import origin_allowed, own_origin
from store import keys
from tests.support import KEYSPACE

# --- ids ---------------------------------------------------------------------------------


def test_issued_message_ids_pass_the_validator_and_look_alike() -> None:
    mid = new_message_id("s3x41", 1_700_000_000.5, bytes(range(8)))
    assert mid == "m" + f"{1_700_000_000_500:011x}" + "0001020304050607" + ".s3x41"
    assert is_message_id(mid) and tag_of(mid) == "s3x41"
    assert all(is_message_id(new_message_id("s0x7")) for _ in range(100))
    assert len({new_message_id("s0x7") for _ in range(1000)}) == 1000


@pytest.mark.parametrize("text", [
    "", "m1", "m18bcfe56a3b0001020304050607", "m18bcfe56a3b000102030405060.s0x1", "m18bcfe56a3b00010203040506077.s0x1",
    "M18bcfe56a3b0001020304050607.s0x1", "m18BCFE56A3B0001020304050607.s0x1", "m18bcfe56a3b0001020304050607.s0x1\n",
    "x18bcfe56a3b0001020304050607.s0x1", "m18bcfe56a3b000102030405060*.s0x1", "m18bcfe56a3b0001020304050607.{x}",
    "m18bcfe56a3b0001020304050607.s0x1}", "m18bcfe56a3b0001020304050607.", "m:evil", "../etc", "{tag}",
])
def test_anything_else_is_no_message_id(text: str) -> None:
    assert not is_message_id(text)


def test_new_message_id_wants_eight_random_bytes_and_a_shard_tag() -> None:
    with pytest.raises(ValueError):
        new_message_id("s0x1", 0, b"short")
    with pytest.raises(ValueError):
        new_message_id("}{", 0, bytes(8))


# --- token buckets and strikes ---------------------------------------------------------------


def test_bucket_grants_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=30, now=0.0)
    assert [bucket.take(0.0) for _ in range(30)] == [0.0] * 30
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05), "a refusal takes nothing"
    assert bucket.take(0.1) == 0.0
    assert bucket.take(0.1) > 0
    assert [bucket.take(100.0) for _ in range(31)].count(0.0) == 30, "refills to the burst, no further"


def test_bucket_with_rate_0_is_unlimited() -> None:
    bucket = TokenBucket(rate=0, burst=0, now=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(10_000))


def test_retry_after_ms_rounds_up_and_is_never_0() -> None:
    assert retry_after_ms(0.0001) == 1
    assert retry_after_ms(0.1) == 100
    assert retry_after_ms(0.1004) == 101


def test_strikes_fire_at_the_limit_within_the_window_only() -> None:
    strikes = Strikes(limit=50, window_s=60)
    assert not any(strikes.add(t) for t in range(49))
    assert strikes.add(49.0)
    slow = Strikes(limit=3, window_s=60)
    assert [slow.add(t) for t in (0, 40, 80, 100, 110)] == [False, False, False, True, True]
    assert not any(Strikes(0, 60).add(0) for _ in range(1000))


def test_log_throttle_speaks_once_a_minute_and_counts_the_quiet_ones() -> None:
    throttle = LogThrottle(60)
    assert throttle.note("rate", 0) == 1
    assert [throttle.note("rate", t) for t in (1, 2, 59)] == [0, 0, 0]
    assert throttle.note("other", 5) == 1
    assert throttle.note("rate", 60) == 4


def test_buckets_by_message_type() -> None:
    requests = [Chat(session_id="s", text="x"), Resume(message_id="m", after_seq=0), History(session_id="s"),
                ClearHistory(session_id="s")]
    assert {bucket_of(m) for m in requests} == {"requests"}
    assert {bucket_of(Cancel(session_id="s")), bucket_of(Heartbeat())} == {"control"}
    assert bucket_of(Auth(user="a")) is None


def test_quotas_defaults_are_protocol_md_s_and_refuse_nonsense() -> None:
    q = Quotas()
    assert (q.request_rate, q.request_burst, q.control_rate, q.control_burst) == (10, 30, 50, 100)
    assert (q.generations_per_user, q.connections_per_user, q.bad_requests, q.bad_request_window_s) == (8, 64, 50, 60)
    assert UNLIMITED.generations_per_user == 0 and UNLIMITED.request_rate == 0
    with pytest.raises(ValueError):
        Quotas(request_rate=-1)
    with pytest.raises(ValueError):
        Quotas(request_rate=5, request_burst=0)


# --- origins ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("origin", "host", "proto"), [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", None),
    ("http://LOCALHOST:8000", "localhost:8000", None),
    ("http://example.com", "example.com", None),
    ("http://example.com:80", "example.com", None),
    ("https://example.com", "example.com", "https"),
    ("https://example.com", "example.com:443", "https"),
    ("http://[::1]:8000", "[::1]:8000", None),
])
def test_the_gateways_own_origin_is_allowed(origin: str, host: str, proto: str | None) -> None:
    assert own_origin(origin, host, proto)
    assert origin_allowed(origin, host, (), proto)


@pytest.mark.parametrize(("origin", "host", "proto"), [
    ("http://evil.example", "127.0.0.1:8000", None),
    ("http://127.0.0.1:8001", "127.0.0.1:8000", None),
    ("https://127.0.0.1:8000", "127.0.0.1:8000", None),
    ("http://example.com", "example.com", "https"),
    ("http://example.com.evil.example", "example.com", None),
    ("null", "127.0.0.1:8000", None),
    ("http://127.0.0.1:8000/path", "127.0.0.1:8000", None),
    ("http://user@127.0.0.1:8000", "127.0.0.1:8000", None),
    ("ftp://127.0.0.1:8000", "127.0.0.1:8000", None),
    ("http://127.0.0.1:99999", "127.0.0.1:99999", None),
    ("http://127.0.0.1:8000", None, None),
    ("http://127.0.0.1:8000", "", None),
])
def test_other_origins_are_refused(origin: str, host: str | None, proto: str | None) -> None:
    assert not origin_allowed(origin, host, (), proto)


def test_allow_list_is_exact_and_star_allows_any_and_no_origin_is_no_browser() -> None:
    allowed = ("https://app.example",)
    assert origin_allowed("https://app.example", "gw:8000", allowed)
    assert not origin_allowed("https://app.example:443", "gw:8000", allowed)
    assert not origin_allowed("https://APP.example", "gw:8000", allowed)
    assert origin_allowed("http://anything.example", "gw:8000", ("*",))
    assert origin_allowed(None, "gw:8000", ())


# --- secrets, tokens, guards ----------------------------------------------------------------


def test_short_secrets_are_refused_with_a_way_to_make_one() -> None:
    with pytest.raises(ValueError, match="secrets.token_urlsafe"):
        check_secret("k" * (MIN_SECRET_BYTES - 1))
    assert check_secret("é" * 16) == "é" * 16, "bytes, not characters"


def test_claims_carry_the_expiry() -> None:
    secret = "s" * 32
    token = mint_token(secret, "alice", now=1000.0, ttl_s=3)
    claims = verify_claims(secret, token, now=1003.0)
    assert (claims.user, claims.exp) == ("alice", 1003)
    with pytest.raises(AuthError, match="expired"):
        verify_claims(secret, token, now=1003.5)
    with pytest.raises(AuthError):
        verify_claims(secret, "é.é", now=1000.0)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.1", False), ("gateway-1", False),
    ("localhost.evil.example", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_open_gateway_needs_a_secret_or_insecure() -> None:
    problem = exposure_problem("0.0.0.0", has_secret=False, insecure=False)
    assert problem is not None and "--auth-secret" in problem and "--insecure" in problem
    assert exposure_problem("0.0.0.0", has_secret=True, insecure=False) is None
    assert exposure_problem("0.0.0.0", has_secret=False, insecure=True) is None
    assert exposure_problem("127.0.0.1", has_secret=False, insecure=False) is None


# --- key names ----------------------------------------------------------------------------------


def test_idempotency_keys_of_different_requests_never_collide() -> None:
    assert KEYSPACE.request("u", "a:b", "c") != KEYSPACE.request("u", "a", "b:c")
    assert KEYSPACE.request("u", "a", "1:2") != KEYSPACE.request("u", "a:1", "2")
    pairs = [("a", "b:c:d"), ("a:b", "c:d"), ("a:b:c", "d"), ("a", ":b"), ("a:", "b")]
    assert len({KEYSPACE.request("u", sid, rid) for sid, rid in pairs}) == len(pairs)


def test_per_user_quota_keys_are_named_from_the_user() -> None:
    assert KEYSPACE.generations("alice").endswith("alice")
    assert KEYSPACE.connections("alice").endswith("alice")
    assert KEYSPACE.generations("alice") != KEYSPACE.connections("alice")
