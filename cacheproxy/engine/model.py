"""The Llama family (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3) over the paged KV pool.

Parameter names mirror Hugging Face's, except the fused projections: q/k/v are rows of one
`qkv_proj` and gate/up of one `gate_up_proj` (one GEMM each); `fused_projections` tells the loader
where each checkpoint matrix goes. Tokens of all sequences of a step are packed along one dimension
`[T, ...]`; attention reads where they belong from the `StepContext` the runner sets before the
forward pass. The elementwise work between GEMMs is fused: add + RMSNorm, rotary of q and k, and
SiLU-and-multiply are one launch each (`kernels`).
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from cacheproxy.engine.model_config import ModelConfig
from cacheproxy.engine.rotary import RotaryEmbedding
from cacheproxy.engine.step_context import get_context


def fused_projections(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Where the checkpoint's separate projections live in ours: Hugging Face module (relative to a
    layer) -> (our fused module, first row, number of rows). Weights and biases alike."""
    q, kv, inter = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    if cfg.architecture == "Phi3ForCausalLM":  # its checkpoints hold them fused already, in our order
        return {
            "self_attn.qkv_proj": ("self_attn.qkv_proj", 0, q + 2 * kv),
            "mlp.gate_up_proj": ("mlp.gate_up_proj", 0, 2 * inter),
        }
    return {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
        "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
    }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32, cast back, then scaled: the reference's order of roundings.
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`residual += x` (in place, in the model's dtype), then the norm of the sum: one launch."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else self.head_dim**-0.5
        h, d = cfg.hidden_size, cfg.head_dim
        # q, k and v rows of one matrix (one GEMM); `fused_projections` says where each one's rows are.
        self.qkv_proj = nn.Linear(h, (self.num_heads + 2 * self.num_kv_heads) * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # Strided views of this layer's K and V in the pool; set by the runner.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary_emb: RotaryEmbedding) -> torch.Tensor:
        T, d = x.shape[0], self.head_dim
        q_width, kv_width = self.num_heads * d, self.num_kv_heads * d
        qkv = self.qkv_proj(x)
        # Views into qkv (the kernels take strided heads): no copies.
        q = qkv[:, :q_width].view(T, self.num_heads, d)
        k = qkv[:, q_width : q_width + kv_width].view(T, self.num_kv_heads, d)
        v = qkv[:, q_width + kv_width :].view(T, self.num_kv_heads, d)
        if self.qk_norm:  # Qwen3: per-head norm before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        ctx = get_context()
        # A prefill's cached K/V of this layer may still be on their way: the launch that turns q
        # and k and stores the new K/V also waits for them.
        gate = ctx.layer_gate if ctx.is_prefill else None
        rotary_emb.rotate_and_store(
            q, k, v, positions, self.k_cache, self.v_cache, ctx.slot_mapping,
            None if gate is None else gate.wait_args(self.layer_idx),
        )  # fmt: skip
        if ctx.is_prefill:
            o = kernels.prefix_prefill(
                q, k, v, self.k_cache, self.v_cache, ctx.block_tables,
                ctx.cu_seqlens_q, ctx.cached_lens, self.scale,
                max_query_len=ctx.max_query_len, max_cached_len=ctx.max_cached_len,
            )  # fmt: skip
        else:
            o = kernels.paged_decode(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale
            )
        return self.o_proj(o.reshape(T, q_width))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # gate rows, then up rows: one GEMM, and silu(gate) * up in one launch.
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary_emb: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output, not yet added to `residual` (None before the first
        layer, where x is the embedding). Returns the MLP's output and the residual stream before it:
        each add happens inside the next norm's launch."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, positions, rotary_emb)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary_emb)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm.add_and_norm(x, residual)[0]


class CausalLM(nn.Module):
    """One class for the whole family: the differences are config switches (bias, q/k norm, tying)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def bind_kv_pool(self, pool: torch.Tensor) -> None:
        """pool: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]."""
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = pool[:, i, 0]
            layer.self_attn.v_cache = pool[:, i, 1]
