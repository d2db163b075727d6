"""What a browser page opened from now on starts with: the preset, the generation parameters and the chat settings.

"Save UI defaults" replaces them for pages opened afterwards; pages already open keep what they show, and the API
keeps reading `Services.settings` (it picks the saved file up at the next start). The holder lives on the UI
context of one app, never in a module global. Nothing here imports Gradio.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from modules.generation_params import GenerationParams
from modules.services import Services
from modules.settings import ChatSettings


@dataclass(frozen=True)
class PageDefaults:
    preset: str
    params: GenerationParams
    chat: ChatSettings


class NewPageDefaults:
    """The defaults handed to each new page, replaced as a whole so a page never reads half of an update."""

    def __init__(self, initial: PageDefaults):
        self._lock = threading.Lock()
        self._current = initial

    @classmethod
    def from_services(cls, services: Services) -> "NewPageDefaults":
        settings = services.settings
        return cls(PageDefaults(preset=settings.preset, params=services.default_params(), chat=settings.chat))

    def get(self) -> PageDefaults:
        with self._lock:
            return self._current

    def replace(self, defaults: PageDefaults) -> None:
        with self._lock:
            self._current = defaults
