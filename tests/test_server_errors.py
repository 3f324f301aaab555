"""Every error the server answers, checked for its status and for OpenAI's body shape
`{"error": {"message", "type", "param", "code"}}` — never a stack trace."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import structlog
from aiohttp import web
from conftest import ADMIN_KEY, MAX_BODY_BYTES, MAX_MODEL_LEN, SERVED_MODEL, HttpReply, ServerProcess

from cacheproxy.cache.records import read_records
from cacheproxy.config import Settings
from cacheproxy.engine.async_engine import AsyncEngine
from cacheproxy.server.app import create_app, launch_engine, make_runner, request_id_middleware
from cacheproxy.server.errors import error_middleware
from cacheproxy.server.state import STATE

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


def assert_error(status: int, body: Any, expected_status: int, code: str | None, param: str | None = None
                 ) -> dict[str, Any]:
    assert status == expected_status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def assert_reply_error(reply: HttpReply, status: int, code: str | None, param: str | None = None
                       ) -> dict[str, Any]:
    assert reply.headers["content-type"].startswith("application/json")
    return assert_error(reply.status, reply.json(), status, code, param)


def test_invalid_json_is_400(server: ServerProcess) -> None:
    assert_reply_error(server.request("POST", CHAT, b'{"model": "x", "messages": ['), 400, "invalid_json")
    assert_reply_error(server.request("POST", CHAT, b"\xff\xfe"), 400, "invalid_json")
    assert_reply_error(server.request("POST", CHAT, [1, 2]), 400, "invalid_request_body")
    deep = b'[' * 20_000 + b']' * 20_000  # deeper than Python's parser recurses
    assert_reply_error(server.request("POST", CHAT, deep), 400, "invalid_json")


def test_an_unpaired_surrogate_is_400_and_a_paired_one_is_text(server: ServerProcess) -> None:
    head = b'{"model": "%s", "max_tokens": 2, ' % SERVED_MODEL.encode()
    for where in (b'"messages": [{"role": "user", "content": "a\\ud800b"}]',
                  b'"messages": [{"role": "user", "content": "hi"}], "stop": ["\\uDC00"]',
                  b'"messages": [{"role": "user", "content": "hi"}], "cache_salt": "\\udbff"'):
        err = assert_reply_error(server.request("POST", CHAT, head + where + b"}"), 400, "invalid_json")
        assert "surrogate" in err["message"]
    paired = head + b'"messages": [{"role": "user", "content": "\\ud83d\\ude00 and \\\\ud800"}]}'
    reply = server.request("POST", CHAT, paired)  # an emoji, and the text "\ud800" (its backslash escaped)
    assert reply.status == 200, reply.json()
    completion = server.request("POST", "/v1/completions", {"model": SERVED_MODEL, "prompt": "x\ud800", "max_tokens": 1})
    assert_reply_error(completion, 400, "invalid_json")


def test_a_seed_outside_int64_is_400_and_any_int64_seed_works(server: ServerProcess) -> None:
    body = {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 2, "temperature": 1.0}
    assert_reply_error(server.request("POST", CHAT, {**body, "seed": 2**80}), 400, "invalid_value", "seed")
    for seed in (2**63 - 1, -(2**63), -1):
        reply = server.request("POST", CHAT, {**body, "seed": seed, "n": 2})
        assert reply.status == 200, reply.json()
    assert server.request("GET", "/health").status == 200


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": "many"}, "max_completion_tokens"),
        ({"stream": "yes please"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"model": None}, "model"),
        ({"chat_template_kwargs": {"messages": 5}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"self": 1, "enable_thinking": False}}, "chat_template_kwargs"),
    ],
)
def test_fields_of_wrong_type_or_range_are_400_naming_the_field(
    server: ServerProcess, change: dict[str, Any], param: str
) -> None:
    body = {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 2, **change}
    assert_reply_error(server.request("POST", CHAT, body), 400, "invalid_value", param)


def test_completions_refuse_token_ids_outside_the_vocabulary(server: ServerProcess) -> None:
    reply = server.request("POST", "/v1/completions", {"model": SERVED_MODEL, "prompt": [1, 2, 10**7]})
    assert_reply_error(reply, 400, "invalid_value", "prompt")


def test_prompt_plus_max_tokens_over_the_context_is_context_length_exceeded(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SERVED_MODEL, messages=HELLO, max_tokens=MAX_MODEL_LEN)
    assert caught.value.status_code == 400
    # The SDK keeps the inner error object as `body`.
    assert_error(400, {"error": caught.value.body}, 400, "context_length_exceeded", "messages")
    # A prompt alone longer than the context, with no max_tokens: refused the same way.
    reply = server.request("POST", "/v1/completions",
                           {"model": SERVED_MODEL, "prompt": [5] * (MAX_MODEL_LEN + 1)})
    assert_reply_error(reply, 400, "context_length_exceeded", "prompt")


def test_a_wrong_or_missing_api_key_is_401(server: ServerProcess) -> None:
    body = {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 2}
    assert_reply_error(server.request("POST", CHAT, body, key="sk-wrong"), 401, "invalid_api_key")
    assert_reply_error(server.request("POST", CHAT, body, key=None), 401, "invalid_api_key")
    assert_reply_error(server.request("GET", "/v1/models", key="sk-wrong"), 401, "invalid_api_key")
    with (openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-wrong", max_retries=0) as bad,
          pytest.raises(openai.AuthenticationError) as caught):
        bad.chat.completions.create(model=SERVED_MODEL, messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 401


def test_admin_routes_need_the_admin_key(server: ServerProcess) -> None:
    assert_reply_error(server.request("GET", "/admin/stats"), 401, "invalid_api_key")  # alice's key
    assert_reply_error(server.request("GET", "/admin/stats", key=None), 401, "invalid_api_key")
    assert server.request("GET", "/admin/stats", key=ADMIN_KEY).status == 200


def test_an_unknown_model_or_route_is_404(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert_reply_error(server.request("POST", "/v1/completions", {"model": "gpt-17", "prompt": "x"}),
                       404, "model_not_found", "model")
    assert_reply_error(server.request("GET", "/v1/nothing-here"), 404, "not_found")


def test_a_wrong_method_is_405_with_allow(server: ServerProcess) -> None:
    reply = server.request("GET", CHAT)
    assert_reply_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "POST"
    assert_reply_error(server.request("DELETE", "/v1/models"), 405, "method_not_allowed")


def test_a_body_over_max_body_bytes_is_413(server: ServerProcess) -> None:
    big = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    assert_reply_error(server.request("POST", CHAT, big), 413, "request_too_large")


async def test_a_chunked_body_over_max_body_bytes_is_413(server: ServerProcess) -> None:
    async def body() -> Any:
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b" " * 4096

    async with aiohttp.ClientSession() as session, session.post(
        server.base_url + CHAT, data=body(), headers={"Authorization": "Bearer sk-test-alice"}
    ) as resp:
        assert_error(resp.status, await resp.json(), 413, "request_too_large")
        request_id = resp.headers["X-Request-Id"]
    # Recorded as what it was, not as a server error.
    for _ in range(100):
        found = [r for r in read_records(server.data_dir / "records.jsonl") if r.id == f"chatcmpl-{request_id}"]
        if found:
            break
        await asyncio.sleep(0.02)
    assert [(r.status, r.error) for r in found] == [(413, "request_too_large")]


def test_failed_requests_leave_the_server_serving(server: ServerProcess, client: openai.OpenAI) -> None:
    for raw in (b"{", b"[]", b'{"model": 1}', b"\x00" * 100):
        assert server.request("POST", CHAT, raw).status == 400
    r = client.chat.completions.create(model=SERVED_MODEL, messages=HELLO, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# --- servers of their own, in this process ---------------------------------------------------------

async def _serve_in_process(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _settings(tiny_model_dir: Path, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(model=str(tiny_model_dir), served_model_name=SERVED_MODEL, data_dir=data_dir, device="cpu",
                    max_model_len=MAX_MODEL_LEN, kv_cache_bytes=8 << 20, cpu_cache_bytes=8 << 20, **overrides)


async def test_routes_answer_503_while_the_model_loads_then_200(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_model_dir, tmp_path)
    app = create_app(settings, AsyncEngine(settings), start_engine=False)
    runner, url = await _serve_in_process(app)
    try:
        async with aiohttp.ClientSession() as http:
            for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                                       ("POST", CHAT, {"model": SERVED_MODEL, "messages": HELLO}),
                                       ("POST", "/v1/completions", {"model": SERVED_MODEL, "prompt": "x"}),
                                       ("GET", "/admin/stats", None)]:
                async with http.request(method, url + path, json=body) as resp:
                    assert_error(resp.status, await resp.json(), 503, "model_loading")
                    assert resp.headers["Retry-After"]
            await launch_engine(app)
            async with http.get(url + "/health") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
            async with http.post(url + CHAT, json={"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 2}) as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


async def test_start_up_objects_leave_the_collector_while_the_server_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_model_dir, tmp_path)
    app = create_app(settings, AsyncEngine(settings))
    runner, _ = await _serve_in_process(app)
    try:
        await app[STATE].engine_start_task
        assert gc.get_freeze_count() > 10_000  # torch, the model, the tokenizer...
    finally:
        await runner.cleanup()
    assert gc.get_freeze_count() == 0  # handed back: nothing of this server outlives it frozen


async def test_a_full_queue_is_429_with_retry_after(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_model_dir, tmp_path, max_num_seqs=1, max_waiting_requests=1)
    app = create_app(settings, AsyncEngine(settings))
    runner, url = await _serve_in_process(app)
    try:
        await app[STATE].engine_start_task
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="any", max_retries=0) as client:
            async def ask() -> Any:
                return await client.chat.completions.create(
                    model=SERVED_MODEL, messages=HELLO, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})

            results = await asyncio.gather(*(ask() for _ in range(6)), return_exceptions=True)
            refused = [r for r in results if isinstance(r, openai.RateLimitError)]
            served = [r for r in results if not isinstance(r, BaseException)]
            assert refused and served, results
            assert len(refused) + len(served) == 6
            for r in refused:
                assert r.status_code == 429
                assert int(r.response.headers["retry-after"]) >= 1
                assert_error(429, {"error": r.body}, 429, "rate_limit_exceeded")
            for r in served:
                assert r.usage.completion_tokens == 48
            # Once the queue drains, the server takes requests again.
            again = await ask()
            assert again.usage.completion_tokens == 48
    finally:
        await runner.cleanup()


async def test_an_unexpected_exception_is_a_500_error_object_and_a_log_line() -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    app = web.Application(middlewares=[request_id_middleware, error_middleware])
    app.router.add_get("/broken", broken)
    runner, url = await _serve_in_process(app)
    try:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            async with aiohttp.ClientSession() as http, http.get(url + "/broken") as resp:
                body = await resp.json()
                request_id = resp.headers["X-Request-Id"]
        err = assert_error(resp.status, body, 500, "internal_error")
        assert "secret" not in err["message"]
        lines = [e for e in logs if e["event"] == "unhandled_error"]
        assert len(lines) == 1 and lines[0]["request_id"] == request_id
        assert lines[0]["log_level"] == "error"
    finally:
        await runner.cleanup()
