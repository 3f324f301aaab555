"""Many clients at once, and clients that leave: the server stays correct and frees what they held."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from typing import Any

import aiohttp
from conftest import ALICE_KEY, MAX_MODEL_LEN, SERVED_MODEL, ServerProcess, async_client
from openai.types.chat import ChatCompletionChunk

from cacheproxy.cache.records import read_records

DISTINCT_PROMPTS = 16
CLIENTS = 64


def _messages(k: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You answer questions about numbers."},
            {"role": "user", "content": f"Question {k}: what comes after {k * 7}?"}]


async def test_64_concurrent_streaming_clients_get_the_same_answers_as_alone(server: ServerProcess) -> None:
    salt = uuid.uuid4().hex
    async with async_client(server) as client:
        alone = []
        for k in range(DISTINCT_PROMPTS):
            r = await client.chat.completions.create(model=SERVED_MODEL, messages=_messages(k), max_tokens=16,
                                                     temperature=0, extra_body={"cache_salt": salt})
            assert r.usage is not None
            alone.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))

        async def stream_one(k: int) -> tuple[str, str | None, int]:
            stream = await client.chat.completions.create(
                model=SERVED_MODEL, messages=_messages(k), max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"cache_salt": salt})
            text, finish, usage = "", None, None
            async for chunk in stream:
                ChatCompletionChunk.model_validate(chunk.to_dict())
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
                usage = chunk.usage or usage
            assert usage is not None
            return text, finish, usage.completion_tokens

        together = await asyncio.gather(*(stream_one(i % DISTINCT_PROMPTS) for i in range(CLIENTS)))
    for i, got in enumerate(together):
        assert got == alone[i % DISTINCT_PROMPTS], f"client {i}"
    assert server.wait_until_idle(timeout=5) < 5


async def _wait_until_idle(server: ServerProcess, timeout: float) -> float:
    return await asyncio.to_thread(server.wait_until_idle, timeout)


async def _wait_until_running(server: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(server.admin_stats))["engine"]["requests"]["running"] == 0:
        assert time.monotonic() < deadline, "the request never showed as running"
        await asyncio.sleep(0.01)


def _long_request(stream: bool) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Write at length."}],
            "max_tokens": MAX_MODEL_LEN - 32, "temperature": 0, "ignore_eos": True, "stream": stream,
            "cache_salt": uuid.uuid4().hex}


async def _record_of(server: ServerProcess, record_id: str) -> Any:
    path = server.data_dir / "records.jsonl"
    for _ in range(100):
        found = [r for r in read_records(path) if r.id == record_id]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no record {record_id}")


async def test_a_streaming_client_that_disconnects_frees_its_request(server: ServerProcess) -> None:
    await _wait_until_idle(server, 30)
    body = _long_request(stream=True)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(server.base_url + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {ALICE_KEY}"})
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
        tokens, first_at = 0, 0.0
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"role"' not in line:
                tokens += 1
                if tokens == 1:
                    first_at = time.monotonic()
                if tokens == 8:
                    break
        per_token = (time.monotonic() - first_at) / 7
        await _wait_until_running(server)
        resp.close()  # the client goes away mid-stream
    freed_after = await _wait_until_idle(server, 30)
    remaining = (body["max_tokens"] - tokens) * per_token
    # Generating the rest would take `remaining`; the abort frees the request long before that.
    assert freed_after < remaining / 2, (freed_after, remaining)
    record = await _record_of(server, f"chatcmpl-{request_id}")
    assert record.status == 499 and record.error == "client_disconnected"


def _seconds_per_token(server: ServerProcess) -> float:
    """The engine's own time per generated token on this machine, from the Server-Timing header."""
    reply = server.request("POST", "/v1/completions", {"model": SERVED_MODEL, "prompt": "calibrate",
                                                       "max_tokens": 32, "ignore_eos": True, "temperature": 0})
    assert reply.status == 200
    engine_ms = float(reply.headers["server-timing"].split("engine;dur=")[1].split(",")[0])
    return engine_ms / 1000 / 32


async def test_a_waiting_non_streaming_client_that_disconnects_frees_its_request(server: ServerProcess) -> None:
    await _wait_until_idle(server, 30)
    per_token = _seconds_per_token(server)
    body = {**_long_request(stream=False), "prompt_cache_key": uuid.uuid4().hex}
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {ALICE_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(head + payload)
        await _wait_until_running(server)
    finally:
        sock.close()  # gone before any answer
    freed_after = await _wait_until_idle(server, 30)
    assert freed_after < body["max_tokens"] * per_token / 2, (freed_after, body["max_tokens"] * per_token)
    records = [r for r in read_records(server.data_dir / "records.jsonl")
               if r.prompt_cache_key == body["prompt_cache_key"]]
    for _ in range(100):
        if records:
            break
        await asyncio.sleep(0.05)
        records = [r for r in read_records(server.data_dir / "records.jsonl")
                   if r.prompt_cache_key == body["prompt_cache_key"]]
    assert [(r.status, r.error) for r in records] == [(499, "client_disconnected")]
