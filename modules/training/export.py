"""After training: merge a LoRA into its base (safetensors in models/), export models and adapters to GGUF with
llama.cpp's own converters, and quantize with llama.cpp's quantizer.

The converters and the quantizer are run by modules.quantize (llama_tools: child processes; gguf.make_gguf: a
model to one GGUF of a chosen type); this module adds what is particular to training: LoRAs and their bases.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import yaml

from modules.errors import ConfigError, ConversionError, PathError
from modules.paths import resolve_inside
from modules.quantize.gguf import gguf_name, make_gguf
from modules.quantize.llama_tools import quantize_gguf, run_converter
from modules.training.base import is_transformers_folder, training_base
from modules.training.config import CONFIG_FILE_NAME

GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m"]
#: The types the Training tab offers; `python -m modules.quantize gguf` takes every type llama.cpp writes.
GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q4_k_m")
__all__ = ["GGUF_TYPES", "export_lora_gguf", "export_model_gguf", "gguf_name", "merge_lora", "quantize_gguf"]


def _fresh_target(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and not overwrite:
        raise PathError(f"{what} {path.name} already exists; choose another name or allow overwriting.")


# --- which base a LoRA belongs to ------------------------------------------------------------------------------


def lora_training_config(lora_dir: Path) -> dict:
    path = lora_dir / CONFIG_FILE_NAME
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return data if isinstance(data, dict) else {}


def lora_base_dir(lora_dir: Path, models_dir: Path, base: str | None = None) -> Path:
    """The Transformers folder a LoRA was trained on: `base` (a name in models/) when given, else the base named
    in its training config, else its adapter_config's base path when that lies inside models/."""
    name = base or lora_training_config(lora_dir).get("base_model")
    if name:
        return training_base(resolve_inside(models_dir, name, what="model", must_exist=True)).hf_dir
    try:
        recorded = json.loads((lora_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded:
        path = Path(recorded).resolve()
        if models_dir.resolve() in path.parents and is_transformers_folder(path):
            return path
    raise ConfigError(f"{lora_dir.name} does not say which model it was trained on; pick the base model.")


# --- merge ------------------------------------------------------------------------------------------------------


def merge_lora(lora_dir: Path, base_dir: Path, out_dir: Path, *, dtype: str = "bfloat16",
               overwrite: bool = False) -> Path:
    """Fold the adapter into the base weights and save model + tokenizer as safetensors in `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loaders.transformers_quant import quantized_checkpoint

    _fresh_target(out_dir, overwrite, "The model folder")
    if not (lora_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{lora_dir.name} holds no adapter_model.safetensors (a PEFT LoRA) to merge.")
    quantized = quantized_checkpoint(base_dir)
    if quantized is not None:
        raise ConfigError(f"{base_dir.name} is a {quantized.label} checkpoint: a LoRA cannot be folded into its "
                          "packed weights. Merge into the full-precision model it was made from (the LoRA fits it "
                          "too), or apply the LoRA when the quantized model is loaded.")
    tmp = out_dir.with_name(f".{out_dir.name}.merging")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
        merged.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConversionError(f"Merging {lora_dir.name} into {base_dir.name} failed: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --- GGUF -------------------------------------------------------------------------------------------------------


def export_lora_gguf(lora_dir: Path, base_dir: Path, *, outtype: str = "f16") -> Path:
    """Write the adapter as `<lora>/<lora>.gguf`, the form the llama.cpp loader applies."""
    out = lora_dir / f"{lora_dir.name}.gguf"
    part = lora_dir / f".{lora_dir.name}.gguf.part"
    try:
        run_converter("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outtype", outtype,
                                                  "--outfile", str(part), str(lora_dir)])
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def ensure_lora_for_loader(loader_name: str, lora_dir: Path, models_dir: Path) -> None:
    """Before applying a LoRA: the llama.cpp loader needs it as GGUF, so export it once when it is missing."""
    if loader_name == "llama.cpp" and not any(lora_dir.glob("*.gguf")):
        export_lora_gguf(lora_dir, lora_base_dir(lora_dir, models_dir))


def export_model_gguf(model_dir: Path, out_file: Path, quant: str = "f16", *, overwrite: bool = False) -> Path:
    """A Transformers folder -> one GGUF file of one of the Training tab's types (see make_gguf)."""
    if quant not in GGUF_TYPES:
        raise ConfigError(f"Unknown GGUF type {quant!r}; choose one of {', '.join(GGUF_TYPES)}.")
    if not is_transformers_folder(model_dir):
        raise ConfigError(f"{model_dir.name} is not a Transformers folder (config.json + *.safetensors).")
    _fresh_target(out_file, overwrite, "The GGUF file")
    return make_gguf(model_dir, out_file, quant, overwrite=overwrite)
