"""The early path of a Stop: a cancel's CANCEL script leaves in the callback that read it.

A request normally takes two loop steps before its first Redis command is written: websockets
queues the frame for the connection's reader task, and the reader queues the request for the
dispatcher task. On the 2-vCPU box that was ~0.2 ms of an idle cancel's ~1 ms (three runs of 200
idle cancels: p50 0.80-0.89 ms with this path, 1.01-1.04 ms without; p99 1.44-1.60 against
1.67-1.94). So a `cancel` by message id that arrives while nothing of its connection waits
anywhere (websockets' queue, the request queue, the dispatcher) is decoded in
`data_received`, its script is written at once, and the dispatcher then takes it like any other
request, the reply already on its way. Order is kept: nothing was ahead of it, and whatever
comes after queues behind it. Anything else, or a cancel that finds something ahead of it,
takes the usual path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

from protocol.messages import Cancel
from store.lean import Sent

EarlyHandler = Callable[[bytes], bool]
"""Given a complete text frame's payload: True when it was taken (and must not be queued)."""


class EarlyConnection(ServerConnection):
    """A websockets server connection that offers each complete text frame to `early` before
    queueing it for the reader, but only while no earlier message is queued there."""

    early: EarlyHandler | None = None

    def process_event(self, event: Event) -> None:
        early = self.early
        if (
            early is not None
            and isinstance(event, Frame)
            and event.opcode is Opcode.TEXT
            and event.fin
            and not self.recv_messages.frames
            and early(bytes(event.data))
        ):
            return
        super().process_event(event)


@dataclass(slots=True)
class SentCancel:
    """A cancel whose CANCEL script is already written, for the dispatcher to finish."""

    message: Cancel
    sent: Sent
    held: asyncio.Event
    """The message's terminal waits on this connection until `cancel_result` is out."""
    started: float = field(default_factory=time.perf_counter)
