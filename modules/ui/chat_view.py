"""The widgets that show the open chat, and how to refresh them: shared by the Chat tab and its panels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.settings import ChatSettings
from modules.ui.chat_runner import chatbot_messages, shown_messages
from modules.ui.common import UiContext, warn
from modules.ui.session_state import UiSession


@dataclass
class ChatView:
    """The widgets that show the open chat; the past-chats and character panels refresh them too."""

    chatbot: gr.Chatbot
    chats: gr.Dropdown
    status: gr.Markdown
    message: gr.Textbox

    @property
    def outputs(self) -> list[Any]:
        return [self.chatbot, self.chats]


def chat_choices(session: UiSession) -> tuple[list[tuple[str, str]], list[str]]:
    listing = session.store.list_chats(session.character)
    return ([(f"{item.title} · {item.updated:%Y-%m-%d %H:%M}", item.id) for item in listing.items],
            listing.warnings)


def show(ctx: UiContext, session: UiSession, chat: ChatSettings) -> tuple[list[dict[str, Any]], Any]:
    """(chatbot value, chats dropdown update) for the session's open chat."""
    choices, warnings = chat_choices(session)
    warn(warnings)
    current = session.history.id if session.history is not None else None
    return (chatbot_messages(shown_messages(ctx.services, session, chat)),
            gr.update(choices=choices, value=current))
