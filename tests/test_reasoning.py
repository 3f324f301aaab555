"""A reasoning model's <think> block comes back apart from its answer: the split itself (whole and
streamed in any chunking), and a real server whose model's chat template reasons, through the openai
client on chat and Responses, streamed and not (a guided regex makes the random weights write a
think block and an answer)."""

from __future__ import annotations

import json
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ServerProcess, start_server, stop_server
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from cacheproxy.server.reasoning import prompt_opens_reasoning, split_reasoning, template_reasons

CASES = [
    # (text, opened by the prompt, reasoning, content)
    ("<think>\nplan it\n</think>\n\nThe answer.", False, "\nplan it\n", "The answer."),
    ("plan it</think>\n\nThe answer.", True, "plan it", "The answer."),
    ("The answer, no thinking.", False, None, "The answer, no thinking."),
    ("  <think>cut short by max_tokens", False, "cut short by max_tokens", ""),
    ("cut short, opened by the prompt", True, "cut short, opened by the prompt", ""),
    ("<think></think>Right away.", False, "", "Right away."),
    ("<thin", False, None, "<thin"),  # final: not a tag after all
    ("x < y and a </thinker", True, "x < y and a </thinker", ""),
]


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_the_split_of_a_whole_text(text: str, opened: bool, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text, opened, final=True) == (reasoning, content)


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_streamed_in_any_chunking_the_parts_only_grow_and_end_as_the_whole(
    text: str, opened: bool, reasoning: str | None, content: str
) -> None:
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
        seen_r, seen_c = "", ""
        for end in [*cuts, len(text)]:
            r, c = split_reasoning(text[:end], opened, final=False)
            assert (r or "").startswith(seen_r) and c.startswith(seen_c), (text[:end], r, c)
            seen_r, seen_c = r or "", c
        r, c = split_reasoning(text, opened, final=True)
        assert (r or "").startswith(seen_r) and c.startswith(seen_c)
        assert (r, c) == (reasoning, content)


def test_which_templates_reason_and_which_prompts_open_the_block() -> None:
    assert template_reasons("{{ content.split('</think>')[-1] }}") and not template_reasons("{{ messages }}")
    assert not template_reasons(None)
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking switched off


# --- a real server ----------------------------------------------------------------------------------

# The tiny model's template, with a Qwen3/DeepSeek-R1-style generation prompt: `open_think` (a template
# kwarg) starts the answer inside the block, as DeepSeek-R1's template does.
ANSWER = r"<think>\n[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n[A-Z][a-z]{2,8}\."
OPENED = r"[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n[A-Z][a-z]{2,8}\."


@pytest.fixture(scope="module")
def reasoner(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reasoner") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template: str = config["chat_template"]
    # writes </think> (as Qwen3's does when it drops old thinking), and opens the block when asked
    config["chat_template"] = (
        "{%- set ns = namespace(drop='</think>') %}" + template
        + "{%- if add_generation_prompt and open_think is defined and open_think %}{{- '<think>\\n' }}{%- endif %}"
    )  # fmt: skip
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reasoning_server(reasoner: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(["--model", str(reasoner), "--served-model-name", "reasoner"],
                       tmp_path_factory.mktemp("reasoner-data"))  # fmt: skip
    yield srv
    stop_server(srv)


def _client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)


def _body(regex: str, **kw: Any) -> dict[str, Any]:
    return {"cache_salt": uuid.uuid4().hex, "guided_regex": regex, **kw}


@pytest.mark.parametrize(("regex", "kwargs"), [(ANSWER, {}), (OPENED, {"open_think": True})])
def test_chat_gives_the_think_block_as_reasoning_content_whole_and_streamed(
    reasoning_server: ServerProcess, regex: str, kwargs: dict[str, Any]
) -> None:
    client = _client(reasoning_server)
    kw: dict[str, Any] = dict(model="reasoner", messages=[{"role": "user", "content": "Think, then answer."}],
                              max_tokens=80, temperature=0,
                              extra_body=_body(regex, chat_template_kwargs=kwargs))  # fmt: skip
    whole = client.chat.completions.create(**kw)
    ChatCompletion.model_validate(whole.to_dict())
    assert whole.choices[0].finish_reason == "stop"
    message = whole.choices[0].message
    reasoning = (message.model_extra or {})["reasoning_content"]
    assert reasoning.strip() and "think>" not in reasoning
    assert message.content is not None and message.content[0].isupper() and message.content.endswith(".")
    assert "think>" not in message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed_r = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    streamed_c = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (streamed_r, streamed_c) == (reasoning, message.content)


def test_responses_put_the_reasoning_in_its_own_item_before_the_message(reasoning_server: ServerProcess) -> None:
    client = _client(reasoning_server)
    kw: dict[str, Any] = dict(model="reasoner", input="Think, then answer.", max_output_tokens=80, temperature=0,
                              extra_body=_body(ANSWER))  # fmt: skip
    whole = client.responses.create(**kw)
    Response.model_validate(whole.to_dict())
    assert [item.type for item in whole.output] == ["reasoning", "message"] and whole.status == "completed"
    thought = whole.output[0].content[0].text  # type: ignore[union-attr,index]
    assert thought.strip() and "think>" not in thought and whole.output_text[0].isupper()
    events = list(client.responses.create(**kw, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    assert streamed == thought
    done = [e.item for e in events if e.type == "response.output_item.done"]  # type: ignore[union-attr]
    assert [i.type for i in done] == ["reasoning", "message"]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == whole.output_text and final.output[0].content[0].text == thought


def test_with_the_parser_off_the_block_stays_in_the_content(reasoner: Path, tmp_path: Path) -> None:
    srv = start_server(["--model", str(reasoner), "--served-model-name", "reasoner", "--reasoning-parser", "none"],
                       tmp_path / "data")  # fmt: skip
    try:
        r = _client(srv).chat.completions.create(model="reasoner", messages=[{"role": "user", "content": "Go."}],
                                                 max_tokens=80, temperature=0, extra_body=_body(ANSWER))  # fmt: skip
        content = r.choices[0].message.content or ""
        assert content.startswith("<think>\n") and "</think>" in content
        assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    finally:
        stop_server(srv)


def test_a_structured_answer_is_the_content_even_after_a_prompt_that_opens_the_block(
    reasoning_server: ServerProcess,
) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    r = _client(reasoning_server).chat.completions.create(
        model="reasoner", messages=[{"role": "user", "content": "JSON."}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        extra_body={"cache_salt": uuid.uuid4().hex, "chat_template_kwargs": {"open_think": True}},
    )  # fmt: skip
    assert json.loads(r.choices[0].message.content or "") in ({"ok": True}, {"ok": False})
    assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")


def test_tools_offered_leave_a_block_the_prompt_opened_to_the_reasoning(
    reasoner: Path, tmp_path: Path, tokenizer: Any
) -> None:
    # Calls written as bare JSON (no markers in the template): their guidance waits for the answer to
    # begin a call, so the text of a block the prompt opened is still reasoning.
    folder = tmp_path / "bare-reasoner"
    shutil.copytree(reasoner, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = config["chat_template"].replace("</tool_call>", "").replace("<tool_call>", "")
    config_path.write_text(json.dumps(config))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    braces = {str(t): -100 for t in range(tokenizer.vocab_size) if tokenizer.decode([t]).lstrip().startswith("{")}
    srv = start_server(["--model", str(folder), "--served-model-name", "reasoner"], tmp_path / "data")
    try:
        r = _client(srv).chat.completions.create(
            model="reasoner", messages=[{"role": "user", "content": "Go."}], tools=[tool], max_tokens=12,  # type: ignore[list-item]
            temperature=0, logit_bias=braces,
            extra_body={"cache_salt": uuid.uuid4().hex, "chat_template_kwargs": {"open_think": True}},
        )  # fmt: skip
    finally:
        stop_server(srv)
    message = r.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content") and not message.content, message
