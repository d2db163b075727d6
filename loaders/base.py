"""The loader seam: one small interface every backend implements, and the registry that picks one for a path.

A loader turns a path plus a typed options object into a LoadedModel. A LoadedModel streams TokenEvents for a
prompt, encodes and decodes, exposes its chat template and declares what it can do. Stop strings, queueing and
prompt building live above this seam, in the core, written once for every loader.
"""
from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from modules.errors import ConfigError, ImagesUnsupported, ModelLoadError, describe_validation_error
from modules.generation_params import GenerationParams, TokenEvent

if TYPE_CHECKING:
    from loaders.batching import BatchDecoder
    from modules.constraints.worker import TrialCompiler


class Capability(StrEnum):
    TOKENIZE = "tokenize"  # encode/decode locally; the core hands the loader token ids
    LOGPROBS = "logprobs"  # chosen-token and top-k log-probabilities
    GRAMMAR = "grammar"  # GBNF grammar and JSON schema constrained output
    LORA = "lora"  # apply/remove LoRA adapters on the loaded model
    LOGITS_PROCESSORS = "logits_processors"  # extensions may add logits processors
    VISION = "vision"  # reads images: an ImagePrompt becomes a VisionPrompt through encode_images


@dataclass(frozen=True)
class ImageData:
    """An image a message carries, as its client sent it: the encoded file (PNG, JPEG, ...) and its MIME type.
    Loaders decode it themselves (their processors want their own form)."""

    data: bytes
    mime_type: str


@dataclass(frozen=True)
class ImagePrompt:
    """A prompt that reads images: the text with the model's `image_marker` where each image goes, and the
    images in the order of their markers. Only a model with Capability.VISION takes it (`encode_images`)."""

    text: str
    images: tuple[ImageData, ...]


@dataclass
class VisionPrompt:
    """An ImagePrompt as its model reads it: the token ids with each image's tokens in place of its marker, and
    the loader's own inputs for the images (pixel tensors, ...), used when the prompt is evaluated."""

    ids: list[int]
    inputs: Any


class LoaderOptions(BaseModel):
    """Base of each loader's options. Fields carry descriptions (the help text of flags and UI widgets)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _comma_separated_lists(cls, data: Any) -> Any:
        """A list option typed as one box or flag value ("60,40", "20GiB 10GiB") is its items; nothing is None."""
        if not isinstance(data, dict):
            return data
        lists = {name for name, info in cls.model_fields.items() if _is_list(info.annotation)}
        return {name: split_items(value) if name in lists else value for name, value in data.items()}


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, UnionType):
        return any(_is_list(arg) for arg in get_args(annotation))
    return get_origin(annotation) is list


def split_items(value: Any) -> Any:
    """Items of a list option given as text: split on commas and blanks, each part trimmed; an empty text (or a
    list of empty texts) is None, the loader's default."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    parts = [part for item in items
             for part in (item.replace(",", " ").split() if isinstance(item, str) else [item])]
    return parts or None


@dataclass
class ModelInfo:
    """What the Model tab and /v1/internal/model/info show about the loaded model."""

    name: str
    loader: str
    path: str
    context_length: int
    dtype: str
    device: str
    memory_bytes: int
    loras: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class LoadedModel(ABC):
    """A model in memory. Subclasses fill the attributes in __init__ and implement the abstract methods."""

    loader_name: ClassVar[str]
    capabilities: frozenset[Capability] = frozenset()
    #: GenerationParams fields this model honours (see modules.generation_params.check_supported).
    supported_params: frozenset[str] = frozenset()

    name: str
    path: Path
    context_length: int
    chat_template: str | None  # Jinja, from the model's own metadata; None when it has none
    bos_token: str | None
    eos_token: str | None
    #: Width of the logits (token ids must be below it); None when the backend does not say.
    vocab_size: int | None = None
    #: Sequences the model decodes together (its loader's `parallel` option); 1: one request at a time.
    slots: int = 1
    #: The most UTF-8 bytes one token stands for (a bound to refuse a text too long for the context without
    #: tokenizing it); None when the backend does not say.
    max_token_bytes: int | None = None
    #: The text that stands for one image in an ImagePrompt (a model with Capability.VISION sets it).
    image_marker: str | None = None

    @abstractmethod
    def stream(self, prompt: list[int] | str | VisionPrompt, params: GenerationParams,
               cancel: threading.Event) -> Iterator[TokenEvent]:
        """Yield tokens until EOS, max_new_tokens, or `cancel` is set (checked before every token). A VisionPrompt
        reaches only a model with Capability.VISION.

        Closing the iterator early must stop generation and free resources at once."""

    def encode_images(self, prompt: ImagePrompt, *, add_bos: bool = False) -> VisionPrompt:
        """The token ids and image inputs of `prompt` (Capability.VISION); other models read no images."""
        raise ImagesUnsupported(self.name)

    def image_tokens(self, image: ImageData) -> int:
        """The tokens `image` takes in a prompt of this model: its marker as encode_images expands it (the image's
        own tokens and the boundary tokens the model writes around them), so the chat path fits a prompt with
        images to the context before it is encoded. A loader may count it more cheaply; other models read no
        images."""
        return len(self.encode_images(ImagePrompt(self.image_marker or "", (image,))).ids)

    @abstractmethod
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, parsing special tokens written in it (such as <|im_start|>)."""

    @abstractmethod
    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...

    def token_count(self, text: str) -> int:
        return len(self.encode(text))

    def batch_decoder(self) -> BatchDecoder | None:
        """The decoder that runs up to `slots` sequences together (loaders.batching); None when this model
        cannot batch, and the scheduler runs its requests one at a time through `stream`."""
        return None

    def constraint_compiler(self) -> TrialCompiler | None:
        """How modules.constraints trial-compiles a grammar or schema for this model in a child process (its
        compiler and vocabulary); None when this model has no local compiler."""
        return None

    def apply_loras(self, paths: list[Path], scales: list[float] | None = None) -> None:
        raise ModelLoadError(f"The {self.loader_name} loader cannot apply LoRA adapters.")

    def remove_loras(self) -> None:
        raise ModelLoadError(f"The {self.loader_name} loader cannot apply LoRA adapters.")

    @property
    def loras(self) -> list[str]:
        return []

    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    def unload(self) -> None:
        """Free the weights now; the object must not be used afterwards."""


class Loader(ABC):
    """A backend. Loaders are stateless: all state lives in the LoadedModel they return."""

    name: ClassVar[str]
    Options: ClassVar[type[LoaderOptions]]
    description: ClassVar[str] = ""
    #: False for loaders whose model is not a file in models/ (the remote loader): the name is passed as is.
    local_files: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def accepts(cls, path: Path) -> bool:
        """Whether this loader recognises what `path` holds (used to pick a loader when none is forced)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, options: LoaderOptions) -> LoadedModel:
        """Load or raise ModelLoadError; never leave a half-loaded model behind."""

    @classmethod
    def check_available(cls) -> None:
        """Raise LoaderUnavailable when this machine cannot run the loader at all (its library or the hardware it
        needs is missing): the model manager asks before a load unloads anything to make room."""

    @classmethod
    def parse_options(cls, values: dict[str, Any] | None) -> LoaderOptions:
        try:
            return cls.Options(**(values or {}))
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, f"Bad {cls.name} loader option(s)")) from None


@dataclass(frozen=True)
class LoaderEntry:
    """A registry row: the import path is resolved only when the loader is used, so listing loaders (for
    --help, the Model tab) does not import torch or llama.cpp."""

    name: str
    module: str
    class_name: str

    def resolve(self) -> type[Loader]:
        module = importlib.import_module(self.module)
        return getattr(module, self.class_name)


#: In the order `detect` asks them: the EXL2/EXL3 loaders before Transformers, whose folders theirs also look like.
BUILTIN_LOADERS: tuple[LoaderEntry, ...] = (
    LoaderEntry("llama.cpp", "loaders.llama_cpp_loader", "LlamaCppLoader"),
    LoaderEntry("exllamav2", "loaders.exllamav2_loader", "Exllamav2Loader"),
    LoaderEntry("exllamav3", "loaders.exllamav3_loader", "Exllamav3Loader"),
    LoaderEntry("transformers", "loaders.transformers_loader", "TransformersLoader"),
    LoaderEntry("remote", "loaders.remote", "RemoteLoader"),
)


class LoaderRegistry:
    """The loaders an app knows, by name. Extensions add theirs through the `register_loaders` hook."""

    def __init__(self, entries: tuple[LoaderEntry, ...] | list[LoaderEntry] = BUILTIN_LOADERS):
        self._entries: dict[str, LoaderEntry] = {entry.name: entry for entry in entries}

    def register(self, entry: LoaderEntry) -> None:
        self._entries[entry.name] = entry

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> type[Loader]:
        key = _LOADER_ALIASES.get(name.lower(), name)
        if key not in self._entries:
            raise ConfigError(f"Unknown loader {name!r}; known loaders: {', '.join(self._entries)}.")
        try:
            return self._entries[key].resolve()
        except ImportError as exc:
            raise ModelLoadError(f"The {key} loader is not installed: {exc}") from None

    def detect(self, path: Path) -> type[Loader]:
        """Pick the loader for what `path` holds."""
        if not path.exists():
            raise ModelLoadError(f"No model at {path}.")
        for name in self._entries:
            try:
                loader = self.get(name)
            except ModelLoadError:
                continue
            if loader.accepts(path):
                return loader
        raise ModelLoadError(
            f"No loader recognises {path.name}: expected a .gguf file, or a folder with config.json and "
            "*.safetensors weights. Pick a loader explicitly with --loader if you know better.")


_LOADER_ALIASES = {"llama_cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp",
                   "hf": "transformers", "huggingface": "transformers", "exl2": "exllamav2", "exl3": "exllamav3"}


def gguf_files(path: Path) -> list[Path]:
    """GGUF weights at `path`: the file itself, or those directly in the folder (first shard of a split only)."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".gguf" else []
    if path.is_dir():
        files = sorted(p for p in path.glob("*.gguf") if p.is_file())
        shards = [p for p in files if "-of-" in p.stem]
        return [p for p in files if p not in shards] + [p for p in shards if "-00001-of-" in p.stem]
    return []
