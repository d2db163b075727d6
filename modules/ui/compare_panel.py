"""The Model tab's "Compare models" panel: modules.compare.compare() (the function `python -m modules.compare`
calls) measures several models in turn in a background thread (one comparison per server) while a timer shows its
progress; the result is one table and one bar chart of a chosen measurement, and the run is saved with the core's
save_run in user_data/comparisons/, where the panel lists the saved runs to reopen. With --multi-user it is the
operator's: it loads models and uses the machine."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from modules.compare import DEFAULT_PROMPTS, Row, budget_beside, compare, list_runs, load_run, save_run
from modules.errors import ConfigError, WorkbenchError
from modules.quantize.job import ProgressCallback
from modules.ui.access import refuse_unless_admin
from modules.ui.background_task import BackgroundTask, TaskState, progress_html
from modules.ui.common import UiContext, error_text, user_errors
from modules.ui.operator import operator_only
from modules.ui.quantize_panel import POLL_S, read_text_choice, text_files

#: Table columns: (title, how a Row gives it). Sizes in MB so that the column sorts as numbers.
COLUMNS: tuple[tuple[str, Any], ...] = (
    ("model", lambda r: r.model), ("loader", lambda r: r.loader),
    ("file MB", lambda r: round(r.file_bytes / 2**20, 1)), ("RSS + MB", lambda r: round(r.rss_delta_bytes / 2**20, 1)),
    ("load s", lambda r: r.load_seconds), ("prompt tok/s", lambda r: r.prompt_tokens_per_s),
    ("generation tok/s", lambda r: r.generation_tokens_per_s), ("perplexity", lambda r: round(r.perplexity, 3)),
)
#: What the chart may show: a numeric column of the table.
CHART_METRICS = ("perplexity", "generation tok/s", "prompt tok/s", "file MB", "RSS + MB", "load s")
DEFAULT_TEXT = "the-verdict.txt"


def table_frame(rows: list[Row], prompts: list[str]) -> pd.DataFrame:
    """One line per model: the measurements, then its answer to each prompt (columns Q1, Q2, ...)."""
    data: dict[str, list[Any]] = {title: [get(r) for r in rows] for title, get in COLUMNS}
    for number in range(len(prompts)):
        data[f"Q{number + 1}"] = [r.answers[number] if number < len(r.answers) else "" for r in rows]
    return pd.DataFrame(data, columns=[*(t for t, _ in COLUMNS), *(f"Q{n + 1}" for n in range(len(prompts)))])


def chart_frame(rows: list[Row], metric: str) -> pd.DataFrame:
    """The chart's frame: one bar per model for `metric` (typed even when empty: the browser keeps the axis
    types of the first frame it draws)."""
    get = dict(COLUMNS)[metric]
    return pd.DataFrame({"model": pd.Series([r.model for r in rows], dtype="str"),
                         "value": pd.Series([float(get(r)) for r in rows], dtype="float64")})


def prompts_of(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def build_compare_panel(ctx: UiContext) -> None:
    settings = ctx.services.settings
    manager = ctx.services.manager
    saved_dir = Path(settings.user_data_dir) / "comparisons"
    task = BackgroundTask("A comparison")
    texts = text_files()

    with gr.Accordion("Compare models", open=False, elem_id="compare-panel") as panel:
        gr.Markdown("Load each model in turn and measure its file size, the memory it took, load time, prompt and "
                    "generation speed, perplexity on a held-out text and its greedy answers to the prompts below "
                    "(as `python -m modules.compare`). Each run is saved as JSON and CSV in "
                    "user_data/comparisons/.")
        with gr.Row():
            chosen = gr.Dropdown(choices=manager.list_models(), value=[], multiselect=True, scale=4,
                                 label="Models (two or more)", elem_id="compare-models")
            text_choice = gr.Dropdown(choices=texts, value=DEFAULT_TEXT if DEFAULT_TEXT in texts else None,
                                      label="Held-out text (data/)", scale=2, elem_id="compare-text")
            max_tokens = gr.Number(1024, precision=0, minimum=0, label="Tokens of the text (0: all)", scale=1,
                                   elem_id="compare-max-tokens")
            new_tokens = gr.Number(48, precision=0, minimum=1, label="Tokens per answer", scale=1,
                                   elem_id="compare-new-tokens")
        prompts = gr.Textbox("\n".join(DEFAULT_PROMPTS), lines=3, label="Prompts (one per line; empty: none)",
                             elem_id="compare-prompts")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="compare-start")
            stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
        note = gr.Markdown(elem_id="compare-message")
        progress = gr.HTML(progress_html(task.state(), "compare-progress-box"), elem_id="compare-progress")
        with gr.Row():
            saved = gr.Dropdown(choices=list_runs(saved_dir), value=None, label="Saved runs", scale=3,
                                elem_id="compare-saved")
            metric = gr.Radio(list(CHART_METRICS), value="perplexity", label="Chart", scale=4,
                              elem_id="compare-metric")
        table = gr.Dataframe(table_frame([], []), interactive=False, wrap=True, elem_id="compare-table")
        chart = gr.BarPlot(chart_frame([], "perplexity"), x="model", y="value", color="model", height=300,
                           y_title="perplexity", elem_id="compare-chart")
    rows_state = gr.State([])
    timer = gr.Timer(POLL_S, active=False)
    shown = gr.State(None)

    def loader_options(models: list[str]) -> dict[str, Any]:
        """The server's loader options that the loaders of `models` take (compare refuses any other)."""
        known: set[str] = set()
        for name in models:
            known |= set(manager.plan(name).loader.Options.model_fields)
        return {k: v for k, v in settings.loader_options.items() if k in known}

    @user_errors
    def on_start(models: list[str] | None, text_name: str | None, tokens: float | None, per_answer: float | None,
                 prompt_text: str, request: gr.Request) -> tuple[Any, Any, str]:
        refuse_unless_admin(settings, request.username, "Comparing models")
        try:
            state = start_job(list(models or []), text_name, tokens, per_answer, prompt_text)
        except WorkbenchError as exc:  # said beside the button; the progress box keeps the last run
            return gr.skip(), gr.skip(), f"**Error:** {error_text(exc)}"
        return progress_html(state, "compare-progress-box"), gr.Timer(active=True), ""

    def start_job(models: list[str], text_name: str | None, tokens: float | None, per_answer: float | None,
                  prompt_text: str) -> TaskState:
        if not models:
            raise ConfigError("Pick the models to compare.")
        text, source = read_text_choice(text_name, None, "held-out text")
        if text is None:
            raise ConfigError("Pick a held-out text.")
        asked = prompts_of(prompt_text)
        options = loader_options(models)
        limit, answer_tokens = int(tokens or 0), int(per_answer or 1)
        if limit < 0 or answer_tokens < 1:
            raise ConfigError("Tokens of the text must not be negative and tokens per answer at least 1.")

        budget = budget_beside(manager, settings.memory_budget_bytes)

        def run(report: ProgressCallback, cancel: threading.Event) -> tuple[list[Row], list[str], str]:
            rows = compare(models, model_dir=Path(settings.model_dir), text=text, prompts=asked,
                           loader_options=options, max_new_tokens=answer_tokens, max_tokens=limit,
                           memory_budget=budget, progress=report, cancel=cancel)
            json_path, _ = save_run(rows, saved_dir, prompts=asked, text_source=source)
            return rows, asked, json_path.stem

        return task.start(", ".join(models), run, lambda result: f"Saved as {result[2]} (JSON and CSV) in "
                                                                "user_data/comparisons/.")

    @user_errors
    def on_stop(request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Stopping a comparison")
        return progress_html(task.stop(), "compare-progress-box")

    def bars(rows: list[Row], chart_metric: str) -> Any:
        return gr.update(value=chart_frame(rows, chart_metric), y_title=chart_metric)

    def on_tick(last: Any, chart_metric: str) -> tuple[Any, ...]:
        state = task.state()
        key = (state.serial, state.state, state.progress)
        skip = (gr.skip(),) * 4
        if key == last:
            return gr.skip(), *skip, gr.skip(), last
        box = progress_html(state, "compare-progress-box")
        if state.active:
            return box, *skip, gr.skip(), key
        if state.state != "finished":
            return box, *skip, gr.Timer(active=False), key
        rows, asked, stamp = state.result
        return (box, table_frame(rows, asked), bars(rows, chart_metric),
                gr.update(choices=list_runs(saved_dir), value=stamp), rows, gr.Timer(active=False), key)

    @user_errors
    def on_open(stamp: str | None, chart_metric: str) -> tuple[Any, ...]:
        if not stamp:
            return gr.skip(), gr.skip(), gr.skip()
        rows, asked, _ = load_run(saved_dir, stamp)
        return table_frame(rows, asked), bars(rows, chart_metric), rows

    def on_metric(rows: list[Row], chart_metric: str) -> Any:
        return bars(rows or [], chart_metric)

    def on_page(data: dict[Any, Any]) -> tuple[str, Any]:
        state = task.state()
        return progress_html(state, "compare-progress-box"), gr.Timer(active=state.active)

    chosen.focus(lambda: gr.update(choices=manager.list_models()), None, chosen, show_progress="hidden")
    saved.focus(lambda: gr.update(choices=list_runs(saved_dir)), None, saved, show_progress="hidden")
    start.click(on_start, [chosen, text_choice, max_tokens, new_tokens, prompts], [progress, timer, note],
                api_name="compare_start")
    stop.click(on_stop, None, progress, api_name="compare_stop")
    timer.tick(on_tick, [shown, metric], [progress, table, chart, saved, rows_state, timer, shown],
               show_progress="hidden", concurrency_limit=None)
    saved.input(on_open, [saved, metric], [table, chart, rows_state], api_name="compare_open")
    metric.change(on_metric, [rows_state, metric], chart, show_progress="hidden")
    operator_only(ctx, panel)
    ctx.session_listeners.append((on_page, {ctx.session}, [progress, timer]))
