"""The sampler against its definition: the distributions of a mixed batch (temperature, top-k with ties,
top-p) equal a row-by-row float64 reference, each row draws from its own distribution, greedy rows take
the argmax, and a seeded row draws the same token whatever else is in the batch."""

from __future__ import annotations

import random

import pytest
import torch

from cacheproxy.engine.request import SamplingParams
from cacheproxy.engine.sampler import sample, sampling_probs


def _reference(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, in float64, as the parameters are defined."""
    x = row.double() / p.temperature
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.sort(x, descending=True).values[p.top_k - 1]
        x = torch.where(x >= kth, x, torch.tensor(float("-inf"), dtype=x.dtype))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        order = torch.argsort(probs, descending=True)
        kept, mass = [], 0.0
        for t in order.tolist():  # the most likely first, until the mass before a token reaches top_p
            if mass >= p.top_p:
                break
            kept.append(t)
            mass += float(probs[t])
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[kept] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    return probs


def _params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0.3, 0.7, 1.0, 1.8]), top_k=rng.choice([0, 0, 1, 3, 17, 200]),
                          top_p=rng.choice([1.0, 1.0, 0.5, 0.9, 0.99]))  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_a_mixed_batch_has_each_rows_own_distribution(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, 300, generator=gen) * 3
    logits[:, 40:60] = logits[:, 40:41]  # ties across the top-k boundary in some rows
    params = [_params(rng) for _ in range(12)]
    got = sampling_probs(logits, params)
    for i, p in enumerate(params):
        want = _reference(logits[i], p)
        # top_p compares a float32 cumulative sum with the reference's float64 one: allow the one token
        # at the boundary where the two can disagree by rounding
        differ = (got[i].double() > 0) != (want > 0)
        assert int(differ.sum()) <= 1, (i, p)
        if not differ.any():
            torch.testing.assert_close(got[i].double() / got[i].sum(), want / want.sum(), atol=1e-5, rtol=1e-4)


def test_every_row_draws_from_its_own_distribution_and_greedy_rows_take_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0, -9.0],
                           [-9.0, -9.0, 0.0, 0.5, 1.0, 0.0],
                           [0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # fmt: skip
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5)]  # fmt: skip
    want = sampling_probs(logits[[0, 2, 3]], [params[0], params[2], params[3]])
    want = want / want.sum(-1, keepdim=True)  # what a draw from the kept mass gives
    counts = torch.zeros(4, 6)
    n = 4000
    for _ in range(n):
        tokens, _ = sample(logits.clone(), params, [None] * 4)
        counts[torch.arange(4), torch.tensor(tokens)] += 1
    assert counts[1, 4] == n  # greedy: the argmax, every time
    freq = counts[[0, 2, 3]] / n
    assert torch.all((freq - want).abs() < 0.03), (freq, want)
    assert counts[2, [0, 2, 3, 4, 5]].min() > 0  # top-2 where five tie for second: all five stay
    assert (counts[3] > 0).sum() == 3  # top_p 0.5 of six equal tokens: three of them


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch() -> None:
    logits = torch.randn(5, 400, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.3, top_k=50, top_p=0.95, seed=9)
    alone = [sample(logits[:1].clone(), [p], [torch.Generator().manual_seed(9)])[0][0] for _ in range(3)]
    batch_params = [SamplingParams(temperature=0.8), p, SamplingParams(temperature=0.0),
                    SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=2.0, seed=1)]  # fmt: skip
    rows = torch.stack([logits[1], logits[0], logits[2], logits[3], logits[4]])
    mixed = sample(rows, batch_params, [None, torch.Generator().manual_seed(9), None, None,
                                        torch.Generator().manual_seed(1)])[0]  # fmt: skip
    assert alone == [alone[0]] * 3 and mixed[1] == alone[0]


def test_seeded_rows_draw_from_their_own_distributions() -> None:
    inf = float("inf")
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -inf, -inf],
                           [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    params = [SamplingParams(temperature=1.0, seed=0), SamplingParams(temperature=1.0, top_k=2, seed=0)]
    want = sampling_probs(logits, params)
    want = want / want.sum(-1, keepdim=True)
    counts = torch.zeros(2, 6)
    n = 4000
    for s in range(n):  # a fresh seed each time: the draws over seeds follow each row's distribution
        tokens, _ = sample(logits.clone(), params, [torch.Generator().manual_seed(s), torch.Generator().manual_seed(n + s)])
        counts[torch.arange(2), torch.tensor(tokens)] += 1
    assert torch.all((counts / n - want).abs() < 0.03), (counts / n, want)
    assert counts[0, 4:].sum() == 0  # tokens of no mass (masked to -inf) are never drawn
