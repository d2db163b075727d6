"""Session tab: the settings in force, the light/dark switch, "Save UI defaults" (for pages opened afterwards), and
the extensions list. With --multi-user the last two are the operator's: shown and answered only for an admin."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from modules.generation_params import GenerationParams
from modules.presets import load_preset
from modules.services import Services
from modules.settings import DEFAULT_SETTINGS_FILE, Settings, save_settings
from modules.ui.access import refuse_unless_admin
from modules.ui.common import UiContext, user_errors
from modules.ui.operator import operator_only
from modules.ui.page_defaults import PageDefaults

#: Settings never shown in the page, at any depth (extension params and loader options hold keys too).
_SECRET = re.compile(r"(^|_)(key|password|token|auth|secret)$")
#: Mappings whose every value is hidden: an MCP server's HTTP headers and environment (Authorization, API keys).
_SECRET_MAPPINGS = {"headers", "env"}
TOGGLE_THEME_JS = "() => { document.body.classList.toggle('dark'); }"


def settings_yaml(settings: Settings) -> str:
    return yaml.safe_dump(_masked(settings.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _masked_entry(key, item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _masked_entry(key: Any, item: Any) -> Any:
    if key in _SECRET_MAPPINGS and isinstance(item, dict):
        return {name: "(set)" for name in item}
    if item and _SECRET.search(str(key)):
        return "(set)"
    return _masked(item)


def settings_file(settings: Settings) -> Path:
    """Where "Save UI defaults" writes: the settings file this server read (or would have read)."""
    return Path(settings.settings) if settings.settings else DEFAULT_SETTINGS_FILE


def ui_defaults(settings: Settings, preset: str, params: GenerationParams, chat: Any) -> Settings:
    """Settings whose preset, generation overrides (what differs from the preset) and chat settings are the
    page's current ones."""
    base = load_preset(settings.preset_dir, preset)
    generation = {k: v for k, v in params.model_dump(mode="json").items()
                  if v != base.model_dump(mode="json")[k]}
    return settings.model_copy(update={"preset": preset, "generation": generation, "chat": chat})


def build_session_tab(ctx: UiContext) -> None:
    services = ctx.services
    settings = services.settings
    with gr.Row():
        with gr.Column(scale=1):
            theme = gr.Button("Toggle light / dark theme", elem_id="theme-toggle")
            with gr.Column(elem_id="operator-controls") as operator:
                save = gr.Button("Save UI defaults", variant="primary", elem_id="save-defaults")
                saved = gr.Markdown(f"Writes the current parameters, preset and chat settings to "
                                    f"`{settings_file(settings)}`. Pages opened from now on start with them; pages "
                                    f"already open keep theirs, and the API reads them at the next start.",
                                    elem_id="save-defaults-status")
                with gr.Accordion("Extensions", open=True):
                    build_extensions_panel(services)
        with gr.Column(scale=2):
            gr.Code(settings_yaml(settings), language="yaml", label="Settings in force", interactive=False,
                    elem_id="settings-in-force")

    @user_errors
    def on_save(data: dict[Any, Any], request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Saving the UI defaults")
        preset, params, chat = data[ctx.preset], ctx.read_params(data), ctx.read_chat(data)
        path = settings_file(settings)
        save_settings(ui_defaults(settings, preset, params, chat), path, only={"preset", "generation", "chat"})
        ctx.defaults.replace(PageDefaults(preset=preset, params=params, chat=chat))
        gr.Info(f"Saved UI defaults to {path}.")
        return f"Saved to `{path}`: pages opened from now on start with them (open pages and the API keep theirs)."

    theme.click(None, None, None, js=TOGGLE_THEME_JS)
    save.click(on_save, {ctx.preset, *ctx.params.inputs, *ctx.chat.inputs}, saved, api_name="save_ui_defaults")
    operator_only(ctx, operator)


def build_extensions_panel(services: Services) -> None:
    """The extensions (modules.extensions) to switch on and off. Hooks follow at once; a tab or panel that an
    extension adds to the page appears at the next start."""
    registry = services.extensions
    if registry is None:
        gr.Markdown("Extensions are not running in this app.", elem_id="extensions-list")
        return
    names = gr.CheckboxGroup(choices=registry.available(), value=registry.enabled, label="Enabled extensions",
                             info="Hooks apply at once; an extension's own tab or panel appears after a restart.",
                             elem_id="extensions-list")
    apply = gr.Button("Apply", size="sm", elem_id="extensions-apply")
    notes = gr.Markdown("\n\n".join(registry.messages()), elem_id="extensions-notes")

    @user_errors
    def on_apply(chosen: list[str], request: gr.Request) -> tuple[Any, str]:
        refuse_unless_admin(services.settings, request.username, "Switching extensions")
        for name in registry.enabled:
            if name not in chosen:
                registry.disable(name)
        for name in chosen:
            registry.enable(name)
        enabled = ", ".join(registry.enabled) or "none"
        return gr.update(value=registry.enabled), "\n\n".join([f"Enabled: {enabled}.", *registry.messages()])

    apply.click(on_apply, names, [names, notes], api_name="apply_extensions")
