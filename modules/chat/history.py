"""Chat histories on disk: one JSON file per chat under `<root>/<character>/<id>.json`.

The root is passed in (for example `user_data/logs/chat`, or a per-session folder when several people share a
server); nothing here is global. Writes are atomic. A file that cannot be read is never overwritten or silently
skipped: it is moved aside to `<id>.json.corrupt-<timestamp>` and reported.

Several pages (threads of one server, or several servers on one folder) may have the same chat open. Each copy
remembers the file it was read from (its bytes' hash and content); a save compares that with the file on disk
under a lock (`<root>/.lock`, fcntl.flock), so a page never overwrites what another page wrote after it read the
chat: both pages' new messages are merged (modules.chat.merge) or the save is refused with ChatChangedError.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from modules.chat.attachments import Attachment
from modules.chat.files import file_in
from modules.chat.image_store import ImageFolder, StoredImage, with_images
from modules.chat.merge import adds_text, merge_chats, same_content
from modules.errors import ChatChangedError, ConfigError, PathError
from modules.paths import atomic_write_text

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_IMPORT_BYTES = 64 * 1024 * 1024
_TGW_VISIBLE_MARKER = "<|BEGIN-VISIBLE-CHAT|>"  # text-generation-webui's placeholder user turn before a greeting


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ChatMessage(BaseModel):
    """One message. An assistant message may hold alternatives ("swipes") from regenerating; `content` is always
    the one shown, `swipes[swipe_index]`. `reasoning_content` is the reply's thinking (modules.chat.reasoning),
    kept apart from its content; `swipe_reasoning`, when set, holds each alternative's thinking. `attachments` are
    the files sent with a user message, their text read out (modules.chat.attachments): `content` is what the user
    typed, and the model reads the files before it. `images` are the images sent with a user message, kept in the
    chats' images folder (modules.chat.image_store) and read before its text."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    swipes: list[str] = Field(default_factory=list)
    swipe_index: int = 0
    timestamp: datetime | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    swipe_reasoning: list[str | None] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)
    images: list[StoredImage] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)  # anything else a caller wants kept with the message

    @model_validator(mode="after")
    def _swipes_agree(self) -> ChatMessage:
        if self.swipe_reasoning and len(self.swipe_reasoning) != len(self.swipes):
            raise ValueError(f"swipe_reasoning has {len(self.swipe_reasoning)} entries for {len(self.swipes)} "
                             "swipes")
        if self.swipes:
            if self.role != "assistant":
                raise ValueError("only assistant messages have swipes")
            if not 0 <= self.swipe_index < len(self.swipes):
                raise ValueError(f"swipe_index {self.swipe_index} is outside the {len(self.swipes)} swipes")
            if self.swipes[self.swipe_index] != self.content:
                raise ValueError("content differs from swipes[swipe_index]")
        elif self.swipe_index != 0:
            raise ValueError("swipe_index is set but there are no swipes")
        return self

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class ChatHistory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: str
    character: str
    name: str = ""  # display name; empty means "use the preview"
    mode: str | None = None
    created: datetime = Field(default_factory=_now)
    updated: datetime = Field(default_factory=_now)
    messages: list[ChatMessage] = Field(default_factory=list)
    #: The file this copy was read from or last written to, which a save checks is still on disk.
    _on_disk: OnDisk | None = PrivateAttr(default=None)

    @field_validator("created", "updated")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value

    @property
    def preview(self) -> str:
        first = next((m.content or " ".join(f"[{a.name}]" for a in [*m.attachments, *m.images])
                      for m in self.messages if m.role == "user"), "")
        text = " ".join(first.split())
        return text if len(text) <= 80 else text[:79] + "…"

    @property
    def title(self) -> str:
        return self.name or self.preview or "New chat"

    def prompt_messages(self, images: ImageFolder | None = None) -> list[dict[str, Any]]:
        """The messages as the chat path (modules.chat.request) takes them: no swipes, times or metadata; a
        message's attached files under "attachments" (written into its text there); its images, read from
        `images` (HistoryStore.images: a chat with images needs it), as image_url parts before its text."""
        keep = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}
        messages = []
        for m in self.messages:
            message = m.model_dump(include=keep, exclude_none=True)
            if m.attachments:
                message["attachments"] = list(m.attachments)
            if m.images:
                if images is None:
                    raise ConfigError("This chat has images: read it with its images folder.")
                message["content"] = with_images(m.content, [images.part(image) for image in m.images])
            messages.append(message)
        return messages

    def add_swipe(self, index: int, text: str, reasoning: str | None = None) -> None:
        """Keep a regenerated reply (and its thinking) as a new alternative of assistant message `index` and show
        it."""
        message = self._message(index, "assistant")
        swipes = message.swipes or [message.content]
        thinking = _swipe_reasoning(message)
        update: dict[str, Any] = {"swipes": [*swipes, text], "swipe_index": len(swipes), "content": text,
                                  "reasoning_content": reasoning, "swipe_reasoning": []}
        if reasoning is not None or any(t is not None for t in thinking):
            update["swipe_reasoning"] = [*thinking, reasoning]
        self.messages[index] = message.model_copy(update=update)

    def select_swipe(self, index: int, choice: int) -> None:
        message = self._message(index, "assistant")
        if not 0 <= choice < len(message.swipes):
            raise ConfigError(f"Message {index} has {len(message.swipes)} alternatives; there is no number {choice}.")
        update: dict[str, Any] = {"swipe_index": choice, "content": message.swipes[choice]}
        if message.swipe_reasoning:
            update["reasoning_content"] = message.swipe_reasoning[choice]
        self.messages[index] = message.model_copy(update=update)

    def edit_message(self, index: int, text: str) -> None:
        """Replace the shown text of message `index` (and its current swipe)."""
        message = self._message(index)
        swipes = list(message.swipes)
        if swipes:
            swipes[message.swipe_index] = text
        self.messages[index] = message.model_copy(update={"content": text, "swipes": swipes})

    def edit_reasoning(self, index: int, reasoning: str | None) -> None:
        """Replace the thinking of message `index` (and of its current swipe)."""
        message = self._message(index)
        update: dict[str, Any] = {"reasoning_content": reasoning}
        if message.swipe_reasoning:
            thinking = list(message.swipe_reasoning)
            thinking[message.swipe_index] = reasoning
            update["swipe_reasoning"] = thinking
        self.messages[index] = message.model_copy(update=update)

    def truncate_after(self, index: int) -> int:
        """Drop the messages after message `index` (to regenerate from there); how many were dropped."""
        self._message(index)
        index %= len(self.messages)
        dropped = len(self.messages) - index - 1
        del self.messages[index + 1:]
        return dropped

    def _message(self, index: int, role: str | None = None) -> ChatMessage:
        if not -len(self.messages) <= index < len(self.messages):
            raise ConfigError(f"The chat has {len(self.messages)} messages; there is no message {index}.")
        message = self.messages[index]
        if role is not None and message.role != role:
            raise ConfigError(f"Message {index} is a {message.role} message, not an {role} message.")
        return message


def _swipe_reasoning(message: ChatMessage) -> list[str | None]:
    """The thinking of each of the message's alternatives so far (a chat saved before they were kept per
    alternative has only the shown one's)."""
    if message.swipe_reasoning:
        return list(message.swipe_reasoning)
    count = len(message.swipes) or 1
    return [message.reasoning_content if i == message.swipe_index else None for i in range(count)]


@dataclass(frozen=True)
class OnDisk:
    """A chat file as one page read or wrote it: where it lies, the hash of its bytes and what it held."""

    character: str
    chat_id: str
    digest: str
    content: ChatHistory


@dataclass
class HistorySummary:
    """One row of the chat list."""

    id: str
    character: str
    title: str
    preview: str
    created: datetime
    updated: datetime
    message_count: int


@dataclass
class HistoryListing:
    items: list[HistorySummary]  # newest first
    warnings: list[str] = field(default_factory=list)  # damaged files found (and moved aside)


class HistoryStore:
    """The chats under one root folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    # --- paths ------------------------------------------------------------------------------------------------

    def _folder(self, character: str) -> Path:
        return file_in(self.root, character, "", what="character")

    def path(self, character: str, chat_id: str) -> Path:
        if not isinstance(chat_id, str) or not _ID.match(chat_id):
            raise PathError(f"The chat id {chat_id!r} is not valid: use letters, digits, '-', '_' and '.', starting "
                            "with a letter or digit.")
        return file_in(self._folder(character), chat_id, ".json", what="chat")

    def images(self, character: str) -> ImageFolder:
        """The folder of the images sent in the character's chats (by content hash, shared by its chats)."""
        return ImageFolder(self._folder(character) / "images")

    def characters(self) -> list[str]:
        """Characters that have a folder of chats."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=str.lower)

    # --- reading ----------------------------------------------------------------------------------------------

    def list_chats(self, character: str) -> HistoryListing:
        folder = self._folder(character)
        listing = HistoryListing(items=[])
        if not folder.is_dir():
            return listing
        for path in folder.glob("*.json"):
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                history = self._read(path, character)
            except ConfigError as exc:
                listing.warnings.append(str(exc))
                continue
            listing.items.append(HistorySummary(history.id, character, history.title, history.preview,
                                                history.created, history.updated, len(history.messages)))
        listing.items.sort(key=lambda s: (s.updated, s.id), reverse=True)
        return listing

    def load(self, character: str, chat_id: str) -> ChatHistory:
        path = self.path(character, chat_id)
        if not path.is_file():
            raise ConfigError(f"No chat {chat_id!r} for {character!r}.")
        return self._read(path, character)

    def _read(self, path: Path, character: str) -> ChatHistory:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"The chat {path.stem!r} of {character!r} cannot be read: {exc}") from None
        return self._parse(path, character, raw)

    def _parse(self, path: Path, character: str, raw: bytes) -> ChatHistory:
        """The chat in `raw` (the bytes of `path`), remembering them as the file it came from."""
        try:
            history = ChatHistory.model_validate(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
            reason = _describe(exc)
            aside = path.with_name(f"{path.name}.corrupt-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}")
            os.replace(path, aside)
            raise ConfigError(f"The chat {path.stem!r} of {character!r} is damaged ({reason}). It was moved aside, "
                              f"untouched, to {aside.name}.") from None
        # The file's place is authoritative: a copied or renamed file belongs where it lies.
        history = history.model_copy(update={"id": path.stem, "character": character})
        history._on_disk = OnDisk(character, path.stem, _digest(raw), history.model_copy(deep=True))
        return history

    def export(self, character: str, chat_id: str) -> bytes:
        return self.load(character, chat_id).model_dump_json(indent=2).encode("utf-8")

    # --- writing ----------------------------------------------------------------------------------------------

    def new(self, character: str, messages: list[ChatMessage | dict[str, Any]] | None = None, *, name: str = "",
            mode: str | None = None) -> ChatHistory:
        """Create and save a new chat (for example with the character's greeting as its first message)."""
        try:
            history = ChatHistory(id=self._new_id(character), character=character, name=name, mode=mode,
                                  messages=[m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m)
                                            for m in messages or []])
        except ValidationError as exc:
            raise ConfigError(f"The new chat is invalid: {_describe(exc)}") from None
        return self.save(history)

    def save(self, history: ChatHistory, *, keep_copy_on_conflict: bool = False) -> ChatHistory:
        """Write the chat atomically (stamping `updated`) unless its file changed since `history` was read.

        When another page wrote the file meanwhile, both pages' changes are merged where that is sound (see
        modules.chat.merge); otherwise ChatChangedError is raised and the file stays as the other page wrote it.
        With `keep_copy_on_conflict`, a refused copy holding text the file lacks (a generated reply, say) is first
        saved as a new chat, named in the error. A save that changes nothing writes nothing. On success `history`
        itself becomes the chat as it now is on disk (merged, stamped) and is returned."""
        path = self.path(history.character, history.id)
        mine = _validated(history, f"The chat {history.id!r} is invalid and was not saved")
        base = history._on_disk
        if base is not None and (base.character, base.chat_id) != (history.character, history.id):
            base = None  # a copy under a new id (a branch): a new chat
        with self._locked():
            theirs = self._current(path, history.character)
            if theirs is None:  # a new chat, or one deleted meanwhile: this page's copy is all there is
                if base is not None and same_content(mine, base.content):
                    return history  # deleted elsewhere and nothing new here: it stays deleted
                result = mine
            elif base is not None and theirs._on_disk.digest == base.digest:
                result = mine
            else:
                result = merge_chats(base.content if base is not None else None, mine, theirs)
            if result is not None:
                unchanged = theirs is not None and same_content(result, theirs)
                _adopt(history, theirs if unchanged else self._write(path, result))
                return history
        raise self._conflict(history, mine, theirs, keep_copy=keep_copy_on_conflict)

    def _write(self, path: Path, history: ChatHistory) -> ChatHistory:
        text = history.model_copy(update={"updated": _now()}).model_dump_json(indent=2)
        atomic_write_text(path, text)
        return self._parse(path, history.character, text.encode("utf-8"))

    def _conflict(self, history: ChatHistory, mine: ChatHistory, theirs: ChatHistory, *,
                  keep_copy: bool) -> ChatChangedError:
        kept = None
        if keep_copy and adds_text(mine, theirs):
            kept = self.save(mine.model_copy(update={"id": self._new_id(history.character), "created": _now(),
                                                     "name": f"{history.title} (kept copy)"}))
        message = "This chat changed in another page: reload it."
        if kept is not None:
            message += f" This page's version was kept as the chat {kept.title!r}."
        return ChatChangedError(message, chat_id=history.id, kept_id=kept.id if kept is not None else None)

    def _current(self, path: Path, character: str) -> ChatHistory | None:
        """The chat now in `path` (read under the lock), or None when there is none: a damaged one is moved aside
        (and logged), which leaves none."""
        if not path.exists():
            return None
        try:
            return self._read(path, character)
        except ConfigError as exc:
            if path.exists():
                raise
            log.warning("%s", exc)
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's lock file: one writer at a time, across the threads and processes that share it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:  # each call opens its own handle, so threads exclude too
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the handle releases the lock

    def rename(self, character: str, chat_id: str, name: str) -> ChatHistory:
        history = self.load(character, chat_id)
        return self.save(history.model_copy(update={"name": " ".join(name.split())}))

    def delete(self, character: str, chat_id: str) -> None:
        path = self.path(character, chat_id)
        with self._locked():
            if not path.is_file():
                raise ConfigError(f"No chat {chat_id!r} for {character!r}.")
            path.unlink()

    def branch(self, character: str, chat_id: str, upto: int) -> ChatHistory:
        """A new chat holding messages 0..upto (inclusive) of this one."""
        history = self.load(character, chat_id)
        if not 0 <= upto < len(history.messages):
            raise ConfigError(f"Cannot branch at message {upto}: the chat has {len(history.messages)} messages.")
        branch = history.model_copy(update={
            "id": self._new_id(character), "name": f"{history.title} (branch)", "created": _now(),
            "messages": [m.model_copy(deep=True) for m in history.messages[:upto + 1]]})
        return self.save(branch)

    def import_history(self, character: str, data: bytes) -> ChatHistory:
        """Save an exported chat (ours, text-generation-webui's, or a plain list of {role, content}) as a new chat."""
        if len(data) > _MAX_IMPORT_BYTES:
            raise ConfigError(f"The chat file is larger than {_MAX_IMPORT_BYTES // 2**20} MiB.")
        try:
            parsed = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"The chat file is not JSON: {exc}") from None
        fields = _import_fields(parsed)
        try:
            history = ChatHistory.model_validate({**fields, "version": 1, "id": self._new_id(character),
                                                  "character": character})
        except ValidationError as exc:
            raise ConfigError(f"The chat file is invalid: {_describe(exc)}") from None
        return self.save(history)

    def _new_id(self, character: str) -> str:
        while True:
            chat_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            if not self.path(character, chat_id).exists():
                return chat_id


def _import_fields(parsed: Any) -> dict[str, Any]:
    if isinstance(parsed, list):  # [{role, content}, ...]
        return {"messages": parsed}
    if not isinstance(parsed, dict):
        raise ConfigError("The chat file must hold a JSON object or a list of messages.")
    if "internal" in parsed and "messages" not in parsed:  # text-generation-webui: [[user, assistant], ...]
        rows = parsed["internal"]
        if not isinstance(rows, list):
            raise ConfigError("The text-generation-webui chat file has an 'internal' that is not a list of rows.")
        messages = []
        for number, row in enumerate(rows):
            if not isinstance(row, list) or len(row) < 2 or not all(isinstance(t, str) for t in row[:2]):
                raise ConfigError(f"Row {number} of the text-generation-webui chat is not a [user, reply] pair.")
            if row[0] and row[0] != _TGW_VISIBLE_MARKER:
                messages.append({"role": "user", "content": row[0]})
            if row[1]:
                messages.append({"role": "assistant", "content": row[1]})
        return {"messages": messages}
    return {key: value for key, value in parsed.items() if key not in ("id", "character", "version")}


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _adopt(history: ChatHistory, saved: ChatHistory) -> None:
    """Make `history` the chat as saved: a page keeps one object for its open chat."""
    fresh = saved.model_copy(deep=True)
    for name in ChatHistory.model_fields:
        setattr(history, name, getattr(fresh, name))
    history._on_disk = saved._on_disk


def _validated(history: ChatHistory, failure: str) -> ChatHistory:
    """The chat as it would read back from disk. Assignments to lists skip validation, so the whole chat is checked
    once more before it reaches the disk."""
    try:
        return ChatHistory.model_validate_json(history.model_dump_json())
    except ValidationError as exc:
        raise ConfigError(f"{failure}: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
                         for err in exc.errors()[:5])
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg} at line {exc.lineno}"
    return str(exc)
