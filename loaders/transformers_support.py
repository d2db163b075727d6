"""Small pieces the Transformers loader needs: the single-sequence decode loop, streaming, token events
(incremental detokenization, log-probabilities), encode/decode through the folder's tokenizer, weight-file discovery and a memory check before loading."""
from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.errors import ModelLoadError
from modules.generation_params import TokenEvent, TopLogprob

if TYPE_CHECKING:  # torch is imported when a model loads, not when the loader is listed (--help)
    from modules.samplers.draws import SeededDraws

_SAFE = ("*.safetensors",)
_PICKLE = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def weight_files(folder: Path, *, allow_pickle: bool) -> list[Path]:
    files = [p for pattern in _SAFE for p in sorted(folder.glob(pattern))]
    if not files and allow_pickle:
        files = [p for pattern in _PICKLE for p in sorted(folder.glob(pattern)) if "training_args" not in p.name]
    return files


def pick_dtype(choice: str, path: Path, device: str) -> Any:
    """'auto' keeps the checkpoint's dtype, except float16 on CPU (slow and lossy there), which becomes float32."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    stored = None
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        stored = data.get("dtype") or data.get("torch_dtype")
    if stored == "float16" and device == "cpu":
        return torch.float32
    return getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else "auto"


def check_memory(weights: list[Path], options: Any, cuda: bool) -> None:
    """Refuse a CPU load that cannot fit in free RAM, before Transformers starts and the OS kills us."""
    if cuda or options.disk_offload or options.cpu_memory:
        return
    import psutil

    needed = sum(p.stat().st_size for p in weights)
    if options.dtype == "float32":
        needed *= 2  # checkpoints are usually 16-bit
    available = psutil.virtual_memory().available
    if needed > available * 0.95:
        raise ModelLoadError(f"Not enough memory: the weights need about {needed / 2**30:.1f} GiB and "
                             f"{available / 2**30:.1f} GiB are free. Try a quantized GGUF with llama.cpp, or "
                             "cpu_memory with disk_offload.")


class HfTokens:
    """encode/decode through a Hugging Face tokenizer (`self.tokenizer`), for every loader that reads a model
    folder's tokenizer: plain text never gets special tokens added, and a BOS is put first only when asked."""

    tokenizer: Any

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class TokenStreamer:
    """A generate() streamer that hands each generated token id to `deliver` (the prompt, which generate() puts
    first, is skipped)."""

    def __init__(self, deliver: Callable[[int], None]):
        self._deliver = deliver
        self._skip = True

    def put(self, value: Any) -> None:
        if self._skip:  # the first call carries the prompt
            self._skip = False
            return
        for token in value.reshape(-1).tolist():
            self._deliver(int(token))

    def end(self) -> None:
        """Nothing to do: the thread pump delivers the end."""


class IncrementalDetokenizer:
    """Text deltas from token ids without re-decoding the whole output each step (vLLM's offsets method):
    decode a short window, emit what it adds, hold back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text has been emitted up to _read
        self._read = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""


class TokenEvents:
    """One reply's token ids -> TokenEvents: the text each adds, and its log-probabilities when asked for. The one
    place both decode paths (a sequence alone, a row of a batch) turn a token into what the caller sees."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool, recorder: LogprobRecorder | None,
                 stop_ids: set[int]):
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._recorder = recorder
        self.stop_ids = stop_ids

    def event(self, token: int) -> TokenEvent | None:
        """The event for `token`; None for an end-of-sequence token, which ends the reply unseen."""
        if token in self.stop_ids:
            return None
        event = TokenEvent(token_id=token, text=self._detok.push(token))
        if self._recorder is not None:
            self._recorder.fill(event, self._tokenizer)
        return event


class LogprobRecorder:
    """The last logits processor: remembers the final distribution of each step so the streamed token can be
    paired with its log-probability and the top alternatives."""

    def __init__(self, top_n: int):
        self.top_n = top_n
        self._pending: queue.Queue[Any] = queue.Queue()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._pending.put(torch.log_softmax(scores[0].float(), dim=-1))
        return scores

    def fill(self, event: TokenEvent, tokenizer: Any) -> None:
        import torch

        try:
            logprobs = self._pending.get_nowait()
        except queue.Empty:
            return
        event.logprob = float(logprobs[event.token_id])
        values, ids = torch.topk(logprobs, self.top_n)
        event.top_logprobs = [TopLogprob(tokenizer.decode([int(i)]), int(i), float(v))
                              for v, i in zip(values.tolist(), ids.tolist())]


def decode_loop(model: Any, input_ids: Any, processors: Any, *, sampling: bool, max_new_tokens: int,
                stop_ids: set[int], cancel: Any, draws: SeededDraws | None = None,
                prefill: dict[str, Any] | None = None) -> Iterator[int]:
    """Token ids, one forward step at a time, in the caller's thread.

    Why not generate() with a streamer: that needs a second thread running the model, which bench/generation.py
    measured ~10% slower than generate() itself on 2 cores (modules/cpu_threads.py has the likely reason).
    This loop does what generate()'s sampling loop does for one sequence and our processor chain (which
    generate_kwargs() makes the whole sampler anyway): scores = processors(ids, logits); argmax or a draw from
    softmax(scores), drawn with the request's own generator (`draws`; None: torch's global one). Beam search,
    prompt lookup, guidance and the static cache keep using generate(); loaders.transformers_batch does the same
    for each row of a batch. `prefill` are more inputs of the prompt's forward pass (a vision model's pixel
    values), not given again after it."""
    import torch
    from transformers import DynamicCache

    from modules.samplers.draws import generator_on

    keep_one = {"logits_to_keep": 1} if accepts_keyword(model, "logits_to_keep") else {}
    cache = DynamicCache(config=model.config)
    ids = input_ids  # the whole sequence so far: penalties and grammars read it
    step_input = input_ids
    extra = dict(prefill or {})  # the prompt's own inputs (a vision model's pixels): its first pass reads them
    for _ in range(max_new_tokens):
        if cancel():
            return
        with torch.inference_mode():  # per step, not across the yield: the caller's code runs in between
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True, **keep_one, **extra)
            extra = {}
            cache = out.past_key_values
            scores = processors(ids, out.logits[:, -1, :].to(dtype=torch.float32))
            if not torch.isfinite(scores).any():
                return  # nothing may come next (a grammar with no way on, everything banned): the reply ends
            if sampling:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1,
                                          generator=generator_on(draws, scores.device))
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            token = token.to(ids.device)
            ids = torch.cat([ids, token], dim=-1)
        value = int(token)
        yield value
        if value in stop_ids:
            return
        step_input = token


def accepts_keyword(model: Any, name: str) -> bool:
    """Whether the model's own forward takes `name` (a PEFT wrapper passes extra keywords on to it)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
