"""Presence, frequency and repetition penalties and logit_bias against their definitions (and
transformers' repetition penalty), on fresh random logits; the engine's greedy tokens under them
against transformers' generation on the same weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine, generate_blocking
from cacheproxy.engine.penalties import PenaltyState
from cacheproxy.engine.request import EngineError, GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model

VOCAB = 500


def _reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The definitions, token by token in float64."""
    row = logits.double().clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in p.logit_bias.items():
        row[t] += b
    return row


CASES = {
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=-0.7),
    "repetition": SamplingParams(repetition_penalty=1.3),
    "bias": SamplingParams(logit_bias={3: 100.0, 7: -42.5}),
    "all": SamplingParams(presence_penalty=0.4, frequency_penalty=0.9, repetition_penalty=0.8, logit_bias={11: 5.0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_step_adjusts_the_logits_as_the_definitions_say(name: str) -> None:
    p = CASES[name]
    rng = random.Random(name)
    prompt = [rng.randrange(VOCAB) for _ in range(60)]
    output: list[int] = []
    state = PenaltyState.new(p, prompt, VOCAB, torch.device("cpu"))
    for step in range(12):  # counts grow a few tokens at a time, repeats included
        output += [rng.choice(prompt[:5] + output[:3] or [1]) for _ in range(1 + step % 3)]
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(step)) * 4
        want = _reference(logits, p, prompt, output)
        state.update(output)
        got = logits.clone()
        state.apply(got, p)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_repetition_penalty_equals_transformers_processor() -> None:
    transformers = pytest.importorskip("transformers")
    p = SamplingParams(repetition_penalty=1.7)
    ids = [int(t) for t in torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(1))]
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    state = PenaltyState.new(p, ids[:50], VOCAB, torch.device("cpu"))
    state.update(ids[50:])
    ours = logits.clone()
    state.apply(ours, p)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([ids]), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "bad",
    [{"presence_penalty": 2.5}, {"frequency_penalty": -3.0}, {"repetition_penalty": 0.0},
     {"logit_bias": {5: 101.0}}, {"logit_bias": {-1: 1.0}}],
)  # fmt: skip
def test_out_of_range_values_are_refused(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(EngineError):
        SamplingParams(**bad).validate()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pen") / "llama", "llama", seed=7, init_std=0.15)


def _engine(path: Path, tmp: Path) -> LLMEngine:
    return LLMEngine.from_settings(
        Settings(model=str(path), data_dir=tmp, num_kv_blocks=256, cpu_cache_bytes=0, disk_cache_enabled=False)
    )


def _greedy(**kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_greedy_tokens_with_a_repetition_penalty_equal_transformers_generate(model: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    engine = _engine(model, tmp_path)
    prompt = [random.Random(3).randrange(5, 2000) for _ in range(30)]
    got = generate_blocking(engine, [GenerationRequest("r", prompt, _greedy(repetition_penalty=1.8))])["r"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, repetition_penalty=1.8)  # fmt: skip
    assert got == out[0, len(prompt) :].tolist()
    plain = generate_blocking(engine, [GenerationRequest("p", prompt, _greedy())])["p"]
    assert plain != got  # the penalty changed what the model says here


def test_greedy_tokens_with_presence_and_frequency_penalties_follow_the_definition(
    model: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    engine = _engine(model, tmp_path)
    prompt = [random.Random(4).randrange(5, 2000) for _ in range(20)]
    p = _greedy(presence_penalty=1.0, frequency_penalty=1.5)
    got = generate_blocking(engine, [GenerationRequest("r", prompt, p)])["r"]
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(24):
            row = _reference(hf(torch.tensor([ids])).logits[0, -1].float(), p, prompt, want)
            want.append(int(row.argmax()))
            ids.append(want[-1])
    assert got == want


def test_a_large_logit_bias_forces_its_token(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path)
    prompt = [random.Random(5).randrange(5, 2000) for _ in range(10)]
    out = generate_blocking(engine, [
        GenerationRequest("b", prompt, _greedy(logit_bias={1234: 100.0})),
        GenerationRequest("s", prompt, SamplingParams(max_tokens=8, seed=1, ignore_eos=True, logit_bias={77: 100.0})),
        GenerationRequest("n", prompt, _greedy()),  # shares the batch: untouched by the others' bias
    ])  # fmt: skip
    assert out["b"] == [1234] * 24 and out["s"] == [77] * 8
    assert out["n"] == generate_blocking(engine, [GenerationRequest("alone", prompt, _greedy())])["alone"]


def test_min_tokens_keeps_end_of_text_and_stop_ids_from_being_drawn_until_then(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path)
    eos = sorted(engine.eos_ids)
    prompt = [random.Random(6).randrange(5, 2000) for _ in range(10)]
    # the bias makes an end-of-text token the model's first choice at every step
    push = {t: 100.0 for t in eos} | {99: 90.0}
    reqs = [
        GenerationRequest("min", prompt, SamplingParams(max_tokens=20, temperature=0.0, min_tokens=5, logit_bias=push)),
        GenerationRequest("none", prompt, SamplingParams(max_tokens=20, temperature=0.0, logit_bias=push)),
        GenerationRequest("stop-id", prompt, SamplingParams(max_tokens=20, temperature=0.0, min_tokens=3,
                                                            stop_token_ids=[99], ignore_eos=True, logit_bias={99: 100.0})),
    ]  # fmt: skip
    out = generate_blocking(engine, reqs)
    # the generated ids end with the token that stopped the text
    assert out["min"][:5] == [99] * 5 and len(out["min"]) == 6 and out["min"][5] in eos  # 99: the next best
    assert len(out["none"]) == 1 and out["none"][0] in eos  # without min_tokens the first token ends it
    assert 99 not in out["stop-id"][:3] and out["stop-id"][3:] == [99]
