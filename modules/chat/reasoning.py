"""Reasoning ("thinking") in replies: models such as DeepSeek-R1, Qwen3 or Magistral write their thinking first,
between tags (`<think>...</think>`), then the answer. The one chat path (modules.chat.request) keeps the two apart:
the thinking becomes the reply's `reasoning_content` (the API's field, the history's), the answer its content.

`ReasoningSplitter` separates them as text arrives, holding back only what may still be a tag, so the Chat tab and
the API's streams show the thinking as it is written; `split_reasoning` is the same splitter run over a whole text,
so a streamed reply and its final form always agree. Only a reply that opens with a tag (after blank space) is
thinking, or one whose prompt already opened it (templates that end the generation prompt with `<think>`, as
DeepSeek-R1's does): a tag in the middle of an answer stays text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The (opening, closing) tags models write around their thinking.
THINK_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("<thinking>", "</thinking>"),
                                           ("[THINK]", "[/THINK]"))

Piece = tuple[Literal["reasoning", "content"], str]


def prompt_opens_thinking(prompt: str) -> tuple[str, str] | None:
    """The tags whose opening one ends the prompt (the reply starts inside the thinking), or None."""
    end = prompt.rstrip()
    return next((pair for pair in THINK_TAGS if end.endswith(pair[0])), None)


@dataclass
class SplitReply:
    """A reply as thinking and answer. `reasoning` is None when the reply did not think (and "" when it opened a
    thinking block and wrote nothing in it); `closed` is False while (or when) the thinking never ended."""

    reasoning: str | None
    content: str
    closed: bool = True


class ReasoningSplitter:
    """Feed a reply's text piece by piece; each `feed` returns the pieces that are certain now, in order, as
    ("reasoning", text) or ("content", text). The thinking's leading and trailing blank space and the blank space
    between the closing tag and the answer are dropped, so the pieces add up to `result`."""

    def __init__(self, opened: tuple[str, str] | None = None):
        self._state: Literal["start", "thinking", "after", "content"] = "thinking" if opened else "start"
        self._close = opened[1] if opened else ""
        self._buffer = ""
        self._thinking_started = False  # leading blank space of the thinking is dropped until it starts
        self.reasoning: str | None = "" if opened else None
        self.content = ""

    @property
    def thinking(self) -> bool:
        """Whether the text so far ends inside the thinking."""
        return self._state == "thinking"

    @property
    def result(self) -> SplitReply:
        return SplitReply(self.reasoning, self.content, closed=self._state != "thinking")

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while self._step(pieces, final=False):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        """The pieces held back, once the reply has ended (an unclosed thinking keeps what it wrote)."""
        pieces: list[Piece] = []
        while self._step(pieces, final=True):
            pass
        if self._state == "thinking" and self._buffer:
            self._emit(pieces, "reasoning", self._buffer.rstrip())
        elif self._state in ("start", "content") and self._buffer:
            self._emit(pieces, "content", self._buffer)
        self._buffer = ""
        return pieces

    def _step(self, pieces: list[Piece], *, final: bool) -> bool:
        """Move on by one state where the buffer allows; True when another step may follow."""
        buffer = self._buffer
        if self._state == "start":
            head = buffer.lstrip()
            pair = next((p for p in THINK_TAGS if head.startswith(p[0])), None)
            if pair is not None:
                self._state, self._close, self.reasoning = "thinking", pair[1], ""
                self._buffer = head[len(pair[0]):]
                return True
            if not final and (not head or any(p[0].startswith(head) for p in THINK_TAGS)):
                return False  # blank space or the start of a tag: wait
            self._state = "content"
            return True
        if self._state == "thinking":
            if not self._thinking_started:
                self._buffer = buffer = buffer.lstrip()
                self._thinking_started = bool(buffer)
            end = buffer.find(self._close)
            if end >= 0:
                self._emit(pieces, "reasoning", buffer[:end].rstrip())
                self._state, self._buffer = "after", buffer[end + len(self._close):]
                return True
            keep = _held_back(buffer, self._close)
            self._emit(pieces, "reasoning", buffer[:len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep:]
            return False
        if self._state == "after":
            head = buffer.lstrip()
            if not head:
                if final:
                    self._buffer = ""
                return False
            self._state, self._buffer = "content", head
            return True
        self._emit(pieces, "content", buffer)
        self._buffer = ""
        return False

    def _emit(self, pieces: list[Piece], kind: Literal["reasoning", "content"], text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.reasoning = (self.reasoning or "") + text
        else:
            self.content += text
        if pieces and pieces[-1][0] == kind:
            pieces[-1] = (kind, pieces[-1][1] + text)
        else:
            pieces.append((kind, text))


def _held_back(buffer: str, close: str) -> int:
    """How many characters at the end of the thinking to hold back: blank space (dropped if the tag follows) and
    anything that may be the start of the closing tag."""
    keep = 0
    for length in range(min(len(close) - 1, len(buffer)), 0, -1):
        if close.startswith(buffer[-length:]):
            keep = length
            break
    rest = buffer[:len(buffer) - keep]
    return keep + (len(rest) - len(rest.rstrip()))


def split_reasoning(text: str, opened: tuple[str, str] | None = None) -> SplitReply:
    """A whole reply as thinking and answer (`opened`: the prompt opened the thinking, see prompt_opens_thinking)."""
    splitter = ReasoningSplitter(opened)
    splitter.feed(text)
    splitter.finish()
    return splitter.result
