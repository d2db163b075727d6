"""GGUF LoRA adapters on one llama.cpp context.

llama.cpp sets adapters on a whole context, not per sequence, so the context holds two sets: the applied one (the
Model tab's, what requests without adapters of their own get) and whatever set is on the context right now (a group
of requests may run with adapters they named). Each GGUF file a request names is loaded once and kept until unload.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from loaders.base import gguf_files
from loaders.batching import Adapter
from modules.errors import InvalidInput, ModelLoadError


@dataclass(frozen=True)
class AdapterSet:
    """LoRA adapters as the context takes them: handles and scales, and the key that identifies their weights
    (each GGUF file by path, modification time and size, with its scale; empty: the base model)."""

    key: tuple = ()
    handles: tuple = ()
    scales: tuple[float, ...] = ()


class ContextAdapters:
    """The adapter sets of one context; the caller drops cached KV when the applied set changes."""

    def __init__(self, lib: ModuleType, model: object, context: object):
        self._lib = lib
        self._model = model
        self._context = context
        self._loaded: list[tuple[str, object]] = []  # the applied set's handles, by adapter folder name
        self.applied = AdapterSet()
        self.on_context = AdapterSet()
        self._by_file: dict[tuple[str, int, int], object] = {}  # adapters requests named, by file

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._loaded]

    def apply(self, paths: list[Path], scales: list[float] | None = None) -> None:
        """Make these adapters the applied set; raises ModelLoadError (and keeps the old set) when one does not load."""
        scales = scales or [1.0] * len(paths)
        loaded: list[tuple[str, object]] = []
        files = []
        for path in paths:
            file = lora_file(path, ModelLoadError)
            handle = self._lib.llama_adapter_lora_init(self._model, str(file).encode("utf-8"))
            if not handle:
                self._free(h for _, h in loaded)
                raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {file.name} (wrong base "
                                     "model or not a GGUF LoRA).")
            loaded.append((path.name, handle))
            files.append(file)
        self.remove()
        applied = AdapterSet(tuple(_file_key(f) + (float(s),) for f, s in zip(files, scales)),
                             tuple(h for _, h in loaded), tuple(float(s) for s in scales))
        if not self._set(applied):
            self._free(h for _, h in loaded)
            raise ModelLoadError("llama.cpp refused the LoRA adapter(s) for this model.")
        self._loaded = loaded
        self.applied = applied

    def remove(self) -> bool:
        """Drop the applied set; False when there was none."""
        if not self._loaded:
            return False
        self._set(AdapterSet())
        self._free(h for _, h in self._loaded)
        self._loaded = []
        self.applied = AdapterSet()
        return True

    def key(self, adapters: tuple[Adapter, ...] | None) -> tuple:
        """What identifies the weights a sequence with these adapters runs with (None: the applied set)."""
        if adapters is None:
            return self.applied.key
        return tuple(_file_key(_request_file(a)) + (float(a.scale),) for a in adapters)

    def use(self, adapters: tuple[Adapter, ...] | None) -> tuple:
        """Set these adapters on the context, loading each GGUF file once; returns their key. Raises InvalidInput
        for an adapter that is missing, no GGUF LoRA, or not for this model."""
        if adapters is None:
            wanted = self.applied
        else:
            handles = []
            for adapter in adapters:
                file = _request_file(adapter)
                handle = self._by_file.get(_file_key(file))
                if handle is None:
                    handle = self._lib.llama_adapter_lora_init(self._model, str(file).encode("utf-8"))
                    if not handle:
                        raise InvalidInput(f"llama.cpp could not load the LoRA adapter {file.name} (wrong base "
                                           "model or not a GGUF LoRA).")
                    self._by_file[_file_key(file)] = handle
                handles.append(handle)
            wanted = AdapterSet(self.key(adapters), tuple(handles), tuple(float(a.scale) for a in adapters))
        if wanted.key != self.on_context.key and not self._set(wanted):
            raise InvalidInput("llama.cpp refused the LoRA adapter(s) for this model.")
        return wanted.key

    def use_applied(self) -> None:
        if self.on_context.key != self.applied.key:
            self._set(self.applied)

    def close(self) -> None:
        """Free every adapter (before the model is freed)."""
        self.remove()
        self._set(AdapterSet())
        self._free(self._by_file.values())
        self._by_file = {}

    def _set(self, adapters: AdapterSet) -> bool:
        n = len(adapters.handles)
        handles = (self._lib.llama_adapter_lora_p_ctypes * n)(*adapters.handles) if n else None
        factors = (ctypes.c_float * n)(*adapters.scales) if n else None
        if self._lib.llama_set_adapters_lora(self._context, handles, n, factors) != 0:
            return False
        self.on_context = adapters
        return True

    def _free(self, handles) -> None:
        for handle in list(handles):
            self._lib.llama_adapter_lora_free(handle)


def lora_file(path: Path, error: type[Exception]) -> Path:
    """The one GGUF file a LoRA folder (or file) holds; `error` says what is wrong otherwise."""
    files = gguf_files(path)
    if len(files) != 1:
        raise error(f"The llama.cpp loader applies LoRA adapters as one GGUF file; {path.name} holds none (export "
                    "the adapter to GGUF from the Training tab).")
    return files[0]


def _request_file(adapter: Adapter) -> Path:
    if adapter.path is None:
        raise InvalidInput(f"The LoRA {adapter.name} was not found in the LoRA folder.")
    return lora_file(adapter.path, InvalidInput)


def _file_key(file: Path) -> tuple[str, int, int]:
    stat = file.stat()
    return str(file.resolve()), stat.st_mtime_ns, stat.st_size
