"""Two pages on one chat, in a real browser (Debian's Chromium through Playwright) against webui.py without
--multi-user, where every page opens the most recent chat: what both pages send is kept, and a change that cannot
be merged is refused in the page with a way to reload, losing neither page's text."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from modules.chat.history import ChatHistory, HistoryStore
from modules.settings import ChatSettings
from ui_helpers import Server, Workspace, chat_event, chat_messages, open_app, run_event, send, wait_ready

pytestmark = pytest.mark.browser

CHARACTER = ChatSettings().character
CHANGED = "This chat changed in another page: reload it."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("webui-shared-chat"))
    (workspace.presets / "Short.yaml").write_text("do_sample: false\nmax_new_tokens: 4\n")
    return workspace


@pytest.fixture(scope="module")
def server(workspace: Workspace) -> Iterator[Server]:
    server = Server(workspace, "--preset", "Short").start()
    yield server
    server.stop()


@pytest.fixture
def store(workspace: Workspace) -> HistoryStore:
    return HistoryStore(workspace.user_data / "logs" / "chat")


@pytest.fixture
def two_pages(browser: Browser, server: Server) -> Iterator[tuple[Page, Page]]:
    """Two pages opened after the test wrote its chat, so both open that chat (the most recent one)."""
    pages = [open_app(browser, server.url)[0] for _ in range(2)]
    yield pages[0], pages[1]
    for page in pages:
        page.context.close()


@pytest.fixture
def shared(store: HistoryStore) -> ChatHistory:
    return store.new(CHARACTER, [{"role": "user", "content": "Where are we headed?"},
                                 {"role": "assistant", "content": "Ceres."},
                                 {"role": "user", "content": "How long will it take?"},
                                 {"role": "assistant", "content": "Three weeks."}])


def users(messages: list[tuple[str, str]]) -> list[str]:
    return [text for role, text in messages if role == "user"]


def saved_users(store: HistoryStore, chat: ChatHistory) -> list[str]:
    return [m.content for m in store.load(CHARACTER, chat.id).messages if m.role == "user"]


def test_two_pages_each_send_a_message_and_both_are_kept(store: HistoryStore, shared: ChatHistory,
                                                         two_pages: tuple[Page, Page]) -> None:
    first, second = two_pages
    assert chat_messages(first) == chat_messages(second) == [(m.role, m.content) for m in shared.messages]
    send(first, "Sent from the first page")
    send(second, "Sent from the second page")
    expected = ["Where are we headed?", "How long will it take?", "Sent from the first page",
                "Sent from the second page"]
    saved = store.load(CHARACTER, shared.id)
    assert [m.content for m in saved.messages if m.role == "user"] == expected
    assert [m.role for m in saved.messages] == ["user", "assistant"] * 4  # each page's reply kept too
    assert users(chat_messages(second)) == expected  # the second page shows the first page's turn at once
    for page in (first, second):
        page.reload()
        wait_ready(page)
        assert chat_messages(page) == [(m.role, m.content.strip()) for m in saved.messages]


def test_a_message_refused_after_another_page_removed_one_stays_in_the_box_until_reload(
        store: HistoryStore, shared: ChatHistory, two_pages: tuple[Page, Page]) -> None:
    first, second = two_pages
    run_event(first, lambda: first.click("#chat-remove-last"), "#chatbot")
    assert saved_users(store, shared) == ["Where are we headed?"]
    status = send(second, "Are we there yet?")
    assert CHANGED in status and second.locator("#chat-reload").is_visible()
    assert second.locator(".toast-body").filter(has_text=CHANGED).count()
    assert second.locator("#chat-input textarea").input_value() == "Are we there yet?"
    assert saved_users(store, shared) == ["Where are we headed?"]  # the first page's removal stands
    assert "Traceback" not in second.content()
    run_event(second, lambda: second.click("#chat-reload"), "#chat-status")
    assert chat_messages(second) == [("user", "Where are we headed?"), ("assistant", "Ceres.")]
    assert not second.locator("#chat-reload").is_visible()
    chat_event(second, lambda: second.click("#chat-send"))  # the text waited in the box
    assert saved_users(store, shared) == ["Where are we headed?", "Are we there yet?"]


def test_a_reply_refused_after_another_page_removed_one_is_kept_as_a_new_chat(
        store: HistoryStore, shared: ChatHistory, two_pages: tuple[Page, Page]) -> None:
    first, second = two_pages
    run_event(first, lambda: first.click("#chat-remove-last"), "#chatbot")
    status = chat_event(second, lambda: second.click("#chat-regenerate"))
    assert CHANGED in status and "(kept copy)" in status, status
    kept = [s for s in store.list_chats(CHARACTER).items if s.title.endswith("(kept copy)")]
    assert len(kept) == 1
    copy = store.load(CHARACTER, kept[0].id)
    assert [m.content for m in copy.messages[:3]] == [m.content for m in shared.messages[:3]]
    assert len(copy.messages[3].swipes) == 2 and copy.messages[3].swipes[0] == "Three weeks."
    assert saved_users(store, shared) == ["Where are we headed?"]
    second.locator("#chat-history-select input").first.click()
    assert any(o.startswith(kept[0].title) for o in second.get_by_role("option").all_inner_texts())
    second.keyboard.press("Escape")
    run_event(second, lambda: second.click("#chat-reload"), "#chat-status")
    assert chat_messages(second) == [("user", "Where are we headed?"), ("assistant", "Ceres.")]
