"""Structured outputs through the official openai client against a real server on 127.0.0.1 (the tiny
model, random weights): response_format (json_schema, json_object), the SDK's `parse` with a pydantic
model, vLLM's guided_* fields on both endpoints, forced tool calls whose arguments match the tool's
schema, and a 400 naming the field for every constraint that cannot be honoured."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from conftest import SERVED_MODEL, ServerProcess, async_client, start_server, stop_server
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, Field

MESSAGES = [{"role": "user", "content": "Describe the new user as JSON."}]

# Bounded (string lengths, ranges, item counts), so random weights finish the text well within max_tokens.
USER_SCHEMA = {
    "type": "object",
    "properties": {
        "login": {"type": "string", "maxLength": 6},
        "uid": {"type": "integer", "minimum": 1000, "maximum": 9999},
        "shell": {"enum": ["bash", "zsh", "fish"]},
        "groups": {"type": "array", "items": {"enum": ["dev", "ops", "qa"]}, "maxItems": 3},
    },
    "required": ["login", "uid", "shell", "groups"],
    "additionalProperties": False,
}
CREATE_USER = {"type": "function", "function": {
    "name": "create_user", "description": "Create a user account.", "parameters": USER_SCHEMA}}  # fmt: skip
SET_QUOTA = {"type": "function", "function": {"name": "set_quota", "parameters": {
    "type": "object", "properties": {"gb": {"type": "integer", "minimum": 1, "maximum": 64}},
    "required": ["gb"], "additionalProperties": False}}}  # fmt: skip


def salt() -> dict[str, Any]:
    return {"cache_salt": uuid.uuid4().hex}


class NewUser(BaseModel):
    login: str = Field(max_length=6)
    uid: int = Field(ge=1000, le=9999)
    shell: Literal["bash", "zsh", "fish"]
    admin: bool


def test_json_schema_response_format_gives_content_that_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": USER_SCHEMA, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, response_format=fmt,  # type: ignore[arg-type]
                                           max_tokens=200, temperature=1.0, seed=seed, extra_body=salt())  # fmt: skip
        ChatCompletion.model_validate(r.to_dict())
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), USER_SCHEMA)


def test_the_sdk_parse_helper_gets_its_pydantic_model_back(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(model=SERVED_MODEL, messages=MESSAGES, response_format=NewUser,  # type: ignore[arg-type]
                                      max_tokens=200, temperature=0.7, seed=1, extra_body=salt())  # fmt: skip
    user = r.choices[0].message.parsed
    assert isinstance(user, NewUser) and 1000 <= user.uid <= 9999


def test_json_object_ends_when_the_object_closes(client: openai.OpenAI, tokenizer: Any) -> None:
    # the bias makes "}" the model's first choice wherever the constraint allows it
    close = tokenizer.token_to_id("}")
    r = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                       max_tokens=50, temperature=0, logit_bias={str(close): 100},
                                       extra_body={**salt(), "ignore_eos": True})  # fmt: skip
    content = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop" and json.loads(content) == {} and content.startswith("{")


async def test_a_streamed_structured_answer_is_the_same_as_the_whole_one(server: ServerProcess) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": USER_SCHEMA}}
    kw: dict[str, Any] = dict(model=SERVED_MODEL, messages=MESSAGES, response_format=fmt, max_tokens=200,
                              temperature=0, extra_body=salt())  # fmt: skip
    async with async_client(server) as c:
        whole = await c.chat.completions.create(**kw)
        stream = await c.chat.completions.create(**kw, stream=True)
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    assert text == whole.choices[0].message.content and finish == "stop"
    jsonschema.validate(json.loads(text), USER_SCHEMA)


def test_guided_fields_of_vllm_work_on_chat_and_completions(client: openai.OpenAI) -> None:
    choices = ["approve", "reject", "escalate to a human"]
    r = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=30, temperature=1.0,
                                       seed=4, extra_body={**salt(), "guided_choice": choices})  # fmt: skip
    assert r.choices[0].message.content in choices
    c = client.completions.create(model=SERVED_MODEL, prompt="Ticket id:", max_tokens=30, temperature=1.0, n=3, seed=2,
                                  extra_body={**salt(), "guided_regex": r"[A-Z]{3}-[0-9]{4}"})  # fmt: skip
    assert all(re.fullmatch(r"[A-Z]{3}-[0-9]{4}", ch.text) for ch in c.choices) and len(c.choices) == 3
    c = client.completions.create(model=SERVED_MODEL, prompt="{", max_tokens=200, temperature=0,
                                  extra_body={**salt(), "structured_outputs": {"json": USER_SCHEMA}})  # fmt: skip
    jsonschema.validate(json.loads(c.choices[0].text), USER_SCHEMA)


def test_a_forced_call_has_arguments_that_match_the_tool_schema(client: openai.OpenAI) -> None:
    named = client.chat.completions.create(
        model=SERVED_MODEL, messages=MESSAGES, tools=[CREATE_USER, SET_QUOTA],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "create_user"}}, max_tokens=200, temperature=1.0,
        seed=5, extra_body=salt(),
    )  # fmt: skip
    ChatCompletion.model_validate(named.to_dict())
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "create_user"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), USER_SCHEMA)  # type: ignore[union-attr]
    for seed in range(3):
        anyone = client.chat.completions.create(
            model=SERVED_MODEL, messages=MESSAGES, tools=[CREATE_USER, SET_QUOTA], tool_choice="required",  # type: ignore[list-item]
            max_tokens=200, temperature=1.0, seed=seed, extra_body=salt(),
        )  # fmt: skip
        calls = anyone.choices[0].message.tool_calls or []
        assert len(calls) == 1 and anyone.choices[0].finish_reason == "tool_calls"
        tool = {"create_user": CREATE_USER, "set_quota": SET_QUOTA}[calls[0].function.name]  # type: ignore[union-attr]
        jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])  # type: ignore[union-attr,index]


def _strict(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {**tool["function"], "strict": True}}


def test_a_call_the_model_opens_by_itself_follows_the_tool_schema(client: openai.OpenAI, tokenizer: Any) -> None:
    # tool_choice "auto": the bias makes the model open a call at once; from its <tool_call> on, the call
    # is held to an offered tool and its schema (random weights write no valid call unguided)
    opener = tokenizer.token_to_id("<tool_call>")
    tools = {"create_user": _strict(CREATE_USER), "set_quota": SET_QUOTA}
    names = set()
    for seed in range(4):
        r = client.chat.completions.create(
            model=SERVED_MODEL, messages=MESSAGES, tools=list(tools.values()), parallel_tool_calls=False,  # type: ignore[arg-type]
            max_tokens=200, temperature=1.0, seed=seed, logit_bias={str(opener): 100}, extra_body=salt(),
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        [call] = choice.message.tool_calls or []
        name = call.function.name  # type: ignore[union-attr]
        names.add(name)
        jsonschema.validate(json.loads(call.function.arguments), tools[name]["function"]["parameters"])  # type: ignore[union-attr]
    assert names <= set(tools)


def test_text_before_any_call_is_not_constrained(client: openai.OpenAI, tokenizer: Any) -> None:
    # no call opened (the bias forbids it): the text is what the same request gives with calls switched
    # off, token for token, so the guidance of calls costs free text nothing
    never = {str(tokenizer.token_to_id("<tool_call>")): -100}
    texts = {}
    for choice in ("auto", "none"):
        r = client.chat.completions.create(
            model=SERVED_MODEL, messages=MESSAGES, tools=[_strict(CREATE_USER)], tool_choice=choice,  # type: ignore[list-item,arg-type]
            max_tokens=40, temperature=1.0, seed=3, logit_bias=never, extra_body=salt(),
        )  # fmt: skip
        assert r.choices[0].finish_reason in ("stop", "length")
        texts[choice] = r.choices[0].message.content
    assert texts["auto"] and texts["auto"] == texts["none"]


@pytest.fixture(scope="module")
def bare_json_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model with its chat template's call markers taken out: calls are a bare JSON object, as
    Llama 3 writes them."""
    folder = tmp_path_factory.mktemp("bare-json") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = config["chat_template"].replace("</tool_call>", "").replace("<tool_call>", "")
    config_path.write_text(json.dumps(config))
    srv = start_server(["--model", str(folder), "--served-model-name", "bare"], tmp_path_factory.mktemp("bare-data"))
    yield srv
    stop_server(srv)


def test_a_bare_json_call_the_model_begins_follows_the_tool_schema(bare_json_server: ServerProcess,
                                                                   tokenizer: Any) -> None:
    brace = tokenizer.token_to_id("{")
    tools = {"create_user": _strict(CREATE_USER), "set_quota": SET_QUOTA}
    with openai.OpenAI(base_url=bare_json_server.base_url + "/v1", api_key="x", max_retries=0) as bare:
        for seed in range(3):
            r = bare.chat.completions.create(
                model="bare", messages=MESSAGES, tools=list(tools.values()), max_tokens=200,  # type: ignore[arg-type]
                temperature=1.0, seed=seed, logit_bias={str(brace): 100}, extra_body=salt(),
            )  # fmt: skip
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            [call] = choice.message.tool_calls or []
            jsonschema.validate(json.loads(call.function.arguments),  # type: ignore[union-attr]
                                tools[call.function.name]["function"]["parameters"])  # type: ignore[union-attr]
        text = bare.chat.completions.create(model="bare", messages=MESSAGES, tools=list(tools.values()),  # type: ignore[arg-type]
                                            max_tokens=20, temperature=1.0, seed=1,
                                            logit_bias={str(brace): -100}, extra_body=salt())  # fmt: skip
        assert text.choices[0].finish_reason in ("stop", "length") and text.choices[0].message.content


def test_a_strict_tool_whose_schema_cannot_be_enforced_is_a_400_a_plain_one_is_served(client: openai.OpenAI) -> None:
    odd = {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, tools=[_strict(odd)], max_tokens=5)  # type: ignore[list-item]
    body: Any = err.value.body
    assert body["param"] == "tools" and '["not"]' in body["message"], body
    r = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, tools=[odd], max_tokens=5)  # type: ignore[list-item]
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_json_format_next_to_callable_tools_allows_content_or_a_call(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": USER_SCHEMA}}
    kinds = set()
    for seed in range(8):
        r = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, tools=[SET_QUOTA],  # type: ignore[list-item]
                                           response_format=fmt, max_tokens=300, temperature=1.0, seed=seed,  # type: ignore[arg-type]
                                           extra_body=salt())  # fmt: skip
        choice = r.choices[0]
        if choice.finish_reason == "tool_calls":
            kinds.add("call")
            for call in choice.message.tool_calls or []:
                assert call.function.name == "set_quota"  # type: ignore[union-attr]
                jsonschema.validate(json.loads(call.function.arguments), SET_QUOTA["function"]["parameters"])  # type: ignore[union-attr,index]
        else:
            kinds.add("content")
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), USER_SCHEMA)
    assert kinds  # which one random weights pick is theirs to say; each is well formed


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such"}}}},
      "response_format", "invalid json_schema"),
     ({"response_format": {"type": "xml"}}, "response_format.type", "Input should be"),
     ({"response_format": {"type": "json_schema"}}, "response_format", "needs \"json_schema\""),
     ({"guided_regex": "(unclosed"}, "response_format", "invalid regex"),
     ({"guided_choice": []}, "guided_choice", "at least 1"),
     ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
     ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "cannot be used together")],
)  # fmt: skip
def test_a_constraint_that_cannot_be_honoured_is_a_400_naming_it(
    client: openai.OpenAI, extra: dict[str, Any], param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=5, extra_body=extra)
    body: Any = err.value.body
    assert needle in body["message"] and body["param"] == param, body
    ok = client.chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].message.content is not None

