"""Quick looks into a GGUF file before llama.cpp loads it.

`trained_context` walks the metadata with struct and seeks, without building the whole metadata in Python as
gguf.GGUFReader does (seconds for a large vocabulary); `diagnose` uses GGUFReader to say precisely why a file
that llama.cpp refused is broken, which is only worth its cost after a failure.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from gguf import GGUFValueType, LlamaFileType

from modules.errors import ModelLoadError

MAGIC = b"GGUF"
_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


class _Truncated(Exception):
    pass


def _read(handle: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise _Truncated
    return struct.unpack(fmt, data)[0]


def _read_string(handle: BinaryIO) -> bytes:
    length = int(_read(handle, "<Q"))
    data = handle.read(length)
    if len(data) != length:
        raise _Truncated
    return data


def _value(handle: BinaryIO, kind: int, keep: bool) -> object:
    """Read (or, when not kept, skip) one metadata value."""
    if kind == GGUFValueType.STRING:
        return _read_string(handle).decode("utf-8", "replace")
    if kind == GGUFValueType.ARRAY:
        item_kind, count = int(_read(handle, "<I")), int(_read(handle, "<Q"))
        if item_kind in _SCALAR:
            handle.seek(struct.calcsize(_SCALAR[item_kind]) * count, 1)
        else:
            for _ in range(count):
                _value(handle, item_kind, False)
        return None
    if kind not in _SCALAR:
        raise ValueError(f"unknown metadata type {kind}")
    return _read(handle, _SCALAR[kind])


def file_type_name(file_type: object) -> str:
    """The quantization type a GGUF's `general.file_type` names (Q4_K_M, F16, ...), for the model's info."""
    if file_type in (None, ""):
        return "GGUF"
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"GGUF type {file_type}"


def trained_context(file: Path) -> int:
    """The `<architecture>.context_length` of a GGUF file (0 when absent). Raises ModelLoadError for a file
    that is not GGUF at all or whose metadata is cut short."""
    try:
        with open(file, "rb") as handle:
            if handle.read(4) != MAGIC:
                raise ModelLoadError(f"{file.name} is not a GGUF file (it does not start with b'GGUF').")
            _read(handle, "<I")  # version
            _read(handle, "<Q")  # tensor count
            kv_count = int(_read(handle, "<Q"))
            values: dict[str, object] = {}
            for _ in range(kv_count):
                key = _read_string(handle).decode("utf-8", "replace")
                kind = int(_read(handle, "<I"))
                wanted = key == "general.architecture" or key.endswith(".context_length")
                value = _value(handle, kind, wanted)
                if wanted:
                    values[key] = value
    except OSError as exc:
        raise ModelLoadError(f"Cannot read {file.name}: {exc.strerror}.") from None
    except (_Truncated, ValueError, struct.error):
        raise ModelLoadError(f"{file.name} is a corrupt or truncated GGUF file: its metadata is incomplete.") from None
    architecture = values.get("general.architecture")
    context = values.get(f"{architecture}.context_length")
    return int(context) if isinstance(context, (int, float)) else 0


def diagnose(file: Path) -> str | None:
    """Why a GGUF file is broken (truncated tensor data, damaged header), or None if it looks whole."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(file))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises many kinds of errors on a damaged file
        return f"{file.name} is a corrupt or truncated GGUF file: {exc}"
    size = file.stat().st_size
    if end > size:
        return f"{file.name} is truncated: its tensors need {end:,} bytes but the file has {size:,}."
    return None
