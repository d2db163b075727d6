"""A Generation (a blocking iterator owned by the ModelManager's queue) driven from a worker thread and read from
the event loop, with the client's disconnect cancelling it; a chat reply's stream of content, thinking and tool
calls; which of a reply's tokens wrote its thinking and which its answer (for logprobs and reasoning_tokens, one
split for every route); and SSE framing."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from modules.chat.reasoning import ReasoningSplitter
from modules.chat.request import ChatReply
from modules.chat.tool_calls import new_call_id, scan_reply
from modules.model_manager import Generation
from modules.stopping import StreamChunk
from modules.thread_pump import Ended, pump_items

_POLL_S = 0.05  # how often a waiting request checks whether its client is gone


class ClientGone(Exception):
    """The client disconnected; its generation was cancelled."""


class GenerationRun:
    """Iterates `generation` in a daemon thread; `await next_chunk()` hands its chunks to the event loop.
    `cancel()` (or the client leaving) stops it within a token and frees the model's queue."""

    def __init__(self, generation: Generation, request: Request | None):
        self.generation = generation
        self.request = request
        self.chunks: list[StreamChunk] = []
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamChunk | Ended] = asyncio.Queue()
        self.finished = False
        pump_items(generation, self._put, name="api-generation")

    def _put(self, item: StreamChunk | Ended) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): stop generating
            self.generation.cancel()

    def cancel(self) -> None:
        self.generation.cancel()

    async def next_chunk(self, *, watch_disconnect: bool = True) -> StreamChunk | None:
        """The next chunk, or None at the end; raises the generation's error, or ClientGone."""
        if self.finished:
            return None
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=_POLL_S) if watch_disconnect \
                    else await self._queue.get()
            except TimeoutError:
                if self.request is not None and await self.request.is_disconnected():
                    self.cancel()
                    raise ClientGone() from None
                continue
            if isinstance(item, Ended):
                self.finished = True
                if item.error is not None:  # turned into an API error by the request
                    raise item.error
                return None
            self.chunks.append(item)
            return item

    async def collect(self) -> str:
        """Run to the end (cancelling if the client leaves); the text."""
        try:
            while await self.next_chunk() is not None:
                pass
        except BaseException:
            self.cancel()
            raise
        return self.generation.text

    @property
    def tokens(self) -> list[Any]:
        return [token for chunk in self.chunks for token in chunk.tokens]


@dataclass
class TextPiece:
    """Content text, with the tokens that wrote it (for logprobs): never the thinking's."""

    text: str
    tokens: list[Any]


@dataclass
class ReasoningPiece:
    """Thinking text (the reply's reasoning_content), as the model writes it."""

    text: str


@dataclass
class CallStart:
    """A tool call begins: its place among the reply's calls, its id and the function's name."""

    index: int
    id: str
    name: str


@dataclass
class CallArguments:
    """More of a tool call's arguments (JSON text; the pieces of one call concatenate to its arguments)."""

    index: int
    text: str


ReplyEvent = TextPiece | ReasoningPiece | CallStart | CallArguments


@dataclass
class _SentCall:
    id: str
    name: str
    shown: int = 0  # characters of its raw arguments sent


class HeldBackText:
    """A chat run's reply as it streams: its content, and its tool calls with their arguments passed on as the
    model writes them. What may still be a call's markup is held back, so a client never sees it as text; with
    a forced call (`forced`) nothing is shown as text until the end. `names` are the functions the request
    offers (None: no tools, all is text). With a `splitter` (modules.chat.reasoning) the reply's thinking is kept
    out of its content: sent as ReasoningPiece events with `reasoning`, else dropped. `content_start` is where
    the answer begins in the generated text (characters; 0 without thinking), known from the answer's first piece
    on and always after `finish()`: the tokens before it wrote the thinking (see split_tokens). Each TextPiece
    carries the answer's tokens that end within its text (a token that runs on past it goes with the next piece;
    those of a call's markup with none); `reasoning_tokens` counts the thinking's once the run has ended."""

    def __init__(self, run: GenerationRun, first: StreamChunk | None, names: set[str] | None, *,
                 forced: bool = False, splitter: ReasoningSplitter | None = None, reasoning: bool = False):
        self.run, self._first, self.names, self.forced = run, first, names, forced
        self.splitter, self.reasoning = splitter, reasoning
        self.text = ""  # the content so far (without the thinking)
        self._shown = 0  # characters of text sent as content
        self._tokens: list[Any] = []  # tokens not yet sent with a piece of content
        self._token_offset = 0  # where the first of them begins in the generated text (characters)
        self._sent: list[_SentCall] = []
        self._fed = 0  # characters of generated text given to the splitter
        self.content_start: int | None = None if splitter is not None else 0

    async def events(self) -> AsyncIterator[ReplyEvent]:
        """What to send now, to the end of the run; then `finish()` gives the rest."""
        piece = self._first
        while piece is not None:
            self._tokens += piece.tokens
            self._fed += len(piece.text)
            parts = self.splitter.feed(piece.text) if self.splitter is not None else [("content", piece.text)]
            self._note_content_start()
            for event in self._take(parts) + self._advance():
                yield event
            piece = await self.run.next_chunk(watch_disconnect=False)

    def _take(self, parts: list[tuple[str, str]]) -> list[ReplyEvent]:
        """Add the content of `parts` to the text; their thinking as events (when they are sent)."""
        events: list[ReplyEvent] = []
        for kind, text in parts:
            if kind == "content":
                self.text += text
            elif self.reasoning:
                events.append(ReasoningPiece(text))
        return events

    def finish(self) -> tuple[list[ReplyEvent], list[dict[str, Any]]]:
        """(the events still to send, the reply's finished tool calls under the ids they were sent with), once
        the run has ended. Calls cut off before their end were sent as far as written and are not among them."""
        held: list[ReplyEvent] = self._take(self.splitter.finish()) if self.splitter is not None else []
        self._note_content_start()
        if self.content_start is None:  # no answer: all that was written is thinking
            self.content_start = self._fed
        if self.names is None:
            return held + self._content(len(self.text)), []
        scan = scan_reply(self.text, self.names, final=True)
        events: list[ReplyEvent] = held
        if not self._sent:
            events += self._content(scan.content_end)
        calls: list[dict[str, Any]] = []
        for index, draft in enumerate(scan.calls):
            sent = self._sent_for(index, draft.name, events)
            if sent is None or draft.call is None:
                break
            if sent.shown:
                rest = draft.arguments[sent.shown:]
            else:
                rest = draft.call["function"]["arguments"]
            if rest:
                events.append(CallArguments(index, rest))
            calls.append({**draft.call, "id": sent.id})
        return events, calls

    def _note_content_start(self) -> None:
        """Once the splitter has given content, where it began: the splitter holds nothing back after that."""
        if self.content_start is None and self.splitter is not None and self.splitter.content:
            self.content_start = self._fed - len(self.splitter.content)

    def _advance(self) -> list[ReplyEvent]:
        if self.names is None:
            return self._content(len(self.text))
        scan = scan_reply(self.text, self.names, start=self._shown)
        events: list[ReplyEvent] = []
        if not self._sent and not self.forced:
            events += self._content(scan.content_end)
        for index, draft in enumerate(scan.calls):
            if draft.name is None:
                break
            sent = self._sent_for(index, draft.name, events)
            if sent is None:
                break
            if draft.streams and len(draft.arguments) > sent.shown:
                events.append(CallArguments(index, draft.arguments[sent.shown:]))
                sent.shown = len(draft.arguments)
            if not draft.complete:
                break
        return events

    @property
    def reasoning_tokens(self) -> int:
        """How many tokens wrote the thinking (0 without one); once `finish()` has been called."""
        return len(split_tokens(self.run.tokens, self.content_start or 0)[0])

    def _content(self, end: int) -> list[ReplyEvent]:
        """The content up to `end` (characters of `text`) not sent yet, with its tokens; only called once the
        content has begun, so content_start is known."""
        if end <= self._shown:
            return []
        start = self.content_start or 0
        thinking, rest = split_tokens(self._tokens, start, self._token_offset)
        offset = self._token_offset + _length(thinking)
        answer, self._tokens = split_tokens(rest, start + end, offset)
        self._token_offset = offset + _length(answer)
        piece = TextPiece(self.text[self._shown:end], answer)
        self._shown = end
        return [piece]

    def _sent_for(self, index: int, name: str | None, events: list[ReplyEvent]) -> _SentCall | None:
        """The call sent at `index`, starting it (an event) when it is the next one; None when the reply now
        names another function there than the one sent (what was sent stands)."""
        if index < len(self._sent):
            sent = self._sent[index]
            return sent if sent.name == name else None
        if name is None or index > len(self._sent):
            return None
        sent = _SentCall(new_call_id(), name)
        self._sent.append(sent)
        events.append(CallStart(index, sent.id, name))
        return sent


def split_tokens(tokens: list[Any], start: int, offset: int = 0) -> tuple[list[Any], list[Any]]:
    """(the tokens that end at or before character `start` of the generated text, the others): a thinking
    reply's thinking tokens and its answer's. `offset` is where the first of `tokens` begins."""
    before: list[Any] = []
    for number, token in enumerate(tokens):
        offset += len(token.text)
        if offset > start:
            return before, tokens[number:]
        before.append(token)
    return before, []


def reply_tokens(reply: ChatReply, tokens: list[Any]) -> tuple[list[Any], list[Any]]:
    """(the tokens that wrote a finished reply's thinking, those that wrote its content: the answer up to its first
    tool call); the split HeldBackText makes as the reply streams."""
    start = content_start(reply.text, reply.answer)
    thinking, answer = split_tokens(tokens, start)
    if reply.tool_calls:  # the text before the calls
        answer = split_tokens(answer, start + len(reply.content or ""), _length(thinking))[0]
    return thinking, answer


def content_start(text: str, answer: str | None) -> int:
    """Where the answer begins in a generated text (its thinking and the blank after it come first)."""
    return len(text) - len(answer) if answer is not None and text.endswith(answer) else 0


def _length(tokens: list[Any]) -> int:
    return sum(len(token.text) for token in tokens)


def sse(data: BaseModel | dict[str, Any] | str, event: str | None = None) -> str:
    """One server-sent event: `data: <json>` and a blank line (with `event:` for Anthropic's stream)."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json(exclude_none=True)
    elif isinstance(data, dict):
        payload = json.dumps(data, ensure_ascii=False)
    else:
        payload = data
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


async def guarded(stream: AsyncIterator[str], runs: list[GenerationRun]) -> AsyncIterator[str]:
    """Cancel every run of a streamed response when the stream ends early (client gone, error)."""
    try:
        async for item in stream:
            yield item
    finally:
        for run in runs:
            run.cancel()
