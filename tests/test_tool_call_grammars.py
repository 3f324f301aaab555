"""The grammars behind forced tool calls and JSON formats next to tools, in each call format: random
walks through what they allow (any allowed token, drawn at random, until the grammar is complete) always
parse back as calls whose arguments match their tool's schema, or as content matching the format."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest

from cacheproxy.engine.grammar import GrammarCompiler
from cacheproxy.engine.request import StructuredOutput
from cacheproxy.engine.tiny_model import make_tiny_model
from cacheproxy.engine.tokenizer import Tokenizer
from cacheproxy.server.tool_calls import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARK,
    auto_call_grammar,
    content_or_call_grammar,
    forced_call_grammar,
    forced_call_prefix,
    parse_tool_calls,
)

TOOLS: dict[str, dict | None] = {  # type: ignore[type-arg]
    "move": {"type": "object", "properties": {"dx": {"type": "integer", "minimum": -9, "maximum": 9},
                                              "fast": {"type": "boolean"}},
             "required": ["dx", "fast"], "additionalProperties": False},
    "say": {"type": "object", "properties": {"word": {"enum": ["hi", "bye"]}}, "required": ["word"],
            "additionalProperties": False},
}  # fmt: skip
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
          "maximum": 99}}, "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = make_tiny_model(tmp_path_factory.mktemp("tc") / "m", "llama", weights=False)
    return Tokenizer(folder)


def _walk(tok: Tokenizer, spec: StructuredOutput, seed: int) -> str:
    compiler = GrammarCompiler(tok.to_json, tok.vocab_size, tok.eos_token_ids)
    compiler.check(spec)
    matcher = compiler.matcher(spec)
    rng = random.Random(seed)
    ids: list[int] = []
    for _ in range(400):
        if matcher.done:
            return tok.decode(ids)
        row = np.zeros(compiler.mask_words, dtype=np.int32)
        matcher.fill_mask(row)
        allowed = np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0]
        ends = [int(t) for t in allowed if t in tok.eos_token_ids]
        others = [int(t) for t in allowed if t not in tok.eos_token_ids]
        # where the text may end (after a call, more calls may follow), end it half of the time
        token = rng.choice(ends) if ends and (not others or rng.random() < 0.5) else rng.choice(others)
        assert matcher.accept(token)
        ids.append(token)
    raise AssertionError(f"the grammar did not complete: {tok.decode(ids)!r}")


def _check_calls(calls: list[dict], names: set[str]) -> None:  # type: ignore[type-arg]
    assert calls
    for call in calls:
        name = call["function"]["name"]
        assert name in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[name])


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "json"])
@pytest.mark.parametrize("name", [None, "move", "say"])
def test_a_forced_call_always_parses_as_a_call_to_an_allowed_tool(tokenizer: Tokenizer, fmt: str,
                                                                  name: str | None) -> None:
    for seed in range(6):
        text = forced_call_prefix(fmt, name) + _walk(tokenizer, forced_call_grammar(fmt, TOOLS, name), seed)
        content, calls = parse_tool_calls(text, fmt)
        assert content is None and len(calls) == 1, text
        _check_calls(calls, {name} if name else set(TOOLS))


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "json"])
@pytest.mark.parametrize("parallel", [True, False])
def test_a_json_format_next_to_tools_gives_valid_content_or_valid_calls(tokenizer: Tokenizer, fmt: str,
                                                                        parallel: bool) -> None:
    markers = {m: t for m in (HERMES_OPEN, HERMES_CLOSE) if (t := tokenizer.token_to_id(m)) is not None}
    assert markers  # the tiny vocabulary has the Hermes markers as added tokens: matched by id
    spec = content_or_call_grammar(fmt, StructuredOutput("json_schema", json.dumps(ANSWER)), TOOLS, markers, parallel)
    seen = set()
    for seed in range(16):
        text = _walk(tokenizer, spec, seed)
        _, calls = parse_tool_calls(text, fmt)
        if calls:
            seen.add("calls")
            _check_calls(calls, set(TOOLS))
            assert parallel or len(calls) == 1
        else:
            seen.add("content")
            jsonschema.validate(json.loads(text), ANSWER)
    assert seen == {"calls", "content"}  # a uniform walk takes each branch within 16 draws


def test_a_json_format_with_definitions_next_to_tools_keeps_its_references(tokenizer: Tokenizer) -> None:
    schema = {"$defs": {"flag": {"type": "boolean"}}, "type": "object", "properties": {"on": {"$ref": "#/$defs/flag"}},
              "required": ["on"], "additionalProperties": False}  # fmt: skip
    spec = content_or_call_grammar("json", StructuredOutput("json_schema", json.dumps(schema)), TOOLS, {})
    texts = [_walk(tokenizer, spec, seed) for seed in range(12)]
    answers = [t for t in texts if not parse_tool_calls(t, "json")[1]]
    assert answers and all(isinstance(json.loads(t)["on"], bool) for t in answers)


def test_other_constraints_next_to_tools_are_kept_as_they_are(tokenizer: Tokenizer) -> None:
    regex = StructuredOutput("regex", "[a-z]+")
    assert content_or_call_grammar("hermes", regex, TOOLS, {}) is regex


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "json"])
@pytest.mark.parametrize("parallel", [True, False])
def test_calls_the_model_opens_parse_as_calls_to_offered_tools(tokenizer: Tokenizer, fmt: str, parallel: bool) -> None:
    opener = tokenizer.token_to_id(HERMES_OPEN)
    assert opener is not None
    # the tiny vocabulary has no [TOOL_CALLS]: any single token stands in for it (the walk starts after it)
    markers = {HERMES_OPEN: opener, HERMES_CLOSE: tokenizer.token_to_id(HERMES_CLOSE)} if fmt == "hermes" \
        else {MISTRAL_MARK: opener}  # fmt: skip
    spec = auto_call_grammar(fmt, TOOLS, frozenset({"move"}), markers, parallel)  # type: ignore[arg-type]
    assert spec is not None
    # Hermes and Mistral: free text, then the marker the constraint waits for; Llama 3's: a call is the
    # whole answer, the constraint taken up once the model begins it
    assert (spec.after_token, spec.tentative) == ((None, True) if fmt == "json" else (opener, False))
    before = {"hermes": "Let me look. " + HERMES_OPEN, "mistral": MISTRAL_MARK, "json": ""}[fmt]
    counts = set()
    for seed in range(12):
        content, calls = parse_tool_calls(before + _walk(tokenizer, spec, seed), fmt)
        _check_calls(calls, set(TOOLS))
        assert content == ("Let me look." if fmt == "hermes" else None)
        counts.add(len(calls))
    assert counts == {1} if not parallel or fmt == "json" else max(counts) > 1


def test_calls_whose_marker_is_not_one_token_are_not_guided(tokenizer: Tokenizer) -> None:
    assert auto_call_grammar("hermes", TOOLS, frozenset(TOOLS), {}) is None  # <tool_call> written as text
    assert auto_call_grammar("mistral", TOOLS, frozenset(TOOLS), {}) is None


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "json"])
def test_function_names_that_need_escaping_in_json_come_back_as_they_were(tokenizer: Tokenizer, fmt: str) -> None:
    odd = {'say "hi"\\now': TOOLS["say"], "naïve.tool": TOOLS["move"]}
    for name in odd:
        text = forced_call_prefix(fmt, name) + _walk(tokenizer, forced_call_grammar(fmt, odd, name), 0)  # type: ignore[arg-type]
        _, calls = parse_tool_calls(text, fmt)
        assert [c["function"]["name"] for c in calls] == [name], text
    names = set()
    for seed in range(8):
        text = forced_call_prefix(fmt, None) + _walk(tokenizer, forced_call_grammar(fmt, odd, None), seed)  # type: ignore[arg-type]
        names.update(c["function"]["name"] for c in parse_tool_calls(text, fmt)[1])
    assert names == set(odd)
