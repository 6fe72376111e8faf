"""Stop sequences cut on the text stream, across token boundaries."""

from __future__ import annotations


class StopMatcher:
    """Feed token texts; get back the text safe to emit, and whether a stop sequence ended it.

    Text that could be the start of a stop sequence is held back until the next token settles
    it, so a client never sees part of a stop sequence.
    """

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self.held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.held = ""
            return buf[:cut]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Text still held back when generation ends without a stop."""
        out, self.held = self.held, ""
        return out
