"""The memory of kept Responses: bounded by bytes (oldest dropped first), per tenant."""

from __future__ import annotations

from cacheproxy.server.response_store import ResponseStore, output_as_message


def _body(text: str) -> dict:  # type: ignore[type-arg]
    return {"output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]}


def test_the_oldest_go_first_when_the_bytes_run_out_and_a_read_counts_as_use() -> None:
    msgs = [{"role": "user", "content": "x" * 100}]
    probe = ResponseStore(max_bytes=1 << 20)
    probe.put("p", "t", msgs, _body("y" * 100))
    entry = probe.used_bytes
    assert 200 < entry < 600  # the 200 characters, and a little for the containers
    store = ResponseStore(max_bytes=3 * entry + entry // 2)  # room for three
    for i in range(3):
        assert store.put(f"r{i}", "t", msgs, _body("y" * 100))
    assert store.get("r0", "t") is not None  # r0 is now the newest use
    store.put("r3", "t", msgs, _body("y" * 100))
    assert store.used_bytes <= store.max_bytes and len(store) == 3
    assert store.get("r1", "t") is None and store.get("r0", "t") is not None and store.get("r3", "t") is not None
    assert not store.put("huge", "t", [{"role": "user", "content": "z" * 2000}], _body(""))


def test_a_tenant_sees_and_deletes_only_its_own() -> None:
    store = ResponseStore(max_bytes=10_000)
    store.put("r", "alice", [], _body("hi"))
    assert store.get("r", "bob") is None and not store.delete("r", "bob")
    assert store.delete("r", "alice") and store.get("r", "alice") is None and store.used_bytes == 0


def test_output_items_become_the_assistant_message_the_template_renders() -> None:
    body = {"output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
    ]}  # fmt: skip
    assert output_as_message(body) == {
        "role": "assistant", "content": "Let me look.",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }  # fmt: skip
    assert output_as_message({"output": []}) == {"role": "assistant", "content": None}
