"""Vision-language models for the Transformers loader: a folder whose config.json has a vision_config loads through
AutoModelForImageTextToText and its AutoProcessor (the model's tokenizer plus its image processor).

The chat path writes the processor's image token (`<image>` for Idefics3 / SmolVLM, LLaVA...) where each image
goes (modules.chat.images); `encode_images` has the processor expand each into the image's tokens and make the
pixel inputs, which the prompt's first forward pass reads (transformers_support.decode_loop's `prefill`).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from loaders.base import ImagePrompt, VisionPrompt
from modules.errors import InvalidInput, ModelLoadError


def is_vision_folder(path: Path) -> bool:
    """Whether a model folder holds a vision-language model: its config.json has a vision_config (Idefics3,
    SmolVLM, LLaVA, Qwen2-VL, Gemma 3... all write one)."""
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("vision_config"), dict)


def load_vision(source: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(processor, model) of a vision-language folder. Raises ModelLoadError when the processor cannot be made or
    has no image token (it then could not place an image in the text)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(source, trust_remote_code=kwargs.get("trust_remote_code", False))
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"{Path(source).name}: its processor has no tokenizer or no image processor.")
    if not isinstance(getattr(processor, "image_token", None), str):
        raise ModelLoadError(f"{Path(source).name}: its processor names no image token to place images with.")
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    return processor, model


def chat_template(processor: Any) -> str | None:
    """The processor's chat template (a VLM's usually lives there), else its tokenizer's."""
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)


def encode_images(processor: Any, prompt: ImagePrompt, *, add_bos: bool, bos_id: int | None, device: Any,
                  dtype: Any) -> VisionPrompt:
    """The processor's token ids for the prompt (each image marker expanded into that image's tokens) and the
    image inputs (pixel_values and the like) on the model's device, floating ones in the model's dtype."""
    from PIL import Image

    pictures = []
    for image in prompt.images:
        with Image.open(io.BytesIO(image.data)) as opened:
            pictures.append(opened.convert("RGB"))
    try:
        batch = processor(text=[prompt.text], images=[pictures] if pictures else None, return_tensors="pt",
                          add_special_tokens=False)
    except (ValueError, TypeError) as exc:  # the processor's own checks (marker and image counts, sizes)
        raise InvalidInput(f"The model's processor refused the images: {exc}", field="messages") from None
    ids = [int(t) for t in batch["input_ids"][0].tolist()]
    skip = {"input_ids", "attention_mask"}
    if add_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
        skip |= {"token_type_ids", "mm_token_type_ids"}  # per-token rows no longer line up with the ids
    inputs = {}
    for name, value in batch.items():
        if name in skip:
            continue
        if hasattr(value, "to"):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        inputs[name] = value
    return VisionPrompt(ids, inputs)
