"""The extension hooks (modules.extensions) as they apply to one request, from any caller (the Chat, Default and
Notebook tabs, the API, the CLI); without extensions every method returns its input.

`state_modifier` runs once, when the hooks are made; the other hooks see the state it returned. What the state
holds: every generation knob by name, the chat settings (for chat requests) and `source` ("ui", "api", "cli").
"""
from __future__ import annotations

from typing import Any

from modules.generation_params import GenerationParams
from modules.presets import params_from_mapping
from modules.settings import ChatSettings

#: Where the text a chat shows is kept when an extension makes it differ from what the model reads.
VISIBLE_KEY = "visible"
_VISIBLE_OF = "visible_of"


class RequestHooks:
    """`params` are the request's parameters after state_modifier (a bad value it sets is a ConfigError)."""

    def __init__(self, services: Any, params: GenerationParams, chat: ChatSettings | None = None, *,
                 source: str = "ui"):
        self.services = services
        self.registry = getattr(services, "extensions", None)
        self.state: dict[str, Any] = {**params.model_dump(), **(chat.model_dump() if chat else {}), "source": source}
        self.params = params
        if self.registry is not None:
            self.state = self.registry.modify_state(self.state)
            changed = {k: v for k, v in self.state.items()
                       if k in GenerationParams.model_fields and v != getattr(params, k)}
            if changed:
                self.params = params_from_mapping({**params.model_dump(), **changed}, "An extension's state_modifier")

    def user_text(self, text: str) -> tuple[str, str]:
        """(what the model reads, what the chat shows) for a message the user typed."""
        if self.registry is None:
            return text, text
        model_text, visible = self.registry.modify_chat_input(text, text, self.state)
        return self.registry.modify_input(model_text, self.state), visible

    def last_user_message(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`messages` with the user_text hooks applied to the last user message (text content only): for callers
        whose conversation arrives whole with the new message in it (the API, the CLI)."""
        if self.registry is None:
            return messages
        for index in range(len(messages) - 1, -1, -1):
            message = messages[index]
            if message["role"] == "user" and isinstance(message.get("content"), str):
                text, _visible = self.user_text(message["content"])
                return [*messages[:index], {**message, "content": text}, *messages[index + 1:]]
        return messages

    def prompt_text(self, text: str) -> str:
        return text if self.registry is None else self.registry.modify_input(text, self.state)

    def history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return messages if self.registry is None else self.registry.modify_history(messages)

    def custom_prompt(self, messages: list[dict[str, Any]]) -> str | None:
        return None if self.registry is None else self.registry.custom_chat_prompt(messages, self.state,
                                                                                     self.services)

    def output(self, text: str, tokens: list[Any]) -> str:
        return text if self.registry is None else self.registry.modify_output(text, self.state, tokens)


def with_visible(metadata: dict[str, Any], content: str, visible: str) -> dict[str, Any]:
    """A message's metadata recording the text to show for `content` (dropped when they are the same)."""
    rest = {k: v for k, v in metadata.items() if k not in (VISIBLE_KEY, _VISIBLE_OF)}
    return rest if visible == content else {**rest, VISIBLE_KEY: visible, _VISIBLE_OF: content}


def visible_text(content: str, metadata: dict[str, Any]) -> str:
    """The text to show: an extension's version when it was made for this very content."""
    if metadata.get(_VISIBLE_OF) == content and isinstance(metadata.get(VISIBLE_KEY), str):
        return metadata[VISIBLE_KEY]
    return content
