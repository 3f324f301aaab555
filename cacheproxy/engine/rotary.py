"""Rotary position embeddings with the rope_scaling kinds of the Llama family (default, linear, llama3,
yarn)."""

from __future__ import annotations

import math
from typing import Any

import torch

import kernels


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                        max_positions: int | None = None) -> torch.Tensor:
    # float32 throughout, as Hugging Face computes it: the same rounding gives the same logits.
    wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv = 1.0 / wavelengths
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "yarn":
        # YaRN: the fastest-turning dimensions keep their frequencies, the slowest are interpolated by
        # `factor`, and a linear ramp in between (over the dimensions that turn beta_slow..beta_fast
        # times within the original context).
        old_len = float(scaling["original_max_position_embeddings"])
        factor = _yarn_factor(scaling, max_positions)

        def dimension_of(turns: float) -> float:
            return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dimension_of(float(scaling.get("beta_fast") or 32)), dimension_of(float(scaling.get("beta_slow") or 1))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        kept = 1 - ramp
        return 1.0 / (factor * wavelengths) * (1 - kept) + inv * kept
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def _yarn_factor(scaling: dict[str, Any], max_positions: int | None) -> float:
    factor = scaling.get("factor")
    if factor is None:  # as DeepSeek-V3's configs leave it: the ratio of the two context lengths
        if max_positions is None:
            raise ValueError("yarn scaling without a factor needs max_positions")
        return max_positions / float(scaling["original_max_position_embeddings"])
    return float(factor)


def attention_factor(scaling: dict[str, Any] | None, max_positions: int | None = None) -> float:
    """What the cos/sin tables are multiplied by: YaRN's attention temperature, 1 for the other kinds."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_positions)

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(float(m)) / mscale(float(m_all)) if m and m_all else mscale()


class RotaryEmbedding(torch.nn.Module):
    """Precomputed float32 cos/sin tables [max_positions, head_dim / 2]; rotates q and k in place in
    the rotate-half form that Hugging Face Llama uses, reading the tables by position inside the
    kernel (no per-step gather)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv = inverse_frequencies(head_dim, theta, scaling, max_positions)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        scale = attention_factor(scaling, max_positions)
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D] and k [T, Hkv, D] turned in place, in their dtype (the reference's rounding)."""
        return kernels.rotary(q, k, self.cos, self.sin, positions)

    def rotate_and_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        wait: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> None:
        """`forward`, then the turned k and v into their cache slots, then with `wait` the stream
        held for a layer's loads (`LayerGate.wait_args`): one launch on CUDA."""
        kernels.rotary_and_write_kv(
            q, k, v, self.cos, self.sin, positions, k_cache, v_cache, slot_mapping, wait=wait
        )
