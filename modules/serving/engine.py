"""One resident model's scheduler: a thread that admits waiting requests into the model's free slots, fairly across
clients, advances the batch one step at a time, and hands each request its tokens.

Requests join and leave the running batch between steps (continuous batching) when the model's loader can batch
(`LoadedModel.batch_decoder`); otherwise, and for a request whose knobs need a batch of one, they run one at a time
through SerialDecoder, in arrival order per client. The engine thread is the only one that touches the model while
it serves: loads of LoRAs and evaluations that need the whole model (perplexity) wait for `exclusive()`.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from loaders.base import LoadedModel, VisionPrompt
from loaders.batching import BatchDecoder, SequenceRequest, SerialDecoder, StepOutput
from modules.errors import GenerationError, Overloaded, WorkbenchError
from modules.generation_params import TokenEvent
from modules.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Done:
    """The last item a request receives: why it ended ("stop", "length", "cancelled", "error") and the error."""

    finish: str
    error: BaseException | None = None


@dataclass(eq=False)
class Ticket:
    """A request in an engine: what to decode, where its tokens go, and whose it is (fairness is per client)."""

    request: SequenceRequest
    deliver: Callable[[TokenEvent | Done], None]
    client: str = ""
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when it joined the batch
    key: int = -1

    @property
    def cancelled(self) -> bool:
        return self.request.cancel.is_set()


class ClientQueues:
    """Waiting tickets, one queue per client, served round-robin: a client with fifty requests waiting takes one
    turn in each round, like any other client, while each client's own requests keep their order."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Ticket]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def push(self, ticket: Ticket) -> None:
        self._queues.setdefault(ticket.client, deque()).append(ticket)

    def peek(self) -> Ticket | None:
        """The ticket whose turn it is."""
        for queue in self._queues.values():
            return queue[0]
        return None

    def pop(self) -> Ticket:
        """Take the ticket whose turn it is; its client goes to the back of the round."""
        client, queue = next(iter(self._queues.items()))
        ticket = queue.popleft()
        del self._queues[client]
        if queue:
            self._queues[client] = queue
        return ticket

    def remove_cancelled(self) -> list[Ticket]:
        gone = []
        for client in list(self._queues):
            queue = self._queues[client]
            kept = deque(t for t in queue if not t.cancelled)
            gone += [t for t in queue if t.cancelled]
            if kept:
                self._queues[client] = kept
            else:
                del self._queues[client]
        return gone

    def drain(self) -> list[Ticket]:
        tickets = [t for queue in self._queues.values() for t in queue]
        self._queues.clear()
        return tickets


class Engine:
    """Serves one loaded model from a thread of its own (started at once, stopped by `close`)."""

    def __init__(self, model: LoadedModel, *, name: str, max_queue: int = 0, metrics: ServingMetrics | None = None):
        self.model = model
        self.name = name
        self.max_queue = max_queue  # 0: no limit
        self.metrics = metrics or ServingMetrics()  # told how long each request waited for its slot
        self._batch: BatchDecoder | None = model.batch_decoder() if model.slots > 1 else None
        self._serial = SerialDecoder(model)
        self._decoder: BatchDecoder | None = None  # the one the active sequences are in
        self._waiting = ClientQueues()
        self._active: dict[int, Ticket] = {}
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._exclusive_wanted = 0  # callers of exclusive() waiting for the batch to drain
        self._exclusive_held = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"engine {name}", daemon=True)
        self._thread.start()

    # --- what callers see ----------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self._batch.slots if self._batch is not None else 1

    @property
    def busy_slots(self) -> int:
        with self._cond:
            return len(self._active)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._active and not len(self._waiting) and not self._exclusive_held

    def submit(self, ticket: Ticket) -> None:
        """Queue a request; raises Overloaded when the queue is full."""
        with self._cond:
            if self._closing:
                raise GenerationError(f"{self.name} is being unloaded; send the request again.")
            if self.max_queue and len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting for {self.name} (the limit "
                                 "is --max-queue); try again shortly.")
            self._waiting.push(ticket)
            self._cond.notify_all()

    def wake(self) -> None:
        """Look at the requests again now (one was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def cancel_all(self) -> None:
        """Cancel every running and waiting request."""
        with self._cond:
            for ticket in [*self._active.values(), *[t for t in self._waiting.drain()]]:
                ticket.request.cancel.set()
                if ticket.key < 0:  # was waiting: it ends here
                    ticket.deliver(Done("cancelled"))
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[LoadedModel]:
        """The model with nothing running on it: waits for the running sequences to end (new ones wait meanwhile),
        for work that drives the model directly (applying LoRAs, a perplexity evaluation)."""
        with self._cond:
            self._exclusive_wanted += 1
            self._cond.notify_all()
            while self._active or self._exclusive_held:
                self._cond.wait()
            self._exclusive_wanted -= 1
            self._exclusive_held = True
        try:
            yield self.model
        finally:
            with self._cond:
                self._exclusive_held = False
                self._cond.notify_all()

    def close(self, *, cancel_running: bool = False) -> None:
        """Stop serving: the waiting and running requests finish first (or are cancelled), then the thread ends."""
        if cancel_running:
            self.cancel_all()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        for decoder in (self._batch, self._serial):
            if decoder is not None:
                decoder.close()

    # --- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    for ticket in self._waiting.remove_cancelled():
                        ticket.deliver(Done("cancelled"))
                    if not self._exclusive_wanted and not self._exclusive_held:
                        self._admit()
                    if self._active:
                        break
                    if self._closing and not len(self._waiting) and not self._exclusive_held:
                        return
                    self._cond.wait()
                decoder = self._decoder
                cancelled = [key for key, ticket in self._active.items() if ticket.cancelled]
            assert decoder is not None
            for key in cancelled:
                decoder.remove(key)
                self._end(key, Done("cancelled"))
            if cancelled and not self._active:
                continue
            try:
                outputs = decoder.step()
            except Exception as exc:  # the whole batch failed: every running request is told, the engine goes on
                log.exception("%s: a decode step failed", self.name)
                for key in list(self._active):
                    decoder.remove(key)
                    self._end(key, Done("error", exc))
                continue
            self._hand_out(outputs)

    def _admit(self) -> None:
        """Move waiting tickets into free slots, in their fair order. A ticket that cannot join the sequences
        running now (its knobs need a batch of one, or another adapter set) waits at the head, and nothing is
        admitted past it until the batch has drained, so it is never starved."""
        while (ticket := self._waiting.peek()) is not None:
            alone = (self._batch is None or not self._batch.takes(ticket.request.params)
                     or isinstance(ticket.request.prompt, VisionPrompt))  # images: the serial path reads them
            decoder = self._serial if alone else self._batch
            assert decoder is not None
            if self._active and (decoder is not self._decoder or decoder.free <= 0
                                 or not decoder.accepts(ticket.request.adapters)):
                return
            self._waiting.pop()
            key = next(self._keys)
            try:
                decoder.add(key, ticket.request)
            except Exception as exc:  # this request cannot run (a knob, a grammar): told to it alone
                ticket.deliver(Done("error", exc))
                continue
            ticket.key, ticket.started = key, time.monotonic()
            self.metrics.admitted(self.name, ticket.started - ticket.submitted)
            self._active[key] = ticket
            self._decoder = decoder

    def _hand_out(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            ticket = self._active.get(out.key)
            if ticket is None:
                continue
            if out.token is not None:
                ticket.deliver(out.token)
            if out.error is not None:
                self._end(out.key, Done("error", out.error))
            elif out.finished is not None:  # a stream that saw its cancel flag ends early: that is a cancel
                self._end(out.key, Done("cancelled" if ticket.cancelled else out.finished))

    def _end(self, key: int, done: Done) -> None:
        with self._cond:
            ticket = self._active.pop(key, None)
            self._cond.notify_all()
        if ticket is not None:
            if done.error is not None and not isinstance(done.error, WorkbenchError):
                log.error("%s: a request failed: %s", self.name, done.error, exc_info=done.error)
            ticket.deliver(done)
