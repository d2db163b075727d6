"""A documented template: the hooks an extension implements most, each doing one small thing its params switch on.
Two more hooks are specified in modules/extensions.py: `start` (serve the app on a port, as extensions/openai does)
and `register_loaders` (add a backend: `loaders.register(LoaderEntry("name", __name__, "MyLoader"))` with a
loaders.base.Loader subclass).

Copy this folder to `extensions/<your_name>/`, keep the hooks you need, and enable it with
`--extensions <your_name>` (or in settings.yaml: `extensions: {<your_name>: {param: value}}`). Every hook may
take `params` (this extension's own, with the settings' values on top) and the arguments its specification in
modules/extensions.py names; pluggy passes only the ones a hook lists. With the defaults below it changes nothing.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from modules.extensions import hookimpl


class Params(BaseModel):
    input_prefix: str = Field("", description="input_modifier: put this in front of the user's text.")
    hidden_suffix: str = Field("", description="chat_input_modifier: add this to what the model reads, not to "
                                               "what the chat shows.")
    uppercase_output: bool = Field(False, description="output_modifier: shout the reply.")
    keep_last_messages: int = Field(0, ge=0, description="history_modifier: keep only the last N messages "
                                                         "(the system message stays); 0 keeps all.")
    min_p: float | None = Field(None, ge=0, le=1, description="state_modifier: force this min_p.")
    plain_transcript: bool = Field(False, description="custom_generate_chat_prompt: build a 'User:/Assistant:' "
                                                      "transcript instead of the chat template.")
    banned_token_ids: list[int] = Field(default_factory=list, description="logits_processor: never generate these "
                                                                          "token ids (Transformers loader only).")


params = Params()


@hookimpl
def setup(app: Any, services: Any, params: Params) -> None:
    """Add a route to the API app: GET /example/status (behind the API key like every route)."""

    @app.get("/example/status")
    async def status() -> dict[str, Any]:
        info = services.manager.info()
        return {"extension": "example", "model": info.name if info else None, "params": params.model_dump()}


@hookimpl
def ui(services: Any, params: Params, components: dict[str, Any]) -> None:
    """An accordion in the web UI showing the params (Gradio is imported here only, never at import time)."""
    import gradio as gr

    with gr.Accordion("Example extension", open=False):
        gr.JSON(value=params.model_dump(), label="params")


@hookimpl
def state_modifier(state: dict[str, Any], params: Params) -> dict[str, Any]:
    if params.min_p is not None:
        state = {**state, "min_p": params.min_p}
    return state


@hookimpl
def chat_input_modifier(text: str, visible_text: str, state: dict[str, Any], params: Params) -> tuple[str, str]:
    return text + params.hidden_suffix, visible_text


@hookimpl
def input_modifier(text: str, state: dict[str, Any], params: Params) -> str:
    return params.input_prefix + text


@hookimpl
def history_modifier(history: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    if not params.keep_last_messages:
        return history
    system = [m for m in history[:1] if m.get("role") == "system"]
    rest = history[len(system):]
    return system + rest[-params.keep_last_messages:]


@hookimpl
def custom_generate_chat_prompt(messages: list[dict[str, Any]], state: dict[str, Any], params: Params) -> str | None:
    if not params.plain_transcript:
        return None  # let modules.chat build the prompt
    lines = [f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


@hookimpl
def output_modifier(text: str, state: dict[str, Any], params: Params) -> str:
    return text.upper() if params.uppercase_output else text


@hookimpl
def logits_processor(params: Params) -> list[Any]:
    if not params.banned_token_ids:
        return []
    return [BanTokens(params.banned_token_ids)]


class BanTokens:
    """A Transformers-style logits processor: (input_ids, scores) -> scores with some tokens impossible."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = list(token_ids)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[..., self.token_ids] = float("-inf")
        return scores
