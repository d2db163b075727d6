"""The Model tab's Quantize / convert and Compare panels in a real browser, on one --multi-user server where alice is
the operator: the starter's Transformers copy becomes a Q8_0 GGUF from the panel while its progress bar moves, and
the new model joins the model list; Stop on a running conversion leaves no file behind; asking again for a file that
exists is refused with a clear message; the GPTQ format makes a GPTQ folder of a tiny model with the settings picked;
a comparison of two GGUFs shows a table with a row per model and numbers in every measurement, saved and listed to
reopen; bob sees neither panel and his calls over HTTP are refused."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FRANCE, save_tiny_llama
from gradio_client import Client
from playwright.sync_api import Browser, Page, expect
from ui_helpers import (EVENT_TIMEOUT_MS, Server, Workspace, choose, dropdown_option, set_text, sign_in, tab,
                        wait_idle)

from modules.starter import STARTER_GGUF, STARTER_HF_DIR

pytestmark = pytest.mark.browser

PASSWORDS = {"alice": "correct horse", "bob": "battery staple"}
Q8 = f"{STARTER_HF_DIR}.Q8_0.gguf"
TINY = "tiny-llama"  # 64- and 128-wide layers: groups of 32 divide them
#: Seconds a conversion or comparison may take on a busy 2-core machine before the test gives up (a hang bound).
JOB_TIMEOUT_MS = 600_000

# Records every state and fraction the progress box shows, as the page redraws it.
_RECORD = """(selector) => {
  window.__seen = [];
  const note = () => { const box = document.querySelector(selector);
    if (box) window.__seen.push([box.dataset.state, parseFloat(box.dataset.fraction)]); };
  new MutationObserver(note).observe(document.body, {attributes: true, childList: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path, starter_hf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-quantize"))
    (workspace.models / STARTER_HF_DIR).symlink_to(starter_hf, target_is_directory=True)
    save_tiny_llama(workspace.models / TINY, starter_hf)
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    passwords = workspace.root / "passwords.txt"
    passwords.write_text("".join(f"{user}:{password}\n" for user, password in PASSWORDS.items()))
    server = Server(workspace, "--multi-user", "--gradio-auth-path", str(passwords), "--admin-users", "alice",
                    "--n-ctx", "1024").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(browser: Browser, server: Server) -> Page:
    page = sign_in(browser, server.url, "alice", PASSWORDS["alice"])
    tab(page, "Model")
    for panel in ("#quantize-panel", "#compare-panel"):
        page.locator(f"{panel} .label-wrap").first.click()
    expect(page.locator("#quantize-start")).to_be_visible()
    return page


def box_state(page: Page, box: str) -> str:
    return page.locator(box).get_attribute("data-state") or ""


def wait_state(page: Page, box: str, *states: str, naming: str = "", timeout: int = JOB_TIMEOUT_MS) -> str:
    """Wait until the box is in one of `states` and its text names `naming` (the job's source): the box still
    shows the previous job's end until the new job's first report."""
    page.wait_for_function(f"([states, naming]) => {{ const b = document.querySelector('{box}');"
                           " return b && states.includes(b.dataset.state) && b.textContent.includes(naming); }",
                           arg=[list(states), naming], timeout=timeout)
    return box_state(page, box)


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def converted(alice: Page, workspace: Workspace) -> dict:
    """Convert the starter's Transformers copy to Q8_0 from the panel; what the page showed on the way."""
    page = alice
    choose(page, "#quantize-source", STARTER_HF_DIR)
    choose(page, "#quantize-type", "Q8_0")
    page.evaluate(_RECORD, "#quantize-progress-box")
    page.click("#quantize-start")
    final = wait_state(page, "#quantize-progress-box", "finished", "failed", "stopped")
    return {"final": final, "seen": page.evaluate("window.__seen"),
            "message": page.inner_text("#quantize-progress-box")}


def test_a_conversion_shows_its_progress_and_the_new_model_joins_the_list(alice: Page, converted: dict,
                                                                           workspace: Workspace) -> None:
    assert converted["final"] == "finished", converted["message"]
    running = [fraction for state, fraction in converted["seen"] if state == "running"]
    assert len({f for f in running if 0 < f < 1}) >= 2, converted["seen"]  # the bar moved while it ran
    assert running == sorted(running)
    assert f"Wrote {Q8}" in converted["message"]
    assert (workspace.models / Q8).stat().st_size > 100 * 2**20
    assert leftovers(workspace.models) == []
    box = alice.locator("#model-select input").first
    box.click()
    expect(dropdown_option(alice, "#model-select", Q8)).to_be_visible()
    alice.keyboard.press("Escape")


def test_an_existing_output_is_refused_with_a_clear_message(alice: Page, converted: dict,
                                                            workspace: Workspace) -> None:
    before = (workspace.models / Q8).stat().st_mtime_ns
    alice.click("#quantize-start")  # the same source and type again, Overwrite unticked
    note = alice.locator("#quantize-message")
    expect(note).to_contain_text(f"Error: {Q8} already exists")
    assert "Traceback" not in note.inner_text()
    assert box_state(alice, "#quantize-progress-box") == "finished"
    assert (workspace.models / Q8).stat().st_mtime_ns == before


def test_stop_ends_a_running_conversion_and_leaves_no_file(alice: Page, converted: dict,
                                                           workspace: Workspace) -> None:
    choose(alice, "#quantize-type", "Q4_0")
    set_text(alice, "#quantize-output", "stopped-early")
    alice.click("#quantize-start")
    alice.wait_for_function("() => { const b = document.querySelector('#quantize-progress-box');"
                            " return b.dataset.state === 'running' && parseFloat(b.dataset.fraction) > 0; }",
                            timeout=EVENT_TIMEOUT_MS)
    alice.click("#quantize-stop")
    assert wait_state(alice, "#quantize-progress-box", "stopped", "finished", "failed") == "stopped"
    assert "cancelled" in alice.inner_text("#quantize-progress-box")
    assert not (workspace.models / "stopped-early.gguf").exists()
    assert leftovers(workspace.models) == []


def test_the_gptq_format_makes_a_gptq_folder_with_the_settings_picked(alice: Page, converted: dict,
                                                                         workspace: Workspace) -> None:
    page = alice
    page.locator("#quantize-format").get_by_text("GPTQ", exact=True).click()
    expect(page.locator("#quantize-bits")).to_be_visible()
    expect(page.locator("#quantize-type")).to_be_hidden()
    expect(page.locator("#quantize-data")).to_contain_text("instruction-data.json")  # data/'s set by default
    choose(page, "#quantize-source", TINY)
    choose(page, "#quantize-group-size", "32")
    page.locator("#quantize-act-order input").check()
    set_text(page, "#quantize-samples", "4")
    set_text(page, "#quantize-seq-len", "64")
    set_text(page, "#quantize-output", "")
    page.click("#quantize-start")
    assert wait_state(page, "#quantize-progress-box", "finished", "failed", "stopped", naming=TINY) == "finished", \
        page.inner_text("#quantize-progress-box")
    folder = f"{TINY}-GPTQ-4bit-g32-act"
    assert f"Wrote {folder}" in page.inner_text("#quantize-progress-box")
    config = json.loads((workspace.models / folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["desc_act"]) == ("gptq", 4, 32, True)
    assert leftovers(workspace.models) == []
    box = page.locator("#model-select input").first
    box.click()
    expect(dropdown_option(page, "#model-select", folder)).to_be_visible()
    page.keyboard.press("Escape")


def test_a_comparison_shows_one_row_per_model_and_is_saved(alice: Page, converted: dict,
                                                           workspace: Workspace) -> None:
    models = [STARTER_GGUF, Q8]
    box = alice.locator("#compare-models input").first
    for name in models:
        box.click()
        dropdown_option(alice, "#compare-models", name).click()
        expect(alice.locator("#compare-models")).to_contain_text(name)
    alice.keyboard.press("Escape")
    set_text(alice, "#compare-max-tokens", "128")
    set_text(alice, "#compare-new-tokens", "8")
    set_text(alice, "#compare-prompts", FRANCE)
    wait_idle(alice)
    alice.click("#compare-start")
    final = wait_state(alice, "#compare-progress-box", "finished", "failed", "stopped")
    assert final == "finished", alice.inner_text("#compare-progress-box")
    rows = alice.locator("#compare-table div[role=row]")  # Gradio's data grid: a row of gridcells per model
    expect(rows).to_have_count(2)
    for number, name in enumerate(models):
        cells = [c.strip() for c in rows.nth(number).locator("[role=gridcell]").all_inner_texts()]
        assert cells[0] == name and cells[1] == "llama.cpp", cells
        assert all(any(ch.isdigit() for ch in cell) for cell in cells[2:8]), cells  # a number in every measurement
        assert cells[8].strip()  # its answer to the prompt
    saved = sorted((workspace.user_data / "comparisons").iterdir())
    assert [p.suffix for p in saved] == [".csv", ".json"]
    expect(alice.locator("#compare-saved input").first).to_have_value(saved[0].stem)
    expect(alice.locator("#compare-chart")).to_be_visible()


def test_bob_sees_neither_panel_and_is_refused_over_http(browser: Browser, server: Server, converted: dict,
                                                         workspace: Workspace) -> None:
    bob = sign_in(browser, server.url, "bob", PASSWORDS["bob"])
    tab(bob, "Model")
    expect(bob.locator("#model-select")).to_be_visible()
    for control in ("#quantize-panel", "#compare-panel", "#quantize-start", "#compare-start"):
        assert not bob.locator(control).is_visible(), control
    client = Client(server.url, auth=("bob", PASSWORDS["bob"]), verbose=False)
    with pytest.raises(Exception, match="is for the operator"):
        client.predict("GGUF", STARTER_HF_DIR, "Q8_0", "bobs", False, "(none)", None, 4, "auto", False, 128, 512,
                       [], None, api_name="/quantize_start")
    with pytest.raises(Exception, match="is for the operator"):
        client.predict([STARTER_GGUF], "the-verdict.txt", 16, 8, "Hi", api_name="/compare_start")
    assert not (workspace.models / "bobs.gguf").exists()
    bob.context.close()
