"""Parameters tab: every GenerationParams knob (drawn from its fields), presets, and the context settings.

The knobs are created by app.py (unrendered, so every generating tab can read them) and placed here. Knobs the
loaded model's loader cannot honour are greyed out, with the reason as their info text.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules.generation_params import GenerationParams, honoured_knobs
from modules.presets import delete_preset, list_presets, load_preset, save_preset
from modules.ui.common import Confirm, UiContext, user_errors

#: Where each knob sits; a field not named here lands in "Other", so a new knob always appears.
GROUPS: dict[str, list[str]] = {
    "Basic": ["max_new_tokens", "do_sample", "temperature", "temperature_last", "top_p", "top_k", "min_p"],
    "Seed": ["seed"],
    "Penalties": ["repetition_penalty", "repetition_penalty_range", "encoder_repetition_penalty",
                  "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "dry_multiplier", "dry_base",
                  "dry_allowed_length", "dry_sequence_breakers"],
    "Advanced samplers": ["dynamic_temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent",
                          "smoothing_factor", "smoothing_curve", "typical_p", "tfs", "top_a", "top_n_sigma",
                          "epsilon_cutoff", "eta_cutoff", "xtc_threshold", "xtc_probability", "mirostat_mode",
                          "mirostat_tau", "mirostat_eta", "guidance_scale", "negative_prompt", "sampler_priority"],
    "Beam search and other decoding": ["num_beams", "length_penalty", "early_stopping", "penalty_alpha",
                                       "prompt_lookup_num_tokens"],
    "Grammar / JSON schema": ["grammar_string", "json_schema"],
    "Stop strings and tokens": ["stop", "ban_eos_token", "add_bos_token", "skip_special_tokens",
                                "custom_token_bans", "banned_strings", "logit_bias", "logprobs"],
}
#: ChatSettings fields shown here as "Context settings" (the rest are in the Chat tab).
CONTEXT_SETTINGS = ["truncation_length", "custom_stopping_strings", "instruction_template"]
_COLUMNS = (["Basic", "Seed"], ["Penalties", "Advanced samplers"],
            ["Beam search and other decoding", "Grammar / JSON schema", "Stop strings and tokens", "Other"])


def grouped(names: list[str]) -> dict[str, list[str]]:
    placed = {name for group in GROUPS.values() for name in group}
    groups = {title: [n for n in members if n in names] for title, members in GROUPS.items()}
    groups["Other"] = [n for n in names if n not in placed]
    return groups


def group_elem_id(title: str) -> str:
    return "params-" + "".join(c if c.isalnum() else "-" for c in title.lower())


def build_parameters_tab(ctx: UiContext) -> None:
    settings = ctx.services.settings
    groups = grouped(ctx.params.names)
    with gr.Row(equal_height=True):
        ctx.preset.render()
        refresh = gr.Button("Refresh", size="sm", scale=0, min_width=80, elem_id="preset-refresh")
        new_name = gr.Textbox(label="Save preset as", placeholder="name", scale=2, elem_id="preset-name")
        save = gr.Button("Save preset", size="sm", scale=1, elem_id="preset-save")
        with gr.Column(scale=1, min_width=120):
            delete = Confirm.build("Delete preset", elem_id="preset-delete")
    with gr.Row():
        for column in _COLUMNS:
            with gr.Column():
                for title in column:
                    if not groups.get(title):
                        continue
                    with gr.Accordion(title, open=title in ("Basic", "Seed", "Penalties"),
                                      elem_id=group_elem_id(title)):
                        ctx.params.render(groups[title])
                if column is _COLUMNS[-1]:
                    with gr.Accordion("Context settings", open=True):
                        ctx.chat.render(CONTEXT_SETTINGS)

    @user_errors
    def on_preset(name: str) -> list[Any]:
        params = load_preset(settings.preset_dir, name)  # names the bad key of a broken preset
        return ctx.params.updates_for(params)

    @user_errors
    def on_save(data: dict[Any, Any]) -> tuple[Any, str]:
        name = data[new_name].strip() or data[ctx.preset]
        path = save_preset(settings.preset_dir, name, ctx.read_params(data))
        gr.Info(f"Saved {path.name}.")
        return gr.update(choices=list_presets(settings.preset_dir), value=path.stem), ""

    @user_errors
    def on_delete(name: str) -> Any:
        delete_preset(settings.preset_dir, name)
        gr.Info(f"Deleted preset {name}.")
        names = list_presets(settings.preset_dir)
        return gr.update(choices=names, value=names[0] if names else None)

    ctx.preset.input(on_preset, ctx.preset, ctx.params.inputs)
    refresh.click(lambda: gr.update(choices=list_presets(settings.preset_dir)), None, ctx.preset, queue=False)
    save.click(on_save, {new_name, ctx.preset, *ctx.params.inputs}, [ctx.preset, new_name])
    delete.yes.click(on_delete, ctx.preset, ctx.preset)
    ctx.model_listeners.append((lambda: support_updates(ctx), ctx.params.inputs))


def support_updates(ctx: UiContext) -> list[Any]:
    """Grey out the knobs the loaded model's loader cannot honour, saying why in their info text."""
    model = ctx.services.manager.model
    honoured = honoured_knobs(model.supported_params) if model is not None else None
    updates = []
    for name in ctx.params.names:
        description = GenerationParams.model_fields[name].description or ""
        if honoured is None or name in honoured:
            updates.append(gr.update(interactive=True, info=description))
        else:
            updates.append(gr.update(interactive=False, info=f"Not supported by the {model.loader_name} "
                                                             f"loader: ignored. {description}"))
    return updates
