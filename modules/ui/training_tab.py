"""The Training tab: the LoRA form (drawn from modules.training.config's types), Start / Stop / Resume, a
progress bar and a live loss plot read from the run folder (so a reloaded page finds the job again), Apply,
perplexity, merge and GGUF export. Every action is a call into modules.training; nothing is decided here.

With --multi-user the actions are the operator's (modules.ui.operator): a job uses the machine and writes to loras/
and models/, Apply and perplexity change the shared model's LoRAs, merge and export write to models/. Every page
keeps the progress of the runs and the perplexity table, which only report."""
from __future__ import annotations

import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from modules.errors import ConfigError, PathError
from modules.paths import resolve_inside
from modules.training.base import is_transformers_folder, load_tokenizer
from modules.training.config import (ALL_LINEAR, TARGET_MODULES, DatasetOptions, LaunchOptions, LoraOptions,
                                     TrainOptions, parse_config)
from modules.training.datasets import eval_texts, list_datasets, preview_dataset
from modules.training.export import (GGUF_TYPES, ensure_lora_for_loader, export_lora_gguf, export_model_gguf,
                                     gguf_name, lora_base_dir, merge_lora)
from modules.training.jobs import JobManager, JobStatus, copy_settings_from_lora, folders_for
from modules.training.perplexity import evaluate_perplexity, load_results, record_result, results_file
from modules.ui.access import refuse_unless_admin
from modules.ui.common import UiContext, user_errors
from modules.ui.operator import operator_only
from modules.ui.widgets import FieldPanel

_SECTIONS = {"dataset": DatasetOptions, "lora": LoraOptions, "train": TrainOptions, "launch": LaunchOptions}


def _fresh_choices(dropdown: gr.Dropdown, choices: Callable[[], list[str]]) -> None:
    """Re-read a folder whenever the dropdown is opened: files and LoRAs appear while the app runs."""
    dropdown.focus(lambda: gr.update(choices=choices()), None, dropdown, show_progress="hidden")


def build_training_tab(ctx: UiContext) -> None:
    jobs = JobManager(folders_for(ctx.services.settings))
    with gr.Tabs(elem_id="training-tabs"):
        with gr.Tab("Train LoRA", id="training-train"):
            _train_panel(ctx, jobs)
        with gr.Tab("Perplexity", id="training-perplexity"):
            _perplexity_panel(ctx, jobs)
        with gr.Tab("Merge and export", id="training-export", elem_id="training-export-tab") as export_tab:
            _export_panel(ctx, jobs)
    operator_only(ctx, export_tab)


# --- the form, Start / Stop / Resume, progress ---------------------------------------------------------------------


def _panels(jobs: JobManager) -> dict[str, FieldPanel]:
    datasets = list_datasets(jobs.folders.datasets)
    return {
        "dataset": FieldPanel(DatasetOptions, DatasetOptions(train_file=datasets[0] if datasets else ""),
                              elem_prefix="training-dataset-", overrides={
            "train_file": gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None, render=False,
                                      label="train_file", allow_custom_value=True, elem_id="training-dataset-file",
                                      info=f"A file in {jobs.folders.datasets}"),
            "eval_file": gr.Dropdown(choices=[""] + datasets, value="", label="eval_file", render=False,
                                     allow_custom_value=True, elem_id="training-dataset-eval-file",
                                     info="Its own evaluation file (empty: use eval_fraction)")}),
        "lora": FieldPanel(LoraOptions, LoraOptions(), elem_prefix="training-lora-", overrides={
            "target_modules": gr.CheckboxGroup(choices=list(TARGET_MODULES) + [ALL_LINEAR], value=["q", "k", "v", "o"],
                                               label="target_modules", render=False,
                                               elem_id="training-lora-target-modules")}),
        "train": FieldPanel(TrainOptions, TrainOptions(), elem_prefix="training-train-", overrides={
            "learning_rate": gr.Number(TrainOptions().learning_rate, label="learning_rate", minimum=0, render=False,
                                       info="Peak learning rate.", elem_id="training-train-learning-rate"),
            "report_to": gr.CheckboxGroup(choices=["tensorboard", "wandb"], value=[], label="report_to",
                                          render=False, elem_id="training-train-report-to")}),
        "launch": FieldPanel(LaunchOptions, LaunchOptions(), elem_prefix="training-launch-"),
    }


def _panel_updates(panel: FieldPanel, values: Any) -> list[Any]:
    """Widget values for a section object; list widgets (checkbox groups) take the list itself."""
    shown = panel.updates_for(values)
    return [getattr(values, name) if isinstance(panel.components[name], gr.CheckboxGroup) else value
            for name, value in zip(panel.names, shown)]


def _train_panel(ctx: UiContext, jobs: JobManager) -> None:
    services = ctx.services
    manager = services.manager
    settings = services.settings

    def loaded_or_first() -> str | None:
        """The loaded model; when none is (a swap under way, or the start-up load failed), the --model one if it is
        listed, else the first model."""
        info = manager.info()
        models = manager.list_models()
        if info is not None:
            return info.name
        if services.settings.model in models:
            return services.settings.model
        return models[0] if models else None

    def default_run() -> str | None:
        return jobs.active_job() or next(iter(jobs.list_runs()), None)

    with gr.Column(elem_id="training-controls") as controls:
        with gr.Row():
            name = gr.Textbox(label="LoRA name", placeholder="my-lora", elem_id="training-name", scale=2)
            base = gr.Dropdown(choices=manager.list_models(), value=loaded_or_first, label="Base model",
                               info="A GGUF model trains through its Transformers copy (made once, kept in models/).",
                               elem_id="training-base", scale=3)
            overwrite = gr.Checkbox(False, label="Overwrite an existing LoRA / run", elem_id="training-overwrite")
            gguf_lora = gr.Dropdown(["auto", "yes", "no"], value="auto", label="Also save as GGUF LoRA",
                                    elem_id="training-gguf-lora")
        with gr.Row():
            copy_from = gr.Dropdown(choices=manager.list_loras(), value=None, label="Copy settings from an existing LoRA",
                                    elem_id="training-copy-from", scale=3)
            copy_button = gr.Button("Copy settings", elem_id="training-copy", scale=1)
        panels = _panels(jobs)
        for title, section in (("Dataset", "dataset"), ("LoRA", "lora"), ("Training", "train"),
                               ("Launch (several GPUs)", "launch")):
            with gr.Accordion(title, open=section == "dataset"):
                inputs = panels[section].inputs
                for start_at in range(0, len(inputs), 5):
                    with gr.Row(equal_height=False):
                        for component in inputs[start_at:start_at + 5]:
                            component.render()
        with gr.Row():
            preview_button = gr.Button("Preview dataset", elem_id="training-preview")
            start = gr.Button("Start", variant="primary", elem_id="training-start")
            stop = gr.Button("Stop", variant="stop", elem_id="training-stop")
            resume = gr.Button("Resume", elem_id="training-resume")
            apply = gr.Button("Apply to the loaded model", elem_id="training-apply")
        preview = gr.Markdown(elem_id="training-preview-output")
    with gr.Row():
        run = gr.Dropdown(choices=jobs.list_runs(), value=default_run, label="Run", elem_id="training-run",
                          allow_custom_value=True, scale=1)
        message = gr.Markdown(elem_id="training-message")
    progress = gr.HTML(_progress_html(None), elem_id="training-progress")
    plot = gr.LinePlot(_plot_frame(None), x="step", y="loss", color="series", height=320,
                       title="Loss", elem_id="training-loss-plot", x_title="step", y_title="loss")
    with gr.Accordion("Job log", open=False):
        log = gr.Textbox(lines=12, max_lines=12, show_label=False, elem_id="training-log")
    datasets_now = lambda: list_datasets(jobs.folders.datasets)  # noqa: E731
    _fresh_choices(base, manager.list_models)
    _fresh_choices(copy_from, manager.list_loras)
    _fresh_choices(panels["dataset"].components["train_file"], datasets_now)
    _fresh_choices(panels["dataset"].components["eval_file"], lambda: [""] + datasets_now())
    seen = gr.State(None)
    timer = gr.Timer(1.0)
    form = [name, base, overwrite, gguf_lora] + [c for p in panels.values() for c in p.inputs]

    def read_config(values: list[Any]) -> Any:
        fixed, rest = values[:4], list(values[4:])
        data: dict[str, Any] = {"name": (fixed[0] or "").strip(), "base_model": fixed[1] or "",
                                "overwrite": bool(fixed[2]), "gguf_lora": fixed[3]}
        for section, panel in panels.items():
            data[section] = panel.mapping(rest[:len(panel.names)])
            rest = rest[len(panel.names):]
        return parse_config(data, "The training form")

    @user_errors
    def on_start(request: gr.Request, *values: Any) -> tuple[Any, str]:
        refuse_unless_admin(settings, request.username, "Starting a training job")
        config = read_config(list(values))
        status = jobs.start(config)
        return gr.update(choices=jobs.list_runs(), value=config.name), f"Started **{status.name}**."

    @user_errors
    def on_stop(run_name: str | None, request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Stopping a training job")
        status = jobs.stop(_required(run_name, "run"))
        return f"Asked **{status.name}** to stop: it saves the adapter after the current step."

    @user_errors
    def on_resume(run_name: str | None, request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Resuming a training job")
        status = jobs.resume(_required(run_name, "run"))
        return f"Resuming **{status.name}** from its last checkpoint."

    @user_errors
    def on_apply(run_name: str | None, request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Applying a LoRA to the loaded model")
        lora = _required(run_name, "run")
        model = manager.require_model()
        lora_dir = resolve_inside(jobs.folders.loras, lora, what="LoRA", must_exist=True)
        ensure_lora_for_loader(model.loader_name, lora_dir, jobs.folders.models)
        info = manager.apply_loras([lora])
        return f"Applied **{lora}** to {info.name}; the Chat tab now uses it."

    @user_errors
    def on_copy(lora: str | None, request: gr.Request) -> list[Any]:
        refuse_unless_admin(settings, request.username, "Copying the training settings of a LoRA")
        lora_dir = resolve_inside(jobs.folders.loras, _required(lora, "LoRA"), what="LoRA", must_exist=True)
        data = copy_settings_from_lora(lora_dir)
        config = parse_config({"name": "copy", **data}, lora)
        updates: list[Any] = [gr.skip(), config.base_model, gr.skip(), config.gguf_lora]
        for section, panel in panels.items():
            updates += _panel_updates(panel, getattr(config, section))
        return updates

    @user_errors
    def on_preview(request: gr.Request, *values: Any) -> str:
        refuse_unless_admin(settings, request.username, "Previewing a training dataset")
        config = read_config([values[0] or "preview", *values[1:]])
        tokenizer = load_tokenizer(config.model_copy(update={"folders": jobs.folders}).base_path())
        shown = preview_dataset(config.dataset, jobs.folders.datasets, tokenizer, seed=config.train.seed)
        return _preview_markdown(shown)

    def on_tick(run_name: str | None, last: Any, runs_now: list[str] | None) -> tuple[Any, ...]:
        runs = jobs.list_runs()
        choices = gr.update(choices=runs) if runs != (runs_now or []) else gr.skip()
        if not run_name and runs:  # a fresh page: follow the running job (or the latest run)
            run_name = default_run()
            choices = gr.update(choices=runs, value=run_name)
        if not run_name or run_name not in runs:
            return choices, gr.skip(), gr.skip(), gr.skip(), last, runs
        status = jobs.status(run_name)
        path = jobs.run_dir(run_name) / "progress.jsonl"
        key = (run_name, status.state, status.details.get("updated"), path.stat().st_size if path.exists() else 0)
        if key == last:
            return choices, gr.skip(), gr.skip(), gr.skip(), last, runs
        curves = jobs.curves(run_name)
        return choices, _progress_html(status, curves), _plot_frame(curves), jobs.log_tail(run_name), key, runs

    runs_state = gr.State(jobs.list_runs())
    start.click(on_start, form, [run, message], api_name="start_training")
    stop.click(on_stop, run, message, api_name="stop_training")
    resume.click(on_resume, run, message, api_name="resume_training")
    apply.click(on_apply, run, message, api_name="apply_trained_lora")
    copy_button.click(on_copy, copy_from, form, api_name="copy_training_settings")
    preview_button.click(on_preview, form, preview, api_name="preview_dataset")
    timer.tick(on_tick, [run, seen, runs_state], [run, progress, plot, log, seen, runs_state], show_progress="hidden")
    run.change(lambda: None, None, seen, show_progress="hidden")
    operator_only(ctx, controls)


def _required(value: str | None, what: str) -> str:
    if not value:
        raise ConfigError(f"Pick a {what} first.")
    return value


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _progress_html(status: JobStatus | None, curves: Any = None) -> str:
    if status is None or status.state == "none":
        return '<div id="training-progress-box"><progress value="0" max="1"></progress> No run yet.</div>'
    latest = curves.latest if curves is not None else {}
    parts = [f"<b>{html.escape(status.state)}</b>", f"step {status.step} / {status.max_steps or '?'}"]
    if status.active:
        parts.append(f"ETA {_duration(status.eta_s)}")
    if latest.get("tok_s") is not None:
        parts.append(f"{latest['tok_s']:.0f} tokens/s")
    if latest.get("loss") is not None:
        parts.append(f"loss {latest['loss']:.4f}")
    if curves is not None and curves.eval:
        parts.append(f"eval loss {curves.eval[-1][1]:.4f}")
    note = f"<div>{html.escape(status.message)}</div>" if status.message else ""
    return (f'<div id="training-progress-box" data-state="{html.escape(status.state)}" data-step="{status.step}">'
            f'<progress value="{status.step}" max="{max(status.max_steps, 1)}" style="width:100%"></progress>'
            f'<div>{" · ".join(parts)}</div>{note}</div>')


def _plot_frame(curves: Any) -> pd.DataFrame:
    """Typed columns even when empty: the browser keeps the axis types of the first frame it draws."""
    rows = [] if curves is None else ([(s, v, "train") for s, v in curves.train] +
                                      [(s, v, "eval") for s, v in curves.eval])
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="str")})


def _preview_markdown(shown: dict[str, Any]) -> str:
    stats = shown["stats"]
    lines = [f"**{stats['train_examples']}** training and **{stats['eval_examples']}** evaluation examples from "
             f"{stats['records']} records ({stats['kind']}); **{stats['dropped_too_long']}** dropped for being "
             f"longer than the cutoff; {stats['train_tokens']} tokens, {stats['trained_tokens']} of them trained "
             f"on; longest {stats['longest']}, mean {stats['mean_length']}."]
    lines += [f"> {html.escape(w)}" for w in shown["warnings"]]
    for index, example in enumerate(shown["examples"], 1):
        lines.append(f"\n**Example {index}** ({example['tokens']} tokens, {example['trained_tokens']} trained):")
        lines.append(f"```text\n{example['text']}\n```\nTrained on:\n```text\n{example['trained_text']}\n```")
    return "\n".join(lines)


# --- perplexity -------------------------------------------------------------------------------------------------------


def _perplexity_panel(ctx: UiContext, jobs: JobManager) -> None:
    services = ctx.services
    manager = services.manager
    table_path = results_file(services.settings.user_data_dir)
    with gr.Column(elem_id="ppl-controls") as controls:
        with gr.Row():
            source = gr.Radio(["Text file", "Eval split of a run"], value="Text file", label="Measure on",
                              elem_id="ppl-source")
            file = gr.Dropdown(choices=list_datasets(jobs.folders.datasets), label="Text or dataset file",
                               elem_id="ppl-file")
            run = gr.Dropdown(choices=jobs.list_runs(), label="Run (its evaluation split)", elem_id="ppl-run")
        with gr.Row():
            loras = gr.Dropdown(choices=manager.list_loras(), multiselect=True, value=[],
                                label="LoRAs to apply (none: the bare model)", elem_id="ppl-loras")
            context = gr.Number(512, precision=0, minimum=2, label="Context length", elem_id="ppl-context")
            stride = gr.Number(256, precision=0, minimum=1, label="Stride", elem_id="ppl-stride")
            limit = gr.Number(0, precision=0, minimum=0, label="Max tokens (0: all)", elem_id="ppl-limit")
        evaluate = gr.Button("Evaluate", variant="primary", elem_id="ppl-evaluate")
    result = gr.Markdown(elem_id="ppl-result")
    table = gr.Dataframe(value=lambda: _results_frame(table_path), interactive=False, elem_id="ppl-table")

    @user_errors
    def on_evaluate(kind: str, file_name: str | None, run_name: str | None, chosen: list[str] | None,
                    context_length: float, stride_tokens: float, max_tokens: float, request: gr.Request,
                    progress: gr.Progress = gr.Progress()) -> tuple[str, pd.DataFrame]:
        refuse_unless_admin(services.settings, request.username, "Measuring perplexity")
        model = manager.require_model()
        chosen = list(chosen or [])
        if chosen != model.info().loras:
            for lora in chosen:
                ensure_lora_for_loader(model.loader_name, resolve_inside(jobs.folders.loras, lora, what="LoRA",
                                                                         must_exist=True), jobs.folders.models)
            manager.apply_loras(chosen)
        if kind == "Text file":
            text, label = _text_of(jobs, _required(file_name, "file")), file_name
        else:
            config = jobs.config(_required(run_name, "run"))
            text = "\n\n".join(eval_texts(config.dataset, jobs.folders.datasets, seed=config.train.seed,
                                          chat_template=model.chat_template, bos=model.bos_token,
                                          eos=model.eos_token))
            label = f"eval split of {run_name}"
        outcome = evaluate_perplexity(manager, text, source=label, context_length=int(context_length or 512),
                                      stride=int(stride_tokens or 256), max_tokens=int(max_tokens or 0),
                                      progress=lambda f: progress(f, desc="Scoring"))
        record_result(table_path, outcome)
        loras_text = ", ".join(outcome.loras) or "no LoRA"
        return (f"Perplexity **{outcome.perplexity:.3f}** for {outcome.model} ({loras_text}) on {label}: "
                f"{outcome.tokens} tokens in {outcome.seconds:.1f} s.", _results_frame(table_path))

    _fresh_choices(file, lambda: list_datasets(jobs.folders.datasets))
    _fresh_choices(run, jobs.list_runs)
    _fresh_choices(loras, manager.list_loras)
    evaluate.click(on_evaluate, [source, file, run, loras, context, stride, limit], [result, table],
                   api_name="evaluate_perplexity")
    operator_only(ctx, controls)


def _text_of(jobs: JobManager, name: str) -> str:
    """A .txt file as is; a structured dataset file as its records joined (for a quick look)."""
    path = resolve_inside(jobs.folders.datasets, name, what="dataset", must_exist=True)
    if path.suffix.lower() == ".txt":
        return path.read_text(encoding="utf-8")
    raise ConfigError("Perplexity on a file takes a .txt file; for a JSON/CSV dataset use the eval split of a run.")


def _results_frame(path: Path) -> pd.DataFrame:
    rows = load_results(path)
    frame = pd.DataFrame(rows, columns=["time", "model", "loras", "source", "context_length", "stride", "tokens",
                                        "perplexity", "seconds"])
    if not frame.empty:
        frame["time"] = [time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) for t in frame["time"]]
        frame["loras"] = [", ".join(v) if isinstance(v, list) else v for v in frame["loras"]]
    return frame.iloc[::-1]


# --- merge and export -------------------------------------------------------------------------------------------------


def _export_panel(ctx: UiContext, jobs: JobManager) -> None:
    manager = ctx.services.manager
    settings = ctx.services.settings
    folders = jobs.folders

    def transformers_models() -> list[str]:
        return [n for n in manager.list_models() if is_transformers_folder(folders.models / n)]

    gr.Markdown("Merge a LoRA into its base model (a safetensors folder in models/), and export models and LoRAs "
                "to GGUF with llama.cpp's own converters and quantizer.")
    with gr.Row():
        lora = gr.Dropdown(choices=manager.list_loras(), label="LoRA", elem_id="export-lora")
        base = gr.Dropdown(choices=[""] + manager.list_models(), value="", label="Base (empty: as trained)",
                           elem_id="export-base")
        merged_name = gr.Textbox(label="Merged model name", placeholder="my-model-merged", elem_id="export-name")
        dtype = gr.Radio(["bfloat16", "float16", "float32"], value="bfloat16", label="Merged dtype")
        overwrite = gr.Checkbox(False, label="Overwrite")
    with gr.Row():
        merge = gr.Button("Merge into the base", elem_id="export-merge")
        lora_gguf = gr.Button("Export the LoRA as GGUF", elem_id="export-lora-gguf")
    with gr.Row():
        model = gr.Dropdown(choices=transformers_models(), label="Transformers model to export",
                            elem_id="export-model")
        types = gr.CheckboxGroup(list(GGUF_TYPES), value=["f16"], label="GGUF types", elem_id="export-types")
        export = gr.Button("Export to GGUF", elem_id="export-gguf")
    outcome = gr.Markdown(elem_id="export-outcome")

    @user_errors
    def on_merge(lora_name: str | None, base_name: str, out_name: str, merged_dtype: str, replace: bool,
                 request: gr.Request) -> Any:
        refuse_unless_admin(settings, request.username, "Merging a LoRA")
        lora_dir = resolve_inside(folders.loras, _required(lora_name, "LoRA"), what="LoRA", must_exist=True)
        out = resolve_inside(folders.models, (out_name or "").strip() or f"{lora_name}-merged", what="model")
        merge_lora(lora_dir, lora_base_dir(lora_dir, folders.models, base_name or None), out, dtype=merged_dtype,
                   overwrite=replace)
        return f"Merged into **{out.name}** in models/.", gr.update(choices=transformers_models(), value=out.name)

    @user_errors
    def on_lora_gguf(lora_name: str | None, base_name: str, request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Exporting a LoRA")
        lora_dir = resolve_inside(folders.loras, _required(lora_name, "LoRA"), what="LoRA", must_exist=True)
        path = export_lora_gguf(lora_dir, lora_base_dir(lora_dir, folders.models, base_name or None))
        return f"Wrote **{path.name}** in loras/{lora_dir.name}/ (the llama.cpp loader applies it)."

    @user_errors
    def on_export(model_name: str | None, kinds: list[str], replace: bool, request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Exporting a model")
        source = resolve_inside(folders.models, _required(model_name, "model"), what="model", must_exist=True)
        if not kinds:
            raise PathError("Tick at least one GGUF type.")
        written = [export_model_gguf(source, folders.models / gguf_name(source.name, kind), kind,
                                     overwrite=replace).name for kind in kinds]
        return "Wrote " + ", ".join(f"**{n}**" for n in written) + " in models/."

    _fresh_choices(lora, manager.list_loras)
    _fresh_choices(base, lambda: [""] + manager.list_models())
    _fresh_choices(model, transformers_models)
    merge.click(on_merge, [lora, base, merged_name, dtype, overwrite], [outcome, model], api_name="merge_lora")
    lora_gguf.click(on_lora_gguf, [lora, base], outcome, api_name="export_lora_gguf")
    export.click(on_export, [model, types, overwrite], outcome, api_name="export_model_gguf")
