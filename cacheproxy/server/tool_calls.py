"""Tool calls in a model's text, turned into OpenAI `tool_calls`.

Models write calls in the form their chat template taught them; the template itself tells which:
- "hermes" (Qwen2.5, Qwen3, Hermes and our tiny model): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  any number of them, after optional text;
- "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (the marker is a special token, so
  the decoded text may start at the list);
- "json" (Llama 3.x and templates with no marker): the whole message is one JSON object
  `{"name": ..., "parameters" | "arguments": {...}}`, possibly after `<|python_tag|>`.
Text that does not parse as calls stays text: a model that merely talks about JSON is not cut short.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from cacheproxy.engine.grammar import JSON_LAYOUT
from cacheproxy.engine.request import StructuredOutput

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


def tool_call_format(chat_template: str | None) -> str:
    template = chat_template or ""
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_MARK in template:
        return "mistral"
    return "json"


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        arguments = args
    else:
        arguments = json.dumps(args, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": arguments},
    }


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, one after another with only whitespace between; else None."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls). Without calls, content is `text` unchanged."""
    if fmt == "hermes":
        start = text.find(HERMES_OPEN)
        if start < 0:
            return text, []
        calls = []
        rest = text[start:]
        while rest.startswith(HERMES_OPEN):
            end = rest.find(HERMES_CLOSE)
            body = rest[len(HERMES_OPEN) : end if end >= 0 else len(rest)]
            values = _json_values(body)
            call = _call(values[0]) if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
            rest = rest[end + len(HERMES_CLOSE) :].lstrip() if end >= 0 else ""
        if rest:
            return text, []
        content = text[:start].strip()
        return content or None, calls
    body = text.strip()
    if fmt == "mistral":
        body = body.removeprefix(MISTRAL_MARK).strip()
        values = _json_values(body) if body.startswith("[") else None
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
    else:
        body = body.removeprefix(PYTHON_TAG).strip()
        values = _json_values(body) if body.startswith("{") else None
        items = values
    if not items:
        return text, []
    calls = [_call(item) for item in items]
    if any(c is None for c in calls):
        return text, []
    return None, calls  # type: ignore[return-value]


def held_from(text: str, fmt: str) -> int:
    """How much of `text` may be streamed as content now: the rest may turn out to be a call."""
    if fmt == "hermes":
        i = text.find(HERMES_OPEN)
        if i >= 0:
            return i
        for k in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(HERMES_OPEN[:k]):
                return len(text) - k
        return len(text)
    head = text.lstrip()
    if not head:
        return 0  # nothing but whitespace yet: the call may still come
    markers = ("[", MISTRAL_MARK) if fmt == "mistral" else ("{", PYTHON_TAG)
    if any(head.startswith(m) or m.startswith(head) for m in markers):
        return 0  # the whole message may be a call: hold it to the end
    return len(text)


def forced_call_prefix(fmt: str, name: str | None) -> str:
    """The start of a call in `fmt`, written after the generation prompt when the request's tool_choice
    requires a call: the model continues it (with `name` given, from the arguments on)."""
    head = '{"name": "'
    if name is not None:  # Llama 3's calls name their arguments "parameters"
        head += f'{_in_json(name)}", "{"parameters" if fmt == "json" else "arguments"}": '
    if fmt == "hermes":
        return HERMES_OPEN + "\n" + head
    if fmt == "mistral":
        return MISTRAL_MARK + "[" + head
    return head


def _in_json(name: str) -> str:
    """`name` as it reads inside a JSON string (a function name is any string to us)."""
    return json.dumps(name, ensure_ascii=False)[1:-1]


def _arguments_schema(parameters: dict[str, Any] | None, lenient: bool = False) -> str:
    schema = dict(parameters) if parameters else {"type": "object"}
    # %json{...} takes its layout from the schema itself; lenient: keywords the grammar engine does not
    # implement are ignored rather than refused
    schema.setdefault("x-guidance", {**JSON_LAYOUT, "lenient": True} if lenient else JSON_LAYOUT)
    return json.dumps(schema, ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _call_rules(fmt: str, tools: dict[str, dict[str, Any] | None], head: str,
                lenient: frozenset[str] = frozenset()) -> list[str]:
    """Lark rules `call0`, `call1`, ...: one call object per tool, from after `head` (the part of
    `{"name": "` already written) to its closing brace; arguments match the tool's schema (leniently
    for the tools named in `lenient`)."""
    key = "parameters" if fmt == "json" else "arguments"
    rules = []
    for i, (tool, params) in enumerate(tools.items()):
        start = f'{{"name": "{_in_json(tool)}", "{key}": '
        assert start.startswith(head)
        lead = _lark_string(start[len(head) :]) + " " if len(start) > len(head) else ""
        rules.append(f'call{i}: {lead}%json{_arguments_schema(params, tool in lenient)} "}}"')
    return rules


def forced_call_grammar(fmt: str, tools: dict[str, dict[str, Any] | None], name: str | None) -> StructuredOutput:
    """What the model may write after `forced_call_prefix(fmt, name)`: the rest of one call whose
    arguments match the function's parameters schema. `tools`: name -> parameters schema (None: any
    object). With no name, the call may be to any of them."""
    key = "parameters" if fmt == "json" else "arguments"
    chosen = tools if name is None else {name: tools[name]}
    head = '{"name": "' + ("" if name is None else f'{_in_json(name)}", "{key}": ')
    rules = _call_rules(fmt, chosen, head)
    alternatives = " | ".join(f"call{i}" for i in range(len(rules)))
    start = f'start: ({alternatives}) "]"' if fmt == "mistral" else f"start: {alternatives}"
    return StructuredOutput("lark", "\n".join([start, *rules]) + "\n")


def auto_call_grammar(
    fmt: str,
    tools: dict[str, dict[str, Any] | None],
    strict: frozenset[str],
    marker_ids: dict[str, int],
    parallel: bool = True,
) -> StructuredOutput | None:
    """tool_choice "auto": the model writes text or calls as it likes, and from the calls' opening marker
    on (when it is one token of the vocabulary) the rest of its answer is calls in the template's format,
    to offered functions, with arguments matching their schemas: exactly for `strict` functions (as
    OpenAI guarantees), leniently for the others. Text before the marker is not constrained at all, so
    it costs nothing. Llama 3's calls have no marker: a call is the whole answer, so the constraint is
    tentative there, taken up when the model's first written token begins a call. None where a marker
    is not one token."""
    rules = _call_rules(fmt, tools, "", frozenset(tools) - strict)
    any_call = "call: " + " | ".join(f"call{i}" for i in range(len(rules)))
    if fmt == "json":
        tag = marker_ids.get(PYTHON_TAG)
        lead = f"(<[{tag}]> | {_lark_string(PYTHON_TAG)})? " if tag is not None else ""
        lines = [f"start: BLANK? {lead}call", r"BLANK: /[ \t\n]+/", any_call, *rules]
        return StructuredOutput("lark", "\n".join(lines) + "\n", tentative=True)
    opener = {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARK}.get(fmt)
    trigger = marker_ids.get(opener) if opener is not None else None
    if trigger is None:
        return None
    if fmt == "hermes":
        close = marker_ids.get(HERMES_CLOSE)
        end = _lark_string(HERMES_CLOSE) if close is None else f"(<[{close}]> | {_lark_string(HERMES_CLOSE)})"
        first = f'"\\n" call "\\n" {end}'
        start = f'start: {first} ("\\n" <[{trigger}]> {first})*' if parallel else f"start: {first}"
    else:
        start = 'start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"'
    return StructuredOutput("lark", "\n".join([start, any_call, *rules]) + "\n", after_token=trigger)


def content_or_call_grammar(
    fmt: str,
    content: StructuredOutput,
    tools: dict[str, dict[str, Any] | None],
    marker_ids: dict[str, int],
    parallel: bool = True,
) -> StructuredOutput:
    """A JSON response format when the model may also call tools (tool_choice "auto"): the answer is
    either content matching the schema or calls in the template's format with arguments matching their
    tools, as with OpenAI, where response_format shapes the content and never stops a call.
    `marker_ids`: the calls' markers (`<tool_call>`, `</tool_call>`, `[TOOL_CALLS]`) that are tokens of
    the vocabulary, by text; the grammar engine matches added tokens only by id. Other kinds of
    constraint are returned unchanged."""
    if content.kind != "json_schema":
        return content
    schema = json.loads(content.spec)
    if fmt == "json":
        return _content_or_call_schema(schema, tools)
    if isinstance(schema, dict):
        schema.setdefault("x-guidance", JSON_LAYOUT)
    rules = _call_rules(fmt, tools, "")
    any_call = "call: " + " | ".join(f"call{i}" for i in range(len(rules)))

    def marker(text: str) -> str:
        token = marker_ids.get(text)
        return _lark_string(text) if token is None else f"(<[{token}]> | {_lark_string(text)})"

    if fmt == "hermes":
        one = f'{marker(HERMES_OPEN)} "\\n" call "\\n" {marker(HERMES_CLOSE)}'
        calls = f'calls: {one} ("\\n" {one})*' if parallel else f"calls: {one}"
    elif fmt == "mistral":
        calls = f'calls: {marker(MISTRAL_MARK)} "[" call (", " call)* "]"' if parallel else \
            f'calls: {marker(MISTRAL_MARK)} "[" call "]"'
    else:  # unreachable: json is one schema
        raise ValueError(fmt)
    lines = ["start: answer | calls", "answer: %json" + json.dumps(schema, ensure_ascii=False), calls, any_call, *rules]
    return StructuredOutput("lark", "\n".join(lines) + "\n")


def _content_or_call_schema(schema: Any, tools: dict[str, dict[str, Any] | None]) -> StructuredOutput:
    """The "json" format's calls are JSON objects themselves, so content and calls are one schema (two
    JSON grammars side by side would both claim the opening brace). The content schema's definitions
    move to the root, where its `#/$defs/...` references look for them."""
    content = dict(schema) if isinstance(schema, dict) else {}
    root: dict[str, Any] = {"x-guidance": content.pop("x-guidance", JSON_LAYOUT)}
    for key in ("$defs", "definitions"):
        if key in content:
            root[key] = content.pop(key)
    calls = [
        {"type": "object", "properties": {"name": {"const": name}, "parameters": params or {"type": "object"}},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, params in tools.items()
    ]  # fmt: skip
    root["anyOf"] = [content if isinstance(schema, dict) else schema, *calls]
    return StructuredOutput("json_schema", json.dumps(root, ensure_ascii=False))
