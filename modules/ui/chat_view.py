"""The widgets that show the open chat, and how to refresh them: shared by the Chat tab and its panels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.errors import ChatChangedError
from modules.settings import ChatSettings
from modules.ui.chat_runner import chatbot_messages, shown_messages
from modules.ui.common import UiContext, error_text, warn
from modules.ui.session_state import UiSession


@dataclass
class ChatView:
    """The widgets that show the open chat; the past-chats and character panels refresh them too."""

    chatbot: gr.Chatbot
    chats: gr.Dropdown
    status: gr.Markdown
    message: gr.Textbox
    reload: gr.Button  # shown when another page changed the open chat and a save of this page was refused

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
    images = session.store.images(session.character)
    return (chatbot_messages(shown_messages(ctx.services, session, chat), images),
            gr.update(choices=choices, value=current))


def refused(ctx: UiContext, session: UiSession, chat: ChatSettings, exc: ChatChangedError) -> tuple[str, Any, Any]:
    """(status line, chats dropdown update, reload button update) after another page's change refused a save:
    the message as a notice and in the status line, a kept copy in the list, the Reload button shown."""
    gr.Warning(error_text(exc))
    return error_text(exc), show(ctx, session, chat)[1], gr.update(visible=True)
