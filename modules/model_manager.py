"""The one owner of the loaded model. Every caller (UI, API, CLI, extensions) asks it to load, swap or
generate; it runs one generation at a time in arrival order, cancels cleanly, and never swaps a model under a
running request."""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.base import Capability, LoadedModel, LoaderRegistry, ModelInfo
from modules.constraints import ConstraintChecker
from modules.cpu_threads import in_short_lived_thread
from modules.errors import (ContextLengthExceeded, GenerationError, InvalidInput, ModelLoadError, ModelLoading,
                            NoModelLoaded, UnsupportedParameter, WorkbenchError)
from modules.generation_params import GenerationParams, GenerationStats, check_supported
from modules.memory import release_memory, weights_in_mmap
from modules.paths import resolve_inside
from modules.stopping import StopStringFilter, StreamChunk

log = logging.getLogger(__name__)


class FairQueue:
    """A lock granted in arrival order (threading.Lock is not fair), releasable from any thread, whose waiters
    can give up when their own cancel event is set."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._holder: object | None = None

    @contextmanager
    def turn(self, cancel: threading.Event | None = None) -> Iterator[bool]:
        """Yields True once it is our turn, or False if `cancel` was set while waiting."""
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            while self._holder is not None or self._waiting[0] is not ticket:
                if cancel is not None and cancel.is_set():
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
                    break
                self._cond.wait(timeout=0.05)
            else:
                self._waiting.popleft()
                self._holder = ticket
        try:
            yield self._holder is ticket
        finally:
            with self._cond:
                if self._holder is ticket:
                    self._holder = None
                self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._holder is not None

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)


@dataclass(frozen=True)
class Loading:
    """A load in progress: which model, and since when (time.time())."""

    name: str
    since: float


@dataclass
class LoadResult:
    info: ModelInfo
    seconds: float
    warnings: list[str]


def encode_prompt(model: LoadedModel, prompt: str, params: GenerationParams, add_bos: bool | None = None) -> list[int]:
    """The token ids a text prompt is generated from: BOS as `add_bos` says (None: as params.add_bos_token says),
    never a second one when the prompt already starts with it."""
    add = params.add_bos_token if add_bos is None else add_bos
    if add and model.bos_token and prompt.startswith(model.bos_token):
        add = False  # the template already wrote it; never send two
    return model.encode(prompt, add_bos=add)


class Generation:
    """One request. Iterate it for StreamChunks (text safe to show, with its token events); afterwards `stats`
    and `text` hold the outcome. `cancel()` may be called from any thread; closing the iterator cancels too."""

    def __init__(self, manager: "ModelManager", prompt: str | list[int], params: GenerationParams,
                 *, add_bos: bool | None, strict: bool, cut_to_fit: bool = True):
        self._manager = manager
        self.prompt = prompt
        self.params = params if params.seed >= 0 else params.model_copy(update={"seed": random.randrange(2**31)})
        self._add_bos = add_bos
        self._strict = strict
        self.cancel_event = threading.Event()
        self.stats = GenerationStats()
        self.text = ""
        self.warnings: list[str] = []
        self.prompt_ids: list[int] | None = None
        self._cut_to_fit = cut_to_fit
        self._prepared_for: LoadedModel | None = None  # the model prompt_ids were made with
        model = manager.model
        if model is not None:  # fail fast on knobs the current model cannot honour, and on a prompt too long
            self.warnings = check_supported(self.params, model.supported_params, model.loader_name, strict=strict)
            self._prepare_prompt(model)
            manager.constraints.check(self.params, model)  # here, not in the queue: a compile may take seconds

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[StreamChunk]:
        manager = self._manager
        with manager._queue.turn(self.cancel_event) as granted:
            if not granted:
                self.stats.finish_reason = "cancelled"
                return
            manager._running = self
            try:
                yield from self._run()
            finally:
                manager._running = None

    def _run(self) -> Iterator[StreamChunk]:
        model = self._manager.model
        if model is None:
            raise self._manager.missing_model()
        params = self.params
        if self._prepared_for is not model:  # made before this model was loaded
            self.warnings = check_supported(params, model.supported_params, model.loader_name, strict=self._strict)
            self._manager.constraints.check(params, model)
        prompt = self._prepare_prompt(model)
        stops = StopStringFilter(params.stop)
        started = time.perf_counter()
        stats = self.stats
        stats.finish_reason = "stop"
        pieces: list[str] = []
        tokens = model.stream(prompt, params, self.cancel_event)
        try:
            for token in tokens:
                if stats.time_to_first_token_s is None:
                    stats.time_to_first_token_s = time.perf_counter() - started
                stats.completion_tokens += 1
                chunk = stops.push(token)
                if chunk.text or chunk.tokens:
                    pieces.append(chunk.text)
                    yield chunk
                if stops.stopped:
                    stats.stop_string = stops.matched
                    break
                if self.cancel_event.is_set():
                    stats.finish_reason = "cancelled"
                    break
            else:
                tail = stops.flush()
                if tail.text or tail.tokens:
                    pieces.append(tail.text)
                    yield tail
                if self.cancel_event.is_set():
                    stats.finish_reason = "cancelled"
                elif stats.completion_tokens >= params.max_new_tokens:
                    stats.finish_reason = "length"
        except GeneratorExit:
            stats.finish_reason = "cancelled"
            raise
        except WorkbenchError:
            stats.finish_reason = "error"
            raise
        except Exception as exc:  # a backend failure mid-stream: report it, never a bare traceback
            stats.finish_reason = "error"
            raise GenerationError(f"Generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:  # stops the backend at once when we leave early (stop string, cancel)
                close()
            stats.seconds = time.perf_counter() - started
            self.text = "".join(pieces)

    def _prepare_prompt(self, model: LoadedModel) -> list[int] | str:
        """The prompt as the model reads it. Token ids are made once, when the Generation is made (in the caller's
        thread, before it queues), and again only if another model was loaded meanwhile. A prompt longer than the
        context minus max_new_tokens loses its oldest tokens (with a warning), or is refused with
        ContextLengthExceeded when the Generation was made with cut_to_fit=False."""
        params = self.params
        if Capability.TOKENIZE not in model.capabilities:
            self.stats.prompt_tokens = 0
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


class ModelManager:
    def __init__(self, model_dir: Path, lora_dir: Path, *, registry: LoaderRegistry | None = None,
                 loader_options: dict[str, Any] | None = None):
        self.model_dir = Path(model_dir)
        self.lora_dir = Path(lora_dir)
        self.registry = registry or LoaderRegistry()
        #: Loader options from settings/flags (flat: each loader takes the keys its Options type has); a load
        #: request's own options override them.
        self.loader_options = loader_options or {}
        self._queue = FairQueue()
        self._model: LoadedModel | None = None
        self._running: Generation | None = None
        self._loading: Loading | None = None
        #: Whether a request's grammar or JSON schema may reach the model (modules.constraints).
        self.constraints = ConstraintChecker()
        self._listeners: list[Callable[[str, ModelInfo | None], None]] = []

    # --- queries -----------------------------------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def info(self) -> ModelInfo | None:
        return self._model.info() if self._model is not None else None

    @property
    def loading(self) -> Loading | None:
        """The load in progress (start-up, Model tab, API), or None."""
        return self._loading

    def require_model(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise self.missing_model()
        return model

    def missing_model(self) -> NoModelLoaded:
        """The error for "no model to use": ModelLoading while a load is in progress (asking again shortly works),
        else NoModelLoaded."""
        loading = self._loading
        if loading is not None:
            return ModelLoading(f"The model {loading.name} is loading ({time.time() - loading.since:.0f} s so far); "
                                "ask again shortly.", name=loading.name, since=loading.since)
        return NoModelLoaded("No model is loaded. Load one in the Model tab or with --model.")

    def list_models(self) -> list[str]:
        """GGUF files and model folders in the model folder, the loaded one first."""
        if not self.model_dir.is_dir():
            return []
        names = sorted(p.name for p in self.model_dir.iterdir()
                       if not p.name.startswith(".") and not p.name.endswith((".part", ".converting"))
                       and (p.suffix.lower() == ".gguf" or (p.is_dir() and _looks_like_model(p))))
        loaded = self._model.path.name if self._model is not None else None
        return sorted(names, key=lambda n: n != loaded)

    def list_loras(self) -> list[str]:
        if not self.lora_dir.is_dir():
            return []
        return sorted(p.name for p in self.lora_dir.iterdir()
                      if p.is_dir() and ((p / "adapter_config.json").is_file() or any(p.glob("*.gguf"))))

    def model_path(self, name: str) -> Path:
        return resolve_inside(self.model_dir, name, what="model", must_exist=True)

    def on_change(self, listener: Callable[[str, ModelInfo | None], None]) -> None:
        """Call `listener(event, info)` after 'loaded', 'unloaded' and 'loras' changes."""
        self._listeners.append(listener)

    def _notify(self, event: str) -> None:
        info = self.info()
        for listener in self._listeners:
            try:
                listener(event, info)
            except Exception:  # a listener must never break loading
                log.exception("model change listener failed")

    # --- load / unload -----------------------------------------------------------------------------------------
    def load(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None, *,
             cancel_running: bool = False, loras: list[str] | None = None) -> LoadResult:
        """Load `name` from the model folder, replacing the current model. Waits for the running generation
        (or cancels it, and everything queued, when `cancel_running`). `loading` names it meanwhile."""
        loading = Loading(name, time.time())
        self._loading = loading
        try:
            return self._load(name, loader, options, cancel_running=cancel_running, loras=loras)
        finally:
            if self._loading is loading:
                self._loading = None

    def _load(self, name: str, loader: str | None, options: dict[str, Any] | None, *, cancel_running: bool,
              loras: list[str] | None) -> LoadResult:
        loader_cls = self.registry.get(loader) if loader else None
        if loader_cls is not None and not loader_cls.local_files:  # a remote engine: the name is the server's
            path = Path(name)
        else:
            path = self.model_path(name)
            loader_cls = loader_cls or self.registry.detect(path)
        defaults = {k: v for k, v in self.loader_options.items() if k in loader_cls.Options.model_fields}
        merged = {**defaults, **(options or {})}
        parsed = loader_cls.parse_options(merged)
        if cancel_running:
            self.stop_all()
        with self._queue.turn() as _:
            self._unload_locked()
            started = time.perf_counter()
            try:
                with weights_in_mmap():
                    model = in_short_lived_thread(lambda: loader_cls.load(path, parsed), "model-load")
            except WorkbenchError:
                release_memory()
                raise
            except MemoryError:
                release_memory()
                raise ModelLoadError(f"Not enough memory to load {name}.") from None
            except Exception as exc:  # a backend error we did not foresee: say so plainly
                release_memory()
                log.exception("loading %s failed", name)
                raise ModelLoadError(f"{loader_cls.name} could not load {name}: {type(exc).__name__}: {exc}") from None
            self._model = model
            warnings: list[str] = []
            if model.chat_template is None:
                warnings.append(f"{name} has no chat template in its metadata; chat uses the template you pick "
                                "(or ChatML by default).")
            if loras:
                self._apply_loras_locked(loras)
            seconds = time.perf_counter() - started
        self._notify("loaded")
        return LoadResult(model.info(), seconds, warnings)

    def unload(self, *, cancel_running: bool = False) -> None:
        if cancel_running:
            self.stop_all()
        with self._queue.turn():
            self._unload_locked()
        self._notify("unloaded")

    def _unload_locked(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            try:
                model.unload()
            finally:
                del model
                release_memory()

    # --- LoRA ----------------------------------------------------------------------------------------------------
    def apply_loras(self, names: list[str], scales: list[float] | None = None) -> ModelInfo:
        with self._queue.turn():
            self._apply_loras_locked(names, scales)
        self._notify("loras")
        return self.require_model().info()

    def _apply_loras_locked(self, names: list[str], scales: list[float] | None = None) -> None:
        model = self.require_model()
        paths = [resolve_inside(self.lora_dir, n, what="LoRA", must_exist=True) for n in names]
        if paths:
            in_short_lived_thread(lambda: model.apply_loras(paths, scales), "lora-apply")
        else:
            in_short_lived_thread(model.remove_loras, "lora-remove")

    def remove_loras(self) -> ModelInfo:
        return self.apply_loras([])

    # --- generation ----------------------------------------------------------------------------------------------
    def check_constraint(self, params: GenerationParams) -> None:
        """Raise ConstraintError if the grammar or JSON schema of `params` may not reach the loaded model, as
        generate() would: for a caller that must know before it changes anything (saves the user's message)."""
        self.constraints.check(params, self.require_model())

    def generate(self, prompt: str | list[int], params: GenerationParams, *, add_bos: bool | None = None,
                 strict: bool = False, cut_to_fit: bool = True) -> Generation:
        """A Generation to iterate. Knobs the model cannot honour raise (strict) or become warnings. The prompt is
        tokenized here, in the caller's thread: a prompt longer than the context minus max_new_tokens loses its
        oldest tokens, or raises ContextLengthExceeded when `cut_to_fit` is False (the API's choice)."""
        if not prompt:
            raise InvalidInput("The prompt is empty.")
        return Generation(self, prompt, params, add_bos=add_bos, strict=strict, cut_to_fit=cut_to_fit)

    def complete(self, prompt: str | list[int], params: GenerationParams, **kwargs: Any) -> Generation:
        """Run a generation to the end; the returned Generation holds text and stats."""
        generation = self.generate(prompt, params, **kwargs)
        for _ in generation:
            pass
        return generation

    @contextmanager
    def exclusive(self) -> Iterator[LoadedModel]:
        """The loaded model, with the generation queue held: for work that drives the model directly (perplexity
        evaluation), so that no generation runs meanwhile and no swap happens under it."""
        with self._queue.turn():
            yield self.require_model()

    def stop_all(self) -> None:
        """Cancel the running generation; queued ones are not affected."""
        running = self._running
        if running is not None:
            running.cancel()

    @property
    def busy(self) -> bool:
        return self._queue.busy

    @property
    def waiting(self) -> int:
        """Requests (generations, loads) waiting for their turn behind the running one."""
        return self._queue.waiting

    # --- tokens --------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.require_model().encode(text, add_bos=add_bos)

    def decode(self, ids: list[int]) -> str:
        return self.require_model().decode(ids)

    def token_count(self, text: str) -> int:
        return len(self.encode(text))

    def prompt_token_count(self, prompt: str, params: GenerationParams, *, add_bos: bool | None = None) -> int:
        """How many tokens a generation of `prompt` with `params` reads (its usage's prompt tokens, before any
        cut to fit the context)."""
        model = self.require_model()
        if Capability.TOKENIZE not in model.capabilities:
            raise UnsupportedParameter(f"The {model.loader_name} loader cannot count tokens.")
        return len(encode_prompt(model, prompt, params, add_bos))


def _looks_like_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(folder.glob("*.gguf"))
