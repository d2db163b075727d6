"""Chat histories on disk: round trips with swipes, newest-first listing, rename, branch, export/import, damaged
files kept aside, atomic writes that survive a crash, and names that never leave the root."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modules.chat.history import ChatHistory, HistoryStore
from modules.errors import ConfigError, PathError

MESSAGES = [{"role": "assistant", "content": "Welcome aboard."},
            {"role": "user", "content": "Where   are we\nheaded?"},
            {"role": "assistant", "content": "Ceres."}]


@pytest.fixture
def store(tmp_path: Path) -> HistoryStore:
    return HistoryStore(tmp_path / "logs" / "chat")


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_with_swipes(store: HistoryStore) -> None:
    chat = store.new("Captain Mira", MESSAGES, mode="chat")
    assert store.path("Captain Mira", chat.id).resolve() == (store.root / "Captain Mira" / f"{chat.id}.json").resolve()
    chat.add_swipe(2, "Mars.")
    chat.add_swipe(2, "Titan.")
    chat.select_swipe(2, 1)
    store.save(chat)
    loaded = store.load("Captain Mira", chat.id)
    assert loaded.messages[2].content == "Mars." and loaded.messages[2].swipes == ["Ceres.", "Mars.", "Titan."]
    assert loaded.prompt_messages() == [*MESSAGES[:2], {"role": "assistant", "content": "Mars."}]
    assert loaded.mode == "chat" and loaded.updated >= loaded.created
    loaded.edit_message(2, "Mars, via Phobos.")
    assert store.load("Captain Mira", store.save(loaded).id).messages[2].swipes[1] == "Mars, via Phobos."
    with pytest.raises(ConfigError, match="not an assistant message"):
        loaded.add_swipe(1, "x")
    with pytest.raises(ConfigError, match="no number 7"):
        loaded.select_swipe(2, 7)


def test_listing_is_newest_first_with_titles(store: HistoryStore) -> None:
    first = store.new("AI", MESSAGES)
    second = store.new("AI", [{"role": "user", "content": "Second chat"}])
    empty = store.new("AI")
    assert [s.id for s in store.list_chats("AI").items] == [empty.id, second.id, first.id]
    store.rename("AI", first.id, "  Trip   planning ")
    listing = store.list_chats("AI")
    assert [s.id for s in listing.items] == [first.id, empty.id, second.id]  # renaming touched it
    by_id = {s.id: s for s in listing.items}
    assert by_id[first.id].title == "Trip planning" and by_id[first.id].preview == "Where are we headed?"
    assert by_id[empty.id].title == "New chat" and by_id[first.id].message_count == 3
    assert listing.warnings == [] and store.characters() == ["AI"]
    assert store.list_chats("Nobody").items == []


def test_branch_copies_up_to_message_n(store: HistoryStore) -> None:
    chat = store.new("AI", MESSAGES)
    branch = store.branch("AI", chat.id, 1)
    assert branch.id != chat.id and branch.name.endswith("(branch)")
    assert store.load("AI", branch.id).prompt_messages() == MESSAGES[:2]
    assert len(store.load("AI", chat.id).messages) == 3
    with pytest.raises(ConfigError, match="Cannot branch at message 3"):
        store.branch("AI", chat.id, 3)


def test_export_import_round_trip(store: HistoryStore) -> None:
    chat = store.new("AI", MESSAGES, name="Original")
    exported = store.export("AI", chat.id)
    copy = store.import_history("Other", exported)
    assert copy.id != chat.id and copy.character == "Other"
    assert (copy.name, copy.prompt_messages()) == ("Original", MESSAGES)
    assert store.import_history("AI", json.dumps(MESSAGES).encode()).prompt_messages() == MESSAGES
    tgw = {"internal": [["<|BEGIN-VISIBLE-CHAT|>", "Welcome aboard."], ["Hi", "Hello!"]], "visible": []}
    assert store.import_history("AI", json.dumps(tgw).encode()).prompt_messages() == [
        {"role": "assistant", "content": "Welcome aboard."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not JSON"),
    (b'"a string"', "JSON object or a list"),
    (json.dumps([{"role": "narrator", "content": "x"}]).encode(), r"messages\.0\.role"),
    (json.dumps({"messages": [{"role": "user", "content": "x", "swipes": ["a"]}]}).encode(), "only assistant"),
    (json.dumps({"messages": [], "colour": "red"}).encode(), "colour"),
    (json.dumps({"internal": [["only one"]]}).encode(), "Row 0"),
])
def test_import_is_validated(store: HistoryStore, data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        store.import_history("AI", data)
    assert store.list_chats("AI").items == []


@pytest.mark.parametrize("damage", ["{truncated", json.dumps({"version": 1, "id": "x", "character": "AI",
                                                             "messages": [{"role": "user"}]})])
def test_damaged_file_is_moved_aside_and_reported(store: HistoryStore, damage: str) -> None:
    good = store.new("AI", MESSAGES)
    bad = store.new("AI", MESSAGES)
    bad_path = store.path("AI", bad.id)
    bad_path.write_text(damage)
    listing = store.list_chats("AI")
    assert [s.id for s in listing.items] == [good.id]
    assert len(listing.warnings) == 1 and bad.id in listing.warnings[0] and "moved aside" in listing.warnings[0]
    aside = [p for p in bad_path.parent.iterdir() if p.name.startswith(f"{bad.id}.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == damage  # kept, byte for byte
    assert not bad_path.exists()
    # Loading a damaged file directly reports it too, and never overwrites it.
    store.path("AI", good.id).write_text("[]")
    with pytest.raises(ConfigError, match="damaged"):
        store.load("AI", good.id)
    assert any(p.read_text() == "[]" for p in bad_path.parent.glob(f"{good.id}.json.corrupt-*"))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_crash_during_save_keeps_the_old_file(store: HistoryStore, monkeypatch: pytest.MonkeyPatch,
                                              failing: str) -> None:
    chat = store.new("AI", MESSAGES)
    path = store.path("AI", chat.id)
    before = path.read_bytes()
    chat.messages.append(chat.messages[0].model_copy(update={"content": "Never saved."}))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(chat)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert files(path.parent) == [path.name]  # no half-written temporary file left behind
    assert len(store.load("AI", chat.id).messages) == 3


def test_invalid_history_is_not_saved(store: HistoryStore) -> None:
    chat = store.new("AI", MESSAGES)
    chat.messages[2].swipes.append("orphan")  # a list edit that skips validation
    with pytest.raises(ConfigError, match="not saved"):
        store.save(chat)
    assert store.load("AI", chat.id).messages[2].swipes == []


def test_missing_chats(store: HistoryStore) -> None:
    with pytest.raises(ConfigError, match="No chat"):
        store.load("AI", "20200101-000000-abcdef")
    chat = store.new("AI", MESSAGES)
    store.delete("AI", chat.id)
    assert store.list_chats("AI").items == []
    with pytest.raises(ConfigError, match="No chat"):
        store.delete("AI", chat.id)


def test_each_root_is_separate(tmp_path: Path) -> None:
    alice, bob = HistoryStore(tmp_path / "alice"), HistoryStore(tmp_path / "bob")
    chat = alice.new("AI", MESSAGES)
    assert bob.list_chats("AI").items == [] and len(alice.list_chats("AI").items) == 1
    with pytest.raises(ConfigError):
        bob.load("AI", chat.id)


@pytest.mark.parametrize("bad", ["../x", "/tmp/x", "..\\x", "a/b", "~x", ""])
def test_names_and_ids_cannot_escape(store: HistoryStore, tmp_path: Path, bad: str) -> None:
    chat = store.new("AI", MESSAGES)
    with pytest.raises(PathError):
        store.new(bad, MESSAGES)
    with pytest.raises(PathError):
        store.load(bad, chat.id)
    with pytest.raises(PathError):
        store.load("AI", bad)
    with pytest.raises(PathError):
        store.delete("AI", bad)
    with pytest.raises(PathError):
        store.save(ChatHistory(id=bad, character="AI"))
    with pytest.raises(PathError):
        store.save(ChatHistory(id="fine", character=bad))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"logs/chat/AI/{chat.id}.json"]


def test_root_reached_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = HistoryStore(tmp_path / "link")
    chat = store.new("AI", MESSAGES)
    assert store.load("AI", chat.id).prompt_messages() == MESSAGES
    assert (tmp_path / "real" / "AI" / f"{chat.id}.json").is_file()
