"""The WebSocket gateway.

    GatewayError
    └── SlowConsumer     a client that did not read its frames in time (closed with 4008)
"""

from __future__ import annotations


class GatewayError(Exception):
    pass


class SlowConsumer(GatewayError):
    pass
