"""The services an app hands to its tabs, routes and extensions: built once in webui.py, passed explicitly,
never imported as globals. Also the defaults a model's requests get: the settings' preset and chat settings, with
the per-model layer of models.yaml (modules.model_settings) over them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders.base import LoaderRegistry
from modules.errors import ConfigError, WorkbenchError
from modules.generation_params import GenerationParams
from modules.model_manager import ModelManager
from modules.model_settings import MODELS_FILE, ModelEntry, ModelSettings, ModelSpec, is_jinja
from modules.presets import load_preset, params_from_mapping
from modules.settings import ChatSettings, Settings
from modules.starter import STARTER_GGUF
from modules.tools.toolbox import Toolbox

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    manager: ModelManager
    #: Filled by the extensions registry when it starts (modules.extensions); None when extensions are off.
    extensions: Any = None
    #: Messages for the person at the UI (a model that failed to load at start, ...).
    startup_messages: list[str] = field(default_factory=list)
    #: The tools a chat may use (modules/tools): made by start_toolbox, closed by close(); None before.
    toolbox: Toolbox | None = None

    @property
    def model_settings(self) -> ModelSettings | None:
        """models.yaml, or None for a manager built without it."""
        return self.manager.model_settings

    def model_spec(self, model: str | None) -> ModelSpec | None:
        """What models.yaml says for `model` (a name or an alias); None for None or without models.yaml."""
        if model is None or self.model_settings is None:
            return None
        return self.model_settings.resolve(model)

    def model_preset(self, model: str | None) -> str | None:
        """The preset models.yaml gives `model` (checked), unless --preset was given on the command line."""
        spec = self.model_spec(model)
        if spec is None or spec.preset is None or self.settings.from_command_line("preset"):
            return None
        assert self.model_settings is not None
        self.model_settings.check_preset(spec)
        return spec.preset

    def default_params(self, model: str | None = None) -> GenerationParams:
        """The generation defaults for requests to `model` (a name or alias; None: the settings' alone): the preset
        models.yaml gives that model; else the preset named in settings, with settings.generation on top."""
        preset = self.model_preset(model)
        if preset is not None:
            return load_preset(self.settings.preset_dir, preset)
        base = GenerationParams()
        try:
            base = load_preset(self.settings.preset_dir, self.settings.preset)
        except WorkbenchError as exc:
            self.startup_messages.append(str(exc))
        merged = {**base.non_default(), **self.settings.generation}
        return params_from_mapping(merged, "settings.generation")

    def chat_settings(self, model: str | None = None) -> ChatSettings:
        """The chat settings for requests to `model`: a template models.yaml gives it became the model's own
        (LoadedModel.chat_template, set at load), and the settings' instruction_template does not cover it."""
        spec = self.model_spec(model)
        if spec is None or spec.template is None:
            return self.settings.chat
        return self.settings.chat.model_copy(update={"instruction_template": ""})

    def save_model_settings(self, name: str, loader: str, options: dict[str, Any], *, preset: str | None = None,
                            template: str | None = None, aliases: list[str] | None = None) -> ModelEntry:
        """Write to models.yaml, under `name`, the loader and the options that differ from what it would get
        without an entry of its own, and the preset, template (a name; None keeps a Jinja template the entry
        holds) and aliases. Returns what was written."""
        settings_file = self.model_settings
        if settings_file is None:
            raise ConfigError("This server reads no models.yaml.")
        name = settings_file.canonical(name)
        loader_cls = self.manager.registry.get(loader)
        chosen = loader_cls.parse_options(options).model_dump(mode="json")
        inherited = self.manager.plan(name, loader_cls.name, own_entry=False).options.model_dump(mode="json")
        current = settings_file.entries().get(name)
        if not template and current is not None and current.template and is_jinja(current.template):
            template = current.template
        entry = ModelEntry.model_validate({
            "loader": loader_cls.name, "options": {k: v for k, v in chosen.items() if inherited.get(k) != v},
            "preset": preset or None, "template": template or None, "aliases": aliases or []})
        check = ModelSpec(name, preset=entry.preset, template=entry.template)
        settings_file.check_preset(check)
        settings_file.template_text(check)
        settings_file.save(name, entry)
        return entry

    @property
    def chat_root(self) -> Path:
        return self.settings.user_data_dir / "logs" / "chat"

    def close(self) -> None:
        """What the app ends at shutdown besides its models: the MCP sessions (and stdio servers' processes)."""
        if self.toolbox is not None:
            self.toolbox.close()


def build_services(settings: Settings) -> Services:
    """The services for these settings; a bad models.yaml stops here (ConfigError naming the file and key)."""
    registry = LoaderRegistry()
    model_settings = ModelSettings(settings.user_data_dir / MODELS_FILE, registry, preset_dir=settings.preset_dir,
                                   template_dir=settings.template_dir)
    model_settings.check()
    manager = ModelManager(settings.model_dir, settings.lora_dir, registry=registry,
                           loader_options=settings.loader_options, max_models=settings.max_models,
                           memory_budget=settings.memory_budget_bytes, idle_unload=settings.idle_unload,
                           max_queue=settings.max_queue, model_settings=model_settings,
                           pinned_options=settings.command_line_loader_options)
    return Services(settings=settings, manager=manager)


def start_toolbox(services: Services) -> Toolbox:
    """The settings' tools: the tool files are read now (their problems are listed in the Chat tab's tools), the
    MCP servers connect in the background, so a slow or failing server neither holds up the start nor stops it."""
    services.toolbox = Toolbox.from_settings(services.settings).start()
    return services.toolbox


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
