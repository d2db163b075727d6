"""llama.cpp through llama-cpp-python: GGUF files, native samplers, GBNF grammars, GGUF LoRA adapters.

We drive the decode loop ourselves (Llama.eval + a native sampler chain) instead of create_completion, because
the high-level API builds a fixed chain without DRY, XTC, top-n-sigma, dynamic temperature or sampler order.
With `parallel` above 1 the context holds one sequence per slot (in a unified KV cache by default) and the serving
engine decodes them together (loaders.llama_cpp_batch); with 1 the single-sequence loop below serves one request at a time.
"""
from __future__ import annotations

import atexit
import codecs
import ctypes
import functools
import re
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from loaders.base import (Capability, ImagePrompt, LoadedModel, Loader, LoaderOptions, ModelInfo, VisionPrompt,
                          gguf_files)
from loaders.batching import Adapter, BatchDecoder, SequenceRequest
from loaders.gguf_header import diagnose, file_type_name, trained_context
from loaders.llama_cpp_lora import ContextAdapters
from loaders.llama_cpp_sampling import SUPPORTED_PARAMS, Candidates, build_sampler_chains, trial_compiler
from loaders.llama_cpp_vision import Projector, find_mmproj, is_mmproj
from modules.constraints import TrialCompiler
from modules.errors import ContextLengthExceeded, GenerationError, InvalidInput, ModelLoadError
from modules.generation_params import GenerationParams, TokenEvent, TopLogprob

CacheType = Literal["f16", "f32", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]


class LlamaCppOptions(LoaderOptions):
    n_ctx: int = Field(8192, ge=0, description="Context length in tokens; 0 = the model's trained length. "
                                               "Capped at the trained length unless rope scaling is set.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers to offload to the GPU; -1 = all.")
    n_threads: int | None = Field(None, ge=1, description="Threads for generation (default: llama.cpp's choice).")
    n_threads_batch: int | None = Field(None, ge=1, description="Threads for prompt processing.")
    n_batch: int = Field(512, ge=1, description="Prompt tokens per decode call (logical batch).")
    n_ubatch: int = Field(512, ge=1, description="Physical micro-batch size.")
    use_mmap: bool = Field(True, description="Map the file instead of reading it into memory.")
    use_mlock: bool = Field(False, description="Lock the weights in RAM (no swapping).")
    tensor_split: list[float] | None = Field(None, description="Share of the model per GPU, e.g. 60,40.")
    flash_attn: Literal["auto", "on", "off"] = Field("auto", description=(
        "Flash attention: on, off, or auto: on with parallel above 1 (attention over a cache shared by several "
        "slots), off with parallel 1 (one slot computes exactly as before). A quantized V cache needs it on."))
    cache_type: CacheType = Field("f16", description="KV cache type: f16, q8_0, q4_0, ...")
    rope_freq_base: float = Field(0.0, ge=0.0, description="RoPE base frequency; 0 = from the model.")
    rope_freq_scale: float = Field(0.0, ge=0.0, description="RoPE frequency scale (e.g. 0.5 doubles the context); "
                                                          "0 = from the model.")
    parallel: int = Field(4, ge=1, le=256, description=(
        "Slots: requests decoded together (continuous batching). A slot holds one request's sequence in the "
        "KV cache and its own sampler chain; an idle slot keeps its conversation's KV for the next turn until the "
        "room is needed. 1: one request at a time, exactly as a single-sequence loop."))
    kv_unified: bool = Field(True, description=(
        "With several slots: one unified KV cache that every slot may fill up to the whole n_ctx (together they "
        "share it), or (off) n_ctx split evenly, n_ctx/parallel per slot. Split, a request's reply never depends "
        "on what the other slots hold; unified, it may change where two tokens are nearly tied."))
    mmproj: str | None = Field(None, description=(
        "Multimodal projector (a vision model's mmproj GGUF, a file name in the model's folder) that lets the "
        "model read images; by default the one mmproj*.gguf beside the model file, if any."))

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn_bool(cls, value: Any) -> Any:
        """true/false (settings files and options written before `auto`) mean on/off."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _quantized_v_needs_flash(self) -> "LlamaCppOptions":
        if self.cache_type not in ("f16", "f32", "bf16") and self.flash_attn != "on":
            raise ValueError(f"cache_type {self.cache_type} quantizes the V cache, which llama.cpp only allows "
                             "with flash_attn on")
        if self.parallel > self.n_batch:
            raise ValueError(f"parallel {self.parallel} is more than n_batch {self.n_batch}: a step holds one token "
                             "per slot")
        return self

    @property
    def flash(self) -> bool:
        """Whether the context uses flash attention (auto: with several slots)."""
        return self.flash_attn == "on" or (self.flash_attn == "auto" and self.parallel > 1)


#: A decoder of token pieces: bytes that may split a UTF-8 character become text once the character is complete.
utf8_pieces = functools.partial(codecs.getincrementaldecoder("utf-8"), errors="replace")
PROMPT_CHUNK = 128  # prompt tokens per decode call; a multiple of it is where cache reuse may resume
#: Texts longer than this (bytes) are tokenized in pieces cut before special tokens. llama.cpp's special-token
#: partition scans the rest of the text once per fragment for each special token absent from it, which is
#: quadratic: a chat of 8,000 messages took 5.8 s to tokenize whole, 0.4 s in pieces, with the same ids.
_TOKENIZE_PIECE = 16 * 1024
_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


class LlamaCppLoader(Loader):
    name = "llama.cpp"
    Options = LlamaCppOptions
    description = "GGUF files through llama-cpp-python (CPU, CUDA, Metal)."

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return bool(gguf_files(path))

    @classmethod
    def load(cls, path: Path, options: LoaderOptions) -> "LlamaCppModel":
        assert isinstance(options, LlamaCppOptions)
        if path.is_file() and is_mmproj(path):
            raise ModelLoadError(f"{path.name} is a multimodal projector (mmproj), not a model: load the model "
                                 "file beside it, which reads images through it.")
        files = [f for f in gguf_files(path) if not is_mmproj(f)]
        if not files:
            raise ModelLoadError(f"{path.name} holds no .gguf file; the llama.cpp loader needs GGUF weights.")
        if len(files) > 1:
            raise ModelLoadError(f"{path.name} holds several GGUF files ({', '.join(f.name for f in files)}); "
                                 "pick one file.")
        return LlamaCppModel(files[0], options)


class LlamaCppModel(LoadedModel):
    loader_name = "llama.cpp"
    capabilities = frozenset({Capability.TOKENIZE, Capability.LOGPROBS, Capability.GRAMMAR, Capability.LORA})
    supported_params = SUPPORTED_PARAMS

    def __init__(self, file: Path, options: LlamaCppOptions):
        import llama_cpp

        n_ctx_train = trained_context(file)
        self._lib = llama_cpp
        self.path = file
        self.name = file.name
        self.options = options
        kwargs = dict(
            model_path=str(file), n_gpu_layers=options.n_gpu_layers, n_batch=options.n_batch,
            n_ubatch=options.n_ubatch, use_mmap=options.use_mmap, use_mlock=options.use_mlock,
            tensor_split=options.tensor_split, flash_attn=options.flash_attn == "on", verbose=False,
            type_k=_GGML_TYPES[options.cache_type], type_v=_GGML_TYPES[options.cache_type],
            rope_freq_base=options.rope_freq_base, rope_freq_scale=options.rope_freq_scale,
        )
        if options.n_threads:
            kwargs["n_threads"] = options.n_threads
        if options.n_threads_batch:
            kwargs["n_threads_batch"] = options.n_threads_batch
        try:
            n_ctx = options.n_ctx or n_ctx_train
            if n_ctx_train and options.rope_freq_scale == 0 and options.rope_freq_base == 0:
                n_ctx = min(n_ctx, n_ctx_train)
            if options.parallel > 1:
                from loaders.llama_cpp_batch import llama_with_slots

                self._llama = llama_with_slots(options.parallel, options.flash_attn, options.kv_unified,
                                               n_ctx=n_ctx, **kwargs)
            else:
                self._llama = llama_cpp.Llama(n_ctx=n_ctx, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(diagnose(file) or f"llama.cpp could not load {file.name}: {exc}") from None
        llama = self._llama
        self._projector: Projector | None = None
        try:
            mmproj = find_mmproj(file, options.mmproj)
            if mmproj is not None:
                self._projector = Projector(mmproj, llama, use_gpu=options.n_gpu_layers != 0,
                                            n_threads=int(llama.context_params.n_threads_batch))
        except BaseException:
            llama.close()
            raise
        if self._projector is not None:
            self.capabilities = self.capabilities | {Capability.VISION}
            self.image_marker = self._projector.marker
        self._vocab = llama._model.vocab
        self._n_vocab = llama.n_vocab()
        self.vocab_size = self._n_vocab
        # a split cache gives each slot its share (what one request may use)
        self.context_length = llama.n_ctx() // (1 if options.kv_unified else options.parallel)
        metadata = llama.metadata
        self.chat_template = metadata.get("tokenizer.chat_template") or None
        self.bos_token = self._token_text(llama.token_bos())
        self.eos_token = self._token_text(llama.token_eos())
        self._eog = {t for t in (llama.token_eos(), llama_cpp.llama_vocab_eot(self._vocab)) if t >= 0}
        self.max_token_bytes = max(len(self._piece(t, special=True)) for t in range(self._n_vocab)) or None
        self._piece_starts = self._special_token_pattern()
        self._metadata = metadata
        self._adapters = ContextAdapters(llama_cpp, llama._model.model, llama._ctx.ctx)
        self._lock = threading.Lock()  # one decode loop at a time per context
        self._prompt_kv_valid = 0  # leading KV entries computed as aligned prompt chunks
        self.slots = options.parallel
        self._batch: BatchDecoder | None = None
        #: Prompt tokens evaluated so far (not those reused from the KV cache): how much reading prompts cost.
        self.evaluated_prompt_tokens = 0
        # llama-cpp-python's own __del__ fails at interpreter exit once its module globals are gone.
        atexit.register(_unload_at_exit, weakref.ref(self))

    # --- tokens ------------------------------------------------------------------------------------------------
    def _token_text(self, token: int) -> str | None:
        if token < 0:
            return None
        return self._piece(token, special=True).decode("utf-8", errors="replace")

    def _piece(self, token: int, *, special: bool) -> bytes:
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, token, buffer, size, 0, special)
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def _special_token_pattern(self) -> re.Pattern[bytes] | None:
        """Where a long text may be cut to tokenize it in pieces with the same result: before a special token
        (llama.cpp splits them out first and tokenizes the text between them apart). Tokens that strip the
        whitespace before them (LSTRIP) reach into the text before, so they are no cut points."""
        lib = self._lib
        special = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = set()
        for token in range(self._n_vocab):
            attr = lib.llama_vocab_get_attr(self._vocab, token)
            if attr & special and not attr & lib.LLAMA_TOKEN_ATTR_LSTRIP:
                text = self._piece(token, special=True)
                if text:
                    texts.add(text)
        if not texts:
            return None
        return re.compile(b"|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        if (len(data) <= _TOKENIZE_PIECE or self._piece_starts is None
                or (add_bos and self._lib.llama_vocab_get_add_eos(self._vocab))):  # EOS would land mid-text
            return self._llama.tokenize(data, add_bos=add_bos, special=True)
        ids: list[int] = []
        start = 0
        for match in self._piece_starts.finditer(data, _TOKENIZE_PIECE):
            if match.start() - start >= _TOKENIZE_PIECE:
                ids += self._llama.tokenize(data[start:match.start()], add_bos=add_bos and start == 0, special=True)
                start = match.start()
        return ids + self._llama.tokenize(data[start:], add_bos=add_bos and start == 0, special=True)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        if not ids:
            return ""
        tokens = (self._lib.llama_token * len(ids))(*ids)
        size = max(64, 8 * len(ids))
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, tokens, len(ids), buffer, size, False,
                                           not skip_special_tokens)
            if n >= 0:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            size = -n

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog or bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # --- generation --------------------------------------------------------------------------------------------
    def constraint_compiler(self) -> TrialCompiler:
        """How modules.constraints trial-compiles grammars for this model: llama.cpp with its vocabulary."""
        return trial_compiler(self.path)

    def encode_images(self, prompt: ImagePrompt, *, add_bos: bool = False) -> VisionPrompt:
        if self._projector is None:
            return super().encode_images(prompt, add_bos=add_bos)
        return self._projector.encode(prompt, add_bos=add_bos)

    def stream(self, prompt: list[int] | str | VisionPrompt, params: GenerationParams,
               cancel: threading.Event) -> Iterator[TokenEvent]:
        vision = prompt if isinstance(prompt, VisionPrompt) else None
        if vision is not None:
            ids = list(vision.ids)
        else:
            ids = self.encode(prompt, add_bos=params.add_bos_token) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidInput("The prompt is empty: there is nothing to continue.")
        if len(ids) >= self.context_length:
            raise ContextLengthExceeded(context=self.context_length, prompt_tokens=len(ids),
                                        max_new_tokens=params.max_new_tokens)
        with self._lock:
            if vision is not None:
                yield from self._stream_vision(vision, params, cancel)
            elif self.slots > 1:  # the context is the batch decoder's: one sequence through it
                yield from self._stream_alone(ids, params, cancel)
            else:
                yield from self._decode_loop(ids, params, cancel)

    def batch_decoder(self) -> BatchDecoder | None:
        """The model's one batch decoder (its slots are the context's sequences), or None with one slot."""
        if self.slots <= 1:
            return None
        if self._batch is None:
            from loaders.llama_cpp_batch import LlamaCppBatch

            self._batch = LlamaCppBatch(self)
        return self._batch

    def _stream_alone(self, ids: list[int], params: GenerationParams,
                      cancel: threading.Event) -> Iterator[TokenEvent]:
        """One sequence through the batch decoder, for a caller that drives the model itself (the serving engine
        never calls stream on a model with several slots)."""
        decoder = self.batch_decoder()
        assert decoder is not None
        if decoder.active:
            raise GenerationError(f"{self.name} is decoding served requests; generate through the ModelManager.")
        key = -1
        decoder.add(key, SequenceRequest(ids, params, None, cancel))
        try:
            while not cancel.is_set():
                for out in decoder.step():
                    if out.error is not None:
                        raise out.error
                    if out.token is not None:
                        yield out.token
                    if out.finished is not None:
                        return
        finally:
            decoder.remove(key)

    def _stream_vision(self, prompt: VisionPrompt, params: GenerationParams,
                       cancel: threading.Event) -> Iterator[TokenEvent]:
        """A prompt with images, alone on the context (the engine runs such requests alone): read into sequence 0
        from an empty cache, generated from as the single-sequence loop does; the cache is emptied after it (no
        later prompt reuses it: image positions hold no tokens to compare), and the batch decoder's slots forget
        what they held."""
        if self._batch is not None and self._batch.active:
            raise GenerationError(f"{self.name} is decoding served requests; generate through the ModelManager.")
        llama = self._llama
        try:
            yield from self._decode_loop(list(prompt.ids), params, cancel, vision=prompt)
        finally:
            llama._ctx.kv_cache_clear()
            llama.reset()
            self._prompt_kv_valid = 0
            if self._batch is not None:
                self._batch.forget()

    def _decode_loop(self, ids: list[int], params: GenerationParams, cancel: threading.Event,
                     vision: VisionPrompt | None = None) -> Iterator[TokenEvent]:
        llama = self._llama
        lib = self._lib
        history = vision.inputs.text_ids if vision is not None else ids
        chains = build_sampler_chains(lib, llama, params, history, eog_tokens=self._eog)
        candidates = Candidates(lib, self._n_vocab)
        decoder = utf8_pieces()
        try:
            if vision is not None:
                assert self._projector is not None
                self._prompt_kv_valid = 0
                self.evaluated_prompt_tokens += self._projector.read(llama, vision.inputs, self._eval, cancel)
            else:
                self._eval_prompt(ids, cancel)
            token: int | None = None  # the previous token, fed back before sampling the next
            for _ in range(params.max_new_tokens):
                if cancel.is_set():
                    return
                if token is not None:
                    if llama.n_tokens >= self.context_length:
                        return  # context full
                    self._eval([token])
                token = candidates.next_token(chains, self._logits())
                if token is None:  # nothing may follow (a grammar at its end, with the end banned)
                    return
                if self.is_end_of_generation(token) and not params.ban_eos_token:
                    return
                event = TokenEvent(token_id=token, text=decoder.decode(
                    self._piece(token, special=not params.skip_special_tokens)))
                if params.logprobs:
                    self._fill_logprobs(event, params.logprobs)
                yield event
        finally:
            chains.free(lib)

    def _logits(self) -> np.ndarray:
        """The last evaluated position's logits (llama.cpp's own buffer, not a copy)."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._llama._ctx.ctx, -1),
                                     shape=(self._n_vocab,))

    def _eval(self, tokens: list[int]) -> None:
        try:
            self._llama.eval(tokens)
        except RuntimeError as exc:
            raise GenerationError(f"llama.cpp failed to decode: {exc}") from None

    def _eval_prompt(self, ids: list[int], cancel: threading.Event) -> None:
        """Evaluate the prompt in chunks aligned to absolute positions, reusing the KV cache of the longest
        common prefix that was itself computed that way.

        llama.cpp's numerics depend on how many tokens a decode call holds, so re-evaluating only a suffix
        of a cached prompt would make a warm run differ from a cold one (the same seed giving another text).
        With aligned chunks every prompt token is computed in the same company, warm or cold."""
        llama = self._llama
        chunk = min(PROMPT_CHUNK, self.options.n_batch)
        valid = min(self._prompt_kv_valid, llama.n_tokens)
        previous = llama.input_ids
        common = 0
        limit = min(valid, len(ids) - 1)  # always evaluate the last token: its logits pick the first token
        while common < limit and previous[common] == ids[common]:
            common += 1
        start = (common // chunk) * chunk
        if start == 0 or not llama._ctx.kv_cache_seq_rm(-1, start, -1):
            llama.reset()
            start = 0
        else:
            llama.n_tokens = start
        self._prompt_kv_valid = start
        for begin in range(start, len(ids), chunk):
            if cancel.is_set():
                return
            self._eval(ids[begin:begin + chunk])
            self.evaluated_prompt_tokens += len(ids[begin:begin + chunk])
        self._prompt_kv_valid = len(ids)  # tokens generated after this are computed one by one

    def _fill_logprobs(self, event: TokenEvent, top_n: int, logits: np.ndarray | None = None) -> None:
        """The chosen token's log-probability and the top_n, from `logits` (default: the last position's)."""
        logits = self._logits() if logits is None else logits
        logprobs = logits - _logsumexp(logits)
        event.logprob = float(logprobs[event.token_id])
        top = np.argpartition(-logprobs, top_n)[:top_n]
        top = top[np.argsort(-logprobs[top])]
        event.top_logprobs = [TopLogprob(self._token_text(int(t)) or "", int(t), float(logprobs[t])) for t in top]

    # --- LoRA --------------------------------------------------------------------------------------------------
    def apply_loras(self, paths: list[Path], scales: list[float] | None = None) -> None:
        self._adapters.apply(paths, scales)
        self._llama.reset()  # cached KV was computed without the adapter
        self._prompt_kv_valid = 0

    def remove_loras(self) -> None:
        if self._adapters.remove():
            self._llama.reset()
            self._prompt_kv_valid = 0

    def adapter_key(self, adapters: tuple[Adapter, ...] | None) -> tuple:
        """What identifies the weights a sequence with these adapters runs with (None: the applied set): KV
        computed under one key is reused only under the same key. Raises InvalidInput for an adapter that is no
        GGUF LoRA."""
        return self._adapters.key(adapters)

    def use_adapters(self, adapters: tuple[Adapter, ...] | None) -> tuple:
        """Set these adapters on the context (llama.cpp applies them to every sequence); returns their key."""
        return self._adapters.use(adapters)

    def use_applied_adapters(self) -> None:
        """Put the applied set back on the context (after a group of requests with adapters of their own), so
        whoever drives the model directly (perplexity) sees the model as the Model tab shows it."""
        self._adapters.use_applied()

    @property
    def loras(self) -> list[str]:
        return self._adapters.names

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        file_type = self._metadata.get("general.file_type")
        return ModelInfo(
            name=self.name, loader=self.loader_name, path=str(self.path), context_length=self.context_length,
            dtype=file_type_name(file_type),
            device="cuda" if self.options.n_gpu_layers else "cpu",
            memory_bytes=int(self._lib.llama_model_size(self._llama._model.model)),
            loras=self.loras, capabilities=sorted(self.capabilities),
            extra={"architecture": self._metadata.get("general.architecture", ""),
                   "n_ctx_train": self._lib.llama_model_n_ctx_train(self._llama._model.model),
                   "parallel": self.slots, "flash_attn": self.options.flash,
                   "kv_unified": self.options.kv_unified or self.slots == 1,
                   "mmproj": self._projector.file.name if self._projector is not None else None},
        )

    def unload(self) -> None:
        llama = getattr(self, "_llama", None)
        if llama is None:
            return
        try:
            if self._batch is not None:
                self._batch.release()
                self._batch = None
            self._adapters.close()
        finally:
            if self._projector is not None:
                self._projector.close()
                self._projector = None
            llama.close()
            self._llama = None


def _unload_at_exit(ref: "weakref.ref[LlamaCppModel]") -> None:
    model = ref()
    if model is not None:
        model.unload()


def _logsumexp(values: np.ndarray) -> float:
    peak = float(values.max())
    return peak + float(np.log(np.exp(values - peak).sum()))
