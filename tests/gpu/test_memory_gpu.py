"""The pool takes what is left after the weights and the measured activations; what cannot fit is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cacheproxy.config import Settings
from cacheproxy.engine.engine import LLMEngine, generate_blocking
from cacheproxy.engine.request import EngineError, GenerationRequest, SamplingParams
from cacheproxy.engine.tiny_model import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPE = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
         "intermediate_size": 1024, "num_hidden_layers": 3}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("mem-model") / "llama", "llama", seed=5, **SHAPE)


def _engine(path: Path, tmp: Path, **kw: object) -> LLMEngine:
    opts: dict[str, object] = {"model": str(path), "data_dir": tmp, "device": "cuda", "dtype": "bfloat16",
                               "cpu_cache_bytes": 0, "disk_cache_enabled": False, "max_model_len": 4096}  # fmt: skip
    opts.update(kw)
    return LLMEngine.from_settings(Settings(**opts))


def test_pool_is_what_the_card_share_leaves_after_weights_and_activations(model: Path, tmp_path: Path) -> None:
    torch.cuda.empty_cache()
    util = 0.3
    free0, total = torch.cuda.mem_get_info()
    reserved0 = torch.cuda.memory_reserved()
    share = free0 - (1 - util) * total  # what this engine may take (the card may hold other things)
    assert share > 1 << 30
    engine = _engine(model, tmp_path, gpu_memory_utilization=util, max_num_batched_tokens=4096)
    pool_bytes = engine.pool.num_blocks * engine.pool.block_bytes
    assert engine.activation_bytes > 0
    assert torch.cuda.memory_reserved() - reserved0 <= share
    # the pool is most of that share: this model's weights and activations are small
    assert pool_bytes > 0.8 * (share - engine.activation_bytes) - (64 << 20)
    # a full-budget prefill and decodes run without running out of memory, inside the share
    ids = torch.randint(5, 2000, (4000,)).tolist()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    out = generate_blocking(engine, [GenerationRequest("long", ids, params)])
    assert len(out["long"]) == 4
    assert torch.cuda.memory_reserved() - reserved0 <= share
    engine.shutdown()


def test_activation_profile_grows_with_the_step_budget(model: Path, tmp_path: Path) -> None:
    small = _engine(model, tmp_path / "a", kv_cache_bytes=64 << 20, max_num_batched_tokens=512)
    big = _engine(model, tmp_path / "b", kv_cache_bytes=64 << 20, max_num_batched_tokens=4096)
    assert big.activation_bytes > small.activation_bytes
    assert small.pool.num_blocks * small.pool.block_bytes <= 64 << 20  # the cap holds
    small.shutdown()
    big.shutdown()


def test_a_request_larger_than_the_pool_is_refused_clearly(model: Path, tmp_path: Path) -> None:
    engine = _engine(model, tmp_path, kv_cache_bytes=1 << 20, max_num_batched_tokens=256)
    too_long = engine.pool.num_blocks * engine.block_size + 16
    assert too_long + 1 < engine.max_model_len
    with pytest.raises(EngineError) as err:
        engine.add_request(GenerationRequest("big", [7] * too_long, SamplingParams(max_tokens=1)))
    assert err.value.code == "context_length_exceeded"
    assert "KV blocks" in str(err.value)
    ok = generate_blocking(engine, [GenerationRequest("ok", [7] * 100, SamplingParams(max_tokens=2, ignore_eos=True))])
    assert len(ok["ok"]) == 2
    engine.shutdown()
