"""Where a page's request goes: the model (and the LoRAs) a chat or a completion tab runs with, how that choice
is recorded on the messages of a chat, which models a page may pick, and whose request it is (the engine serves
clients in turn). Nothing here imports Gradio.

Each page holds its own choice (a chat's is restored from the chat when it is opened); nothing here changes the
manager's default model. A model that is not resident may be picked, and is then loaded just in time, only by a
page that may use the operator's controls (modules.ui.access.may_administer): a load may evict another user's
model, which is the operator's decision. Everyone else picks among the resident models.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loaders.batching import Adapter
from modules.chat.history import ChatMessage
from modules.errors import NoModelLoaded
from modules.model_manager import ModelManager
from modules.serving.residents import Resident
from modules.ui.session_state import UiSession

#: Keys of a message's metadata that record the model (and LoRAs) the turn ran with.
MODEL_KEY = "model"
LORAS_KEY = "loras"
#: How a model that is not resident is labelled in a picker.
NOT_LOADED = " (not loaded)"


@dataclass(frozen=True)
class ModelChoice:
    """A page's choice: `model` names a model (None: the manager's default model when the turn runs), `loras`
    the LoRAs of loras/ it runs with, each at `lora_scale` (none: the model's own applied LoRAs)."""

    model: str | None = None
    loras: tuple[str, ...] = ()
    lora_scale: float = 1.0

    def adapters(self, manager: ModelManager) -> tuple[Adapter, ...] | None:
        """The LoRAs as ModelManager.generate takes them (checked to exist); None leaves the model's own."""
        if not self.loras:
            return None
        return manager.adapters(list(self.loras), [self.lora_scale] * len(self.loras))

    def describe(self, model: str) -> str:
        """`model` (the one that answers) with this choice's LoRAs, for a status line."""
        if not self.loras:
            return model
        return f"{model} with LoRA {', '.join(self.loras)} ×{self.lora_scale:g}"

    def stamp(self, model: str) -> dict[str, Any]:
        """What a message's metadata records of the turn that wrote it: the model that answered, and its LoRAs."""
        stamp: dict[str, Any] = {MODEL_KEY: model}
        if self.loras:
            stamp[LORAS_KEY] = [{"name": name, "scale": self.lora_scale} for name in self.loras]
        return stamp

    @classmethod
    def of_chat(cls, messages: Sequence[ChatMessage]) -> ModelChoice | None:
        """The choice the chat's last recorded turn ran with; None when no message records one (an older chat,
        or only dummy messages)."""
        for message in reversed(messages):
            model = message.metadata.get(MODEL_KEY)
            if isinstance(model, str) and model:
                loras = [entry for entry in message.metadata.get(LORAS_KEY) or []
                         if isinstance(entry, dict) and isinstance(entry.get("name"), str)]
                scale = next((float(e["scale"]) for e in loras if isinstance(e.get("scale"), (int, float))), 1.0)
                return cls(model, tuple(e["name"] for e in loras), scale)
        return None


def model_choices(manager: ModelManager, *, may_load: bool, keep: str | None = None) -> list[tuple[str, str]]:
    """(label, name) of the models a page may pick: the resident ones (the default first), and with `may_load`
    the other models of models/, labelled as not loaded. `keep` (the page's current pick) stays listed even when
    it is no longer resident, so that the page can show it and say so."""
    default = manager.resident()
    choices = [(r.name, r.name) for r in sorted(manager.pool.all(), key=lambda r: r is not default)]
    others = [n for n in manager.list_models() if manager.resident(n) is None] if may_load else []
    if keep and manager.resident(keep) is None and keep not in others:
        others.append(keep)
    return choices + [(name + NOT_LOADED, name) for name in others]


def default_model(manager: ModelManager) -> str | None:
    """The name a new page's picker starts on: the manager's default model, or None when nothing is loaded."""
    resident = manager.resident()
    return resident.name if resident is not None else None


def find_resident(manager: ModelManager, name: str | None, *, may_load: bool) -> Resident | None:
    """The resident model that serves `name` (None: the default model). None means it is not resident and the
    caller may load it (`may_load`): with manager.ensure, after telling its user. Raises NoModelLoaded when there
    is nothing to serve the request: no model at all, or one this page may not load."""
    if not name:
        resident = manager.resident()
        if resident is None:
            raise manager.missing_model()
        return resident
    resident = manager.resident(name)
    if resident is not None or may_load:
        return resident
    loading = manager.loading
    if loading is not None and loading.name == name:
        raise manager.missing_model(name)
    raise NoModelLoaded(f"{name} is not loaded: pick another, or ask the operator to load it in the Model tab.")


def page_client(session: UiSession) -> str:
    """Whose request it is, for the engine's round-robin: the signed-in user (all their pages share one turn),
    else the page's session."""
    return f"ui-user:{session.user}" if session.user is not None else f"ui-page:{session.session_id}"
