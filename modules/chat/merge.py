"""Merging two saves of one chat made from the same starting point (two pages open on one chat).

A three-way merge over whole messages: `base` is the chat as both pages read it, `mine` is the page saving now,
`theirs` is what another page wrote meanwhile. The only changes merged are ones a chat app would merge without
asking: one side changed nothing, both made the same change, or both only added messages at the end (the result
keeps the other page's messages first, then this page's, in the order they reached the disk). Anything else (an
edit, a removal, a new alternative of a message, or a rename on both sides) is a conflict, reported as None.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # history.py imports this module
    from modules.chat.history import ChatHistory, ChatMessage

T = TypeVar("T")
_CONFLICT: Any = object()


def same_content(a: ChatHistory, b: ChatHistory) -> bool:
    """Whether two copies hold the same chat (times of saving aside)."""
    return (a.name, a.mode, a.messages) == (b.name, b.mode, b.messages)


def merge_chats(base: ChatHistory | None, mine: ChatHistory, theirs: ChatHistory) -> ChatHistory | None:
    """The chat that keeps both sides' changes, or None when they cannot both be kept. Without a base (this page
    never read the file it is about to write) only an identical copy merges."""
    if base is None:
        return theirs if same_content(mine, theirs) else None
    messages = _merge_messages(base.messages, mine.messages, theirs.messages)
    name = _merge_value(base.name, mine.name, theirs.name)
    mode = _merge_value(base.mode, mine.mode, theirs.mode)
    if any(value is _CONFLICT for value in (messages, name, mode)):
        return None
    return theirs.model_copy(update={"messages": messages, "name": name, "mode": mode})


def adds_text(mine: ChatHistory, theirs: ChatHistory) -> bool:
    """Whether `mine` holds a message (or an alternative of one) that `theirs` lacks: text that would be lost if
    only `theirs` were kept."""
    present = {(m.role, text) for m in theirs.messages for text in (m.content, *m.swipes)}
    return any((m.role, text) not in present for m in mine.messages for text in (m.content, *m.swipes))


def _merge_value(base: T, mine: T, theirs: T) -> T:
    if mine == theirs or mine == base:
        return theirs
    if theirs == base:
        return mine
    return _CONFLICT


def _merge_messages(base: list[ChatMessage], mine: list[ChatMessage],
                    theirs: list[ChatMessage]) -> list[ChatMessage]:
    merged = _merge_value(base, mine, theirs)
    if merged is not _CONFLICT:
        return list(merged)
    start = len(base)
    if mine[:start] == base and theirs[:start] == base:  # both only added messages at the end
        return [*theirs, *mine[start:]]
    return _CONFLICT
