"""Default and Notebook tabs: raw completion, streaming, with Stop, token counts and a token view with
probabilities (when the loader gives them). Each tab has its own model and LoRA picker (modules.ui.model_picker)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from modules.ui.access import may_administer
from modules.ui.common import UiContext, session_of, stream_locked, user_errors, warn
from modules.ui.completion_runner import run_completion, token_heat, token_rows
from modules.ui.model_choice import find_resident
from modules.ui.model_picker import ModelPicker, build_model_picker, start_picker

_TOKEN_HEADERS = ["#", "token", "probability", "top alternatives"]


def _token_view(prefix: str) -> tuple[gr.Checkbox, gr.HighlightedText, gr.Dataframe]:
    show = gr.Checkbox(value=True, label="Report token probabilities", elem_id=f"{prefix}-probs")
    heat = gr.HighlightedText(label="Output tokens, coloured by probability", show_legend=False,
                              show_inline_category=False, elem_id=f"{prefix}-heat")
    table = gr.Dataframe(headers=_TOKEN_HEADERS, label="Tokens", interactive=False, wrap=True,
                         elem_id=f"{prefix}-tokens", max_height=400)
    return show, heat, table


def _count(ctx: UiContext, text: gr.Textbox, picker: ModelPicker):
    """Count the text's tokens with the picked model's tokenizer (a model that is not loaded is not loaded for
    this)."""
    @user_errors
    def count(data: dict[Any, Any]) -> str:
        session = session_of(data[ctx.session])
        may_load = may_administer(ctx.services.settings, session.user)
        resident = find_resident(ctx.services.manager, picker.read(data).model, may_load=may_load)
        if resident is None:
            return "That model is not loaded yet: it loads when you generate."
        model = resident.model
        return f"{model.token_count(data[text] or '')} tokens of a {model.context_length}-token context."
    return count


def build_default_tab(ctx: UiContext) -> None:
    picker = build_model_picker(ctx, "default", what="this tab", one_row=True)
    with gr.Row():
        with gr.Column():
            # A document, not a message: Enter breaks the line; Shift+Enter (Gradio's submit in a box of several
            # lines) generates.
            prompt = gr.Textbox(label="Input (Shift+Enter: generate)", lines=18, max_lines=40,
                                elem_id="default-input", value="Once upon a time,")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="default-generate")
                continue_ = gr.Button("Continue", elem_id="default-continue")
                stop = gr.Button("Stop", variant="stop", elem_id="default-stop")
                count = gr.Button("Count tokens", elem_id="default-count")
            status = gr.Markdown(elem_id="default-status")
        with gr.Column():
            with gr.Tabs():
                with gr.Tab("Output"):
                    output = gr.Textbox(label="Output", lines=18, max_lines=40, elem_id="default-output",
                                        buttons=["copy"])
                with gr.Tab("Tokens"):
                    show, heat, table = _token_view("default")
    inputs = {ctx.session, prompt, output, show, *ctx.params.inputs, *picker.inputs}

    def run(keep_output: bool):
        @user_errors
        def handler(data: dict[Any, Any]) -> Iterator[tuple[str, str, Any, Any]]:
            session = session_of(data[ctx.session])
            before = data[output] if keep_output else ""
            for update in run_completion(ctx.services, session, data[prompt] + before, ctx.read_params(data),
                                         with_probabilities=data[show], choice=picker.read(data)):
                warn(update.warnings)
                tokens = (token_heat(update.tokens), token_rows(update.tokens)) if update.done else (
                    gr.skip(), gr.skip())
                yield before + update.text, update.status, *tokens
        handler.__name__ = "default_continue" if keep_output else "default_generate"
        return handler

    stream_locked(generate.click, run(False), inputs, [output, status, heat, table], [generate, continue_])
    stream_locked(continue_.click, run(True), inputs, [output, status, heat, table], [generate, continue_])
    stream_locked(prompt.submit, run(False), inputs, [output, status, heat, table], [generate, continue_])
    stop.click(lambda session: session.stop() if session else None, ctx.session, None, queue=False)
    count.click(_count(ctx, prompt, picker), {ctx.session, prompt, *picker.inputs}, status)
    start_picker(ctx, picker)


def build_notebook_tab(ctx: UiContext) -> None:
    picker = build_model_picker(ctx, "notebook", what="this tab", one_row=True)
    text = gr.Textbox(label="Notebook: the model continues this text (Enter: new line; Shift+Enter: generate)",
                      lines=22, max_lines=60,
                      elem_id="notebook-text", value="The three most important inventions in history are",
                      buttons=["copy"])
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="notebook-generate")
        stop = gr.Button("Stop", variant="stop", elem_id="notebook-stop")
        undo = gr.Button("Undo", elem_id="notebook-undo")
        count = gr.Button("Count tokens", elem_id="notebook-count")
    status = gr.Markdown(elem_id="notebook-status")
    with gr.Accordion("Tokens", open=False):
        show, heat, table = _token_view("notebook")

    @user_errors
    def on_generate(data: dict[Any, Any]) -> Iterator[tuple[str, str, Any, Any]]:
        session = session_of(data[ctx.session])
        before = data[text]
        session.notebook_undo.append(before)
        for update in run_completion(ctx.services, session, before, ctx.read_params(data),
                                     with_probabilities=data[show], choice=picker.read(data)):
            warn(update.warnings)
            tokens = (token_heat(update.tokens), token_rows(update.tokens)) if update.done else (
                gr.skip(), gr.skip())
            yield before + update.text, update.status, *tokens

    @user_errors
    def on_undo(session: Any) -> Any:
        session = session_of(session)
        return session.notebook_undo.pop() if session.notebook_undo else gr.skip()

    for trigger in (generate.click, text.submit):
        stream_locked(trigger, on_generate, {ctx.session, text, show, *ctx.params.inputs, *picker.inputs},
                      [text, status, heat, table], [generate])
    stop.click(lambda session: session.stop() if session else None, ctx.session, None, queue=False)
    undo.click(on_undo, ctx.session, text)
    count.click(_count(ctx, text, picker), {ctx.session, text, *picker.inputs}, status)
    start_picker(ctx, picker)
