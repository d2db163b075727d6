"""Model tab: pick, load, unload and reload a model with its loader's options (drawn from the loader's typed
Options), save them as that model's settings in user_data/models.yaml (modules.model_settings), apply LoRAs,
download from the hub, quantize or convert a model and compare models (modules.ui.quantize_panel,
compare_panel), and see what is loaded: the default model, and every resident model with its slots, queue
and memory. With --multi-user everything that changes the shared models, the models folder or models.yaml is the
operator's (modules.ui.operator); every page keeps the list of models and what is resident, so that its user knows
what answers them."""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

import download_model
from loaders.base import ModelInfo
from modules.chat.templates import list_templates
from modules.errors import WorkbenchError
from modules.model_settings import ModelSpec, is_jinja
from modules.presets import list_presets
from modules.serving.residents import Resident
from modules.ui.access import may_administer, refuse_unless_admin
from modules.ui.common import UiContext, error_text, user_errors
from modules.ui.compare_panel import build_compare_panel
from modules.ui.operator import operator_only
from modules.ui.quantize_panel import build_quantize_panel
from modules.ui.widgets import FieldPanel

#: Seconds between refreshes of the resident models while the Model tab is open.
RESIDENTS_REFRESH_S = 2.0


def info_markdown(info: ModelInfo | None) -> str:
    if info is None:
        return "### No model loaded\nPick one on the left and press **Load**."
    rows = [("Model", info.name), ("Loader", info.loader), ("Context length", f"{info.context_length:,} tokens"),
            ("Dtype / quantization", info.dtype), ("Device", info.device),
            ("Memory used", f"{info.memory_bytes / 2**20:,.0f} MiB"),
            ("LoRAs", ", ".join(info.loras) or "none"), ("Capabilities", ", ".join(info.capabilities) or "—")]
    return "### Loaded\n" + "\n".join(f"- **{k}:** {v}" for k, v in rows)


def resident_rows(residents: list[Resident]) -> list[dict[str, Any]]:
    """What the list of resident models shows of each (plain values, so that a change is seen by comparing)."""
    rows = []
    for resident in residents:
        info = resident.model.info()
        rows.append({"name": resident.name, "loader": info.loader, "busy": resident.engine.busy_slots,
                     "slots": resident.engine.slots, "waiting": resident.engine.waiting,
                     "memory_mib": round(info.memory_bytes / 2**20)})
    return rows


def resident_text(row: dict[str, Any], default: str | None) -> str:
    tag = " (default)" if row["name"] == default else ""
    return (f"**{row['name']}**{tag} · {row['loader']} · slots {row['busy']} of {row['slots']} in use · "
            f"{row['waiting']} waiting · {row['memory_mib']:,} MiB")


def slots_help(ctx: UiContext) -> str:
    """What a slot is, in the words of the loaders' own `parallel` option (one home for what it holds)."""
    manager, settings = ctx.services.manager, ctx.services.settings
    described = []
    for name in manager.registry.names:
        try:
            field = manager.registry.get(name).Options.model_fields.get("parallel")
        except WorkbenchError:
            continue
        if field is not None and field.description:
            described.append(f"{name}: {field.description}")
    limit = f"at most {settings.max_models}" if settings.max_models else "no limit"
    text = (f"**Resident models** ({limit}; `--max-models`). A slot is one request a model decodes at a time; "
            f"`--parallel N` gives each model N slots, and requests beyond them wait in its queue "
            f"(at most {settings.max_queue or 'unlimited'}, `--max-queue`).")
    return text + "".join(f"\n\n- {line}" for line in described)


def spec_note(spec: ModelSpec, path: Path) -> str:
    """Which entries of models.yaml apply to a model, for the line under its settings."""
    if not spec.entries:
        return f"No entry in {path.name} applies to **{spec.name}**: it loads with the settings' defaults."
    note = f"From {path.name}: {', '.join(f'`{e}`' for e in spec.entries)}."
    if spec.template is not None and is_jinja(spec.template):
        note += " Its template is Jinja text written in the file (saving keeps it unless you pick one)."
    return note


def build_model_tab(ctx: UiContext, tabs: gr.Tabs | None = None) -> None:
    services = ctx.services
    manager = services.manager
    settings = services.settings
    loaded = manager.info()
    names = manager.list_models()
    first = manager.resident().name if manager.resident() is not None else (names[0] if names else None)
    first_plan = _plan(ctx, first)

    def current_rows() -> list[dict[str, Any]]:
        return resident_rows(manager.pool.all())

    def unloader(name: str) -> Callable[..., tuple[Any, str]]:
        @user_errors
        def on_unload_resident(request: gr.Request) -> tuple[Any, str]:
            refuse_unless_admin(settings, request.username, "Unloading a model")
            manager.unload(name, cancel_running=True)
            return current_rows(), info_markdown(manager.info())
        return on_unload_resident

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                model = gr.Dropdown(choices=names, value=first, label="Model", scale=4, elem_id="model-select",
                                    info="GGUF files and model folders in the models folder, and the remote "
                                         "engines models.yaml names.")
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=80, elem_id="model-refresh")
                loader = gr.Dropdown(choices=manager.registry.names,
                                     value=first_plan.loader.name if first_plan else _detect(ctx, first),
                                     label="Loader", scale=2, elem_id="loader-select",
                                     info="Preselected from models.yaml, else from what the path holds.")
            panels: dict[str, FieldPanel] = {}
            groups: dict[str, gr.Group] = {}
            with gr.Column(elem_id="model-controls") as controls:
                for name in manager.registry.names:
                    options_type = manager.registry.get(name).Options
                    values = {k: v for k, v in manager.loader_options.items() if k in options_type.model_fields}
                    if first_plan is not None and first_plan.loader.name == name:
                        values = first_plan.options.model_dump()
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
                with gr.Accordion("Settings for this model (models.yaml)", open=True):
                    first_spec = first_plan.spec if first_plan else None
                    with gr.Row():
                        preset_box = gr.Dropdown(
                            choices=[("(the settings' preset)", "")] + list_presets(settings.preset_dir),
                            value=(first_spec.preset or "") if first_spec else "", label="Preset", scale=2,
                            elem_id="model-preset", info="Requests to this model start from it.")
                        template_box = gr.Dropdown(
                            choices=[("(the model's own)", "")] + list_templates(settings.template_dir),
                            value=_template_choice(first_spec), label="Chat template", scale=2,
                            elem_id="model-template", info="From instruction-templates/.")
                        aliases_box = gr.Textbox(value=", ".join(first_spec.aliases) if first_spec else "",
                                                 label="Aliases", scale=2, elem_id="model-aliases",
                                                 info="Other names requests may use, comma-separated.")
                    save = gr.Button("Save settings for this model", size="sm", elem_id="model-save-settings")
                    settings_note = gr.Markdown(_note(ctx, first_spec), elem_id="model-settings-note")
                status = gr.Markdown(elem_id="model-status")
        with gr.Column(scale=2):
            info = gr.Markdown(info_markdown(loaded), elem_id="model-info")
            with gr.Group(elem_id="residents"):
                gr.Markdown(slots_help(ctx), elem_id="residents-help")
                rows = gr.State(resident_rows(manager.pool.all()))
                timer = gr.Timer(RESIDENTS_REFRESH_S, active=False)

                @gr.render(inputs=[rows, ctx.session], triggers=[rows.change])
                def draw_residents(current: list[dict[str, Any]], session: Any) -> None:
                    admin = may_administer(settings, session.user if session is not None else None)
                    if not current:
                        gr.Markdown("No model is resident.", elem_id="residents-none", key="residents-none")
                    default = manager.resident().name if manager.resident() is not None else None
                    for row in current:
                        with gr.Row(equal_height=True, elem_classes=["resident-row"], key=f"row-{row['name']}"):
                            gr.Markdown(resident_text(row, default), elem_classes=["resident-text"],
                                        key=f"text-{row['name']}")
                            if admin:
                                button = gr.Button("Unload", size="sm", scale=0, min_width=90,
                                                   elem_classes=["resident-unload"], key=f"unload-{row['name']}")
                                button.click(unloader(row["name"]), None, [rows, info], concurrency_limit=1)

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
    build_quantize_panel(ctx, model)
    build_compare_panel(ctx)

    all_options = [c for panel in panels.values() for c in panel.inputs]
    form = [loader, *groups.values(), *all_options, preset_box, template_box, aliases_box, settings_note]
    tab_defaults = [ctx.preset, *ctx.params.inputs, ctx.chat.components["instruction_template"]]

    def form_for(name: str | None, loader_name: str | None = None) -> list[Any]:
        """The form's values for `name`: the loader and options a load would use, and its models.yaml entry."""
        try:
            plan = manager.plan(name, loader_name) if name else None
        except WorkbenchError as exc:
            chosen = loader_name or _detect(ctx, name)
            return [gr.update(value=chosen), *[gr.update(visible=n == chosen) for n in groups],
                    *[gr.skip() for _ in all_options], gr.skip(), gr.skip(), gr.skip(),
                    f"**Error:** {error_text(exc)}"]
        if plan is None:
            return [gr.skip() for _ in form]
        chosen = plan.loader.name
        values: list[Any] = []
        for panel_name, panel in panels.items():
            values += panel.updates_for(plan.options) if panel_name == chosen else [gr.skip() for _ in panel.inputs]
        spec = plan.spec
        return [gr.update(value=chosen), *[gr.update(visible=n == chosen) for n in groups], *values,
                spec.preset or "", _template_choice(spec), ", ".join(spec.aliases), _note(ctx, spec)]

    def page_form(data: dict[Any, Any]) -> list[Any]:
        """A new page shows the default model (it may have changed since the app was built) and its settings."""
        current = manager.resident()
        choice = current.name if current is not None else first
        return [gr.update(choices=manager.list_models(), value=choice), *form_for(choice)]

    def model_defaults(data: dict[Any, Any] | None = None) -> list[Any]:
        """The default model's preset and template from models.yaml become the tabs' (where the file gives them)."""
        skip = [gr.skip() for _ in tab_defaults]
        current = manager.resident()
        if current is None:
            return skip
        try:
            spec = services.model_spec(current.name)
            preset = services.model_preset(current.name)
            params = services.default_params(current.name) if preset is not None else None
        except WorkbenchError as exc:
            gr.Warning(error_text(exc))
            return skip
        updates = skip[:-1] if params is None else [preset, *ctx.params.updates_for(params)]
        return [*updates, _template_choice(spec) if spec is not None and spec.template else gr.skip()]

    @user_errors
    def on_save(data: dict[Any, Any], request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Saving model settings")
        name = data[model]
        if not name:
            return "**Error:** pick a model first."
        try:
            aliases = [a.strip() for a in re.split(r"[,\n]", data[aliases_box] or "") if a.strip()]
            services.save_model_settings(name, data[loader], options_of(data), preset=data[preset_box] or None,
                                         template=data[template_box] or None, aliases=aliases)
            spec = manager.plan(name, data[loader]).spec
        except WorkbenchError as exc:
            return f"**Error:** {error_text(exc)}"
        path = services.model_settings.path if services.model_settings else "models.yaml"
        return (f"Saved the settings of **{spec.name}** to {path} (the file's other entries and comments are kept). "
                f"They apply from its next load. {_note(ctx, spec)}")

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
        current = manager.resident()
        if current is None:
            yield "**Error:** no model is loaded to reload.", info_markdown(None)
            return
        loader_name = current.model.loader_name
        options = options_of(data) if data[loader] == loader_name else {}
        yield from do_load(current.name, loader_name, options)

    @user_errors
    def on_unload(request: gr.Request) -> tuple[str, str]:
        refuse_unless_admin(settings, request.username, "Unloading the model")
        manager.unload(cancel_running=True)
        return "Unloaded.", info_markdown(None)

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
    for event in (loading, reloading):
        event.then(model_defaults, None, tab_defaults)
    model.input(form_for, model, form)
    loader.input(form_for, [model, loader], form)
    save.click(on_save, {model, loader, preset_box, template_box, aliases_box, *all_options}, settings_note,
               api_name="save_model_settings")
    # the list and the default model; queued (a State changed by an unqueued event does not re-render), and
    # never behind generations. While a load runs its own event writes the info box: a tick's read of the state
    # before it could land after the load's last update and show the old model under "Loaded …"
    timer.tick(lambda: (current_rows(), gr.skip() if manager.loading is not None else info_markdown(manager.info())),
               None, [rows, info], show_progress="hidden", concurrency_limit=None)
    if tabs is not None:  # the timer runs while the Model tab is open
        def follow_tab(event: gr.SelectData) -> Any:
            return gr.Timer(active=_is_model_tab(event))

        tabs.select(follow_tab, None, timer, show_progress="hidden", queue=False)
    refresh.click(lambda: gr.update(choices=manager.list_models()), None, model, queue=False)
    lora_refresh.click(lambda: gr.update(choices=manager.list_loras()), None, loras, queue=False)
    apply.click(on_apply, loras, info, api_name="apply_loras")
    remove.click(on_remove, None, [info, loras], api_name="remove_loras")
    fetch.click(on_fetch, [repo, pattern], [fetch_status, model], api_name="download_model")
    operator_only(ctx, loader, controls, lora_controls, download_controls)
    ctx.model_listeners.append((lambda: info_markdown(manager.info()), [info]))
    ctx.model_listeners.append((current_rows, [rows]))
    ctx.session_listeners.append((page_form, {ctx.session}, [model, *form]))
    ctx.session_listeners.append((model_defaults, {ctx.session}, tab_defaults))


def _plan(ctx: UiContext, name: str | None) -> Any:
    """How `name` would load (see ModelManager.plan), or None when it cannot (the form then shows defaults)."""
    if not name:
        return None
    try:
        return ctx.services.manager.plan(name)
    except WorkbenchError:
        return None


def _template_choice(spec: ModelSpec | None) -> str:
    """The template dropdown's value for a spec: its template's name; "" (the model's own) for none or Jinja."""
    if spec is None or spec.template is None or is_jinja(spec.template):
        return ""
    return spec.template


def _note(ctx: UiContext, spec: ModelSpec | None) -> str:
    model_settings = ctx.services.model_settings
    if model_settings is None or spec is None:
        return ""
    return spec_note(spec, model_settings.path)


def _is_model_tab(event: gr.SelectData) -> bool:
    return event.value == "Model"


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
