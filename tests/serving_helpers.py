"""Helpers for tests of concurrent serving through the ModelManager: requests consumed in threads of their own,
each token stamped with the moment its caller received it (how a test proves interleaving), and the reply a
request gets alone (what a batched reply is compared with)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from conftest import wait_until

from modules.chat.templates import render_chat
from modules.generation_params import GenerationParams, TokenEvent
from modules.model_manager import Generation, ModelManager


def chat_ids(manager: ModelManager, question: str) -> list[int]:
    """A one-turn chat prompt in the loaded model's own template, as token ids."""
    model = manager.require_model()
    return model.encode(render_chat(model.chat_template, [{"role": "user", "content": question}],
                                    add_generation_prompt=True))


def alone_events(manager: ModelManager, ids: list[int], params: GenerationParams) -> list[TokenEvent]:
    """The reply's tokens when the request runs alone, through the model's own stream."""
    return list(manager.require_model().stream(ids, params, threading.Event()))


def alone(manager: ModelManager, ids: list[int], params: GenerationParams) -> list[int]:
    return [event.token_id for event in alone_events(manager, ids, params)]


@dataclass
class Run:
    """A request iterated in a thread of its own; each token with the moment its caller received it."""

    generation: Generation
    tokens: list[tuple[float, int]] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    @property
    def ids(self) -> list[int]:
        return [token for _, token in self.tokens]

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def join(self) -> Run:
        assert self.thread is not None
        self.thread.join(timeout=600)
        assert not self.thread.is_alive(), "a request never ended"
        if self.error is not None:
            raise self.error
        return self


def start(manager: ModelManager, ids: list[int], params: GenerationParams, **kwargs) -> Run:
    """Submit a request and wait until the engine holds it (running or queued), so requests start in order."""
    engine = manager.resident(kwargs.get("model")).engine
    before = engine.busy_slots + engine.waiting
    run = Run(manager.generate(ids, params, **kwargs))

    def consume() -> None:
        try:
            for chunk in run.generation:
                run.tokens.extend((time.monotonic(), token.token_id) for token in chunk.tokens)
        except BaseException as exc:  # noqa: BLE001 (told to the test by join())
            run.error = exc

    run.thread = threading.Thread(target=consume, daemon=True)
    run.thread.start()
    wait_until(lambda: engine.busy_slots + engine.waiting > before or run.done, "the request reached the engine")
    return run


def finish(runs: list[Run]) -> None:
    """Cancel what still runs and wait for every request to end (a test's cleanup)."""
    for run in runs:
        run.generation.cancel()
    for run in runs:
        run.join()
