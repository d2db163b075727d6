"""Repeated wrong passwords on Gradio's sign-in route (POST /login) are slowed down.

Failures are counted per client address and per user name. After `free` failures in a row on either, sign-in is
refused for a while (429, with a message and Retry-After), and every further failure doubles the pause, up to
`max_s`. The right password is accepted as soon as the pause is over, and clears the user name's count; the
address's count is forgotten after `forget_s` without failures (so an account of one's own cannot be used to
reset it). It sits in front of Gradio's route as ASGI middleware because the `auth=` callable Gradio accepts sees
neither the client nor lets it answer anything but "Incorrect credentials".
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from modules.ui.access import App, Message, Receive, Scope, Send, read_body, replay_body

LOGIN_PATHS = ("/login", "/login/")  # gradio.routes: app.post("/login")


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Failure counts per key ("client", address) and ("user", name), at most `limit` keys (least recently
    failed forgotten first)."""

    def __init__(self, *, free: int = 5, base_s: float = 10.0, max_s: float = 900.0, forget_s: float = 3600.0,
                 limit: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.free, self.base_s, self.max_s, self.forget_s, self.limit = free, base_s, max_s, forget_s, limit
        self.clock = clock
        self._keys: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def wait_s(self, client: str, user: str) -> float:
        """Seconds until this client may try this user name again (0: now)."""
        now = self.clock()
        return max(0.0, *(self._current(key, now).locked_until - now for key in _keys(client, user)))

    def failed(self, client: str, user: str) -> None:
        now = self.clock()
        for key in _keys(client, user):
            entry = self._current(key, now)
            entry.count += 1
            entry.last = now
            if entry.count >= self.free:
                entry.locked_until = now + min(self.max_s, self.base_s * 2 ** (entry.count - self.free))
            self._keys[key] = entry
            self._keys.move_to_end(key)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def succeeded(self, user: str) -> None:
        self._keys.pop(("user", user), None)

    def _current(self, key: tuple[str, str], now: float) -> _Failures:
        entry = self._keys.get(key)
        if entry is None or (now - entry.last > self.forget_s and now >= entry.locked_until):
            return _Failures()
        return entry


def _keys(client: str, user: str) -> tuple[tuple[str, str], tuple[str, str]]:
    return ("client", client), ("user", user)


class LoginThrottleMiddleware:
    """ASGI middleware in front of Gradio's POST /login: refuses attempts during a pause, and counts Gradio's
    answers (200 signed in, 400 wrong credentials). Sign-ins are checked one at a time, so a burst of parallel
    guesses cannot all pass before the first failure is counted."""

    def __init__(self, app: App, throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle()
        self._one_at_a_time = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        body, _ = await read_body(receive)  # each reader below gets the body again, then the client's receive
        user = await _form_user(scope, body, receive)
        client = scope["client"][0] if scope.get("client") else "unknown"
        async with self._one_at_a_time:
            wait = self.throttle.wait_s(client, user)
            if wait > 0:
                seconds = math.ceil(wait)
                refusal = JSONResponse({"detail": f"Too many failed sign-ins from this address or for this user "
                                                  f"name: try again in {seconds} s."},
                                       status_code=429, headers={"Retry-After": str(seconds)})
                await refusal(scope, receive, send)
                return
            status: list[int] = []

            async def watch(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            await self.app(scope, replay_body(body, receive), watch)
            if status == [200]:
                self.throttle.succeeded(user)
            elif status == [400]:
                self.throttle.failed(client, user)


async def _form_user(scope: Scope, body: bytes, receive: Receive) -> str:
    """The user name of a sign-in form (url-encoded or multipart), stripped as Gradio strips it; "" if none."""
    try:
        form = await Request(scope, replay_body(body, receive)).form()
    except Exception:  # a malformed form: Gradio answers it (422), with no user name to count
        return ""
    value = form.get("username")
    return value.strip() if isinstance(value, str) else ""

