"""OpenAI's error contract for every route: `{"error": {"message", "type", "param", "code"}}` with 400 for bad input,
401 for a missing or wrong key, 404 for an unknown model or route, 503 when no model is loaded; never a 500 and never
FastAPI's 422 `{"detail": ...}`. Routes under /v1/messages also carry Anthropic's `"type": "error"`."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from extensions.openai.streaming import ClientGone
from modules.errors import NoModelLoaded, WorkbenchError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answer a handler raises on purpose."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None, *,
               anthropic: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"message": message, "type": type, "param": param, "code": code}}
    if anthropic:
        body["type"] = "error"
    return body


def error_response(request: Request | None, status: int, message: str, type: str | None = None,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    anthropic = request is not None and request.url.path.startswith("/v1/messages")
    return JSONResponse(error_body(message, type or _TYPES.get(status, "server_error"), param, code,
                                   anthropic=anthropic), status_code=status, headers=headers)


def workbench_status(exc: WorkbenchError) -> int:
    """The API status for a core error: its own when it is part of the contract, else 400 or 503."""
    if isinstance(exc, NoModelLoaded):
        return 503
    status = getattr(exc, "status_code", 400)
    if status in (400, 404, 503):
        return status
    return 503 if status >= 409 else 400


def api_error_from(exc: WorkbenchError, param: str | None = None) -> ApiError:
    status = workbench_status(exc)
    code = "model_not_loaded" if isinstance(exc, NoModelLoaded) else None
    return ApiError(status, str(exc), param=param, code=code)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        key = ".".join(loc)
        param = param or key or None
        if error.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({error.get('msg')})")
        elif error.get("type") == "missing":
            problems.append(f"'{key}' is required")
        else:
            problems.append(f"bad value for '{key or 'body'}': {error.get('msg')}")
    unique = list(dict.fromkeys(problems))
    return "Invalid request: " + "; ".join(unique[:5]) + ("; ..." if len(unique) > 5 else ""), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(request, 400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code if exc.status_code < 500 else 503
        message = f"Unknown route {request.method} {request.url.path}." if status == 404 else str(exc.detail)
        return error_response(request, status, message, code="not_found" if status == 404 else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(WorkbenchError)
    async def _workbench(request: Request, exc: WorkbenchError) -> JSONResponse:
        error = api_error_from(exc)
        return error_response(request, error.status, error.message, error.type, code=error.code)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:  # nobody reads this answer
        return error_response(request, 400, "The client disconnected; its generation was cancelled.")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(request, 503, f"The server failed on this request: {type(exc).__name__}: {exc}",
                              "server_error")
