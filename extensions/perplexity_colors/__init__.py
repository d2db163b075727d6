"""Colours each token of a reply by the probability the model gave it (red: unlikely, green: likely), from the
log-probabilities the loaders report with each token. For the web UI's chat; the API's text is left alone."""
from __future__ import annotations

import html
import math
from typing import Any

from pydantic import BaseModel, Field

from modules.extensions import hookimpl


class Params(BaseModel):
    show_probability: bool = Field(True, description="Show each token's probability when the mouse is over it.")
    apply_to_api: bool = Field(False, description="Also colour replies of the API (as HTML).")


params = Params()


def _active(state: dict[str, Any], params: Params) -> bool:
    return state.get("source") == "ui" or params.apply_to_api


@hookimpl
def state_modifier(state: dict[str, Any], params: Params) -> dict[str, Any]:
    """Ask the loader for the chosen token's log-probability."""
    if _active(state, params) and not state.get("logprobs"):
        state = {**state, "logprobs": 1}
    return state


def colour(probability: float) -> str:
    """Red at 0, yellow at 0.5, green at 1 (as a CSS rgba with a light alpha, readable in both themes)."""
    p = min(max(probability, 0.0), 1.0)
    red = 255 if p < 0.5 else int(round(255 * (1 - p) * 2))
    green = int(round(255 * p * 2)) if p < 0.5 else 255
    return f"rgba({red}, {green}, 0, 0.35)"


def colour_tokens(text: str, tokens: list[Any], *, show_probability: bool = True) -> str:
    """HTML of `text` with one span per token that carries a log-probability; text without tokens stays plain."""
    pieces, used = [], 0
    for token in tokens:
        piece = token.text
        if not piece or not text.startswith(piece, used):
            continue
        used += len(piece)
        if token.logprob is None:
            pieces.append(html.escape(piece))
            continue
        probability = math.exp(token.logprob)
        title = f' title="{probability:.3f}"' if show_probability else ""
        pieces.append(f'<span class="token" style="background-color: {colour(probability)}"{title}>'
                      f"{html.escape(piece)}</span>")
    return "".join(pieces) + html.escape(text[used:])


@hookimpl
def output_modifier(text: str, state: dict[str, Any], tokens: list[Any], params: Params) -> str:
    if not _active(state, params) or not any(t.logprob is not None for t in tokens or []):
        return text
    return colour_tokens(text, tokens, show_probability=params.show_probability)
