"""Start-up guards: no gateway listens openly by accident (PROTOCOL.md, "Security and limits")."""

from __future__ import annotations

import ipaddress

from protocol.auth import MAKE_A_SECRET

LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True when `host` names only loopback addresses (a name other than localhost might
    resolve anywhere, so it is not)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, has_secret: bool, insecure: bool) -> str | None:
    """Why the gateway must not start as configured, or None."""
    if has_secret or insecure or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host!r} without an auth secret: anyone who can reach it could act as "
        f"any user. Give one with TOKENRELAY_AUTH_SECRET, --auth-secret-file PATH or --auth-secret "
        f"(make one with: {MAKE_A_SECRET}), listen on 127.0.0.1, or pass --insecure"
    )
