"""The Model tab with several resident models and per-model settings, in a real browser: "Save settings for this
model" writes user_data/models.yaml and a reloaded page shows what it saved, and two resident models (two names of
the starter GGUF, --max-models 2) are listed with their slots and Unload buttons, which unload them. With
--multi-user both are the operator's: another user sees the list, not the buttons, and is refused over HTTP.

One server for the module (--multi-user, alice an admin, bob not), on throwaway folders."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from gradio_client import Client
from playwright.sync_api import Browser, Locator, Page, expect

from test_ui_auth import PASSWORDS, SignedIn
from ui_helpers import (STARTER, PageErrors, Server, Workspace, choose, run_event, screenshot, set_text, tab,
                        wait_ready)

pytestmark = pytest.mark.browser

SECOND = "Second-Name.gguf"  # the starter GGUF again, under another name
COMMENT = "# models of this machine\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-models"))
    (workspace.models / SECOND).symlink_to(starter_gguf)
    (workspace.user_data / "models.yaml").write_text(COMMENT + "'*.gguf':\n  n_ctx: 2048  # every GGUF\n")
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    passwords = workspace.root / "passwords.txt"
    passwords.write_text("".join(f"{user}:{password}\n" for user, password in PASSWORDS.items()))
    server = Server(workspace, "--max-models", "2", "--multi-user", "--gradio-auth-path", str(passwords),
                    "--admin-users", "alice").start()
    yield server
    server.stop()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A page of alice's (the operator)."""
    alice = SignedIn(browser, server.url, "alice")
    yield alice.page
    alice.close()


def option_box(page: Page, name: str) -> Locator:
    return page.locator(f"#opt-llamacpp-{name.replace('_', '-')} input").first


def resident_row(page: Page, name: str) -> Locator:
    return page.locator(".resident-row").filter(has_text=name)


def test_save_settings_writes_models_yaml_and_a_reloaded_page_shows_them(page: Page, workspace: Workspace,
                                                                       browser: Browser, server: Server) -> None:
    tab(page, "Model")
    expect(page.locator("#model-select input")).to_have_value(STARTER)
    expect(option_box(page, "n_ctx")).to_have_value("2048")  # from the glob
    set_text(page, "#opt-llamacpp-n-ctx", "1536")
    choose(page, "#model-preset", "Creative")
    choose(page, "#model-template", "Alpaca")
    set_text(page, "#model-aliases", "smol, tiny")
    note = run_event(page, lambda: page.click("#model-save-settings"), "#model-settings-note")
    assert "Saved the settings of" in note and STARTER in note, note

    text = (workspace.user_data / "models.yaml").read_text()
    assert text.startswith(COMMENT + "'*.gguf':\n  n_ctx: 2048  # every GGUF\n")  # kept as written
    assert yaml.safe_load(text)[STARTER] == {"loader": "llama.cpp", "n_ctx": 1536, "preset": "Creative",
                                             "template": "Alpaca", "aliases": ["smol", "tiny"]}

    reloaded = SignedIn(browser, server.url, "alice", ready=False)
    fresh, errors = reloaded.page, PageErrors(reloaded.page)
    try:
        wait_ready(fresh)
        tab(fresh, "Model")
        expect(fresh.locator("#model-select input")).to_have_value(STARTER)
        expect(option_box(fresh, "n_ctx")).to_have_value("1536")
        expect(fresh.locator("#model-preset input")).to_have_value("Creative")
        expect(fresh.locator("#model-template input")).to_have_value("Alpaca")
        expect(fresh.locator("#model-aliases textarea, #model-aliases input").first).to_have_value("smol, tiny")
        # another model shows its own settings: the glob's context, no preset
        run_event(fresh, lambda: choose(fresh, "#model-select", SECOND), "#model-settings-note")
        expect(option_box(fresh, "n_ctx")).to_have_value("2048")
        expect(fresh.locator("#model-preset input")).to_have_value("(the settings' preset)")
        # the resident model's preset and template from the file are the tabs' defaults
        tab(fresh, "Parameters")
        expect(fresh.locator("#preset-select input")).to_have_value("Creative")
        expect(fresh.locator("#chat-instruction-template input")).to_have_value("Alpaca")
        assert not errors.messages
    finally:
        reloaded.close()


def test_two_resident_models_are_listed_with_unload_buttons(page: Page, browser: Browser, server: Server) -> None:
    tab(page, "Model")
    first, second = resident_row(page, STARTER), resident_row(page, SECOND)
    expect(first).to_contain_text("(default)")
    expect(second).to_have_count(0)

    bob = SignedIn(browser, server.url, "bob")  # no operator: sees what is resident, not the buttons
    tab(bob.page, "Model")
    expect(resident_row(bob.page, STARTER)).to_contain_text("(default)")
    assert not bob.page.locator("#model-save-settings").is_visible()

    other = SignedIn(browser, server.url, "alice")  # another page of alice's loads a second model
    try:
        tab(other.page, "Model")
        run_event(other.page, lambda: choose(other.page, "#model-select", SECOND), "#model-settings-note")
        status = run_event(other.page, lambda: other.page.click("#model-load"), "#model-status")
        assert f"Loaded {SECOND}" in status, status
    finally:
        other.close()

    # these pages had no model event: an open Model tab refreshes the list by itself
    expect(second).to_contain_text("(default)")
    expect(page.locator("#model-info")).to_contain_text(SECOND)
    expect(resident_row(bob.page, SECOND)).to_contain_text("(default)")
    assert bob.page.locator(".resident-unload").count() == 0
    for row in (first, second):
        expect(row).to_contain_text("llama.cpp")
        expect(row).to_contain_text("slots 0 of")
        expect(row).to_contain_text("0 waiting")
        expect(row).to_contain_text("MiB")
        expect(row.get_by_role("button", name="Unload")).to_be_visible()
    expect(page.locator("#residents-help")).to_contain_text("--parallel")
    screenshot(page, "model-residents")

    second.get_by_role("button", name="Unload").click()
    expect(second).to_have_count(0)
    expect(first).to_contain_text("(default)")  # the other one answers the tabs now
    expect(page.locator("#model-info")).to_contain_text(STARTER)
    expect(resident_row(bob.page, SECOND)).to_have_count(0)
    bob.close()


def test_saving_model_settings_is_refused_to_another_user(server: Server, workspace: Workspace) -> None:
    before = (workspace.user_data / "models.yaml").read_text()
    as_bob = Client(server.url, auth=("bob", PASSWORDS["bob"]), verbose=False)
    with pytest.raises(Exception, match="is for the operator"):
        as_bob.predict(api_name="/save_model_settings")
    assert (workspace.user_data / "models.yaml").read_text() == before
