"""The files a run folder holds, and reading/writing them.

progress.jsonl: one JSON object a line, appended by the job (rank 0): {"type": "train", "step", "max_steps",
"epoch", "loss", "lr", "grad_norm", "tokens", "tok_s", "eta_s", "time"}, {"type": "eval", "step", "eval_loss",
...}, {"type": "event", "event": "started" | "resumed" | "stopped" | "finished" | "failed", "message", ...}.
status.json: the job's current state, replaced atomically. STOP: its presence asks the job to save and stop.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.paths import atomic_write_text

PROGRESS_FILE = "progress.jsonl"
STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "job.log"
STOP_FILE = "STOP"
CHECKPOINTS = "checkpoints"
COMPLETE_MARK = "COMPLETE"

ACTIVE_STATES = ("starting", "preparing", "running", "stopping")


def append_progress(run_dir: Path, record: dict[str, Any]) -> None:
    """One line, written with a single write() on an O_APPEND file so a reader never sees half a record."""
    record = {"time": round(time.time(), 3), **record}
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(run_dir / PROGRESS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_progress(run_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records after byte `offset`, and the offset to pass next time (a half-written last line is left for then)."""
    path = run_dir / PROGRESS_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], 0
    records = []
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by kill -9 mid-write: skip it
    return records, offset + end


def truncate_progress_after(run_dir: Path, step: int) -> None:
    """Drop train/eval records past `step` (logged after the checkpoint a resume starts from), so the resumed
    curve joins the old one instead of doubling back."""
    records, _ = read_progress(run_dir)
    kept = [r for r in records if r.get("type") == "event" or int(r.get("step", 0)) <= step]
    atomic_write_text(run_dir / PROGRESS_FILE, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


def write_status(run_dir: Path, **status: Any) -> None:
    current = read_status(run_dir)
    current.update(status, updated=round(time.time(), 3))
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(current, indent=1))


def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@dataclass
class Curves:
    """What the tab draws: train and eval loss by step, and the latest progress numbers."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    latest: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            kind = record.get("type")
            if kind == "train" and record.get("loss") is not None:
                self.train.append((int(record["step"]), float(record["loss"])))
                self.latest = record
            elif kind == "eval" and record.get("eval_loss") is not None:
                self.eval.append((int(record["step"]), float(record["eval_loss"])))
            elif kind == "event":
                self.events.append(record)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written completely (our marker is written after everything else)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARK).is_file()
                and p.name.split("-")[-1].isdigit()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)
