"""The Model tab's "Quantize / convert" panel: a model in models/ becomes a GGUF of a chosen type
(modules.quantize.gguf.make_gguf, from a Transformers folder or a float GGUF) or a GPTQ / AWQ folder
(modules.quantize.gptq.plan_job and make_quantized, from a full-precision Transformers folder, calibrated on data
files the user picks), the functions `python -m modules.quantize gguf|gptq|awq` call, with the same output naming
and overwrite rule. It runs in a background thread (one job per server), a timer polls its progress while it runs,
Stop sets the core's cancel Event (the core removes its partial files), and the new model joins the model list
when it is done. With --multi-user it is the operator's (it writes to models/)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from modules.errors import ConfigError, WorkbenchError
from modules.paths import resolve_inside
from modules.quantize.gguf import gguf_name, inspect_source, make_gguf
from modules.quantize.gptq import (
    DEFAULT_CALIBRATION,
    GPTQ_BITS,
    GROUP_SIZES,
    inspect_float_source,
    make_quantized,
    plan_job,
)
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
FORMATS = ("GGUF", "GPTQ", "AWQ")
#: The group-size choices; "auto" is 128, or for AWQ the largest that fits the model.
GROUP_CHOICES = ["auto", *(str(g) for g in GROUP_SIZES)]


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


def data_files(folder: Path = DATA_DIR) -> list[str]:
    """The calibration data files of `folder` for GPTQ/AWQ: raw text and instruction or chat records."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".json", ".jsonl"))


def sources(model_dir: Path, fmt: str = "GGUF") -> list[str]:
    """What can be made into `fmt`: for GGUF, Transformers folders and F16/BF16/F32 GGUF files in models/; for
    GPTQ and AWQ, full-precision Transformers folders."""
    if not model_dir.is_dir():
        return []
    inspect = inspect_source if fmt == "GGUF" else inspect_float_source
    found = []
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or path.suffix.lower() == ".gguf"):
            continue
        try:
            inspect(path)
        except WorkbenchError:
            continue
        found.append(path.name)
    return found


def calibration_paths(names: list[str] | None, uploads: list[str] | None) -> list[Path]:
    """The GPTQ/AWQ calibration files picked: files of data/ by name and uploaded files; data/'s instruction set
    and raw text when nothing is picked."""
    paths = [resolve_inside(DATA_DIR, name, what="calibration file", must_exist=True) for name in names or []]
    paths += [Path(upload) for upload in uploads or []]
    return paths or list(DEFAULT_CALIBRATION)


def build_quantize_panel(ctx: UiContext, model_list: gr.Dropdown) -> None:
    """Draw the panel; `model_list` is the Model tab's model dropdown, given the new model when it is written."""
    settings = ctx.services.settings
    manager = ctx.services.manager
    models = Path(settings.model_dir)
    task = BackgroundTask("A conversion")

    with gr.Accordion("Quantize / convert (GGUF, GPTQ, AWQ)", open=False, elem_id="quantize-panel") as panel:
        gr.Markdown("Make a GGUF of another type from a Transformers folder or an F16/BF16/F32 GGUF in models/ "
                    "(llama.cpp's converter and quantizer, as `python -m modules.quantize gguf`), or a GPTQ or "
                    "AWQ folder from a full-precision Transformers folder (GPTQModel, calibrated on the data you "
                    "pick, as `python -m modules.quantize gptq|awq`). An importance matrix, collected on "
                    "calibration text, keeps more GGUF precision where it matters; the 1- and 2-bit types need one.")
        with gr.Row():
            fmt = gr.Radio(list(FORMATS), value="GGUF", label="Format", scale=1, elem_id="quantize-format")
            source = gr.Dropdown(choices=sources(models), value=None, label="Source model", scale=3,
                                 elem_id="quantize-source")
            kind = gr.Dropdown(choices=list(GGUF_TYPES), value="Q4_K_M", label="Type", scale=1,
                               elem_id="quantize-type")
            name = gr.Textbox(label="Output name (optional)", placeholder="MODEL.TYPE.gguf", scale=3,
                              elem_id="quantize-output")
            overwrite = gr.Checkbox(False, label="Overwrite", scale=1, elem_id="quantize-overwrite")
        with gr.Row() as gguf_row:
            calibration = gr.Dropdown(choices=[NO_CALIBRATION, *text_files()], value=NO_CALIBRATION, scale=2,
                                      label="Importance matrix on (calibration text in data/)",
                                      elem_id="quantize-calibration")
            upload = gr.File(label="…or upload a calibration text", file_types=[".txt"], type="filepath", scale=2,
                             elem_id="quantize-upload", height=90)
        with gr.Row(visible=False) as gptq_row:
            bits = gr.Dropdown(choices=list(GPTQ_BITS), value=4, label="Bits", scale=1, elem_id="quantize-bits")
            group = gr.Dropdown(choices=GROUP_CHOICES, value="auto", label="Group size (auto: 128, or for AWQ "
                                "what fits)", scale=1, elem_id="quantize-group-size")
            act_order = gr.Checkbox(False, label="Act-order (desc_act, GPTQ)", scale=1, elem_id="quantize-act-order")
            samples = gr.Number(128, precision=0, minimum=1, label="Calibration samples", scale=1,
                                elem_id="quantize-samples")
            seq_len = gr.Number(512, precision=0, minimum=16, label="Tokens per sample", scale=1,
                                elem_id="quantize-seq-len")
        with gr.Row(visible=False) as data_row:
            data = gr.Dropdown(choices=data_files(), value=[p.name for p in DEFAULT_CALIBRATION], multiselect=True,
                               label="Calibration data in data/ (raw text, instruction or chat records)", scale=2,
                               elem_id="quantize-data")
            data_upload = gr.File(label="…and uploaded files", file_types=[".txt", ".json", ".jsonl"],
                                  file_count="multiple", type="filepath", scale=2, elem_id="quantize-data-upload",
                                  height=90)
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="quantize-start")
            stop = gr.Button("Stop", variant="stop", elem_id="quantize-stop")
        note = gr.Markdown(elem_id="quantize-message")
        progress = gr.HTML(progress_html(task.state(), "quantize-progress-box"), elem_id="quantize-progress")
    timer = gr.Timer(POLL_S, active=False)
    shown = gr.State(None)

    def gguf_job(source_name: str, type_name: str, target: Path, text: str | None) -> Any:
        def run(report: ProgressCallback, cancel: threading.Event) -> Path:
            return make_gguf(models / source_name, target, type_name, calibration=text, overwrite=True,
                             progress=report, cancel=cancel)
        return run

    def quantized_job(source_path: Path, target: Path, spec: Any, files: list[Path]) -> Any:
        def run(report: ProgressCallback, cancel: threading.Event) -> Path:
            return make_quantized(source_path, target, spec, calibration=files, overwrite=True, progress=report,
                                  cancel=cancel)
        return run

    def finished(path: Path) -> str:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        return f"Wrote {path.name} ({human_size(size)}) in models/."

    def on_format(chosen: str) -> tuple[Any, ...]:
        gguf = chosen == "GGUF"
        return (gr.update(choices=sources(models, chosen), value=None), gr.update(visible=gguf),
                gr.update(visible=gguf), gr.update(visible=not gguf), gr.update(visible=not gguf),
                gr.update(choices=list(GPTQ_BITS) if chosen == "GPTQ" else [4], value=4),
                gr.update(visible=chosen == "GPTQ", value=False),
                gr.update(placeholder="MODEL.TYPE.gguf" if gguf else f"MODEL-{chosen}-4bit-g128"))

    @user_errors
    def on_start(chosen: str, source_name: str | None, type_name: str, out_name: str, replace: bool,
                 calibration_name: str | None, uploaded: str | None, bit_count: Any, group_choice: str,
                 desc_act: bool, sample_count: Any, tokens: Any, data_names: list[str] | None,
                 data_uploads: list[str] | None, request: gr.Request) -> tuple[Any, Any, str]:
        refuse_unless_admin(settings, request.username, "Quantizing a model")
        try:
            if not source_name:
                raise ConfigError("Pick a source model first.")
            if chosen == "GGUF":
                state = start_gguf(source_name, type_name, out_name, replace, calibration_name, uploaded)
            else:
                source_path, target, spec = plan_job(
                    models, source_name, method=chosen.lower(), bits=int(bit_count or 4),
                    group_size=None if group_choice in (None, "auto") else int(group_choice), desc_act=desc_act,
                    samples=int(sample_count or 0), seq_len=int(tokens or 0),
                    output=(out_name or "").strip() or None, overwrite=bool(replace))
                files = calibration_paths(data_names, data_uploads)
                state = task.start(f"{source_name} → {target.name}",
                                   quantized_job(source_path, target, spec, files), finished)
        except WorkbenchError as exc:  # said beside the button; the progress box keeps the last job
            return gr.skip(), gr.skip(), f"**Error:** {error_text(exc)}"
        return progress_html(state, "quantize-progress-box"), gr.Timer(active=True), ""

    def start_gguf(source_name: str, type_name: str, out_name: str, replace: bool, calibration_name: str | None,
                   uploaded: str | None) -> TaskState:
        type_name = gguf_type(type_name).name
        inspect_source(resolve_inside(models, source_name, what="model", must_exist=True))
        target = output_path(models, (out_name or "").strip() or gguf_name(source_name, type_name), ".gguf",
                             overwrite=bool(replace))
        text, _ = read_text_choice(calibration_name, uploaded, "calibration text")
        # make_gguf checks again in the thread (overwrite=True there: the check above is the user's answer)
        return task.start(f"{source_name} → {target.name}", gguf_job(source_name, type_name, target, text),
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

    source.focus(lambda chosen: gr.update(choices=sources(models, chosen)), fmt, source, show_progress="hidden")
    fmt.change(on_format, fmt, [source, kind, gguf_row, gptq_row, data_row, bits, act_order, name],
               show_progress="hidden")
    calibration.focus(lambda: gr.update(choices=[NO_CALIBRATION, *text_files()]), None, calibration,
                      show_progress="hidden")
    start.click(on_start, [fmt, source, kind, name, overwrite, calibration, upload, bits, group, act_order, samples,
                           seq_len, data, data_upload], [progress, timer, note], api_name="quantize_start")
    stop.click(on_stop, None, progress, api_name="quantize_stop")
    timer.tick(on_tick, shown, [progress, model_list, timer, shown], show_progress="hidden",
               concurrency_limit=None)
    operator_only(ctx, panel)
    ctx.session_listeners.append((on_page, {ctx.session}, [progress, timer]))
