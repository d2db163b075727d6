"""Perplexity of the loaded model (with whatever LoRAs are applied) on a text, for both loaders, with the
sliding-window method of Transformers' perplexity guide: windows of `context_length` tokens moved by `stride`,
each scoring only the tokens the previous window did not, with the rest of the window as context.

Results are appended to a table (user_data/training/perplexity.json) so runs can be compared."""
from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modules.errors import ConfigError, GenerationError
from modules.paths import atomic_write_text


@dataclass
class PerplexityResult:
    model: str
    loader: str
    loras: list[str]
    source: str
    context_length: int
    stride: int
    tokens: int
    perplexity: float
    seconds: float
    time: float


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window; every token after the first is scored once."""
    if context_length < 2:
        raise ConfigError("The context length must be at least 2 tokens.")
    if not 1 <= stride <= context_length:
        raise ConfigError(f"The stride must be between 1 and the context length ({context_length}).")
    spans = []
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        first = max(previous_end, begin + 1)  # a window's first token has no context to be predicted from
        if first < end:
            spans.append((begin, end, first))
        previous_end = end
        if end == n_tokens:
            break
    return spans


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) for rows of logits."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return float((logsumexp - logits[np.arange(len(targets)), targets]).sum())


def _transformers_nll(model: Any, ids: list[int], span: tuple[int, int, int]) -> float:
    import torch

    begin, end, first = span
    net = model.model
    device = next(net.parameters()).device
    with torch.inference_mode():
        input_ids = torch.tensor([ids[begin:end]], device=device)
        keep = torch.arange(first - 1 - begin, end - 1 - begin, device=device)  # positions predicting [first, end)
        logits = net(input_ids=input_ids, logits_to_keep=keep, use_cache=False).logits[0]
        targets = torch.tensor(ids[first:end], device=device)
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return float(nll)


def _llama_cpp_nll(model: Any, ids: list[int], span: tuple[int, int, int]) -> float:
    """Decode the window on a cleared context with logits for every position, through llama-cpp-python's own
    batch; the loader's prompt cache is invalidated afterwards (n_tokens = 0)."""
    llama = model._llama
    begin, end, first = span
    window = ids[begin:end]
    n_vocab = llama.n_vocab()
    llama.reset()
    llama._ctx.kv_cache_clear()
    total = 0.0
    try:
        for start in range(0, len(window), llama.n_batch):
            chunk = window[start:start + llama.n_batch]
            llama._batch.set_batch(chunk, n_past=start, logits_all=True)
            llama._ctx.decode(llama._batch)
            logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(len(chunk), n_vocab))
            # row r predicts window[start + r + 1]; score those landing in [first, end)
            rows = [r for r in range(len(chunk)) if first <= begin + start + r + 1 < end]
            if rows:
                targets = np.array([window[start + r + 1] for r in rows])
                total += _log_softmax_pick(logits[rows], targets)
    except RuntimeError as exc:
        raise GenerationError(f"llama.cpp failed while scoring: {exc}") from None
    finally:
        llama.reset()
        llama._ctx.kv_cache_clear()
    return total


def evaluate_perplexity(manager: Any, text: str, *, source: str, context_length: int, stride: int,
                        max_tokens: int = 0, cancel: threading.Event | None = None,
                        progress: Callable[[float], None] | None = None) -> PerplexityResult:
    """Perplexity of the manager's loaded model on `text` (the generation queue is held meanwhile)."""
    if not text.strip():
        raise ConfigError("The text to measure perplexity on is empty.")
    started = time.perf_counter()
    with manager.exclusive() as model:
        if model.loader_name not in ("transformers", "llama.cpp"):
            raise ConfigError(f"Perplexity needs the Transformers or llama.cpp loader, not {model.loader_name}.")
        ids = model.encode(text, add_bos=True)
        if max_tokens:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ConfigError("The text is shorter than two tokens.")
        context_length = min(context_length, model.context_length)
        spans = windows(len(ids), context_length, min(stride, context_length))
        score = _transformers_nll if model.loader_name == "transformers" else _llama_cpp_nll
        nll, counted = 0.0, 0
        for index, span in enumerate(spans):
            if cancel is not None and cancel.is_set():
                raise GenerationError("Perplexity evaluation was cancelled.")
            nll += score(model, ids, span)
            counted += span[1] - span[2]
            if progress is not None:
                progress((index + 1) / len(spans))
        info = model.info()
    return PerplexityResult(model=info.name, loader=info.loader, loras=list(info.loras), source=source,
                            context_length=context_length, stride=min(stride, context_length), tokens=counted,
                            perplexity=round(math.exp(nll / counted), 4), seconds=round(time.perf_counter() - started,
                                                                                        2), time=round(time.time()))


def results_file(user_data_dir: Path) -> Path:
    return Path(user_data_dir) / "training" / "perplexity.json"


def load_results(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"The perplexity table {path} is damaged (not JSON); move it away to start a new one.") \
            from None
    return data if isinstance(data, list) else []


def record_result(path: Path, result: PerplexityResult) -> list[dict[str, Any]]:
    rows = load_results(path) + [asdict(result)]
    atomic_write_text(path, json.dumps(rows, indent=1))
    return rows
