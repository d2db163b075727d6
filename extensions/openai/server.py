"""The API's app and server: routes, middleware (API key, admin key, body guard, CORS), error handlers, and uvicorn
in a background thread."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from extensions.openai.errors import install_error_handlers
from extensions.openai.middleware import AuthMiddleware, BodyGuard, InternalErrors
from extensions.openai.responses_store import ResponseStore

log = logging.getLogger(__name__)


@dataclass
class ApiState:
    """What the handlers need, kept on `app.state.api` (one per app, never a module global)."""

    services: Any
    params: Any
    embedder: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The Prometheus registry GET /metrics renders (extensions/openai/metrics.py).
    metrics: Any = None
    #: The responses POST /v1/responses keeps for previous_response_id, for this app's lifetime.
    responses: ResponseStore = field(default_factory=ResponseStore)


def install(app: FastAPI, services: Any, params: Any) -> None:
    """Add the API (routes, errors, security) to `app`."""
    from extensions.openai import anthropic, completions, internal, metrics, responses

    app.state.api = ApiState(services=services, params=params,
                             metrics=metrics.metrics_registry(services.manager))
    install_error_handlers(app)
    # add_middleware puts each one outside the ones before: the key check runs first, then the body guard
    app.add_middleware(InternalErrors)
    app.add_middleware(BodyGuard, limit=int(params.max_body_mb * 2**20))
    app.add_middleware(AuthMiddleware, api_key=params.api_key, admin_key=params.admin_key)
    if params.cors_origins:  # added last = outermost, so preflight requests never need a key
        app.add_middleware(CORSMiddleware, allow_origins=list(params.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    for module in (completions, anthropic, responses, internal, metrics):
        app.include_router(module.router)
    _openapi_without_422(app)


def create_app(services: Any, params: Any = None) -> FastAPI:
    """A FastAPI app with only the API on it (the start-up path builds the shared extensions app instead)."""
    from extensions.openai import Params

    app = FastAPI(title="LLM workbench API", version="1")
    install(app, services, params if params is not None else Params())
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """Our validation errors answer 400 (documented per route), so drop FastAPI's 422 from the schema."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- serving ------------------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn serving an app from a daemon thread; `port` is the bound one (pass 0 for a free port)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2, ws="none")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="api-server", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The API server could not start on {self.host}:{self.port} (is the port in use?)")
            time.sleep(0.02)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve_app(app: FastAPI, host: str, port: int) -> BackgroundServer:
    return BackgroundServer(app, host, port).start()
