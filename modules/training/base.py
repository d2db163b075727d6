"""The model a LoRA trains on. A Transformers folder is used as is; a GGUF file is trained through a dequantized
Transformers copy of the same weights, made once and kept in models/ beside it (the adapter is then exported as
a GGUF LoRA that llama.cpp applies to the original quantized file)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.base import gguf_files
from modules.errors import ConfigError
from modules.starter import STARTER_GGUF, STARTER_HF_DIR, convert_gguf_to_transformers


@dataclass(frozen=True)
class TrainingBase:
    hf_dir: Path  # the Transformers folder the job trains on
    gguf: Path | None  # the GGUF file the user picked, when it was one


def transformers_copy_dir(gguf: Path) -> Path:
    """Where the Transformers copy of `gguf` lives: the starter's known folder, or `<stem>-transformers`."""
    if gguf.name == STARTER_GGUF:
        return gguf.parent / STARTER_HF_DIR
    return gguf.parent / f"{gguf.stem}-transformers"


def is_transformers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def training_base(path: Path, *, convert: bool = True) -> TrainingBase:
    """The folder to train on for the model at `path` (a folder or a GGUF file), converting a GGUF when asked."""
    if is_transformers_folder(path):
        return TrainingBase(path, None)
    files = gguf_files(path)
    if len(files) == 1:
        target = transformers_copy_dir(files[0])
        if convert and not is_transformers_folder(target):
            try:
                convert_gguf_to_transformers(files[0], target)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise ConfigError(f"Could not make a Transformers copy of {files[0].name} to train on: {exc}") \
                    from None
        return TrainingBase(target, files[0])
    if len(files) > 1:
        raise ConfigError(f"{path.name} holds several GGUF files; pick one to train on.")
    raise ConfigError(f"{path.name} is neither a Transformers folder (config.json + *.safetensors) nor a GGUF file, "
                      "so it cannot be trained on.")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of the model at `path` without loading weights: from the folder, the GGUF's Transformers
    copy when it exists, or the GGUF metadata itself."""
    from transformers import AutoTokenizer

    if is_transformers_folder(path):
        return AutoTokenizer.from_pretrained(path)
    files = gguf_files(path)
    if len(files) != 1:
        raise ConfigError(f"{path.name} is neither a Transformers folder nor one GGUF file.")
    copy = transformers_copy_dir(files[0])
    if is_transformers_folder(copy):
        return AutoTokenizer.from_pretrained(copy)
    try:
        return AutoTokenizer.from_pretrained(files[0].parent, gguf_file=files[0].name)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"Could not read the tokenizer of {files[0].name}: {exc}") from None
