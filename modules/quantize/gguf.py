"""A model -> one GGUF file of a chosen type: a Transformers folder goes through llama.cpp's convert_hf_to_gguf.py
(straight to F32/F16/BF16, or to F16 first), an F32/F16/BF16 GGUF is taken as it is, and every other type comes
from llama.cpp's quantizer, with an importance matrix collected on calibration text when one is given.

Intermediate files are hidden `.part` files beside the output (the model list skips them) and are removed
whatever happens; the output appears only when complete. The Model tab and `python -m modules.quantize gguf`
both call make_gguf."""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from modules.errors import ConfigError, PathError
from modules.quantize.job import ProgressCallback, Tracker, check_free_space, safetensors_header
from modules.quantize.llama_tools import CONVERTER_TYPES, collect_imatrix, gguf_type, quantize_gguf, run_converter

_FLOAT_GGUF_TYPES = {"F32", "F16", "BF16"}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Source:
    """What is about to be converted: a Transformers folder or a float GGUF, with its weight count."""

    path: Path
    is_gguf: bool
    parameters: int
    tensors: int


def gguf_name(model_name: str, type_name: str) -> str:
    """The file name that says what it is: `<model>.<TYPE>.gguf` (a GGUF source loses its own type suffix)."""
    stem = model_name.removesuffix(".gguf")
    stem = re.sub(r"\.(F32|F16|BF16)$", "", stem, flags=re.IGNORECASE)
    return f"{stem}.{type_name.upper()}.gguf"


def inspect_source(path: Path) -> Source:
    """Check that `path` can be converted and count its weights (for the disk estimate and progress)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{path.name} is not a readable GGUF file: {exc}") from None
        quantized = sorted({t.tensor_type.name for t in reader.tensors} - _FLOAT_GGUF_TYPES)
        if quantized:
            raise ConfigError(f"{path.name} is already quantized ({', '.join(quantized)}); quantize from its "
                              "Transformers folder or an F16/BF16/F32 GGUF instead, as requantizing loses more.")
        return Source(path, True, sum(int(t.n_elements) for t in reader.tensors), len(reader.tensors))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not (path / "config.json").is_file() or not files:
        raise ConfigError(f"{path.name} is neither a Transformers folder (config.json + *.safetensors) nor a "
                          "GGUF file.")
    parameters = tensors = 0
    for file in files:
        for info in safetensors_header(file).values():
            if isinstance(info, dict) and "shape" in info:
                count = 1
                for dim in info["shape"]:
                    count *= int(dim)
                parameters += count
                tensors += 1
    return Source(path, False, parameters, tensors)


def estimate_bytes(source: Source, type_name: str) -> tuple[int, int]:
    """(bytes of the output, bytes needed on disk at the peak: the F16 intermediate, the imatrix and the output,
    with a margin)."""
    output = int(source.parameters * gguf_type(type_name).bits / 8)
    intermediate = 0 if source.is_gguf or type_name.upper() in CONVERTER_TYPES else source.parameters * 2
    return output, int((output + intermediate) * 1.05) + (32 << 20)


def make_gguf(source_path: Path, out_file: Path, type_name: str, *, calibration: str | None = None,
              overwrite: bool = False, threads: int = 0, imatrix_chunk: int = 512,
              progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> Path:
    """Write `source_path` (a Transformers folder or an F32/F16/BF16 GGUF) as `out_file` of type `type_name`,
    with an importance matrix collected on `calibration` text when given. Refuses before starting when
    `out_file` exists (unless `overwrite`), when the type is unknown, or when the disk is short."""
    kind = gguf_type(type_name)
    if out_file.exists() and not overwrite:
        raise PathError(f"{out_file.name} already exists; choose another name or allow overwriting.")
    source = inspect_source(source_path)
    if kind.needs_imatrix and calibration is None:
        raise ConfigError(f"llama.cpp quantizes to {kind.name} only with an importance matrix: give calibration "
                          "text (--imatrix FILE).")
    if calibration is not None:
        if kind.name in _FLOAT_GGUF_TYPES:
            raise ConfigError(f"An importance matrix only guides quantized types, not {kind.name}.")
        if not calibration.strip():
            raise ConfigError("The calibration text for the importance matrix is empty.")
    _, needed = estimate_bytes(source, kind.name)
    check_free_space(out_file.parent, needed, f"Writing {out_file.name}")

    converting = not source.is_gguf
    direct = converting and kind.name in CONVERTER_TYPES  # the converter writes the final type itself
    stages = {"convert": 1.0} if converting else {}
    if calibration is not None:
        stages["imatrix"] = 2.0
    if not direct:
        stages["quantize"] = 1.0
    tracker = Tracker(stages, progress, cancel)
    hidden = out_file.with_name(f".{out_file.name}")
    part, f16, imatrix, calibration_file = (hidden.with_name(hidden.name + suffix) for suffix in
                                            (".part", ".f16.part", ".imatrix.part", ".calibration.part"))
    try:
        tracker.update(next(iter(stages)), 0.0)
        if converting:
            _convert(source, f16 if not direct else part, kind.name if direct else "F16", tracker, cancel)
        float_gguf = source.path if source.is_gguf else f16
        if calibration is not None:
            tracker.check()
            calibration_file.write_text(calibration, encoding="utf-8")
            collect_imatrix(float_gguf, calibration_file, imatrix, chunk_tokens=imatrix_chunk, threads=threads,
                            cancel=cancel, progress=lambda f: tracker.update("imatrix", f))
        if not direct:
            tracker.check()
            quantize_gguf(float_gguf, part, kind.name, imatrix=imatrix if calibration is not None else None,
                          threads=threads, cancel=cancel, progress=lambda f: tracker.update("quantize", f))
        tracker.check()
        os.replace(part, out_file)
        tracker.update(list(stages)[-1], 1.0, "done")
    finally:
        for leftover in (part, f16, imatrix, calibration_file):
            leftover.unlink(missing_ok=True)
    return out_file


_CONVERTED_TENSOR = re.compile(r"^INFO:hf-to-gguf:\S+,\s+torch\.")
_WRITING = re.compile(r"^Writing:\s+(\d+)%")


def _convert(source: Source, target: Path, type_name: str, tracker: Tracker,
             cancel: threading.Event | None) -> None:
    """convert_hf_to_gguf.py, its progress read from its log: each tensor it prepares (the first half), then the
    percentage of its writing bar."""
    seen = 0

    def on_line(line: str) -> None:
        nonlocal seen
        if _CONVERTED_TENSOR.match(line):
            seen += 1
            tracker.update("convert", 0.5 * min(seen / max(source.tensors, 1), 1.0))
        elif match := _WRITING.match(line.strip()):
            tracker.update("convert", 0.5 + int(match[1]) / 200)

    run_converter("convert_hf_to_gguf.py", [str(source.path), "--outtype", type_name.lower(), "--outfile",
                                            str(target)], cancel=cancel, on_line=on_line)
