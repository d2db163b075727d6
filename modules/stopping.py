"""The one stop-string filter every caller's stream passes through.

It holds back any tail of the text that could still become a stop string, so a stop string that arrives split
across tokens is caught and never shown in part, and it releases the token events whose text it has let through.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from modules.generation_params import TokenEvent


@dataclass
class StreamChunk:
    """Text that is safe to show, and the token events it came from."""

    text: str
    tokens: list[TokenEvent] = field(default_factory=list)


class StopStringFilter:
    def __init__(self, stop_strings: list[str]):
        self.stops = [s for s in dict.fromkeys(stop_strings) if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""  # text received but not yet released
        self._held_tokens: list[tuple[TokenEvent, int]] = []  # (token, chars of it still held)
        self.stopped = False
        self.matched: str | None = None

    def push(self, token: TokenEvent) -> StreamChunk:
        """Feed one token; return what may be shown now. After a stop matches, `stopped` is True and
        further pushes return nothing."""
        if self.stopped:
            return StreamChunk("")
        self._held += token.text
        self._held_tokens.append((token, len(token.text)))
        if not self.stops:
            return self._release(len(self._held))
        first = None
        for stop in self.stops:
            index = self._held.find(stop)
            if index != -1 and (first is None or index < first[0]):
                first = (index, stop)
        if first is not None:
            self.stopped = True
            self.matched = first[1]
            chunk = self._release(first[0])
            self._held, self._held_tokens = "", []
            return chunk
        return self._release(len(self._held) - self._unsafe_tail())

    def flush(self) -> StreamChunk:
        """Release everything still held (the stream ended without a stop string)."""
        if self.stopped:
            return StreamChunk("")
        return self._release(len(self._held))

    def _unsafe_tail(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of some stop string."""
        held = self._held
        for size in range(min(len(held), self._longest - 1), 0, -1):
            tail = held[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def _release(self, n_chars: int) -> StreamChunk:
        text, self._held = self._held[:n_chars], self._held[n_chars:]
        released: list[TokenEvent] = []
        remaining = n_chars
        while self._held_tokens and remaining > 0:
            token, held_chars = self._held_tokens[0]
            if held_chars <= remaining:
                remaining -= held_chars
                released.append(token)
                self._held_tokens.pop(0)
            else:
                self._held_tokens[0] = (token, held_chars - remaining)
                remaining = 0
        # Tokens that add no text (an incomplete UTF-8 character, a hidden special token) go with the text
        # before them unless text after them is still held.
        while self._held_tokens and self._held_tokens[0][1] == 0 and (n_chars > 0 or not self._held):
            released.append(self._held_tokens.pop(0)[0])
        return StreamChunk(text, released)
