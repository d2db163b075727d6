"""Images for the llama.cpp loader: a multimodal projector GGUF (`mmproj`, written by llama.cpp's converter with
--mmproj beside the text GGUF) read by llama.cpp's libmtmd through llama-cpp-python's bindings (llama_cpp.mtmd_cpp).

- `find_mmproj`: the projector a model file goes with: the `mmproj` option (a file name in the model's folder), or
  the one mmproj*.gguf beside the model file.
- `Projector.encode`: mtmd_tokenize cuts the prompt at each image marker (mtmd's own "<__media__>") into text
  chunks (token ids) and image chunks (the image preprocessed into the projector's tiles, between the model's own
  image boundary tokens, which mtmd writes into the text chunks). The VisionPrompt's ids are the text ids with a
  stand-in id for each image token, so a prompt with images is counted, checked against the context and shown as
  the other prompts are; its inputs are the chunks (`MtmdPrompt`), which the prompt's evaluation reads.
- `Projector.read`: the chunks into the context in order: text chunks through the loader's own decode (Llama.eval),
  as any prompt's text; image chunks through mtmd_helper_eval_chunk_single (the projector encodes the image and its
  embeddings are decoded into the KV cache at the sequence's next positions).

mtmd looks each boundary token up in the model's vocabulary by its text; one the vocabulary lacks (an mmproj made
for another tokenizer) would come back as token -1 inside a text chunk, which llama_decode refuses: `encode` says
so instead.
"""
from __future__ import annotations

import ctypes
import io
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders.base import ImagePrompt, VisionPrompt
from modules.errors import GenerationError, InvalidInput, ModelLoadError
from modules.paths import resolve_inside


def is_mmproj(file: Path) -> bool:
    """Whether a GGUF file is a multimodal projector by its name (llama.cpp's converter names them mmproj-*)."""
    return file.name.lower().startswith("mmproj") and file.suffix.lower() == ".gguf"


def find_mmproj(model_file: Path, name: str | None) -> Path | None:
    """The projector for `model_file`: `name` (a file in the model's folder), else the one mmproj*.gguf beside it
    (None when there is none; ModelLoadError when several could be meant or `name` is missing)."""
    folder = model_file.parent
    if name:
        path = resolve_inside(folder, name, what="mmproj")
        if not path.is_file():
            raise ModelLoadError(f"No mmproj file {name} beside {model_file.name} (in {folder.name}).")
        return path
    found = sorted(p for p in folder.glob("*.gguf") if p.is_file() and is_mmproj(p))
    if len(found) > 1:
        raise ModelLoadError(f"Several mmproj files beside {model_file.name} ({', '.join(p.name for p in found)}); "
                             "pick one with the mmproj option.")
    return found[0] if found else None


@dataclass(eq=False)
class MtmdPrompt:
    """A prompt's mtmd chunks (freed with this object) in order, each with its token ids when it is text (None for
    an image), and the text ids alone (the penalty samplers' history: image positions hold no tokens)."""

    chunks: Any
    parts: list[tuple[Any, list[int] | None]] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    image_tokens: int = 0
    _free: Any = field(default=None, repr=False)


class Projector:
    """An mmproj loaded for one llama.cpp model (an mtmd context over its llama_model)."""

    def __init__(self, file: Path, llama: Any, *, use_gpu: bool, n_threads: int):
        import llama_cpp._logger as llama_logger
        from llama_cpp import mtmd_cpp

        self._mtmd = mtmd = mtmd_cpp
        self.file = file
        # mtmd logs through its own callbacks: the same one as llama.cpp's (silent unless the Llama is verbose)
        mtmd.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads = use_gpu, False, n_threads
        self._ctx = mtmd.mtmd_init_from_file(str(file).encode("utf-8"), llama._model.model, params)
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp could not load the mmproj {file.name} for this model (another model's "
                                 "projector, or not an mmproj GGUF).")
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ModelLoadError(f"The mmproj {file.name} reads no images (an audio projector).")
        self.marker = mtmd.mtmd_default_marker().decode("utf-8")
        self._lock = threading.Lock()  # tokenizing (a request's thread) and encoding (the engine's) share the context
        self._n_vocab = llama.n_vocab()
        stand_in = llama.tokenize(b"<image>", add_bos=False, special=True)
        #: The id an image token stands as in a VisionPrompt's ids (the vocabulary's <image> when it has one).
        self.stand_in = stand_in[0] if len(stand_in) == 1 else 0

    def encode(self, prompt: ImagePrompt, *, add_bos: bool) -> VisionPrompt:
        """The prompt's chunks: its text tokenized (special tokens parsed, BOS as `add_bos` says) and each image
        decoded (Pillow: any type the chat path accepts) and preprocessed for the projector."""
        mtmd = self._mtmd
        bitmaps = [self._bitmap(image.data) for image in prompt.images]
        chunks = mtmd.mtmd_input_chunks_init()
        prompt_text = prompt.text.encode("utf-8")
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = prompt_text, len(prompt_text), add_bos, True
        try:
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            with self._lock:
                code = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), array, len(bitmaps))
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        held = MtmdPrompt(chunks)
        held._free = weakref.finalize(held, mtmd.mtmd_input_chunks_free, chunks)
        if code != 0:
            held._free()
            raise InvalidInput(f"llama.cpp could not place the images in the prompt (mtmd_tokenize: {code}; the "
                               f"prompt has {prompt.text.count(self.marker)} image markers for {len(bitmaps)} "
                               "images).", field="messages")
        ids: list[int] = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                ids += [self.stand_in] * count
                held.image_tokens += count
                held.parts.append((chunk, None))
                continue
            n = ctypes.c_size_t()
            tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            piece = [int(tokens[i]) for i in range(n.value)]
            if any(t < 0 or t >= self._n_vocab for t in piece):
                held._free()
                raise GenerationError(f"The mmproj {self.file.name} writes image boundary tokens this model's "
                                      "vocabulary lacks (llama.cpp gave token -1): it was made for another model.")
            ids += piece
            held.text_ids += piece
            held.parts.append((chunk, piece))
        return VisionPrompt(ids, held)

    def _bitmap(self, data: bytes) -> Any:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as opened:
                picture = opened.convert("RGB")
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"An image could not be read: {exc}", field="messages") from None
        pixels = picture.tobytes()
        buffer = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
        bitmap = self._mtmd.mtmd_bitmap_init(picture.width, picture.height, buffer)
        if not bitmap:
            raise InvalidInput("llama.cpp could not take an image.", field="messages")
        return bitmap

    def read(self, llama: Any, prompt: MtmdPrompt, eval_text: Callable[[list[int]], None],
             cancel: threading.Event) -> int:
        """Read a prompt with images into the Llama's empty cache (sequence 0): its text chunks through `eval_text`
        (the loader's Llama.eval, as any prompt's text), its image chunks through the projector, each at the
        positions that follow; returns the tokens read."""
        if not prompt.parts or prompt.parts[-1][1] is None:
            raise InvalidInput("A prompt with images must end with text (the model answers after it).")
        llama._ctx.kv_cache_clear()
        llama.reset()
        for chunk, tokens in prompt.parts:
            if cancel.is_set():
                break
            if tokens is None:
                llama.n_tokens = self.eval_image(llama._ctx.ctx, chunk, llama.n_tokens, llama.n_batch)
            elif tokens:
                eval_text(tokens)
        return llama.n_tokens

    def eval_image(self, lctx: Any, chunk: Any, n_past: int, n_batch: int) -> int:
        """Encode one image chunk and decode its embeddings into sequence 0 from position `n_past`; returns the
        next position."""
        import llama_cpp

        new_past = llama_cpp.llama_pos(n_past)
        with self._lock:
            code = self._mtmd.mtmd_helper_eval_chunk_single(self._ctx, lctx, chunk, llama_cpp.llama_pos(n_past),
                                                            llama_cpp.llama_seq_id(0), n_batch, False,
                                                            ctypes.byref(new_past))
        if code != 0:
            raise GenerationError(f"llama.cpp failed to read an image (code {code}).")
        return int(new_past.value)

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
