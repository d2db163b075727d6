"""A tab of character cards (from characters/, through modules.chat.characters) to pick the chat's character."""
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from modules.extensions import hookimpl


class Params(BaseModel):
    columns: int = Field(4, ge=1, le=12, description="Cards per row.")


params = Params()


def gallery_items(characters_dir: Path) -> list[tuple[Any, str]]:
    """(picture, name) for every character: its picture file, or a drawn card with its initial."""
    from modules.chat.characters import character_picture, list_characters

    items = []
    for name in list_characters(characters_dir):
        picture = character_picture(name, characters_dir=characters_dir)
        items.append((str(picture) if picture is not None else placeholder(name), name))
    return items


def placeholder(name: str, size: int = 192) -> Any:
    """A plain card with the character's initial, for characters without a picture."""
    from PIL import Image, ImageDraw, ImageFont

    hue = sum(map(ord, name)) % 360
    image = Image.new("HSV", (size, size), (int(hue * 255 / 360), 90, 200)).convert("RGB")
    draw = ImageDraw.Draw(image)
    letter = (name[:1] or "?").upper()
    font = ImageFont.load_default(size=size // 2)
    box = draw.textbbox((0, 0), letter, font=font)
    draw.text(((size - box[2] - box[0]) / 2, (size - box[3] - box[1]) / 2), letter, fill="white", font=font)
    return image


@hookimpl
def ui(services: Any, params: Params, components: dict[str, Any]) -> None:
    """A "Character gallery" tab; clicking a card sets the Chat tab's character menu when the app passes it
    as components["character"]."""
    import gradio as gr

    folder = services.settings.character_dir
    with gr.Tab("Character gallery"):
        refresh = gr.Button("Refresh", size="sm")
        gallery = gr.Gallery(value=gallery_items(folder), columns=params.columns, allow_preview=False,
                             label="Characters", show_label=False)
        refresh.click(lambda: gallery_items(folder), outputs=gallery)
        target = components.get("character")
        if target is not None:
            def pick(event: gr.SelectData) -> Any:
                names = [name for _, name in gallery_items(folder)]
                return names[event.index] if 0 <= event.index < len(names) else gr.skip()

            gallery.select(pick, outputs=target)
