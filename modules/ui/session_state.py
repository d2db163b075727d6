"""What one browser session of the UI holds: its chats folder, the open chat, and the generation it runs.

With --multi-user and --gradio-auth the chats belong to the signed-in user (`user_data/users/<key>/logs/chat`,
whatever browser they use); with --multi-user alone every browser gets its own chats folder, keyed by a random id
the browser keeps in its local storage; otherwise all pages share `user_data/logs/chat`. Nothing here imports
Gradio.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.chat.history import ChatHistory, HistoryStore
from modules.model_manager import Generation
from modules.services import Services

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{24,64}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


def valid_session_id(value: object) -> str | None:
    """The id if a browser sent a well-formed one (it is a path component), else None."""
    return value if isinstance(value, str) and _SESSION_ID.match(value) else None


def user_key(user: str) -> str:
    """A folder name for a signed-in user. A user name is not a safe path component ('..', '/', case-folding
    file systems), so the name is reduced to a readable slug and made unique by a hash of the exact name."""
    slug = re.sub(r"[^a-z0-9]+", "-", user.lower()).strip("-")[:32] or "user"
    return f"{slug}-{hashlib.sha256(user.encode('utf-8')).hexdigest()[:20]}"


def chats_root(services: Services, session_id: str, user: str | None = None) -> Path:
    """The chats folder of a page: the signed-in user's (--multi-user with a user), the browser's (--multi-user
    without one), or the shared one."""
    settings = services.settings
    if settings.multi_user and user is not None:
        return settings.user_data_dir / "users" / user_key(user) / "logs" / "chat"
    if settings.multi_user:
        return settings.user_data_dir / "sessions" / session_id / "logs" / "chat"
    return services.chat_root


@dataclass
class UiSession:
    session_id: str
    store: HistoryStore
    character: str
    user: str | None = None  # the signed-in user (--gradio-auth), whose chats this page reads and writes
    history: ChatHistory | None = None  # None: a new chat, saved when its first message is added
    selected: int | None = None  # the chat message picked in the chatbot (for "Branch here")
    generation: Generation | None = None  # the generation this page runs, for Stop
    #: The turn with tools this page runs (modules.ui.tool_turns.ToolTurn): for Stop and the Approve/Deny buttons.
    tool_turn: Any = None
    notebook_undo: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, services: Services, session_id: str, *, user: str | None = None,
              character: str | None = None) -> "UiSession":
        """A page's session; `character` is the one the page starts with (default: the settings' one)."""
        store = HistoryStore(chats_root(services, session_id, user))
        return cls(session_id=session_id, store=store, user=user,
                   character=character if character is not None else services.settings.chat.character)

    @property
    def busy(self) -> bool:
        return self.generation is not None or self.tool_turn is not None

    def stop(self) -> None:
        tool_turn = self.tool_turn
        if tool_turn is not None:  # no more rounds, and a call waiting for approval is declined
            tool_turn.stop()
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
