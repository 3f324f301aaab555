"""The parts of a Hugging Face config.json that the engine needs, checked on load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cacheproxy.engine.request import EngineError

# architecture name -> (q/k/v bias, q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
    "Phi3ForCausalLM": (False, False),  # Phi-3 and Phi-4: the Llama layer, q/k/v and gate/up stored fused
    "GraniteForCausalLM": (False, False),  # IBM Granite 3: the Llama layer with four scalar multipliers
}
# Which biases config.json can switch on, as transformers builds each family: Llama's attention_bias
# covers q/k/v and o_proj and its mlp_bias gate/up/down; Qwen3's attention_bias q/k/v and o_proj;
# Mistral has none and Qwen2 always q/k/v only, whatever the config says.
_SWITCHED_BIASES: dict[str, tuple[bool, bool]] = {  # (attention_bias read, mlp_bias read)
    "LlamaForCausalLM": (True, True),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (False, False),
    "Qwen3ForCausalLM": (True, False),
    "Phi3ForCausalLM": (False, False),
    "GraniteForCausalLM": (True, True),
}


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config layout: transformers 4's top-level `rope_theta` and
    `rope_scaling`, or transformers 5's `rope_parameters` (theta and scaling in one dict), which a
    checkpoint saved with it has instead. Missing both, the families' default theta of 10000."""
    params = cfg.get("rope_parameters")
    if params is not None and not (isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params)):
        raise UnsupportedModel(f"unsupported rope_parameters {params!r} (one set for all layers is served)")
    params = params or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta")) or 10000.0)
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is not None and float(factor) != 1.0:
        raise UnsupportedModel(f"unsupported partial_rotary_factor {factor} (the Llama family turns every dimension)")
    return theta, scaling


def _granite_multipliers(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    if arch != "GraniteForCausalLM":
        return {}
    return {"embedding_multiplier": float(cfg.get("embedding_multiplier", 1.0)),
            "residual_multiplier": float(cfg.get("residual_multiplier", 1.0)),
            "attention_multiplier": float(cfg.get("attention_multiplier", 1.0)),
            "logits_scaling": float(cfg.get("logits_scaling", 1.0))}  # fmt: skip


class UnsupportedModel(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="unsupported_model", status=400)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str
    eos_token_id: list[int] = field(default_factory=list)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    # Granite's: the embeddings are multiplied by the first, each block's output by the second before it
    # joins the residual, attention scores by the third (instead of head_dim ** -0.5), and the logits
    # divided by the fourth. 1 (None: the usual scale) for every other family.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(archs) or cfg.get("model_type", "unknown")
            raise UnsupportedModel(
                f"unsupported architecture {named}; cacheproxy serves "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            )
        bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        reads_attention_bias, reads_mlp_bias = _SWITCHED_BIASES[arch]
        switched = reads_attention_bias and bool(cfg.get("attention_bias", False))
        mlp_bias = reads_mlp_bias and bool(cfg.get("mlp_bias", False))
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if kv_heads < 1 or heads % kv_heads:
            raise UnsupportedModel(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModel(f"unsupported hidden_act {cfg.get('hidden_act')!r} (have: silu)")
        rope_theta, rope_scaling = _rope(cfg)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3", "yarn"):
                raise UnsupportedModel(f"unsupported rope_scaling type {kind!r} (have: default, linear, llama3, yarn)")
            if kind == "yarn" and "original_max_position_embeddings" not in rope_scaling:
                raise UnsupportedModel("yarn rope_scaling needs original_max_position_embeddings")
        sliding = cfg.get("sliding_window")
        if arch not in ("MistralForCausalLM", "Phi3ForCausalLM") and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias or switched,
            qk_norm=qk_norm,
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            eos_token_id=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            o_proj_bias=switched,
            mlp_bias=mlp_bias,
            **_granite_multipliers(cfg, arch),
        )

    @classmethod
    def from_path(cls, path: Path) -> ModelConfig:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except FileNotFoundError as e:
            raise UnsupportedModel(f"{path} has no config.json") from e
        return cls.from_dict(cfg)

    @property
    def max_context(self) -> int:
        """Longest context the engine serves: the window if the model has one (we attend fully)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def kv_bytes_per_token(self, elem_size: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem_size
