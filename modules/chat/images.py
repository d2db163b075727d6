"""Images in a conversation, for every caller of the one chat path (modules.chat.request).

A message may carry images as OpenAI content parts: `{"type": "image_url", "image_url": {"url": "data:..."}}`
(the API passes its bodies' parts on as they are; the Chat tab stores the same form). Only base64 data URLs are
read: the server never fetches a URL a client names (that would let any client make it reach any address).

`take_images` turns such messages into text messages, each image replaced by the model's image marker, and
returns the images in order; the vision model's loader then puts each image's tokens where its marker is
(LoadedModel.encode_images). The chat template thus renders plain text whatever it expects of images.

`image_counter` counts such a prompt as the model will read it: each marker as the tokens its image takes on the
loaded model (LoadedModel.image_tokens: a Transformers processor's image tokens, the tokens llama.cpp's projector
makes), so fitting the context and the prompt's token count see the images' real cost, not a marker's few tokens.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from typing import Any

from loaders.base import ImageData, LoadedModel
from modules.errors import InvalidInput

#: Image types a loader's image processor reads (through Pillow).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
#: The largest image file accepted (decoded bytes), and the most pixels (Pillow's own decompression-bomb bound).
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.ASCII)


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(_is_image(p) for p in m["content"]) for m in messages)


def decode_image_url(url: str) -> ImageData:
    """The image of a base64 data URL (data:image/png;base64,...), checked to be an image Pillow can open and not
    too large. Any other URL is refused: this server reads only the images a request carries."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:60] + "..." if isinstance(url, str) and len(url) > 60 else url
        raise InvalidInput(f"image_url {shown!r} is not a data URL: this server does not fetch images from URLs. "
                           "Send the image inline as data:image/png;base64,<data> (or image/jpeg, image/webp).",
                           field="messages")
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise InvalidInput("An image data URL must be base64: data:image/png;base64,<data>.", field="messages")
    mime = (match.group("mime") or "").lower()
    if mime not in IMAGE_TYPES:
        raise InvalidInput(f"Image type {mime or '(none)'!r} is not read here; send one of {', '.join(IMAGE_TYPES)}.",
                           field="messages")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise InvalidInput(f"An image is over {MAX_IMAGE_BYTES // 2**20} MiB.", field="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("An image data URL holds invalid base64.", field="messages") from None
    check_image(data)
    return ImageData(data, mime)


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, or InvalidInput when Pillow cannot read it or it is too large."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise InvalidInput(f"An image of {size[0]}x{size[1]} pixels is over the {MAX_IMAGE_PIXELS:,} pixels "
                                   "read here.", field="messages")
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # what Pillow raises on a bad file
        raise InvalidInput(f"An image could not be read: {type(exc).__name__}: {exc}", field="messages") from None
    return size


def take_images(messages: list[dict[str, Any]], marker: str | None) -> tuple[list[dict[str, Any]],
                                                                           list[ImageData]]:
    """The messages with each content list made one text (its text parts joined, each image part replaced by
    `marker`), and the images in order. `marker` None: the model reads no images, and a message with one is
    refused by the caller (has_images) before this runs; text parts are still joined."""
    images: list[ImageData] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            if marker and isinstance(content, str) and marker in content:
                _refuse_marker(marker)
            out.append(message)
            continue
        pieces: list[str] = []
        for part in content:
            if _is_image(part):
                images.append(decode_image_url(_url_of(part)))
                pieces.append(marker or "")
            elif isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text") or ""
                if marker and marker in text:
                    _refuse_marker(marker)
                pieces.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidInput(f"Content parts of type {kind!r} are not read here (text and image_url are).",
                                   field="messages")
        out.append({**message, "content": "".join(pieces)})
    return out, images


def images_in_prompt(prompt: str, marker: str, images: list[ImageData]) -> tuple[ImageData, ...]:
    """The images a rendered prompt reads: one per marker in it. When the oldest turns were left out to fit the
    context, their images went with them, so the prompt's markers are those of the last images."""
    count = prompt.count(marker)
    if count > len(images):
        raise InvalidInput(f"The prompt holds {count} image markers ({marker!r}) for {len(images)} images: the chat "
                           "template or the system message writes the marker itself.", field="messages")
    return tuple(images[len(images) - count:]) if count else ()


def image_counter(model: LoadedModel, marker: str, images: list[ImageData]) -> Callable[[str], int]:
    """count(text): the tokens of a prompt text whose markers stand for the last of `images` (as images_in_prompt
    pairs them), each counted as what its image costs `model`; the text between markers is tokenized piece by
    piece, as the loaders read it. A text that is not a whole prompt (a message's own) is counted against the last
    images too: an estimate the context fitting corrects with whole prompts."""
    costs = [model.image_tokens(image) for image in images]

    def count(text: str) -> int:
        pieces = text.split(marker)
        markers = len(pieces) - 1
        if markers > len(costs):  # a marker the template wrote itself: images_in_prompt refuses the prompt
            return model.token_count(text)
        return sum(model.token_count(piece) for piece in pieces if piece) + sum(costs[len(costs) - markers:])

    return count


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "image")


def _url_of(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    if isinstance(value, dict):
        return value.get("url", "")
    return value if isinstance(value, str) else ""


def _refuse_marker(marker: str) -> None:
    raise InvalidInput(f"Message text may not contain {marker!r}: for this model it stands for an image. Send "
                       "images as image_url parts.", field="messages")
