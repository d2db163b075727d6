"""What one browser session of the UI holds: its chats folder, the open chat, and the generation it runs.

With --multi-user every browser gets its own chats folder, keyed by a random id the browser keeps in its local
storage; otherwise all pages share `user_data/logs/chat`. Nothing here imports Gradio.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from modules.chat.history import ChatHistory, HistoryStore
from modules.model_manager import Generation
from modules.services import Services

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{24,64}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


def valid_session_id(value: object) -> str | None:
    """The id if a browser sent a well-formed one (it is a path component), else None."""
    return value if isinstance(value, str) and _SESSION_ID.match(value) else None


def chats_root(services: Services, session_id: str) -> Path:
    if services.settings.multi_user:
        return services.settings.user_data_dir / "sessions" / session_id / "logs" / "chat"
    return services.chat_root


@dataclass
class UiSession:
    session_id: str
    store: HistoryStore
    character: str
    history: ChatHistory | None = None  # None: a new chat, saved when its first message is added
    selected: int | None = None  # the chat message picked in the chatbot (for "Branch here")
    generation: Generation | None = None  # the generation this page runs, for Stop
    notebook_undo: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, services: Services, session_id: str) -> "UiSession":
        store = HistoryStore(chats_root(services, session_id))
        return cls(session_id=session_id, store=store, character=services.settings.chat.character)

    @property
    def busy(self) -> bool:
        return self.generation is not None

    def stop(self) -> None:
        generation = self.generation
        if generation is not None:
            generation.cancel()

    def open_latest(self) -> list[str]:
        """Open the most recent chat of the current character (or a new one); returns warnings about damaged
        chat files that were moved aside."""
        listing = self.store.list_chats(self.character)
        self.history = self.store.load(self.character, listing.items[0].id) if listing.items else None
        self.selected = None
        return listing.warnings
