"""The Origin check of a WebSocket handshake (PROTOCOL.md, "Security and limits").

A browser sends `Origin` with every WebSocket handshake and no page can forge it; a page on
another site that opens a socket to the gateway (cross-site WebSocket hijacking) is refused.
Allowed: no `Origin` at all (not a browser); the gateway's own origin (the scheme of the
request, from `X-Forwarded-Proto` behind a proxy, else http, with the host and port of its
`Host` header: the page served at `/`); any origin in the allow-list, compared exactly; any
at all when the allow-list holds `*`.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def _endpoint(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    """(scheme, lower-case host, port with the scheme's default), or None if unparsable."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or scheme not in DEFAULT_PORTS or parts.username is not None or parts.path:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def own_origin(origin: str, host: str | None, forwarded_proto: str | None = None) -> bool:
    """True when `origin` is the gateway's own, as reached with this `Host` header."""
    if host is None:
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.path or parts.query or parts.fragment:
        return False
    scheme = (forwarded_proto or "http").split(",")[0].strip().lower()
    theirs = _endpoint(parts.scheme.lower(), parts.netloc)
    ours = _endpoint(scheme, host.strip())
    return theirs is not None and theirs == ours


def origin_allowed(
    origin: str | None, host: str | None, allowed: Collection[str], forwarded_proto: str | None = None
) -> bool:
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return own_origin(origin, host, forwarded_proto)
