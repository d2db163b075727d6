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


def tokens_while_a_long_prompt_is_read(manager: ModelManager, running_prompts: list[list[int]],
                                       long_ids: list[int]) -> list[int]:
    """How many tokens each of the running requests received between the moment a request with `long_ids` was
    submitted and its first token: with the prompt read a chunk per step between the others' steps, about one per
    chunk; read whole first, one or two."""
    params = GenerationParams(do_sample=False, max_new_tokens=4000, ban_eos_token=True)
    running = [start(manager, ids, params) for ids in running_prompts]
    try:
        wait_until(lambda: all(run.tokens for run in running), "the running requests generate")
        submitted = time.monotonic()
        reader = start(manager, long_ids, GenerationParams(do_sample=False, max_new_tokens=2))
        reader.join()
        first = reader.tokens[0][0]
        return [sum(submitted < moment < first for moment, _ in run.tokens) for run in running]
    finally:
        finish(running)


def check_cancel_frees_a_slot(manager: ModelManager, prompts: list[list[int]], slots: int) -> None:
    """With every slot busy one more request waits; cancelling a running one lets it in at once (not after the
    others end), and the slots are all free afterwards."""
    long = GenerationParams(do_sample=False, max_new_tokens=4000, ban_eos_token=True)
    running = [start(manager, ids, long) for ids in prompts[:slots]]
    engine = manager.resident().engine
    waiting = start(manager, prompts[0][:8], GenerationParams(do_sample=False, max_new_tokens=4))
    try:
        wait_until(lambda: engine.busy_slots == slots and engine.waiting == 1, "every slot running, one waiting")
        wait_until(lambda: all(run.tokens for run in running), "every running request has a token")
        assert not waiting.tokens
        running[3].generation.cancel()
        waiting.join()
        assert len(waiting.ids) == 4 and waiting.generation.stats.finish_reason == "length"
        assert not any(run.done for i, run in enumerate(running) if i != 3)  # it took the freed slot
    finally:
        finish(running)
    assert running[3].generation.stats.finish_reason == "cancelled"
    wait_until(lambda: engine.busy_slots == 0, "the slots are free again")
