"""The models in memory. Each resident model has its engine (modules.serving.engine); the pool loads a model on
demand and never two copies of one, makes room by unloading the least recently used idle model when another would
pass `max_models` or `memory_budget`, and unloads a model nobody used for `idle_unload` seconds, or once a request's
`keep_alive` (Ollama's: seconds, 0 = when this request ends, -1 = never) has passed.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loaders.base import LoadedModel
from modules.errors import ModelLoadError
from modules.memory import release_memory
from modules.serving.engine import Engine
from modules.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loading:
    """A load in progress: which model, and since when (time.time())."""

    name: str
    since: float


@dataclass(eq=False)
class Resident:
    """A loaded model and what the pool knows of its use."""

    name: str
    model: LoadedModel
    engine: Engine
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    #: Unload once idle after this monotonic time (a request's keep_alive); None: the pool's idle_unload rule.
    keep_until: float | None = None
    #: Generations made for this model and not ended: a model in use is never picked for eviction while another
    #: is idle, and never unloaded for being idle.
    in_use: int = 0

    @property
    def idle(self) -> bool:
        return self.in_use == 0 and self.engine.idle


class Residents:
    """The pool; `on_unload(name)` is told after a model is gone (listeners, the default model)."""

    def __init__(self, on_unload: Callable[[str], None], *, max_models: int = 1, memory_budget: int = 0,
                 idle_unload: float = 0, max_queue: int = 0, metrics: ServingMetrics | None = None):
        self._on_unload = on_unload
        self.metrics = metrics or ServingMetrics()  # told of loads and unloads; handed to each engine
        self.max_models = max_models  # 0: no limit
        self.memory_budget = memory_budget  # bytes; 0: no limit
        self.idle_unload = idle_unload  # seconds; 0: never
        self.max_queue = max_queue
        self._residents: dict[str, Resident] = {}
        self._loading: dict[str, threading.Event] = {}
        self._loading_since: dict[str, float] = {}
        self._lock = threading.Condition()
        self._reaper: threading.Thread | None = None
        self._closed = False
        self.evictions = 0

    # --- queries ---------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Resident | None:
        with self._lock:
            return self._residents.get(name)

    def all(self) -> list[Resident]:
        """Resident models, most recently used first."""
        with self._lock:
            return sorted(self._residents.values(), key=lambda r: -r.last_used)

    @property
    def loading(self) -> Loading | None:
        with self._lock:
            if not self._loading_since:
                return None
            name, since = next(iter(self._loading_since.items()))
            return Loading(name, since)

    # --- loading and unloading -------------------------------------------------------------------------------------
    def ensure(self, name: str, build: Callable[[], LoadedModel], *, size_hint: int = 0,
               cancel_running: bool = False, replace: bool = False) -> Resident:
        """The resident model `name`, built by `build` now if it is not resident (a load of it already under way
        is waited for, never started twice); with `replace`, a resident copy is unloaded and built again. `size_hint`
        (bytes, e.g. the file's size) lets the memory budget make room first; models unloaded to make room finish
        their requests first, unless `cancel_running`."""
        while True:
            with self._lock:
                resident = self._residents.get(name)
                if resident is not None and not replace:
                    resident.last_used = time.monotonic()
                    return resident
                pending = self._loading.get(name)
                if pending is None:
                    self._loading[name] = threading.Event()
                    self._loading_since[name] = time.time()
                    break
            pending.wait()  # the other load ended; look again (it may have failed)
        try:
            if replace:
                self.unload(name, cancel_running=cancel_running)
            self._make_room(name, size_hint, cancel_running)
            started = time.perf_counter()
            model = build()
            self.metrics.loaded(name, time.perf_counter() - started)
            resident = Resident(name, model, Engine(model, name=name, max_queue=self.max_queue, metrics=self.metrics))
            with self._lock:
                self._residents[name] = resident
            self._start_reaper()
            return resident
        finally:
            with self._lock:
                self._loading.pop(name).set()
                self._loading_since.pop(name, None)
                self._lock.notify_all()

    def unload(self, name: str, *, cancel_running: bool = False, reason: str = "requested") -> bool:
        """Unload `name` once its requests are done (or cancelled); False when it was not resident. `reason`
        ("requested", "evicted", "idle") is what the metrics count it as."""
        with self._lock:
            resident = self._residents.pop(name, None)
        if resident is None:
            return False
        self.metrics.unloaded(name, reason)
        try:
            resident.engine.close(cancel_running=cancel_running)
            resident.model.unload()
        finally:
            del resident
            release_memory()
            self._on_unload(name)
        return True

    def memory_used(self) -> int:
        """The bytes the resident models take together, as the memory budget counts them."""
        with self._lock:
            return sum(r.model.info().memory_bytes for r in self._residents.values())

    def _make_room(self, name: str, size_hint: int, cancel_running: bool) -> None:
        """Unload least recently used models until `name` fits the model count and the memory budget."""
        if self.memory_budget and size_hint > self.memory_budget:
            raise ModelLoadError(f"{name} needs about {size_hint / 2**30:.1f} GiB, more than --memory-budget "
                                 f"({self.memory_budget / 2**30:.1f} GiB).")
        while True:
            with self._lock:
                count = len(self._residents) + len(self._loading) - 1  # the others being loaded count too
                used = self.memory_used()
                over_count = self.max_models and count >= self.max_models
                over_memory = self.memory_budget and used + size_hint > self.memory_budget
                if not (over_count or over_memory) or not self._residents:
                    return
                victim = self._victim()
            log.info("unloading %s to make room for %s", victim.name, name)
            self.evictions += 1
            self.unload(victim.name, cancel_running=cancel_running, reason="evicted")

    def _victim(self) -> Resident:
        """The least recently used idle model, or, when every one is busy, the least recently used (its running
        requests end first: unload waits for them)."""
        idle = [r for r in self._residents.values() if r.idle]
        return min(idle or self._residents.values(), key=lambda r: r.last_used)

    # --- use, keep_alive and idle unloading ------------------------------------------------------------------------
    def begin(self, resident: Resident) -> None:
        with self._lock:
            resident.in_use += 1
            resident.last_used = time.monotonic()

    def end(self, resident: Resident, keep_alive: float | None = None) -> None:
        """A request on `resident` ended; `keep_alive` (seconds; 0 unloads now when idle, negative keeps it) sets
        how long the model stays once idle."""
        with self._lock:
            resident.in_use = max(0, resident.in_use - 1)
            resident.last_used = time.monotonic()
            if keep_alive is not None:
                resident.keep_until = math.inf if keep_alive < 0 else resident.last_used + keep_alive
            self._lock.notify_all()
        if keep_alive is not None:
            self._start_reaper()

    def _deadline(self, resident: Resident) -> float:
        if resident.keep_until is not None:
            return resident.keep_until
        return resident.last_used + self.idle_unload if self.idle_unload else math.inf

    def _start_reaper(self) -> None:
        with self._lock:
            wanted = self.idle_unload or any(r.keep_until is not None for r in self._residents.values())
            if not wanted or self._reaper is not None or self._closed:
                return
            self._reaper = threading.Thread(target=self._reap, name="idle-unload", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Unload each model whose idle deadline has passed; sleeps until the next deadline or a change."""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                due = [r for r in self._residents.values() if r.idle and self._deadline(r) <= now]
                if not due:
                    upcoming = [self._deadline(r) - now for r in self._residents.values()]
                    self._lock.wait(timeout=min([d for d in upcoming if d > 0 and d != math.inf], default=5.0))
                    continue
            for resident in due:
                log.info("unloading %s: idle", resident.name)
                self.unload(resident.name, reason="idle")

    def close(self) -> None:
        """Unload every model (at shutdown)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for resident in self.all():
            self.unload(resident.name, cancel_running=True)
