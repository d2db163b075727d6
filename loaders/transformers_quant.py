"""GPTQ and AWQ checkpoints in the Transformers loader (and the training job), through Transformers' own
quantization integration: GPTQModel's kernels (and, for GPTQ, optimum's GPTQ quantizer that Transformers calls)
replace the linear layers while the checkpoint loads, so generation, batching, PEFT LoRAs and training stay the
Transformers paths they are for any model.

A checkpoint is recognised by `quantization_config` in config.json (quant_method gptq or awq), else by an
AutoGPTQ/AutoAWQ-era `quantize_config.json` / `quant_config.json` beside it, whose settings are then put into
the config (Transformers would otherwise take the packed weights for a model to quantize).

The kernel is GPTQModel's automatic choice (Marlin, ExLlama, Machete ... on CUDA; its int4 ATen kernel on a CPU)
except on a CPU when a layer's input width is not a multiple of the group size: the ATen kernel is still picked
then and fails at the first forward (SmolLM2-135M's 576-wide layers with groups of 128), so the plain torch kernel
is taken instead. GPTQModel compiles that torch kernel's dequantization with torch.compile: on this 2-core CPU the
first generation waits for it (22 s with an empty compile cache, 5 s after), then runs about twice as fast as the
eager kernel (5.3 against 2.8 tokens/s on SmolLM2-135M GPTQ g128).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modules.errors import ConfigError, LoaderUnavailable, ModelLoadError

METHODS = ("gptq", "awq")
#: What the `quant_kernel` option names; "auto" lets GPTQModel pick (see the module docstring).
QuantKernel = Literal["auto", "torch", "torch_fused", "triton", "exllama_v2", "marlin", "machete"]
#: AWQ's names for the same kernels (Transformers' AwqBackend).
_AWQ_KERNELS = {"torch": "torch_awq", "torch_fused": "torch_fused_awq", "triton": "gemm_triton"}
#: The pinned versions the README's install puts in (requirements.txt).
LIBRARIES = {"gptqmodel": "gptqmodel==7.6.0", "optimum": "optimum==2.3.0"}


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """What a GPTQ/AWQ folder says about itself: method, bits, group size (-1: one group per row), act-order, and
    the settings as stored (`stored`); `in_config` is False for a quantize_config.json without a
    quantization_config in config.json."""

    method: str
    bits: int
    group_size: int
    desc_act: bool
    stored: dict[str, Any] = field(default_factory=dict)
    in_config: bool = True

    @property
    def label(self) -> str:
        group = "" if self.group_size <= 0 else f" g{self.group_size}"
        return f"{self.method.upper()} {self.bits}-bit{group}{' act-order' if self.desc_act else ''}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def quantized_checkpoint(path: Path) -> QuantizedCheckpoint | None:
    """The GPTQ/AWQ settings of the folder `path`, or None when it holds no GPTQ/AWQ checkpoint."""
    if not path.is_dir():
        return None
    config = _read_json(path / "config.json") or {}
    stored = config.get("quantization_config")
    in_config = isinstance(stored, dict)
    if in_config:
        if str(stored.get("quant_method", "")).lower() not in METHODS:
            return None  # bitsandbytes, EXL2, compressed-tensors ...: not ours
    else:
        stored = _read_json(path / "quantize_config.json") or _read_json(path / "quant_config.json")
        if stored is None:
            return None
    method = str(stored.get("quant_method") or stored.get("method") or "").lower()
    if not method:  # AutoAWQ's quant_config.json says w_bit/q_group_size/version; AutoGPTQ's says bits/group_size
        method = "awq" if "w_bit" in stored or "version" in stored else "gptq"
    if method not in METHODS:
        return None
    bits = int(stored.get("bits") or stored.get("w_bit") or 4)
    group = int(stored.get("group_size") or stored.get("q_group_size") or -1)
    return QuantizedCheckpoint(method, bits, group, bool(stored.get("desc_act")), dict(stored), in_config)


def require_libraries(checkpoint: QuantizedCheckpoint) -> None:
    """LoaderUnavailable naming what to install unless GPTQModel (and for GPTQ, optimum) are importable."""
    needed = ["gptqmodel"] + (["optimum"] if checkpoint.method == "gptq" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise LoaderUnavailable(
            f"{checkpoint.method.upper()} checkpoints load through {' and '.join(needed)}, and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install {' '.join(LIBRARIES[name] for name in missing)}", loader="transformers")


def layer_widths(path: Path, checkpoint: QuantizedCheckpoint) -> set[int]:
    """The input widths of the quantized layers, from the packed `qweight` shapes in the safetensors headers
    (GPTQ packs 32/bits input rows per int32; AWQ packs along the outputs)."""
    from modules.quantize.job import safetensors_header

    widths: set[int] = set()
    for file in sorted(path.glob("*.safetensors")):
        try:
            header = safetensors_header(file)
        except ConfigError:
            continue  # Transformers says what is wrong with the file when it loads it
        for name, info in header.items():
            if name.endswith(".qweight") and isinstance(info, dict) and len(info.get("shape", ())) == 2:
                rows = int(info["shape"][0])
                widths.add(rows * 32 // checkpoint.bits if checkpoint.method == "gptq" else rows)
    return widths


def pick_kernel(path: Path, checkpoint: QuantizedCheckpoint, *, device: str, kernel: str,
                trainable: bool = False) -> str:
    """The backend name handed to Transformers' GPTQConfig/AwqConfig (see the module docstring)."""
    if kernel == "auto":
        ragged = checkpoint.group_size > 0 and any(width % checkpoint.group_size for width in
                                                   layer_widths(path, checkpoint))
        if device == "cpu" and ragged:
            kernel = "torch"
        else:
            return "auto_trainable" if trainable else "auto"
    return _AWQ_KERNELS.get(kernel, kernel) if checkpoint.method == "awq" else kernel


def quantization_kwargs(path: Path, checkpoint: QuantizedCheckpoint, *, device: str, kernel: str = "auto",
                        trainable: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """from_pretrained keywords that load `checkpoint` with the chosen kernel: its quantization_config (only
    the loading attributes count for a quantized checkpoint), and the config with the settings of a
    quantize_config.json put in when config.json lacks them."""
    from transformers import AwqConfig, GPTQConfig

    require_libraries(checkpoint)
    backend = pick_kernel(path, checkpoint, device=device, kernel=kernel, trainable=trainable)
    kind = AwqConfig if checkpoint.method == "awq" else GPTQConfig
    try:
        kwargs: dict[str, Any] = {"quantization_config": kind(bits=checkpoint.bits, backend=backend)}
    except ValueError as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from None
    if not checkpoint.in_config:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        settings = {"bits": checkpoint.bits, "group_size": checkpoint.group_size, "desc_act": checkpoint.desc_act,
                    "sym": bool(checkpoint.stored.get("sym", not checkpoint.stored.get("zero_point", False))),
                    "quant_method": checkpoint.method}
        if checkpoint.method == "awq":
            settings["version"] = str(checkpoint.stored.get("version", "gemm")).lower()
            settings["zero_point"] = bool(checkpoint.stored.get("zero_point", True))
        config.quantization_config = settings
        kwargs["config"] = config
    return kwargs


def quantized_dtype(choice: str, device: str) -> Any:
    """GPTQModel's kernels compute in float16 or bfloat16 only: 'auto' is bfloat16 on a CPU (float16 matmuls are
    slow there) and float16 on CUDA (what the CUDA kernels are fastest in)."""
    import torch

    if choice == "float32":
        raise ModelLoadError("GPTQ and AWQ kernels compute in float16 or bfloat16, not float32: choose one of "
                             "those (or auto).")
    if choice != "auto":
        return getattr(torch, choice)
    return torch.bfloat16 if device == "cpu" else torch.float16


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """GPTQModel's logger writes its banner and kernel choices to stdout, which the command lines keep for their
    results (modules.generate's completion, modules.compare's table): while it is imported or loads a model, what
    it prints goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def kernel_names(model: Any) -> list[str]:
    """The classes of the quantized linear layers in `model` (which kernel runs it)."""
    try:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    except ImportError:
        return []
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})
