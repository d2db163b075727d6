"""The one owner of the loaded models. Every caller (UI, API, CLI, extensions) asks it to load, swap or generate.

Models live in a pool (modules.serving.residents: up to --max-models at once, unloaded when idle) and each is
served by its engine (modules.serving.engine: continuous batching where the loader can batch, one request at a
time otherwise, round-robin across clients). The manager names one resident model the default: the one the tabs
use and API requests that name no model get, normally the one loaded last.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.base import Capability, ImagePrompt, LoadedModel, Loader, LoaderOptions, LoaderRegistry, ModelInfo
from loaders.batching import Adapter
from modules.constraints import ConstraintChecker
from modules.cpu_threads import in_short_lived_thread
from modules.errors import (ConfigError, InvalidInput, ModelLoadError, ModelLoading, NoModelLoaded,
                            UnsupportedParameter, WorkbenchError)
from modules.generation_params import GenerationParams
from modules.memory import release_memory, weights_in_mmap
from modules.model_settings import ModelSettings, ModelSpec
from modules.paths import resolve_inside
from modules.serving.metrics import ServingMetrics
from modules.serving.request import Generation, check_text_fits, encode_prompt
from modules.serving.residents import Loading, Resident, Residents

__all__ = ["Generation", "LoadResult", "Loading", "ModelManager", "check_text_fits", "encode_prompt"]

log = logging.getLogger(__name__)


@dataclass
class LoadPlan:
    """How a model loads: the one resolution of a name (an alias of models.yaml resolved), its loader and options
    (loader defaults < settings.yaml < models.yaml < flags < the caller's own), and the template models.yaml gives
    it, that every load path goes through."""

    name: str
    loader: type[Loader]
    path: Path
    size: int
    options: LoaderOptions
    template: str | None
    spec: ModelSpec


@dataclass
class LoadResult:
    info: ModelInfo
    seconds: float
    warnings: list[str]


class ModelManager:
    def __init__(self, model_dir: Path, lora_dir: Path, *, registry: LoaderRegistry | None = None,
                 loader_options: dict[str, Any] | None = None, max_models: int = 1, memory_budget: int = 0,
                 idle_unload: float = 0, max_queue: int = 0, model_settings: ModelSettings | None = None,
                 pinned_options: dict[str, Any] | None = None):
        self.model_dir = Path(model_dir)
        self.lora_dir = Path(lora_dir)
        self.registry = registry or LoaderRegistry()
        #: Loader options from settings/flags (flat: each loader takes the keys its Options type has); a load
        #: request's own options override them.
        self.loader_options = loader_options or {}
        #: Per-model settings (user_data/models.yaml), over loader_options; None: no such file is read.
        self.model_settings = model_settings
        #: Loader options given as flags: they win over models.yaml too.
        self.pinned_options = pinned_options or {}
        #: What the pool, the engines and each Generation report (requests, tokens, times, loads, unloads).
        self.metrics = ServingMetrics()
        self.pool = Residents(self._unloaded, max_models=max_models, memory_budget=memory_budget,
                              idle_unload=idle_unload, max_queue=max_queue, metrics=self.metrics)
        self._default: str | None = None
        #: Whether a request's grammar or JSON schema may reach the model (modules.constraints).
        self.constraints = ConstraintChecker()
        self._listeners: list[Callable[[str, ModelInfo | None], None]] = []

    # --- queries -----------------------------------------------------------------------------------------------
    def resident(self, name: str | None = None) -> Resident | None:
        """The resident model `name` (any name a request may use for it), or the default one with None."""
        if name is None:
            return self.pool.get(self._default) if self._default is not None else None
        found = self.pool.get(name)
        if found is None and self.model_settings is not None:
            try:
                found = self.pool.get(self.model_settings.canonical(name))
            except ConfigError:  # a broken models.yaml: its aliases name nothing; a load says why
                pass
        if found is not None:
            return found
        return next((r for r in self.pool.all() if name in names_of(r, self.model_dir)), None)

    @property
    def model(self) -> LoadedModel | None:
        """The default model (the one the tabs use), or None."""
        resident = self.resident()
        return resident.model if resident is not None else None

    def info(self) -> ModelInfo | None:
        model = self.model
        return model.info() if model is not None else None

    @property
    def loading(self) -> Loading | None:
        """A load in progress (start-up, Model tab, API), or None."""
        return self.pool.loading

    def require_model(self, name: str | None = None) -> LoadedModel:
        resident = self.resident(name)
        if resident is None:
            raise self.missing_model(name)
        return resident.model

    def missing_model(self, name: str | None = None) -> NoModelLoaded:
        """The error for "no model to use": ModelLoading while a load is in progress (asking again shortly works),
        else NoModelLoaded."""
        loading = self.loading
        if loading is not None and (name is None or loading.name == name):
            return ModelLoading(f"The model {loading.name} is loading ({time.time() - loading.since:.0f} s so far); "
                                "ask again shortly.", name=loading.name, since=loading.since)
        if name is not None:
            return NoModelLoaded(f"The model {name} is not loaded.")
        return NoModelLoaded("No model is loaded. Load one in the Model tab or with --model.")

    def list_models(self) -> list[str]:
        """GGUF files and model folders in the model folder, the default model first."""
        if not self.model_dir.is_dir():
            return []
        names = sorted(p.name for p in self.model_dir.iterdir()
                       if not p.name.startswith(".") and not p.name.endswith((".part", ".converting"))
                       and not p.name.lower().startswith("mmproj")  # a vision model's projector, no model
                       and (p.suffix.lower() == ".gguf" or (p.is_dir() and _looks_like_model(p))))
        if self.model_settings is not None:  # remote engines: no file stands for them
            try:
                names = sorted({*names, *self.model_settings.configured_names(local_files=False)})
            except ConfigError:  # a broken models.yaml: loading names it
                pass
        model = self.model
        loaded = model.path.name if model is not None else None
        return sorted(names, key=lambda n: n != loaded)

    def list_loras(self) -> list[str]:
        if not self.lora_dir.is_dir():
            return []
        return sorted(p.name for p in self.lora_dir.iterdir()
                      if p.is_dir() and ((p / "adapter_config.json").is_file() or any(p.glob("*.gguf"))))

    def model_path(self, name: str) -> Path:
        return resolve_inside(self.model_dir, name, what="model", must_exist=True)

    def on_change(self, listener: Callable[[str, ModelInfo | None], None]) -> None:
        """Call `listener(event, info)` after 'loaded', 'unloaded' and 'loras' changes (info: the model that
        changed; None once unloaded)."""
        self._listeners.append(listener)

    def _notify(self, event: str, info: ModelInfo | None) -> None:
        for listener in self._listeners:
            try:
                listener(event, info)
            except Exception:  # a listener must never break loading
                log.exception("model change listener failed")

    # --- load / unload -----------------------------------------------------------------------------------------
    def load(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None, *,
             cancel_running: bool = False, loras: list[str] | None = None) -> LoadResult:
        """Load `name` (again, with these options, when it is resident already) and make it the default model.
        Models unloaded to make room (--max-models, --memory-budget) finish their requests first, or have them
        cancelled with `cancel_running`. `loading` names it meanwhile. Whatever the caller leaves unset comes from
        models.yaml (see plan)."""
        plan = self.plan(name, loader, options)
        plan.loader.check_available()  # refused before the resident models make room
        name = plan.name
        started = time.perf_counter()
        resident = self.pool.ensure(name, self._builder(plan), size_hint=plan.size, cancel_running=cancel_running,
                                    replace=True)
        self._default = name
        if loras:
            self.apply_loras(loras, notify=False)
        model = resident.model
        warnings: list[str] = []
        if model.chat_template is None:
            warnings.append(f"{name} has no chat template in its metadata; chat uses the template you pick "
                            "(or ChatML by default).")
        self._notify("loaded", model.info())
        return LoadResult(model.info(), time.perf_counter() - started, warnings)

    def ensure(self, name: str) -> Resident:
        """The resident model `name` (or an alias), loaded now if it is not (just-in-time loading), with its settings
        from models.yaml."""
        resident = self.resident(name)
        if resident is not None:
            return resident
        plan = self.plan(name)
        plan.loader.check_available()
        name = plan.name
        resident = self.pool.ensure(name, self._builder(plan), size_hint=plan.size)
        if self._default is None:
            self._default = name
        self._notify("loaded", resident.model.info())
        return resident

    def plan(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None, *,
             own_entry: bool = True) -> LoadPlan:
        """How `name` loads, checked now (the path, the loader, its options): the caller's loader and options win,
        then the flags, then models.yaml (its exact entry, left out with `own_entry` False, then its globs), then
        settings.yaml's loader options and the loader's defaults. An alias of models.yaml names its model."""
        spec = self.model_settings.resolve(name, own_entry=own_entry) if self.model_settings else ModelSpec(name)
        name = spec.name
        try:
            loader_cls = self.registry.get(loader or spec.loader) if loader or spec.loader else None
        except WorkbenchError as exc:
            if loader or self.model_settings is None:
                raise
            raise ConfigError(f"{self.model_settings.path}, model {spec.origin['loader']!r}: bad value for "
                              f"'loader': {exc}") from None
        if loader_cls is not None and not loader_cls.local_files:  # a remote engine: the name is the server's
            path, size = Path(name), 0
        else:
            path = self.model_path(name)
            loader_cls = loader_cls or self.registry.detect(path)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else \
                path.stat().st_size
        layered = {**self.loader_options, **spec.options, **self.pinned_options}
        defaults = {k: v for k, v in layered.items() if k in loader_cls.Options.model_fields}
        parsed = loader_cls.parse_options({**defaults, **(options or {})})
        template = self.model_settings.template_text(spec) if self.model_settings else None
        return LoadPlan(name, loader_cls, path, size, parsed, template, spec)

    def check(self, name: str, loader: str | None = None) -> None:
        """Raise what loading `name` would raise before any weights are read (a bad name, loader or option)."""
        self.plan(name, loader)

    def _builder(self, plan: LoadPlan) -> Callable[[], LoadedModel]:
        """The function that loads what `plan` says; a template from models.yaml replaces the model's own."""
        name, loader_cls, path, parsed = plan.name, plan.loader, plan.path, plan.options

        def build() -> LoadedModel:
            try:
                with weights_in_mmap():
                    model = in_short_lived_thread(lambda: loader_cls.load(path, parsed), "model-load")
                if plan.template is not None:
                    model.chat_template = plan.template
                return model
            except WorkbenchError:
                release_memory()
                raise
            except MemoryError:
                release_memory()
                raise ModelLoadError(f"Not enough memory to load {name}.") from None
            except Exception as exc:  # a backend error we did not foresee: say so plainly
                release_memory()
                log.exception("loading %s failed", name)
                raise ModelLoadError(f"{loader_cls.name} could not load {name}: {type(exc).__name__}: {exc}") \
                    from None

        return build

    def unload(self, name: str | None = None, *, cancel_running: bool = False) -> None:
        """Unload `name` (None: the default model) once its requests are done, or cancel them."""
        target = name if name is not None else self._default
        if target is not None:
            resident = self.resident(target)
            self.pool.unload(resident.name if resident is not None else target, cancel_running=cancel_running)

    def _unloaded(self, name: str) -> None:
        if name == self._default:
            remaining = self.pool.all()
            self._default = remaining[0].name if remaining else None
        self._notify("unloaded", None)

    def close(self) -> None:
        """Unload every model (at shutdown)."""
        self.pool.close()

    # --- LoRA ----------------------------------------------------------------------------------------------------
    def apply_loras(self, names: list[str], scales: list[float] | None = None, *, model: str | None = None,
                    notify: bool = True) -> ModelInfo:
        """Apply these LoRAs (none: remove them) to a resident model (None: the default one), between requests."""
        resident = self.resident(model)
        if resident is None:
            raise self.missing_model(model)
        paths = [resolve_inside(self.lora_dir, n, what="LoRA", must_exist=True) for n in names]
        with resident.engine.exclusive() as loaded:
            if paths:
                in_short_lived_thread(lambda: loaded.apply_loras(paths, scales), "lora-apply")
            else:
                in_short_lived_thread(loaded.remove_loras, "lora-remove")
        if notify:
            self._notify("loras", resident.model.info())
        return resident.model.info()

    def remove_loras(self) -> ModelInfo:
        return self.apply_loras([])

    def adapters(self, names: list[str], scales: list[float] | None = None) -> tuple[Adapter, ...]:
        """A request's LoRAs (names in the LoRA folder, checked now) as the engine takes them."""
        if scales is not None and len(scales) != len(names):
            raise InvalidInput("Give one scale per LoRA.")
        paths = [resolve_inside(self.lora_dir, name, what="LoRA", must_exist=True) for name in names]
        return tuple(Adapter(name, scale, path) for name, scale, path in zip(names, scales or [1.0] * len(names),
                                                                            paths))

    # --- generation ----------------------------------------------------------------------------------------------
    def check_constraint(self, params: GenerationParams, model: str | None = None) -> None:
        """Raise ConstraintError if the grammar or JSON schema of `params` may not reach the model, as generate()
        would: for a caller that must know before it changes anything (saves the user's message)."""
        self.constraints.check(params, self.require_model(model))

    def generate(self, prompt: str | list[int] | ImagePrompt, params: GenerationParams, *, add_bos: bool | None = None,
                 strict: bool = False, cut_to_fit: bool = True, model: str | None = None,
                 adapters: tuple[Adapter, ...] | None = None, client: str = "",
                 keep_alive: float | None = None) -> Generation:
        """A Generation to iterate (see modules.serving.request). Knobs the model cannot honour raise (strict) or
        become warnings. The prompt is tokenized here, in the caller's thread: a prompt longer than the context
        minus max_new_tokens loses its oldest tokens, or raises ContextLengthExceeded when `cut_to_fit` is False
        (the API's choice). An ImagePrompt (a prompt with images) goes to a vision model only."""
        if not prompt:
            raise InvalidInput("The prompt is empty.")
        return Generation(self, prompt, params, add_bos=add_bos, strict=strict, cut_to_fit=cut_to_fit, model=model,
                          adapters=adapters, client=client, keep_alive=keep_alive)

    def complete(self, prompt: str | list[int], params: GenerationParams, **kwargs: Any) -> Generation:
        """Run a generation to the end; the returned Generation holds text and stats."""
        generation = self.generate(prompt, params, **kwargs)
        for _ in generation:
            pass
        return generation

    @contextmanager
    def exclusive(self, model: str | None = None) -> Iterator[LoadedModel]:
        """A resident model (None: the default one) with nothing running on it: for work that drives the model
        directly (perplexity evaluation), so that no generation runs meanwhile and it is not unloaded under it."""
        resident = self.resident(model)
        if resident is None:
            raise self.missing_model(model)
        self.pool.begin(resident)
        try:
            with resident.engine.exclusive() as loaded:
                yield loaded
        finally:
            self.pool.end(resident)

    def stop_all(self) -> None:
        """Cancel every running and waiting generation, on every model."""
        for resident in self.pool.all():
            resident.engine.cancel_all()

    @property
    def busy(self) -> bool:
        return any(not r.engine.idle for r in self.pool.all())

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot, on every model."""
        return sum(r.engine.waiting for r in self.pool.all())

    # --- tokens --------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, model: str | None = None) -> list[int]:
        return self.require_model(model).encode(text, add_bos=add_bos)

    def decode(self, ids: list[int], *, model: str | None = None) -> str:
        return self.require_model(model).decode(ids)

    def token_count(self, text: str, *, model: str | None = None) -> int:
        return len(self.encode(text, model=model))

    def prompt_token_count(self, prompt: str | ImagePrompt, params: GenerationParams, *, add_bos: bool | None = None,
                           model: str | None = None) -> int:
        """How many tokens a generation of `prompt` with `params` reads (its usage's prompt tokens, before any
        cut to fit the context)."""
        loaded = self.require_model(model)
        if Capability.TOKENIZE not in loaded.capabilities:
            raise UnsupportedParameter(f"The {loaded.loader_name} loader cannot count tokens.")
        return len(encode_prompt(loaded, prompt, params, add_bos))


def names_of(resident: Resident, model_dir: Path) -> set[str]:
    """Names a request may use for a resident model: its name, its file's name and stem, and for a GGUF inside a
    model folder, the folder's name."""
    model = resident.model
    path = Path(model.path)
    names = {resident.name, model.name, path.name, path.stem}
    if path.parent.resolve() != model_dir.resolve():
        names.add(path.parent.name)
    return names


def _looks_like_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(folder.glob("*.gguf"))
