"""One long job of a kind at a time per server (a conversion, a comparison), run in a thread so that the page stays
responsive: the Model tab's panels start it, poll its state with a timer, and stop it through the core's cancel
Event. Gradio-free, so the rules of starting, stopping and reporting can be read (and tested) on their own; the
progress box is plain HTML that any page can draw."""
from __future__ import annotations

import html
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modules.errors import BusyError, Cancelled, WorkbenchError
from modules.quantize.job import Progress, ProgressCallback

log = logging.getLogger(__name__)

Job = Callable[[ProgressCallback, threading.Event], Any]


@dataclass(frozen=True)
class TaskState:
    """What a page shows of a task. `state` is idle, running, stopping, finished, stopped or failed; `serial`
    grows with each start, so a page tells a new run from the one it last drew."""

    state: str
    label: str = ""
    progress: Progress | None = None
    message: str = ""
    result: Any = None
    serial: int = 0

    @property
    def active(self) -> bool:
        return self.state in ("running", "stopping")


class BackgroundTask:
    """Runs one job at a time in a daemon thread. `what` names the kind of job in messages ("A conversion")."""

    def __init__(self, what: str):
        self.what = what
        self._lock = threading.Lock()
        self._state = TaskState("idle")
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def state(self) -> TaskState:
        with self._lock:
            return self._state

    def start(self, label: str, job: Job, describe: Callable[[Any], str]) -> TaskState:
        """Run `job(progress, cancel)` in a thread; `describe(result)` is the message once it has finished.
        Refused (BusyError) while another job of this task runs."""
        with self._lock:
            if self._state.active:
                raise BusyError(f"{self.what} is already running ({self._state.label}); wait for it or stop it.")
            self._cancel = threading.Event()
            self._state = TaskState("running", label, serial=self._state.serial + 1)
            state, cancel = self._state, self._cancel
        self._thread = threading.Thread(target=self._run, args=(state.serial, job, describe, cancel),
                                        name=f"task-{label}", daemon=True)
        self._thread.start()
        return state

    def stop(self) -> TaskState:
        """Ask the running job to stop (its core removes what it had written); a no-op when none runs."""
        with self._lock:
            if self._state.state == "running":
                self._cancel.set()
                self._state = _replace(self._state, state="stopping", message="Stopping…")
            return self._state

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, serial: int, job: Job, describe: Callable[[Any], str], cancel: threading.Event) -> None:
        def report(progress: Progress) -> None:
            with self._lock:
                if self._state.serial == serial and self._state.active:
                    self._state = _replace(self._state, progress=progress)

        try:
            result = job(report, cancel)
            final = {"state": "finished", "result": result, "message": describe(result)}
        except Cancelled as exc:
            final = {"state": "stopped", "message": str(exc)}
        except WorkbenchError as exc:
            final = {"state": "stopped" if cancel.is_set() else "failed", "message": str(exc)}
        except Exception as exc:  # a bug: the log has the traceback, the page a short line
            log.exception("%s failed", self.what)
            final = {"state": "failed", "message": f"Internal error ({type(exc).__name__}); see the server log."}
        with self._lock:
            if self._state.serial == serial:
                self._state = _replace(self._state, **final)


def _replace(current: TaskState, **changes: Any) -> TaskState:
    return TaskState(**{**current.__dict__, **changes})


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def progress_html(state: TaskState, elem_id: str, *, idle: str = "Nothing has run yet.") -> str:
    """A progress bar with the stage, the share done, the time so far and the ETA, then the task's message.
    The box carries data-state and data-fraction for whoever reads the page."""
    progress = state.progress
    fraction = 1.0 if state.state == "finished" else (progress.fraction if progress is not None else 0.0)
    if state.state == "idle":
        parts = [idle]
    else:
        parts = [f"<b>{html.escape(state.state)}</b>", html.escape(state.label)]
        if progress is not None:
            stage = progress.stage.split(":")[-1]
            detail = f" ({html.escape(progress.detail)})" if progress.detail and progress.detail != "done" else ""
            parts += [f"{html.escape(stage)}{detail}", f"{fraction:.0%}", f"{_duration(progress.elapsed)} so far"]
            if state.active:
                parts.append(f"about {_duration(progress.eta)} left")
    note = f'<div class="task-message">{html.escape(state.message)}</div>' if state.message else ""
    return (f'<div id="{elem_id}" data-state="{state.state}" data-fraction="{fraction:.4f}" '
            f'data-serial="{state.serial}"><progress value="{fraction:.4f}" max="1" style="width:100%"></progress>'
            f'<div>{" · ".join(parts)}</div>{note}</div>')
