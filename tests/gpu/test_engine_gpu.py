"""The engine on CUDA in bf16 (Triton kernels) against Hugging Face transformers on the same weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine, generate_blocking
from cacheproxy.engine.request import GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
transformers = pytest.importorskip("transformers")

# "qwen2-q14kv2": Qwen2.5-0.5B's heads (14 query heads on 2 KV heads, a group of 7; tied embeddings).
# "llama-biases": every bias Llama's config can switch on (q/k/v/o, gate/up/down).
# "qwen3-yarn": YaRN rope scaling from an original context far below the prompts' lengths.
ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "granite", "llama-tied", "qwen2-q14kv2", "llama-biases",
         "qwen3-yarn"]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# A wider model than the CPU tests' so the kernels see real head_dim and GQA shapes.
SHAPE = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "intermediate_size": 1024, "num_hidden_layers": 3}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    out = {}
    for arch in ARCHS:
        base, _, variant = arch.partition("-")
        extra: dict[str, object] = {"tie_word_embeddings": True} if variant == "tied" else {}
        if variant == "biases":
            extra = {"attention_bias": True, "mlp_bias": True}
        if variant == "q14kv2":
            extra = {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64,
                     "tie_word_embeddings": True}  # fmt: skip
        out[arch] = make_tiny_model(root / arch, base, seed=11, init_std=0.05, **{**SHAPE, **extra})
        if variant == "yarn":
            cfg = json.loads((out[arch] / "config.json").read_text())
            (out[arch] / "config.json").write_text(json.dumps({**cfg, "rope_scaling": YARN}))
    return out


def _engine(path: Path, tmp: Path, **kw: object) -> LLMEngine:
    opts: dict[str, object] = {"model": str(path), "data_dir": tmp, "device": "cuda", "dtype": "bfloat16",
                               "num_kv_blocks": 512, "cpu_cache_bytes": 0, "disk_cache_enabled": False}  # fmt: skip
    opts.update(kw)
    return LLMEngine.from_settings(Settings(**opts))


def _hf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_prefill_logits_close_to_transformers(models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    engine = _engine(models[arch], tmp_path)
    hf = _hf(models[arch])
    ids = _prompts(1, [300])[0]
    ours = engine.score(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
        ref64 = _hf_fp64_logits(models[arch], ids)
    # bf16 against bf16: both are within bf16 rounding of the float64 truth, and of each other.
    scale = ref64.abs().max().item()
    assert (ours - ref64).abs().max().item() < 0.05 * scale
    assert (ours - ref).abs().max().item() < 0.05 * scale


def _hf_fp64_logits(path: Path, ids: list[int]) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).cuda().eval()
    with torch.no_grad():
        return m(torch.tensor([ids], device="cuda")).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["unchunked", "chunked", "alone"])
def test_bf16_greedy_tokens_match_transformers(models: dict[str, Path], tmp_path: Path, arch: str, mode: str) -> None:
    """32 greedy tokens per prompt, a batch of lengths (or each prompt alone: its prefill then runs
    from a captured graph). Every token is the reference's argmax, except where the reference's own
    top two are closer than bf16 can tell apart."""
    engine = _engine(models[arch], tmp_path, max_num_batched_tokens=64 if mode == "chunked" else 4096)
    hf = _hf(models[arch])
    prompts = _prompts(2, [5, 37, 130, 700])
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]  # fmt: skip
    if mode == "alone":
        got = {}
        for r in reqs:
            got.update(generate_blocking(engine, [r]))
    else:
        got = generate_blocking(engine, reqs)
    exact = 0
    for i, p in enumerate(prompts):
        seq = p + got[f"r{i}"]
        with torch.no_grad():
            logits = hf(torch.tensor([seq], device="cuda")).logits[0, len(p) - 1 : -1].float()
        for j, tok in enumerate(got[f"r{i}"]):
            best = logits[j].max().item()
            if logits[j].argmax().item() == tok:
                exact += 1
                continue
            assert best - logits[j, tok].item() < 0.02 * max(1.0, abs(best)), (arch, i, j)
            break  # past a near-tie the two continuations legitimately differ
    print(f"{arch}: {exact} tokens exact before the first near-tie, of {32 * len(prompts)}")
    assert exact >= len(prompts)  # each prompt's first token at least (a broken engine fails above)


def test_graph_replayed_prefill_matches_eager(models: dict[str, Path], tmp_path: Path) -> None:
    graphs = _engine(models["qwen3"], tmp_path)
    eager = _engine(models["qwen3"], tmp_path / "eager", cuda_graphs=False)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    for n in (3, 16, 100, 512):
        ids = _prompts(n, [n])[0]
        a, b = graphs.score(ids), eager.score(ids)
        assert (a - b).abs().max().item() < 0.02 * b.abs().max().item(), n


def test_tier_round_trip_on_cuda_with_pinned_cpu_tier(tmp_path: Path) -> None:
    # Peaked logits: the cold prefill and the hits run different kernels (full prefill vs split-K
    # over the cached part), so bf16 rounding differs; near-ties must not decide the comparison.
    model = make_tiny_model(tmp_path / "peaked", "llama", seed=11, init_std=0.15, **SHAPE)
    engine = _engine(model, tmp_path, cpu_cache_bytes=64 << 20, disk_cache_enabled=True,
                     disk_cache_bytes=256 << 20, cost_model=False)  # fmt: skip
    prompt = _prompts(3, [500])[0]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def run(rid: str) -> tuple[list[int], dict[str, int]]:
        engine.add_request(GenerationRequest(rid, prompt, params))
        toks: list[int] = []
        tiers: dict[str, int] = {}
        while engine.has_work():
            for o in engine.step():
                toks += o.token_ids
                tiers = tiers or o.cached_tokens_by_tier
        return toks, tiers

    cold, _ = run("cold")
    gpu, t_gpu = run("gpu")
    assert t_gpu == {"gpu": 496}
    engine.store.evict_gpu()
    cpu, t_cpu = run("cpu")
    assert t_cpu == {"cpu": 496}
    assert engine.store.load_stream is not None  # copies ran on the side stream
    cpu_tier = engine.store.tiers[0]
    assert cpu_tier._slab is not None and cpu_tier._slab.is_pinned()  # type: ignore[attr-defined]
    assert gpu == cpu  # the same KV, bit for bit, whichever tier it came from
    assert cold == gpu
    engine.shutdown()
    again = _engine(model, tmp_path, cpu_cache_bytes=64 << 20, disk_cache_enabled=True,
                    disk_cache_bytes=256 << 20, cost_model=False)  # fmt: skip
    engine = again
    disk, t_disk = run("disk")
    assert t_disk == {"disk": 496}
    assert disk == gpu
    engine.shutdown()


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_prefix_met_in_the_middle_on_cuda(tmp_path: Path, tier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recompute from the front while blocks load from the back on the copy stream: the compute stream
    must wait for the copies (an event) before the tail reads them; the tokens are the GPU hit's."""
    from cacheproxy.cache import cost_model
    from cacheproxy.cache.cost_model import CostModel

    monkeypatch.setattr(cost_model, "SPLIT_MAX_REGRET", 1.0)  # a short prompt, split all the same
    model = make_tiny_model(tmp_path / "peaked", "llama", seed=11, init_std=0.15, **SHAPE)
    # float32: the recomputed front ends in a shorter chunk than the cold run's, so its K/V are not
    # bit-identical to the loaded ones; in bf16 that rounding flipped a greedy token partway through (a
    # split-K tiling change did it), which says nothing about the copies this test is about.
    engine = _engine(model, tmp_path, cpu_cache_bytes=64 << 20, disk_cache_enabled=True, dtype="float32",
                     disk_cache_bytes=256 << 20, cost_model=False, max_num_batched_tokens=128)  # fmt: skip
    prompt = _prompts(4, [1000])[0]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def run(rid: str) -> tuple[list[int], dict[str, int]]:
        engine.add_request(GenerationRequest(rid, prompt, params))
        toks: list[int] = []
        tiers: dict[str, int] | None = None
        while engine.has_work():
            for o in engine.step():
                toks += o.token_ids
                tiers = o.cached_tokens_by_tier if tiers is None else tiers
        return toks, tiers or {}

    run("cold")
    gpu, _ = run("gpu")
    engine.store.evict_gpu()
    if tier == "disk":
        engine.store.flush()
        for h in engine.store.tiers[0].hashes():  # type: ignore[attr-defined]
            engine.store.tiers[0].remove(h)
    blocks = 999 // 16
    # recompute and load at about the same speed: the plan splits the 62 blocks near the middle
    per_block = 1e-3
    engine.store.cost_model = CostModel(16, engine.pool.block_bytes, 16 / per_block, {tier: per_block})
    plan = engine.store.cost_model.plan([tier] * blocks, 1000 - blocks * 16)
    assert plan.recompute > 0 and plan.load > 0
    split, tiers = run("split")
    assert 0 < tiers.get(tier, 0) < blocks * 16 and set(tiers) == {tier}
    assert split == gpu
    again, tiers = run("again")  # every block back in the pool
    assert tiers == {"gpu": blocks * 16} and again == gpu
    engine.shutdown()


def test_penalties_and_logit_bias_on_cuda(models: dict[str, Path], tmp_path: Path) -> None:
    from cacheproxy.engine.penalties import PenaltyState

    p = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.4, logit_bias={9: -3.0})
    prompt, output = [3, 3, 8, 9, 100], [8, 8, 50]
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 3
    want = logits.double().clone()
    for t in set(prompt) | set(output):
        want[t] = want[t] / 1.4 if want[t] > 0 else want[t] * 1.4
    for t in set(output):
        want[t] -= 1.0 * output.count(t) + 0.5
    want[9] -= 3.0
    state = PenaltyState.new(p, prompt, 2000, torch.device("cuda"))
    state.update(output[:1])
    state.update(output)  # in two steps, as decode adds them
    got = logits.cuda()
    state.apply(got, p)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)

    engine = _engine(models["llama"], tmp_path)
    prompt_ids = _prompts(9, [40])[0]
    forced = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={77: 100.0},
                            frequency_penalty=0.5)  # fmt: skip
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = generate_blocking(engine, [GenerationRequest("f", prompt_ids, forced), GenerationRequest("p", prompt_ids, plain)])
    assert out["f"] == [77] * 12  # decode from CUDA graphs, the bias applied to the graph's logits
    assert out["p"] != [77] * 12  # its batch-mate's bias is not its own


def test_a_head_dim_the_kernels_do_not_tile_is_refused_on_cuda_by_name(tmp_path: Path) -> None:
    from cacheproxy.engine.model_config import UnsupportedModel

    model = make_tiny_model(tmp_path / "hd80", "llama", seed=1, **{**SHAPE, "head_dim": 80})
    with pytest.raises(UnsupportedModel, match="head_dim 80"):
        _engine(model, tmp_path / "data")


def test_structured_outputs_on_cuda_hold_and_leave_batch_mates_alone(models: dict[str, Path], tmp_path: Path) -> None:
    import json
    import re

    import jsonschema
    import numpy as np

    from cacheproxy.engine.grammar import apply_masks
    from cacheproxy.engine.request import StructuredOutput

    class Fixed:  # a matcher whose mask is given: the unpacking on the device against numpy's
        def __init__(self, row: np.ndarray) -> None:
            self.row, self.words = row, row.shape[0]

        def fill_mask(self, out: np.ndarray) -> None:
            out[:] = self.row

    rng = np.random.default_rng(0)
    logits = torch.randn(5, 2000, generator=torch.Generator().manual_seed(1))
    masks = rng.integers(-(2**31), 2**31, size=(3, 63), dtype=np.int64).astype(np.int32)
    got = logits.cuda()
    apply_masks(got, [0, 2, 4], [Fixed(m) for m in masks])  # type: ignore[misc]
    want = logits.clone()
    for row, m in zip([0, 2, 4], masks, strict=True):
        bits = np.unpackbits(m.view(np.uint8), bitorder="little")[:2000]
        want[row, torch.from_numpy(bits == 0)] = float("-inf")
    assert torch.equal(got.cpu(), want)

    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
              "tag": {"enum": ["a", "b"]}, "note": {"type": "string", "maxLength": 5}},
              "required": ["id", "tag", "note"], "additionalProperties": False}  # fmt: skip
    engine = _engine(models["llama"], tmp_path)  # CUDA graphs on: decode logits come from the graphs
    specs = {"json": StructuredOutput("json_schema", json.dumps(schema)), "re": StructuredOutput("regex", r"[a-f]{4}-\d\d"),
             "choice": StructuredOutput("choice", '["north", "south", "east"]')}  # fmt: skip
    prompts = _prompts(10, [30, 50, 70, 90])
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = generate_blocking(engine, [GenerationRequest("alone", prompts[0], plain)])["alone"]
    reqs = [GenerationRequest("plain", prompts[0], plain)]
    for name, spec in specs.items():
        for seed in range(3):
            reqs.append(GenerationRequest(f"{name}-{seed}", prompts[1 + seed], SamplingParams(
                max_tokens=120, temperature=0.0 if seed == 0 else 1.0, seed=seed, structured=spec)))  # fmt: skip
    out = generate_blocking(engine, reqs)
    assert out["plain"] == alone
    for rid, ids in out.items():
        text = engine.tokenizer.decode(ids)
        if rid.startswith("json"):
            jsonschema.validate(json.loads(text), schema)
        elif rid.startswith("re"):
            assert re.fullmatch(r"[a-f]{4}-\d\d", text), text
        elif rid.startswith("choice"):
            assert text in ("north", "south", "east"), text


def test_a_seeded_request_draws_the_same_tokens_on_cuda_whatever_its_batch(models: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    engine = _engine(models["llama"], tmp_path)
    prompts = _prompts(12, [40, 60, 80])

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)

    alone = generate_blocking(engine, [GenerationRequest("a", prompts[0], seeded(5))])["a"]
    again = generate_blocking(engine, [GenerationRequest("b", prompts[0], seeded(5))])["b"]
    crowded = generate_blocking(engine, [
        GenerationRequest("c", prompts[0], seeded(5)), GenerationRequest("d", prompts[1], seeded(6)),
        GenerationRequest("e", prompts[2], SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)),
    ])  # fmt: skip
    other = generate_blocking(engine, [GenerationRequest("f", prompts[0], seeded(7))])["f"]
    assert alone == again == crowded["c"] and other != alone
    engine.add_request(GenerationRequest("g", prompts[0], seeded(1)))
    generator = engine.seqs["g"].generator
    assert generator is not None and generator.device.type == "cuda"  # draws where the logits are
    engine.abort("g")
