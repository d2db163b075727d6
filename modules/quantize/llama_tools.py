"""llama.cpp's own tools, run as child processes: convert_hf_to_gguf.py / convert_lora_to_gguf.py (from
vendor/llama.cpp-converters, which scripts/fetch_llama_converters.sh takes from the pinned llama-cpp-python
source distribution), the quantizer and the importance-matrix collector (modules.quantize.llama_child, through
llama-cpp-python's bindings).

Child processes because the converters bring their own gguf-py that must not mix with the gguf package this
process imported, because llama.cpp aborts the whole process on some bad inputs, and because a child can be
killed: that is how a job is cancelled. Their output is read as it comes, for progress."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modules.errors import Cancelled, ConfigError, ConversionError

ROOT = Path(__file__).resolve().parents[2]
CONVERTERS_DIR = ROOT / "vendor" / "llama.cpp-converters"


@dataclass(frozen=True)
class GgufType:
    """A type llama.cpp's quantizer writes (its llama_ftype is LLAMA_FTYPE_MOSTLY_<name>, or ALL_F32), with its
    rough bits per weight (for the disk estimate) and whether llama.cpp requires an importance matrix for it."""

    name: str
    bits: float
    needs_imatrix: bool = False


GGUF_TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("F32", 32), GgufType("F16", 16), GgufType("BF16", 16), GgufType("Q8_0", 8.5), GgufType("Q6_K", 6.6),
    GgufType("Q5_K_M", 5.7), GgufType("Q5_K_S", 5.5), GgufType("Q5_1", 6), GgufType("Q5_0", 5.5),
    GgufType("Q4_K_M", 4.9), GgufType("Q4_K_S", 4.6), GgufType("Q4_1", 5), GgufType("Q4_0", 4.5),
    GgufType("IQ4_NL", 4.5), GgufType("IQ4_XS", 4.25), GgufType("Q3_K_L", 4.3), GgufType("Q3_K_M", 3.9),
    GgufType("Q3_K_S", 3.5), GgufType("IQ3_M", 3.7), GgufType("IQ3_S", 3.44), GgufType("IQ3_XS", 3.3),
    GgufType("IQ3_XXS", 3.06), GgufType("Q2_K", 3.0), GgufType("Q2_K_S", 3.0, True), GgufType("IQ2_M", 2.7),
    GgufType("IQ2_S", 2.5, True), GgufType("IQ2_XS", 2.31, True), GgufType("IQ2_XXS", 2.06, True),
    GgufType("IQ1_M", 1.75, True), GgufType("IQ1_S", 1.56, True),
)}
#: Types convert_hf_to_gguf.py writes itself; the rest go through the quantizer from F16.
CONVERTER_TYPES = ("F32", "F16", "BF16")


def gguf_type(name: str) -> GgufType:
    """The type called `name` (any case), or ConfigError listing the choices."""
    found = GGUF_TYPES.get(name.upper())
    if found is None:
        raise ConfigError(f"Unknown GGUF type {name!r}; choose one of {', '.join(GGUF_TYPES)}.")
    return found


def converters_dir() -> Path:
    if not (CONVERTERS_DIR / "convert_hf_to_gguf.py").is_file():
        raise ConversionError("llama.cpp's GGUF converters are missing: run scripts/fetch_llama_converters.sh "
                              "(the install scripts run it).")
    return CONVERTERS_DIR


_LINE_END = re.compile(r"[\r\n]")


def run_child(command: list[str], what: str, *, cancel: threading.Event | None = None,
              on_line: Callable[[str], None] | None = None, timeout: float = 3600,
              env: dict[str, str] | None = None) -> None:
    """Run `command` with its output (stdout and stderr together) read as it comes and passed line by line
    (carriage returns end a line too: progress bars) to `on_line`. Killed when `cancel` is set (Cancelled) or
    after `timeout` seconds; a non-zero exit raises ConversionError with the last lines of its output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=ROOT, env=env)
    tail: deque[str] = deque(maxlen=12)

    def pump() -> None:
        assert process.stdout is not None
        pending = ""
        while chunk := process.stdout.read1(65536):  # type: ignore[attr-defined]
            pending += chunk.decode("utf-8", "replace")
            *lines, pending = _LINE_END.split(pending)
            for line in lines:
                if line.strip():
                    tail.append(line)
                    if on_line is not None:
                        on_line(line)
        if pending.strip():
            tail.append(pending)

    reader = threading.Thread(target=pump, name=f"{what}-output", daemon=True)
    reader.start()
    try:
        waited = 0.0
        while process.poll() is None:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{what} was cancelled; nothing was kept.")
            if waited >= timeout:
                raise ConversionError(f"{what} did not finish within {timeout:.0f} s.")
            try:
                process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                waited += 0.2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
    if process.returncode != 0:
        raise ConversionError(f"{what} failed (exit {process.returncode}): {_reason(list(tail))}")


def _reason(tail: list[str]) -> str:
    """The lines of a child's last output that say why it failed (an error line when there is one)."""
    errors = [line.strip() for line in tail if re.search(r"error|failed|exception|abort", line, re.IGNORECASE)]
    shown = errors[-2:] if errors else [line.strip() for line in tail if not line.lstrip().startswith("Writing:")]
    return "\n".join(shown[-3:])[-1500:] or "no output"


def run_converter(script: str, args: list[str], *, cancel: threading.Event | None = None,
                  on_line: Callable[[str], None] | None = None, timeout: float = 3600) -> None:
    """One of llama.cpp's converter scripts, with the gguf-py that ships beside it."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    run_child([sys.executable, str(converters_dir() / script), *args], script, cancel=cancel, on_line=on_line,
              timeout=timeout, env=env)


_TENSOR_DONE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")  # the quantizer's "[  12/ 272] blk.1.attn_q.weight ..."


def quantize_gguf(source: Path, target: Path, type_name: str, *, imatrix: Path | None = None, threads: int = 0,
                  cancel: threading.Event | None = None, progress: Callable[[float], None] | None = None,
                  timeout: float = 3600) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) from an F32/F16/BF16 GGUF `source` to `target`, with an
    importance matrix file (see llama_child.collect_imatrix) when given; `progress` gets the fraction of tensors
    done."""
    kind = gguf_type(type_name)
    if kind.needs_imatrix and imatrix is None:
        raise ConfigError(f"llama.cpp quantizes to {kind.name} only with an importance matrix: pass calibration "
                          "text (--imatrix FILE).")

    def on_line(line: str) -> None:
        match = _TENSOR_DONE.match(line.strip())
        if match and progress is not None:
            progress(int(match[1]) / max(int(match[2]), 1))

    command = [sys.executable, "-m", "modules.quantize.llama_child", "quantize", str(source), str(target), kind.name,
               str(threads), str(imatrix or "")]
    run_child(command, f"llama.cpp's quantizer ({source.name} to {kind.name})", cancel=cancel, on_line=on_line,
              timeout=timeout)
    if not target.is_file():
        raise ConversionError(f"llama.cpp's quantizer wrote no {target.name}.")
    return target


_CHUNK_DONE = re.compile(r"^imatrix chunk (\d+)/(\d+)")


def collect_imatrix(model: Path, text_file: Path, target: Path, *, chunk_tokens: int = 512, threads: int = 0,
                    cancel: threading.Event | None = None, progress: Callable[[float], None] | None = None,
                    timeout: float = 3600) -> Path:
    """An importance matrix for `model` (an F16/BF16/F32 GGUF) from the calibration text in `text_file`, written
    as llama.cpp's imatrix GGUF file `target` (see modules.quantize.llama_child)."""

    def on_line(line: str) -> None:
        match = _CHUNK_DONE.match(line.strip())
        if match and progress is not None:
            progress(int(match[1]) / max(int(match[2]), 1))

    command = [sys.executable, "-m", "modules.quantize.llama_child", "imatrix", str(model), str(text_file),
               str(target), str(chunk_tokens), str(threads)]
    run_child(command, f"The importance matrix of {model.name}", cancel=cancel, on_line=on_line, timeout=timeout)
    return target
