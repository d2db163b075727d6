"""The model and LoRA pickers of the Chat, Default and Notebook tabs: widgets over modules.ui.model_choice.

Each page's pickers hold that page's choice (Gradio keeps a component's value per page); the lists are re-read
when a picker is opened, since models load and unload while a page is open.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.ui.access import may_administer
from modules.ui.common import UiContext
from modules.ui.model_choice import ModelChoice, default_model, model_choices
from modules.ui.session_state import UiSession


@dataclass
class ModelPicker:
    model: gr.Dropdown
    loras: gr.Dropdown
    scale: gr.Number

    @property
    def inputs(self) -> list[Any]:
        return [self.model, self.loras, self.scale]

    def read(self, data: dict[Any, Any]) -> ModelChoice:
        """The page's choice from a handler's input dict (inputs given as a set)."""
        scale = data[self.scale]
        return ModelChoice(data[self.model] or None, tuple(data[self.loras] or ()),
                           float(scale) if scale is not None else 1.0)


def build_model_picker(ctx: UiContext, prefix: str, *, what: str, one_row: bool = False) -> ModelPicker:
    """The pickers, drawn where this is called (side by side with `one_row`, else the model above the LoRAs);
    `what` says what the model answers ("this chat")."""
    manager = ctx.services.manager
    with gr.Row(equal_height=True) if one_row else nullcontext():
        model = gr.Dropdown(choices=[], value=None, label="Model", elem_id=f"{prefix}-model", scale=2,
                            info=f"The model that answers {what}. Models not loaded are listed for the operator, "
                                 "and load when used.")
        with gr.Row(equal_height=True, scale=3) if one_row else gr.Row(equal_height=True):
            loras = gr.Dropdown(choices=manager.list_loras(), value=[], multiselect=True, label="LoRAs", scale=3,
                                elem_id=f"{prefix}-loras", info="From loras/; none: the model's own.")
            scale = gr.Number(value=1.0, minimum=-4.0, maximum=4.0, step=0.05, label="Scale", scale=1,
                              min_width=90, elem_id=f"{prefix}-lora-scale", info="Of each LoRA.")
    picker = ModelPicker(model, loras, scale)
    model.focus(lambda data: gr.update(choices=current_choices(ctx, data[ctx.session], data[model])),
                {ctx.session, model}, model, show_progress="hidden", queue=False)
    loras.focus(lambda chosen: gr.update(choices=lora_choices(ctx, chosen)), loras, loras,
                show_progress="hidden", queue=False)
    return picker


def current_choices(ctx: UiContext, session: UiSession | None, value: str | None) -> list[tuple[str, str]]:
    """The models this page may pick now, `value` (its pick) among them."""
    may_load = may_administer(ctx.services.settings, session.user if session is not None else None)
    return model_choices(ctx.services.manager, may_load=may_load, keep=value)


def refreshed(ctx: UiContext, session: UiSession | None, value: str | None) -> Any:
    """The model picker showing `value`, with the choices as they are now for this page."""
    return gr.update(choices=current_choices(ctx, session, value), value=value)


def lora_choices(ctx: UiContext, chosen: list[str] | None) -> list[str]:
    """The LoRAs of loras/, and those picked that are gone (a turn with them then says so)."""
    names = ctx.services.manager.list_loras()
    return names + [name for name in chosen or [] if name not in names]


def picker_updates(ctx: UiContext, session: UiSession | None, choice: ModelChoice | None) -> list[Any]:
    """Updates that show `choice` (None: the default model, no LoRAs) in the pickers."""
    if choice is None:
        choice = ModelChoice(default_model(ctx.services.manager))
    return [refreshed(ctx, session, choice.model),
            gr.update(choices=lora_choices(ctx, list(choice.loras)), value=list(choice.loras)),
            gr.update(value=choice.lora_scale)]


def start_picker(ctx: UiContext, picker: ModelPicker) -> None:
    """Fill a picker when its page starts: the default model, no LoRAs."""
    ctx.session_listeners.append((lambda data: picker_updates(ctx, data[ctx.session], None), {ctx.session},
                                  picker.inputs))
