"""A Generation (a blocking iterator owned by the ModelManager's queue) driven from a worker thread and read from
the event loop, with the client's disconnect cancelling it; and SSE framing."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from modules.model_manager import Generation
from modules.stopping import StreamChunk

_END = object()
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
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._thread = threading.Thread(target=self._work, name="api-generation", daemon=True)
        self._thread.start()
        self.finished = False

    def _work(self) -> None:
        try:
            for chunk in self.generation:
                self._put(chunk)
        except BaseException as exc:  # handed to the request, which turns it into an API error
            self._put(exc)
        finally:
            self._put(_END)

    def _put(self, item: Any) -> None:
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
            if item is _END:
                self.finished = True
                return None
            if isinstance(item, BaseException):
                self.finished = True
                raise item
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


class HeldBackText:
    """A run's text as it streams, except a reply that may still turn out to be a tool call: that is held back
    until it cannot be one, so a client never sees the raw markup of a call."""

    def __init__(self, run: GenerationRun, first: StreamChunk | None, hold: Callable[[str], bool] | None):
        self.run, self._first, self._hold = run, first, hold
        self.holding = hold is not None
        self.held = ""

    async def pieces(self) -> AsyncIterator[tuple[str, StreamChunk]]:
        """(text to show now, the chunk that released it), to the end of the run."""
        piece = self._first
        while piece is not None:
            if self.holding:
                self.held += piece.text
                if self._hold is not None and self._hold(self.held):
                    piece = await self.run.next_chunk(watch_disconnect=False)
                    continue
                self.holding, text = False, self.held
            else:
                text = piece.text
            if text:
                yield text, piece
            piece = await self.run.next_chunk(watch_disconnect=False)

    def rest(self, content: str | None, calls: list[Any]) -> str:
        """What was held to the end and must still be shown: the text before the calls, or the whole reply when it
        held no call after all."""
        if not self.holding:
            return ""
        return (content or "") if calls else self.held


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
