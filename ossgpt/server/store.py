"""Stored responses of the Responses API, durable: `ossgpt serve --store PATH` (an SQLite file;
by default in the user's data folder). Each response is kept with the conversation up to and
including it (what `previous_response_id` continues) and the input items it was given (what
`GET /v1/responses/{id}/input_items` lists).

Why SQLite (the standard library's): a response is written in one transaction, so it is there
whole or not at all, also after `kill -9` or a power cut; several servers may share the file; no
service to run. ":memory:" keeps them for the process's life only (what `create_app` defaults to,
for tests and notebooks)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..errors import OssgptError
from .protocol import APIError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,         -- the response object as the API returned it
    conversation TEXT NOT NULL,     -- chat messages up to and including this response
    input_items TEXT NOT NULL       -- the request's input, as items with ids
)"""


def default_path() -> Path:
    import platformdirs
    return platformdirs.user_data_path("ossgpt") / "responses.sqlite"


def _not_found(response_id: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code=code)


def input_items(items: str | list[dict]) -> list[dict]:
    """A request's `input` as the API lists it back: items with ids, text as input_text parts."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in items:
        item = dict(item)
        if item.get("type", "message") == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{'msg' if item['type'] == 'message' else 'item'}_{uuid.uuid4().hex}")
        out.append(item)
    return out


class ResponseStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")   # readers never wait for a writer
            self._db.execute("PRAGMA synchronous=FULL")        # committed means on disk
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise OssgptError(f"{self.path}: cannot use it as a response store ({e})") from None
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict], items: list[dict]) -> None:
        row = (response["id"], response.get("created_at", int(time.time())), json.dumps(response),
               json.dumps(conversation), json.dumps(items))
        with self._lock, self._db:       # one transaction: committed whole or not at all
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)

    def _column(self, response_id: str, column: str) -> str | None:
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM responses WHERE id = ?", (response_id,)).fetchone()
        return row[0] if row else None

    def conversation(self, response_id: str) -> list[dict]:
        """What `previous_response_id` continues; a 404 naming that parameter if unknown."""
        text = self._column(response_id, "conversation")
        if text is None:
            raise _not_found(response_id, "previous_response_id", "previous_response_not_found")
        return json.loads(text)

    def get(self, response_id: str) -> dict:
        text = self._column(response_id, "response")
        if text is None:
            raise _not_found(response_id)
        return json.loads(text)

    def input_items(self, response_id: str, limit: int = 20, order: str = "desc",
                    after: str | None = None) -> dict:
        """A page of the response's input items, as `GET .../input_items` returns them."""
        text = self._column(response_id, "input_items")
        if text is None:
            raise _not_found(response_id)
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be between 1 and 100, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        items = json.loads(text)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise APIError(400, f"after: no input item {after!r} in response {response_id!r}", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def delete(self, response_id: str) -> dict:
        with self._lock, self._db:
            gone = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
        if not gone:
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def close(self) -> None:
        with self._lock:
            self._db.close()
