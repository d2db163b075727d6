"""What every tab shares: the UI context handed to each tab builder, and how core errors reach the page."""
from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from pydantic import ValidationError

from modules.errors import ConfigError, WorkbenchError
from modules.generation_params import GenerationParams
from modules.presets import params_from_mapping
from modules.services import Services
from modules.settings import ChatSettings, describe_validation_error
from modules.ui.page_defaults import NewPageDefaults
from modules.ui.session_state import UiSession
from modules.ui.widgets import FieldPanel

log = logging.getLogger(__name__)


@dataclass
class UiContext:
    """Built once in app.py and passed to every tab: the services, the per-browser session state, and the
    widgets several tabs read (generation parameters, chat settings)."""

    services: Services
    session: gr.State  # holds a modules.ui.session_state.UiSession per browser session
    params: FieldPanel  # GenerationParams widgets, placed in the Parameters tab
    preset: gr.Dropdown
    chat: FieldPanel  # ChatSettings widgets, placed in the Chat and Parameters tabs
    defaults: NewPageDefaults  # what a page opened from now on starts with ("Save UI defaults" replaces it)
    #: Events that change the loaded model (Model tab) and what to refresh after them, as (fn, outputs):
    #: app.py chains every listener after every such event, and runs them on page load.
    model_events: list[Any] = field(default_factory=list)
    model_listeners: list[tuple[Callable[[], Any], list[Any]]] = field(default_factory=list)
    #: Run once a page's session exists (after page load), as (fn(data), inputs as a set, outputs).
    session_listeners: list[tuple[Callable[[dict[Any, Any]], Any], set[Any], list[Any]]] = field(
        default_factory=list)

    def read_params(self, data: dict[Any, Any]) -> GenerationParams:
        """GenerationParams from a handler's input dict (inputs given as a set), bad values named."""
        values = self.params.mapping([data[c] for c in self.params.inputs])
        return params_from_mapping(values, "Parameters")

    def read_chat(self, data: dict[Any, Any]) -> ChatSettings:
        values = self.chat.mapping([data[c] for c in self.chat.inputs])
        try:
            return ChatSettings(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "Chat settings")) from None

    @property
    def generation_inputs(self) -> set[Any]:
        return {self.session, *self.params.inputs, *self.chat.inputs}


def session_of(session: UiSession | None) -> UiSession:
    """The page's session, which exists once the page has loaded."""
    if session is None:
        raise ConfigError("This page is still starting; try again in a moment (or reload it).")
    return session


def error_text(exc: Exception) -> str:
    return html.escape(str(exc))


def warn(messages: list[str] | tuple[str, ...]) -> None:
    for message in messages:
        if message:
            gr.Warning(html.escape(message))


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show a WorkbenchError's message in the page as an error toast (never a traceback). Other exceptions are
    bugs: logged with their traceback, shown as a short generic error."""

    def fail(exc: Exception) -> gr.Error:
        if isinstance(exc, WorkbenchError):
            return gr.Error(error_text(exc), print_exception=False)
        log.exception("UI handler %s failed", fn.__name__)
        return gr.Error(f"Internal error ({type(exc).__name__}); see the server log.", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise fail(exc) from None
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise fail(exc) from None
    return call


def stream_locked(trigger: Callable[..., Any], fn: Callable[..., Any], inputs: Any, outputs: list[Any],
                  lock: list[gr.Button]) -> Any:
    """Wire a streaming handler so that the `lock` buttons are disabled while it runs (one generation per page)
    and enabled again afterwards, even when it fails. Gradio's progress animation is left out: the streaming
    text is the progress, and the animation costs the browser a good share of a CPU core."""
    def locked(*args: Any) -> Any:
        first = True
        for update in fn(*args):
            state = [gr.update(interactive=False) if first else gr.skip() for _ in lock]
            first = False
            yield (*update, *state)
    locked.__name__ = fn.__name__
    event = trigger(locked, inputs, [*outputs, *lock], show_progress="hidden")
    unlocked = [gr.update(interactive=True) for _ in lock]
    event.then(lambda: unlocked if len(lock) > 1 else unlocked[0], None, lock, queue=False)
    return event


@dataclass
class Confirm:
    """A destructive button guarded by a second click: `ask` reveals `yes`/`no`; wire your action to `yes`."""

    ask: gr.Button
    yes: gr.Button
    no: gr.Button

    @classmethod
    def build(cls, label: str, *, elem_id: str) -> "Confirm":
        ask = gr.Button(label, variant="stop", size="sm", elem_id=elem_id)
        with gr.Row():
            yes = gr.Button(f"Yes, {label.lower()}", variant="stop", size="sm", visible=False,
                            elem_id=f"{elem_id}-yes")
            no = gr.Button("Cancel", size="sm", visible=False, elem_id=f"{elem_id}-no")
        show = lambda: (gr.update(visible=False), gr.update(visible=True), gr.update(visible=True))  # noqa: E731
        hide = lambda: (gr.update(visible=True), gr.update(visible=False), gr.update(visible=False))  # noqa: E731
        ask.click(show, None, [ask, yes, no], queue=False)
        no.click(hide, None, [ask, yes, no], queue=False)
        yes.click(hide, None, [ask, yes, no], queue=False)
        return cls(ask, yes, no)
