"""The Chat tab's images: an Image button beside the message box for PNG, JPEG, WebP, GIF and BMP files, the images
waiting to go with the next message (name, type, pixels and size) and a way to take them back. An image is checked
when it is attached (modules.chat.image_store.read_image), and refused at once when the page's model is loaded and
reads no images (the ImagesUnsupported message); it goes with the next message sent, is stored in the chats'
images folder and shows on the message as a thumbnail (modules.ui.chat_display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from loaders.base import Capability, ImageData, LoadedModel
from modules.chat.image_store import IMAGE_EXTENSIONS, PendingImage, read_image
from modules.chat.images import MAX_IMAGE_BYTES
from modules.errors import ConfigError, ImagesUnsupported, InvalidInput, WorkbenchError
from modules.ui.common import UiContext, session_of, user_errors
from modules.ui.model_choice import ModelChoice
from modules.ui.pending_uploads import PendingPanel, build_pending_panel, escape_markdown

#: The most images one message may carry.
MAX_IMAGES = 8


ImagesPanel = PendingPanel  # the waiting images (PendingImage)


def build_image_button() -> gr.UploadButton:
    """The Image button; place it beside the message box."""
    return gr.UploadButton("🖼 Image", file_count="multiple", file_types=IMAGE_EXTENSIONS, type="filepath",
                           size="sm", elem_id="chat-image")


def build_images_panel(button: gr.UploadButton) -> ImagesPanel:
    """The list of images waiting for the next message (place it under the message box) and its Remove button."""
    return build_pending_panel(button, _shown, clear_label="Remove images", elem_id="chat-images", min_width=140)


def wire_images(ctx: UiContext, panel: ImagesPanel, status: gr.Markdown, model: Any, model_inputs: list[Any]) -> None:
    """Read the images the button uploads into the waiting list; `model(data)` gives the page's ModelChoice from
    `model_inputs` (a loaded model that reads no images refuses them here, one not loaded when they are sent)."""
    button, pending, listing, clear = panel.button, panel.pending, panel.listing, panel.clear

    @user_errors
    def attach(data: dict[Any, Any]) -> tuple[Any, ...]:
        session_of(data[ctx.session])
        loaded = _vision_model(ctx, model(data))
        paths = data[button] or []
        images = [*panel.read(data), *(_read(path) for path in (paths if isinstance(paths, list) else [paths]))]
        if len(images) > MAX_IMAGES:
            raise InvalidInput(f"A message may carry up to {MAX_IMAGES} images; {len(images)} were attached.")
        counts = [loaded.image_tokens(ImageData(image.data, image.media_type)) for image in images] \
            if loaded is not None else None
        note = f"Attached: {len(images)} image(s)"
        return *_shown(images, counts), note + (f", {sum(counts):,} tokens of the prompt." if counts else ".")

    button.upload(attach, {ctx.session, button, pending, *model_inputs}, [pending, listing, clear, status])
    clear.click(lambda: (*_shown([]), "Images removed."), None, [pending, listing, clear, status], queue=False)


def _vision_model(ctx: UiContext, choice: ModelChoice) -> LoadedModel | None:
    """The page's model, which counts the images' tokens; None when it is not loaded (the turn checks and counts
    them once it is). Images are refused at once when it is loaded and reads none (ImagesUnsupported)."""
    try:
        loaded = ctx.services.manager.require_model(choice.model)
    except WorkbenchError:
        return None
    if Capability.VISION not in loaded.capabilities:
        raise ImagesUnsupported(loaded.name)
    return loaded


def _read(path: str | Path) -> PendingImage:
    """The image an upload left at `path` (Gradio's temporary copy, named as the user's file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"The uploaded image {path.name} is gone: {exc}") from None
    if size > MAX_IMAGE_BYTES:  # refused before it is read into memory
        raise InvalidInput(f"{path.name} is over {MAX_IMAGE_BYTES // 2**20} MiB, the most an image may be.")
    return read_image(path.name, path.read_bytes())


def _shown(images: list[PendingImage], counts: list[int] | None = None) -> tuple[Any, Any, Any]:
    """(the waiting images, their list with the tokens each takes on the page's model when it is loaded, the Remove
    button)."""
    if not images:
        return [], gr.update(value="", visible=False), gr.update(visible=False)
    lines = []
    for number, image in enumerate(images):
        tokens = f" · {counts[number]:,} tokens" if counts is not None else ""
        lines.append(f"🖼 **{escape_markdown(image.name)}** ({escape_markdown(image.details)}{tokens})")
    text = "Going with your next message:  \n" + "  \n".join(lines)
    return images, gr.update(value=text, visible=True), gr.update(visible=True)
