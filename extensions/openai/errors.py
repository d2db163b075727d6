"""The one place where an error becomes the API's answer.

Every error has a kind, known by its type: bad input is a 400, a missing key 401, something that does not exist 404,
a body over the limit 413; a bug (any exception nobody expected) is a 500 whose body and log line carry the same
error id; 503 only means "try again later" (a model loading, no model yet, the server busy, a model's queue full)
and always comes with Retry-After. Bodies are OpenAI's `{"error": {"message", "type", "param", "code"}}`, and
Anthropic's `{"type": "error", "error": {"type", "message"}}` under /v1/messages, where the type is Anthropic's own
(invalid_request_error, authentication_error, not_found_error, request_too_large, api_error, overloaded_error, ...).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from extensions.openai.streaming import ClientGone
from modules.errors import (BusyError, ContextLengthExceeded, ImagesUnsupported, ModelLoading, NoModelLoaded, NotFound,
                            Overloaded, WorkbenchError, validation_problems)

log = logging.getLogger(__name__)

#: Seconds a client is told to wait (Retry-After) before asking again, by error code. A full queue frees a place
#: as soon as any request ends, so "overloaded" asks again soon.
RETRY_AFTER_S = {"model_loading": 5, "model_not_loaded": 10, "busy": 5, "overloaded": 1}

_OPENAI_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error", 529: "overloaded_error"}


#: The error answers every route documents in /openapi.json.
DOCUMENTED_STATUSES = (400, 401, 404, 413, 500, 503)


def documented_errors(*, anthropic: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router or route: the error statuses with their body's schema."""
    from extensions.openai.protocol import ErrorResponse
    from extensions.openai.protocol_anthropic import AnthropicErrorResponse

    model = AnthropicErrorResponse if anthropic else ErrorResponse
    return {status: {"model": model} for status in DOCUMENTED_STATUSES}


class ApiError(Exception):
    """An error answer: raised by handlers on purpose, or made from any exception by `api_error_from`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, error_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.error_id = error_id

    @property
    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.error_id is not None:
            headers["x-error-id"] = self.error_id
        return headers

    def body(self, *, anthropic: bool = False) -> dict[str, Any]:
        """The JSON body: OpenAI's shape, or Anthropic's for routes under /v1/messages."""
        if anthropic:
            error: dict[str, Any] = {"type": anthropic_type(self.status), "message": self.message}
        else:
            error = {"message": self.message, "type": openai_type(self.status), "param": self.param,
                     "code": self.code}
        if self.error_id is not None:
            error["error_id"] = self.error_id
        return {"type": "error", "error": error} if anthropic else {"error": error}


def openai_type(status: int) -> str:
    return "server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error")


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


@dataclass(frozen=True)
class _Kind:
    status: int
    code: str | None = None


def _kind_of(exc: WorkbenchError) -> _Kind:
    """Status and code of a core error, by its type."""
    if isinstance(exc, ModelLoading):
        return _Kind(503, "model_loading")
    if isinstance(exc, NoModelLoaded):
        return _Kind(503, "model_not_loaded")
    if isinstance(exc, BusyError):
        return _Kind(503, "busy")
    if isinstance(exc, Overloaded):
        return _Kind(503, "overloaded")
    if isinstance(exc, ContextLengthExceeded):
        return _Kind(400, "context_length_exceeded")
    if isinstance(exc, ImagesUnsupported):
        return _Kind(400, "images_unsupported")
    if isinstance(exc, NotFound):
        return _Kind(404, "not_found")
    status = getattr(exc, "status_code", 400)
    return _Kind(status if 400 <= status < 500 else 500)


def api_error_from(exc: BaseException, param: str | None = None, *, where: str = "") -> ApiError:
    """The answer for any exception: its kind's status and code for a core error, a 500 with a fresh error id
    (logged, with the traceback, under the same id) for anything else. `param` names the request field the error
    is about; `where` says what was being done, for the log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, WorkbenchError):
        param = getattr(exc, "field", None) or param
        kind = _kind_of(exc)
        if kind.status < 500:
            return ApiError(kind.status, str(exc), param=param, code=kind.code,
                            retry_after=RETRY_AFTER_S.get(kind.code or ""))
        if kind.status == 503:
            return ApiError(503, str(exc), code=kind.code, retry_after=RETRY_AFTER_S.get(kind.code or "", 5))
    error_id = f"err_{uuid.uuid4().hex[:16]}"
    log.error("internal error %s%s: %s: %s", error_id, f" in {where}" if where else "", type(exc).__name__, exc,
              exc_info=exc)
    said = f"{exc} " if isinstance(exc, WorkbenchError) else ""  # a core error's message is meant for people
    return ApiError(500, f"{said}The server failed on this request (error id {error_id}; the server's log holds "
                         f"the details under it).", code="internal_error", error_id=error_id)


def validation_error(exc: ValidationError | RequestValidationError, *, prefix: str = "") -> ApiError:
    """A 400 for a pydantic validation error, worded by modules.errors.validation_problems; `param` is the first
    bad field. Locations drop FastAPI's leading "body"."""
    errors = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        errors.append({**error, "loc": loc[1:] if loc[:1] == ("body",) else loc})
    problems = validation_problems(SimpleNamespace(errors=lambda: errors))
    first = next((e for e in errors if e["loc"]), None)
    param = ".".join(str(part) for part in first["loc"]) if first else None
    return ApiError(400, prefix + "; ".join(problems), param=param)


def error_response(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(anthropic=is_anthropic(request.url.path)), status_code=error.status,
                        headers=error.headers)


def _body_problem(request: Request, exc: RequestValidationError) -> ApiError | None:
    """The request body as a whole is wrong (not JSON, not an object, missing): say so in plain words."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error") or error.get("msg")
            return ApiError(400, f"The body is not valid JSON: {detail}.")
        if tuple(error.get("loc", ())) == ("body",):
            content_type = request.headers.get("content-type", "")
            if error.get("type") == "missing":
                return ApiError(400, "The request needs a JSON body.")
            if "json" not in content_type:
                return ApiError(400, "The body must be a JSON object sent with 'Content-Type: application/json' "
                                     f"(got {content_type or 'no content type'!r}).")
            return ApiError(400, "The body must be a JSON object.")
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, _body_problem(request, exc) or validation_error(exc, prefix="Invalid request: "))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            error = ApiError(404, f"Unknown route {request.method} {request.url.path}.", code="not_found")
        elif status == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = ApiError(405, f"{request.method} is not allowed on {request.url.path}"
                                  + (f"; use {allowed}." if allowed else "."), code="method_not_allowed")
        elif status >= 500:
            error = api_error_from(exc, where=f"{request.method} {request.url.path}")
        else:
            error = ApiError(status, str(exc.detail))
        response = error_response(request, error)
        for name, value in (exc.headers or {}).items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(WorkbenchError)
    async def _workbench(request: Request, exc: WorkbenchError) -> JSONResponse:
        return error_response(request, api_error_from(exc, where=f"{request.method} {request.url.path}"))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:  # nobody reads this answer
        return error_response(request, ApiError(400, "The client disconnected; its generation was cancelled."))
