"""Exceptions of the protocol package.

    ProtocolError
    ├── BadRequest       a client message that PROTOCOL.md does not allow (code `bad_request`)
    └── AuthError        a missing, malformed, forged or expired token (code `unauthorized`)
"""

from __future__ import annotations


class ProtocolError(Exception):
    code = "internal"


class BadRequest(ProtocolError):
    code = "bad_request"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AuthError(ProtocolError):
    code = "unauthorized"
