"""Work on a thread of its own, handed to a consumer item by item.

A generation blocks its thread for as long as it runs, while its consumer (a browser's stream, an API response on
the event loop, a loader's token iterator) must stay free to watch for a stop or a disconnect. `pump` runs the work
on a daemon thread and passes each item it produces to the consumer's `deliver`, then always one `Ended` (with the
error, if the work raised), so a consumer never waits for an item that cannot come.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Ended:
    """The last item a pump delivers: `error` is what the work raised (re-raise it in the consumer), or None."""

    error: BaseException | None = None


def pump(work: Callable[[Callable[[T], None]], Any], deliver: Callable[[T | Ended], None], *,
         name: str) -> threading.Thread:
    """Start `work(put)` on a daemon thread; each `put(item)` calls `deliver(item)`, and when the work returns or
    raises, `deliver(Ended(error))` is called exactly once. Returns the started thread."""

    def run() -> None:
        error: BaseException | None = None
        try:
            work(deliver)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            error = exc
        finally:
            deliver(Ended(error))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def pump_items(items: Iterable[T], deliver: Callable[[T | Ended], None], *, name: str) -> threading.Thread:
    """`pump` for work that is an iterable: each item it yields is delivered."""

    def work(put: Callable[[T], None]) -> None:
        for item in items:
            put(item)

    return pump(work, deliver, name=name)
