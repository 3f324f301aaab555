"""Rotary position embeddings with the rope_scaling kinds of the Llama family (default, linear, llama3)."""

from __future__ import annotations

import math
from typing import Any

import torch

import kernels


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # float32 throughout, as Hugging Face computes it: the same rounding gives the same logits.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
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


class RotaryEmbedding(torch.nn.Module):
    """Precomputed float32 cos/sin tables [max_positions, head_dim / 2]; rotates q and k in place in
    the rotate-half form that Hugging Face Llama uses, reading the tables by position inside the
    kernel (no per-step gather)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv = inverse_frequencies(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

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
