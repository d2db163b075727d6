"""Chat histories on disk: round trips with swipes, newest-first listing, rename, branch, export/import, damaged
files kept aside, atomic writes that survive a crash, names that never leave the root, and two pages (or two
servers) saving one chat: both pages' messages kept, or a typed refusal that overwrites nothing."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import wait_until
from modules.chat.history import ChatHistory, ChatMessage, HistoryStore
from modules.errors import ChatChangedError, ConfigError, PathError

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
    assert written == ["logs/chat/.lock", f"logs/chat/AI/{chat.id}.json"]


def test_root_reached_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = HistoryStore(tmp_path / "link")
    chat = store.new("AI", MESSAGES)
    assert store.load("AI", chat.id).prompt_messages() == MESSAGES
    assert (tmp_path / "real" / "AI" / f"{chat.id}.json").is_file()


# --- two pages on one chat ------------------------------------------------------------------------------------------

def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def reply(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def contents(history: ChatHistory) -> list[str]:
    return [m.content for m in history.messages]


@pytest.fixture
def pages(store: HistoryStore) -> tuple[HistoryStore, HistoryStore, str]:
    """Two stores on one folder (two pages, or two servers) and a chat both have open."""
    chat = store.new("AI", MESSAGES)
    return store, HistoryStore(store.root), chat.id


def test_two_pages_that_each_add_a_turn_keep_both_in_the_order_they_were_saved(pages) -> None:
    first_store, second_store, chat_id = pages
    first, second = first_store.load("AI", chat_id), second_store.load("AI", chat_id)
    first.messages.append(user("From the first page"))
    first_store.save(first)
    second.messages.append(user("From the second page"))
    assert second_store.save(second) is second  # the page's open chat becomes the merged one
    first.messages.append(reply("Reply to the first page"))
    first_store.save(first)
    second.messages.append(reply("Reply to the second page"))
    second_store.save(second)
    expected = [*contents(ChatHistory(id="x", character="AI", messages=MESSAGES)), "From the first page",
                "From the second page", "Reply to the first page", "Reply to the second page"]
    assert contents(first_store.load("AI", chat_id)) == expected
    assert contents(second) == expected and contents(first) == expected[:-1]
    first.messages.append(user("Once more"))  # the first page has not seen the last reply: it is kept anyway
    first_store.save(first)
    assert contents(second_store.load("AI", chat_id)) == [*expected, "Once more"]


def test_a_rename_in_one_page_and_a_message_change_in_the_other_are_both_kept(pages) -> None:
    first_store, second_store, chat_id = pages
    open_in_second = second_store.load("AI", chat_id)
    first_store.rename("AI", chat_id, "Trip planning")
    open_in_second.messages.append(user("Still here"))
    second_store.save(open_in_second)
    saved = first_store.load("AI", chat_id)
    assert saved.name == "Trip planning" and contents(saved)[-1] == "Still here"
    assert open_in_second.title == "Trip planning"
    renamed_here = first_store.load("AI", chat_id)
    open_in_second.edit_message(2, "Vesta.")
    second_store.save(open_in_second)
    renamed_here.name = "Asteroids"
    first_store.save(renamed_here)
    saved = second_store.load("AI", chat_id)
    assert (saved.name, saved.messages[2].content) == ("Asteroids", "Vesta.")


def remove_last(history: ChatHistory) -> None:
    history.messages.pop()


def edit_last(history: ChatHistory) -> None:
    history.edit_message(-1, "Vesta.")


def swipe_last(history: ChatHistory) -> None:
    history.add_swipe(2, "Pallas.")


def rename(history: ChatHistory) -> None:
    history.name = "Another name"


def append(history: ChatHistory) -> None:
    history.messages.append(user("A new question"))


def swipe_other(history: ChatHistory) -> None:
    history.add_swipe(2, "Juno.")


def rename_other(history: ChatHistory) -> None:
    history.name = "My name"


@pytest.mark.parametrize("theirs, mine", [(t, m) for t in (remove_last, edit_last, swipe_last)
                                          for m in (append, swipe_other)] + [(rename, rename_other)],
                         ids=lambda f: f.__name__)
def test_changes_that_cannot_be_merged_are_refused_and_overwrite_nothing(pages, theirs, mine) -> None:
    first_store, second_store, chat_id = pages
    first, second = first_store.load("AI", chat_id), second_store.load("AI", chat_id)
    theirs(first)
    first_store.save(first)
    on_disk = first_store.path("AI", chat_id).read_bytes()
    mine(second)
    with pytest.raises(ChatChangedError, match="This chat changed in another page: reload it.") as refused:
        second_store.save(second)
    assert refused.value.chat_id == chat_id and refused.value.kept_id is None
    assert first_store.path("AI", chat_id).read_bytes() == on_disk
    assert len(first_store.list_chats("AI").items) == 1  # no copy unless asked for
    reloaded = second_store.load("AI", chat_id)  # after a reload the page's change goes through
    reloaded.messages.append(user("After reloading"))
    second_store.save(reloaded)
    assert contents(first_store.load("AI", chat_id)) == [*contents(first), "After reloading"]


def test_a_refused_reply_can_be_kept_as_a_new_chat(pages) -> None:
    first_store, second_store, chat_id = pages
    first, second = first_store.load("AI", chat_id), second_store.load("AI", chat_id)
    remove_last(first)
    first_store.save(first)
    second.add_swipe(2, "A reply that took a minute to write.")
    with pytest.raises(ChatChangedError) as refused:
        second_store.save(second, keep_copy_on_conflict=True)
    kept = second_store.load("AI", refused.value.kept_id)
    assert kept.id != chat_id and kept.title in str(refused.value) and kept.title.endswith("(kept copy)")
    assert kept.messages[2].swipes == ["Ceres.", "A reply that took a minute to write."]
    assert contents(first_store.load("AI", chat_id)) == contents(first)  # the other page's version stays
    # A refused change that adds no text (a removal) leaves no copy behind.
    again = second_store.load("AI", chat_id)
    first.messages.append(user("More"))
    first_store.save(first)
    remove_last(again)
    with pytest.raises(ChatChangedError) as refused:
        second_store.save(again, keep_copy_on_conflict=True)
    assert refused.value.kept_id is None and len(first_store.list_chats("AI").items) == 2


def test_a_file_changed_by_another_program_is_not_overwritten(pages) -> None:
    first_store, _, chat_id = pages
    page = first_store.load("AI", chat_id)
    path = first_store.path("AI", chat_id)
    edited = json.loads(path.read_text())
    edited["messages"][2]["content"] = "Edited by hand."
    path.write_text(json.dumps(edited))  # no revision of ours: only its bytes changed
    page.messages.append(user("Next"))
    with pytest.raises(ChatChangedError):
        first_store.save(page)
    assert json.loads(path.read_text()) == edited


def test_saves_that_change_nothing_write_nothing_and_a_deleted_chat_stays_deleted(pages) -> None:
    first_store, second_store, chat_id = pages
    page = first_store.load("AI", chat_id)
    path = first_store.path("AI", chat_id)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    first_store.save(page)
    first_store.save(page)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    untouched, changed = second_store.load("AI", chat_id), second_store.load("AI", chat_id)
    first_store.delete("AI", chat_id)
    second_store.save(untouched)
    assert not path.exists()
    changed.messages.append(user("Written after the delete"))  # a page's new text brings the chat back
    second_store.save(changed)
    assert contents(first_store.load("AI", chat_id))[-1] == "Written after the delete"


def test_an_old_file_written_before_revisions_loads_and_saves(store: HistoryStore) -> None:
    folder = store.root / "AI"
    folder.mkdir(parents=True)
    (folder / "old.json").write_text(json.dumps({"version": 1, "id": "old", "character": "AI",
                                                 "messages": [{"role": "user", "content": "Hello"}]}))
    page, other = store.load("AI", "old"), store.load("AI", "old")
    page.messages.append(reply("Hi."))
    store.save(page)
    other.messages.append(user("Anyone?"))
    store.save(other)
    assert contents(store.load("AI", "old")) == ["Hello", "Hi.", "Anyone?"]


def test_concurrent_saves_from_many_threads_lose_no_message(store: HistoryStore) -> None:
    chat = store.new("AI", MESSAGES)
    threads, rounds = 6, 8
    start = threading.Barrier(threads)
    failures: list[BaseException] = []

    def page(number: int) -> None:
        try:
            mine = HistoryStore(store.root)  # each page its own store object, as two servers would have
            history = mine.load("AI", chat.id)
            start.wait()
            for turn in range(rounds):
                history.messages.append(user(f"page {number} turn {turn}"))
                mine.save(history)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    workers = [threading.Thread(target=page, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
    saved = contents(store.load("AI", chat.id))[len(MESSAGES):]
    assert sorted(saved) == sorted(f"page {n} turn {t}" for n in range(threads) for t in range(rounds))
    for number in range(threads):  # each page's messages in the order it sent them
        assert [m for m in saved if m.startswith(f"page {number} ")] == [f"page {number} turn {t}"
                                                                         for t in range(rounds)]


def waits_for_lock(path: Path) -> bool:
    """Whether this process is blocked on a lock of `path`: Linux lists each waiter in /proc/locks after '->'."""
    inode, pid = f":{path.stat().st_ino} ", f" {os.getpid()} "
    return any("->" in line and inode in line and pid in line
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_save_waits_for_another_process_holding_the_lock(store: HistoryStore) -> None:
    chat = store.new("AI", MESSAGES)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys\n"
         "with open(sys.argv[1], 'a') as f:\n"
         "    fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.readline()",
         str(store.root / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        page = store.load("AI", chat.id)
        page.messages.append(user("Waiting"))
        saver = threading.Thread(target=store.save, args=(page,))
        saver.start()
        wait_until(lambda: waits_for_lock(store.root / ".lock"), "the save waits for the other process's lock")
        assert saver.is_alive() and contents(store.load("AI", chat.id)) == contents(chat)  # held off
        holder.stdin.write("\n")
        holder.stdin.flush()
        saver.join()
        assert contents(store.load("AI", chat.id))[-1] == "Waiting"
    finally:
        holder.kill()
        holder.wait()
    with open(store.root / ".lock", "a") as handle:  # and the save let go of it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
