"""Structured outputs in the engine: every answer matches its JSON schema, regex, choice or grammar,
the greedy path is the model's best token among those the constraint allows (checked against
transformers and a brute-force walk of the vocabulary), and other rows of the batch are untouched."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine, generate_blocking
from cacheproxy.engine.request import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
)
from cacheproxy.engine.tiny_model import make_tiny_model

# Bounded everywhere (string lengths, item counts, integer range), so random weights finish the text.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("so") / "llama", "llama", seed=11, init_std=0.15)


@pytest.fixture(scope="module")
def engine(model: Path, tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    return LLMEngine.from_settings(
        Settings(model=str(model), data_dir=tmp_path_factory.mktemp("so-data"), num_kv_blocks=512,
                 cpu_cache_bytes=0, disk_cache_enabled=False)
    )


def _run(engine: LLMEngine, reqs: list[GenerationRequest]) -> dict[str, tuple[str, list[int], str | None]]:
    """request id -> (text, token ids, finish reason)."""
    for r in reqs:
        engine.add_request(r)
    text: dict[str, str] = {r.request_id: "" for r in reqs}
    ids: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    finish: dict[str, str | None] = {}
    for _ in range(10_000):
        if len(finish) == len(reqs):
            break
        out: GenerationOutput
        for out in engine.step():
            text[out.request_id] += out.text
            ids[out.request_id] += out.token_ids
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
    return {k: (text[k], ids[k], finish.get(k)) for k in text}


def _prompt(seed: int, n: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 2000) for _ in range(n)]


def test_sampled_answers_match_their_json_schema_for_every_seed(engine: LLMEngine) -> None:
    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    engine.check_structured(spec)
    reqs = [GenerationRequest(f"s{i}", _prompt(i), SamplingParams(max_tokens=300, temperature=1.0, seed=i,
                                                                  structured=spec)) for i in range(8)]  # fmt: skip
    for text, _, finish in _run(engine, reqs).values():
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
        assert ": " in text and "\n" not in text  # the fixed layout: no free whitespace


def test_json_object_regex_choice_and_grammar_each_hold(engine: LLMEngine) -> None:
    lark = 'start: expr\nexpr: term (("+" | "-") term){0,3}\nterm: /[1-9][0-9]{0,2}/ | "(" expr ")"\n'
    gbnf = 'root ::= "ok" | "fail" ("," [a-z]{1,3})?'
    cases = {
        "object": (StructuredOutput("json_schema", '{"type": "object", "properties": {"k": {"type": "integer"}}, '
                                                   '"required": ["k"], "additionalProperties": false}'),
                   lambda t: isinstance(json.loads(t), dict) and isinstance(json.loads(t)["k"], int)),
        "regex": (StructuredOutput("regex", r"[A-Z]{2}-\d{3}(x|yz)?"),
                  lambda t: re.fullmatch(r"[A-Z]{2}-\d{3}(x|yz)?", t) is not None),
        "choice": (StructuredOutput("choice", json.dumps(["red wine", "red", "blue", "green tea"])),
                   lambda t: t in ("red wine", "red", "blue", "green tea")),
        "lark": (StructuredOutput("grammar", lark),
                 lambda t: re.fullmatch(r"[0-9+\-()]+", t) is not None and t.count("(") == t.count(")")),
        "gbnf": (StructuredOutput("grammar", gbnf), lambda t: re.fullmatch(r"ok|fail(,[a-z]{1,3})?", t) is not None),
    }  # fmt: skip
    reqs = []
    for name, (spec, _) in cases.items():
        for seed in range(3):
            params = SamplingParams(max_tokens=120, temperature=1.0 if seed else 0.0, seed=seed, structured=spec)
            reqs.append(GenerationRequest(f"{name}-{seed}", _prompt(100 + seed), params))
    results = _run(engine, reqs)
    for rid, (text, _, finish) in results.items():
        check = cases[rid.rsplit("-", 1)[0]][1]
        assert check(text), (rid, text, finish)


def test_greedy_choice_is_the_models_best_allowed_token_at_every_step(engine: LLMEngine, model: Path) -> None:
    """The oracle: transformers' logits on the same weights, masked by llguidance's own bitmask (read
    here with numpy, apart from the engine's unpacking), and every allowed token checked against the
    choices by hand. The grammar engine may allow fewer tokens than could continue a choice (once the
    rest is forced it keeps to the tokenizer's own split of it), never a token that cannot."""
    transformers = pytest.importorskip("transformers")
    llguidance = pytest.importorskip("llguidance")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    choices = ["Paris in spring", "Parma", "Lisbon", "London bridge", "Lima"]
    tok = engine.tokenizer
    vocab = hf.config.vocab_size
    pieces = {t: tok.decode([t], skip_special_tokens=False) for t in range(vocab)}
    llg_tok = llguidance.LLTokenizer(tok.to_json(), n_vocab=vocab, eos_token=sorted(engine.eos_ids))
    grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    spec = StructuredOutput("choice", json.dumps(choices))
    for seed in range(4):
        prompt = _prompt(200 + seed, 20)
        got_text, got_ids, finish = _run(engine, [GenerationRequest(
            f"c{seed}", prompt, SamplingParams(max_tokens=40, temperature=0.0, structured=spec))])[f"c{seed}"]  # fmt: skip
        matcher = llguidance.LLMatcher(llg_tok, grammar)
        ids, text, want = list(prompt), "", []
        while text not in choices:
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = [int(t) for t in np.nonzero(bits[:vocab])[0]]
            assert allowed and all(any(c.startswith(text + pieces[t]) for c in choices) for t in allowed)
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0, -1]
            best = max(allowed, key=lambda t: float(logits[t]))
            assert matcher.consume_token(best)
            want.append(best)
            ids.append(best)
            text += pieces[best]
        assert got_ids == want and got_text == text and finish == "stop"


def test_rows_without_a_constraint_are_untouched_by_their_batch(engine: LLMEngine) -> None:
    prompt = _prompt(300)
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = generate_blocking(engine, [GenerationRequest("alone", prompt, plain)])["alone"]
    mixed = _run(engine, [
        GenerationRequest("j", _prompt(301), SamplingParams(max_tokens=60, temperature=0.0,
                                                            structured=StructuredOutput("json_schema", json.dumps(PERSON)))),
        GenerationRequest("plain", prompt, plain),
        GenerationRequest("r", _prompt(302), SamplingParams(max_tokens=20, temperature=0.0,
                                                            structured=StructuredOutput("regex", "[a-c]{5}"))),
    ])  # fmt: skip
    assert mixed["plain"][1] == alone
    assert re.fullmatch("[a-c]{5}", mixed["r"][0])


def test_a_constraint_cut_short_by_max_tokens_ends_with_length(engine: LLMEngine) -> None:
    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    text, ids, finish = _run(engine, [GenerationRequest("short", _prompt(400), SamplingParams(
        max_tokens=5, temperature=0.0, structured=spec))])["short"]  # fmt: skip
    assert finish == "length" and len(ids) == 5 and text.startswith("{")


@pytest.mark.parametrize(
    "spec",
    [StructuredOutput("json_schema", '{"type": "foo"}'), StructuredOutput("json_schema", "not json"),
     StructuredOutput("regex", "(unclosed"), StructuredOutput("choice", "[]"), StructuredOutput("choice", '"x"'),
     StructuredOutput("grammar", "start: missing_rule\n"), StructuredOutput("lark", "start: %json{")],
)  # fmt: skip
def test_a_constraint_that_does_not_compile_is_refused_and_the_engine_goes_on(engine: LLMEngine,
                                                                             spec: StructuredOutput) -> None:
    with pytest.raises(EngineError, match="invalid"):
        engine.check_structured(spec)
    out = generate_blocking(engine, [GenerationRequest("after", _prompt(5), SamplingParams(max_tokens=3, temperature=0))])
    assert len(out["after"]) >= 1


def test_a_constraint_after_a_token_starts_where_the_model_writes_it(engine: LLMEngine) -> None:
    trigger = engine.tokenizer.token_to_id("<tool_call>")
    assert trigger is not None
    spec = StructuredOutput("regex", "[a-c]{5}", after_token=trigger)
    engine.check_structured(spec)
    runs = {}
    for name, bias, structured in [("opened", 100.0, spec), ("free", -100.0, spec), ("plain", -100.0, None)]:
        params = SamplingParams(max_tokens=30, temperature=1.0, seed=9, logit_bias={trigger: bias},
                                structured=structured)  # fmt: skip
        runs[name] = _run(engine, [GenerationRequest(name, _prompt(500), params)])[name]
    text, ids, finish = runs["opened"]
    assert ids[0] == trigger and finish == "stop" and re.fullmatch("<tool_call>[a-c]{5}", text), text
    # never opened: the same tokens as with no constraint at all
    assert runs["free"][1] == runs["plain"][1] and trigger not in runs["free"][1]


def test_a_tentative_constraint_holds_only_once_the_model_begins_it(engine: LLMEngine) -> None:
    spec = StructuredOutput("lark", 'start: BLANK? "{" /[a-c]{3}/ "}"\nBLANK: /[ \\n]+/\n', tentative=True)
    engine.check_structured(spec)
    vocab = engine.tokenizer.vocab_size
    braces = [t for t in range(vocab) if engine.tokenizer.decode([t]).lstrip().startswith("{")]
    brace = engine.tokenizer.token_to_id("{")
    assert brace in braces
    seen = []
    for seed in range(3):
        begun = SamplingParams(max_tokens=30, temperature=1.0, seed=seed, logit_bias={brace: 100.0}, structured=spec)
        text, _, finish = _run(engine, [GenerationRequest(f"b{seed}", _prompt(600 + seed), begun)])[f"b{seed}"]
        assert finish == "stop" and re.fullmatch(r"\{[a-c]{3}\}", text), text
        # no token of the vocabulary that would begin it: the text is what it is with no constraint
        never = dict.fromkeys(braces, -100.0)
        free, plain = (SamplingParams(max_tokens=20, temperature=1.0, seed=seed, logit_bias=never, structured=s)
                       for s in (spec, None))  # fmt: skip
        runs = _run(engine, [GenerationRequest(f"f{seed}", _prompt(700 + seed), free),
                             GenerationRequest(f"p{seed}", _prompt(700 + seed), plain)])  # fmt: skip
        assert runs[f"f{seed}"][1] == runs[f"p{seed}"][1]
        seen.append(runs[f"f{seed}"][0])
    assert all(seen)


def test_a_vocabulary_the_grammar_engine_cannot_read_is_tried_once_and_refused_by_name() -> None:
    from cacheproxy.engine.grammar import GrammarCompiler

    reads = []

    def broken() -> str:
        reads.append(1)
        return '{"model": {"type": "NoSuchModel"}}'

    compiler = GrammarCompiler(broken, 100, [0])
    assert compiler.warm() is False
    for _ in range(2):
        with pytest.raises(EngineError, match="not available for this tokenizer") as err:
            compiler.check(StructuredOutput("regex", "a+"))
        assert err.value.code == "unsupported_value"
    assert len(reads) == 1


def test_a_compiled_constraint_is_shared_within_its_scope_only(engine: LLMEngine) -> None:
    # the route scopes a request's constraint by its prefix-cache namespace: a tenant's first request with
    # a schema pays the compile whatever other tenants sent, so its time tells nothing about them
    schema = json.dumps({"type": "object", "properties": {"scoped": {"type": "integer"}}})
    mine, theirs = (StructuredOutput("json_schema", schema, scope=s) for s in ("tenant-a", "tenant-b"))
    engine.check_structured(mine)
    assert engine.structured_compiled(mine) and not engine.structured_compiled(theirs)
    assert engine.structured_compiled(StructuredOutput("json_schema", schema, scope="tenant-a"))


def test_a_constraint_the_grammar_engine_chokes_on_is_refused_in_a_short_message(engine: LLMEngine) -> None:
    # 70,000 choices overflow the grammar engine's symbol table: its panic becomes one bounded line
    spec = StructuredOutput("choice", json.dumps([f"c{i}" for i in range(70_000)]))
    with pytest.raises(EngineError) as err:
        engine.check_structured(spec)
    message = str(err.value)
    assert message.startswith("invalid choice") and "backtrace" not in message and len(message) < 700, message
