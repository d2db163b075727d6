"""The services an app hands to its tabs, routes and extensions: built once in webui.py, passed explicitly,
never imported as globals."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.errors import WorkbenchError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.presets import load_preset, params_from_mapping
from modules.settings import Settings
from modules.starter import STARTER_GGUF

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    manager: ModelManager
    #: Filled by the extensions registry when it starts (modules.extensions); None when extensions are off.
    extensions: Any = None
    #: Messages for the person at the UI (a model that failed to load at start, ...).
    startup_messages: list[str] = field(default_factory=list)

    def default_params(self) -> GenerationParams:
        """The preset named in settings, with settings.generation on top."""
        base = GenerationParams()
        try:
            base = load_preset(self.settings.preset_dir, self.settings.preset)
        except WorkbenchError as exc:
            self.startup_messages.append(str(exc))
        merged = {**base.non_default(), **self.settings.generation}
        return params_from_mapping(merged, "settings.generation")

    @property
    def chat_root(self) -> Path:
        return self.settings.user_data_dir / "logs" / "chat"


def build_services(settings: Settings) -> Services:
    manager = ModelManager(settings.model_dir, settings.lora_dir, loader_options=settings.loader_options,
                           max_models=settings.max_models, memory_budget=settings.memory_budget_bytes,
                           idle_unload=settings.idle_unload, max_queue=settings.max_queue)
    return Services(settings=settings, manager=manager)


def startup_model(settings: Settings, manager: ModelManager) -> str | None:
    """The model to load at start: the one asked for, or else the starter GGUF, or else the first model found.
    `--model none` starts with nothing loaded."""
    if settings.model:
        return None if settings.model.lower() == "none" else settings.model
    if (settings.loader or "").lower() == "remote":  # the server's model: --remote-model, else its first one
        return settings.loader_options.get("remote_model") or "remote"
    names = manager.list_models()
    if STARTER_GGUF in names:
        return STARTER_GGUF
    return names[0] if names else None


def load_startup_model(services: Services) -> None:
    settings, manager = services.settings, services.manager
    name = startup_model(settings, manager)
    if name is None:
        services.startup_messages.append("No model loaded: put one in models/ or use the Model tab.")
        return
    try:
        result = manager.load(name, settings.loader, loras=settings.lora or None)
        log.info("loaded %s with %s in %.1f s", name, result.info.loader, result.seconds)
        services.startup_messages.extend(result.warnings)
    except WorkbenchError as exc:
        log.error("could not load %s: %s", name, exc)
        services.startup_messages.append(f"Could not load {name}: {exc}")
