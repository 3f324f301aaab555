"""The OpenAI routes, driven by the official openai client (sync and async) against a real server on
127.0.0.1 serving the tiny model; every response is validated with the SDK's own types."""

from __future__ import annotations

import uuid
from typing import Any

import openai
import pytest
from conftest import BOB_KEY, SERVED_MODEL, ServerProcess, async_client
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

# A system prompt long enough to fill many 16-token blocks.
SYSTEM_PROMPT = (
    "You are a careful assistant for a team of software engineers. You answer briefly, you cite the "
    "files you read, and you never invent an API that the code does not have. When a question is "
    "ambiguous you say which reading you chose. You prefer small, reviewable changes, typed code and "
    "tests that read like specifications. You keep a list of open questions at the end of each answer."
)


def fresh_salt() -> str:
    """A cache namespace no other test shares, so that hits come only from this test's own requests."""
    return uuid.uuid4().hex


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                    ) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools), add_special_tokens=False)


def completion_chunk(data: dict[str, Any]) -> Completion:
    """A streamed completions chunk, validated with the SDK's Completion type. That type has no None
    finish_reason, which OpenAI's own streams send while a choice runs, so such choices are checked
    for shape here and the rest of the chunk by the type."""
    running = [c for c in data["choices"] if c.get("finish_reason") is None]
    for c in running:
        assert isinstance(c["index"], int) and isinstance(c["text"], str)
    done = [c for c in data["choices"] if c.get("finish_reason") is not None]
    Completion.model_validate({**data, "choices": done})
    return Completion.model_construct(**data)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    page = client.models.list()
    models = [Model.model_validate(m.model_dump()) for m in page.data]
    assert [m.id for m in models] == [SERVED_MODEL]


def test_models_retrieve_gives_the_served_model_and_a_404_for_another(client: openai.OpenAI) -> None:
    model = Model.model_validate(client.models.retrieve(SERVED_MODEL).model_dump())
    assert model.id == SERVED_MODEL and model.object == "model"
    for other in ("gpt-4o", "org/some-model"):
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(other)
        assert err.value.body["code"] == "model_not_found" and other in err.value.body["message"]  # type: ignore[index]


def test_chat_completion_has_openai_shape_and_counts_prompt_tokens_of_the_chat_template(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"cache_salt": fresh_salt()}
    )
    completion = ChatCompletion.model_validate(raw.http_response.json())
    assert raw.http_response.headers["x-request-id"]
    assert completion.object == "chat.completion"
    assert completion.model == SERVED_MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == len(chat_prompt_ids(tokenizer, messages))
    assert 1 <= usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0  # a fresh salt: nothing is cached yet


def test_developer_instructions_are_the_system_prompt_and_share_its_cache(client: openai.OpenAI) -> None:
    salt = fresh_salt()
    question = {"role": "user", "content": "Which files did you read?"}
    first = client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "developer", "content": SYSTEM_PROMPT}, question],
        max_tokens=2, temperature=0, extra_body={"cache_salt": salt},
    )  # fmt: skip
    second = client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "system", "content": SYSTEM_PROMPT}, question],
        max_tokens=2, temperature=0, extra_body={"cache_salt": salt},
    )  # fmt: skip
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details is not None
    # the same prompt: every full block of the first request is reused by the second
    assert second.usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // 16 * 16


def test_second_turn_of_a_conversation_reports_cached_tokens(client: openai.OpenAI, tokenizer: Any) -> None:
    salt = fresh_salt()
    turn1: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Which file holds the settings?"},
    ]
    first = client.chat.completions.create(model=SERVED_MODEL, messages=turn1, max_tokens=8, temperature=0,
                                           extra_body={"cache_salt": salt})
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn1_tokens = first.usage.prompt_tokens
    assert turn1_tokens >= 64

    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content or ""},
             {"role": "user", "content": "And which one holds the logging set-up?"}]
    second = client.chat.completions.create(model=SERVED_MODEL, messages=turn2, max_tokens=8, temperature=0,
                                            extra_body={"cache_salt": salt})
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert cached % 16 == 0  # whole blocks only
    # At least every full block of the first turn's prompt is reused.
    assert cached >= (turn1_tokens // 16) * 16
    assert cached < second.usage.prompt_tokens


async def test_streaming_chat_matches_the_non_streamed_answer_and_ends_with_usage(
    server: ServerProcess, tokenizer: Any
) -> None:
    messages = [{"role": "user", "content": "Count from one to five."}]
    salt = fresh_salt()
    async with async_client(server) as client:
        whole = await client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=12,
                                                     temperature=0, extra_body={"cache_salt": salt})
        stream = await client.chat.completions.create(
            model=SERVED_MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"cache_salt": salt})
        chunks = [ChatCompletionChunk.model_validate(c.to_dict()) async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    assert last.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, messages))
    assert last.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens is not None


async def test_streaming_without_include_usage_sends_no_usage(server: ServerProcess) -> None:
    async with async_client(server) as client:
        stream = await client.chat.completions.create(
            model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
        chunks = [c async for c in stream]
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_completions_accept_text_texts_token_ids_and_lists_of_token_ids(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    text = "The quick brown fox"
    ids = tokenizer.encode(text)
    salt = {"cache_salt": fresh_salt()}
    results = {}
    for name, prompt in {"text": text, "texts": [text, "jumps over"], "ids": ids,
                         "id_lists": [ids, tokenizer.encode("jumps over")]}.items():
        raw = client.completions.with_raw_response.create(model=SERVED_MODEL, prompt=prompt, max_tokens=6,
                                                          temperature=0, extra_body=salt)
        results[name] = Completion.model_validate(raw.http_response.json())
    assert results["text"].object == "text_completion"
    assert [len(r.choices) for r in results.values()] == [1, 2, 1, 2]
    for r in results.values():
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
    # The same prompt, as text or as its token ids, gives the same greedy text and token counts.
    assert results["ids"].choices[0].text == results["text"].choices[0].text
    assert results["texts"].choices[0].text == results["text"].choices[0].text
    assert results["id_lists"].choices[1].text == results["texts"].choices[1].text
    assert results["text"].usage is not None and results["texts"].usage is not None
    assert results["text"].usage.prompt_tokens == len(ids)
    assert results["texts"].usage.prompt_tokens == len(ids) + len(tokenizer.encode("jumps over"))


def test_completions_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=SERVED_MODEL, prompt="Once upon", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=SERVED_MODEL, prompt="Once upon", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text


async def test_streaming_completions_match_the_whole_answer(server: ServerProcess) -> None:
    async with async_client(server) as client:
        whole = await client.completions.create(model=SERVED_MODEL, prompt=["alpha beta", "gamma"],
                                                max_tokens=8, temperature=0)
        stream = await client.completions.create(model=SERVED_MODEL, prompt=["alpha beta", "gamma"],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [completion_chunk(c.to_dict()) async for c in stream]
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_n_choices_use_distinct_seeds_derived_from_the_request_seed(client: openai.OpenAI) -> None:
    def ask(seed: int) -> list[str]:
        r = client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "Go"}],
                                           n=3, seed=seed, temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True})
        ChatCompletion.model_validate(r.to_dict())
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert r.usage is not None and r.usage.completion_tokens == 24
        return [c.message.content or "" for c in r.choices]

    first = ask(seed=7)
    assert len(set(first)) > 1  # each choice samples with its own seed
    assert ask(seed=7) == first  # and the seeds are reproducible


def test_chat_logprobs_report_the_chosen_token_and_the_top_alternatives(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    ChatCompletion.model_validate(r.to_dict())
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert r.usage is not None and len(lp.content) == r.usage.completion_tokens
    for item in lp.content:
        assert item.logprob <= 0.0
        assert len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs))
    assert "".join(item.token for item in lp.content) == r.choices[0].message.content


def test_completion_logprobs_use_the_legacy_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SERVED_MODEL, prompt="one two", max_tokens=4, temperature=0, logprobs=2)
    Completion.model_validate(r.to_dict())
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_tool_definitions_and_tool_messages_go_through_the_chat_template_and_are_cached(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    tools = [{"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository and return its text.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What does config.py define?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "read_file",
                                                               "arguments": '{"path": "cacheproxy/config.py"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "class Settings(BaseSettings): ..."},
    ]
    salt = {"cache_salt": fresh_salt()}
    first = client.chat.completions.create(model=SERVED_MODEL, messages=messages, tools=tools,
                                           tool_choice="auto", parallel_tool_calls=False, max_tokens=4,
                                           temperature=0, extra_body=salt)
    expected = chat_prompt_ids(tokenizer, messages, tools=tools)
    assert first.usage is not None and first.usage.prompt_tokens == len(expected)
    assert first.usage.prompt_tokens > len(chat_prompt_ids(tokenizer, messages)) + 20  # the tools are in it
    again = client.chat.completions.create(model=SERVED_MODEL, messages=messages, tools=tools, max_tokens=4,
                                           temperature=0, extra_body=salt)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= (len(expected) // 16 - 1) * 16 > 0


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model=SERVED_MODEL, messages=prompt, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
    text = whole.choices[0].message.content or ""
    # A plain-ASCII stop string from the second half of the answer (random weights also emit odd bytes).
    starts = [i for i in range(len(text) // 2, len(text) - 2) if text[i:i + 3].isascii() and text[i:i + 3].isalnum()]
    assert starts, text
    stop = text[starts[0]: starts[0] + 3]
    cut = client.chat.completions.create(model=SERVED_MODEL, messages=prompt, max_tokens=16, temperature=0,
                                         stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_fields_agent_frameworks_send_are_accepted_and_unknown_ones_ignored(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "system", "content": "x"},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_completion_tokens=3, temperature=0.5, top_p=0.9, presence_penalty=0.1, frequency_penalty=0.1,
        user="u-1", seed=3, metadata={"run": "1"}, store=False, response_format={"type": "text"},
        prompt_cache_key="agent-42", logit_bias={"5": 1.0}, parallel_tool_calls=True,
        extra_body={"top_k": 20, "cache_salt": fresh_salt(), "reasoning_effort": "low", "service_tier": "auto",
                    "some_future_field": {"nested": [1, 2]}, "stream_options": None},
    )
    ChatCompletion.model_validate(r.to_dict())
    assert r.usage is not None and r.usage.completion_tokens <= 3


def test_tenants_do_not_share_cached_prefixes_and_cache_salt_narrows_further(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    messages = [{"role": "system", "content": SYSTEM_PROMPT + " " + fresh_salt()},
                {"role": "user", "content": "hello"}]

    def cached(c: openai.OpenAI, salt: str | None = None) -> int:
        r = c.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=2, temperature=0,
                                      extra_body={"cache_salt": salt} if salt else None)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        return int(r.usage.prompt_tokens_details.cached_tokens or 0)

    assert cached(client) == 0
    assert cached(client) > 0  # alice hits her own prefix
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=BOB_KEY, max_retries=0) as bob:
        assert cached(bob) == 0  # bob does not see alice's
    assert cached(client, salt="project-x") == 0  # alice's own salt is a separate namespace
    assert cached(client, salt="project-x") > 0


def test_default_max_tokens_applies_when_the_request_sets_none(client: openai.OpenAI) -> None:
    # The session server runs with --default-max-tokens 16.
    r = client.completions.create(model=SERVED_MODEL, prompt="x", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 16


def test_unset_sampling_fields_take_the_model_generation_config_unless_told_openai(
    tiny_model_dir: Any, tmp_path: Any
) -> None:
    import json
    import shutil

    from conftest import start_server, stop_server

    model = tmp_path / "greedy-by-default"
    shutil.copytree(tiny_model_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0}))
    messages = [{"role": "user", "content": "Tell me a story about a cache."}]

    def texts(mode: str) -> list[str]:
        srv = start_server(["--model", str(model), "--served-model-name", "m", "--sampling-defaults", mode],
                           tmp_path / mode)  # fmt: skip
        try:
            with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="k", max_retries=0) as client:
                return [
                    client.chat.completions.create(model="m", messages=messages, max_tokens=24,
                                                   extra_body={"ignore_eos": True}).choices[0].message.content or ""
                    for _ in range(3)
                ]  # fmt: skip
        finally:
            stop_server(srv)

    greedy = texts("model")  # temperature 0 from the model's generation config: the same text each time
    assert len(set(greedy)) == 1 and greedy[0]
    sampled = texts("openai")  # OpenAI's temperature 1 over random weights: three different texts
    assert len(set(sampled)) == 3


def test_logit_bias_and_penalties_reach_the_sampler_and_bad_ones_get_a_400(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    messages = [{"role": "user", "content": "Say something."}]
    forced = client.completions.create(model=SERVED_MODEL, prompt=[[5, 6, 7]], max_tokens=6, temperature=0.8,
                                       seed=3, logit_bias={"42": 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert forced.choices[0].text == tokenizer.decode([42] * 6)
    penalised = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=8, temperature=0, frequency_penalty=2.0,
        presence_penalty=1.0, extra_body={"repetition_penalty": 1.5},
    )  # fmt: skip
    assert penalised.choices[0].finish_reason in ("stop", "length")
    for bias, needle in (({"x": 1}, "not a token id"), ({"999999": 1}, "outside the vocabulary"),
                         ({"5": 150}, "not in [-100, 100]")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=2, logit_bias=bias)
        assert needle in str(err.value) and err.value.body["param"] == "logit_bias"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=2,
                                       extra_body={"repetition_penalty": 0})  # fmt: skip


READ_FILE = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}  # fmt: skip


def test_a_named_tool_choice_starts_the_answer_with_that_call(client: openai.OpenAI, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What does config.py define?"}]
    named = {"type": "function", "function": {"name": "read_file"}}
    forced = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, tools=[READ_FILE], tool_choice=named, max_tokens=6, temperature=0,
        extra_body={"cache_salt": fresh_salt(), "ignore_eos": True},
    )  # fmt: skip
    prefix = '<tool_call>\n{"name": "read_file", "arguments": '  # the tiny model's template writes Hermes calls
    base = chat_prompt_ids(tokenizer, messages, tools=[READ_FILE])
    assert forced.usage is not None
    rendered = tokenizer.apply_chat_template(messages, tools=[READ_FILE])
    assert forced.usage.prompt_tokens == len(tokenizer.encode(rendered + prefix, add_special_tokens=False))
    # random weights do not finish the call, so it comes back as text: the model went on from the prefix
    content = forced.choices[0].message.content or ""
    assert content.startswith(prefix) and len(content) > len(prefix)
    flat = client.chat.completions.create(  # the Responses API's shape of the same choice
        model=SERVED_MODEL, messages=messages, tools=[READ_FILE], max_tokens=6, temperature=0,
        tool_choice={"type": "function", "name": "read_file"},  # type: ignore[arg-type,typeddict-item]
        extra_body={"cache_salt": fresh_salt(), "ignore_eos": True},
    )  # fmt: skip
    assert (flat.choices[0].message.content or "").startswith(prefix)
    auto = client.chat.completions.create(model=SERVED_MODEL, messages=messages, tools=[READ_FILE], max_tokens=6,
                                          temperature=0, extra_body={"cache_salt": fresh_salt()})  # fmt: skip
    assert auto.usage is not None and auto.usage.prompt_tokens == len(base)


@pytest.mark.parametrize(
    ("tools", "choice", "needle"),
    [([READ_FILE], {"type": "function", "function": {"name": "write_file"}}, "not among the tools"),
     (None, "required", "needs tools"),
     ([READ_FILE], "sometimes", "tool_choice must be")],
)  # fmt: skip
def test_a_tool_choice_that_cannot_be_honoured_is_a_400(
    client: openai.OpenAI, tools: Any, choice: Any, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=tools, tool_choice=choice, max_tokens=2)  # fmt: skip
    assert needle in str(err.value) and err.value.body["param"] == "tool_choice"  # type: ignore[index]
