"""The OpenAI-compatible API (and Anthropic's Messages, text-generation-webui's internal routes, /predict).

Enabled with `--api` (or `--extensions openai`); served on `--api-port` (5000) at /v1, bound to 127.0.0.1 unless
`--listen`. See README.md beside this file.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from modules.extensions import hookimpl


class Params(BaseModel):
    """Settable in settings.yaml under `extensions: {openai: {...}}`."""

    embedding_model: str | None = Field(None, description="A sentence-transformers model folder for "
                                                          "/v1/embeddings; empty = all-MiniLM-L6-v2 (packaged).")
    embedding_device: str = Field("cpu", description="Device for the embedding model (cpu, cuda).")


params = Params()


@hookimpl
def setup(app: Any, services: Any, params: Params) -> None:
    from extensions.openai.server import install

    install(app, services, params)
