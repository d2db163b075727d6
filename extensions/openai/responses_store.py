"""The responses POST /v1/responses keeps (unless a request says `store: false`), so that a later request can
continue one by `previous_response_id`: in memory for the server's lifetime, bounded by count and by size, the
oldest given up first. One store per app (ApiState.responses), never a module global."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    """A finished response: its body as GET /v1/responses/{id} answers it, and the conversation it ends
    (OpenAI-style chat messages, the request's instructions left out, its reply last), which a request naming it
    as `previous_response_id` continues."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]

    @property
    def size(self) -> int:
        """Characters of its JSON, what the store counts against its size limit."""
        return len(json.dumps(self.response, ensure_ascii=False)) + len(json.dumps(self.messages, ensure_ascii=False))


class ResponseStore:
    """Responses by id, at most `max_items` of them and `max_chars` characters of JSON in all; a response that
    would not fit alone is not kept. Safe to use from several threads."""

    def __init__(self, max_items: int = 512, max_chars: int = 64 * 2**20):
        self.max_items = max_items
        self.max_chars = max_chars
        self._items: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def put(self, ident: str, stored: StoredResponse) -> bool:
        """Keep `stored` under `ident`, giving up the oldest responses to make room; False when it alone is
        larger than the store."""
        size = stored.size
        if size > self.max_chars or self.max_items < 1:
            return False
        with self._lock:
            self._drop(ident)
            while self._items and (len(self._items) >= self.max_items or self._chars + size > self.max_chars):
                self._drop(next(iter(self._items)))
            self._items[ident] = (stored, size)
            self._chars += size
        return True

    def get(self, ident: str) -> StoredResponse | None:
        with self._lock:
            entry = self._items.get(ident)
            return entry[0] if entry is not None else None

    def delete(self, ident: str) -> bool:
        with self._lock:
            return self._drop(ident)

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, ident: str) -> bool:
        entry = self._items.pop(ident, None)
        if entry is None:
            return False
        self._chars -= entry[1]
        return True
