"""The open chat as Gradio's Chatbot shows it, and the way back from what the page points at to the stored message.

A stored message may show as more than one Chatbot entry: a reply's thinking is an entry of its own above the
answer (a "thought": Gradio's message metadata with a title, drawn as a collapsible block, open with a spinner
while the model thinks, closed once it answers); tool calls and results are such blocks too
(modules.ui.tool_messages), and so is each file attached to a message (its name, kind and size; opened, its
text). Each image sent with a message is an entry of its own too: a thumbnail (modules.chat.image_store), its alt
text the image's name, type, pixels and size. Events of the Chatbot (select, edit) carry the entry's index, so
`entry_owners` says which stored message (and which part of it) each entry shows. Nothing here imports Gradio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from modules.chat.attachments import Attachment, fenced
from modules.chat.history import ChatMessage
from modules.chat.image_store import ImageFolder, StoredImage
from modules.request_hooks import visible_text
from modules.ui.tool_messages import tool_entries

THINKING_TITLE = "Thinking"
#: Metadata of a reply being written whose thinking has not ended yet (a preview, never saved).
THINKING_KEY = "thinking"

#: LaTeX in replies (KaTeX): $$...$$ and \[...\] on a line of their own, $...$ and \(...\) inline.
LATEX_DELIMITERS: list[dict[str, str | bool]] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]

Part = Literal["content", "reasoning", "attachment", "image"]

#: How much of an attached file's text its block shows (the model reads all of it).
SHOWN_FILE_CHARS = 4000


@dataclass(frozen=True)
class EntryOwner:
    """The stored message an entry of the Chatbot shows, and which part of it."""

    index: int
    part: Part


def _entries(messages: list[ChatMessage], images: ImageFolder | None = None) -> list[tuple[EntryOwner,
                                                                                         dict[str, Any]]]:
    """Each Chatbot entry of the chat with what it shows: per stored message its thinking (if it has any), its
    files and images (thumbnails from `images`; None: named only), then its text, or its tool calls / its tool
    result as a block."""
    tools = tool_entries(messages)
    entries: list[tuple[EntryOwner, dict[str, Any]]] = []
    for index, message in enumerate(messages):
        thinking = message.metadata.get(THINKING_KEY) == "pending"
        has_thinking = message.role == "assistant" and bool(message.reasoning_content or thinking)
        if has_thinking:
            entries.append((EntryOwner(index, "reasoning"), {
                "role": "assistant", "content": message.reasoning_content or "",
                "metadata": {"title": THINKING_TITLE, "status": "pending" if thinking else "done"}}))
        for file in message.attachments:
            entries.append((EntryOwner(index, "attachment"), attachment_entry(message.role, file)))
        for image in message.images:
            entries.append((EntryOwner(index, "image"), image_entry(message.role, image, images)))
        if index in tools:
            entries.append((EntryOwner(index, "content"), tools[index]))
        elif message.content or not (has_thinking or message.attachments or message.images):
            role = message.role if message.role in ("user", "assistant", "system") else "assistant"
            entries.append((EntryOwner(index, "content"),
                            {"role": role, "content": visible_text(message.content, message.metadata)}))
    return entries


def attachment_entry(role: str, file: Attachment) -> dict[str, Any]:
    """A file on its message: a closed block titled with its name, kind and size, holding its text."""
    text = file.text[:SHOWN_FILE_CHARS]
    more = len(file.text) - len(text)
    shown = fenced(text) + (f"\n\n… {more:,} more characters (the model reads them all)" if more else "")
    return {"role": role if role in ("user", "assistant") else "user", "content": shown,
            "metadata": {"title": f"📎 {file.label}", "status": "done"}}


def image_entry(role: str, image: StoredImage, images: ImageFolder | None) -> dict[str, Any]:
    """An image on its message: its thumbnail, or its name when it cannot be shown."""
    role = role if role in ("user", "assistant") else "user"
    thumbnail = images.thumbnail(image) if images is not None else None
    if thumbnail is None:
        return {"role": role, "content": f"🖼 {image.label} (not shown: the image file is missing or unreadable)"}
    return {"role": role, "content": {"path": str(thumbnail), "mime_type": "image/png", "orig_name": image.name,
                                      "alt_text": f"🖼 {image.label}"}}


def chatbot_messages(messages: list[ChatMessage], images: ImageFolder | None = None) -> list[dict[str, Any]]:
    """The chat as Gradio's Chatbot takes it; `images`, the chat's images folder, gives the thumbnails."""
    return [entry for _, entry in _entries(messages, images)]


def entry_owners(messages: list[ChatMessage]) -> list[EntryOwner]:
    """For each Chatbot entry of `messages` (as chatbot_messages lays them out), what it shows."""
    return [owner for owner, _ in _entries(messages)]


def owner_of(messages: list[ChatMessage], entry: int) -> EntryOwner | None:
    """What the Chatbot entry `entry` shows (None: no such entry; the page shows an older chat)."""
    owners = entry_owners(messages)
    return owners[entry] if 0 <= entry < len(owners) else None


def swipe_position(message: ChatMessage) -> tuple[int, int]:
    """(the alternative shown, counted from 1; how many there are) of a reply."""
    return (message.swipe_index + 1, len(message.swipes)) if message.swipes else (1, 1)


def swipe_target(messages: list[ChatMessage], selected: int | None) -> int | None:
    """The reply whose alternatives the previous/next controls browse: the selected message when it is a reply,
    else the last reply of the chat (None: the chat has none)."""
    if selected is not None and 0 <= selected < len(messages) and messages[selected].role == "assistant":
        return selected
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "assistant"), None)
