"""Presets: presets/<name>.yaml holds the GenerationParams keys that differ from the defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from modules.errors import ConfigError, NotFound, PathError, describe_validation_error
from modules.generation_params import GenerationParams
from modules.paths import atomic_write_text, resolve_inside

SUFFIX = ".yaml"


def list_presets(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted((p.stem for p in folder.glob(f"*{SUFFIX}") if p.is_file()), key=lambda n: (n != "Default", n))


def preset_path(folder: Path, name: str, *, must_exist: bool = False) -> Path:
    return resolve_inside(folder, _file_name(name), what="preset", must_exist=must_exist)


def params_from_mapping(values: Any, source: str) -> GenerationParams:
    """Validate a mapping as GenerationParams, with an error that names the file and the bad key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must hold a mapping of parameter: value, not {type(values).__name__}.")
    try:
        return GenerationParams(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def parse_preset_text(text: str, source: str) -> GenerationParams:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    return params_from_mapping(values, source)


def load_preset(folder: Path, name: str) -> GenerationParams:
    path = preset_path(folder, name)
    if not path.is_file():
        raise NotFound(f"No preset named {name!r} in {folder}.")
    return parse_preset_text(path.read_text(encoding="utf-8"), f"preset {path.name}")


def preset_text(params: GenerationParams) -> str:
    return yaml.safe_dump(params.non_default(), sort_keys=False, allow_unicode=True) if params.non_default() else "{}\n"


def save_preset(folder: Path, name: str, params: GenerationParams, *, overwrite: bool = True) -> Path:
    path = preset_path(folder, name)
    if path.exists() and not overwrite:
        raise ConfigError(f"A preset named {name!r} exists already.")
    atomic_write_text(path, preset_text(params))
    return path


def delete_preset(folder: Path, name: str) -> None:
    path = preset_path(folder, name, must_exist=True)
    path.unlink()


def _file_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise PathError("The preset name is empty.")
    return name if name.endswith(SUFFIX) else name + SUFFIX
