"""Gateway metrics, served on GET /metrics."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class LoopCounter(Collector):
    """A counter bumped for every frame, on the event loop only: a plain int. A `Counter`
    takes a lock on each increment, a visible share of a busy gateway's CPU (docs/PERFORMANCE.md)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        REGISTRY.register(self)

    def inc(self) -> None:
        self.value += 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric([], self.value)
        yield family


CONNECTIONS = Gauge("tokenrelay_gateway_connections", "Open WebSocket connections")
STREAMS = Gauge("tokenrelay_gateway_streams", "Messages being relayed to a connection now")
MESSAGES_IN = Counter("tokenrelay_gateway_client_messages_total", "Client messages, by type", ["type"])
FRAMES_OUT = LoopCounter("tokenrelay_gateway_frames_out", "Frames sent to clients")
ERRORS = Counter("tokenrelay_gateway_errors_total", "Error replies, by code", ["code"])
CANCELS = Counter("tokenrelay_gateway_cancels_total", "Cancel requests, by outcome", ["status"])
CANCEL_SECONDS = Histogram(
    "tokenrelay_gateway_cancel_seconds",
    "From a cancel's arrival to its cancel_result (the message already ended in the store; "
    "the push to the worker follows)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
)
HEARTBEATS = Counter("tokenrelay_gateway_heartbeats_total", "Client heartbeat messages answered")
PING_RTT = Histogram(
    "tokenrelay_gateway_ping_rtt_seconds",
    "WebSocket ping round trip of client connections",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)
HTTP_REQUESTS = Counter(
    "tokenrelay_gateway_http_requests_total", "Requests to the OpenAI-compatible HTTP edge, by route and status",
    ["route", "status"],
)
CLOSED = Counter("tokenrelay_gateway_closed_total", "Connections closed, by reason", ["reason"])
RESYNCS = Counter(
    "tokenrelay_gateway_log_resyncs_total",
    "Log re-reads relays asked for, by cause: start (attach or resume), gap (a push skipped a seq), "
    "overflow (inbox full behind a slow client), idle (nothing heard for a while), reconnect (pub/sub back)",
    ["cause"],
)
REFUSED = Counter(
    "tokenrelay_gateway_refusals_total",
    "Handshakes, connections and requests refused by a limit of PROTOCOL.md's \"Security and limits\", by limit",
    ["limit"],
)
