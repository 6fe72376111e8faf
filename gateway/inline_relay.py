"""``InlineRelay``: a stream's plain tokens written straight from the pub/sub reader.

At thousands of streams the relay's cost per event was mostly waking up: each pub/sub
message woke its stream's task, which parsed the batch, rendered a chunk and wrote it, then
went back to waiting. A batch in the steady state (plain tokens, from the current claim, next
in sequence) needs none of that task's judgement. So while the task waits, its listener
offers each message here first, and the frame goes out in the pub/sub reader's own turn of
the event loop: no task wakes, no future is made, no timeout is re-armed.

Ordering rule: a message is taken here only while the stream's task waits with nothing queued
(``Listener.deliver``) and no earlier inline write is still under way (``Outlet.ready``), so
frames leave in sequence order whichever path writes them. Everything else (a gap, another
claim's batch, a ``started`` or terminal event, a message that comes while the task is busy)
takes the task's path as before; a message declined here is left exactly as it came.
"""

from __future__ import annotations

from gateway.dispatch import Dispatch
from gateway.openai_format import ChunkWriter
from gateway.sse import Outlet, StreamCut

EVENTS_PER_WRITE = 64  # a write's bound, so a reader that stops reading is found out in time


class InlineRelay(Outlet):
    """One stream's ``Outlet`` that also takes its pub/sub messages: the listener's ``sink``
    (``Listener.sink``). One object per stream, since there are thousands of them."""

    __slots__ = ("dispatch", "writer")

    def __init__(
        self, dispatch: Dispatch, writer: ChunkWriter, cut: StreamCut, send_timeout_s: float
    ) -> None:
        super().__init__(cut, send_timeout_s)
        self.dispatch = dispatch
        self.writer = writer

    def __call__(self, raw: str) -> bool:
        """Relay ``raw`` now; False when it has to take the stream task's path."""
        if not self.ready():
            return False
        reader = self.dispatch.events
        events = reader.inline_events(raw, most=EVENTS_PER_WRITE)
        if events is None:
            return False
        frames = self.writer.frames(events)  # before anything moves: if it fails, the
        reader.advance(events)  # message takes the task's path as it came
        self.write(frames)
        self.dispatch.note(events)  # after the write: the events went out whatever it does
        return True
