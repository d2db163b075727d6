"""What every quantization job shares, whatever the format (GGUF, GPTQ, AWQ): progress reported as one overall
fraction with an ETA (for a UI progress bar), a threading.Event that stops it, a check of free disk space against
an estimate before anything is written, the one rule for where its output lands in models/, and the reading of a
safetensors header (to count a source's weights without loading them)."""
from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modules.errors import Cancelled, ConfigError, NotEnoughSpace, PathError
from modules.paths import resolve_inside


@dataclass(frozen=True)
class Progress:
    """One report: the stage running now, the overall fraction done (0..1), seconds so far and the estimated
    seconds left (None until something has been measured)."""

    stage: str
    fraction: float
    elapsed: float
    eta: float | None
    detail: str = ""


ProgressCallback = Callable[[Progress], None]


class Tracker:
    """Turns per-stage fractions into overall Progress: each stage owns a share of the bar given by its weight
    (its expected share of the time). The ETA is the elapsed time scaled by what is left."""

    def __init__(self, stages: dict[str, float], callback: ProgressCallback | None = None,
                 cancel: threading.Event | None = None):
        total = sum(stages.values()) or 1.0
        self._start: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        offset = 0.0
        for name, weight in stages.items():
            self._start[name] = offset / total
            self._weight[name] = weight / total
            offset += weight
        self.callback = callback
        self.cancel = cancel
        self.started = time.monotonic()
        self.last: Progress | None = None

    def check(self) -> None:
        """Raise Cancelled when the caller has asked to stop."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("The job was cancelled; nothing was kept.")

    def update(self, stage: str, fraction: float, detail: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        overall = self._start[stage] + self._weight[stage] * fraction
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1 - overall) / overall if overall > 0.01 else None
        self.last = Progress(stage, round(overall, 4), round(elapsed, 2), None if eta is None else round(eta, 1),
                             detail)
        if self.callback is not None:
            self.callback(self.last)


def output_path(models_dir: Path, name: str, suffix: str, *, overwrite: bool) -> Path:
    """`name` inside models/ (with `suffix` added when it lacks it), refused when it exists and `overwrite` is
    not set, or when it would leave models/."""
    if not name.endswith(suffix):
        name += suffix
    if "/" in name:
        raise PathError(f"The output name {name!r} must be a plain file name inside {models_dir}.")
    path = resolve_inside(models_dir, name, what="output")
    if path.exists() and not overwrite:
        raise PathError(f"{path.name} already exists in {models_dir}; choose another name or pass --overwrite.")
    return path


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before starting when `folder`'s file system has less than `needed` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise NotEnoughSpace(f"{what} needs about {human_size(needed)} free in {folder}, and only "
                             f"{human_size(free)} is free. Free some space or choose a smaller type.")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then the JSON): each tensor's dtype
    and shape. ConfigError when the file is not one."""
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            return json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{file.name} is not a readable safetensors file: {exc}") from None
