"""LoRA adapters in a Transformers model, through PEFT: the set applied to the whole model (the Model tab, the
manager's apply_loras) and the adapters single requests ask for, which a batch mixes row by row (PEFT's mixed
batches: `adapter_names`, one adapter per row).

All of them live in one PeftModel around the base model. An adapter a request asks for is loaded once, by folder
and scale, under a name of its own, and stays until the applied set changes (applying or removing LoRAs unloads
every adapter). A request with several adapters gets one adapter made by concatenating them (PEFT's "cat"
combination: exactly the sum of their scaled updates). When no set is applied, the wrapper's layers have no active
adapter, so a request that names none runs the base model. PEFT's wrappers of GPTQ/AWQ layers take no
`adapter_names`; mixed_batch_layers gives them LoraLayer's own mixed-batch forward.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from loaders.batching import Adapter
from modules.errors import InvalidInput, ModelLoadError

#: PEFT's name for "no adapter" in a mixed batch's adapter_names.
BASE = "__base__"


class PeftLoras:
    """What TransformersModel does with LoRA adapters (mixed in; it holds `model`, the base or its PEFT wrapper).
    Used from the thread that runs the model (the engine's), or while nothing runs on it."""

    model: Any
    _loras: list[str]  # the applied set, by folder name
    _request_adapters: dict[tuple[Adapter, ...], str]  # adapter sets loaded for requests -> their PEFT name

    # --- the applied set ---------------------------------------------------------------------------------------
    def apply_loras(self, paths: list[Path], scales: list[float] | None = None) -> None:
        from peft import PeftModel

        self.remove_loras()
        base = self.model
        try:
            for index, path in enumerate(paths):
                _check_folder(path)
                name = _adapter_name(path.name)
                if index == 0:
                    self.model = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=False)
                else:
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            if len(paths) > 1:
                self.model.base_model.set_adapter([_adapter_name(p.name) for p in paths], inference_mode=True)
            mixed_batch_layers(self.model)
        except ModelLoadError:
            self._restore_base(base)
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            self._restore_base(base)
            raise ModelLoadError(f"Could not apply the LoRA: {exc}") from None
        for path, scale in zip(paths, scales or []):
            _set_scale(self.model, _adapter_name(path.name), scale)
        self._loras = [p.name for p in paths]

    def _restore_base(self, base: Any) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model = self.model.unload()
        else:
            self.model = base
        self._loras = []
        self._request_adapters = {}

    def remove_loras(self) -> None:
        """Unload every adapter: the applied set and those loaded for requests."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model = self.model.unload()
        self._loras = []
        self._request_adapters = {}

    @property
    def loras(self) -> list[str]:
        return list(self._loras)

    # --- adapters per request ----------------------------------------------------------------------------------
    @property
    def wrapped(self) -> bool:
        """Whether the model is inside a PEFT wrapper (only then does a forward take adapter_names)."""
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def own_adapter(self) -> str | None:
        """The applied set as one adapter name for a row of a mixed batch: BASE when none is applied, its name when
        one is; None when several are (the wrapper runs them together, and no single name stands for them)."""
        if not self._loras:
            return BASE
        if len(self._loras) == 1:
            return _adapter_name(self._loras[0])
        return None

    def request_adapter(self, adapters: tuple[Adapter, ...]) -> str:
        """The adapter name a row asking for exactly `adapters` runs with (BASE for none), loading what is new:
        ModelLoadError when a folder is no PEFT LoRA or PEFT refuses it; nothing stays half-loaded."""
        if not adapters:
            return BASE
        known = self._request_adapters.get(adapters)
        if known is not None:
            return known
        parts = [self._load_one(adapter) for adapter in adapters]
        name = parts[0] if len(parts) == 1 else self._combine(parts)
        self._request_adapters[adapters] = name
        return name

    def _load_one(self, adapter: Adapter) -> str:
        from peft import PeftModel

        known = self._request_adapters.get((adapter,))
        if known is not None:
            return known
        if adapter.path is None:
            raise InvalidInput(f"The LoRA {adapter.name} was not found in the LoRA folder.")
        _check_folder(adapter.path)
        name = "request_" + re.sub(r"\W", "_", f"{adapter.name}_x{adapter.scale:g}")
        try:
            if self.wrapped:
                self.model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=name,
                                                       is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            self._forget(name)
            raise ModelLoadError(f"Could not load the LoRA {adapter.name}: {exc}") from None
        finally:
            self._reactivate()
        mixed_batch_layers(self.model)
        _set_scale(self.model, name, adapter.scale)
        self._request_adapters[(adapter,)] = name
        return name

    def _combine(self, parts: list[str]) -> str:
        name = "request_" + "__".join(parts)
        try:
            self.model.base_model.add_weighted_adapter(parts, [1.0] * len(parts), name, combination_type="cat")
        except (ValueError, RuntimeError, KeyError) as exc:
            self._forget(name)
            raise InvalidInput(f"These LoRAs cannot be combined for one request: {exc}") from None
        finally:
            self._reactivate()
        mixed_batch_layers(self.model)
        return name

    def _reactivate(self) -> None:
        """Make the applied set the active one again: PEFT activates an adapter it wraps a model with, and each
        injection re-activates its tuner's first adapter in every layer."""
        if not self.wrapped:
            return
        if self._loras:
            self.model.base_model.set_adapter([_adapter_name(n) for n in self._loras], inference_mode=True)
        else:
            _deactivate(self.model)  # nothing is applied to the whole model: its layers run the base alone

    def _forget(self, name: str) -> None:
        """Drop a half-loaded adapter (PEFT may have injected some layers before failing)."""
        from peft.tuners.lora import LoraLayer

        if not self.wrapped:
            return
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                module.delete_adapter(name)
        self.model.peft_config.pop(name, None)


def _check_folder(path: Path) -> None:
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path.name} is not a PEFT LoRA folder (no adapter_config.json).")
    if not (path / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"{path.name} has no adapter_model.safetensors; pickle adapters are refused.")


def _adapter_name(folder: str) -> str:
    return folder.replace(".", "_")


def _set_scale(model: Any, name: str, scale: float) -> None:
    """Scale adapter `name`'s update in every layer (lora_alpha / r times `scale`)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(name, scale)


def _deactivate(model: Any) -> None:
    """No adapter active in any layer: a forward without adapter_names runs the base model."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([])


def mixed_batch_layers(model: Any) -> int:
    """Give PEFT's LoRA wrappers of GPTQ and AWQ layers a forward that takes `adapter_names` (a batch mixing
    adapters row by row): theirs takes only the input and fails when PEFT passes the names on. LoraLayer's own
    mixed-batch forward then runs the quantized base layer and adds each row's adapter, as for a plain Linear.
    Returns how many layers were changed."""
    count = 0
    for module in model.modules():
        mixed = _mixed_class(type(module))
        if mixed is not None:
            module.__class__ = mixed
            count += 1
    return count


@functools.cache
def _mixed_class(kind: type) -> type | None:
    from peft.tuners.lora.awq import AwqLoraLinear
    from peft.tuners.lora.gptq import GPTQLoraLinear

    if kind not in (GPTQLoraLinear, AwqLoraLinear):
        return None

    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return kind.forward(self, x)

    return type(f"Mixed{kind.__name__}", (kind,), {"forward": forward, "__doc__": mixed_batch_layers.__doc__})
