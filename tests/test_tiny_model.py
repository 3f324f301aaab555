"""The built-in tiny model: Hugging Face format, deterministic, and found by resolve_model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cacheproxy.engine.model_files import (
    ModelNotFound,
    model_fingerprint,
    resolve_model,
    tiny_model_path,
    weight_files,
    weight_patterns,
)
from cacheproxy.engine.tiny_model import ARCHITECTURES, make_tiny_model
from cacheproxy.engine.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLES = [
    "Hello, world! The cache hit rate is 93.5%.",
    "café 日本語 😀 🧬",
    "<|im_start|>user\nhi<|im_end|>",
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHITECTURES}


def test_same_seed_writes_byte_identical_files(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", arch="qwen2", seed=7)
    b = make_tiny_model(tmp_path / "b", arch="qwen2", seed=7)
    assert _files(a) == _files(b)
    c = make_tiny_model(tmp_path / "c", arch="qwen2", seed=8)
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert (c / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


def test_files_are_the_hugging_face_set(models: dict[str, Path]) -> None:
    for folder in models.values():
        names = {p.name for p in folder.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        } <= names


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_config_names_the_architecture_and_the_defaults(models: dict[str, Path], arch: str) -> None:
    cfg = json.loads((models[arch] / "config.json").read_text())
    cls_name, model_type = ARCHITECTURES[arch]
    assert cfg["architectures"] == [cls_name] and cfg["model_type"] == model_type
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 64, 128)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["max_position_embeddings"] == 4096 and cfg["rope_theta"] == 10000.0
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is False
    if arch == "llama3":
        assert cfg["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    else:
        assert cfg["rope_scaling"] is None


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parameter_names_are_hugging_faces(models: dict[str, Path], arch: str) -> None:
    names = set(_weights(models[arch]))
    cfg = json.loads((models[arch] / "config.json").read_text())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if arch == "phi3":  # stored fused, as Phi-3's checkpoints hold them
            expected |= {p + "self_attn.qkv_proj.weight", p + "self_attn.o_proj.weight"}
            expected |= {p + "mlp.gate_up_proj.weight", p + "mlp.down_proj.weight"}
        else:
            expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
            expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if arch == "qwen2":
            expected |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
        if arch == "qwen3":
            expected |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    assert names == expected


def test_weights_are_small_random_float32_and_norms_are_one(models: dict[str, Path]) -> None:
    w = _weights(models["llama"])
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32 and q.shape == (4 * 16, 64)
    assert 0.015 < q.std().item() < 0.025
    assert torch.equal(w["model.norm.weight"], torch.ones(64))
    assert not torch.equal(w["model.embed_tokens.weight"], w["lm_head.weight"])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_transformers_loads_every_arch_and_its_tokenizer_agrees_with_ours(
    models: dict[str, Path], arch: str
) -> None:
    transformers = pytest.importorskip("transformers")
    folder = models[arch]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert type(model).__name__ == ARCHITECTURES[arch][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = Tokenizer(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in SAMPLES:
        for special in (True, False):
            assert hf_tok.encode(text, add_special_tokens=special) == ours.encode(
                text, add_special_tokens=special
            )
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    assert ours.apply_chat_template(chat) == hf_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([ours.encode(SAMPLES[0])])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    # Not degenerate: finite, and the tokens are not all equally likely.
    assert logits.shape == (ours.vocab_size,) and torch.isfinite(logits).all()
    assert logits.std().item() > 1e-3


def test_qwen_tokenizers_write_no_bos_and_llama_ones_do(models: dict[str, Path]) -> None:
    for arch in ARCHITECTURES:
        tok = Tokenizer(models[arch])
        plain = tok.encode("hi", add_special_tokens=False)
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
        if arch.startswith("qwen"):
            assert tok.bos_token_id is None and tok.encode("hi") == plain
            assert chat.startswith("<|im_start|>user\n")
        else:
            assert tok.encode("hi") == [tok.bos_token_id, *plain]
            assert chat.startswith("<s><|im_start|>user\n")


def test_tied_embeddings_write_no_lm_head_and_load_tied(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_model(tmp_path / "tied", arch="qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in _weights(folder)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_sharded_files_hold_the_same_weights_and_an_index(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    single = make_tiny_model(tmp_path / "one", arch="mistral", seed=3)
    sharded = make_tiny_model(tmp_path / "three", arch="mistral", seed=3, shards=3)
    shard_files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(str(sharded / file), framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118 - safe_open has keys(), not __contains__
    a, b = _weights(single), _weights(sharded)
    assert set(index["weight_map"]) == set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(sharded), output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(model.model.embed_tokens.weight, a["model.embed_tokens.weight"])


def test_bfloat16_option_stores_bfloat16(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in _weights(folder).values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unknown_arch_or_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="unknown options"):
        make_tiny_model(tmp_path, hiden_size=32)


def test_cli_works_without_transformers(tmp_path: Path) -> None:
    # `serve` makes the model on machines that have no transformers: hide it and run the script.
    code = (
        "import sys, runpy; sys.modules['transformers'] = None; "
        f"sys.argv = ['make_tiny_model.py', {str(tmp_path / 'm')!r}, '--arch', 'qwen3', '--layers', '3', "
        "'--hidden', '32', '--heads', '2', '--kv-heads', '1', '--seed', '5']; "
        f"runpy.run_path({str(REPO / 'scripts' / 'make_tiny_model.py')!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["num_hidden_layers"] == 3 and cfg["hidden_size"] == 32
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    assert _files(tmp_path / "m") == _files(
        make_tiny_model(
            tmp_path / "same",
            "qwen3",
            5,
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


# --- resolve_model and the fingerprint ----------------------------------------------------------


def test_no_model_means_the_tiny_model_made_once_in_the_data_dir(tmp_path: Path) -> None:
    path = resolve_model(None, tmp_path)
    assert path == tiny_model_path(tmp_path) == tmp_path / "models" / "tiny-llama"
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(None, tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-llama"]  # no staging left over


def test_an_existing_folder_is_used_as_is(models: dict[str, Path], tmp_path: Path) -> None:
    assert resolve_model(str(models["qwen3"]), tmp_path) == models["qwen3"]
    assert not (tmp_path / "models").exists()


def test_a_folder_without_config_or_a_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no config\.json"):
        resolve_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "no network"),
    ],
)
def test_an_unreachable_hub_id_is_a_clear_error(tmp_path: Path, env: dict[str, str], says: str) -> None:
    # huggingface_hub reads its environment at import: a fresh interpreter with an empty cache.
    # The closed port on 127.0.0.1 stands in for "no network" without leaving this machine.
    code = (
        "from pathlib import Path\n"
        "from cacheproxy.engine.model_files import ModelNotFound, resolve_model\n"
        "try:\n"
        f"    resolve_model('some-org/some-model', Path({str(tmp_path)!r}))\n"
        "except ModelNotFound as e:\n"
        "    print(e)\n"
    )
    run_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", **env}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=run_env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "'some-org/some-model'" in done.stdout and says in done.stdout


def test_fingerprint_is_stable_and_tracks_config_and_weights(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=1)
    b = make_tiny_model(tmp_path / "b", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert len(model_fingerprint(a)) == 32
    other_shape = make_tiny_model(tmp_path / "c", seed=1, num_hidden_layers=3)
    assert model_fingerprint(other_shape) != model_fingerprint(a)
    sharded = make_tiny_model(tmp_path / "d", seed=1, shards=2)
    assert model_fingerprint(sharded) != model_fingerprint(a)


def _repo_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("shards", [1, 3])
def test_only_the_weights_the_engine_reads_are_fetched_and_loaded(tmp_path: Path, shards: int) -> None:
    from huggingface_hub.utils import filter_repo_objects

    from cacheproxy.config import Settings
    from cacheproxy.engine.engine import LLMEngine

    folder = make_tiny_model(tmp_path / "m", "mistral", seed=3, init_std=0.15, shards=shards)
    want = sorted(str(p.relative_to(folder)) for p in folder.glob("*.safetensors"))
    # As Mistral's repositories hold them: the weights again in Mistral's own format, and a subfolder.
    save_file({"layers.0.attention.wq.weight": torch.ones(2, 2)}, str(folder / "consolidated.safetensors"))
    (folder / "original").mkdir()
    save_file({"x": torch.ones(1)}, str(folder / "original" / "model.safetensors"))
    allow, ignore = weight_patterns(folder)
    # the hub client's own filter, on the repository's file list
    fetched = sorted(filter_repo_objects(_repo_files(folder), allow_patterns=allow, ignore_patterns=ignore))
    assert fetched == want
    assert [str(p.relative_to(folder)) for p in weight_files(folder)] == want
    engine = LLMEngine.from_settings(Settings(model=str(folder), data_dir=tmp_path / "d", num_kv_blocks=64,
                                              cpu_cache_bytes=0, disk_cache_enabled=False))  # fmt: skip
    ids = list(range(5, 40))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine.score(ids), ref, atol=2e-4, rtol=1e-4)
