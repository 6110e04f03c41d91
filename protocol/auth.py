"""HMAC-signed user tokens: `base64url(claims).base64url(hmac_sha256(secret, claims))`.

Minted by `python -m gateway token --user NAME`; checked by every gateway sharing the secret.
Each carries its user and its expiry. Pure: the caller passes the clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec

from protocol.errors import AuthError
from protocol.messages import USER_RE

DEFAULT_TTL_S = 3_600
MIN_SECRET_BYTES = 32
MAKE_A_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class Claims(msgspec.Struct, frozen=True):
    user: str
    exp: int
    """Expiry, Unix seconds."""


_claims_decoder = msgspec.json.Decoder(Claims)


def check_secret(secret: str) -> str:
    """`secret` if it is long enough to sign tokens with, else `ValueError` saying how to make one."""
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        raise ValueError(
            f"the auth secret is {size} bytes; it must be at least {MIN_SECRET_BYTES} "
            f"(make one with: {MAKE_A_SECRET})"
        )
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, payload: bytes) -> bytes:
    return hmac.new(secret.encode(), payload, hashlib.sha256).digest()


def mint_token(secret: str, user: str, now: float, ttl_s: int = DEFAULT_TTL_S) -> str:
    if not USER_RE.match(user):
        raise AuthError(f"invalid user name {user!r}: use 1-64 of A-Za-z0-9_.@-")
    payload = msgspec.json.encode(Claims(user=user, exp=int(now) + ttl_s))
    return f"{_b64(payload)}.{_b64(_sign(secret, payload))}"


def verify_claims(secret: str, token: str, now: float) -> Claims:
    """The token's claims, or `AuthError` (malformed, wrongly signed, expired)."""
    try:
        payload_part, sig_part = token.split(".")
        payload, signature = _unb64(payload_part), _unb64(sig_part)
    except ValueError:
        raise AuthError("malformed token") from None
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        raise AuthError("invalid token signature")
    try:
        claims = _claims_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise AuthError("malformed token claims") from None
    if claims.exp < now:
        raise AuthError("token expired")
    if not USER_RE.match(claims.user):
        raise AuthError("invalid user in token")
    return claims


def verify_token(secret: str, token: str, now: float) -> str:
    """The token's user, or `AuthError`."""
    return verify_claims(secret, token, now).user
