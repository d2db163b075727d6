"""--multi-user and --gradio-auth in a real browser: one server started with both; two browser contexts stand for
two people."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from ui_helpers import EVENT_TIMEOUT_MS, Server, Workspace, new_chat, send, wait_ready

pytestmark = pytest.mark.browser

USER, PASSWORD = "alice", "correct horse"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Iterator[Server]:
    workspace = Workspace(tmp_path_factory.mktemp("webui-sessions"))
    passwords = workspace.root / "passwords.txt"
    passwords.write_text(f"# people allowed in\n{USER}:{PASSWORD}\n")
    (workspace.presets / "Short.yaml").write_text("do_sample: false\nmax_new_tokens: 4\n")
    server = Server(workspace, "--multi-user", "--gradio-auth-path", str(passwords), "--preset", "Short").start()
    yield server
    server.stop()


def log_in(browser: Browser, url: str, user: str, password: str) -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(EVENT_TIMEOUT_MS)
    page = context.new_page()
    page.goto(url)
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    return page


def test_a_wrong_password_is_refused(browser: Browser, server: Server) -> None:
    page = log_in(browser, server.url, USER, "wrong password")
    page.get_by_text("Incorrect Credentials", exact=False).wait_for()
    assert page.locator("#chat-input").count() == 0
    assert page.context.request.get(server.url + "config").status in (401, 403)
    page.context.close()


def test_the_right_password_opens_the_app(browser: Browser, server: Server) -> None:
    page = log_in(browser, server.url, USER, PASSWORD)
    wait_ready(page)
    assert page.get_by_role("tab", name="Chat", exact=True).is_visible()
    page.context.close()


def test_multi_user_keeps_two_browsers_chats_apart(browser: Browser, server: Server) -> None:
    first = log_in(browser, server.url, USER, PASSWORD)
    wait_ready(first)
    second = log_in(browser, server.url, USER, PASSWORD)
    wait_ready(second)
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
