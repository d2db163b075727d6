"""Streaming a Generation to a slow consumer (a browser) without slowing the model down.

The generation runs on its own thread and the consumer takes whatever arrived since its last look, so the model
never waits for the UI to render, and the UI is not flooded with one update per token.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from modules.model_manager import Generation
from modules.stopping import StreamChunk

#: Seconds between updates sent to the browser (each one re-renders the reply there, and costs the server
#: CPU time the model could use).
DEFAULT_INTERVAL_S = 0.1


class _Done:
    def __init__(self, error: BaseException | None = None):
        self.error = error


def stream_batches(generation: Generation, *, interval_s: float = DEFAULT_INTERVAL_S) -> Iterator[list[StreamChunk]]:
    """Start `generation` now, and return an iterator of lists of its chunks (never empty), at most one list per
    `interval_s`, until it ends.

    It starts before the first list is asked for, so the prompt is processed while the caller sends its first
    update (the user's message) to the browser: that round trip through Gradio took about 0.1-0.2 s here.
    The consumer wakes for the first chunk of a list and then only at the list's deadline or at the end, not for
    every token. Errors of the generation are raised from the iterator. Closing the iterator early (the page went
    away) cancels the generation; a caller that never iterates it must cancel the generation itself."""
    inbox: queue.SimpleQueue[StreamChunk | _Done] = queue.SimpleQueue()
    ended = threading.Event()

    def work() -> None:
        try:
            for chunk in generation:
                inbox.put(chunk)
        except BaseException as exc:  # handed to the consumer, which raises it
            inbox.put(_Done(exc))
        else:
            inbox.put(_Done())
        ended.set()

    threading.Thread(target=work, name="generation-stream", daemon=True).start()
    return _batches(generation, inbox, ended, interval_s)


def _batches(generation: Generation, inbox: queue.SimpleQueue[StreamChunk | _Done], ended: threading.Event,
             interval_s: float) -> Iterator[list[StreamChunk]]:
    last_yield = 0.0
    done: _Done | None = None
    try:
        while done is None:
            batch: list[StreamChunk] = []
            items = [inbox.get()]  # blocks until the batch's first chunk (or the end)
            ended.wait(timeout=max(0.0, last_yield + interval_s - time.monotonic()))
            while True:
                try:
                    items.append(inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if isinstance(item, _Done):
                    done = item
                    break
                batch.append(item)
            if batch:
                last_yield = time.monotonic()
                yield batch
        if done.error is not None:
            raise done.error
    finally:
        if done is None:
            generation.cancel()
