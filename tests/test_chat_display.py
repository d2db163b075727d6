"""The open chat as the Chatbot shows it (Gradio-free): a reply's thinking is a block of its own above its answer,
and each entry maps back to the stored message (and part) it shows; alternatives keep their own thinking; a chat
is cut after a message to regenerate from there; an old chat file (no per-alternative thinking) still loads."""
from __future__ import annotations

from pathlib import Path

from modules.chat.history import ChatHistory, ChatMessage, HistoryStore
from modules.ui.chat_display import (THINKING_KEY, THINKING_TITLE, EntryOwner, chatbot_messages, entry_owners,
                                     owner_of, swipe_position, swipe_target)


def chat() -> ChatHistory:
    return ChatHistory(id="c", character="Assistant", messages=[
        ChatMessage(role="user", content="2+2?"),
        ChatMessage(role="assistant", content="4.", reasoning_content="Two and two make four."),
        ChatMessage(role="user", content="And 3+3?"),
        ChatMessage(role="assistant", content="6.")])


def test_thinking_shows_as_a_closed_block_above_the_answer() -> None:
    shown = chatbot_messages(chat().messages)
    assert [entry["content"] for entry in shown] == ["2+2?", "Two and two make four.", "4.", "And 3+3?", "6."]
    assert shown[1]["metadata"] == {"title": THINKING_TITLE, "status": "done"}
    assert "metadata" not in shown[2]
    assert entry_owners(chat().messages) == [EntryOwner(0, "content"), EntryOwner(1, "reasoning"),
                                             EntryOwner(1, "content"), EntryOwner(2, "content"),
                                             EntryOwner(3, "content")]
    assert owner_of(chat().messages, 3) == EntryOwner(2, "content")
    assert owner_of(chat().messages, 5) is None


def test_while_the_model_thinks_the_block_is_open_and_no_answer_shows_yet() -> None:
    writing = ChatMessage.model_construct(**{**dict(ChatMessage(role="assistant", content="")),
                                             "reasoning_content": "Hmm", "metadata": {THINKING_KEY: "pending"}})
    assert chatbot_messages([writing]) == [{"role": "assistant", "content": "Hmm",
                                            "metadata": {"title": THINKING_TITLE, "status": "pending"}}]


def test_each_alternative_keeps_its_own_thinking() -> None:
    history = chat()
    history.add_swipe(1, "Four.", "Counting: 1, 2, 3, 4.")
    history.add_swipe(1, "4")
    message = history.messages[1]
    assert message.swipe_reasoning == ["Two and two make four.", "Counting: 1, 2, 3, 4.", None]
    assert swipe_position(message) == (3, 3)
    history.select_swipe(1, 1)
    assert (history.messages[1].content, history.messages[1].reasoning_content) == ("Four.",
                                                                                    "Counting: 1, 2, 3, 4.")
    history.edit_reasoning(1, "Edited.")
    history.select_swipe(1, 0)
    history.select_swipe(1, 1)
    assert history.messages[1].reasoning_content == "Edited."


def test_the_browsed_reply_is_the_selected_one_or_the_last() -> None:
    messages = chat().messages
    assert swipe_target(messages, None) == 3
    assert swipe_target(messages, 1) == 1
    assert swipe_target(messages, 2) == 3  # a user message has no alternatives
    assert swipe_target(messages[:1], None) is None


def test_regenerating_from_a_message_drops_the_ones_after_it() -> None:
    history = chat()
    assert history.truncate_after(0) == 3
    assert [m.content for m in history.messages] == ["2+2?"]


def test_a_chat_saved_before_thinking_was_kept_per_alternative_loads(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    folder = tmp_path / "Assistant"
    folder.mkdir()
    (folder / "old.json").write_text(
        '{"version": 1, "id": "old", "character": "Assistant", "messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "B", "swipes": ["A", "B"], "swipe_index": 1}]}')
    history = store.load("Assistant", "old")
    history.add_swipe(1, "C", "thought about C")
    assert history.messages[1].swipe_reasoning == [None, None, "thought about C"]
    saved = store.save(history)
    assert store.load("Assistant", "old").messages[1] == saved.messages[1]
