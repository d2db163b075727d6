"""Hugging Face Transformers: safetensors folders and GGUF files, CPU or CUDA, bitsandbytes quantization, PEFT LoRAs.

Generation steps the model in the caller's thread (transformers_support.decode_loop), with our own
logits-processor chain (modules.samplers) as the whole sampler, in the order GenerationParams gives; what only
`model.generate` does (beam search, prompt lookup, guidance, the compiled static cache) runs it in a worker thread.
With `parallel` above 1, the serving engine decodes several requests together (loaders.transformers_batch).
A folder whose config has a vision_config loads as a vision-language model (loaders.transformers_vision).
GPTQ and AWQ folders load through Transformers' quantization integration with GPTQModel's kernels
(loaders.transformers_quant).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from loaders.base import (
    Capability,
    ImagePrompt,
    LoadedModel,
    Loader,
    LoaderOptions,
    ModelInfo,
    VisionPrompt,
    gguf_files,
)
from loaders.batching import BatchDecoder
from loaders.transformers_lora import PeftLoras
from loaders.transformers_quant import (
    QuantizedCheckpoint,
    QuantKernel,
    kernel_names,
    library_output_to_stderr,
    quantization_kwargs,
    quantized_checkpoint,
    quantized_dtype,
)
from loaders.transformers_support import (
    HfTokens,
    LogprobRecorder,
    TokenEvents,
    TokenStreamer,
    check_memory,
    decode_loop,
    pick_dtype,
    weight_files,
)
from loaders.transformers_vision import chat_template, encode_images, is_vision_folder, load_vision
from modules.constraints import TrialCompiler
from modules.cuda_attention import avoid_cudnn_attention
from modules.errors import GenerationError, ModelLoadError, WorkbenchError
from modules.generation_params import GenerationParams, TokenEvent
from modules.memory import release_memory
from modules.thread_pump import Ended, pump

DType = Literal["auto", "float32", "bfloat16", "float16"]

log = logging.getLogger(__name__)


class TransformersOptions(LoaderOptions):
    dtype: DType = Field("auto", description="Weights dtype; auto = the checkpoint's dtype on GPU, float32 on CPU "
                                             "for float16 checkpoints.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to put the model; auto = CUDA when "
                                                                       "present (spread with device_map).")
    cpu_memory: str | None = Field(None, description="Most CPU RAM the weights may use, e.g. 8GiB (accelerate).")
    gpu_memory: list[str] | None = Field(None, description="Most memory per GPU, e.g. 20GiB 10GiB (accelerate).")
    disk_offload: bool = Field(False, description="Offload layers that do not fit to disk (accelerate).")
    load_in_8bit: bool = Field(False, description="8-bit weights through bitsandbytes (CUDA only).")
    load_in_4bit: bool = Field(False, description="4-bit weights through bitsandbytes (CUDA only).")
    use_double_quant: bool = Field(False, description="4-bit: quantize the quantization constants too.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit quantization type.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="4-bit compute dtype.")
    quant_kernel: QuantKernel = Field("auto", description=(
        "GPTQ/AWQ checkpoints: GPTQModel's kernel; auto = its choice for the device (Marlin, ExLlama ... on CUDA; "
        "the int4 ATen kernel, or torch where groups do not divide a layer, on a CPU)."))
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model (off: it is code "
                                                       "from the internet).")
    allow_pickle_weights: bool = Field(False, description="Also load .bin/.pt checkpoints, through "
                                                          "torch.load(weights_only=True).")
    static_cache: bool = Field(False, description="Static KV cache with a compiled decode step (faster after a "
                                                  "warm-up compile).")
    max_seq_len: int = Field(0, ge=0, description="Context length; 0 = the model's max_position_embeddings.")
    parallel: int = Field(8, ge=1, le=256, description=(
        "Slots: requests decoded together in one batch (continuous batching). A slot holds one request's KV cache "
        "(its prompt and reply so far, padded to the longest in the batch) and its own sampler chain; more requests "
        "wait in the queue. 1: one request at a time. Beam search, guidance and prompt lookup run alone."))

    @model_validator(mode="after")
    def _one_quantization(self) -> TransformersOptions:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose load_in_4bit or load_in_8bit, not both")
        return self


class TransformersLoader(Loader):
    name = "transformers"
    Options = TransformersOptions
    description = "Hugging Face Transformers: safetensors folders (GPTQ and AWQ too) and GGUF files."

    @classmethod
    def accepts(cls, path: Path) -> bool:
        if path.is_dir():
            return (path / "config.json").is_file() and bool(weight_files(path, allow_pickle=True))
        return bool(gguf_files(path))

    @classmethod
    def load(cls, path: Path, options: LoaderOptions) -> TransformersModel:
        assert isinstance(options, TransformersOptions)
        return TransformersModel(path, options)


class TransformersModel(PeftLoras, HfTokens, LoadedModel):
    loader_name = "transformers"
    capabilities = frozenset({Capability.TOKENIZE, Capability.LOGPROBS, Capability.GRAMMAR, Capability.LORA,
                              Capability.LOGITS_PROCESSORS})

    def __init__(self, path: Path, options: TransformersOptions):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from modules.samplers import TRANSFORMERS_SUPPORTED_PARAMS

        self.supported_params = TRANSFORMERS_SUPPORTED_PARAMS
        self._torch = torch
        self.path = path
        self.name = path.name
        self.options = options
        self._loras: list[str] = []
        self._request_adapters = {}
        # The compiled static cache is one sequence's: with it every request runs alone.
        self.slots = 1 if options.static_cache else options.parallel
        self.extra_processors: list[Any] = []  # logits processors added by extensions
        self.quantized = quantized_checkpoint(path)  # a GPTQ/AWQ folder's settings, else None
        source, kwargs = self._from_pretrained_args(path, options, self.quantized)
        model = None
        avoid_cudnn_attention()  # every decoded token is a new length to cuDNN (modules.cuda_attention)
        self.processor: Any = None  # a vision-language model's (tokenizer and image processor)
        try:
            if is_vision_folder(path):
                self.processor, model = load_vision(source, kwargs)
                self.tokenizer = self.processor.tokenizer
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items()
                                                                           if k in ("gguf_file", "trust_remote_code")})
                with library_output_to_stderr() if self.quantized else contextlib.nullcontext():
                    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            model.eval()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError, MemoryError) as exc:
            model = None  # nothing half-loaded stays referenced; the manager then gives the memory back
            kind = "out of memory" if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError) else None
            raise ModelLoadError(f"Transformers could not load {path.name}: {kind or exc}") from None
        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        trained = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.context_length = options.max_seq_len or trained
        if self.processor is not None:
            self.capabilities = self.capabilities | {Capability.VISION}
            self.image_marker = self.processor.image_token
        self.chat_template = (chat_template(self.processor) if self.processor is not None
                              else getattr(self.tokenizer, "chat_template", None)) or None
        if isinstance(self.chat_template, dict):  # several named templates: take the default one
            self.chat_template = self.chat_template.get("default") or next(iter(self.chat_template.values()))
        self.bos_token = self.tokenizer.bos_token
        self.eos_token = self.tokenizer.eos_token
        self._vocab_size = int(getattr(config, "vocab_size", 0) or len(self.tokenizer))
        self.vocab_size = self._vocab_size
        self._eos_ids = _eos_ids(model, self.tokenizer)
        self._lock = threading.Lock()

    @staticmethod
    def _from_pretrained_args(path: Path, options: TransformersOptions, quantized: QuantizedCheckpoint | None
                              ) -> tuple[str, dict[str, Any]]:
        import torch

        cuda = torch.cuda.is_available()
        if options.device == "cuda" and not cuda:
            raise ModelLoadError("device=cuda was asked for, but PyTorch sees no CUDA GPU here.")
        if (options.load_in_4bit or options.load_in_8bit) and not cuda:
            raise ModelLoadError("4-bit/8-bit loading goes through bitsandbytes, which needs a CUDA GPU; none "
                                 "is present. Load without quantization, or use a GGUF file with llama.cpp.")
        kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
        files = gguf_files(path)
        if files:
            if len(files) > 1:
                raise ModelLoadError(f"{path.name} holds several GGUF files; pick one.")
            source = str(files[0].parent)
            kwargs["gguf_file"] = files[0].name
        else:
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path.name} has no config.json: not a Transformers model folder.")
            weights = weight_files(path, allow_pickle=options.allow_pickle_weights)
            if not weights:
                pickled = weight_files(path, allow_pickle=True)
                if pickled:
                    raise ModelLoadError(f"{path.name} holds only pickle checkpoints ({pickled[0].name}); they can "
                                         "run code when loaded. Convert them to safetensors, or set "
                                         "allow_pickle_weights to load them with torch.load(weights_only=True).")
                raise ModelLoadError(f"{path.name} holds no weights (*.safetensors).")
            source = str(path)
            kwargs["use_safetensors"] = weights[0].suffix == ".safetensors"
            check_memory(weights, options, cuda)
        device = "cuda" if (options.device == "cuda" or (options.device == "auto" and cuda)) else "cpu"
        kwargs["dtype"] = pick_dtype(options.dtype, path, device)
        if quantized is not None:
            if options.load_in_4bit or options.load_in_8bit:
                raise ModelLoadError(f"{path.name} is already quantized ({quantized.label}); load it without "
                                     "bitsandbytes 4-bit/8-bit.")
            kwargs["dtype"] = quantized_dtype(options.dtype, device)
            kwargs.update(quantization_kwargs(path, quantized, device=device, kernel=options.quant_kernel,
                                              trust_remote_code=options.trust_remote_code))
        if device == "cuda":
            kwargs["device_map"] = "auto"
        if options.cpu_memory or options.gpu_memory:
            max_memory: dict[Any, str] = {}
            for index, limit in enumerate(options.gpu_memory or []):
                max_memory[index] = limit
            if options.cpu_memory:
                max_memory["cpu"] = options.cpu_memory
            kwargs["max_memory"] = max_memory
            kwargs.setdefault("device_map", "auto")
        if options.disk_offload:
            offload = Path(".cache/offload") / path.name
            offload.mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(offload)
            kwargs.setdefault("device_map", "auto")
        if options.attn_implementation != "auto":
            kwargs["attn_implementation"] = options.attn_implementation
        if options.load_in_4bit or options.load_in_8bit:
            import importlib.util

            from transformers import BitsAndBytesConfig

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ModelLoadError("4-bit/8-bit loading needs bitsandbytes: pip install bitsandbytes")
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=options.load_in_4bit, load_in_8bit=options.load_in_8bit,
                bnb_4bit_use_double_quant=options.use_double_quant, bnb_4bit_quant_type=options.quant_type,
                bnb_4bit_compute_dtype=getattr(torch, options.compute_dtype))
        return source, kwargs

    @property
    def lock(self) -> threading.Lock:
        """Held while the model runs (a generation's step, a batch's step, loading an adapter for a request)."""
        return self._lock

    # --- generation --------------------------------------------------------------------------------------------
    def constraint_compiler(self) -> TrialCompiler:
        """How modules.constraints trial-compiles grammars for this model: xgrammar with its vocabulary."""
        from modules.samplers.grammar import trial_compiler

        return trial_compiler(tokenizer=self.tokenizer, vocab_size=self._vocab_size, eos_token_ids=self._eos_ids)

    def encode_images(self, prompt: ImagePrompt, *, add_bos: bool = False) -> VisionPrompt:
        if self.processor is None:
            return super().encode_images(prompt, add_bos=add_bos)
        return encode_images(self.processor, prompt, add_bos=add_bos, bos_id=self.tokenizer.bos_token_id,
                             device=input_device(self.model), dtype=self.model.dtype)

    def stream(self, prompt: list[int] | str | VisionPrompt, params: GenerationParams,
               cancel: threading.Event) -> Iterator[TokenEvent]:
        prefill = None
        if isinstance(prompt, VisionPrompt):
            ids, prefill = list(prompt.ids), prompt.inputs
        else:
            ids = self.encode(prompt, add_bos=params.add_bos_token) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("The prompt is empty: there is nothing to continue.")
        with self._lock:
            yield from self._generate(ids, params, cancel, prefill)

    def sampling_chain(self, params: GenerationParams, prompt_length: int, draws: Any
                       ) -> tuple[Any, LogprobRecorder | None]:
        """One sequence's logits processors (the knobs' chain, then the extensions' processors) and the recorder
        of its log-probabilities when asked for; `draws` are its own generators (None: torch's global RNG)."""
        from transformers import LogitsProcessorList

        from modules.samplers import build_logits_processors
        from modules.samplers.mirostat import Mirostat

        processors = LogitsProcessorList(build_logits_processors(
            params, tokenizer=self.tokenizer, vocab_size=self._vocab_size, eos_token_ids=self._eos_ids,
            prompt_length=prompt_length, draws=draws))
        processors.extend(self.extra_processors)
        recorder = None
        if params.logprobs and params.num_beams == 1:
            recorder = LogprobRecorder(params.logprobs)
            # Before mirostat, which leaves a single finite logit: report the distribution it drew from.
            position = next((i for i, p in enumerate(processors) if isinstance(p, Mirostat)), len(processors))
            processors.insert(position, recorder)
        return processors, recorder

    def token_events(self, params: GenerationParams, recorder: LogprobRecorder | None) -> TokenEvents:
        """What turns one reply's token ids into events; the end-of-sequence tokens end it (unless banned)."""
        stop_ids = set() if params.ban_eos_token else set(self._eos_ids)
        return TokenEvents(self.tokenizer, skip_special_tokens=params.skip_special_tokens, recorder=recorder,
                           stop_ids=stop_ids)

    def _generate(self, ids: list[int], params: GenerationParams, cancel: threading.Event,
                  prefill: dict[str, Any] | None = None) -> Iterator[TokenEvent]:
        from transformers import set_seed

        from modules.samplers import SeededDraws, generate_kwargs, only_generate

        torch = self._torch
        if params.seed >= 0:
            set_seed(params.seed)
        own_loop = not only_generate(params) and not self.options.static_cache
        # Our loop draws from the request's own generators (the same numbers set_seed would give, whatever else
        # runs); generate() draws from the global ones.
        draws = SeededDraws(params.seed) if own_loop and params.seed >= 0 else None
        processors, recorder = self.sampling_chain(params, len(ids), draws)
        device = input_device(self.model)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs = generate_kwargs(params, tokenizer=self.tokenizer, eos_token_ids=self._eos_ids, device=device)
        events = self.token_events(params, recorder)
        stop_ids = events.stop_ids
        if own_loop:
            tokens = decode_loop(self.model, input_ids, processors, sampling=kwargs["do_sample"],
                                 max_new_tokens=params.max_new_tokens, stop_ids=stop_ids, cancel=cancel.is_set,
                                 draws=draws, prefill=prefill)
            try:
                yield from _events(tokens, events)
            except WorkbenchError:
                raise
            except Exception as exc:  # a failure inside the model or a processor: one clear message
                raise GenerationError(f"Generation failed: {type(exc).__name__}: {exc}") from exc
            return
        kwargs.update(prefill or {})
        kwargs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      max_new_tokens=params.max_new_tokens, logits_processor=processors,
                      eos_token_id=sorted(stop_ids) or None,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self._eos_ids[0])
        if self.options.static_cache:
            from transformers import CompileConfig

            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # CPU too; bench/generation.py --static-cache measures it
            kwargs.update(cache_implementation="static", compile_config=compile_config)
        yield from _events(self._generate_in_thread(kwargs, params, cancel, len(ids)), events)

    def batch_decoder(self) -> BatchDecoder | None:
        """Up to `slots` requests decoded together; None (one at a time) when this model's cache cannot be
        batched by rows (loaders.transformers_batch.unbatchable says why)."""
        if self.slots <= 1:
            return None
        from loaders.transformers_batch import TransformersBatch, unbatchable

        reason = unbatchable(self.model)
        if reason is not None:
            log.warning("%s: requests run one at a time: %s", self.name, reason)
            return None
        return TransformersBatch(self, self.slots)

    def _generate_in_thread(self, kwargs: dict[str, Any], params: GenerationParams, cancel: threading.Event,
                            prompt_length: int) -> Iterator[int]:
        """generate() in a worker thread, its tokens handed over through a queue: for what only generate() does
        (beam search, which picks its sequence at the end, prompt lookup, guidance, the compiled static cache)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self._torch
        finished = threading.Event()  # set when the consumer leaves, so the worker stops too

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                stop = cancel.is_set() or finished.is_set()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        inbox: queue.SimpleQueue[int | Ended] = queue.SimpleQueue()
        streaming = params.num_beams == 1  # beam search picks its sequence only at the end
        kwargs.update(stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                      streamer=TokenStreamer(inbox.put) if streaming else None)

        def work(put: Callable[[int], None]) -> None:
            with torch.inference_mode():
                output = self.model.generate(**kwargs)
            if not streaming:
                for token in output[0, prompt_length:].tolist():
                    put(int(token))

        worker = pump(work, inbox.put, name="transformers-generate")
        try:
            while not isinstance(item := inbox.get(), Ended):
                yield item
        finally:
            finished.set()
            worker.join()
        if item.error is not None:
            if isinstance(item.error, (ModelLoadError, GenerationError)):
                raise item.error
            raise GenerationError(f"Generation failed: {type(item.error).__name__}: {item.error}") from item.error

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        model = self.model
        quant = getattr(model.config, "quantization_config", None)
        dtype = str(model.dtype).replace("torch.", "")
        if self.quantized is not None:
            dtype = f"{dtype} ({self.quantized.label})"
        elif quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "")
            dtype = f"{dtype} ({getattr(method, 'value', method)})"
        extra: dict[str, Any] = {"architecture": (getattr(model.config, "architectures", None) or [""])[0],
                                 "static_cache": self.options.static_cache}
        if self.quantized is not None:
            extra["quant_kernels"] = kernel_names(model)
        return ModelInfo(
            name=self.name, loader=self.loader_name, path=str(self.path), context_length=self.context_length,
            dtype=dtype, device=str(model.device), memory_bytes=int(model.get_memory_footprint()),
            loras=self.loras, capabilities=sorted(self.capabilities), extra=extra,
        )

    def unload(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self.tokenizer = None
        self.processor = None
        release_memory()


def input_device(model: Any) -> Any:
    """Where inputs go: the first GPU of a device map, else the CPU (a model offloaded to disk reports 'meta')."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for place in device_map.values():
            if isinstance(place, int) or str(place).startswith(("cuda", "xpu", "mps")):
                return f"cuda:{place}" if isinstance(place, int) else str(place)
        return "cpu"
    return model.device


def _events(tokens: Iterator[int], events: TokenEvents) -> Iterator[TokenEvent]:
    for token in tokens:
        event = events.event(token)
        if event is None:
            return
        yield event


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]):
        if value is not None:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ModelLoadError("The model defines no end-of-sequence token; it cannot stop by itself.")
    return list(dict.fromkeys(ids))
