"""The Chat tab's messages in a real browser (Chromium) against webui.py running the starter model: a reply that
thinks shows its thinking as a collapsed block above its answer; a message in the middle is edited and the chat
regenerated from it; a reply's alternatives are browsed with ‹ n/m › and the one shown is the one saved; LaTeX in a
reply is rendered by KaTeX.

The starter model does not think: a preset whose grammar makes it write a <think> block, then an answer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Page, expect

from conftest import FRANCE
from test_chat_reasoning import THINK_GRAMMAR
from test_ui_app import use_preset
from ui_helpers import (Workspace, add_dummy, answered, chat_event, chat_messages, new_chat, run_event,
                        send, wait_ready)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-messages"))
    (workspace.presets / "Thinks.yaml").write_text(yaml.safe_dump(
        {"do_sample": False, "max_new_tokens": 80, "grammar_string": THINK_GRAMMAR}))
    return workspace


def saved_chat(workspace: Workspace, page: Page) -> dict:
    """The open chat's file, as the server wrote it."""
    chat_id = page.locator("#chat-history-select input").first.input_value()
    files = sorted((workspace.user_data / "logs" / "chat").glob("*/*.json"), key=lambda p: p.stat().st_mtime)
    chats = [json.loads(p.read_text()) for p in files]
    named = [c for c in chats if c["id"] in chat_id or (c.get("name") and chat_id.startswith(c["name"]))]
    return (named or chats)[-1]


def test_a_reply_that_thinks_shows_its_thinking_collapsed_above_the_answer(page: Page,
                                                                          workspace: Workspace) -> None:
    use_preset(page, "Thinks")
    new_chat(page)
    send(page, "What is the capital of France?")
    block = page.locator("#chatbot .thought-group")
    expect(block).to_have_count(1)
    expect(block).to_contain_text("Thinking")
    thinking = page.locator("#chatbot").get_by_text("The user asks about", exact=False)
    expect(thinking).to_have_count(0)  # collapsed once the answer came
    answer = page.locator("#chatbot").get_by_text("The capital of France is", exact=False)
    expect(answer).to_be_visible()
    assert block.bounding_box()["y"] < answer.bounding_box()["y"]
    assert "<think>" not in page.locator("#chatbot").inner_text()
    block.get_by_text("Thinking").click()  # unfolds
    expect(page.locator("#chatbot").get_by_text("The user asks about", exact=False)).to_be_visible()
    reply = saved_chat(workspace, page)["messages"][-1]
    assert reply["reasoning_content"].startswith("The user asks about") and "think>" not in reply["content"]
    assert reply["content"].startswith("The capital of France is")


def edit_message(page: Page, index: int, text: str) -> None:
    """Edit the chat's message `index` with the Chatbot's pencil (one under each message) and submit it."""
    page.locator("#chatbot .message-row").nth(index).hover()
    page.locator("#chatbot").get_by_role("button", name="Edit", exact=True).nth(index).click()
    box = page.locator("#chatbot textarea.edit-textarea").first
    box.fill(text)
    run_event(page, lambda: page.locator("#chatbot").get_by_role("button", name="Submit").click(), "#chatbot")


def test_editing_a_middle_message_and_regenerating_from_it(page: Page, workspace: Workspace) -> None:
    use_preset(page, "Deterministic", max_new_tokens="40")
    new_chat(page)
    for button, text in (("#chat-dummy-message", "What is the capital of Italy?"), ("#chat-dummy-reply", "Rome."),
                         ("#chat-dummy-message", "And of Spain?"), ("#chat-dummy-reply", "Madrid.")):
        add_dummy(page, button, text)
    edit_message(page, 1, "Rome, on the Tiber.")  # a reply, edited in place: nothing else changes
    edit_message(page, 0, FRANCE)
    assert chat_messages(page) == [("user", FRANCE), ("assistant", "Rome, on the Tiber."),
                                   ("user", "And of Spain?"), ("assistant", "Madrid.")]
    assert [m["content"] for m in saved_chat(workspace, page)["messages"]] == [
        FRANCE, "Rome, on the Tiber.", "And of Spain?", "Madrid."]
    answered(page, lambda: page.locator("#chatbot .message-row").first.click())  # pick the edited message
    answered(page, lambda: page.click("#chat-regenerate-here"))
    expect(page.locator("#chat-regenerate-here-question")).to_contain_text("drops the 3 messages after it")
    page.click("#chat-regenerate-here-no")  # cancelled: nothing changes
    expect(page.locator("#chat-regenerate-here-question")).to_be_hidden()
    assert len(chat_messages(page)) == 4
    answered(page, lambda: page.click("#chat-regenerate-here"))
    chat_event(page, lambda: page.click("#chat-regenerate-here-yes"))
    messages = chat_messages(page)
    assert [role for role, _ in messages] == ["user", "assistant"]
    assert messages[0][1] == FRANCE
    assert "Paris" in messages[1][1]
    saved = saved_chat(workspace, page)["messages"]
    assert [m["content"] for m in saved] == [FRANCE, messages[1][1]]


def test_browsing_a_replys_alternatives(page: Page, workspace: Workspace) -> None:
    use_preset(page, "Deterministic", max_new_tokens="16")
    new_chat(page)
    add_dummy(page, "#chat-dummy-message", "What is the capital of France?")
    add_dummy(page, "#chat-dummy-reply", "I would rather not say.")
    expect(page.locator("#chat-swipe-position")).to_be_hidden()  # one alternative: nothing to browse
    chat_event(page, lambda: page.click("#chat-regenerate"))
    regenerated = chat_messages(page)[-1][1]
    assert regenerated != "I would rather not say."
    position = page.locator("#chat-swipe-position")
    expect(position).to_have_text("Reply 2/2")
    expect(page.locator("#chat-swipe-next")).to_be_disabled()
    run_event(page, lambda: page.click("#chat-swipe-previous"), "#chatbot")
    expect(position).to_have_text("Reply 1/2")
    assert chat_messages(page)[-1] == ("assistant", "I would rather not say.")
    saved = saved_chat(workspace, page)["messages"][-1]
    assert (saved["content"], saved["swipe_index"]) == ("I would rather not say.", 0)  # the one shown is saved
    page.reload()
    wait_ready(page)
    open_again = page.locator("#chatbot .message-row").last
    expect(open_again).to_contain_text("I would rather not say.")
    expect(page.locator("#chat-swipe-position")).to_have_text("Reply 1/2")
    run_event(page, lambda: page.click("#chat-swipe-next"), "#chatbot")
    assert chat_messages(page)[-1] == ("assistant", regenerated)


def test_latex_in_a_reply_is_rendered(page: Page) -> None:
    new_chat(page)
    add_dummy(page, "#chat-dummy-message", "Show me some maths.")
    add_dummy(page, "#chat-dummy-reply", "Euler: $e^{i\\pi} + 1 = 0$, a square \\(a^2\\), and\n\n"
                                         "$$\\int_0^1 x\\,dx = \\frac{1}{2}$$\n\nand \\[\\sqrt{2}\\]")
    chatbot = page.locator("#chatbot")
    expect(chatbot.locator(".katex").first).to_be_visible()
    assert chatbot.locator(".katex").count() >= 4
    assert chatbot.locator(".katex-display").count() >= 2  # $$...$$ and \[...\] on lines of their own
    assert "$$" not in chatbot.inner_text()
