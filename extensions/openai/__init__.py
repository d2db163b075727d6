"""The OpenAI-compatible API (and Anthropic's Messages, text-generation-webui's internal routes, /predict).

Enabled with `--api` (or `--extensions openai`); served on `--api-port` (5000) at /v1, bound to 127.0.0.1 unless
`--listen`. See README.md beside this file.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from modules.extensions import hookimpl


#: `--api` (or `api: true` in settings.yaml) enables this extension.
ENABLE_FLAG = "api"


def _flag(name: str) -> dict[str, Any]:
    return {"flag": name}


class Params(BaseModel):
    """Settable in settings.yaml under `extensions: {openai: {...}}`; the fields with a flag are also command-line
    flags (`--api-port`) and top-level settings keys (`api_port: 5001`)."""

    port: int = Field(5000, ge=1, le=65535, description="API port.", json_schema_extra=_flag("api_port"))
    api_key: str | None = Field(None, description="Bearer key every API request must send.",
                                json_schema_extra=_flag("api_key"))
    admin_key: str | None = Field(None, description="Key for load/unload routes (default: --api-key).",
                                  json_schema_extra=_flag("admin_key"))
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (off if empty).",
                                    json_schema_extra=_flag("api_cors_origins"))
    jit: bool = Field(False, description="Load a model of models/ that a request names when it is not loaded (just "
                                         "in time), keeping the others up to --max-models.",
                      json_schema_extra=_flag("jit"))
    autoload: bool = Field(False, description="Old name of --jit, kept working: the same switch.",
                           json_schema_extra=_flag("api_autoload"))
    embedding_model: str | None = Field(None, description="A sentence-transformers model folder for "
                                                          "/v1/embeddings; empty = all-MiniLM-L6-v2 (packaged).")
    embedding_device: str = Field("cpu", description="Device for the embedding model (cpu, cuda).")
    max_body_mb: float = Field(16, gt=0, le=1024, description="Largest request body accepted, in MiB (larger: "
                                                             "413).")
    allow_template_str: bool = Field(False, description="Accept instruction_template_str: a Jinja chat template "
                                                        "sent by the client and rendered here (sandboxed, but a "
                                                        "template can still burn CPU and memory).")

    @property
    def loads_on_demand(self) -> bool:
        """Whether a request may load the model it names (--jit, or its old name --api-autoload)."""
        return self.jit or self.autoload


params = Params()


@hookimpl
def setup(app: Any, services: Any, params: Params) -> None:
    from extensions.openai.server import install

    install(app, services, params)


@hookimpl
def start(app: Any, services: Any, params: Params) -> Any:
    """Serve the app (with every extension's routes) on --api-port, on the UI's bind address."""
    import logging

    from extensions.openai.server import serve_app

    server = serve_app(app, services.settings.host, params.port)
    logging.getLogger(__name__).info("API on http://%s:%d/v1", services.settings.host, server.port)
    return server
