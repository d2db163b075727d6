"""--multi-user without passwords in a real browser: one server; two browser contexts stand for two browsers. Each
browser keeps its own chats, and the operator's controls are neither shown nor answered (no --admin-ui).
--multi-user with --gradio-auth is tested in test_ui_auth.py."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from playwright.sync_api import Browser

from ui_helpers import Server, Workspace, new_chat, open_app, send, tab, wait_ready

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Iterator[Server]:
    workspace = Workspace(tmp_path_factory.mktemp("webui-sessions"))
    (workspace.presets / "Short.yaml").write_text("do_sample: false\nmax_new_tokens: 4\n")
    server = Server(workspace, "--multi-user", "--preset", "Short").start()
    yield server
    server.stop()


def test_multi_user_keeps_two_browsers_chats_apart(browser: Browser, server: Server) -> None:
    first, _ = open_app(browser, server.url)
    second, _ = open_app(browser, server.url)
    new_chat(first)
    send(first, "My secret word is pineapple.")
    new_chat(second)
    send(second, "My secret word is avocado.")
    for page in (first, second):
        page.reload()
        wait_ready(page)
    first_text = first.inner_text("#chatbot") + first.locator("#chat-history-select input").first.input_value()
    second_text = second.inner_text("#chatbot") + second.locator("#chat-history-select input").first.input_value()
    assert "pineapple" in first_text and "avocado" not in first_text
    assert "avocado" in second_text and "pineapple" not in second_text
    # Each browser's past chats list only its own.
    second.locator("#chat-history-select input").first.click()
    options = second.get_by_role("option").all_inner_texts()
    assert options and all("pineapple" not in option for option in options)
    first.context.close()
    second.context.close()


def test_the_operator_controls_are_hidden_and_refused_without_admin_ui(browser: Browser, server: Server) -> None:
    page, _ = open_app(browser, server.url)
    tab(page, "Session")
    assert page.locator("#settings-in-force").is_visible()
    assert not page.locator("#extensions-list").is_visible()
    assert not page.locator("#save-defaults").is_visible()
    page.context.close()
    # Gradio's HTTP API reaches the event without the page: the handler itself refuses.
    with pytest.raises(Exception, match="is for the operator"):
        Client(server.url, verbose=False).predict(["example"], api_name="/apply_extensions")
