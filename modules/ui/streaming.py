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
from modules.thread_pump import Ended, pump_items

#: Seconds between updates sent to the browser (each one re-renders the reply there, and costs the server
#: CPU time the model could use).
DEFAULT_INTERVAL_S = 0.1
#: Seconds the first update waits for the first chunk. Sent together, the user's message and the first words
#: cost the browser one render instead of two, and that render no longer competes with the prompt's processing
#: for the CPU (on 2 cores it delayed the first token by about 60 ms). A slow prompt still shows the message
#: this soon.
FIRST_UPDATE_WAIT_S = 0.3


def stream_batches(generation: Generation, *, interval_s: float = DEFAULT_INTERVAL_S,
                   first_wait_s: float = FIRST_UPDATE_WAIT_S) -> Iterator[list[StreamChunk]]:
    """Start `generation` now, and return an iterator of lists of its chunks, at most one list per `interval_s`,
    until it ends.

    The first list comes with the first chunk, or empty after `first_wait_s` without one (also when the generation
    ends or fails before its first chunk), so a caller that sends one update per list always sends a first one,
    and soon. Every later list holds at least one chunk.
    It starts before the first list is asked for, so the prompt is processed while the caller prepares its first
    update. The consumer wakes for the first chunk of a list and then only at the list's deadline or at the end,
    not for every token. Errors of the generation are raised from the iterator. Closing the iterator early (the
    page went away) cancels the generation; a caller that never iterates it must cancel the generation itself."""
    inbox: queue.SimpleQueue[StreamChunk | Ended] = queue.SimpleQueue()
    ended = threading.Event()

    def deliver(item: StreamChunk | Ended) -> None:
        inbox.put(item)
        if isinstance(item, Ended):
            ended.set()

    pump_items(generation, deliver, name="generation-stream")
    return _batches(generation, inbox, ended, interval_s, first_wait_s)


def _batches(generation: Generation, inbox: queue.SimpleQueue[StreamChunk | Ended], ended: threading.Event,
             interval_s: float, first_wait_s: float) -> Iterator[list[StreamChunk]]:
    last_yield = 0.0
    done: Ended | None = None
    try:
        try:
            items = [inbox.get(timeout=first_wait_s)]
        except queue.Empty:
            items = []
        while True:
            if items and not isinstance(items[0], Ended):
                ended.wait(timeout=max(0.0, last_yield + interval_s - time.monotonic()))
            while True:
                try:
                    items.append(inbox.get_nowait())
                except queue.Empty:
                    break
            batch: list[StreamChunk] = []
            for item in items:
                if isinstance(item, Ended):
                    done = item
                    break
                batch.append(item)
            if batch or not last_yield:
                last_yield = time.monotonic()
                yield batch
            if done is not None:
                break
            items = [inbox.get()]  # blocks until the next list's first chunk (or the end)
        if done.error is not None:
            raise done.error
    finally:
        if done is None:
            generation.cancel()
