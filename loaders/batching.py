"""The batching seam: a loaded model decodes several sequences together, and sequences join and leave between
steps (continuous batching). The scheduler (modules/serving) drives a BatchDecoder from one thread per resident
model; a loader that cannot batch is driven through SerialDecoder, one sequence at a time, by the same scheduler.

A step advances every sequence once: a sequence still reading its prompt consumes the next chunk of it, the others
generate one token. So a long prompt never freezes the sequences already generating: it is read a chunk per step
while they go on.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from modules.errors import UnsupportedParameter
from modules.generation_params import GenerationParams, TokenEvent

if TYPE_CHECKING:
    from loaders.base import LoadedModel, VisionPrompt

#: Why a sequence ended: its end-of-generation token ("stop"), max_new_tokens ("length"), the context is full
#: ("length" too), or nothing may follow under its grammar ("stop").
Finish = Literal["stop", "length"]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter a request asks for: its name in the LoRA folder and its scale, and where it lives (the
    manager resolves it inside the LoRA folder; a loader has no folder of its own). Equal by name and scale."""

    name: str
    scale: float = 1.0
    path: Path | None = field(default=None, compare=False)


@dataclass
class SequenceRequest:
    """What a sequence needs to start: its prompt as token ids (or text, for loaders without a tokenizer; or a
    VisionPrompt, ids and images, which runs alone through SerialDecoder), its
    knobs, the adapters it runs with (None: the model's own applied adapters; empty: none at all) and a cancel
    flag the decoder may read during long work (a prompt's evaluation)."""

    prompt: list[int] | str | VisionPrompt
    params: GenerationParams
    adapters: tuple[Adapter, ...] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class StepOutput:
    """What one step did for one sequence: the token it generated (None while it still reads its prompt), and why
    it ended, if it did, or the error that ended it alone (the decoder has then removed it). An error that a
    step raises instead ends every sequence of the batch."""

    key: int
    token: TokenEvent | None = None
    finished: Finish | None = None
    error: BaseException | None = None


class BatchDecoder(ABC):
    """A model's sequences, decoded together. Used from one thread at a time (the scheduler's)."""

    #: Most sequences at once.
    slots: int

    @abstractmethod
    def add(self, key: int, request: SequenceRequest) -> None:
        """Start a sequence under `key` (a free slot exists: the scheduler checks `free`). Raise a WorkbenchError
        for what the request cannot have (a knob, a grammar); nothing is left half-added."""

    @abstractmethod
    def step(self) -> list[StepOutput]:
        """Advance every sequence once. A sequence that ended is reported with `finished` (or `error`) and
        removed."""

    def takes(self, params: GenerationParams) -> bool:
        """Whether a sequence with these knobs can run in this batch; the scheduler runs the others alone,
        through SerialDecoder (beam search, guidance: what needs a batch of one)."""
        return True

    @abstractmethod
    def remove(self, key: int) -> None:
        """Drop a sequence now (cancelled, or its caller left); unknown keys are ignored."""

    @property
    @abstractmethod
    def active(self) -> int:
        """Sequences started and not yet ended or removed."""

    @property
    def free(self) -> int:
        return self.slots - self.active

    def accepts(self, adapters: tuple[Adapter, ...] | None) -> bool:
        """Whether a sequence with these adapters can join the sequences running now (llama.cpp applies adapters
        to the whole context, so sequences run in groups of one adapter set). An idle decoder accepts any."""
        return True

    def close(self) -> None:
        """Free what the decoder holds beside the model (buffers, sampler chains of running sequences)."""


class SerialDecoder(BatchDecoder):
    """One sequence at a time through `LoadedModel.stream`: the batching seam for loaders that cannot batch, and
    for requests with a knob that needs a batch of one (beam search, guidance). Each step takes one token from
    the stream; the first step evaluates the whole prompt."""

    slots = 1

    def __init__(self, model: LoadedModel):
        self.model = model
        self._key: int | None = None
        self._request: SequenceRequest | None = None
        self._tokens: Iterator[TokenEvent] | None = None
        self._count = 0

    @property
    def active(self) -> int:
        return 0 if self._key is None else 1

    def accepts(self, adapters: tuple[Adapter, ...] | None) -> bool:
        return True  # one sequence at a time: add() says whether its adapters can be served

    def add(self, key: int, request: SequenceRequest) -> None:
        adapters = request.adapters
        if adapters is not None and ([a.name for a in adapters] != self.model.loras
                                     or any(a.scale != 1.0 for a in adapters)):
            raise UnsupportedParameter(
                f"{self.model.name} serves one request at a time here, with the LoRAs applied to it in the Model tab "
                f"({', '.join(self.model.loras) or 'none'}); a request's own LoRAs need a loader that batches "
                "(--parallel 2 or more) and knobs it can batch.")
        self._tokens = self.model.stream(request.prompt, request.params, request.cancel)
        self._key, self._request, self._count = key, request, 0

    def step(self) -> list[StepOutput]:
        if self._key is None or self._tokens is None or self._request is None:
            return []
        key, params = self._key, self._request.params
        try:
            token = next(self._tokens)
        except StopIteration:
            self.remove(key)
            return [StepOutput(key, finished="length" if self._count >= params.max_new_tokens else "stop")]
        except Exception as exc:  # this sequence's failure, told to its caller
            self.remove(key)
            return [StepOutput(key, error=exc)]
        self._count += 1
        if self._count >= params.max_new_tokens:
            self.remove(key)
            return [StepOutput(key, token, finished="length")]
        return [StepOutput(key, token)]

    def remove(self, key: int) -> None:
        if key != self._key:
            return
        tokens, self._tokens, self._key, self._request = self._tokens, None, None, None
        close = getattr(tokens, "close", None)
        if close is not None:  # stops the backend at once (frees the model's lock, closes a remote stream)
            close()

    def close(self) -> None:
        if self._key is not None:
            self.remove(self._key)
