"""Where a generation request goes: the model it names (resident, or loaded just in time with --jit), the LoRAs it
asks for, how long the model stays loaded after it (keep_alive), and whose request it is (the API key presented,
else the address), so that the model's engine serves clients in turn."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from extensions.openai.errors import ApiError, api_error_from
from extensions.openai.middleware import client_key
from extensions.openai.protocol import LoraRef
from loaders.batching import Adapter
from modules.errors import NoModelLoaded, NotFound, WorkbenchError
from modules.serving.residents import Resident


@dataclass(frozen=True)
class Target:
    """A request's destination, as `ModelManager.generate` takes it."""

    model: str  # the resident model's name in the pool
    name: str  # the model's own name, which replies carry
    adapters: tuple[Adapter, ...] | None = None
    keep_alive: float | None = None
    client: str = ""

    def generate_options(self) -> dict[str, Any]:
        return {"model": self.model, "adapters": self.adapters, "client": self.client,
                "keep_alive": self.keep_alive}

    def for_choice(self, index: int, count: int) -> Target:
        """The target of choice `index` of `count` (run one after another): only the last one sets keep_alive, so
        `keep_alive: 0` cannot unload the model between two choices."""
        return self if index == count - 1 else replace(self, keep_alive=None)


async def resolve_target(request: Request, body: Any = None) -> Target:
    """The Target of a request whose body may carry `model`, `lora` and `keep_alive` (checked before any model
    is loaded for it)."""
    services = request.app.state.api.services
    jit = request.app.state.api.params.loads_on_demand
    keep_alive = keep_alive_seconds(getattr(body, "keep_alive", None))
    lora = getattr(body, "lora", None)
    client = client_key(request.scope)

    def resolve() -> Target:
        manager = services.manager
        try:
            adapters = request_adapters(manager, lora)
        except WorkbenchError as exc:
            raise api_error_from(exc, "lora") from None
        resident = choose_model(manager, getattr(body, "model", None), jit=jit)
        return Target(resident.name, resident.model.name, adapters, keep_alive, client)

    return await run_in_threadpool(resolve)


# --- which model ------------------------------------------------------------------------------------------------
def choose_model(manager: Any, requested: str | None, *, jit: bool) -> Resident:
    """The resident model that answers `requested` (None or "": the default model), loaded now when it is a model
    of models/ that is not resident and `jit` allows it. Raises 404 for a model that does not exist, or that is
    not resident without `jit`; 503 (the manager's ModelLoading or NoModelLoaded) while it loads or when no model
    is resident at all."""
    if not requested:
        resident = manager.resident()
        if resident is None:
            raise manager.missing_model()
        return resident
    resident = manager.resident(requested)
    if resident is not None:
        return resident
    loading = manager.loading
    if loading is not None and not (jit and loading.name == requested):  # with --jit, ensure() waits for it
        if loading.name == requested:
            raise manager.missing_model(requested)
        if not manager.pool.all():  # the start-up model loads: the name may be one of its own
            raise manager.missing_model()
    try:
        manager.check(requested)  # a name in models/, an alias or a remote engine of models.yaml
    except NotFound:
        raise ApiError(404, f"The model {requested[:200]!r} does not exist; GET /v1/models lists the models.",
                       param="model", code="model_not_found") from None
    except WorkbenchError as exc:
        raise api_error_from(exc, "model") from None
    if not jit:
        how = "Load it with POST /v1/internal/model/load, or start the API with --jit to load models on demand."
        residents = [r.name for r in manager.pool.all()]
        if not residents:
            raise NoModelLoaded(f"No model is loaded (the request names {requested!r}). {how}")
        raise ApiError(404, f"The model {requested!r} is not loaded (loaded: {', '.join(residents)}). {how}",
                       param="model", code="model_not_found")
    try:
        return manager.ensure(requested)
    except WorkbenchError as exc:
        raise api_error_from(exc, "model") from None


# --- which LoRAs ------------------------------------------------------------------------------------------------
def request_adapters(manager: Any, lora: str | list[str | LoraRef] | None) -> tuple[Adapter, ...] | None:
    """A request's `lora` field as the adapters it runs with: None (the field is absent) leaves the model's own
    LoRAs; a name, a list of names, or [{"name" or "id", "scale"}] (llama.cpp's id: the place in
    /v1/internal/lora/list) replace them for this request; [] runs without any. Unknown names raise NotFound."""
    if lora is None:
        return None
    entries = [lora] if isinstance(lora, str) else lora
    names: list[str] = []
    scales: list[float] = []
    listed: list[str] | None = None
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
            scales.append(1.0)
            continue
        name = entry.name if entry.name is not None else entry.id
        if isinstance(name, int):
            listed = manager.list_loras() if listed is None else listed
            if name >= len(listed):
                has = f"ids 0 to {len(listed) - 1}" if listed else "the LoRA folder is empty"
                raise ApiError(404, f"There is no LoRA with id {name} ({has}; /v1/internal/lora/list names them).",
                               param="lora", code="not_found")
            name = listed[name]
        names.append(name)
        scales.append(entry.scale)
    return manager.adapters(names, scales)


# --- keep_alive ---------------------------------------------------------------------------------------------------
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's keep_alive in seconds: a number of seconds or a Go duration ("5m", "1h30m", "90s"), 0 = unload
    once this request ends, any negative value = keep loaded (returned as -1). None: the server's rule."""
    if value is None:
        return None
    seconds: float | None
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif body and _PART.sub("", body) == "":
            seconds = sign * sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(body))
        else:
            seconds = None
    else:
        seconds = float(value)
    if seconds is None or not math.isfinite(seconds):
        raise ApiError(400, f"keep_alive {str(value)[:40]!r} is not a duration: send seconds (300), a duration such "
                            "as \"5m\" or \"1h30m\", 0 to unload the model after this request, or -1 to keep it "
                            "loaded.", param="keep_alive")
    return -1.0 if seconds < 0 else seconds
