"""Where PyTorch's CPU work runs, and why it matters.

PyTorch's CPU kernels use OpenMP (libgomp). Every thread that runs a parallel region gets a team of worker threads
that lives as long as that thread. Once the process holds more OpenMP threads than there are CPUs, libgomp throttles
the spin-wait of idle workers, and every parallel region then pays for a sleep and a wake-up. A generation is a
long run of small parallel regions, so this costs about 10%: with the starter model on 2 cores, a generation thread
ran at 27.7 tokens/s once the main thread had run the model, and at 31.3 tokens/s while it had not.

The web UI and the API generate in short-lived threads, and their long-lived threads (the main thread, the web
server's workers) must not keep a team alive. So the model manager loads models and LoRAs in a short-lived thread
of their own (`bench/openmp_threads.py` measures the effect).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_short_lived_thread(fn: Callable[[], T], name: str = "model-work") -> T:
    """Run `fn` in a new thread, wait for it, and return its result or raise its exception."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
