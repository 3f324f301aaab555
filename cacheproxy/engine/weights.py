"""Builds the model on its device and fills it from *.safetensors (sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from cacheproxy.engine.model import CausalLM
from cacheproxy.engine.model_config import ModelConfig, UnsupportedModel
from cacheproxy.engine.rotary import RotaryEmbedding


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """An uninitialised model on `device` (no time spent on random init)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.model.rotary_emb = RotaryEmbedding(
        cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
    ).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_weights(model: CausalLM, path: Path) -> None:
    files = safetensors_files(path)
    if not files:
        raise UnsupportedModel(f"{path} holds no *.safetensors weights")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    device = next(model.parameters()).device
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name not in params:
                    continue  # e.g. rotary_emb.inv_freq of old checkpoints
                param = params[name]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise UnsupportedModel(
                        f"weight {name} has shape {tuple(tensor.shape)}, config expects {tuple(param.shape)}"
                    )
                param.data.copy_(tensor.to(device=device, dtype=param.dtype))
                loaded.add(name)
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise UnsupportedModel(f"weights missing from {path}: {', '.join(missing[:8])}")


def init_random_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> None:
    """For benchmarks of a model's shape without its weights (nothing to download)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, std, generator=g)
