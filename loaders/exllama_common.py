"""What the EXL2 (exllamav2) and EXL3 (exllamav3) loaders share: recognising their checkpoints, the refusal on a
machine that cannot run them, their common options, and the loaded model around the libraries' dynamic generators.

Both libraries run on CUDA only and build their C++/CUDA extension when first imported, so nothing here imports
them before `require_library` has found a GPU and the package. The workbench side of a model (tokens, chat
template, text of each token) uses the folder's Hugging Face tokenizer, as the Transformers loader does; the
library's generator runs the model and its own sampler, one job per request. Stop strings stay with the core's
filter above the loader seam.
"""
from __future__ import annotations

import importlib.util
import json
import threading
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from loaders.base import Capability, LoadedModel, Loader, LoaderOptions, ModelInfo, VisionPrompt
from loaders.transformers_support import HfTokens, TokenEvents
from modules.errors import GenerationError, LoaderUnavailable, ModelLoadError, WorkbenchError
from modules.generation_params import GenerationParams, TokenEvent
from modules.memory import release_memory

ExlFormat = Literal["exl2", "exl3"]
CacheQuant = Literal["fp16", "q8", "q6", "q4"]
#: Tokens per page of both libraries' paged caches: a cache holds a whole number of pages.
PAGE_SIZE = 256
#: Tensor-name endings only each format writes (exllamav2's quantized linear layers, exllamav3's trellises).
_EXL2_TENSORS = (".q_groups", ".q_invperm", ".q_scale_max")
_EXL3_TENSORS = (".trellis",)
#: The release each loader was written against (the README's install line names the same).
LIBRARY_VERSIONS = {"exllamav2": "0.3.2", "exllamav3": "1.6.5"}


class ExllamaOptions(LoaderOptions):
    """Options both exllama loaders take (same names, same meaning)."""

    gpu_split: list[float] | None = Field(None, description=(
        "GB of weights per GPU, e.g. 20,24; empty = split automatically, filling each visible GPU in turn."))
    max_seq_len: int = Field(0, ge=0, description="Context length; 0 = the model's max_position_embeddings.")
    cache_size: int = Field(0, ge=0, description=(
        "Tokens the KV cache holds, rounded up to a multiple of 256; 0 = max_seq_len. Below max_seq_len it caps "
        "the context."))
    cache_quant: CacheQuant = Field("fp16", description=(
        "KV cache precision: fp16, or quantized to 8, 6 or 4 bits (q8, q6, q4): less memory for a long context, "
        "a little less precision."))


def exl_format(path: Path) -> ExlFormat | None:
    """"exl2" or "exl3" when `path` is a folder of such a checkpoint: config.json's quantization_config says
    so, or (checkpoints converted without it) the tensor names do, or an EXL2 measurement.json lies beside the
    weights."""
    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method in ("exl2", "exl3"):
        return method
    if method is not None:  # another quantization (GPTQ, AWQ, bitsandbytes, ...)
        return None
    shards = sorted(path.glob("*.safetensors"))
    for shard in shards[:8]:
        names = _tensor_names(shard)
        if any(name.endswith(_EXL2_TENSORS) for name in names):
            return "exl2"
        if any(name.endswith(_EXL3_TENSORS) for name in names):
            return "exl3"
    if shards and (path / "measurement.json").is_file():
        return "exl2"
    return None


def _tensor_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (the weights are not read); none for a broken file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            return list(handle.keys())
    except Exception:  # noqa: BLE001 - a probe: a file safetensors cannot read is simply not ours
        return []


def require_library(loader: str, package: str) -> None:
    """Raise LoaderUnavailable, saying what is missing, unless PyTorch sees a CUDA GPU and `package` is
    installed. Checked before the package is imported: importing it builds its CUDA extension."""
    import torch

    cuda = bool(torch.cuda.is_available())
    installed = importlib.util.find_spec(package) is not None
    if cuda and installed:
        return
    missing = []
    if not cuda:
        missing.append(f"PyTorch {torch.__version__} sees no CUDA GPU here")
    if not installed:
        missing.append(f"{package} is not installed")
    raise LoaderUnavailable(
        f"The {loader} loader runs on CUDA GPUs only, through {package}: {' and '.join(missing)}. On a machine "
        f"with a CUDA GPU and the CUDA build of PyTorch, `pip install {package}=={LIBRARY_VERSIONS[package]}` (the "
        "README's 'EXL2 and EXL3 models' says how); here, load a GGUF of this model with llama.cpp or its "
        "full-precision folder with Transformers.", loader=loader)


def cache_tokens(options: ExllamaOptions, context: int) -> int:
    """The cache's size in tokens: cache_size or the context, rounded up to whole pages."""
    wanted = options.cache_size or context
    return max(PAGE_SIZE, -(-wanted // PAGE_SIZE) * PAGE_SIZE)


class ExllamaModel(HfTokens, LoadedModel):
    """A model in an exllama library's dynamic generator, which runs one request at a time here."""

    capabilities = frozenset({Capability.TOKENIZE})
    #: The library's package name, in messages.
    library: ClassVar[str]

    def __init__(self, path: Path, options: ExllamaOptions):
        import torch
        from transformers import AutoTokenizer

        self._torch = torch
        self.path = path
        self.name = path.name
        self.options = options
        self._lock = threading.Lock()
        self._generator: Any = None
        self.cache_tokens = 0
        self.paged = True
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path.name} has no tokenizer Transformers can read: {exc}") from None
        self._eos_ids = _eos_ids(path, self.tokenizer)
        self.memory_bytes = 0
        before = _cuda_allocated(torch)
        try:
            self.context_length = self._load(path, options)
        except WorkbenchError:
            self._free()
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the library raised, nothing of it stays on the GPU
            self._free()
            problem = "out of GPU memory" if "out of memory" in str(exc).lower() else f"{type(exc).__name__}: {exc}"
            raise ModelLoadError(f"{self.library} could not load {path.name}: {problem}") from None
        self.memory_bytes = max(0, _cuda_allocated(torch) - before)
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: take the default one
            template = template.get("default") or next(iter(template.values()), None)
        self.chat_template = template or None
        self.bos_token = self.tokenizer.bos_token
        self.eos_token = self.tokenizer.eos_token
        self.vocab_size = self._vocab_size()
        config = _read_json(path / "config.json")
        quant = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
        fmt, bits = (exl_format(path) or self.loader_name).upper(), quant.get("bits")
        self._dtype = f"{fmt} {bits} bpw" if bits else fmt
        self._architecture = (config.get("architectures") or [""])[0]

    # --- what each library does ---------------------------------------------------------------------------------
    @abstractmethod
    def _load(self, path: Path, options: Any) -> int:
        """Load the weights, the cache and the generator (self._generator); the context length in tokens."""

    @abstractmethod
    def _job(self, ids: Any, params: GenerationParams) -> Any:
        """The library's job for one request (`ids`: a (1, n) tensor on the CPU), its sampler built from
        `params`, ending at the end-of-sequence tokens unless they are banned."""

    @abstractmethod
    def _vocab_size(self) -> int:
        """The width of the model's logits."""

    @abstractmethod
    def _free(self) -> None:
        """Drop the library's objects (weights, cache, generator); safe on a half-loaded model."""

    def _stop_tokens(self, params: GenerationParams) -> list[int] | None:
        return None if params.ban_eos_token else list(self._eos_ids)

    # --- generation --------------------------------------------------------------------------------------------
    def stream(self, prompt: list[int] | str | VisionPrompt, params: GenerationParams,
               cancel: threading.Event) -> Iterator[TokenEvent]:
        if isinstance(prompt, VisionPrompt):
            raise GenerationError(f"The {self.loader_name} loader reads no images.")
        ids = self.encode(prompt, add_bos=params.add_bos_token) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("The prompt is empty: there is nothing to continue.")
        with self._lock:
            yield from self._run(ids, params, cancel)

    def _run(self, ids: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[TokenEvent]:
        """Enqueue the request's job and step the generator until the job ends; each step's new token ids become
        events. Leaving early (cancel, the caller closing the stream) cancels the job, which frees its pages."""
        torch, generator = self._torch, self._generator
        events = TokenEvents(self.tokenizer, skip_special_tokens=params.skip_special_tokens, recorder=None,
                             stop_ids=set())
        job = None
        try:
            job = self._job(torch.tensor([ids], dtype=torch.long), params)
            serial = generator.enqueue(job)
            while not cancel.is_set():
                if not generator.num_remaining_jobs():
                    return
                for result in generator.iterate():
                    if result.get("serial") != serial:
                        continue
                    if result.get("stage") == "error":
                        raise GenerationError(f"{self.library} failed: {result.get('error')}")
                    if result.get("stage") != "streaming":
                        continue
                    tokens = result.get("token_ids")
                    for token in ([] if tokens is None else tokens.reshape(-1).tolist()):
                        event = events.event(int(token))
                        if event is not None:
                            yield event
                    if result.get("eos"):
                        return
        except WorkbenchError:
            raise
        except Exception as exc:  # a failure inside the library: one clear message
            raise GenerationError(f"{self.library} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if job is not None:
                generator.cancel(job)  # a finished job is no longer queued: nothing happens

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        split = self.options.gpu_split
        device = ("cuda:" + ",".join(str(i) for i, share in enumerate(split) if share > 0)) if split else "cuda"
        return ModelInfo(
            name=self.name, loader=self.loader_name, path=str(self.path), context_length=self.context_length,
            dtype=self._dtype, device=device, memory_bytes=self.memory_bytes, capabilities=sorted(self.capabilities),
            extra={"architecture": self._architecture, "cache_quant": self.options.cache_quant,
                   "cache_tokens": self.cache_tokens, "paged": self.paged})

    def unload(self) -> None:
        if self._generator is None and getattr(self, "tokenizer", None) is None:
            return
        self._free()
        self._generator = None
        self.tokenizer = None
        release_memory()


def _cuda_allocated(torch: Any) -> int:
    """Bytes PyTorch holds on every GPU now (what a load adds is the model's and its cache's footprint)."""
    return sum(torch.cuda.memory_allocated(index) for index in range(torch.cuda.device_count()))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _eos_ids(path: Path, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: config.json's and generation_config.json's eos_token_id, and the
    tokenizer's."""
    ids: list[int] = []
    for file in ("generation_config.json", "config.json"):
        value = _read_json(path / file).get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int):
                ids.append(token)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ModelLoadError("The model defines no end-of-sequence token; it cannot stop by itself.")
    return list(dict.fromkeys(ids))


class ExllamaLoader(Loader):
    """What both exllama loaders do: take their format's folders, and say what is missing before the library is
    imported (importing it builds its CUDA extension)."""

    format: ClassVar[str]
    Model: ClassVar[type[ExllamaModel]]

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return exl_format(path) == cls.format

    @classmethod
    def check_available(cls) -> None:
        require_library(cls.name, cls.Model.library)

    @classmethod
    def load(cls, path: Path, options: LoaderOptions) -> ExllamaModel:
        assert isinstance(options, cls.Options)
        cls.check_available()
        if not (path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))):
            raise ModelLoadError(f"{path.name} is not an {cls.format.upper()} folder: {cls.Model.library} reads a "
                                 "folder with config.json and *.safetensors weights.")
        return cls.Model(path, options)
