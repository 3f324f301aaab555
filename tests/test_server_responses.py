"""OpenAI's Responses API (`POST /v1/responses`) through the official openai client against a real server
on 127.0.0.1 (the tiny model): the same prompt, cache and tokens as the chat route for the same
conversation, function calls and their outputs as input items, structured text formats, the typed and
numbered stream events, and a 400 naming the field for what it cannot do."""

from __future__ import annotations

import json
import uuid
from typing import Any

import jsonschema
import openai
import pytest
from conftest import BOB_KEY, SERVED_MODEL, ServerProcess
from openai.types.responses import Response

GET_WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}  # fmt: skip
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in GET_WEATHER.items() if k != "type"}}


def salt() -> dict[str, Any]:
    return {"cache_salt": uuid.uuid4().hex}


def test_a_response_has_the_chat_routes_prompt_tokens_and_answer(client: openai.OpenAI) -> None:
    s = salt()
    r = client.responses.create(model=SERVED_MODEL, instructions="You answer briefly.", input="What is a KV cache?",
                                max_output_tokens=12, temperature=0, extra_body=s)  # fmt: skip
    Response.model_validate(r.to_dict())
    chat = client.chat.completions.create(
        model=SERVED_MODEL, max_tokens=12, temperature=0, extra_body=s,
        messages=[{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a KV cache?"}],
    )  # fmt: skip
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content
    assert chat.usage.prompt_tokens_details is not None and chat.usage.prompt_tokens_details.cached_tokens > 0
    assert r.usage.output_tokens == chat.usage.completion_tokens
    if r.status == "incomplete":
        assert r.usage.output_tokens == 12 and r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and chat.choices[0].finish_reason == "stop"
    assert r.instructions == "You answer briefly." and r.max_output_tokens == 12


def test_a_function_call_and_its_output_go_back_as_input_items(client: openai.OpenAI) -> None:
    s = salt()
    first = client.responses.create(model=SERVED_MODEL, input="Weather in Oslo?", tools=[GET_WEATHER],  # type: ignore[list-item]
                                    tool_choice="required", max_output_tokens=80, temperature=1.0, extra_body={**s, "seed": 3})  # fmt: skip
    Response.model_validate(first.to_dict())
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), GET_WEATHER["parameters"])
    call = calls[0]
    second = client.responses.create(
        model=SERVED_MODEL, tools=[GET_WEATHER], max_output_tokens=6, temperature=0, extra_body=s,  # type: ignore[list-item]
        input=[{"role": "user", "content": "Weather in Oslo?"}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "4 degrees, rain"}],
    )  # fmt: skip
    chat = client.chat.completions.create(
        model=SERVED_MODEL, tools=[CHAT_TOOL], max_tokens=6, temperature=0, extra_body=s,  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                   "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": "4 degrees, rain"}],
    )  # fmt: skip
    assert second.usage is not None and chat.usage is not None
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == (chat.choices[0].message.content or "")
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's prompt blocks


def test_a_json_schema_text_format_shapes_the_output(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "rain": {"type": "boolean"}},
              "required": ["city", "rain"], "additionalProperties": False}  # fmt: skip
    r = client.responses.create(model=SERVED_MODEL, input="JSON please", max_output_tokens=100, extra_body=salt(),
                                text={"format": {"type": "json_schema", "name": "w", "schema": schema, "strict": True}})  # fmt: skip
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


def test_a_streamed_response_is_numbered_typed_events_that_add_up_to_the_whole(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    s = salt()
    kw: dict[str, Any] = dict(model=SERVED_MODEL, input="Tell me about caches.", max_output_tokens=10, temperature=0,
                              extra_body=s)  # fmt: skip
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    last = events[-1]
    assert last.type == ("response.completed" if whole.status == "completed" else "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text == whole.output_text == last.response.output_text  # type: ignore[union-attr]
    Response.model_validate(last.response.to_dict())  # type: ignore[union-attr]
    # the wire: an `event:` line names each data line's type, and no [DONE] ends a Responses stream
    raw = server.request("POST", "/v1/responses", {**kw.pop("extra_body"), **kw, "stream": True}).body.decode()
    frames = [f for f in raw.split("\n\n") if f.strip()]
    assert all(f.startswith("event: ") for f in frames) and "[DONE]" not in raw
    for f in frames:
        name, data = f.split("\n", 1)
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


def test_a_streamed_function_call_comes_as_its_item_and_argument_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=SERVED_MODEL, input="Weather?", tools=[GET_WEATHER], stream=True,  # type: ignore[list-item]
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=80, extra_body=salt()))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]  # fmt: skip
    done = events[-2].item  # type: ignore[union-attr]
    assert done.type == "function_call" and done.name == "get_weather"
    jsonschema.validate(json.loads(done.arguments), GET_WEATHER["parameters"])


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [({"conversation": "conv_1"}, "conversation", "not supported"),
     ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
     ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input[0]",
      "only text parts"),
     ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0]", "needs its text"),
     ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "not supported"),
     ({"text": {"format": {"type": "yaml"}}}, "text.format", "text.format.type"),
     ({"background": True}, "background", "background"),
     ({"input": []}, "input", "non-empty list"),
     ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0]", "role is"),
     ({"input": [{"type": "function_call", "name": "f", "arguments": {"a": 1}}]}, "input[0]", "string name, call_id"),
     ({"tools": [{"type": "function", "name": "f", "parameters": "nope"}]}, "tools[0].parameters", "JSON schema"),
     ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "no-such"}}}}, "text.format",
      "invalid json_schema"),
     ({"max_output_tokens": 10**9}, "input", "maximum context length")],
)  # fmt: skip
def test_what_the_responses_route_cannot_do_is_a_400_naming_it(
    server: ServerProcess, body: dict[str, Any], param: str, needle: str
) -> None:
    reply = server.request("POST", "/v1/responses", {"model": SERVED_MODEL, "input": "hi", **body})
    assert reply.status == 400, reply.body
    err = reply.json()["error"]
    assert needle in err["message"] and err["param"] == param


def _chat_tokens(client: openai.OpenAI, messages: list[dict[str, Any]], s: dict[str, Any], **kw: Any) -> int:
    chat = client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=1, extra_body=s, **kw)  # type: ignore[arg-type]
    assert chat.usage is not None
    return chat.usage.prompt_tokens


def test_previous_response_id_continues_the_kept_conversation(client: openai.OpenAI, server: ServerProcess) -> None:
    s = salt()
    first = client.responses.create(model=SERVED_MODEL, instructions="Be brief.", input="Name a cache policy.",
                                    max_output_tokens=8, temperature=0, extra_body=s)  # fmt: skip
    assert first.store is True
    second = client.responses.create(model=SERVED_MODEL, previous_response_id=first.id, instructions="Be brief.",
                                     input="Another one?", max_output_tokens=8, temperature=0, extra_body=s)  # fmt: skip
    Response.model_validate(second.to_dict())
    assert second.previous_response_id == first.id and second.usage is not None
    # the kept turn, then the new input, under this request's instructions
    history = [{"role": "user", "content": "Name a cache policy."},
               {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Another one?"}]  # fmt: skip
    system = [{"role": "system", "content": "Be brief."}]
    assert second.usage.input_tokens == _chat_tokens(client, system + history, s)
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's blocks
    assert client.responses.retrieve(first.id).output_text == first.output_text
    # a third turn chains on the second; instructions do not carry over from earlier turns (as with OpenAI)
    third = client.responses.create(model=SERVED_MODEL, previous_response_id=second.id, input="Thanks.",
                                    max_output_tokens=4, extra_body=s)  # fmt: skip
    assert third.usage is not None
    assert third.usage.input_tokens == _chat_tokens(client, [*history, {"role": "assistant", "content": second.output_text},
                                                             {"role": "user", "content": "Thanks."}], s)  # fmt: skip
    # another tenant neither reads nor continues it
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=BOB_KEY, max_retries=0) as bob:
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError) as err:
            bob.responses.create(model=SERVED_MODEL, previous_response_id=first.id, input="x", max_output_tokens=2)
        assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert server.request("DELETE", f"/v1/responses/{first.id}", key=BOB_KEY).status == 404
    deleted = server.request("DELETE", f"/v1/responses/{first.id}")
    assert deleted.status == 200 and deleted.json() == {"id": first.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    client.responses.delete(second.id)  # the SDK's own call
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_a_call_and_its_output_continue_by_previous_response_id(client: openai.OpenAI) -> None:
    s = salt()
    first = client.responses.create(model=SERVED_MODEL, input="Weather in Oslo?", tools=[GET_WEATHER],  # type: ignore[list-item]
                                    tool_choice="required", max_output_tokens=80, extra_body={**s, "seed": 1})  # fmt: skip
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(model=SERVED_MODEL, previous_response_id=first.id, tools=[GET_WEATHER],  # type: ignore[list-item]
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}],
                                     max_output_tokens=4, extra_body=s)  # fmt: skip
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "rain"}]  # fmt: skip
    assert second.usage is not None
    assert second.usage.input_tokens == _chat_tokens(client, messages, s, tools=[CHAT_TOOL])


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    r = client.responses.create(model=SERVED_MODEL, input="hi", store=False, max_output_tokens=2, extra_body=salt())
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=SERVED_MODEL, previous_response_id=r.id, input="x", max_output_tokens=2)


def test_an_answer_sent_back_as_items_renders_as_the_kept_one(client: openai.OpenAI) -> None:
    """A turn's text and calls, sent back as a message item then function_call items, are one assistant
    message, as previous_response_id renders the kept turn: the same prompt either way."""
    s = salt()
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    items = [{"role": "user", "content": "Weather?"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
             call, {"type": "function_call_output", "call_id": "call_1", "output": "rain"}]  # fmt: skip
    r = client.responses.create(model=SERVED_MODEL, input=items, tools=[GET_WEATHER], max_output_tokens=1,  # type: ignore[arg-type,list-item]
                                extra_body=s)  # fmt: skip
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]  # fmt: skip
    assert r.usage is not None and r.usage.input_tokens == _chat_tokens(client, messages, s, tools=[CHAT_TOOL])
