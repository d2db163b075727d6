"""Start, stop, resume and watch training jobs. Each job is a child process (`python -m modules.training.run`,
or that module under `accelerate launch` for several processes) whose state lives in its run folder, so a page
reload, or a restart of the web UI, finds it again. One job runs at a time (they would fight over the same
cores or GPUs)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.errors import BusyError, ConfigError, PathError
from modules.paths import atomic_write_text, resolve_inside
from modules.training.config import CONFIG_FILE_NAME, Folders, TrainingConfig, load_config
from modules.training.datasets import dataset_path
from modules.training.progress import (ACTIVE_STATES, CONFIG_FILE, LOG_FILE, STOP_FILE, Curves, latest_checkpoint,
                                       read_progress, read_status, write_status)

ROOT = Path(__file__).resolve().parents[2]


def folders_for(settings: Any) -> Folders:
    """The job folders for the web UI's settings: models/ and loras/ from them, datasets/ and runs/ under
    settings.training_dir."""
    training = Path(settings.training_dir)
    return Folders(models=settings.model_dir, loras=settings.lora_dir, datasets=training / "datasets",
                   runs=training / "runs")


@dataclass
class JobStatus:
    name: str
    state: str  # none, starting, preparing, running, stopping, finished, stopped, failed, interrupted
    message: str = ""
    step: int = 0
    max_steps: int = 0
    eta_s: float | None = None
    loss: float | None = None
    resumable: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


class JobManager:
    """The Training tab's (and the tests') handle on jobs; it holds only its own child-process handles."""

    def __init__(self, folders: Folders, *, python: str = sys.executable):
        self.folders = Folders(**{k: Path(v).resolve() for k, v in folders.model_dump().items()})
        self.python = python
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # --- queries ------------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return resolve_inside(self.folders.runs, name, what="training run")

    def list_runs(self) -> list[str]:
        runs = self.folders.runs
        if not runs.is_dir():
            return []
        found = [p for p in runs.iterdir() if (p / CONFIG_FILE).is_file()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def config(self, name: str) -> TrainingConfig:
        return load_config(self.run_dir(name) / CONFIG_FILE)

    def status(self, name: str) -> JobStatus:
        run_dir = self.run_dir(name)
        raw = read_status(run_dir)
        if not raw:
            return JobStatus(name, "none")
        state = raw.get("state", "none")
        if state in ACTIVE_STATES and not self._alive(name, raw):
            state = "interrupted"  # killed (kill -9, a crash, a reboot): resume picks up the last checkpoint
        resumable = state in ("interrupted", "stopped", "failed") and latest_checkpoint(run_dir) is not None
        message = raw.get("message", "")
        if state == "interrupted":
            message = "The job ended without saying why (killed?)." + (" Resume continues from the last "
                                                                         "checkpoint." if resumable else "")
        return JobStatus(name, state, message, int(raw.get("step") or 0), int(raw.get("max_steps") or 0),
                         raw.get("eta_s"), raw.get("loss"), resumable, raw)

    def active_job(self) -> str | None:
        for name in self.list_runs():
            if self.status(name).active:
                return name
        return None

    def progress(self, name: str, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        return read_progress(self.run_dir(name), offset)

    def curves(self, name: str) -> Curves:
        curves = Curves()
        curves.add(self.progress(name)[0])
        return curves

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            text = (self.run_dir(name) / LOG_FILE).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- actions ------------------------------------------------------------------------------------------------
    def start(self, config: TrainingConfig) -> JobStatus:
        """Check what can be checked here (names, files, an existing LoRA or run), then launch the job."""
        config = config.model_copy(update={"folders": self.folders})
        config = TrainingConfig(**config.model_dump())  # validate the copy as a whole
        config.base_path()
        dataset_path(self.folders.datasets, config.dataset.train_file)
        if config.dataset.eval_file:
            dataset_path(self.folders.datasets, config.dataset.eval_file)
        from modules.training.run import check_environment

        check_environment(config)
        self._refuse_if_busy()
        lora = config.lora_path
        if lora.exists() and not config.overwrite:
            raise PathError(f"A LoRA named {config.name!r} already exists; choose another name or allow "
                            "overwriting.")
        run_dir = self.run_dir(config.name)
        if run_dir.exists():
            if not config.overwrite:
                raise PathError(f"A training run named {config.name!r} already exists; resume it, or allow "
                                "overwriting to start again.")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())
        return self._launch(config, resume=False)

    def resume(self, name: str) -> JobStatus:
        status = self.status(name)
        if status.state == "none":
            raise PathError(f"No training run named {name!r}.")
        if status.active:
            raise BusyError(f"The run {name!r} is still going.")
        self._refuse_if_busy()
        return self._launch(self.config(name), resume=True)

    def stop(self, name: str) -> JobStatus:
        """Ask the job to save its adapter and stop (it checks after every optimizer step)."""
        status = self.status(name)
        if not status.active:
            return status
        (self.run_dir(name) / STOP_FILE).touch()
        if status.state in ("starting", "preparing"):
            self._signal(name, signal.SIGTERM)  # nothing to save yet: stop at once
        write_status(self.run_dir(name), state="stopping")
        return self.status(name)

    def kill(self, name: str) -> None:
        """End the job at once, without saving (a later Resume starts from the last checkpoint)."""
        self._signal(name, signal.SIGKILL)
        child = self._children.get(name)
        if child is not None:
            child.wait(timeout=30)

    def wait(self, name: str, timeout: float = 600.0, poll: float = 0.5) -> JobStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(name)
            if not status.active:
                return status
            time.sleep(poll)
        raise TimeoutError(f"The training run {name!r} was still going after {timeout:.0f} s.")

    # --- processes ----------------------------------------------------------------------------------------------
    def command(self, config: TrainingConfig, *, resume: bool) -> list[str]:
        config_path = str(self.run_dir(config.name) / CONFIG_FILE)
        job = ["-m", "modules.training.run", config_path] + (["--resume"] if resume else [])
        processes = config.launch.num_processes
        if processes == 1:
            return [self.python, *job]
        # torch.distributed.run under accelerate's launcher; on a machine without CUDA (or with launch.cpu) the
        # job asks accelerate for CPU processes, which join over gloo. (accelerate's own --cpu flag starts a
        # single process unless MPI is set up.)
        return [self.python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *job]

    def _launch(self, config: TrainingConfig, *, resume: bool) -> JobStatus:
        run_dir = self.run_dir(config.name)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        write_status(run_dir, state="starting", message="Starting", pid=None, launcher_pid=None)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        with open(run_dir / LOG_FILE, "ab") as log:
            child = subprocess.Popen(self.command(config, resume=resume), cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[config.name] = child
        write_status(run_dir, launcher_pid=child.pid)
        return self.status(config.name)

    def _refuse_if_busy(self) -> None:
        running = self.active_job()
        if running is not None:
            raise BusyError(f"The training run {running!r} is still going; stop it first (one job at a time).")

    def _alive(self, name: str, raw: dict[str, Any]) -> bool:
        child = self._children.get(name)
        if child is not None:
            return child.poll() is None
        return any(_pid_alive(raw.get(key)) for key in ("launcher_pid", "pid"))

    def _signal(self, name: str, sig: int) -> None:
        raw = read_status(self.run_dir(name))
        child = self._children.get(name)
        pids = [child.pid] if child is not None else [p for p in (raw.get("launcher_pid"), raw.get("pid")) if p]
        for pid in pids:
            if not _pid_alive(pid):
                continue
            try:
                os.killpg(os.getpgid(pid), sig)  # the launcher and every rank it started
            except (ProcessLookupError, PermissionError):
                pass


def _pid_alive(pid: Any) -> bool:
    """True for a running training job process (not a zombie, not a recycled pid of another program)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True
    return state != b"Z" and b"modules.training.run" in cmdline


def copy_settings_from_lora(lora_dir: Path) -> dict[str, Any]:
    """The training settings an existing LoRA was made with (its training_config.yaml), for the form."""
    from modules.training.config import form_settings, parse_config
    from modules.training.export import lora_training_config

    data = lora_training_config(lora_dir)
    if not data:
        raise ConfigError(f"{lora_dir.name} has no {CONFIG_FILE_NAME}: it was not trained here.")
    return form_settings(parse_config(data, str(lora_dir / CONFIG_FILE_NAME)))
