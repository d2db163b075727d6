"""Images sent with chat messages, kept beside the chats: each image file once, named by the SHA-256 of its bytes,
in the images folder of the character's chats (`<root>/<character>/images/<sha256>.<ext>`, HistoryStore.images).

The chat file records only a reference (`StoredImage`: hash, type, name, size, pixels), so a chat file stays small
(it is rewritten on every turn, and the chat list reads every file), the same image sent twice or kept by a branch
is stored once, and a file's name comes from its hash and type alone, never from what a user typed. Files are
written atomically and never changed afterwards. `image_part` gives a stored image back as the image_url content
part the one chat path reads (modules.chat.images); `thumbnail` a small copy for the Chat tab to show.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modules.chat.attachments import clean_name, format_size
from modules.chat.images import MAX_IMAGE_BYTES, check_image
from modules.errors import ConfigError, InvalidInput
from modules.paths import atomic_write_bytes

MediaType = Literal["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"]
#: What Pillow calls each type, and the extension its file gets.
_FORMATS: dict[str, tuple[str, str]] = {"PNG": ("image/png", ".png"), "JPEG": ("image/jpeg", ".jpg"),
                                        "WEBP": ("image/webp", ".webp"), "GIF": ("image/gif", ".gif"),
                                        "BMP": ("image/bmp", ".bmp")}
_EXTENSIONS = {media: ext for media, ext in _FORMATS.values()}
#: Extensions an upload picker offers.
IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"]
#: The longest side of a thumbnail, in pixels.
THUMBNAIL_SIDE = 192
_THUMBNAILS = Path(tempfile.gettempdir()) / "workbench-chat-thumbnails"


class StoredImage(BaseModel):
    """An image a message carries, as the chat file records it: the SHA-256 of its bytes (its file's name), its
    type, the name it was sent under, its size in bytes and its pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    media_type: MediaType
    name: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)

    @property
    def file_name(self) -> str:
        return self.sha256 + _EXTENSIONS[self.media_type]

    @property
    def label(self) -> str:
        """"cat.png (PNG, 640×480, 51.2 KB)", as the Chat tab shows it."""
        return f"{self.name} ({self.details})"

    @property
    def details(self) -> str:
        """"PNG, 640×480, 51.2 KB"."""
        return f"{self.media_type.split('/')[1].upper()}, {self.width}×{self.height}, {format_size(self.size)}"


class PendingImage(BaseModel):
    """An image read from an upload and checked, waiting to go with the next message (not stored yet)."""

    model_config = ConfigDict(frozen=True)

    name: str
    data: bytes
    media_type: MediaType
    width: int
    height: int

    @property
    def details(self) -> str:
        return self.reference("0" * 64).details

    def reference(self, sha256: str) -> StoredImage:
        return StoredImage(sha256=sha256, media_type=self.media_type, name=self.name, size=len(self.data),
                           width=self.width, height=self.height)

    def part(self) -> dict[str, Any]:
        """The image_url content part the chat path reads."""
        return _part(self.media_type, self.data)


def read_image(name: str, data: bytes) -> PendingImage:
    """The image file `name` holding `data`, checked (Pillow reads it, not too large; its type from its bytes, not
    its name). Raises InvalidInput naming the file and why."""
    from PIL import Image

    name = clean_name(name, "image")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{name} is {format_size(len(data))}; images up to {format_size(MAX_IMAGE_BYTES)} can be "
                           "attached.", field="images")
    try:
        check_image(data)
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    except (InvalidInput, OSError) as exc:
        raise InvalidInput(f"{name} cannot be read as an image: {exc}", field="images") from None
    if kind not in _FORMATS:
        raise InvalidInput(f"{name} is a {kind} image; attach PNG, JPEG, WebP, GIF or BMP.", field="images")
    return PendingImage(name=name, data=data, media_type=_FORMATS[kind][0], width=width, height=height)


class ImageFolder:
    """The images folder of one character's chats."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    def path(self, image: StoredImage) -> Path:
        return self.folder / image.file_name  # the name is a checked hash and a fixed extension

    def save(self, image: PendingImage) -> StoredImage:
        """Store the image (written atomically, once per content) and return its reference."""
        stored = image.reference(hashlib.sha256(image.data).hexdigest())
        path = self.path(stored)
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, image.data)
        return stored

    def read(self, image: StoredImage) -> bytes:
        """The stored image's bytes, checked against its hash."""
        try:
            data = self.path(image).read_bytes()
        except OSError:
            raise ConfigError(f"The image {image.name} of this chat is missing from {self.folder} "
                              f"({image.file_name}).") from None
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise ConfigError(f"The image {image.name} of this chat was changed on disk ({self.path(image)}).")
        return data

    def part(self, image: StoredImage) -> dict[str, Any]:
        """The image_url content part (a base64 data URL) the chat path reads for a stored image."""
        return _part(image.media_type, self.read(image))

    def thumbnail(self, image: StoredImage) -> Path | None:
        """A small PNG of the image (made once, in the system's temporary folder, where the UI may serve files
        from); None when the image cannot be read."""
        from PIL import Image

        path = _THUMBNAILS / f"{image.sha256}-{THUMBNAIL_SIDE}.png"
        if path.is_file():
            return path
        try:
            with Image.open(io.BytesIO(self.read(image))) as opened:
                opened.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buffer = io.BytesIO()
                opened.convert("RGBA").save(buffer, "PNG")
        except (ConfigError, OSError, ValueError):
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        return path


def _part(media_type: str, data: bytes) -> dict[str, Any]:
    return {"type": "image_url",
            "image_url": {"url": f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"}}


def with_images(content: str, parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A message's content with its images: the image parts, then the text (as a part); no images: the text."""
    if not parts:
        return content
    return [*parts, *([{"type": "text", "text": content}] if content else [])]
