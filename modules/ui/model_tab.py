"""Model tab: pick, load, unload and reload a model with its loader's options (drawn from the loader's typed
Options), apply LoRAs, download from the hub, and see what is loaded. With --multi-user everything that changes the
shared model or the models folder is the operator's (modules.ui.operator); every page keeps the list of models and
what is loaded, so that its user knows what answers them."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

import download_model
from loaders.base import ModelInfo
from modules.errors import WorkbenchError
from modules.ui.access import refuse_unless_admin
from modules.ui.common import UiContext, error_text, user_errors
from modules.ui.operator import operator_only
from modules.ui.widgets import FieldPanel


def info_markdown(info: ModelInfo | None) -> str:
    if info is None:
        return "### No model loaded\nPick one on the left and press **Load**."
    rows = [("Model", info.name), ("Loader", info.loader), ("Context length", f"{info.context_length:,} tokens"),
            ("Dtype / quantization", info.dtype), ("Device", info.device),
            ("Memory used", f"{info.memory_bytes / 2**20:,.0f} MiB"),
            ("LoRAs", ", ".join(info.loras) or "none"), ("Capabilities", ", ".join(info.capabilities) or "—")]
    return "### Loaded\n" + "\n".join(f"- **{k}:** {v}" for k, v in rows)


def build_model_tab(ctx: UiContext) -> None:
    manager = ctx.services.manager
    settings = ctx.services.settings
    loaded = manager.info()
    names = manager.list_models()
    first = loaded.name if loaded else (names[0] if names else None)
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                model = gr.Dropdown(choices=names, value=first, label="Model", scale=4, elem_id="model-select",
                                    info="GGUF files and model folders in the models folder.")
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=80, elem_id="model-refresh")
                loader = gr.Dropdown(choices=manager.registry.names, value=_detect(ctx, first), label="Loader",
                                     scale=2, elem_id="loader-select", info="Preselected from what the path holds.")
            panels: dict[str, FieldPanel] = {}
            groups: dict[str, gr.Group] = {}
            with gr.Column(elem_id="model-controls") as controls:
                for name in manager.registry.names:
                    options_type = manager.registry.get(name).Options
                    values = {k: v for k, v in manager.loader_options.items() if k in options_type.model_fields}
                    with gr.Accordion(f"{name} options", open=True, visible=name == loader.value) as group:
                        panel = FieldPanel(options_type, values, elem_prefix=f"opt-{name.replace('.', '')}-")
                        with gr.Row():
                            for column in _halves(panel.names):
                                with gr.Column():
                                    panel.render(column)
                    panels[name], groups[name] = panel, group
                with gr.Row():
                    load = gr.Button("Load", variant="primary", elem_id="model-load")
                    unload = gr.Button("Unload", elem_id="model-unload")
                    reload = gr.Button("Reload", elem_id="model-reload")
                status = gr.Markdown(elem_id="model-status")
        with gr.Column(scale=2):
            info = gr.Markdown(info_markdown(loaded), elem_id="model-info")
            with gr.Accordion("LoRA adapters", open=True) as lora_controls:
                with gr.Row(equal_height=True):
                    loras = gr.Dropdown(choices=manager.list_loras(), value=loaded.loras if loaded else [],
                                        multiselect=True, label="LoRAs (from the loras folder)", scale=4,
                                        elem_id="lora-select")
                    lora_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=80)
                with gr.Row():
                    apply = gr.Button("Apply LoRAs", size="sm", elem_id="lora-apply")
                    remove = gr.Button("Remove LoRAs", size="sm", elem_id="lora-remove")
            with gr.Accordion("Download from the Hugging Face hub", open=False) as download_controls:
                repo = gr.Textbox(label="Repository", placeholder="ORG/NAME (or ORG/NAME:branch)",
                                  elem_id="download-repo")
                pattern = gr.Textbox(label="File pattern (optional)", placeholder="*Q4_K_M.gguf",
                                     elem_id="download-pattern")
                fetch = gr.Button("Download", size="sm", elem_id="download-start")
                fetch_status = gr.Markdown(elem_id="download-status")

    all_options = [c for panel in panels.values() for c in panel.inputs]

    def options_of(data: dict[Any, Any]) -> dict[str, Any]:
        panel = panels[data[loader]]
        return panel.mapping([data[c] for c in panel.inputs])

    def do_load(name: str | None, loader_name: str | None, options: dict[str, Any]) -> Iterator[tuple[str, str]]:
        if not name:
            yield "**Error:** pick a model first.", info_markdown(manager.info())
            return
        yield f"Loading **{name}** with {loader_name}…", info_markdown(manager.info())
        try:
            result = manager.load(name, loader_name, options, cancel_running=True)
        except WorkbenchError as exc:
            gr.Warning(error_text(exc))
            yield f"**Error:** {error_text(exc)}", info_markdown(manager.info())
            return
        notes = "".join(f"\n\n**Warning:** {error_text(Exception(w))}" for w in result.warnings)
        yield f"Loaded **{name}** in {result.seconds:.1f} s.{notes}", info_markdown(result.info)

    @user_errors
    def on_load(data: dict[Any, Any], request: gr.Request) -> Iterator[tuple[str, str]]:
        refuse_unless_admin(settings, request.username, "Loading a model")
        try:
            options = options_of(data)
        except WorkbenchError as exc:
            yield f"**Error:** {error_text(exc)}", info_markdown(manager.info())
            return
        yield from do_load(data[model], data[loader], options)

    @user_errors
    def on_reload(data: dict[Any, Any], request: gr.Request) -> Iterator[tuple[str, str]]:
        refuse_unless_admin(settings, request.username, "Reloading the model")
        current = manager.model
        if current is None:
            yield "**Error:** no model is loaded to reload.", info_markdown(None)
            return
        root = Path(os.path.abspath(manager.model_dir))
        name = current.path.relative_to(root).as_posix() if current.path.is_relative_to(root) else current.name
        options = options_of(data) if data[loader] == current.loader_name else {}
        yield from do_load(name, current.loader_name, options)

    @user_errors
    def on_unload(request: gr.Request) -> tuple[str, str]:
        refuse_unless_admin(settings, request.username, "Unloading the model")
        manager.unload(cancel_running=True)
        return "Unloaded.", info_markdown(None)

    def on_pick(name: str | None) -> list[Any]:
        chosen = _detect(ctx, name)
        return [gr.update(value=chosen)] + [gr.update(visible=n == chosen) for n in groups]

    @user_errors
    def on_apply(names: list[str], request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Applying LoRAs")
        return info_markdown(manager.apply_loras(names or []))

    @user_errors
    def on_remove(request: gr.Request) -> tuple[str, list[str]]:
        refuse_unless_admin(settings, request.username, "Removing LoRAs")
        return info_markdown(manager.remove_loras()), []

    @user_errors
    def on_fetch(repo_id: str, include: str, request: gr.Request,
                 progress: gr.Progress = gr.Progress(track_tqdm=True)) -> Iterator[tuple[str, Any]]:
        refuse_unless_admin(settings, request.username, "Downloading a model")
        try:
            plan = download_model.plan(repo_id, model_dir=settings.model_dir,
                                       include=[include.strip()] if include.strip() else None)
            yield f"Downloading {plan.repo_id} into {plan.target}…", gr.skip()
            started = time.perf_counter()
            target = download_model.download(plan)
        except WorkbenchError as exc:
            yield f"**Error:** {error_text(exc)}", gr.skip()
            return
        yield (f"Downloaded to {target} in {time.perf_counter() - started:.0f} s.",
               gr.update(choices=manager.list_models()))

    loading = load.click(on_load, {model, loader, *all_options}, [status, info], concurrency_limit=1,
                         api_name="load_model")
    reloading = reload.click(on_reload, {loader, *all_options}, [status, info], concurrency_limit=1,
                             api_name="reload_model")
    unloading = unload.click(on_unload, None, [status, info], api_name="unload_model")
    ctx.model_events.extend([loading, reloading, unloading])
    model.input(on_pick, model, [loader, *groups.values()])
    loader.input(lambda chosen: [gr.update(visible=n == chosen) for n in groups], loader, list(groups.values()))
    refresh.click(lambda: gr.update(choices=manager.list_models()), None, model, queue=False)
    lora_refresh.click(lambda: gr.update(choices=manager.list_loras()), None, loras, queue=False)
    apply.click(on_apply, loras, info, api_name="apply_loras")
    remove.click(on_remove, None, [info, loras], api_name="remove_loras")
    fetch.click(on_fetch, [repo, pattern], [fetch_status, model], api_name="download_model")
    operator_only(ctx, loader, controls, lora_controls, download_controls)
    ctx.model_listeners.append((lambda: info_markdown(manager.info()), [info]))


def _detect(ctx: UiContext, name: str | None) -> str | None:
    manager = ctx.services.manager
    loaded = manager.model
    if name is None:
        return manager.registry.names[0] if manager.registry.names else None
    if loaded is not None and loaded.name == name:
        return loaded.loader_name
    try:
        return manager.registry.detect(manager.model_path(name)).name
    except WorkbenchError:
        return manager.registry.names[0]


def _halves(names: list[str]) -> list[list[str]]:
    middle = (len(names) + 1) // 2
    return [names[:middle], names[middle:]]
