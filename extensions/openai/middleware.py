"""The API's pure ASGI middleware (streaming and disconnect detection pass through untouched), outermost first:
the key check, the body guard (size cap, strict JSON), and the last resort that turns an unexpected exception into
a 500 with an error id."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from extensions.openai.errors import ApiError, api_error_from, is_anthropic

#: Routes that change which model is loaded: they need the admin key (or the API key when none is set).
ADMIN_PATHS = frozenset({"/v1/internal/model/load", "/v1/internal/model/unload", "/v1/internal/lora/load"})

#: Deepest nesting of arrays and objects a JSON body may have (tool schemas included).
MAX_DEPTH = 100
#: Most digits of an integer in a JSON body (no field takes more than a 64-bit number).
MAX_DIGITS = 100
#: Bodies larger than this are checked in a worker thread, off the event loop.
_CHECK_INLINE_BYTES = 64 * 1024


async def send_error(scope: Scope, send: Send, error: ApiError, extra_headers: dict[str, str] | None = None) -> None:
    """Answer `error` directly (outside FastAPI), in the shape the route's clients expect."""
    data = json.dumps(error.body(anthropic=is_anthropic(scope.get("path", "")))).encode()
    headers = {"content-type": "application/json", "content-length": str(len(data)), **error.headers,
               **(extra_headers or {})}
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": data})


class AuthMiddleware:
    """Bearer-key check on every route. Anthropic clients send the key as `x-api-key`; both headers are read."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None):
        self.app = app
        self.api_key = api_key or None
        self.admin_key = admin_key or api_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        admin = scope.get("path", "") in ADMIN_PATHS
        required = self.admin_key if admin else self.api_key
        if required:
            needed = [required] if admin or not self.admin_key else [required, self.admin_key]
            given = _presented_key(scope)
            if given is None or not any(hmac.compare_digest(given.encode(), k.encode()) for k in needed):
                what = "the admin key" if admin else "the API key"
                message = (f"Missing API key: send {what} as 'Authorization: Bearer KEY'." if given is None
                           else f"Wrong key: this route needs {what}.")
                await send_error(scope, send, ApiError(401, message, code="invalid_api_key"),
                                 {"www-authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


def _presented_key(scope: Scope) -> str | None:
    headers = Headers(scope=scope)
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def client_key(scope: Scope) -> str:
    """Whose request this is, for fair turns on a model: the API key it presents (hashed, so the key itself is
    kept nowhere), else the address it comes from."""
    key = _presented_key(scope)
    if key:
        return "key:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    client = scope.get("client")
    return f"address:{client[0]}" if client else "address:unknown"


class BodyGuard:
    """Reads the request body before any route does: more than `limit` bytes (counted as they arrive, or declared
    by Content-Length) is a 413 naming the limit; a JSON body that JSON or Unicode does not allow is a 400 before
    anything parses it: NaN and Infinity, numbers too large for a float or with more than MAX_DIGITS digits,
    nesting deeper than MAX_DEPTH, text with lone surrogates (which cannot be encoded, so would fail later in
    tokenizers, file names and logs). The route then reads the same body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body is larger than this server's limit of {self.limit / 2**20:g} MiB "
                             "(the openai extension's max_body_mb).", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await send_error(scope, send, self._too_large(), {"connection": "close"})
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(scope, send, self._too_large(), {"connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and "json" in headers.get("content-type", "").lower():
            if len(body) > _CHECK_INLINE_BYTES:
                problem = await anyio.to_thread.run_sync(check_json_body, body)
            else:
                problem = check_json_body(body)
            if problem is not None:
                await send_error(scope, send, problem)
                return
        await self.app(scope, _replaying(body, receive), send)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the body already read, then passes on to the client (for disconnects)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"the number {text[:40]} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _Refused(f"an integer has {len(text)} digits (at most {MAX_DIGITS})")
    return int(text)


def check_json_body(body: bytes) -> ApiError | None:
    """A 400 for a body JSON does not allow, or None (also for a body that is not JSON at all: the route says
    where it breaks)."""
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite, parse_int=_bounded_int)
    except _Refused as exc:
        return ApiError(400, f"The body is not valid JSON: {exc}.")
    except RecursionError:
        return ApiError(400, f"The body is nested too deeply (at most {MAX_DEPTH} levels of arrays and objects).")
    except UnicodeDecodeError as exc:
        return ApiError(400, f"The body is not valid UTF-8 (byte {exc.start} cannot be decoded).")
    except ValueError:
        return None
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            return ApiError(400, f"The body is nested too deeply (at most {MAX_DEPTH} levels of arrays and "
                                 "objects).")
        if isinstance(value, str):
            if not _encodable(value):
                return _surrogate(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return _surrogate((*path, key))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(path: tuple[Any, ...]) -> ApiError:
    where = ".".join(str(part).encode("utf-8", "backslashreplace").decode("utf-8") for part in path) or None
    return ApiError(400, f"The body holds text that is not valid Unicode (a lone surrogate such as \\ud800)"
                         f"{f' in {where!r}' if where else ''}.", param=where)


class InternalErrors:
    """The last resort: an exception that no handler answered becomes a 500 whose body and log line carry the
    same error id (never a bare traceback, never a 503 that tells clients to retry a bug)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            error = api_error_from(exc, where=f"{scope.get('method')} {scope.get('path')}")
            if not started:
                await send_error(scope, send, error)
