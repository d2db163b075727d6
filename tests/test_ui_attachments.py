"""Attachments in the Chat tab, in a real browser (Chromium) against webui.py running the starter model: a file
attached with the Attach button is listed with its size and tokens, goes with the next message (the status line's
prompt count grows by its tokens), shows on the message as a closed block that opens to its text, is kept
with the chat (another page opening the chat shows it), and a damaged file is refused with the reason."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from attachment_files import make_pdf
from playwright.sync_api import Browser, Page, expect
from ui_helpers import Workspace, chat_event, new_chat, open_app, run_event, set_text

pytestmark = pytest.mark.browser

FACT = "The lighthouse keeper on Varnholm island is called Edda Quist."
QUESTION = "Who keeps the lighthouse?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("webui-attachments"))


def pick(page: Page, path: Path) -> None:
    """Pick `path` in the Attach button's file chooser."""
    with page.expect_file_chooser() as chooser:
        page.click("#chat-attach")
    chooser.value.set_files(str(path))


def attach(page: Page, path: Path) -> str:
    """Attach `path` and wait for the page to read it; the status line."""
    return run_event(page, lambda: pick(page, path), "#chat-status")


def prompt_tokens(status: str) -> int:
    match = re.search(r"Prompt: (\d+) of \d+ tokens", status)
    assert match, status
    return int(match.group(1))


def ask(page: Page, text: str) -> str:
    set_text(page, "#chat-input", text)
    return chat_event(page, lambda: page.click("#chat-send"))


def test_an_attached_file_reaches_the_prompt_and_stays_with_the_chat(browser: Browser, page: Page,
                                                                      workspace: Workspace,
                                                                      tmp_path: Path) -> None:
    new_chat(page)
    bare = prompt_tokens(ask(page, QUESTION))

    new_chat(page)
    notes = tmp_path / "notes.txt"
    notes.write_text(FACT)
    assert "Attached: 1 file(s)" in attach(page, notes)
    listing = page.locator("#chat-attachments")
    expect(listing).to_contain_text(f"notes.txt (Text, {len(FACT)} B · ")
    tokens = int(re.search(r"· (\d+) tokens", listing.inner_text()).group(1))

    status = ask(page, QUESTION)
    assert abs(prompt_tokens(status) - (bare + tokens)) <= 1  # the file's block, counted in the prompt
    expect(listing).to_be_hidden()  # it went with the message
    block = page.locator("#chatbot").get_by_text(f"📎 notes.txt (Text, {len(FACT)} B)")
    expect(block).to_be_visible()
    expect(page.locator("#chatbot").get_by_text(FACT)).to_have_count(0)  # closed until clicked
    block.click()
    expect(page.locator("#chatbot").get_by_text(FACT)).to_be_visible()

    files = sorted((workspace.user_data / "logs" / "chat").glob("*/*.json"), key=lambda p: p.stat().st_mtime)
    saved = json.loads(files[-1].read_text())
    user = next(m for m in saved["messages"] if m["role"] == "user")
    assert user["content"] == QUESTION
    assert user["attachments"] == [{"name": "notes.txt", "kind": "text", "size": len(FACT), "text": FACT}]

    other, _ = open_app(browser, page.url)  # another page opens the latest chat: this one
    try:
        reopened = other.locator("#chatbot").get_by_text(f"📎 notes.txt (Text, {len(FACT)} B)")
        expect(reopened).to_be_visible()
        reopened.click()
        expect(other.locator("#chatbot").get_by_text(FACT)).to_be_visible()
    finally:
        other.context.close()


def test_a_damaged_file_is_refused_with_the_reason(page: Page, tmp_path: Path) -> None:
    broken = tmp_path / "report.pdf"
    broken.write_bytes(make_pdf(["The vault code is 4417."])[:120])
    pick(page, broken)  # the refusal comes as a notice, the status line left as it was
    expect(page.locator(".toast-body").filter(has_text="report.pdf cannot be read")).to_be_visible(timeout=60_000)
    expect(page.locator("#chat-attachments")).to_be_hidden()
