"""Builds the model on its device and fills it from *.safetensors (sharded or not)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from cacheproxy.engine.model import CausalLM, fused_projections
from cacheproxy.engine.model_config import ModelConfig, UnsupportedModel
from cacheproxy.engine.model_files import weight_files
from cacheproxy.engine.rotary import RotaryEmbedding


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


def checkpoint_layout(model: CausalLM) -> dict[str, tuple[str, slice | None]]:
    """Every tensor a Hugging Face checkpoint of this model holds -> (our parameter, the rows of it that
    tensor fills, or None for all of it). q/k/v and gate/up land in row ranges of the fused projections."""
    by_fused: dict[str, list[tuple[str, int, int]]] = {}
    for hf_module, (ours, start, rows) in fused_projections(model.config).items():
        by_fused.setdefault(ours, []).append((hf_module, start, rows))
    layout: dict[str, tuple[str, slice | None]] = {}
    for name in dict(model.named_parameters(remove_duplicate=False)):
        module, _, leaf = name.rpartition(".")
        fused = next((f for f in by_fused if module.endswith("." + f)), None)
        if fused is None:
            layout[name] = (name, None)
            continue
        prefix = module[: -len(fused)]
        for hf_module, start, rows in by_fused[fused]:
            layout[f"{prefix}{hf_module}.{leaf}"] = (name, slice(start, start + rows))
    return layout


def checkpoint_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face's names, the fused projections split back (views)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        hf: params[ours].detach() if rows is None else params[ours].detach()[rows]
        for hf, (ours, rows) in checkpoint_layout(model).items()
    }


def load_weights(model: CausalLM, path: Path) -> None:
    files = weight_files(path)
    if not files:
        raise UnsupportedModel(f"{path} holds no *.safetensors weights")
    params = dict(model.named_parameters(remove_duplicate=False))
    layout = checkpoint_layout(model)
    loaded: set[str] = set()
    unknown: list[str] = []
    tied_head: torch.Tensor | None = None
    device = next(model.parameters()).device
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    tied_head = f.get_tensor(name)  # decided once the embedding is in
                    continue
                if name not in layout:
                    if not name.endswith("rotary_emb.inv_freq"):  # old checkpoints' buffer, from the config
                        unknown.append(name)
                    continue
                ours, rows = layout[name]
                target = params[ours].data if rows is None else params[ours].data[rows]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise UnsupportedModel(
                        f"weight {name} has shape {tuple(tensor.shape)}, config expects {tuple(target.shape)}"
                    )
                target.copy_(tensor.to(device=device, dtype=target.dtype))
                loaded.add(name)
    if unknown:
        # A tensor the model has no place for changes what the checkpoint computes (a bias, an
        # adapter, another architecture's part): refused, not served wrong.
        raise UnsupportedModel(
            f"{path} holds weights this engine does not use: {', '.join(sorted(unknown)[:8])}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")
        embedding = model.model.embed_tokens.weight
        head = None if tied_head is None else tied_head.to(embedding.device, embedding.dtype)
        if head is not None and not torch.equal(head, embedding.data):
            # A "tied" config whose file holds a different head: transformers then keeps the two apart,
            # and so do we (the head gets its own memory).
            model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    missing = sorted(set(layout) - loaded)
    if missing:
        raise UnsupportedModel(f"weights missing from {path}: {', '.join(missing[:8])}")
    fold_multipliers(model)


@torch.no_grad()
def fold_multipliers(model: CausalLM) -> None:
    """Granite's scalar multipliers, folded into the weights once (the forward pass is Llama's): the
    embedding's into the embedding, the residual's into each block's last projection, the logits'
    divisor into the final norm (with the embedding's undone there when the head is the embedding)."""
    cfg = model.config
    if (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (1.0, 1.0, 1.0):
        return
    embedding = model.model.embed_tokens.weight
    embedding.mul_(cfg.embedding_multiplier)
    for layer in model.model.layers:
        for last in (layer.self_attn.o_proj, layer.mlp.down_proj):
            last.weight.mul_(cfg.residual_multiplier)
            if last.bias is not None:
                last.bias.mul_(cfg.residual_multiplier)
    head_is_embedding = model.lm_head.weight.data_ptr() == embedding.data_ptr()
    divisor = cfg.logits_scaling * (cfg.embedding_multiplier if head_is_embedding else 1.0)
    model.model.norm.weight.div_(divisor)


def init_random_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> None:
    """For benchmarks of a model's shape without its weights (nothing to download)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, std, generator=g)
