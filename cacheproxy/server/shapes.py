"""How each endpoint's answer looks on the wire: a choice's text as chat messages (tool calls parsed
out) or completions text, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cacheproxy.engine.request import TokenLogprob
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
    emitted: int = 0  # characters of text already streamed (tool-call parsing holds some back)


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


class ChatShape(ResponseShape):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, created: int, tool_format: str | None = None,
                 parallel_tool_calls: bool = True) -> None:
        super().__init__(response_id, model, created)
        # Set when the request offered tools: calls in the text become `tool_calls`.
        self.tool_format = tool_format
        # parallel_tool_calls=false: a message carries at most one call (the first the model wrote).
        self.max_calls = None if parallel_tool_calls else 1

    def _calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        assert self.tool_format is not None
        content, calls = parse_tool_calls(text, self.tool_format)
        return content, calls[: self.max_calls]

    def start_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta_choice(self, choice: Choice, text: str, logprobs: list[TokenLogprob] | None,
                     text_offset: int) -> dict[str, Any] | None:
        if self.tool_format is not None:
            full = "".join(choice.text_parts)
            safe = held_from(full, self.tool_format)
            text = full[choice.emitted : safe] if safe > choice.emitted else ""
            choice.emitted = max(choice.emitted, safe)
            if not text and logprobs is None:
                return None
        return {"index": choice.index, "delta": {"content": text},
                "logprobs": _chat_logprobs(logprobs) if logprobs is not None else None, "finish_reason": None}

    def finish_choice(self, choice: Choice) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        reason = choice.finish_reason
        if self.tool_format is not None:
            full = "".join(choice.text_parts)
            rest = full[choice.emitted :]
            content, calls = self._calls(rest)
            if calls:
                if content:
                    delta["content"] = content
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
                reason = "tool_calls"
            elif rest:
                delta["content"] = rest
            choice.emitted = len(full)
        return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def full_choice(self, choice: Choice, logprobs: bool) -> dict[str, Any]:
        text = "".join(choice.text_parts)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
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
