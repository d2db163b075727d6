"""The extension hooks (modules.extensions) as the UI's generating tabs apply them to one request; without
extensions every method returns its input. Nothing here imports Gradio."""
from __future__ import annotations

from typing import Any

from modules.generation_params import GenerationParams
from modules.presets import params_from_mapping
from modules.services import Services
from modules.settings import ChatSettings

#: Where the text a chat shows is kept when an extension makes it differ from what the model reads.
VISIBLE_KEY = "visible"
_VISIBLE_OF = "visible_of"


class RequestHooks:
    """state_modifier is applied once, at creation: `params` are the parameters after it."""

    def __init__(self, services: Services, params: GenerationParams, chat: ChatSettings | None = None):
        self.services = services
        self.registry = services.extensions
        self.state: dict[str, Any] = {**params.model_dump(), **(chat.model_dump() if chat else {}), "source": "ui"}
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
