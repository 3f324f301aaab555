"""Responses kept in memory, so that a Responses request may continue one by `previous_response_id` and
`GET`/`DELETE /v1/responses/{id}` find it.

Each entry holds the conversation up to and including that response as chat messages (what the next
turn's prompt starts with, so its prefix is cached in the engine) and the Response object as it was
returned. Entries belong to the tenant that made them: another tenant's id is "not found". The store
is bounded by bytes (oldest dropped first) and does not outlive the process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class StoredResponse:
    tenant: str
    messages: list[dict[str, Any]]  # without instructions: a later turn brings its own
    body: dict[str, Any]
    nbytes: int


class ResponseStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, tenant: str, messages: list[dict[str, Any]], body: dict[str, Any]) -> bool:
        """Keeps a response; False when it alone is larger than the whole store."""
        nbytes = _size(messages) + _size(body)
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(response_id, None)
            if old is not None:
                self.used_bytes -= old.nbytes
            self._entries[response_id] = StoredResponse(tenant, messages, body, nbytes)
            self.used_bytes += nbytes
            while self.used_bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.used_bytes -= dropped.nbytes
        return True

    def get(self, response_id: str, tenant: str) -> StoredResponse | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.tenant != tenant:
                return None
            self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str, tenant: str) -> bool:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.tenant != tenant:
                return False
            del self._entries[response_id]
            self.used_bytes -= entry.nbytes
            return True

    def __len__(self) -> int:
        return len(self._entries)


def _size(value: Any) -> int:
    """About the bytes `value` holds (its strings, 16 a container entry), without serializing it:
    a long conversation is measured again at each turn, on the event loop."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(16 + len(k) + _size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(16 + _size(v) for v in value)
    return 16


def output_as_message(body: dict[str, Any]) -> dict[str, Any]:
    """A Response's output items as the assistant message the chat template renders."""
    text = "".join(
        part.get("text", "")
        for item in body.get("output", []) if item.get("type") == "message"
        for part in item.get("content", [])
    )  # fmt: skip
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in body.get("output", []) if item.get("type") == "function_call"
    ]  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message
