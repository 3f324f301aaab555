"""Turns the logits of a step into next tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from cacheproxy.engine.request import SamplingParams


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distributions sampled rows draw from, [N, V] float32, for all rows at once: logits over
    temperature, then the top-k (every token tied with the k-th stays), then the smallest set of most
    likely tokens whose mass reaches top-p (at least one token)."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    rows = logits / temps[:, None]
    ks = [p.top_k if 0 < p.top_k < rows.shape[-1] else 0 for p in params]
    if any(ks):
        top = torch.topk(rows, max(ks), dim=-1).values
        k = torch.tensor(ks, device=device)
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        rows = rows.masked_fill(rows < kth, float("-inf"))
    probs = torch.softmax(rows, dim=-1)
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        top_p = torch.tensor(top_ps, dtype=probs.dtype, device=device)
        # a token is dropped when the tokens before it already reach top_p (rows with top_p 1 keep all)
        drop = (sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]) & (top_p[:, None] < 1.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], torch.Tensor | None]:
    """logits [N, V] float32 -> (token ids, log-probabilities [N, V] of the model's distribution,
    computed only when a request asked for logprobs).

    Greedy rows are one argmax for the whole batch, and unseeded sampled rows one draw; a row with a
    seed draws from its own generator's stream, so it gets the same tokens whatever else shares its batch.
    """
    logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = sampling_probs(logits.index_select(0, index), [params[i] for i in sampled])
        free = [k for k, i in enumerate(sampled) if generators[i] is None]
        if free:
            pick = torch.tensor(free, device=logits.device)
            chosen[index[pick]] = torch.multinomial(probs.index_select(0, pick), 1).squeeze(1)
        seeded = [k for k, i in enumerate(sampled) if generators[i] is not None]
        if seeded:
            # Each seeded row takes one uniform number from its own generator, then all of them invert
            # their distribution's cumulative sum at once (a draw from the row's own stream, so the same
            # whatever shares the batch).
            u = torch.cat([torch.rand(1, generator=generators[sampled[k]], device=generators[sampled[k]].device)
                           .to(logits.device) for k in seeded])  # fmt: skip
            pick = torch.tensor(seeded, device=logits.device)
            cdf = probs.index_select(0, pick).cumsum(-1)
            # right=True: the first token whose cumulative mass passes u, never a token of zero mass
            drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
            chosen[index[pick]] = drawn.clamp(max=probs.shape[-1] - 1)
    return chosen.tolist(), logprobs
