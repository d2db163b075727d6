"""The Training tab in a real browser (Debian's Chromium through Playwright) against webui.py: start a short run
on a tiny model, watch the progress bar and the loss plot move, reload the page and find the run again, stop it
(the adapter is saved), and apply the adapter to the loaded model."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from conftest import save_tiny_llama, wait_until
from ui_helpers import Server, Workspace, choose, open_app, set_text, tab

pytestmark = pytest.mark.browser
WAIT_MS = 240_000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_hf: Path, instruction_data: list[dict]) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("training-ui"))
    save_tiny_llama(workspace.models / "tiny", starter_hf, initializer_range=0.4)
    datasets = workspace.root / "training" / "datasets"
    datasets.mkdir(parents=True)
    (datasets / "instructions.json").write_text(json.dumps(instruction_data[:200]))
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    server = Server(workspace, "--lora-dir", str(workspace.root / "loras"), "--training-dir",
                    str(workspace.root / "training"), model="tiny").start()
    yield server
    server.stop()


def open_training(browser: Browser, server: Server) -> Page:
    page, _ = open_app(browser, server.url)
    tab(page, "Training")
    page.wait_for_selector("#training-start")
    return page


def progress(page: Page) -> tuple[str, int, str]:
    box = page.locator("#training-progress-box")
    return (box.get_attribute("data-state") or "none", int(box.get_attribute("data-step") or 0),
            box.inner_text())


def wait_progress(page: Page, condition: str) -> None:
    """Wait until the progress box satisfies a JS condition on (state, step)."""
    page.wait_for_function(
        "() => { const b = document.querySelector('#training-progress-box'); if (!b) return false;"
        " const state = b.dataset.state, step = parseInt(b.dataset.step || '0'); return " + condition + "; }",
        timeout=WAIT_MS)


def test_start_watch_reload_stop_and_apply(browser: Browser, server: Server, workspace: Workspace):
    page = open_training(browser, server)
    assert page.locator("#training-base input").input_value() == "tiny"  # the loaded model is the default base
    assert page.locator("#training-dataset-file input").input_value() == "instructions.json"
    set_text(page, "#training-name", "from-the-browser")
    page.get_by_text("Training", exact=True).last.click()  # unfold the Training options
    set_text(page, "#training-train-max-steps", "400")
    set_text(page, "#training-train-learning-rate", "0.05")
    set_text(page, "#training-train-save-steps", "200")
    page.click("#training-start")
    page.wait_for_function("() => document.querySelector('#training-message').innerText.includes('Started')",
                           timeout=WAIT_MS)

    wait_progress(page, "state === 'running' && step >= 2")
    plot = page.locator("#training-loss-plot")
    first_state, first_step, first_text = progress(page)
    first_plot = plot.screenshot()
    assert re.search(r"ETA \d", first_text) and "tokens/s" in first_text and "loss" in first_text
    wait_progress(page, f"step >= {first_step + 3}")
    _, later_step, _ = progress(page)
    assert later_step > first_step
    wait_until(lambda: plot.screenshot() != first_plot, "new points on the loss curve",  # the plot redraws
               timeout_s=WAIT_MS / 1000)
    assert float(page.locator("#training-progress-box progress").get_attribute("value")) >= later_step

    page.reload()  # the job lives on in its own process; the page finds it again
    page.wait_for_selector("#chat-input textarea", timeout=WAIT_MS)
    tab(page, "Training")
    page.wait_for_function("() => document.querySelector('#training-run input').value === 'from-the-browser'",
                           timeout=WAIT_MS)
    wait_progress(page, f"state === 'running' && step > {later_step}")

    page.click("#training-stop")
    wait_progress(page, "state === 'stopped'")
    _, stopped_at, text = progress(page)
    assert stopped_at < 400 and "Stopped" in text
    lora = workspace.root / "loras" / "from-the-browser"
    assert (lora / "adapter_model.safetensors").is_file()
    saved = json.loads((lora / "training_run.json").read_text())
    assert saved["outcome"] == "stopped" and saved["step"] == stopped_at

    choose(page, "#training-copy-from", "from-the-browser")  # the new LoRA is listed: copy its settings back
    page.get_by_text("Training", exact=True).last.click()  # the reloaded page has the options folded again
    set_text(page, "#training-train-max-steps", "7")
    page.click("#training-copy")
    page.wait_for_function("() => document.querySelector('#training-train-max-steps input').value === '400'"
                           " || document.querySelector('.toast-body') !== null", timeout=WAIT_MS)
    toasts = page.locator(".toast-body")
    assert toasts.count() == 0, toasts.first.inner_text()  # an error shown instead of the copied settings
    assert page.locator("#training-train-max-steps input").input_value() == "400"

    page.click("#training-apply")
    page.wait_for_function("() => document.querySelector('#training-message').innerText.includes('Applied')",
                           timeout=WAIT_MS)
    page.context.close()
