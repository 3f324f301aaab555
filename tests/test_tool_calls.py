"""Tool calls written by a model come back as OpenAI `tool_calls`, streamed or not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cacheproxy.server.shapes import ChatShape, Choice
from cacheproxy.server.tool_calls import held_from, parse_tool_calls, tool_call_format

WEATHER = {"city": "Paris", "unit": "celsius"}


def test_the_format_comes_from_the_chat_template() -> None:
    assert tool_call_format("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert tool_call_format("[AVAILABLE_TOOLS] ... [TOOL_CALLS]") == "mistral"
    assert tool_call_format("{{ messages }}") == "json"
    assert tool_call_format(None) == "json"


@pytest.mark.parametrize(
    ("fmt", "text", "content", "names"),
    [
        ("hermes", f'<tool_call>\n{{"name": "weather", "arguments": {json.dumps(WEATHER)}}}\n</tool_call>', None,
         ["weather"]),
        ("hermes", 'Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                   '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>', "Let me check.", ["a", "b"]),
        ("mistral", '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None,
         ["weather"]),
        ("mistral", '[{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None, ["weather"]),
        ("json", '{"name": "weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None, ["weather"]),
        ("json", '<|python_tag|>{"name": "weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
         ["weather"]),
    ],
)
def test_calls_are_parsed_in_each_format(fmt: str, text: str, content: str | None, names: list[str]) -> None:
    got_content, calls = parse_tool_calls(text, fmt)
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        json.loads(c["function"]["arguments"])  # arguments are a JSON string, as OpenAI sends them
    if names == ["weather"]:
        assert json.loads(calls[0]["function"]["arguments"]) == WEATHER


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("hermes", "Plain answer, no call."),
        ("hermes", '<tool_call>{"name": "cut off", "argum'),  # max_tokens hit mid-call
        ("hermes", "<tool_call>not json</tool_call>"),
        ("json", '{"not": "a call"}'),
        ("json", "The JSON {\"name\": 1} is an example."),
        ("mistral", "[1, 2, 3]"),
    ],
)
def test_text_that_is_not_a_call_stays_text(fmt: str, text: str) -> None:
    assert parse_tool_calls(text, fmt) == (text, [])


def test_streaming_holds_back_only_what_may_be_a_call() -> None:
    assert held_from("Hello <tool", "hermes") == len("Hello ")
    assert held_from("Hello <tool_call>{", "hermes") == len("Hello ")
    assert held_from("Hello world", "hermes") == len("Hello world")
    assert held_from('  {"na', "json") == 0
    assert held_from("Sure, here", "json") == len("Sure, here")
    assert held_from("[TOOL", "mistral") == 0


def _replay(shape: ChatShape, deltas: list[str], finish: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Feeds text deltas as the server does; returns the stream's chunks and the full response."""
    streamed, whole = Choice(0, 0), Choice(0, 0)
    chunks = [shape.chunk([shape.start_choice(0)])]
    for d in deltas:
        for choice in (streamed, whole):
            choice.text_parts.append(d)
        entry = shape.delta_choice(streamed, d, None, 0)
        if entry is not None:
            chunks.append(shape.chunk([entry]))
    streamed.finish_reason = whole.finish_reason = finish
    chunks.append(shape.chunk([shape.finish_choice(streamed)]))
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    return chunks, shape.full([shape.full_choice(whole, False)], usage)


def _accumulate(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    content, calls, reason = "", [], None
    for raw in chunks:
        chunk = ChatCompletionChunk.model_validate(raw)  # the SDK's own type
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            calls.append({"name": tc.function.name, "arguments": json.loads(tc.function.arguments)})
        reason = chunk.choices[0].finish_reason or reason
    return content, calls, reason


def test_a_hermes_call_streams_as_tool_calls_and_the_full_answer_agrees() -> None:
    shape = ChatShape("chatcmpl-1", "m", 0, tool_format="hermes")
    text = 'Checking.<tool_call>{"name": "weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
    deltas = [text[i : i + 5] for i in range(0, len(text), 5)]
    chunks, full = _replay(shape, deltas, "stop")
    content, calls, reason = _accumulate(chunks)
    assert content == "Checking."
    assert calls == [{"name": "weather", "arguments": WEATHER}]
    assert reason == "tool_calls"
    message = ChatCompletion.model_validate(full).choices[0]
    assert message.finish_reason == "tool_calls"
    assert message.message.content == "Checking."
    assert message.message.tool_calls is not None
    assert json.loads(message.message.tool_calls[0].function.arguments) == WEATHER


def test_without_a_call_the_stream_is_plain_text_and_nothing_is_lost() -> None:
    shape = ChatShape("chatcmpl-2", "m", 0, tool_format="json")
    text = '{"this": "looks like json but is no call"} and then prose'
    chunks, full = _replay(shape, [text[i : i + 3] for i in range(0, len(text), 3)], "length")
    content, calls, reason = _accumulate(chunks)
    assert (content, calls, reason) == (text, [], "length")
    assert ChatCompletion.model_validate(full).choices[0].message.content == text


def test_without_tools_in_the_request_text_is_never_parsed() -> None:
    shape = ChatShape("chatcmpl-3", "m", 0, tool_format=None)
    text = '<tool_call>{"name": "weather", "arguments": {}}</tool_call>'
    chunks, full = _replay(shape, [text], "stop")
    assert _accumulate(chunks) == (text, [], "stop")
    assert ChatCompletion.model_validate(full).choices[0].message.tool_calls is None


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_keeps_the_first_call_only(parallel: bool) -> None:
    shape = ChatShape("chatcmpl-4", "m", 0, tool_format="hermes", parallel_tool_calls=parallel)
    text = ('<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
            '<tool_call>{"name": "time", "arguments": {"zone": "CET"}}</tool_call>')  # fmt: skip
    chunks, full = _replay(shape, [text[i : i + 7] for i in range(0, len(text), 7)], "stop")
    _, calls, reason = _accumulate(chunks)
    names = [c["name"] for c in calls]
    assert names == (["weather", "time"] if parallel else ["weather"]) and reason == "tool_calls"
    message = ChatCompletion.model_validate(full).choices[0].message
    assert [c.function.name for c in message.tool_calls or []] == names


@pytest.mark.parametrize(
    ("fmt", "continuation"),
    [("hermes", '{"city": "Paris", "unit": "celsius"}}\n</tool_call>'),
     ("mistral", '{"city": "Paris", "unit": "celsius"}}]'),
     ("json", '{"city": "Paris", "unit": "celsius"}}')],
)  # fmt: skip
def test_a_forced_call_prefix_and_the_model_continuation_parse_as_that_call(fmt: str, continuation: str) -> None:
    from cacheproxy.server.tool_calls import forced_call_prefix

    prefix = forced_call_prefix(fmt, "weather")
    assert '"name": "weather"' in prefix
    # what the server does: the choice's text starts with the prefix the prompt ended with
    shape = ChatShape("chatcmpl-5", "m", 0, tool_format=fmt)
    streamed, whole = Choice(0, 0, [prefix]), Choice(0, 0, [prefix])
    chunks = [shape.chunk([shape.start_choice(0)])]
    for i in range(0, len(continuation), 4):
        for choice in (streamed, whole):
            choice.text_parts.append(continuation[i : i + 4])
        entry = shape.delta_choice(streamed, continuation[i : i + 4], None, 0)
        if entry is not None:
            chunks.append(shape.chunk([entry]))
    streamed.finish_reason = whole.finish_reason = "stop"
    chunks.append(shape.chunk([shape.finish_choice(streamed)]))
    content, calls, reason = _accumulate(chunks)
    assert (content, calls, reason) == ("", [{"name": "weather", "arguments": WEATHER}], "tool_calls")
    full = shape.full([shape.full_choice(whole, False)], {"prompt_tokens": 1, "completion_tokens": 1,
                                                          "total_tokens": 2})  # fmt: skip
    message = ChatCompletion.model_validate(full).choices[0].message
    assert message.tool_calls is not None and message.tool_calls[0].function.name == "weather"
    # "required": the model writes the name too
    assert forced_call_prefix(fmt, None).endswith('{"name": "')
