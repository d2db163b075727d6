"""The Model tab's "Quantize / convert" panel: a Transformers folder or a float GGUF in models/ becomes a GGUF of a
chosen type through modules.quantize.gguf.make_gguf, the function `python -m modules.quantize gguf` calls, with the
same output naming and overwrite rule. It runs in a background thread (one conversion per server), a timer polls
its progress while it runs, Stop sets the core's cancel Event (the core removes its partial files), and the new
model joins the model list when it is done. With --multi-user it is the operator's (it writes to models/)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from modules.errors import ConfigError, WorkbenchError
from modules.paths import resolve_inside
from modules.quantize.gguf import gguf_name, inspect_source, make_gguf
from modules.quantize.job import ProgressCallback, human_size, output_path
from modules.quantize.llama_tools import GGUF_TYPES, gguf_type
from modules.ui.access import refuse_unless_admin
from modules.ui.background_task import BackgroundTask, TaskState, progress_html
from modules.ui.common import UiContext, error_text, user_errors
from modules.ui.operator import operator_only

#: The project's shipped texts (calibration and held-out text for the panels).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
NO_CALIBRATION = "(none)"
POLL_S = 1.0


def text_files(folder: Path = DATA_DIR) -> list[str]:
    """The .txt files of `folder` (calibration or held-out text)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".txt")


def read_text_choice(choice: str | None, upload: str | None, what: str) -> tuple[str | None, str]:
    """The text picked in a panel, as (text or None, where it came from): an uploaded file wins over a file of
    data/; a file that is not UTF-8 text is refused with its name."""
    if upload:
        path, source = Path(upload), Path(upload).name
    elif choice and choice != NO_CALIBRATION:
        path, source = resolve_inside(DATA_DIR, choice, what=what, must_exist=True), f"data/{choice}"
    else:
        return None, ""
    try:
        return path.read_text(encoding="utf-8"), source
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read the {what} {source}: it must be UTF-8 text ({exc}).") from None


def sources(model_dir: Path) -> list[str]:
    """What can be converted: Transformers folders and F16/BF16/F32 GGUF files in models/."""
    if not model_dir.is_dir():
        return []
    found = []
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or path.suffix.lower() == ".gguf"):
            continue
        try:
            inspect_source(path)
        except WorkbenchError:
            continue
        found.append(path.name)
    return found


def build_quantize_panel(ctx: UiContext, model_list: gr.Dropdown) -> None:
    """Draw the panel; `model_list` is the Model tab's model dropdown, given the new model when it is written."""
    settings = ctx.services.settings
    manager = ctx.services.manager
    models = Path(settings.model_dir)
    task = BackgroundTask("A conversion")

    with gr.Accordion("Quantize / convert to GGUF", open=False, elem_id="quantize-panel") as panel:
        gr.Markdown("Make a GGUF of another type from a Transformers folder or an F16/BF16/F32 GGUF in models/ "
                    "(llama.cpp's converter and quantizer, as `python -m modules.quantize gguf`). An importance "
                    "matrix, collected on calibration text, keeps more precision where it matters; the 1- and "
                    "2-bit types need one.")
        with gr.Row():
            source = gr.Dropdown(choices=sources(models), value=None, label="Source model", scale=3,
                                 elem_id="quantize-source")
            kind = gr.Dropdown(choices=list(GGUF_TYPES), value="Q4_K_M", label="Type", scale=1,
                               elem_id="quantize-type")
            name = gr.Textbox(label="Output name (optional)", placeholder="MODEL.TYPE.gguf", scale=3,
                              elem_id="quantize-output")
            overwrite = gr.Checkbox(False, label="Overwrite", scale=1, elem_id="quantize-overwrite")
        with gr.Row():
            calibration = gr.Dropdown(choices=[NO_CALIBRATION, *text_files()], value=NO_CALIBRATION, scale=2,
                                      label="Importance matrix on (calibration text in data/)",
                                      elem_id="quantize-calibration")
            upload = gr.File(label="…or upload a calibration text", file_types=[".txt"], type="filepath", scale=2,
                             elem_id="quantize-upload", height=90)
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="quantize-start")
            stop = gr.Button("Stop", variant="stop", elem_id="quantize-stop")
        note = gr.Markdown(elem_id="quantize-message")
        progress = gr.HTML(progress_html(task.state(), "quantize-progress-box"), elem_id="quantize-progress")
    timer = gr.Timer(POLL_S, active=False)
    shown = gr.State(None)

    def job_for(source_name: str, type_name: str, target: Path, text: str | None) -> Any:
        def run(report: ProgressCallback, cancel: threading.Event) -> Path:
            return make_gguf(models / source_name, target, type_name, calibration=text, overwrite=True,
                             progress=report, cancel=cancel)
        return run

    def finished(path: Path) -> str:
        return f"Wrote {path.name} ({human_size(path.stat().st_size)}) in models/."

    @user_errors
    def on_start(source_name: str | None, type_name: str, out_name: str, replace: bool, calibration_name: str | None,
                 uploaded: str | None, request: gr.Request) -> tuple[Any, Any, str]:
        refuse_unless_admin(settings, request.username, "Quantizing a model")
        try:
            state = start_job(source_name, type_name, out_name, replace, calibration_name, uploaded)
        except WorkbenchError as exc:  # said beside the button; the progress box keeps the last job
            return gr.skip(), gr.skip(), f"**Error:** {error_text(exc)}"
        return progress_html(state, "quantize-progress-box"), gr.Timer(active=True), ""

    def start_job(source_name: str | None, type_name: str, out_name: str, replace: bool,
                  calibration_name: str | None, uploaded: str | None) -> TaskState:
        if not source_name:
            raise ConfigError("Pick a source model first.")
        type_name = gguf_type(type_name).name
        inspect_source(resolve_inside(models, source_name, what="model", must_exist=True))
        target = output_path(models, (out_name or "").strip() or gguf_name(source_name, type_name), ".gguf",
                             overwrite=bool(replace))
        text, _ = read_text_choice(calibration_name, uploaded, "calibration text")
        # make_gguf checks again in the thread (overwrite=True there: the check above is the user's answer)
        return task.start(f"{source_name} → {target.name}", job_for(source_name, type_name, target, text),
                          finished)

    @user_errors
    def on_stop(request: gr.Request) -> str:
        refuse_unless_admin(settings, request.username, "Stopping a conversion")
        return progress_html(task.stop(), "quantize-progress-box")

    def on_tick(last: Any) -> tuple[Any, ...]:
        state = task.state()
        key = (state.serial, state.state, state.progress)
        if key == last:
            return gr.skip(), gr.skip(), gr.skip(), last
        box = progress_html(state, "quantize-progress-box")
        if state.active:
            return box, gr.skip(), gr.skip(), key
        listed = gr.update(choices=manager.list_models()) if state.state == "finished" else gr.skip()
        return box, listed, gr.Timer(active=False), key

    def on_page(data: dict[Any, Any]) -> tuple[str, Any]:
        """A page opened while a conversion runs follows it."""
        state = task.state()
        return progress_html(state, "quantize-progress-box"), gr.Timer(active=state.active)

    source.focus(lambda: gr.update(choices=sources(models)), None, source, show_progress="hidden")
    calibration.focus(lambda: gr.update(choices=[NO_CALIBRATION, *text_files()]), None, calibration,
                      show_progress="hidden")
    start.click(on_start, [source, kind, name, overwrite, calibration, upload], [progress, timer, note],
                api_name="quantize_start")
    stop.click(on_stop, None, progress, api_name="quantize_stop")
    timer.tick(on_tick, shown, [progress, model_list, timer, shown], show_progress="hidden",
               concurrency_limit=None)
    operator_only(ctx, panel)
    ctx.session_listeners.append((on_page, {ctx.session}, [progress, timer]))
