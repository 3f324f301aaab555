"""What a request's sampling fields do to its logits before a token is drawn: OpenAI's presence and
frequency penalties and logit_bias, and the repetition penalty of transformers and vLLM.

- presence / frequency (OpenAI): over the tokens generated so far, `logit -= frequency * count +
  presence * (count > 0)`.
- repetition (transformers' `RepetitionPenaltyLogitsProcessor`): over the prompt's and the generated
  tokens, a positive logit is divided by the penalty and a negative one multiplied by it.
- logit_bias: added to the named tokens' logits.
- min_tokens: until that many are out, the tokens that would end the text are never drawn.

Each sequence keeps its counts on the device and adds only the tokens generated since its last step,
so a step costs a few small launches per penalised row whatever the prompt's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cacheproxy.engine.request import SamplingParams
from cacheproxy.engine.sequence import Sequence


def adjusts_logits(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias)


@dataclass(eq=False)
class PenaltyState:
    """One sequence's token counts on the logits' device."""

    counts: torch.Tensor  # [vocab] int32: how often each token was generated
    seen: torch.Tensor  # [vocab] bool: in the prompt or generated (the repetition penalty's set)
    counted: int = 0  # generated tokens already in `counts`
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None

    @classmethod
    def new(cls, p: SamplingParams, prompt_ids: list[int], vocab: int, device: torch.device) -> PenaltyState:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if p.repetition_penalty != 1.0 and prompt_ids:
            seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        state = cls(torch.zeros(vocab, dtype=torch.int32, device=device), seen)
        if p.logit_bias:
            state.bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
            state.bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
        return state

    def update(self, output_ids: list[int]) -> None:
        new = output_ids[self.counted :]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=self.counts.device)
            self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            self.seen[ids] = True
            self.counted = len(output_ids)

    def apply(self, row: torch.Tensor, p: SamplingParams) -> None:
        """Adjusts one row of float32 logits in place."""
        if p.repetition_penalty != 1.0:
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(self.seen, penalised, row))
        if p.frequency_penalty or p.presence_penalty:
            counts = self.counts.to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if self.bias_ids is not None and self.bias_values is not None:
            row.index_add_(0, self.bias_ids, self.bias_values)


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Applies each sequence's penalties and bias to its row of `logits` [N, V] (float32), in place, and
    keeps its `held_back` tokens (end of text, stop ids) from being drawn before `min_tokens`."""
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.held_back and len(seq.output_ids) < p.min_tokens:
            held = [t for t in seq.held_back if t < logits.shape[-1]]
            logits[i, held] = float("-inf")
        if not adjusts_logits(p):
            continue
        if seq.penalties is None:
            seq.penalties = PenaltyState.new(p, seq.prompt_ids, logits.shape[-1], logits.device)
        seq.penalties.update(seq.output_ids)
        seq.penalties.apply(logits[i], p)
