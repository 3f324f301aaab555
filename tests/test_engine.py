"""The engine generates exactly what Hugging Face transformers generates on the same weights."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from cacheproxy.config import Settings
from cacheproxy.engine.async_engine import AsyncEngine
from cacheproxy.engine.engine import LLMEngine, generate_blocking
from cacheproxy.engine.model_config import UnsupportedModel
from cacheproxy.engine.request import EngineError, GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model

transformers = pytest.importorskip("transformers")

# "-biases": the config switches on every bias the family has (Llama, Granite: q/k/v/o and gate/up/down; Qwen3:
# q/k/v/o). Granite's multipliers are all set (none is 1), biases and a tied head included.
ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "granite", "llama-tied", "granite-tied", "llama-biases",
         "qwen3-biases", "granite-biases"]


def _make(root: Path, arch: str) -> Path:
    base, _, variant = arch.partition("-")
    extra: dict[str, object] = {"tie_word_embeddings": True} if variant == "tied" else {}
    if variant == "biases":
        extra = {"attention_bias": True, "mlp_bias": base in ("llama", "granite")}
    # A larger init than a real model's keeps the logits peaked, so greedy choices are not near-ties.
    return make_tiny_model(root / arch, base, seed=7, init_std=0.15, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {a: _make(root, a) for a in ARCHS}


def _engine(path: Path, tmp: Path, **kw: object) -> LLMEngine:
    opts: dict[str, object] = {
        "model": str(path),
        "data_dir": tmp,
        "num_kv_blocks": 256,
        "cpu_cache_bytes": 0,
        "disk_cache_enabled": False,
    }
    opts.update(kw)
    return LLMEngine.from_settings(Settings(**opts))


def _hf(path: Path) -> torch.nn.Module:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # Generate exactly n tokens without masking EOS (min_new_tokens would change the argmax).
    hf.generation_config.eos_token_id = None
    return hf


def _hf_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def _prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    engine = _engine(models[arch], tmp_path)
    hf = _hf(models[arch])
    ids = _prompts(1, [77], engine.config.vocab_size)[0]
    ours = engine.score(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [2048, 16], ids=["unchunked", "chunked"])
def test_32_greedy_tokens_identical_to_transformers(
    models: dict[str, Path], tmp_path: Path, arch: str, chunk: int
) -> None:
    engine = _engine(models[arch], tmp_path, max_num_batched_tokens=chunk)
    hf = _hf(models[arch])
    prompts = _prompts(2, [3, 17, 40, 95], engine.config.vocab_size)
    reqs = [GenerationRequest(f"r{i}", p, _greedy(32)) for i, p in enumerate(prompts)]
    got = generate_blocking(engine, reqs)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == _hf_greedy(hf, p, 32), f"prompt {i} of {len(p)} tokens differs"


def _mixed_requests(vocab: int) -> list[GenerationRequest]:
    rng = random.Random(3)
    prompts = _prompts(4, [rng.randrange(1, 120) for _ in range(16)], vocab)
    reqs = []
    for i, p in enumerate(prompts):
        if i % 3 == 0:  # seeded sampling must not depend on the batch either
            params = SamplingParams(max_tokens=rng.randrange(4, 40), temperature=0.9, top_p=0.9, top_k=50, seed=i)
        else:
            params = SamplingParams(max_tokens=rng.randrange(4, 40), temperature=0.0, ignore_eos=True)
        reqs.append(GenerationRequest(f"m{i}", p, params))
    return reqs


def _copy(r: GenerationRequest, rid: str) -> GenerationRequest:
    p = r.params
    params = SamplingParams(p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, ignore_eos=p.ignore_eos)
    return GenerationRequest(rid, list(r.prompt_token_ids), params)


@pytest.mark.parametrize("pool_blocks", [512, 24], ids=["roomy-pool", "tight-pool"])
def test_16_concurrent_requests_each_get_what_they_get_alone(
    models: dict[str, Path], tmp_path: Path, pool_blocks: int
) -> None:
    # A tight pool forces requests to wait and running ones to be preempted and resumed.
    engine = _engine(models["llama"], tmp_path, num_kv_blocks=pool_blocks, max_num_batched_tokens=64)
    reqs = _mixed_requests(engine.config.vocab_size)
    together = generate_blocking(engine, [_copy(r, r.request_id) for r in reqs])
    alone_engine = _engine(models["llama"], tmp_path, num_kv_blocks=512)
    for r in reqs:
        alone = generate_blocking(alone_engine, [_copy(r, "solo")])["solo"]
        assert together[r.request_id] == alone, r.request_id
        assert len(alone) <= r.params.max_tokens
    assert engine.pool.num_free == engine.pool.num_blocks  # every block released


def test_request_larger_than_the_pool_is_refused_not_crashing(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path, num_kv_blocks=8, max_num_batched_tokens=32)
    with pytest.raises(EngineError) as e:
        engine.add_request(GenerationRequest("big", list(range(5, 200)), _greedy(10)))
    assert e.value.code == "context_length_exceeded"
    too_long = list(range(5, 5 + 4090))
    with pytest.raises(EngineError, match="maximum context length"):
        engine.add_request(GenerationRequest("long", too_long, _greedy(10)))


def test_same_seed_same_text_different_seed_differs(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path)
    prompt = _prompts(5, [20], engine.config.vocab_size)[0]

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        return generate_blocking(engine, [GenerationRequest("s", prompt, params)])["s"]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stop_strings_stop_ids_and_max_tokens(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path)
    tok = engine.tokenizer
    prompt = tok.encode("The quick brown fox")
    free = generate_blocking(engine, [GenerationRequest("a", prompt, _greedy(24))])["a"]
    text = tok.decode(free)
    assert len(free) == 24
    # stop token id: ends right after that token's first occurrence, which is not emitted
    stop_id = free[5]
    first = free.index(stop_id)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
    outs = _collect(engine, GenerationRequest("b", prompt, params))
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop_id
    assert sum(len(o.token_ids) for o in outs) == first + 1
    # stop string: the text ends just before it; it never reaches the client
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    outs = _collect(engine, GenerationRequest("c", prompt, params))
    streamed = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    assert streamed == text[: text.index(stop)]
    # max_tokens: finish "length", and the streamed deltas add up to the full decode
    outs = _collect(engine, GenerationRequest("d", prompt, _greedy(24)))
    assert outs[-1].finish_reason == "length"
    assert "".join(o.text for o in outs) == text


def _collect(engine: LLMEngine, req: GenerationRequest) -> list:  # type: ignore[type-arg]
    engine.add_request(req)
    outs = []
    while engine.has_work():
        outs.extend(o for o in engine.step() if o.request_id == req.request_id)
    return outs


def test_second_prompt_hits_full_blocks_and_output_is_unchanged(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["qwen3"], tmp_path)
    bs = engine.block_size
    prompt = _prompts(6, [100], engine.config.vocab_size)[0]
    cold = _collect(engine, GenerationRequest("cold", prompt, _greedy(20)))
    warm = _collect(engine, GenerationRequest("warm", prompt, _greedy(20)))
    assert cold[0].cached_tokens == 0
    assert warm[0].cached_tokens == (100 - 1) // bs * bs  # the last token is always computed
    assert warm[0].cached_tokens_by_tier == {"gpu": warm[0].cached_tokens}
    assert [t for o in warm for t in o.token_ids] == [t for o in cold for t in o.token_ids]
    # a prompt sharing 40 tokens shares exactly the full blocks inside them
    other = prompt[:40] + _prompts(7, [30], engine.config.vocab_size)[0]
    partial = _collect(engine, GenerationRequest("partial", other, _greedy(4)))
    assert partial[0].cached_tokens == 40 // bs * bs


def test_generated_blocks_are_cached_for_the_next_turn(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path)
    prompt = _prompts(8, [20], engine.config.vocab_size)[0]
    turn1 = [t for o in _collect(engine, GenerationRequest("t1", prompt, _greedy(40))) for t in o.token_ids]
    follow = prompt + turn1 + [9, 10, 11]
    turn2 = _collect(engine, GenerationRequest("t2", follow, _greedy(4)))
    # Every full block of prompt + answer whose K/V was computed is a hit (the last answer token
    # was never fed back, so its block may be incomplete).
    assert turn2[0].cached_tokens == (len(prompt) + len(turn1) - 1) // engine.block_size * engine.block_size


def test_cache_salt_separates_tenants(models: dict[str, Path], tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path)
    prompt = _prompts(9, [64], engine.config.vocab_size)[0]
    _collect(engine, GenerationRequest("a", prompt, _greedy(2), cache_salt="tenant-a"))
    other = _collect(engine, GenerationRequest("b", prompt, _greedy(2), cache_salt="tenant-b"))
    same = _collect(engine, GenerationRequest("c", prompt, _greedy(2), cache_salt="tenant-a"))
    assert other[0].cached_tokens == 0
    assert same[0].cached_tokens == 48


def test_unsupported_architecture_is_named(tmp_path: Path, models: dict[str, Path]) -> None:
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        _engine(bad, tmp_path)


async def test_async_engine_streams_and_cancellation_frees_blocks(models: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(
        model=str(models["llama"]), data_dir=tmp_path, num_kv_blocks=256, cpu_cache_bytes=0, disk_cache_enabled=False
    )
    engine = AsyncEngine(settings)
    await engine.start()
    try:
        prompt = _prompts(10, [30], 2000)[0]
        outs = [o async for o in engine.generate(GenerationRequest("x", prompt, _greedy(12)))]
        assert outs[0].prompt_tokens == 30 and outs[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outs) == 12

        gen = engine.generate(GenerationRequest("y", prompt, _greedy(3000)))
        first = await gen.__anext__()
        assert first.finish_reason is None
        await gen.aclose()  # the client went away
        for _ in range(100):
            stats = engine.stats()
            if stats["requests"]["running"] == 0 and stats["tiers"]["gpu"]["active_bytes"] == 0:
                break
            await asyncio.sleep(0.05)
        assert stats["requests"] == {"running": 0, "waiting": 0}
        assert stats["tiers"]["gpu"]["active_bytes"] == 0

        with pytest.raises(EngineError) as e:
            async for _ in engine.generate(GenerationRequest("z", prompt, _greedy(5000))):
                pass
        assert e.value.code == "context_length_exceeded"
    finally:
        await engine.shutdown()


async def test_a_request_that_breaks_inside_the_engine_fails_alone(models: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(
        model=str(models["llama"]), data_dir=tmp_path, num_kv_blocks=64, cpu_cache_bytes=0, disk_cache_enabled=False
    )
    engine = AsyncEngine(settings)
    await engine.start()
    try:
        real = engine._engine.hasher.hash_blocks  # type: ignore[union-attr]

        def broken(ids, salt="", parent=None):  # type: ignore[no-untyped-def]
            if len(ids) == 33:
                raise RuntimeError("boom")
            return real(ids, salt, parent)

        engine._engine.hasher.hash_blocks = broken  # type: ignore[union-attr, method-assign]
        with pytest.raises(EngineError, match="boom"):
            async for _ in engine.generate(GenerationRequest("bad", list(range(5, 38)), _greedy(4))):
                pass
        outs = [o async for o in engine.generate(GenerationRequest("good", list(range(5, 25)), _greedy(4)))]
        assert outs[-1].finish_reason == "length"  # the engine thread is still serving
    finally:
        await engine.shutdown()


def test_dummy_weights_serve_a_config_without_safetensors(tmp_path: Path, models: dict[str, Path]) -> None:
    import shutil

    shape_only = tmp_path / "shape-only"
    shutil.copytree(models["llama"], shape_only, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(UnsupportedModel, match="safetensors"):
        _engine(shape_only, tmp_path)
    a = _engine(shape_only, tmp_path, load_format="dummy", seed=1)
    b = _engine(shape_only, tmp_path, load_format="dummy", seed=1)
    real = _engine(models["llama"], tmp_path)
    ids = _prompts(12, [40], 2000)[0]
    out_a = generate_blocking(a, [GenerationRequest("a", ids, _greedy(8))])["a"]
    assert out_a == generate_blocking(b, [GenerationRequest("b", ids, _greedy(8))])["b"]  # same seed, same weights
    # random weights never share a cache namespace with the real checkpoint of the same config
    assert a.namespace.digest != real.namespace.digest
    assert a.namespace.digest == b.namespace.digest


def test_eager_prefill_steps_tell_attention_their_real_bounds(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each prefill step passes the most new and the most cached tokens of its chunks (host ints the
    GPU kernels size their launch from: a cold step takes the causal kernel only with max_cached_len 0)."""
    import kernels

    seen: list[tuple[int | None, int | None]] = []
    real = kernels.prefix_prefill

    def spy(*args, max_query_len=None, max_cached_len=None, **kw):  # type: ignore[no-untyped-def]
        seen.append((max_query_len, max_cached_len))
        return real(*args, max_query_len=max_query_len, max_cached_len=max_cached_len, **kw)

    monkeypatch.setattr(kernels, "prefix_prefill", spy)
    engine = _engine(models["llama"], tmp_path, max_num_batched_tokens=64)
    seen.clear()  # start-up's own passes (the cost model's timing prefills)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rng = random.Random(5)
    prompt = [rng.randrange(5, 200) for _ in range(150)]
    generate_blocking(engine, [GenerationRequest("long", prompt, params)])
    layers = engine.config.num_hidden_layers
    per_step = seen[::layers]
    assert seen == [b for b in per_step for _ in range(layers)]  # every layer of a step sees the same bounds
    assert per_step == [(64, 0), (64, 64), (22, 128)]  # chunks of 64 tokens: cold, then after 64 and 128 cached


def test_a_sequences_int32_block_table_follows_every_change_of_its_list() -> None:
    from cacheproxy.engine.sequence import Sequence

    rng = random.Random(5)
    seq = Sequence("r", [1, 2, 3], SamplingParams(), bytes(16))
    assert seq.block_table_array().tolist() == []
    for _ in range(300):
        change = rng.choice(["extend", "extend", "set", "new", "shrink"])
        if change == "extend":
            seq.block_table.extend(rng.randrange(10**6) for _ in range(rng.randrange(1, 40)))
        elif change == "set" and seq.block_table:
            seq.set_block(rng.randrange(len(seq.block_table)), rng.randrange(10**6))
        elif change == "new":
            seq.block_table = [rng.randrange(10**6) for _ in range(rng.randrange(0, 50))]
        elif change == "shrink":
            del seq.block_table[rng.randrange(len(seq.block_table) + 1) :]
        got = seq.block_table_array()
        assert got.dtype.name == "int32" and got.tolist() == seq.block_table, change


def _with_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    """A copy of the model folder whose weights file also holds `extra`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    save_file({**weights, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_checkpoint_tensor_the_model_has_no_place_for_is_refused_by_name(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    # e.g. a bias the config does not switch on: skipping it would serve different outputs
    odd = _with_tensors(models["llama"], tmp_path / "odd", {"model.layers.1.mlp.down_proj.bias": torch.ones(64)})
    with pytest.raises(UnsupportedModel, match=r"does not use: model\.layers\.1\.mlp\.down_proj\.bias"):
        _engine(odd, tmp_path / "data")


def test_extra_tensors_of_a_checkpoint_are_read_as_transformers_reads_them(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    # old checkpoints' rotary buffers (ignored), and a "tied" model's file that holds a head of its own
    # (transformers then keeps the head apart from the embedding)
    extra = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "lm_head.weight": torch.randn(2048, 64, generator=torch.Generator().manual_seed(5)),
    }
    folder = _with_tensors(models["llama-tied"], tmp_path / "extra", extra)
    engine, hf = _engine(folder, tmp_path / "data"), _hf(folder)
    ids = _prompts(4, [40], engine.config.vocab_size)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine.score(ids), ref, atol=2e-4, rtol=1e-4)


def test_a_tied_checkpoint_that_also_stores_the_same_head_stays_tied(tmp_path: Path, models: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    embedding = load_file(str(models["llama-tied"] / "model.safetensors"))["model.embed_tokens.weight"]
    folder = _with_tensors(models["llama-tied"], tmp_path / "same", {"lm_head.weight": embedding.clone()})
    model = _engine(folder, tmp_path / "data").model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # one copy in memory


def _rewritten_config(src: Path, dst: Path, change) -> Path:  # type: ignore[no-untyped-def]
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_rope_parameters_of_transformers_5_configs_are_read(tmp_path: Path, models: dict[str, Path]) -> None:
    # A checkpoint saved with transformers 5 keeps theta and scaling in `rope_parameters` and has no
    # top-level rope_theta; read as the old layout's default (10000), its positions would be wrong.
    def old_layout(cfg: dict) -> None:  # type: ignore[type-arg]
        cfg["rope_theta"] = 500000.0

    def new_layout(cfg: dict) -> None:  # type: ignore[type-arg]
        scaling = cfg.pop("rope_scaling")
        cfg.pop("rope_theta", None)
        cfg["rope_parameters"] = {**scaling, "rope_theta": 500000.0}

    old = _rewritten_config(models["llama3"], tmp_path / "v4", old_layout)
    new = _rewritten_config(models["llama3"], tmp_path / "v5", new_layout)
    ids = _prompts(6, [60], 2048)[0]
    want = _engine(old, tmp_path / "d4").score(ids)
    got = _engine(new, tmp_path / "d5").score(ids)
    assert not torch.allclose(want, _engine(models["llama3"], tmp_path / "d0").score(ids))  # theta matters here
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():
        ref = _hf(new)(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "scaling",
    [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},  # Qwen3's long-context switch
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
      "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}],
)  # fmt: skip
def test_yarn_rope_scaling_matches_transformers(tmp_path: Path, models: dict[str, Path], scaling: dict) -> None:  # type: ignore[type-arg]
    # original lengths far below the prompt's, so interpolated, ramped and kept dimensions all take part
    folder = _rewritten_config(models["qwen3"], tmp_path / "yarn", lambda cfg: cfg.update({"rope_scaling": scaling}))
    engine = _engine(folder, tmp_path / "d")
    ids = _prompts(8, [120], engine.config.vocab_size)[0]
    got = engine.score(ids)
    assert not torch.allclose(got, _engine(models["qwen3"], tmp_path / "d0").score(ids), atol=1e-3)
    with torch.no_grad():
        ref = _hf(folder)(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [("hidden_act", "gelu", "hidden_act"), ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
     ("rope_scaling", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "longrope"),
     ("rope_parameters", {"full_attention": {"rope_theta": 1e4}}, "rope_parameters"),
     ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3")],
)  # fmt: skip
def test_config_switches_the_engine_does_not_implement_are_refused(
    tmp_path: Path, models: dict[str, Path], key: str, value: object, named: str
) -> None:
    folder = _rewritten_config(models["llama"], tmp_path / "odd", lambda cfg: cfg.update({key: value}))
    with pytest.raises(UnsupportedModel, match=named):
        _engine(folder, tmp_path / "data")


def test_a_head_dim_that_is_not_a_power_of_two_runs_on_the_cpu_engine(tmp_path: Path) -> None:
    # e.g. 80 (h2o-danube's): the torch twins take any width; CUDA refuses it by name (tests/gpu)
    model = make_tiny_model(tmp_path / "hd20", "llama", seed=7, init_std=0.15, head_dim=20)
    engine = _engine(model, tmp_path / "data")
    ids = _prompts(7, [50], engine.config.vocab_size)[0]
    with torch.no_grad():
        ref = _hf(model)(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine.score(ids), ref, atol=2e-4, rtol=1e-4)
