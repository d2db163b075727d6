"""Who may reach what in the web UI.

Gradio keeps each page's state under a "session hash" the browser makes up, and answers any signed-in request
that names it: another user who learns a page's hash could run events on that page's state (its chats) and read
its output stream. `SessionOwners` binds each session hash to the user who first used it and refuses it to anyone
else. `may_administer` says who may use the operator's controls (loading models, training, extensions, the settings
file) and `refuse_unless_admin` is the check every such handler makes. All plain ASGI / Python: nothing here imports
Gradio.
"""
from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import cookie_parser
from starlette.responses import JSONResponse

from modules.errors import AccessDenied
from modules.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where Gradio's routes that take a session hash live (gradio.route_utils.API_PREFIX).
API_PREFIX = "/gradio_api/"
#: Session hashes in a path: /heartbeat/{hash} and /stream/{hash}/{run}/{component}/... (not /stream/{event_id}).
_PATH_HASH = re.compile(r"/gradio_api/(?:heartbeat/([^/]+)/?$|stream/([^/]+)/[^/]+/[^/]+/)")
#: Bindings kept; the least recently used are forgotten first (a page idle through this many new pages).
SESSION_LIMIT = 20_000


def may_administer(settings: Settings, user: str | None) -> bool:
    """Whether a page may use the operator's controls: always without --multi-user; with it, only a user named by
    --admin-users, or every page with --admin-ui (a single-operator setup)."""
    if not settings.multi_user or settings.admin_ui:
        return True
    return user is not None and user in settings.admin_users


def refuse_unless_admin(settings: Settings, user: str | None, action: str) -> None:
    """Raise AccessDenied unless `user` (the request's signed-in user) may use the operator's controls. Every
    handler of such a control checks it itself: hiding the widget is not enough, since Gradio events can be called
    over its HTTP API without the page."""
    if not may_administer(settings, user):
        raise AccessDenied(f"{action} is for the operator: start the server with --admin-users NAME (signed-in "
                           f"users) or --admin-ui.")


def signed_in_user(scope: Scope) -> str | None:
    """The user Gradio signed in for this request: its login cookie looked up in the Gradio app's token table, as
    gradio.routes.App's get_current_user does. None without a valid cookie."""
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not tokens or cookie_id is None:
        return None
    cookies: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookies.update(cookie_parser(value.decode("latin-1")))
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


async def read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body, and a `receive` that hands it to the app again (then waits on the client)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, replay_body(body, receive)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then defers to the client's (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def session_hashes(scope: Scope, body: bytes) -> set[str]:
    """The session hashes a request to Gradio names: in its query, its path or its JSON body."""
    found: set[str] = set()
    query = scope.get("query_string", b"").decode("latin-1")
    found.update(value for key, value in parse_qsl(query) if key == "session_hash" and value)
    match = _PATH_HASH.search(scope.get("path", ""))
    if match:
        found.add(match.group(1) or match.group(2))
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("session_hash"), str) and data["session_hash"]:
            found.add(data["session_hash"])
    return found


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


class SessionOwners:
    """ASGI middleware for a Gradio app with a password: a request naming a session hash must come from a
    signed-in user (401 otherwise), and from the user who first used that hash (403 otherwise). Without auth on
    the Gradio app it lets everything through."""

    def __init__(self, app: App, limit: int = SESSION_LIMIT):
        self.app = app
        self.limit = limit
        self.owners: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or API_PREFIX not in scope.get("path", "")
                or getattr(scope.get("app"), "auth", None) is None):
            await self.app(scope, receive, send)
            return
        body = b""
        if scope.get("method") == "POST" and _is_json(scope):
            body, receive = await read_body(receive)
        hashes = session_hashes(scope, body)
        if hashes:
            user = signed_in_user(scope)
            if user is None:
                await JSONResponse({"detail": "Not signed in."}, status_code=401)(scope, receive, send)
                return
            if not self._claim(hashes, user):
                log.warning("refused %s %s: session of another user (requested by %r)", scope.get("method"),
                            scope.get("path"), user)
                await JSONResponse({"detail": "This page session belongs to another user."},
                                   status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _claim(self, hashes: set[str], user: str) -> bool:
        """Bind the unbound hashes to `user`; False if any is bound to someone else (then nothing is bound)."""
        if any(self.owners.get(h, user) != user for h in hashes):
            return False
        for h in hashes:
            self.owners[h] = user
            self.owners.move_to_end(h)
        while len(self.owners) > self.limit:
            self.owners.popitem(last=False)
        return True
