"""The Model tab panels' background runner (modules.ui.background_task): one job of a kind at a time, progress
reported as the job gives it, Stop reaching the job through its cancel Event, a core error shown as its message
and a bug as a short line (never a traceback). The browser side runs in test_ui_quantize.py."""
from __future__ import annotations

import threading

import pytest

from modules.errors import BusyError, Cancelled, ConfigError
from modules.quantize.job import Tracker
from modules.ui.background_task import BackgroundTask, progress_html


def test_a_job_reports_progress_and_its_result_and_a_second_start_waits_for_it() -> None:
    task = BackgroundTask("A conversion")
    halfway, go_on = threading.Event(), threading.Event()

    def job(report, cancel):
        tracker = Tracker({"convert": 1.0, "quantize": 1.0}, report, cancel)
        tracker.update("convert", 1.0)
        halfway.set()
        go_on.wait(30)
        tracker.update("quantize", 1.0)
        return "model.Q8_0.gguf"

    started = task.start("a → b", job, lambda result: f"Wrote {result}.")
    assert started.state == "running" and started.serial == 1
    assert halfway.wait(30)
    assert task.state().progress.fraction == 0.5
    with pytest.raises(BusyError, match="already running"):
        task.start("again", job, str)
    box = progress_html(task.state(), "box")
    assert 'data-state="running"' in box and "50%" in box and "left" in box
    go_on.set()
    task.join(30)
    state = task.state()
    assert (state.state, state.result, state.message) == ("finished", "model.Q8_0.gguf", "Wrote model.Q8_0.gguf.")
    assert task.start("next", lambda report, cancel: 1, str).serial == 2  # free again once done


def test_stop_sets_the_jobs_cancel_event() -> None:
    task = BackgroundTask("A comparison")
    running = threading.Event()

    def job(report, cancel):
        running.set()
        if cancel.wait(30):
            raise Cancelled("The job was cancelled; nothing was kept.")

    task.start("x", job, str)
    assert running.wait(30)
    assert task.stop().state == "stopping"
    task.join(30)
    assert (task.state().state, task.state().message) == ("stopped", "The job was cancelled; nothing was kept.")


def test_errors_are_messages_and_bugs_are_a_short_line() -> None:
    task = BackgroundTask("A conversion")

    def refused(report, cancel):
        raise ConfigError("Unknown GGUF type 'Q9'.")

    task.start("x", refused, str)
    task.join(30)
    assert (task.state().state, task.state().message) == ("failed", "Unknown GGUF type 'Q9'.")

    def bug(report, cancel):
        raise KeyError("oops")

    task.start("y", bug, str)
    task.join(30)
    assert task.state().state == "failed"
    assert task.state().message == "Internal error (KeyError); see the server log."
    assert "Traceback" not in progress_html(task.state(), "box")
