"""Builds the Gradio app from the services and launches it: one tab per file in modules/ui/, a per-page session
state (bound to the signed-in user with --gradio-auth), password protection with slowed-down wrong passwords, and
the bind address from the settings."""
from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from modules.chat.characters import list_characters
from modules.chat.prompt import MODES
from modules.chat.templates import list_templates
from modules.errors import ConfigError, WorkbenchError
from modules.generation_params import GenerationParams
from modules.paths import atomic_write_text
from modules.presets import list_presets
from modules.services import Services
from modules.settings import ChatSettings, Settings
from modules.ui.access import SessionOwners
from modules.ui.chat_tab import build_chat_tab
from modules.ui.common import UiContext
from modules.ui.completion_tab import build_default_tab, build_notebook_tab
from modules.ui.login_throttle import LoginThrottleMiddleware
from modules.ui.model_tab import build_model_tab
from modules.ui.page_defaults import NewPageDefaults
from modules.ui.parameters_tab import build_parameters_tab
from modules.ui.session_state import UiSession, new_session_id, valid_session_id
from modules.ui.session_tab import build_session_tab
from modules.ui.widgets import FieldPanel

TITLE = "LLM workbench"
_TRAINING_TAB = Path(__file__).with_name("training_tab.py")
_CSS = """
#chat-status, #default-status, #notebook-status { min-height: 1.5em; font-size: 0.9em; opacity: 0.85; }
footer { display: none !important; }
"""
_DARK_JS = "() => { document.body.classList.add('dark'); }"
AUTH_MESSAGE = ("LLM workbench: sign in. After several wrong passwords sign-in pauses for a while; if the button "
                "seems to do nothing, wait a minute and try again.")


def build_app(services: Services) -> gr.Blocks:
    settings = services.settings
    defaults = NewPageDefaults.from_services(services)
    first = defaults.get()
    with gr.Blocks(title=TITLE, analytics_enabled=False, fill_width=True) as app:
        session = gr.State(None, delete_callback=lambda value: value.stop() if value is not None else None)
        browser_id = gr.BrowserState(None, storage_key="workbench-session", secret=_browser_secret(settings))
        ctx = UiContext(services=services, session=session,
                        params=FieldPanel(GenerationParams, first.params, elem_prefix="param-"),
                        preset=gr.Dropdown(choices=list_presets(settings.preset_dir), value=first.preset,
                                           label="Preset", scale=3, render=False, elem_id="preset-select"),
                        chat=_chat_panel(settings, first.chat), defaults=defaults)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_view = build_chat_tab(ctx)
            with gr.Tab("Default", id="default", elem_id="tab-default"):
                build_default_tab(ctx)
            with gr.Tab("Notebook", id="notebook", elem_id="tab-notebook"):
                build_notebook_tab(ctx)
            with gr.Tab("Parameters", id="parameters", elem_id="tab-parameters"):
                build_parameters_tab(ctx)
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                build_model_tab(ctx, tabs)
            if _TRAINING_TAB.exists():
                from modules.ui.training_tab import build_training_tab

                with gr.Tab("Training", id="training", elem_id="tab-training"):
                    build_training_tab(ctx)
            with gr.Tab("Session", id="session", elem_id="tab-session"):
                build_session_tab(ctx)
            registry = services.extensions
            if registry is not None and any("ui" in e.hooks for e in registry.extensions.values()):
                with gr.Tab("Extensions", id="extensions", elem_id="tab-extensions"):  # their tabs and panels
                    registry.ui(services, {
                        "character": ctx.chat.components["character"], "mode": ctx.chat.components["mode"],
                        "chatbot": chat_view.chatbot, "chat_input": chat_view.message, "preset": ctx.preset,
                        "session": session})

        def start_session(stored: Any, request: gr.Request) -> list[Any]:
            """A new page: its session (the signed-in user's chats, or the browser's with --multi-user alone),
            and the UI defaults in force for new pages."""
            user, page = request.username, ctx.defaults.get()
            if settings.multi_user and user is not None:
                session_id, stored_id = new_session_id(), gr.skip()  # the chats follow the user, not the browser
            else:
                session_id = (valid_session_id(stored) if settings.multi_user else None) or new_session_id()
                stored_id = session_id
            page_session = UiSession.start(services, session_id, user=user, character=page.chat.character)
            return [page_session, stored_id, page.preset, *ctx.params.updates_for(page.params),
                    *ctx.chat.updates_for(page.chat)]

        started = app.load(start_session, browser_id,
                           [session, browser_id, ctx.preset, *ctx.params.inputs, *ctx.chat.inputs])
        for fn, inputs, outputs in ctx.session_listeners:
            started.then(fn, inputs, outputs)
        for fn, outputs in ctx.model_listeners:
            started.then(fn, None, outputs)
            for event in ctx.model_events:
                event.then(fn, None, outputs)
    return app


def _chat_panel(settings: Settings, chat: ChatSettings) -> FieldPanel:
    """ChatSettings widgets; the fields naming files get dropdowns of what the folders hold."""
    fields = ChatSettings.model_fields
    templates = [("The model's own", "")] + [(name, name) for name in list_templates(settings.template_dir)]
    overrides = {
        "mode": gr.Radio(choices=list(MODES), value=chat.mode, label="Mode", info=fields["mode"].description,
                         render=False, elem_id="chat-mode"),
        "character": gr.Dropdown(choices=list_characters(settings.character_dir), value=chat.character,
                                 label="Character", info=fields["character"].description, render=False,
                                 elem_id="chat-character"),
        "instruction_template": gr.Dropdown(choices=templates, value=chat.instruction_template,
                                            label="Instruction template",
                                            info=fields["instruction_template"].description, render=False,
                                            elem_id="chat-instruction-template"),
    }
    return FieldPanel(ChatSettings, chat, elem_prefix="chat-", overrides=overrides)


def _browser_secret(settings: Settings) -> str:
    """The key that encrypts the session id kept in each browser. Stored under user_data so that a browser
    finds its own chats again after a restart (--multi-user)."""
    if not settings.multi_user:
        return secrets.token_urlsafe(32)
    path = settings.user_data_dir / ".browser-session-key"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    key = secrets.token_urlsafe(32)
    atomic_write_text(path, key)
    path.chmod(0o600)
    return key


def auth_pairs(settings: Settings) -> list[tuple[str, str]]:
    """user:password pairs from --gradio-auth (comma-separated) and --gradio-auth-path (one or more per line)."""
    pairs: list[tuple[str, str]] = []
    if settings.gradio_auth:
        pairs += _parse_credentials(settings.gradio_auth, "--gradio-auth")
    if settings.gradio_auth_path:
        path = Path(settings.gradio_auth_path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"Cannot read the password file {path}: {exc.strerror}.") from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                pairs += _parse_credentials(line, f"{path}, line {number}")
    return pairs


def _parse_credentials(text: str, source: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"{source}: expected user:password, got {item.strip()!r}.")
        pairs.append((user, password))
    return pairs


def launch(services: Services) -> int:
    settings = services.settings
    try:
        auth = auth_pairs(settings)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = build_app(services)
    app.queue(default_concurrency_limit=8)
    # With passwords: wrong ones are slowed down, and a page's session answers only the user who opened it.
    middleware = [Middleware(LoginThrottleMiddleware), Middleware(SessionOwners)] if auth else []
    app.launch(server_name=settings.host, server_port=settings.listen_port, share=settings.share,
               auth=auth or None, auth_message=AUTH_MESSAGE if auth else None,
               app_kwargs={"middleware": middleware},
               prevent_thread_lock=True, quiet=True, ssr_mode=False, show_error=False,
               allowed_paths=[str(settings.character_dir)], css=_CSS,
               js=_DARK_JS if settings.dark_theme else None)
    print(f"Ready: http://{settings.host}:{settings.listen_port}", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        services.manager.stop_all()
        app.close()
    return 0
