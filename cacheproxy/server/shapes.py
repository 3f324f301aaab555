"""How each endpoint's answer looks on the wire: a choice's text as chat messages (tool calls parsed
out) or completions text, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cacheproxy.engine.request import TokenLogprob
from cacheproxy.server.reasoning import split_reasoning
from cacheproxy.server.tool_calls import held_from, parse_tool_calls


@dataclass
class Choice:
    index: int
    prompt_index: int
    text_parts: list[str] = field(default_factory=list)
    text_length: int = 0  # of text_parts together: the offset of the next delta
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    last_time: float = 0.0
    emitted: int = 0  # characters of text (of content, with reasoning apart) already streamed
    opens_reasoning: bool = False  # the prompt ended inside a <think> block (reasoning.py)
    reasoning_emitted: int = 0  # characters of reasoning already streamed


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]}
            for lp in items
        ],
        "refusal": None,
    }


def _completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets: list[int] = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for _, t, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


class ResponseShape:
    """How chat and completions differ on the wire."""

    object_name: str
    chunk_object_name: str
    # SSE framing: the Responses API names each event (`event:` lines) and sends no `[DONE]`
    named_events = False

    def __init__(self, response_id: str, model: str, created: int) -> None:
        self.id = response_id
        self.model = model
        self.created = created

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None,
              with_usage_key: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": self.chunk_object_name, "created": self.created,
                                "model": self.model, "choices": choices}
        if with_usage_key or usage is not None:
            body["usage"] = usage
        return body

    def start_choice(self, index: int) -> dict[str, Any] | None:
        return None

    def delta_choice(self, choice: Choice, text: str, logprobs: list[TokenLogprob] | None,
                     text_offset: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def finish_choice(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def full_choice(self, choice: Choice, logprobs: bool) -> dict[str, Any]:
        raise NotImplementedError

    def full(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def stream_payloads(self, entries: list[dict[str, Any]], with_usage_key: bool) -> list[dict[str, Any]]:
        """What the choice entries of start/delta/finish_choice send: one chunk each."""
        return [self.chunk([e], with_usage_key=with_usage_key) for e in entries]

    def stream_end(self, usage: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        return [self.chunk([], usage=usage)] if include_usage else []

    def stream_error(self, body: dict[str, Any]) -> dict[str, Any]:
        return body


def _add_reasoning(delta: dict[str, Any], choice: Choice, reasoning: str | None) -> None:
    """The reasoning not streamed yet, into `delta`."""
    if reasoning is not None and len(reasoning) > choice.reasoning_emitted:
        delta["reasoning_content"] = reasoning[choice.reasoning_emitted :]
        choice.reasoning_emitted = len(reasoning)


class ChatShape(ResponseShape):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, created: int, tool_format: str | None = None,
                 parallel_tool_calls: bool = True, reasoning: bool = False) -> None:
        super().__init__(response_id, model, created)
        # Set when the request offered tools: calls in the text become `tool_calls`.
        self.tool_format = tool_format
        # parallel_tool_calls=false: a message carries at most one call (the first the model wrote).
        self.max_calls = None if parallel_tool_calls else 1
        # A reasoning model: its <think> block becomes `reasoning_content` (reasoning.py).
        self.reasoning = reasoning

    def _calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        assert self.tool_format is not None
        content, calls = parse_tool_calls(text, self.tool_format)
        return content, calls[: self.max_calls]

    def _parts(self, choice: Choice, final: bool) -> tuple[str | None, str]:
        """(reasoning, content) of the choice's text so far."""
        full = "".join(choice.text_parts)
        if not self.reasoning:
            return None, full
        return split_reasoning(full, choice.opens_reasoning, final)

    def start_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta_choice(self, choice: Choice, text: str, logprobs: list[TokenLogprob] | None,
                     text_offset: int) -> dict[str, Any] | None:
        lps = _chat_logprobs(logprobs) if logprobs is not None else None
        if self.tool_format is None and not self.reasoning:
            return {"index": choice.index, "delta": {"content": text}, "logprobs": lps, "finish_reason": None}
        reasoning, content = self._parts(choice, final=False)
        delta: dict[str, Any] = {}
        _add_reasoning(delta, choice, reasoning)
        safe = held_from(content, self.tool_format) if self.tool_format is not None else len(content)
        if safe > choice.emitted:
            delta["content"] = content[choice.emitted : safe]
            choice.emitted = safe
        if not delta and logprobs is None:
            return None
        if not delta:
            delta["content"] = ""
        return {"index": choice.index, "delta": delta, "logprobs": lps, "finish_reason": None}

    def finish_choice(self, choice: Choice) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        reason = choice.finish_reason
        if self.tool_format is None and not self.reasoning:
            return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": reason}
        reasoning, content = self._parts(choice, final=True)
        _add_reasoning(delta, choice, reasoning)
        rest = content[choice.emitted :]
        calls: list[dict[str, Any]] = []
        if self.tool_format is not None:
            text, calls = self._calls(rest)
            if calls:
                if text:
                    delta["content"] = text
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
                reason = "tool_calls"
        if not calls and rest:
            delta["content"] = rest
        choice.emitted = len(content)
        return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def full_choice(self, choice: Choice, logprobs: bool) -> dict[str, Any]:
        reasoning, text = self._parts(choice, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        reason = choice.finish_reason
        if self.tool_format is not None:
            content, calls = self._calls(text)
            if calls:
                message["content"], message["tool_calls"], reason = content, calls, "tool_calls"
        return {"index": choice.index, "message": message,
                "logprobs": _chat_logprobs(choice.logprobs) if logprobs else None,
                "finish_reason": reason}


class CompletionShape(ResponseShape):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, response_id: str, model: str, created: int, echo_texts: list[str | None]) -> None:
        super().__init__(response_id, model, created)
        self.echo_texts = echo_texts

    def echo_of(self, choice: Choice) -> str:
        return self.echo_texts[choice.prompt_index] or ""

    def delta_choice(self, choice: Choice, text: str, logprobs: list[TokenLogprob] | None,
                     text_offset: int) -> dict[str, Any]:
        return {"index": choice.index, "text": text,
                "logprobs": _completion_logprobs(logprobs, text_offset) if logprobs is not None else None,
                "finish_reason": None}

    def finish_choice(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "text": "", "logprobs": None, "finish_reason": choice.finish_reason}

    def full_choice(self, choice: Choice, logprobs: bool) -> dict[str, Any]:
        echo = self.echo_of(choice)
        return {"index": choice.index, "text": echo + "".join(choice.text_parts),
                "logprobs": _completion_logprobs(choice.logprobs, len(echo)) if logprobs else None,
                "finish_reason": choice.finish_reason}


class ResponsesShape(ResponseShape):
    """OpenAI's Responses API over one chat choice: output items (a message with output_text, then
    function_call items) instead of choices, and typed, numbered stream events. The chat shape it wraps
    decides what is text and what is a call, as for chat completions."""

    named_events = True

    def __init__(self, response_id: str, model: str, created: int, chat: ChatShape, echo: dict[str, Any]) -> None:
        super().__init__(response_id, model, created)
        self.chat = chat
        self.echo = echo  # the request's fields a Response repeats (instructions, tools, tool_choice, ...)
        self.message_id = "msg_" + response_id.removeprefix("resp_")
        self.reasoning_id = "rs_" + response_id.removeprefix("resp_")
        self._seq = 0
        self._reasoning_index: int | None = None  # output index of the open reasoning item, while streaming
        self._reasoning = ""
        self._message_index: int | None = None  # output index of the open message item, while streaming
        self._text = ""
        self._output: list[dict[str, Any]] = []
        self._finish_reason: str | None = None
        self.completed: dict[str, Any] | None = None  # the final Response object, once it is sent

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 finish_reason: str | None = None) -> dict[str, Any]:
        if status != "in_progress" and finish_reason == "length":
            status = "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "output": output, "usage": None if usage is None else self._usage(usage),
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                **self.echo}  # fmt: skip

    @staticmethod
    def _usage(usage: dict[str, Any]) -> dict[str, Any]:
        details = usage["prompt_tokens_details"]
        return {"input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": details["cached_tokens"], "cache_write_tokens": 0,
                                         "cached_tokens_by_tier": details["cached_tokens_by_tier"]},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]}  # fmt: skip

    def _message(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": [part]}

    def _function_call(self, call: dict[str, Any], index: int, status: str, arguments: str) -> dict[str, Any]:
        fn = call["function"]
        return {"id": f"fc_{self.message_id[4:]}_{index}", "type": "function_call", "call_id": call["id"],
                "name": fn["name"], "arguments": arguments, "status": status}  # fmt: skip

    def _reasoning_item(self, text: str, status: str) -> dict[str, Any]:
        return {"id": self.reasoning_id, "type": "reasoning", "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip

    def _output_items(self, reasoning: str | None, text: str | None, calls: list[dict[str, Any]],
                      status: str) -> list[dict[str, Any]]:
        items = [self._reasoning_item(reasoning, status)] if reasoning else []
        items += [self._message(text, status)] if text else []
        return items + [self._function_call(c, i, "completed", c["function"]["arguments"]) for i, c in enumerate(calls)]

    # --- streamed ------------------------------------------------------------------------
    def start_choice(self, index: int) -> dict[str, Any]:
        r = self.response("in_progress", [], None)
        return {"events": [{"type": "response.created", "response": r}, {"type": "response.in_progress", "response": r}]}

    def _reasoning_events(self, delta: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._reasoning_index is None:
            self._reasoning_index = len(self._output)
            item = {**self._reasoning_item("", "in_progress"), "content": []}
            events += [
                {"type": "response.output_item.added", "output_index": self._reasoning_index, "item": item},
                {"type": "response.content_part.added", "item_id": self.reasoning_id,
                 "output_index": self._reasoning_index, "content_index": 0, "part": {"type": "reasoning_text", "text": ""}},
            ]  # fmt: skip
        self._reasoning += delta
        events.append({"type": "response.reasoning_text.delta", "item_id": self.reasoning_id,
                       "output_index": self._reasoning_index, "content_index": 0, "delta": delta})  # fmt: skip
        return events

    def _close_reasoning(self, status: str) -> list[dict[str, Any]]:
        """The reasoning item's closing events (once: before the answer or calls begin)."""
        if self._reasoning_index is None or len(self._output) > self._reasoning_index:
            return []
        i, item = self._reasoning_index, self._reasoning_item(self._reasoning, status)
        self._output.append(item)
        return [
            {"type": "response.reasoning_text.done", "item_id": self.reasoning_id, "output_index": i,
             "content_index": 0, "text": self._reasoning},
            {"type": "response.content_part.done", "item_id": self.reasoning_id, "output_index": i,
             "content_index": 0, "part": {"type": "reasoning_text", "text": self._reasoning}},
            {"type": "response.output_item.done", "output_index": i, "item": item},
        ]  # fmt: skip

    def _text_events(self, delta: str) -> list[dict[str, Any]]:
        events = self._close_reasoning("completed")
        if self._message_index is None:
            self._message_index = len(self._output)
            item = {**self._message("", "in_progress"), "content": []}
            events += [
                {"type": "response.output_item.added", "output_index": self._message_index, "item": item},
                {"type": "response.content_part.added", "item_id": self.message_id, "output_index": self._message_index,
                 "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}},
            ]  # fmt: skip
        self._text += delta
        events.append({"type": "response.output_text.delta", "item_id": self.message_id,
                       "output_index": self._message_index, "content_index": 0, "delta": delta, "logprobs": []})  # fmt: skip
        return events

    def delta_choice(self, choice: Choice, text: str, logprobs: list[TokenLogprob] | None,
                     text_offset: int) -> dict[str, Any] | None:
        entry = self.chat.delta_choice(choice, text, None, text_offset)
        delta = entry["delta"] if entry is not None else {}
        events = self._reasoning_events(delta["reasoning_content"]) if delta.get("reasoning_content") else []
        if delta.get("content"):
            events += self._text_events(delta["content"])
        return {"events": events} if events else None

    def finish_choice(self, choice: Choice) -> dict[str, Any]:
        entry = self.chat.finish_choice(choice)
        self._finish_reason = reason = entry["finish_reason"]
        delta = entry["delta"]
        status = "incomplete" if reason == "length" else "completed"
        events = self._reasoning_events(delta["reasoning_content"]) if delta.get("reasoning_content") else []
        if delta.get("content"):
            events += self._text_events(delta["content"])
        events += self._close_reasoning(status)
        if self._message_index is not None:
            i, part = self._message_index, {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
            item = self._message(self._text, status)
            events += [
                {"type": "response.output_text.done", "item_id": self.message_id, "output_index": i,
                 "content_index": 0, "text": self._text, "logprobs": []},
                {"type": "response.content_part.done", "item_id": self.message_id, "output_index": i,
                 "content_index": 0, "part": part},
                {"type": "response.output_item.done", "output_index": i, "item": item},
            ]  # fmt: skip
            self._output.append(item)
        for k, call in enumerate(delta.get("tool_calls", [])):
            i, args = len(self._output), call["function"]["arguments"]
            done = self._function_call(call, k, "completed", args)
            events += [
                {"type": "response.output_item.added", "output_index": i,
                 "item": self._function_call(call, k, "in_progress", "")},
                {"type": "response.function_call_arguments.delta", "item_id": done["id"], "output_index": i,
                 "delta": args},
                {"type": "response.function_call_arguments.done", "item_id": done["id"], "output_index": i,
                 "arguments": args},
                {"type": "response.output_item.done", "output_index": i, "item": done},
            ]  # fmt: skip
            self._output.append(done)
        return {"events": events}

    def _numbered(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for event in events:
            event["sequence_number"] = self._seq
            self._seq += 1
        return events

    def stream_payloads(self, entries: list[dict[str, Any]], with_usage_key: bool) -> list[dict[str, Any]]:
        return self._numbered([event for entry in entries for event in entry["events"]])

    def stream_end(self, usage: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        r = self.response("completed", self._output, usage, self._finish_reason)
        kind = "response.completed" if r["status"] == "completed" else "response.incomplete"
        self.completed = r
        return self._numbered([{"type": kind, "response": r}])

    def stream_error(self, body: dict[str, Any]) -> dict[str, Any]:
        err = body["error"]
        return self._numbered([{"type": "error", "code": err.get("code"), "message": err.get("message"),
                                "param": err.get("param")}])[0]  # fmt: skip

    # --- whole ---------------------------------------------------------------------------
    def full_choice(self, choice: Choice, logprobs: bool) -> dict[str, Any]:
        return self.chat.full_choice(choice, False)

    def full(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        message = choices[0]["message"]
        reason = choices[0]["finish_reason"]
        status = "incomplete" if reason == "length" else "completed"
        output = self._output_items(message.get("reasoning_content"), message.get("content"),
                                    message.get("tool_calls") or [], status)  # fmt: skip
        self.completed = self.response("completed", output, usage, reason)
        return self.completed
