"""One generation request as its caller sees it: made in the caller's thread (knobs checked, prompt tokenized,
grammar checked, before it queues), then iterated for StreamChunks while the model's engine decodes it.

Stop strings are applied here, in the caller's thread, by the one StopStringFilter; a match cancels the request
in the engine, which drops it between two steps.
"""
from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loaders.base import Capability, ImagePrompt, LoadedModel, VisionPrompt
from loaders.batching import Adapter, SequenceRequest
from modules.errors import (ContextLengthExceeded, GenerationError, ImagesUnsupported, InvalidInput, Overloaded,
                            WorkbenchError)
from modules.generation_params import GenerationParams, GenerationStats, TokenEvent, check_supported
from modules.serving.engine import Done, Ticket
from modules.stopping import StopStringFilter, StreamChunk

if TYPE_CHECKING:
    from modules.model_manager import ModelManager
    from modules.serving.residents import Resident


def encode_prompt(model: LoadedModel, prompt: str | ImagePrompt, params: GenerationParams,
                  add_bos: bool | None = None) -> list[int]:
    """The token ids a text prompt is generated from: BOS as `add_bos` says (None: as params.add_bos_token says),
    never a second one when the prompt already starts with it. An ImagePrompt's ids hold its images' tokens."""
    if isinstance(prompt, ImagePrompt):
        return encode_image_prompt(model, prompt, params, add_bos).ids
    add = params.add_bos_token if add_bos is None else add_bos
    if add and model.bos_token and prompt.startswith(model.bos_token):
        add = False  # the template already wrote it; never send two
    return model.encode(prompt, add_bos=add)


def encode_image_prompt(model: LoadedModel, prompt: ImagePrompt, params: GenerationParams,
                        add_bos: bool | None = None) -> VisionPrompt:
    """A prompt with images as its vision model reads it; ImagesUnsupported for a model without vision."""
    if Capability.VISION not in model.capabilities:
        raise ImagesUnsupported(model.name)
    add = params.add_bos_token if add_bos is None else add_bos
    if add and model.bos_token and prompt.text.startswith(model.bos_token):
        add = False
    return model.encode_images(prompt, add_bos=add)


def check_text_fits(model: LoadedModel, text: str | int, max_new_tokens: int, *, what: str = "the prompt") -> None:
    """Refuse, without tokenizing, a text (or a size in UTF-8 bytes) that no tokenization could fit in the context
    minus max_new_tokens: each token covers at most `model.max_token_bytes` bytes. Models that do not tell that
    bound pass; their prompts are counted exactly instead."""
    per_token = model.max_token_bytes
    if not per_token:
        return
    size = text if isinstance(text, int) else len(text.encode("utf-8", errors="surrogatepass"))
    at_least = -(-size // per_token)
    if at_least > model.context_length - max_new_tokens:
        raise ContextLengthExceeded(context=model.context_length, prompt_tokens=at_least,
                                    max_new_tokens=max_new_tokens, exact=False, what=what)


class Generation:
    """One request. Iterate it for StreamChunks (text safe to show, with its token events); afterwards `stats`
    and `text` hold the outcome. `cancel()` may be called from any thread; closing the iterator cancels too.

    `model` names a resident model (None: the manager's default one); `adapters` the LoRAs this request runs with
    (None: the model's own); `client` whose request it is (requests are served round-robin across clients);
    `keep_alive` how long the model stays loaded once idle after it (seconds; 0 unloads it, -1 keeps it)."""

    def __init__(self, manager: ModelManager, prompt: str | list[int] | ImagePrompt, params: GenerationParams,
                 *, add_bos: bool | None, strict: bool, cut_to_fit: bool = True, model: str | None = None,
                 adapters: tuple[Adapter, ...] | None = None, client: str = "", keep_alive: float | None = None):
        self._manager = manager
        self.prompt = prompt
        self.params = params if params.seed >= 0 else params.model_copy(update={"seed": random.randrange(2**31)})
        self._add_bos = add_bos
        self._strict = strict
        self._cut_to_fit = cut_to_fit
        self.model_name = model
        self.adapters = adapters
        self.client = client
        self.keep_alive = keep_alive
        self.cancel_event = threading.Event()
        self.stats = GenerationStats()
        self.text = ""
        self.warnings: list[str] = []
        self.prompt_ids: list[int] | None = None
        self._vision: VisionPrompt | None = None  # an ImagePrompt as the model it was made with reads it
        self._prepared_for: LoadedModel | None = None  # the model prompt_ids were made with
        self._resident: Resident | None = None
        resident = manager.resident(model)
        if resident is not None:  # fail fast on knobs the model cannot honour, a prompt too long, a bad grammar
            self._prepare(resident.model)

    def cancel(self) -> None:
        self.cancel_event.set()
        resident = self._resident
        if resident is not None:
            resident.engine.wake()

    def _prepare(self, model: LoadedModel) -> list[int] | str | VisionPrompt:
        self.warnings = check_supported(self.params, model.supported_params, model.loader_name, strict=self._strict)
        prompt = self._prepare_prompt(model)
        self._manager.constraints.check(self.params, model)  # here, not in the queue: a compile may take seconds
        return prompt

    def __iter__(self) -> Iterator[StreamChunk]:
        manager = self._manager
        resident = manager.resident(self.model_name)
        if resident is None:
            raise manager.missing_model(self.model_name)
        model = resident.model
        prompt = self._prepare(model) if self._prepared_for is not model else self._prepare_prompt(model)
        inbox: queue.SimpleQueue[TokenEvent | Done] = queue.SimpleQueue()
        ticket = Ticket(SequenceRequest(prompt, self.params, self.adapters, self.cancel_event), inbox.put,
                        self.client)
        manager.pool.begin(resident)
        self._resident = resident
        outcome = "error"  # until it is queued; then the reply's own finish reason
        try:
            try:
                resident.engine.submit(ticket)
            except Overloaded:
                outcome = "overloaded"
                raise
            outcome = ""
            yield from self._receive(inbox)
        finally:
            self.cancel_event.set()  # the caller left (or the reply ended): the engine drops it if still there
            resident.engine.wake()
            manager.pool.end(resident, self.keep_alive)
            self._count(resident.name, outcome or self.stats.finish_reason, queued=not outcome)

    def _count(self, model: str, outcome: str, *, queued: bool) -> None:
        """Tell the manager's metrics how this request ended. Its prompt counts once it was queued; its latency
        once it got a token or ended normally (a request cancelled while it waited has none)."""
        stats = self.stats
        timed = stats.time_to_first_token_s is not None or outcome in ("stop", "length")
        self._manager.metrics.request_ended(
            model, outcome, prompt_tokens=stats.prompt_tokens if queued else 0,
            generated_tokens=stats.completion_tokens, time_to_first_token=stats.time_to_first_token_s,
            seconds=stats.seconds if queued and timed else None)

    def _receive(self, inbox: queue.SimpleQueue[TokenEvent | Done]) -> Iterator[StreamChunk]:
        params, stats = self.params, self.stats
        stops = StopStringFilter(params.stop)
        started = time.perf_counter()
        stats.finish_reason = "stop"
        pieces: list[str] = []
        try:
            while not isinstance(item := inbox.get(), Done):
                if stats.time_to_first_token_s is None:
                    stats.time_to_first_token_s = time.perf_counter() - started
                stats.completion_tokens += 1
                chunk = stops.push(item)
                if chunk.text or chunk.tokens:
                    pieces.append(chunk.text)
                    yield chunk
                if stops.stopped:
                    stats.stop_string = stops.matched
                    return
                if self.cancel_event.is_set():  # stopped by the caller: no token after the one that was due
                    stats.finish_reason = "cancelled"
                    return
            if item.error is not None:
                stats.finish_reason = "error"
                if isinstance(item.error, WorkbenchError):
                    raise item.error
                raise GenerationError(f"Generation failed: {type(item.error).__name__}: {item.error}") \
                    from item.error
            tail = stops.flush()
            if tail.text or tail.tokens:
                pieces.append(tail.text)
                yield tail
            stats.finish_reason = "cancelled" if item.finish == "cancelled" else (
                "length" if item.finish == "length" or stats.completion_tokens >= params.max_new_tokens else "stop")
        except GeneratorExit:
            stats.finish_reason = "cancelled"
            raise
        finally:
            stats.seconds = time.perf_counter() - started
            self.text = "".join(pieces)

    def _prepare_prompt(self, model: LoadedModel) -> list[int] | str | VisionPrompt:
        """The prompt as the model reads it. Token ids are made once, when the Generation is made (in the caller's
        thread, before it queues), and again only if another model serves it. A prompt longer than the context
        minus max_new_tokens loses its oldest tokens (with a warning), or is refused with ContextLengthExceeded when
        the Generation was made with cut_to_fit=False. A prompt with images is never cut (an image's tokens
        cannot be cut): one too long is refused."""
        params = self.params
        if isinstance(self.prompt, ImagePrompt):
            if self._prepared_for is not model or self._vision is None:
                vision = encode_image_prompt(model, self.prompt, params, self._add_bos)
                if len(vision.ids) > model.context_length - params.max_new_tokens:
                    raise ContextLengthExceeded(context=model.context_length, prompt_tokens=len(vision.ids),
                                                max_new_tokens=params.max_new_tokens, what="the prompt with its images")
                self._vision, self.prompt_ids, self._prepared_for = vision, vision.ids, model
                self.stats.prompt_tokens = len(vision.ids)
            return self._vision
        if Capability.TOKENIZE not in model.capabilities:
            self.stats.prompt_tokens = 0
            self._prepared_for = model
            return self.prompt if isinstance(self.prompt, str) else model.decode(self.prompt)
        if self._prepared_for is model and self.prompt_ids is not None:
            return self.prompt_ids
        budget = model.context_length - params.max_new_tokens
        if isinstance(self.prompt, str):
            if not self._cut_to_fit:  # a text that cannot fit whatever its tokens: refused before tokenizing
                check_text_fits(model, self.prompt, params.max_new_tokens)
            ids = encode_prompt(model, self.prompt, params, self._add_bos)
        else:
            ids = list(self.prompt)
        if not ids:
            raise InvalidInput("The prompt is empty: there is nothing to continue.")
        if budget <= 0 or (len(ids) > budget and not self._cut_to_fit):
            raise ContextLengthExceeded(context=model.context_length, prompt_tokens=len(ids),
                                        max_new_tokens=params.max_new_tokens)
        if len(ids) > budget:
            self.warnings.append(f"The prompt had {len(ids)} tokens; its oldest {len(ids) - budget} were cut to "
                                 f"fit the context of {model.context_length} minus max_new_tokens.")
            ids = ids[-budget:]
        self.prompt_ids = ids
        self._prepared_for = model
        self.stats.prompt_tokens = len(ids)
        return ids
