"""After training: merge a LoRA into its base (safetensors in models/), export models and adapters to GGUF with
llama.cpp's own converters, and quantize with llama.cpp's quantizer.

The converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` package and matching gguf-py)
come from the pinned llama-cpp-python source distribution; scripts/fetch_llama_converters.sh puts them in
vendor/llama.cpp-converters/ at install time. They run as child processes so their gguf-py never mixes with
the gguf package this process imported.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import yaml

from modules.errors import ConfigError, PathError, WorkbenchError
from modules.paths import resolve_inside
from modules.training.base import is_transformers_folder, training_base
from modules.training.config import CONFIG_FILE_NAME

ROOT = Path(__file__).resolve().parents[2]
CONVERTERS_DIR = ROOT / "vendor" / "llama.cpp-converters"
GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m"]
GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q4_k_m")
_QUANT_FTYPES = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_K_M)


class ExportError(WorkbenchError):
    """A merge, conversion or quantization failed; the message says which step and why."""

    error_type = "server_error"
    status_code = 500


def converters_dir() -> Path:
    if not (CONVERTERS_DIR / "convert_hf_to_gguf.py").is_file():
        raise ExportError("llama.cpp's GGUF converters are missing: run scripts/fetch_llama_converters.sh "
                          "(the install scripts run it).")
    return CONVERTERS_DIR


def _run_converter(script: str, args: list[str], *, timeout: float = 3600) -> None:
    command = [sys.executable, str(converters_dir() / script), *args]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ExportError(f"{script} did not finish within {timeout:.0f} s.") from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
        raise ExportError(f"{script} failed (exit {result.returncode}):\n{tail}")


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

    _fresh_target(out_dir, overwrite, "The model folder")
    if not (lora_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{lora_dir.name} holds no adapter_model.safetensors (a PEFT LoRA) to merge.")
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
        raise ExportError(f"Merging {lora_dir.name} into {base_dir.name} failed: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --- GGUF -------------------------------------------------------------------------------------------------------


def export_lora_gguf(lora_dir: Path, base_dir: Path, *, outtype: str = "f16") -> Path:
    """Write the adapter as `<lora>/<lora>.gguf`, the form the llama.cpp loader applies."""
    out = lora_dir / f"{lora_dir.name}.gguf"
    part = lora_dir / f".{lora_dir.name}.gguf.part"
    try:
        _run_converter("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outtype", outtype,
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
    """A Transformers folder -> one GGUF file: f16/bf16 straight from convert_hf_to_gguf.py, Q8_0/Q4_K_M by
    converting to f16 first and quantizing with llama.cpp's quantizer."""
    if quant not in GGUF_TYPES:
        raise ConfigError(f"Unknown GGUF type {quant!r}; choose one of {', '.join(GGUF_TYPES)}.")
    if not is_transformers_folder(model_dir):
        raise ConfigError(f"{model_dir.name} is not a Transformers folder (config.json + *.safetensors).")
    _fresh_target(out_file, overwrite, "The GGUF file")
    part = out_file.with_name(f".{out_file.name}.part")
    f16 = out_file.with_name(f".{out_file.name}.f16.part")
    try:
        if quant in ("f16", "bf16"):
            _run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outtype", quant, "--outfile", str(part)])
        else:
            _run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outtype", "f16", "--outfile", str(f16)])
            quantize_gguf(f16, part, quant)
        os.replace(part, out_file)
    finally:
        part.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    return out_file


def quantize_gguf(source: Path, target: Path, quant: str, *, threads: int = 0, timeout: float = 3600) -> Path:
    """llama.cpp's quantizer (llama_model_quantize, as llama-cpp-python exposes it), run in a child process: it
    logs every tensor to stderr, and an abort inside llama.cpp must not take the web UI down with it."""
    if quant not in _QUANT_FTYPES:
        raise ConfigError(f"Unknown quantization {quant!r}; choose one of {', '.join(_QUANT_FTYPES)}.")
    command = [sys.executable, "-m", "modules.training.export", "quantize", str(source), str(target), quant,
               str(threads)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise ExportError(f"Quantizing {source.name} did not finish within {timeout:.0f} s.") from None
    if result.returncode != 0 or not target.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-4:])
        raise ExportError(f"llama.cpp could not quantize {source.name} to {quant.upper()}:\n{tail}")
    return target


def _quantize_here(source: str, target: str, quant: str, threads: int) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _QUANT_FTYPES[quant]
    params.nthread = threads
    return int(llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)))


def gguf_name(model_name: str, quant: str) -> str:
    return f"{model_name}.{quant.upper()}.gguf"


if __name__ == "__main__":  # `python -m modules.training.export quantize SRC DST TYPE THREADS` (see quantize_gguf)
    if len(sys.argv) == 6 and sys.argv[1] == "quantize":
        sys.exit(_quantize_here(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    sys.exit("usage: python -m modules.training.export quantize SRC DST q8_0|q4_k_m THREADS")
