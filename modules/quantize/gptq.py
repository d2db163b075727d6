"""A Transformers model -> a GPTQ or AWQ folder through GPTQModel, calibrated on text the user picks (by default
the instruction set and the raw text that ship in data/). The Model tab and `python -m modules.quantize gptq|awq`
both call make_quantized.

The work runs in a child process (modules.quantize.gptq_child): a Stop kills it at once, whatever layer it is in,
and its memory goes back with it. Its progress lines (one per quantized layer) drive the progress bar. The
folder is written under a hidden `.NAME.part` name beside the output and takes its name only when complete;
whatever happens, the partial folder is removed. Disk and memory are checked against an estimate first.

GPTQ takes 2/3/4/8 bits, a group size (one scale per that many input weights: 32 keeps more precision than 128,
1024 less; -1 is one group per row) and act-order (desc_act: quantize the columns with the largest activations
first). AWQ is 4-bit and needs every layer's input width to be a multiple of its group size.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modules.errors import ConfigError, ConversionError, NotEnoughSpace, PathError
from modules.paths import resolve_inside
from modules.quantize.job import (
    ProgressCallback,
    Tracker,
    check_free_space,
    human_size,
    output_path,
    safetensors_header,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
#: The calibration data when the user picks none: the shipped instruction set and raw text.
DEFAULT_CALIBRATION = (DATA_DIR / "instruction-data.json", DATA_DIR / "the-verdict.txt")
GPTQ_BITS = (2, 3, 4, 8)
AWQ_BITS = (4,)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
AWQ_GROUP_SIZES = (16, 32, 64, 128)  # what GPTQModel's AWQ kernels run


@dataclass(frozen=True)
class QuantSpec:
    """What to make: the method (gptq or awq), bits, group size, act-order, and the calibration: how many
    samples of at most how many tokens."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    samples: int = 128
    seq_len: int = 512

    def check(self) -> None:
        """ConfigError for a combination GPTQModel does not make."""
        if self.method not in ("gptq", "awq"):
            raise ConfigError(f"Unknown quantization method {self.method!r}; choose gptq or awq.")
        allowed = GPTQ_BITS if self.method == "gptq" else AWQ_BITS
        if self.bits not in allowed:
            raise ConfigError(f"{self.method.upper()} makes {'/'.join(map(str, allowed))}-bit weights, not "
                              f"{self.bits}-bit.")
        sizes = GROUP_SIZES if self.method == "gptq" else AWQ_GROUP_SIZES
        if self.group_size not in sizes:
            raise ConfigError(f"{self.method.upper()}'s group size must be one of {', '.join(map(str, sizes))}, not "
                              f"{self.group_size}.")
        if self.desc_act and self.method == "awq":
            raise ConfigError("Act-order (desc_act) is a GPTQ setting; AWQ has none.")
        if self.samples < 1:
            raise ConfigError("Take at least one calibration sample.")
        if self.seq_len < 16:
            raise ConfigError("Calibration samples need at least 16 tokens.")


def quant_name(model_name: str, spec: QuantSpec) -> str:
    """The folder name that says what it is: `<model>-GPTQ-4bit-g128[-act]` or `<model>-AWQ-4bit-g128`."""
    group = f"-g{spec.group_size}" if spec.group_size > 0 else ""
    return f"{model_name}-{spec.method.upper()}-{spec.bits}bit{group}{'-act' if spec.desc_act else ''}"


@dataclass(frozen=True)
class FloatSource:
    """A full-precision Transformers folder: its weights in 16 bits (bytes), how many of them are in layers
    GPTQ quantizes (2-D weights of the decoder layers), and those layers' input widths."""

    path: Path
    parameters: int
    quantizable: int
    widths: frozenset[int]


def inspect_float_source(path: Path) -> FloatSource:
    """Check that `path` is a Transformers folder in full precision (not GPTQ, AWQ, bitsandbytes, ...)."""
    config_file = path / "config.json"
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not config_file.is_file() or not files:
        raise ConfigError(f"{path.name} is not a Transformers folder (config.json + *.safetensors): GPTQ and AWQ "
                          "quantize from one.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path.name}/config.json is not readable JSON: {exc}") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if quantization or (path / "quantize_config.json").is_file():
        method = (quantization or {}).get("quant_method", "gptq") if isinstance(quantization, dict) else "gptq"
        raise ConfigError(f"{path.name} is already quantized ({method}); quantize from its full-precision folder, "
                          "as requantizing loses more.")
    parameters = quantizable = 0
    widths: set[int] = set()
    for file in files:
        for name, info in safetensors_header(file).items():
            if not isinstance(info, dict) or "shape" not in info:
                continue
            shape = [int(d) for d in info["shape"]]
            count = 1
            for dim in shape:
                count *= dim
            parameters += count
            if len(shape) == 2 and ".layers." in name and name.endswith(".weight"):
                quantizable += count
                widths.add(shape[1])
    return FloatSource(path, parameters, quantizable, frozenset(widths))


def awq_group_size(source: FloatSource, wanted: int = 128) -> int:
    """`wanted` when every layer's input width is a multiple of it, else the largest group size that fits (AWQ
    refuses ragged groups); ConfigError when none does."""
    fitting = [g for g in AWQ_GROUP_SIZES if g <= wanted and all(w % g == 0 for w in source.widths)]
    if not fitting:
        raise ConfigError(f"AWQ needs every layer's input width to be a multiple of the group size, and no group "
                          f"size of at most {wanted} divides {', '.join(map(str, sorted(source.widths)))}.")
    return fitting[-1]


def check_groups(source: FloatSource, spec: QuantSpec) -> None:
    """AWQ needs every layer's input width to be a multiple of the group size; say which group sizes fit."""
    if spec.method != "awq" or spec.group_size <= 0:
        return
    ragged = sorted(w for w in source.widths if w % spec.group_size)
    if ragged:
        fitting = [g for g in AWQ_GROUP_SIZES if all(w % g == 0 for w in source.widths)]
        raise ConfigError(f"AWQ needs every layer's input width to be a multiple of the group size: "
                          f"{source.path.name} has {', '.join(map(str, ragged))}, not a multiple of "
                          f"{spec.group_size}; choose --group-size {' or '.join(map(str, fitting[-2:])) or 'none'}.")


def estimate_bytes(source: FloatSource, spec: QuantSpec) -> tuple[int, int]:
    """(bytes of the output folder, bytes of memory the job needs). The quantized layers take `bits` per weight
    plus a 16-bit scale and a packed zero per group; the rest (embeddings, norms) stays 16-bit. The job holds
    the model in 16 bits plus a layer's calibration activations and Hessians."""
    group = spec.group_size if spec.group_size > 0 else 4096
    per_weight = spec.bits / 8 + (2 + spec.bits / 8) / group
    output = int(source.quantizable * per_weight + (source.parameters - source.quantizable) * 2) + (4 << 20)
    memory = int(source.parameters * 2 * 1.5) + (1 << 30)
    return output, memory


def read_calibration(files: list[Path] | tuple[Path, ...]) -> list[list[dict[str, Any]]]:
    """The calibration documents of each file, as the child reads them: a .txt file is one raw text; a .json or
    .jsonl file holds records, Alpaca-style (instruction, input, output: a user turn and its answer), chat
    (`messages`) or plain {"text": ...}. ConfigError names the file and record that cannot be read."""
    out = []
    for file in files:
        try:
            raw = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read the calibration file {file}: {exc}") from None
        if Path(file).suffix.lower() not in (".json", ".jsonl"):
            documents = [{"text": raw}] if raw.strip() else []
        else:
            documents = [_calibration_record(record, file, number) for number, record in
                         enumerate(_json_records(raw, file), 1)]
        if not documents:
            raise ConfigError(f"The calibration file {file} holds no text.")
        out.append(documents)
    return out


def _json_records(raw: str, file: Path) -> list[Any]:
    try:
        if Path(file).suffix.lower() == ".jsonl":
            return [json.loads(line) for line in raw.splitlines() if line.strip()]
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"The calibration file {file} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ConfigError(f"The calibration file {file} must hold a list of records.")
    return data


def _calibration_record(record: Any, file: Path, number: int) -> dict[str, Any]:
    if isinstance(record, str):
        return {"text": record}
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            return {"messages": [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))}
                                 for m in record["messages"] if isinstance(m, dict)]}
        if "instruction" in record:
            user = str(record["instruction"]) + (f"\n\n{record['input']}" if record.get("input") else "")
            return {"messages": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": str(record.get("output", ""))}]}
        if isinstance(record.get("text"), str):
            return {"text": record["text"]}
    raise ConfigError(f"The calibration file {file}, record {number}: expected instruction/input/output, "
                      "messages, or text.")


def plan_job(models: Path, model: str, *, method: str, bits: int = 4, group_size: int | None = None,
             desc_act: bool = False, samples: int = 128, seq_len: int = 512, output: str | None = None,
             overwrite: bool = False) -> tuple[Path, Path, QuantSpec]:
    """(source folder, output folder, spec) for quantizing `model` of `models`, all checked before anything runs:
    the command line and the Model tab both start from here. A group size left out is 128, or for AWQ the
    largest that fits (awq_group_size); the output is named by quant_name unless `output` is given."""
    source_path = resolve_inside(models, model, what="model", must_exist=True)
    source = inspect_float_source(source_path)
    if group_size is None:
        group_size = awq_group_size(source) if method == "awq" else 128
    spec = QuantSpec(method=method, bits=bits, group_size=group_size, desc_act=desc_act, samples=samples,
                     seq_len=seq_len)
    spec.check()
    check_groups(source, spec)
    target = output_path(models, output or quant_name(source_path.name, spec), "", overwrite=overwrite)
    return source_path, target, spec


def make_quantized(source_path: Path, target: Path, spec: QuantSpec, *,
                   calibration: list[Path] | tuple[Path, ...] = DEFAULT_CALIBRATION, overwrite: bool = False,
                   progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
                   timeout: float = 24 * 3600) -> Path:
    """Write `source_path` (a full-precision Transformers folder) as the GPTQ/AWQ folder `target`, calibrated on
    `calibration` files. Refuses before starting when `target` exists (unless `overwrite`), when the settings or
    the calibration files are bad, or when disk or memory is short."""
    import psutil

    from modules.quantize.llama_tools import run_child

    spec.check()
    if target.exists() and not overwrite:
        raise PathError(f"{target.name} already exists; choose another name or allow overwriting.")
    source = inspect_float_source(source_path)
    check_groups(source, spec)
    documents = read_calibration(calibration)
    output, memory = estimate_bytes(source, spec)
    check_free_space(target.parent, int(output * 1.1), f"Writing {target.name}")
    available = psutil.virtual_memory().available
    if memory > available:
        raise NotEnoughSpace(f"Quantizing {source_path.name} needs about {human_size(memory)} of memory and only "
                             f"{human_size(available)} is free. Close other programs or quantize a smaller model.")

    tracker = Tracker({"load": 1.0, "quantize": 8.0, "save": 1.0}, progress, cancel)
    part = target.with_name(f".{target.name}.part")
    old = target.with_name(f".{target.name}.old")
    job_file = target.with_name(f".{target.name}.job.json")

    reported: list[str] = []  # the child's own `error:` line, when it failed with one

    def on_line(line: str) -> None:  # the child's lines may follow a progress bar GPTQModel drew on that line
        if error := _ERROR.search(line):
            reported.append(error[1].strip())
        elif match := _LAYER.search(line):
            tracker.update("quantize", int(match[1]) / max(int(match[2]), 1))
        elif _SAVING in line:
            tracker.update("save", 0.0)
        elif _LOADED in line:
            tracker.update("quantize", 0.0)

    try:
        shutil.rmtree(part, ignore_errors=True)
        tracker.update("load", 0.0)
        job = {"source": str(source.path), "target": str(part), "spec": asdict(spec), "documents": documents}
        job_file.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ)
        # GPTQModel sizes its CPU pool at half the cores and its loader pool at 2: it refuses to start on 2 cores
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
        what = f"{spec.method.upper()} quantization of {source_path.name}"
        try:
            run_child([sys.executable, "-m", "modules.quantize.gptq_child", str(job_file)], what, cancel=cancel,
                      on_line=on_line, timeout=timeout, env=env)
        except ConversionError:
            if not reported:
                raise
            raise ConversionError(f"{what} failed: {reported[-1]}") from None
        tracker.check()
        if not (part / "config.json").is_file():
            raise ConversionError(f"GPTQModel wrote no model into {part.name}.")
        if target.exists():
            os.replace(target, old)
        os.replace(part, target)
        tracker.update("save", 1.0, "done")
    finally:
        job_file.unlink(missing_ok=True)
        for leftover in (part, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return target


_LAYER = re.compile(r"workbench: layer (\d+)/(\d+)")
_ERROR = re.compile(r"workbench: error: (.*)")
_LOADED = "workbench: loaded"
_SAVING = "workbench: saving"
