"""The llama.cpp work that runs in a child process (see modules.quantize.llama_tools): the quantizer and the
importance-matrix collector, through llama-cpp-python's bindings.

    python -m modules.quantize.llama_child quantize SRC DST TYPE THREADS [IMATRIX_FILE]
    python -m modules.quantize.llama_child imatrix MODEL TEXT_FILE OUT_FILE CHUNK_TOKENS THREADS

The importance matrix follows llama.cpp's tools/imatrix: during decoding of the calibration text, every matrix
multiplication with a weight of a block (`blk.*`) reports its input activations through the context's eval
callback, and each input column's sum of squares and the number of rows are accumulated per weight. The file is
llama.cpp's imatrix GGUF (`<weight>.in_sum2`, `<weight>.counts`, imatrix.* metadata), so llama.cpp's own
llama-quantize reads it too; the quantizer takes the per-column means (llama_model_imatrix_data). Mixture-of-
experts weights (MUL_MAT_ID) are not collected: those tensors are quantized without one.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import numpy as np

GGML_TYPE_F32 = 0
_MIN_ROWS = 16  # tools/imatrix ignores multiplications over fewer rows (single-token steps)


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64);
    checked against ggml_tensor_overhead() before use."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10), ("view_src", ctypes.POINTER(GgmlTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
]
_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + 4 bytes padding


def _ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    return lib


def _weight_name(name: bytes) -> str:
    """tools/imatrix's filter_tensor_name: a backend copy is named `backend#weight#n`."""
    text = name.decode("utf-8", "replace")
    parts = text.split("#")
    return parts[1] if len(parts) > 1 else text


class Collector:
    """Sums of squared input activations per weight, fed by the eval callback."""

    def __init__(self, ggml: ctypes.CDLL):
        if ggml.ggml_tensor_overhead() != _GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
            raise RuntimeError("this llama.cpp build lays out ggml_tensor differently than expected; the "
                               "importance matrix cannot be collected")
        self.mul_mat = next(op for op in range(200) if ggml.ggml_op_name(op) == b"MUL_MAT")
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def wanted(self, t: GgmlTensor) -> bool:
        if t.op != self.mul_mat:
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        return (src1.ne[1] >= _MIN_ROWS and src1.type == GGML_TYPE_F32 and src0.ne[2] * src0.ne[3] == 1
                and _weight_name(src0.name).startswith("blk."))

    def collect(self, t: GgmlTensor) -> None:
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = _weight_name(src0.name)
        ne = [src1.ne[i] for i in range(4)]
        nb = [src1.nb[i] for i in range(4)]
        span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(src1.data))
        x = np.lib.stride_tricks.as_strided(raw.view(np.float32) if nb[0] == 4 else raw, shape=ne[::-1],
                                            strides=nb[::-1]).reshape(-1, ne[0]).astype(np.float64)
        squares = (x * x).sum(axis=0)
        if not np.isfinite(squares).all():
            raise RuntimeError(f"non-finite activations in {name}")
        if name in self.sums:
            self.sums[name] += squares
        else:
            self.sums[name] = squares
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def callback(self) -> ctypes._CFuncPtr:
        import llama_cpp

        def on_eval(pointer: int, ask: bool, _user: int) -> bool:
            try:
                t = GgmlTensor.from_address(pointer)
                if ask:
                    return self.wanted(t)
                self.collect(t)
                return True
            except BaseException as exc:  # noqa: BLE001 - never unwind through C: stop the graph, report after
                self.error = exc
                return False

        return llama_cpp.ggml_backend_sched_eval_callback(on_eval)


def collect_imatrix(model_path: str, text_path: str, out_path: str, chunk_tokens: int, threads: int) -> int:
    import gguf
    import llama_cpp
    from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

    quiet = llama_cpp.llama_log_callback(lambda *_: None)  # referenced until the end: llama.cpp keeps calling it
    llama_cpp.llama_log_set(quiet, None)
    collector = Collector(_ggml_base())
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = chunk_tokens
    if threads:
        context_params.n_threads = context_params.n_threads_batch = threads
    text = Path(text_path).read_text(encoding="utf-8")
    tokens = model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    bos = [model.token_bos()] if model.add_bos_token() and model.token_bos() >= 0 else []
    step = chunk_tokens - len(bos)
    chunks = [c for c in (bos + tokens[i:i + step] for i in range(0, len(tokens), step)) if len(c) >= _MIN_ROWS]
    if not chunks:
        model.close()
        print(f"error: the calibration text has {len(tokens)} tokens; it needs at least {_MIN_ROWS}.", flush=True)
        return 3
    callback = collector.callback()
    context_params.cb_eval = callback
    context = LlamaContext(model=model, params=context_params, verbose=False)
    batch = LlamaBatch(n_tokens=chunk_tokens, embd=0, n_seq_max=1, verbose=False)
    try:
        _decode_chunks(context, batch, chunks, collector)
    finally:  # in this order: a context freed after its model crashes
        batch.close()
        context.close()
        model.close()
    if not collector.sums:
        print("error: no matrix multiplication of the model's blocks was seen.", flush=True)
        return 3
    writer = gguf.GGUFWriter(out_path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [Path(text_path).name])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, len(chunks))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_tokens)
    for name in sorted(collector.sums):
        writer.add_tensor(f"{name}.in_sum2", collector.sums[name].astype(np.float32)[None, :])
        writer.add_tensor(f"{name}.counts", np.array([[collector.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"imatrix: {len(collector.sums)} weights, {sum(len(c) for c in chunks)} tokens", flush=True)
    return 0


def _decode_chunks(context: Any, batch: Any, chunks: list[list[int]], collector: Collector) -> None:
    for index, chunk in enumerate(chunks):
        context.kv_cache_clear()
        # logits for every position, as tools/imatrix asks: otherwise the last block computes only the last
        # token's row and its feed-forward weights would see too few rows to be collected
        batch.set_batch(chunk, n_past=0, logits_all=True)
        try:
            context.decode(batch)
        except RuntimeError:
            if collector.error is None:
                raise
        if collector.error is not None:
            raise collector.error
        print(f"imatrix chunk {index + 1}/{len(chunks)}", flush=True)


def read_imatrix(path: str) -> dict[str, np.ndarray]:
    """Per-column mean squared activation of each weight, as llama-quantize derives it from the file."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    means = {}
    for key, sums in tensors.items():
        if key.endswith(".in_sum2"):
            name = key.removesuffix(".in_sum2")
            counts = tensors.get(f"{name}.counts")
            count = float(counts[0]) if counts is not None and len(counts) else 0.0
            means[name] = sums / count if count > 0 else np.ones_like(sums)
    return means


def quantize(source: str, target: str, type_name: str, threads: int, imatrix_path: str = "") -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if type_name == "F32" else
                           f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    keep = []
    if imatrix_path:
        means = read_imatrix(imatrix_path)
        entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()  # the last one, zeroed, ends the list
        for entry, (name, values) in zip(entries, means.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            encoded = ctypes.create_string_buffer(name.encode())
            keep += [values, encoded]
            entry.name = ctypes.cast(encoded, ctypes.c_char_p)
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    return int(llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)))


def main(argv: list[str]) -> int:
    if len(argv) in (5, 6) and argv[0] == "quantize":
        return quantize(argv[1], argv[2], argv[3], int(argv[4]), argv[5] if len(argv) == 6 else "")
    if len(argv) == 6 and argv[0] == "imatrix":
        return collect_imatrix(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
