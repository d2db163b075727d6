"""Tools in the Chat tab, in a real browser (Debian's Chromium through Playwright) against webui.py on the starter
model: a picked tool is called, the call and its result show as collapsible blocks and the model's answer follows;
reopening the chat restores the pick; a tool that needs approval waits for Approve / Deny and Deny gives the model
a declined result; a tool that raises shows an error block and the turn still ends with an answer. Regenerate runs
the turn's tools again (and asks again), Continue runs the call a reply holds, Impersonate fills the box and runs
nothing; a reply that thinks, then calls, shows its thinking in a collapsed block above the call.

The starter model (135M) does not choose tools by itself, so each test sets Tool use to "required" (the first
step's call is forced by a JSON schema, as a user may do) with one tool picked whose arguments it fills in
reliably (tests/tool_files/chat_demo.py); the model, its output and the tools are real."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, Page, expect
from test_tool_turns import HERMES_CALL, THINK_THEN_CALL
from test_ui_app import use_preset
from ui_helpers import (
    Server,
    Workspace,
    add_dummy,
    chat_event,
    chat_messages,
    event_finished,
    new_chat,
    open_app,
    set_text,
    wait_idle,
    watch_event,
)

from modules.chat.history import HistoryStore
from modules.settings import ChatSettings

pytestmark = pytest.mark.browser

TOOL_FILE = Path(__file__).parent / "tool_files" / "chat_demo.py"
CHARACTER = ChatSettings().character


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-tools"))
    tools = workspace.root / "tools"
    tools.mkdir()
    shutil.copy(TOOL_FILE, tools)
    workspace.settings.write_text(f"tools_dir: {tools}\ntool_max_rounds: 2\n")
    (workspace.presets / "Greedy.yaml").write_text("do_sample: false\nmax_new_tokens: 40\n")
    (workspace.presets / "ThinkThenCall.yaml").write_text(yaml.safe_dump(
        {"do_sample": False, "max_new_tokens": 80, "grammar_string": THINK_THEN_CALL}))
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    server = Server(workspace, "--preset", "Greedy").start()
    yield server
    server.stop()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    page, errors = open_app(browser, server.url)
    new_chat(page)
    yield page
    page.context.close()
    assert not errors.messages


@pytest.fixture
def store(workspace: Workspace) -> HistoryStore:
    return HistoryStore(workspace.user_data / "logs" / "chat")


def open_tools(page: Page) -> None:
    panel = page.locator("#chat-tools-panel")
    if not page.locator("#chat-tools").is_visible():
        panel.get_by_text("Tools", exact=True).first.click()
    expect(page.locator("#chat-tools")).to_be_visible()


def pick_tool(page: Page, label: str, use: str = "Required: its first step calls a tool") -> None:
    """Pick `label` alone in the tools multi-select, with Tool use `use` (its label: "required" by default)."""
    open_tools(page)
    wait_idle(page)
    clear = page.locator("#chat-tools .remove-all")
    if clear.count() and clear.is_visible():
        clear.click()
    page.locator("#chat-tools input").first.click()
    page.get_by_role("option", name=label, exact=True).click()
    page.keyboard.press("Escape")
    expect(page.locator("#chat-tools .token")).to_have_count(1)
    expect(page.locator("#chat-tools .token").first).to_contain_text(label)
    page.locator("#chat-tool-use").get_by_text(use).click()


def block(page: Page, title: str):
    return page.locator("#chatbot .thought-group").filter(has_text=title)


def expand(page: Page, title: str) -> str:
    """Open the collapsible block titled `title` (closed once done) and return its text."""
    group = block(page, title)
    expect(group).to_have_count(1)
    group.locator("[role=button]").first.click()
    return group.inner_text()


def test_a_picked_tool_is_called_and_its_result_shown_then_the_answer(page: Page, store: HistoryStore,
                                                                         browser: Browser, server: Server) -> None:
    pick_tool(page, "multiply")
    set_text(page, "#chat-input", "What is 12 times 7?")
    status = chat_event(page, lambda: page.click("#chat-send"))
    assert "1 tool call" in status and "failed" not in status
    call = block(page, 'multiply({"a": 12, "b": 7})')
    expect(call).to_have_count(1)
    result = block(page, "✅ multiply: result")
    expect(result).to_have_count(1)
    assert "84" not in result.inner_text()  # collapsed: only its title shows
    assert "84" in expand(page, "✅ multiply: result")
    saved = store.load(CHARACTER, store.list_chats(CHARACTER).items[0].id).messages
    assert [m.role for m in saved] == ["user", "assistant", "tool", "assistant"]
    assert saved[1].tool_calls[0]["function"]["name"] == "multiply" and saved[2].content == "84"
    assert saved[3].content and not saved[3].tool_calls  # the answer arrived after the result
    # another page opens this chat (the latest) with its tools picked as they were
    other, _ = open_app(browser, server.url)
    open_tools(other)
    expect(other.locator("#chat-tools .token")).to_have_count(1)
    expect(other.locator("#chat-tools .token").first).to_contain_text("multiply")
    expect(block(other, "✅ multiply: result")).to_have_count(1)
    other.context.close()


def test_a_tool_that_needs_approval_waits_and_deny_tells_the_model(page: Page, store: HistoryStore,
                                                                      workspace: Workspace) -> None:
    pick_tool(page, "clear_notes (asks first)")
    set_text(page, "#chat-input", "Delete all my notes.")
    watch_event(page, lock="#chat-send")
    page.click("#chat-send")
    expect(page.locator("#tool-approve")).to_be_visible()
    expect(page.locator("#tool-approval-question")).to_contain_text("clear_notes")
    expect(page.locator("#tool-deny")).to_be_visible()
    page.click("#tool-deny")
    page.wait_for_function("() => window.__eventStarted && !window.__eventBusy()")
    assert event_finished(page)
    expect(page.locator("#tool-approval")).to_be_hidden()
    assert "declined" in expand(page, "🚫 clear_notes: declined")
    assert not (workspace.root / "tools" / "notes-cleared").exists()
    saved = store.load(CHARACTER, store.list_chats(CHARACTER).items[0].id).messages
    declined = next(m for m in saved if m.role == "tool")
    assert declined.content == "Error: the user declined this call of clear_notes"


def test_a_tool_that_raises_shows_an_error_and_the_turn_ends_with_an_answer(page: Page,
                                                                              store: HistoryStore) -> None:
    pick_tool(page, "read_sensor")
    set_text(page, "#chat-input", "How warm is the greenhouse?")
    status = chat_event(page, lambda: page.click("#chat-send"))
    assert "failed" not in status.replace("(failed)", "")
    assert "the sensor is offline" in expand(page, "⚠️ read_sensor: error (failed)")
    saved = store.load(CHARACTER, store.list_chats(CHARACTER).items[0].id).messages
    assert saved[-1].role == "assistant" and saved[-1].content and not saved[-1].tool_calls


def latest_chat(store: HistoryStore):
    return store.load(CHARACTER, store.list_chats(CHARACTER).items[0].id).messages


def deny_when_asked(page: Page, action) -> None:
    """Do `action()` (Send, Regenerate...), wait for the approval question, press Deny and wait for the turn's end."""
    watch_event(page, lock="#chat-send")
    action()
    expect(page.locator("#tool-approval-question")).to_contain_text("clear_notes")
    page.click("#tool-deny")
    page.wait_for_function("() => window.__eventStarted && !window.__eventBusy()")
    assert event_finished(page)


def test_regenerate_runs_the_tools_again_and_asks_again(page: Page, store: HistoryStore,
                                                         workspace: Workspace) -> None:
    pick_tool(page, "multiply")
    set_text(page, "#chat-input", "What is 12 times 7?")
    chat_event(page, lambda: page.click("#chat-send"))
    first = latest_chat(store)
    status = chat_event(page, lambda: page.click("#chat-regenerate"))
    assert "1 tool call" in status and "failed" not in status
    expect(block(page, 'multiply({"a": 12, "b": 7})')).to_have_count(1)  # the turn replaced, not repeated
    assert "84" in expand(page, "✅ multiply: result")
    again = latest_chat(store)
    assert [m.role for m in again] == ["user", "assistant", "tool", "assistant"]
    assert again[1].tool_calls[0]["id"] != first[1].tool_calls[0]["id"]  # the call was made and run again

    new_chat(page)
    pick_tool(page, "clear_notes (asks first)")
    set_text(page, "#chat-input", "Delete all my notes.")
    deny_when_asked(page, lambda: page.click("#chat-send"))
    deny_when_asked(page, lambda: page.click("#chat-regenerate"))  # asked again, before the call runs again
    expect(block(page, "🚫 clear_notes: declined")).to_have_count(1)
    assert not (workspace.root / "tools" / "notes-cleared").exists()


def test_continue_runs_the_call_a_reply_holds(page: Page, store: HistoryStore) -> None:
    pick_tool(page, "multiply")
    add_dummy(page, "#chat-dummy-message", "What is 12 times 7?")
    add_dummy(page, "#chat-dummy-reply", f"Let me compute it.\n{HERMES_CALL}")
    status = chat_event(page, lambda: page.click("#chat-continue"))
    assert "1 tool call" in status
    assert "Let me compute it." in expand(page, 'multiply({"a": 12, "b": 7})')  # the reply's text, then its call
    assert "84" in expand(page, "✅ multiply: result")
    saved = latest_chat(store)
    assert [m.role for m in saved[:3]] == ["user", "assistant", "tool"] and saved[2].content == "84"
    assert saved[1].content == "Let me compute it." and saved[1].tool_calls


def test_impersonate_fills_the_box_and_runs_no_tool(page: Page, store: HistoryStore, workspace: Workspace) -> None:
    pick_tool(page, "clear_notes (asks first)")
    add_dummy(page, "#chat-dummy-message", "Hello!")
    add_dummy(page, "#chat-dummy-reply", "Hi! How can I help?")
    before = chat_messages(page)
    set_text(page, "#chat-input", "Please")
    chat_event(page, lambda: page.click("#chat-impersonate"))
    box = page.locator("#chat-input textarea").first
    assert box.input_value().startswith("Please") and len(box.input_value()) > len("Please")
    expect(page.locator("#tool-approval")).to_be_hidden()  # nothing asked, nothing run, the chat unchanged
    assert chat_messages(page) == before and [m.content for m in latest_chat(store)] == ["Hello!",
                                                                                        "Hi! How can I help?"]
    assert not (workspace.root / "tools" / "notes-cleared").exists()


#: Records each text of the chat that showed a call's markup (the raw `<tool_call>` or its JSON) while the turn ran.
_WATCH_MARKUP = """() => {
  window.__markupSeen = [];
  new MutationObserver(() => {
    const text = document.querySelector('#chatbot').innerText;
    if (text.includes('tool_call>') || text.includes('"arguments"')) window.__markupSeen.push(text);
  }).observe(document.querySelector('#chatbot'), {childList: true, subtree: true, characterData: true});
}"""


def test_a_reply_that_thinks_then_calls_shows_its_thinking_above_the_call(page: Page, store: HistoryStore) -> None:
    use_preset(page, "ThinkThenCall")  # every reply thinks, then calls multiply: the round limit ends the turn
    pick_tool(page, "multiply", "Auto: the model decides")
    set_text(page, "#chat-input", "What is 12 times 7?")
    page.evaluate(_WATCH_MARKUP)
    status = chat_event(page, lambda: page.click("#chat-send"))
    assert "the limit of 2 rounds" in status
    assert page.evaluate("() => window.__markupSeen") == []  # the calls' markup never showed as text
    thinking = page.locator("#chatbot .thought-group").filter(has_text="Thinking")
    expect(thinking).to_have_count(3)
    expect(page.locator("#chatbot").get_by_text("The user wants", exact=False)).to_have_count(0)  # collapsed
    call = block(page, 'multiply({"a": 12, "b": 7})').first
    assert thinking.first.bounding_box()["y"] < call.bounding_box()["y"]
    assert "<think>" not in page.locator("#chatbot").inner_text()
    thinking.first.get_by_text("Thinking").click()  # unfolds
    expect(page.locator("#chatbot").get_by_text("The user wants", exact=False).first).to_be_visible()
    replies = [m for m in latest_chat(store) if m.role == "assistant"]
    assert len(replies) == 3 and all(m.reasoning_content.startswith("The user wants") and m.tool_calls
                                     for m in replies)
