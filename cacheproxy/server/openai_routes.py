"""POST /v1/chat/completions, POST /v1/completions and GET /v1/models.

One HTTP request becomes one engine request per (prompt, choice). Their outputs are merged into one SSE
stream or one JSON body; nothing is sent before every choice has its first output, so an engine refusal
(400, 429) is still a proper status code. Leaving the handler in any way (client gone, error) closes the
engine iterators, which aborts the requests and frees their blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from cacheproxy.cache.records import RequestRecord, cache_class
from cacheproxy.engine.request import (
    EngineError,
    EngineOverloaded,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
)
from cacheproxy.log import get_logger
from cacheproxy.server.auth import cache_salt, tenant_of
from cacheproxy.server.errors import ApiError
from cacheproxy.server.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest, parse_body
from cacheproxy.server.reasoning import prompt_opens_reasoning, template_reasons
from cacheproxy.server.response_store import output_as_message
from cacheproxy.server.shapes import ChatShape, Choice, CompletionShape, ResponseShape, ResponsesShape
from cacheproxy.server.sse import SSEStream
from cacheproxy.server.state import REQUEST_ID, STATE, ServerState
from cacheproxy.server.tool_calls import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARK,
    PYTHON_TAG,
    auto_call_grammar,
    content_or_call_grammar,
    forced_call_grammar,
    forced_call_prefix,
    tool_call_format,
)

log = get_logger(__name__)

# One HTTP request may not fan out into more engine requests than this (prompts x n).
MAX_CHOICES_PER_REQUEST = 128
# Seconds a client should wait after a 429 before retrying.
RETRY_AFTER_S = 1


def require_ready(state: ServerState) -> None:
    if not state.engine.ready:
        raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "2"})


async def read_json(request: web.Request, max_bytes: int) -> Any:
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")
    try:
        raw = await request.read()  # past client_max_size (chunked bodies too) aiohttp raises 413
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    # JSON may escape half of a UTF-16 pair (\ud800) on its own: Python reads it, but no text is made of
    # it (the tokenizer, the chat template and the logs all fail on it). Walked only when the raw body
    # has such an escape at all.
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise ApiError(400, "the request body has a string with an unpaired UTF-16 surrogate (\\ud800-\\udfff), "
                            "which is not text", code="invalid_json")  # fmt: skip
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_model(requested: str, state: ServerState) -> None:
    if requested != state.engine.model_name:
        raise ApiError(404, f"the model '{requested}' does not exist; this server serves "
                            f"'{state.engine.model_name}'", code="model_not_found", param="model")


def _engine_error(exc: EngineError) -> ApiError:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, EngineOverloaded) else None
    return ApiError(exc.status, str(exc), code=exc.code, headers=headers)


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass(slots=True)
class PromptInput:
    token_ids: list[int]
    text: str | None = None  # for echo
    # the start of a tool call written for the model (tool_choice required or named): part of the
    # prompt's tokens, and of the answer's text the calls are parsed from
    answer_prefix: str = ""
    opens_reasoning: bool = False  # the prompt ends inside a <think> block (DeepSeek-R1's template)


def _chat_prompt(state: ServerState, req: ChatCompletionRequest, scope: str) -> PromptInput:
    """Runs in the executor: chat template (tools included, so they are part of the cached prefix),
    then tokenization (from where it parts from a recent prompt of the same cache namespace)."""
    tok = state.engine.tokenizer
    messages = [m.template_dict() for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                       **(req.chat_template_kwargs or {}))
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_messages", param="messages") from None
    forced, name = req.forced_tool()
    prefix = forced_call_prefix(tool_call_format(tok.chat_template), name) if forced and req.add_generation_prompt else ""
    # The template writes BOS itself; adding special tokens again would double it.
    encoder = state.prompt_encoder
    ids = encoder.encode(text + prefix, scope) if encoder is not None else tok.encode(text + prefix, add_special_tokens=False)
    return PromptInput(ids, answer_prefix=prefix, opens_reasoning=prompt_opens_reasoning(text + prefix))


def _completion_prompts(state: ServerState, req: CompletionRequest) -> list[PromptInput]:
    tok = state.engine.tokenizer
    vocab = tok.vocab_size
    prompts: list[PromptInput] = []
    for p in req.prompts():
        if isinstance(p, str):
            prompts.append(PromptInput(tok.encode(p, add_special_tokens=True), p))
            continue
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           code="invalid_value", param="prompt")
        prompts.append(PromptInput(list(p), tok.decode(p, skip_special_tokens=False) if req.echo else None))
    for p in prompts:
        if not p.token_ids:
            raise ApiError(400, "the prompt is empty", code="invalid_value", param="prompt")
    return prompts


def _max_tokens(requested: int | None, prompt_len: int, state: ServerState, param: str) -> int:
    limit = state.engine.max_model_len
    if requested is None:
        room = limit - prompt_len
        if room < 1:
            raise _context_error(limit, prompt_len, None, param)
        return min(state.settings.default_max_tokens, room)
    if prompt_len + requested > limit:
        raise _context_error(limit, prompt_len, requested, param)
    return requested


def _context_error(limit: int, prompt_len: int, requested: int | None, param: str) -> ApiError:
    asked = f" plus {requested} tokens to generate" if requested is not None else ""
    return ApiError(400, f"this model's maximum context length is {limit} tokens; the request has "
                         f"{prompt_len} prompt tokens{asked}. Shorten the {param} or lower max_tokens.",
                    code="context_length_exceeded", param=param)


# --------------------------------------------------------------------------------------------------
# Engine streams


class ChoiceStreams:
    """The engine iterators of one HTTP request, read as one stream of (choice index, output)."""

    def __init__(self, streams: Sequence[AsyncIterator[GenerationOutput]]) -> None:
        self._streams = list(streams)
        self._pumps: list[asyncio.Task[None]] = []

    async def first_outputs(self) -> list[GenerationOutput]:
        """Every choice's first output, read concurrently (engine refusals are raised here)."""
        if len(self._streams) == 1:
            return [await anext(self._streams[0])]
        tasks = [asyncio.ensure_future(anext(s)) for s in self._streams]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def rest(self, unfinished: set[int]) -> AsyncIterator[tuple[int, GenerationOutput]]:
        if not unfinished:
            return
        if len(self._streams) == 1:
            async for out in self._streams[0]:
                yield 0, out
                if out.finish_reason is not None:
                    return
            return
        queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()
        for i in sorted(unfinished):
            self._pumps.append(asyncio.create_task(self._pump(i, self._streams[i], queue)))
        while unfinished:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                unfinished.discard(i)
                continue
            if item.finish_reason is not None:
                unfinished.discard(i)
            yield i, item

    @staticmethod
    async def _pump(i: int, stream: AsyncIterator[GenerationOutput],
                    queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
                if out.finish_reason is not None:
                    break
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))

    async def close(self) -> None:
        """Stops reading and closes every iterator: the engine aborts what is still running."""
        for t in self._pumps:
            t.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        for s in self._streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


# --------------------------------------------------------------------------------------------------
# The shared request path


@dataclass
class Job:
    """One engine request: a prompt and one choice of it."""

    choice_index: int
    prompt_index: int
    prompt: PromptInput
    params: SamplingParams


class GenerationRun:
    """Runs the jobs of one HTTP request, answers it, and fills its record."""

    def __init__(self, request: web.Request, state: ServerState, record: RequestRecord, shape: ResponseShape,
                 jobs: list[Job], salt: str, arrival: float, stream: bool, include_usage: bool,
                 logprobs: bool) -> None:
        self.request = request
        self.state = state
        self.record = record
        self.shape = shape
        self.jobs = jobs
        self.salt = salt
        self.arrival = arrival
        self.stream = stream
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.choices = [Choice(j.choice_index, j.prompt_index, [j.prompt.answer_prefix] if j.prompt.answer_prefix
                               else [], opens_reasoning=j.prompt.opens_reasoning) for j in jobs]
        self.engine_start = 0.0
        self.engine_end = 0.0

    async def respond(self) -> web.StreamResponse:
        engine = self.state.engine
        rid = self.request[REQUEST_ID]
        streams = ChoiceStreams([
            engine.generate(GenerationRequest(f"{rid}-{j.choice_index}", j.prompt.token_ids, j.params, self.salt))
            for j in self.jobs
        ])
        try:
            self.engine_start = time.monotonic()
            try:
                firsts = await streams.first_outputs()
            except EngineError as exc:
                raise _engine_error(exc) from None
            self._note_first(firsts)
            if self.stream:
                return await self._stream(streams, firsts)
            return await self._collect(streams, firsts)
        finally:
            await streams.close()

    def _note_first(self, firsts: list[GenerationOutput]) -> None:
        now = time.monotonic()
        rec = self.record
        rec.ttft_s = now - self.arrival
        seen_prompts: set[int] = set()
        for job, out in zip(self.jobs, firsts, strict=True):
            if job.prompt_index in seen_prompts:
                continue  # the other choices of a prompt share its prefix; count the prompt once
            seen_prompts.add(job.prompt_index)
            rec.prompt_tokens += len(job.prompt.token_ids)
            rec.cached_tokens += out.cached_tokens
            for tier, n in out.cached_tokens_by_tier.items():
                rec.cached_tokens_by_tier[tier] = rec.cached_tokens_by_tier.get(tier, 0) + n
        rec.queue_time_s = firsts[0].queue_time_s
        rec.cache = cache_class(rec.prompt_tokens, rec.cached_tokens, self.state.settings.block_size)
        metrics = self.state.metrics
        metrics.ttft.labels(cache=rec.cache).observe(rec.ttft_s)
        metrics.queue_time.observe(rec.queue_time_s)
        for c in self.choices:
            c.last_time = now

    def _accept(self, i: int, out: GenerationOutput) -> list[dict[str, Any]]:
        """Folds one output into its choice; returns the stream chunks' choice entries it makes."""
        c = self.choices[i]
        now = time.monotonic()
        if out.token_ids and c.completion_tokens:
            gap = (now - c.last_time) / len(out.token_ids)
            self.state.metrics.inter_token.observe(gap)
        c.last_time = now
        offset = c.text_length
        c.text_parts.append(out.text)
        c.text_length += len(out.text)
        c.completion_tokens = max(c.completion_tokens + len(out.token_ids), out.completion_tokens)
        if self.logprobs and out.logprobs:
            c.logprobs.extend(out.logprobs)
        entries: list[dict[str, Any]] = []
        if out.text or (self.logprobs and out.logprobs):
            lps = (out.logprobs or []) if self.logprobs else None
            if isinstance(self.shape, CompletionShape):
                offset += len(self.shape.echo_of(c))
            entry = self.shape.delta_choice(c, out.text, lps, offset)
            if entry is not None:
                entries.append(entry)
        if out.finish_reason is not None:
            if out.finish_reason == "abort":
                raise ApiError(503, "the request was aborted: the server is shutting down", code="aborted")
            c.finish_reason = out.finish_reason
            self.engine_end = now
            entries.append(self.shape.finish_choice(c))
        return entries

    def usage(self) -> dict[str, Any]:
        rec = self.record
        completion = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": rec.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": rec.cached_tokens,
                                      "cached_tokens_by_tier": dict(rec.cached_tokens_by_tier)},
        }

    def _finish_record(self) -> None:
        self.record.completion_tokens = sum(c.completion_tokens for c in self.choices)
        self.record.finish_reason = self.choices[0].finish_reason

    async def _collect(self, streams: ChoiceStreams, firsts: list[GenerationOutput]) -> web.Response:
        for i, out in enumerate(firsts):
            self._accept(i, out)
        async for i, out in streams.rest({i for i, o in enumerate(firsts) if o.finish_reason is None}):
            self._accept(i, out)
        self._finish_record()
        body = self.shape.full([self.shape.full_choice(c, self.logprobs) for c in self.choices], self.usage())
        total_ms = (time.monotonic() - self.arrival) * 1000
        engine_ms = (self.engine_end - self.engine_start) * 1000
        # Server-Timing lets a client split its latency into engine time and proxy overhead.
        timing = (f"engine;dur={engine_ms:.3f}, ttft;dur={(self.record.ttft_s or 0) * 1000:.3f}, "
                  f"total;dur={total_ms:.3f}")
        return web.Response(text=json.dumps(body, separators=(",", ":")), content_type="application/json",
                            headers={"Server-Timing": timing})

    async def _stream(self, streams: ChoiceStreams, firsts: list[GenerationOutput]) -> web.StreamResponse:
        shape = self.shape
        sse = SSEStream(self.request, headers={"X-Request-Id": self.request[REQUEST_ID]},
                        named_events=shape.named_events)  # fmt: skip
        entries: list[dict[str, Any]] = []
        for i in range(len(self.choices)):
            start = shape.start_choice(self.choices[i].index)
            if start is not None:
                entries.append(start)
        for i, out in enumerate(firsts):
            entries.extend(self._accept(i, out))
        await sse.open()
        usage_key = self.include_usage
        try:
            await sse.send_many(shape.stream_payloads(entries, usage_key))
            async for i, out in streams.rest({i for i, o in enumerate(firsts) if o.finish_reason is None}):
                entries = self._accept(i, out)
                if entries:
                    await sse.send_many(shape.stream_payloads(entries, usage_key))
        except (ApiError, EngineError) as exc:
            # Headers are gone: the error travels as an event, as OpenAI's streams do.
            err = exc if isinstance(exc, ApiError) else _engine_error(exc)
            self.record.status, self.record.error = err.status, err.code
            await sse.send(shape.stream_error(err.body()))
            await sse.close()
            return sse.response
        self._finish_record()
        await sse.send_many(shape.stream_end(self.usage(), self.include_usage))
        await sse.close()
        return sse.response


# --------------------------------------------------------------------------------------------------
# Handlers


def _logit_bias(req: ChatCompletionRequest | CompletionRequest, vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as strings) -> a value in [-100, 100] added to their logits."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", code="invalid_value",
                           param="logit_bias") from None
        if not 0 <= token < vocab:
            raise ApiError(400, f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})",
                           code="invalid_value", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, f"logit_bias value {value} for token {token} is not in [-100, 100]",
                           code="invalid_value", param="logit_bias")
        bias[token] = float(value)
    return bias


async def _structured(state: ServerState, req: ChatCompletionRequest | CompletionRequest, scope: str,
                      format_param: str = "response_format") -> StructuredOutput | None:
    """The request's constraint on its text, compiled once here so that a bad one is a 400 naming it.
    A forced tool call is constrained to the function's parameters; a JSON response format next to
    tools the model may call lets it answer either way. `scope`: the request's prefix-cache namespace,
    which its compiled constraint is kept under too."""
    structured, param = req.structured_output(), format_param
    if isinstance(req, ChatCompletionRequest) and req.tools and req.tool_choice != "none":
        tok = state.engine.tokenizer
        fmt = tool_call_format(tok.chat_template)
        tools = {t.function.name: t.function.parameters for t in req.tools}
        forced, name = req.forced_tool()
        markers = {m: t for m in (HERMES_OPEN, HERMES_CLOSE, MISTRAL_MARK, PYTHON_TAG) if (t := tok.token_to_id(m)) is not None}
        parallel = req.parallel_tool_calls is not False
        if forced and req.add_generation_prompt:
            structured, param = forced_call_grammar(fmt, tools, name), "tools"
        elif structured is not None:
            structured = content_or_call_grammar(fmt, structured, tools, markers, parallel)
        elif req.add_generation_prompt:
            strict = frozenset(t.function.name for t in req.tools if t.function.strict)
            structured, param = auto_call_grammar(fmt, tools, strict, markers, parallel), "tools"
            if structured is None:
                return None
            structured = dataclasses.replace(structured, scope=scope)
            try:
                await state.engine.check_structured(structured)
            except EngineError as exc:
                # Only a strict schema asks for the guarantee; otherwise, or where the tokenizer allows
                # no constraint at all, calls are left unguided (as other servers leave them).
                if strict and exc.code != "unsupported_value":
                    raise ApiError(exc.status, str(exc), code=exc.code, param=param) from None
                log.info("tool calls left unguided", reason=str(exc)[:200])
                return None
            return structured
    if structured is None:
        return None
    structured = dataclasses.replace(structured, scope=scope)
    try:
        await state.engine.check_structured(structured)
    except EngineError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code, param=param) from None
    return structured


def _sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None,
              choice: int, defaults: dict[str, float | int], logit_bias: dict[int, float],
              structured: StructuredOutput | None) -> SamplingParams:
    """`defaults`: what the request leaves unset falls back to (the model's generation config, or none:
    OpenAI's values)."""
    seed = None if req.seed is None else req.seed + choice  # distinct, reproducible seeds per choice
    top_k = int(defaults.get("top_k", 0)) if req.top_k is None else max(req.top_k, 0)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(defaults.get("temperature", 1.0)) if req.temperature is None else req.temperature,
        top_p=float(defaults.get("top_p", 1.0)) if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=seed,
        stop=req.stop_list(),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=logit_bias,
        structured=structured,
    )
    try:
        params.validate()
    except EngineError as exc:
        raise ApiError(400, str(exc), code=exc.code) from None
    return params


async def _handle(request: web.Request, endpoint: str) -> web.StreamResponse:
    state = request.app[STATE]
    arrival = time.monotonic()
    rid = request[REQUEST_ID]
    record_id = {"chat": f"chatcmpl-{rid}", "completions": f"cmpl-{rid}", "responses": f"resp_{rid}"}[endpoint]
    # status 0 until answered; a streamed error sets its own status on the record.
    record = RequestRecord(id=record_id, time=time.time(), endpoint=endpoint, tenant="", model="", status=0)
    try:
        require_ready(state)
        record.tenant = tenant_of(request, state.settings)
        structlog.contextvars.bind_contextvars(tenant=record.tenant)
        body = await read_json(request, state.settings.max_body_bytes)
        req: ChatCompletionRequest | CompletionRequest
        resp_req: ResponsesRequest | None = None
        history: list[dict[str, Any]] = []
        if endpoint == "responses":
            resp_req, req, history = _responses_as_chat(state, body, record.tenant)
        elif endpoint == "chat":
            req = parse_body(ChatCompletionRequest, body)
        else:
            req = parse_body(CompletionRequest, body)
        req.check()
        record.model, record.stream, record.n = req.model, req.stream, req.n
        record.prompt_cache_key = req.prompt_cache_key
        check_model(req.model, state)
        salt = cache_salt(record.tenant, req.cache_salt, state.settings)

        if isinstance(req, ChatCompletionRequest):
            prompts = [await state.run_blocking(_chat_prompt, state, req, salt)]
            logprobs_k = req.logprobs_k()
            param = "messages" if resp_req is None else "input"
            tool_format = None
            if req.tools and req.tool_choice != "none":  # forced calls too: the prefix is their text's start
                tool_format = tool_call_format(state.engine.tokenizer.chat_template)
            reasoning = state.settings.reasoning_parser == "auto" and template_reasons(
                state.engine.tokenizer.chat_template)  # fmt: skip
            shape: ResponseShape = ChatShape(record.id, state.engine.model_name, int(record.time), tool_format,
                                             req.parallel_tool_calls is not False, reasoning)
            if resp_req is not None:
                shape = ResponsesShape(record.id, state.engine.model_name, int(record.time), shape,
                                       _responses_echo(resp_req, _stores(state, resp_req)))
        else:
            if req.echo and req.logprobs is not None:
                raise ApiError(400, "echo with logprobs is not supported", code="invalid_value", param="echo")
            prompts = await state.run_blocking(_completion_prompts, state, req)
            logprobs_k = req.logprobs
            param = "prompt"
            shape = CompletionShape(record.id, state.engine.model_name, int(record.time),
                                    [p.text if req.echo else None for p in prompts])
        if len(prompts) * req.n > MAX_CHOICES_PER_REQUEST:
            raise ApiError(400, f"prompts x n may be at most {MAX_CHOICES_PER_REQUEST}", code="invalid_value",
                           param="n")
        jobs: list[Job] = []
        defaults = state.engine.tokenizer.generation_defaults if state.settings.sampling_defaults == "model" else {}
        bias = _logit_bias(req, state.engine.tokenizer.vocab_size)
        structured = await _structured(state, req, salt, "response_format" if resp_req is None else "text.format")
        # (a lazy constraint, for calls the model may make, leaves the answer's start alone)
        if structured is not None and not structured.lazy and structured.kind in ("json_schema", "choice", "lark"):
            for prompt in prompts:
                # a JSON, choice or tool-call constraint shapes the answer from its first token, even
                # after a prompt that opened a <think> block (a user's regex or grammar may write one)
                prompt.opens_reasoning = False
        for p_idx, prompt in enumerate(prompts):
            max_tokens = _max_tokens(req.requested_max_tokens(), len(prompt.token_ids), state, param)
            for k in range(req.n):
                jobs.append(Job(p_idx * req.n + k, p_idx, prompt, _sampling(req, max_tokens, logprobs_k, k, defaults, bias, structured)))
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        run = GenerationRun(request, state, record, shape, jobs, salt, arrival,
                            req.stream, include_usage, logprobs_k is not None)
        response = await run.respond()
        if record.status == 0:
            record.status = 200
        if resp_req is not None and isinstance(shape, ResponsesShape):
            _keep_response(state, record, resp_req, history, shape)
        return response
    except ApiError as exc:
        record.status, record.error = exc.status, exc.code
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        record.status, record.error = 499, "client_disconnected"
        raise
    except Exception:
        record.status, record.error = 500, "internal_error"
        raise
    finally:
        record.e2e_s = time.monotonic() - arrival
        if record.status == 200:
            state.metrics.e2e.observe(record.e2e_s)
        state.record(record)
        log.info("request_done", endpoint=endpoint, status=record.status, error=record.error,
                 prompt_tokens=record.prompt_tokens, cached_tokens=record.cached_tokens,
                 completion_tokens=record.completion_tokens,
                 ttft_ms=None if record.ttft_s is None else round(record.ttft_s * 1000, 2),
                 e2e_ms=round(record.e2e_s * 1000, 2))


def _responses_as_chat(state: ServerState, body: Any, tenant: str
                       ) -> tuple[ResponsesRequest, ChatCompletionRequest, list[dict[str, Any]]]:
    """A Responses body, the kept conversation it continues (previous_response_id) as chat messages, and
    the whole request as a chat completions one: the route's path from here on."""
    resp_req = parse_body(ResponsesRequest, body)
    resp_req.check()
    history: list[dict[str, Any]] = []
    if resp_req.previous_response_id is not None:
        previous = state.responses.get(resp_req.previous_response_id, tenant)
        if previous is None:
            raise ApiError(404, f"previous response {resp_req.previous_response_id!r} not found (responses are "
                                "kept in memory, within responses_store_bytes, until a restart)",
                           code="previous_response_not_found", param="previous_response_id")  # fmt: skip
        history = previous.messages
    req = parse_body(ChatCompletionRequest, resp_req.chat_body(history))
    req.stream = resp_req.stream
    return resp_req, req, history


def _keep_response(state: ServerState, record: RequestRecord, req: ResponsesRequest,
                   history: list[dict[str, Any]], shape: ResponsesShape) -> None:
    """Keeps a finished response (unless store=false) for previous_response_id and GET by id."""
    if shape.completed is not None and _stores(state, req):
        turn = history + req.input_messages() + [output_as_message(shape.completed)]
        state.responses.put(record.id, record.tenant, turn, shape.completed)


def _stores(state: ServerState, req: ResponsesRequest) -> bool:
    return req.store is not False and state.settings.responses_store_bytes > 0


def _responses_echo(req: ResponsesRequest, stored: bool) -> dict[str, Any]:
    """The request fields a Response object repeats."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False, "temperature": req.temperature,
        "top_p": req.top_p, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
        "text": {"format": fmt}, "store": stored, "truncation": "disabled", "user": req.user,
        "previous_response_id": req.previous_response_id, "reasoning": None,
    }  # fmt: skip


async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API, through the chat path (protocol.ResponsesRequest, shapes.ResponsesShape)."""
    return await _handle(request, "responses")


async def retrieve_response(request: web.Request) -> web.Response:
    """GET /v1/responses/{id}: a response this server keeps, for the tenant that made it."""
    state = request.app[STATE]
    entry = state.responses.get(request.match_info["response_id"], tenant_of(request, state.settings))
    if entry is None:
        raise ApiError(404, f"response {request.match_info['response_id']!r} not found", code="not_found")
    return web.json_response(entry.body)


async def delete_response(request: web.Request) -> web.Response:
    state = request.app[STATE]
    response_id = request.match_info["response_id"]
    if not state.responses.delete(response_id, tenant_of(request, state.settings)):
        raise ApiError(404, f"response {response_id!r} not found", code="not_found")
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "completions")


def _model_object(state: ServerState) -> dict[str, Any]:
    return {"id": state.engine.model_name, "object": "model", "created": int(state.started_at),
            "owned_by": "cacheproxy", "max_model_len": state.engine.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    require_ready(state)
    tenant_of(request, state.settings)
    return web.json_response({"object": "list", "data": [_model_object(state)]})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model} (the SDK's `models.retrieve`): the served model, or OpenAI's 404."""
    state = request.app[STATE]
    require_ready(state)
    tenant_of(request, state.settings)
    check_model(request.match_info["model"], state)
    return web.json_response(_model_object(state))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/models", list_models)
    # ids may hold a slash (org/name), so the tail of the path is the id
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
