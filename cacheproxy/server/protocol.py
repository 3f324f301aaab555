"""The OpenAI request bodies the server accepts, as pydantic models.

Fields that agent frameworks send are declared (so a wrong type is a 400) even where the server only
accepts and ignores them (metadata, store, ...); any other unknown field is dropped silently, as
`extra="ignore"` says. Responses are built as plain dicts in openai_routes.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cacheproxy.engine.request import StructuredOutput
from cacheproxy.server.errors import ApiError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted; usage comes once, at the end


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class JsonSchemaFormat(_Lenient):
    name: str | None = None
    description: str | None = None
    # "schema" is a BaseModel attribute, hence the alias; no schema: any JSON object
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('a response_format of type "json_schema" needs "json_schema"')
        return self


class StructuredOutputs(_Lenient):
    """vLLM's `structured_outputs` (one of its fields)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _json_schema(schema: dict[str, Any] | str, param: str) -> StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ApiError(400, f"{param} is not valid JSON", code="invalid_value", param=param) from None
    if not isinstance(schema, dict):
        raise ApiError(400, f"{param} must be a JSON object", code="invalid_value", param=param)
    return StructuredOutput("json_schema", json.dumps(schema))


_ANY_OBJECT = StructuredOutput("json_schema", '{"type": "object"}')


class ContentPart(_Lenient):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        # The engine reads text; an image or audio part cannot be honoured, so it is refused, not dropped.
        if self.type not in ("text", "input_text") or self.text is None:
            raise ValueError(f"content part of type {self.type!r} is not supported; only text parts are")
        return self


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it (the tokenizer flattens text parts and parses
        tool-call arguments); absent fields stay absent, content stays present."""
        msg = self.model_dump(exclude_none=True)
        msg.setdefault("content", None)
        return msg


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Field(ge=1)]


class _SamplingFields(_Lenient):
    """What chat and completions share: the model, sampling, streaming and cache fields."""

    model: str
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM's and our convention)
    min_tokens: Annotated[int, Field(ge=0)] = 0
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # int64, as OpenAI documents
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = None  # transformers' and vLLM's; (0, 10]
    logit_bias: dict[str, float] | None = None  # token id (a string, as OpenAI sends it) -> [-100, 100]
    prompt_cache_key: str | None = None
    cache_salt: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # What the text must match: OpenAI's response_format, or vLLM's guided_* / structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        if isinstance(v, list) and any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None or self.stop == "":
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint the request names (None for plain text); two at once are a 400."""
        found: list[tuple[str, StructuredOutput]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", _ANY_OBJECT))
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_
            found.append(("response_format", _ANY_OBJECT if schema is None
                          else _json_schema(schema, "response_format.json_schema.schema")))  # fmt: skip
        so = self.structured_outputs or StructuredOutputs()
        for name, value in (("guided_json", self.guided_json), ("structured_outputs.json", so.json_)):
            if value is not None:
                found.append((name, _json_schema(value, name)))
        if so.json_object:
            found.append(("structured_outputs.json_object", _ANY_OBJECT))
        for name, kind, text in (
            ("guided_regex", "regex", self.guided_regex), ("structured_outputs.regex", "regex", so.regex),
            ("guided_grammar", "grammar", self.guided_grammar), ("structured_outputs.grammar", "grammar", so.grammar),
        ):  # fmt: skip
            if text is not None:
                found.append((name, StructuredOutput(kind, text)))  # type: ignore[arg-type]
        for name, options in (("guided_choice", self.guided_choice), ("structured_outputs.choice", so.choice)):
            if options is not None:
                if not options:
                    raise ApiError(400, f"{name} must not be empty", code="invalid_value", param=name)
                found.append((name, StructuredOutput("choice", json.dumps(options))))
        if len(found) > 1:
            raise ApiError(400, f"{found[0][0]} and {found[1][0]} cannot be used together", code="invalid_value",
                           param=found[1][0])  # fmt: skip
        return found[0][1] if found else None


# What the route passes the chat template itself (and the name of the method's own first argument).
_TEMPLATE_ARGUMENTS = frozenset({"messages", "tools", "add_generation_prompt", "self"})


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ToolDefinition] | None = None
    # "auto", "none", "required" or {"type": "function", "function": {"name": ...}}: the last two start the
    # answer with a call in the template's format (`forced_tool`)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", code="invalid_value",
                           param="top_logprobs")
        taken = sorted(set(self.chat_template_kwargs or {}) & _TEMPLATE_ARGUMENTS)
        if taken:
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(taken)}: the request itself gives "
                                "the template its messages, tools and generation prompt",
                           code="invalid_value", param="chat_template_kwargs")  # fmt: skip
        self.forced_tool()

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether the answer must be a tool call, the function it must call or None for any)."""
        choice = self.tool_choice
        if choice is None or choice in ("auto", "none"):
            return False, None
        names = [t.function.name for t in self.tools or []]
        if choice == "required":
            if not names:
                raise ApiError(400, 'tool_choice "required" needs tools', code="invalid_value", param="tool_choice")
            return True, None
        name = None
        if isinstance(choice, dict) and choice.get("type") == "function":
            fn = choice.get("function")  # chat completions' shape; the Responses API puts the name on top
            name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if not isinstance(name, str):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": ...}}', code="invalid_value", param="tool_choice")
        if name not in names:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                           code="invalid_value", param="tool_choice")
        return True, name

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: None for none, 0 for the chosen token's, k for the top k too."""
        return (self.top_logprobs or 0) if self.logprobs else None


# A completions prompt: text, texts, token ids, or lists of token ids.
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and v and isinstance(v[0], list) and any(len(ids) == 0 for ids in v):
            raise ValueError("a token-id prompt must not be empty")
        return v

    def check(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", code="invalid_value", param="best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", code="invalid_value", param="suffix")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def parse_body(model: type[BaseModel], data: object) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_request_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Of a union's failed branches the deepest error is the telling one ("content part of type
        # 'image_url' is not supported" rather than "content: not a string").
        first = max(exc.errors(include_url=False), key=lambda e: len(e.get("loc", ())))
        loc = [str(p) for p in first.get("loc", ())]
        # Union members add their own type name to the path (e.g. "str" / "list[int]"); drop those.
        loc = [p for p in loc if "[" not in p and p not in ("str", "int", "float", "bool", "none")]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value")
        raise ApiError(400, f"{param}: {msg}" if param else msg, code="invalid_value", param=param) from None


class ResponsesRequest(_Lenient):
    """OpenAI's Responses API body (`POST /v1/responses`), served through the chat path: the input
    items become chat messages for the model's template, so the cached prefix is the same either way.
    `previous_response_id` continues a response the server still keeps (server/response_store.py)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None  # accepted; the model writes no separate reasoning
    truncation: str | None = None
    include: list[str] | None = None
    # not in OpenAI's Responses API; accepted as the chat route accepts them (vLLM does the same)
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    cache_salt: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def check(self) -> None:
        if isinstance(self.input, list) and not self.input:
            raise ApiError(400, "input must be a string or a non-empty list of items", code="invalid_value",
                           param="input")
        if self.conversation is not None:
            raise ApiError(400, "conversation objects are not supported: continue with previous_response_id, or "
                                "send the whole conversation as input (its prefix is cached)",
                           code="unsupported_value", param="conversation")  # fmt: skip
        if self.background:
            raise ApiError(400, "background responses are not supported", code="unsupported_value",
                           param="background")

    def _tools(self) -> list[dict[str, Any]] | None:
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise ApiError(400, f"tools[{i}]: only function tools ({{\"type\": \"function\", \"name\": ...}}) "
                                    "are supported", code="unsupported_value", param=f"tools[{i}]")  # fmt: skip
            if not isinstance(tool.get("parameters", {}), dict | None):
                raise ApiError(400, f"tools[{i}].parameters must be a JSON schema object", code="invalid_value",
                               param=f"tools[{i}].parameters")
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            out.append({"type": "function", "function": fn})
        return out

    def _response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, 'text.format.type must be "text", "json_object" or "json_schema"',
                           code="invalid_value", param="text.format")
        if fmt["type"] != "json_schema":
            return {"type": fmt["type"]}
        if not isinstance(fmt.get("schema", {}), dict):
            raise ApiError(400, "text.format.schema must be a JSON schema object", code="invalid_value",
                           param="text.format.schema")
        spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}

    def input_messages(self) -> list[dict[str, Any]]:
        """The input items as chat messages: messages stay messages (input_text/output_text parts as
        text), function_call items join the assistant message before them (or start one) as tool_calls,
        as a model's own output comes back (response_store.output_as_message), and each
        function_call_output is a tool message. Reasoning items are dropped (the model reasons in its text)."""
        msgs: list[dict[str, Any]] = []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            param = f"input[{i}]"
            if kind == "message":
                if item.get("role") not in ("user", "system", "developer", "assistant"):
                    raise ApiError(400, f"{param}: a message's role is user, system, developer or assistant",
                                   code="invalid_value", param=param)  # fmt: skip
                msgs.append({"role": item["role"], "content": _item_text(item.get("content"), param)})
            elif kind == "function_call":
                if not all(isinstance(item.get(k), str) for k in ("name", "call_id", "arguments")):
                    raise ApiError(400, f"{param}: a function_call item has string name, call_id and arguments",
                                   code="invalid_value", param=param)  # fmt: skip
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
                last = msgs[-1] if msgs else None
                if last is not None and last["role"] == "assistant":  # one turn: its text, then its calls
                    last.setdefault("tool_calls", []).append(call)
                else:
                    msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                if not isinstance(item.get("call_id"), str):
                    raise ApiError(400, f"{param}: a function_call_output item has a string call_id",
                                   code="invalid_value", param=param)  # fmt: skip
                msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _item_text(item.get("output"), param)})
            elif kind != "reasoning":
                raise ApiError(400, f"{param}: input items of type {kind!r} are not supported", code="unsupported_value",
                               param=param)  # fmt: skip
        return msgs

    def chat_body(self, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The same request as a chat completions body (validated by ChatCompletionRequest): the
        instructions as the system message, then `history` (the conversation of previous_response_id,
        whose instructions do not carry over, as with OpenAI), then the input."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        body: dict[str, Any] = {"model": self.model, "messages": system + (history or []) + self.input_messages()}
        tools = self._tools()
        if tools:
            body["tools"] = tools
        fields = {
            "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "response_format": self._response_format(), "metadata": self.metadata, "user": self.user,
            "prompt_cache_key": self.prompt_cache_key, "seed": self.seed, "top_k": self.top_k,
            "cache_salt": self.cache_salt, "guided_json": self.guided_json, "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice, "guided_grammar": self.guided_grammar,
            "structured_outputs": self.structured_outputs,
        }  # fmt: skip
        body.update({k: v for k, v in fields.items() if v is not None})
        return body


def _item_text(content: Any, param: str) -> str | None:
    """A message's or a tool output's content: a string, or text parts (input_text, output_text, text)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text"):
                raise ApiError(400, f"{param}: content parts of type {kind!r} are not supported; only text parts are",
                               code="unsupported_value", param=param)  # fmt: skip
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}: a {kind} part needs its text (a string)", code="invalid_value",
                               param=param)  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"{param}: content must be a string or a list of text parts", code="invalid_value",
                   param=param)
