"""Turns the logits of a step into next tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from cacheproxy.engine.request import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], torch.Tensor | None]:
    """logits [N, V] float32 -> (token ids, log-probabilities [N, V] of the model's distribution,
    computed only when a request asked for logprobs).

    Greedy rows are one argmax for the whole batch; sampled rows draw with their own generator, so
    a request with a seed gets the same tokens whatever else shares its batch.
    """
    logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        g = generators[i]
        if g is not None and g.device != probs.device:
            probs = probs.to(g.device)
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out, logprobs
