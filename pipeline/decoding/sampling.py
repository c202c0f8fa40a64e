"""Sampling a token (temperature > 0), reproducibly for a seed.

The token at position p of a row seeded s is the Gumbel-max sample argmax(logits / T + g), with the
Gumbel noise g drawn from a generator seeded by (s, p) alone, restricted to the top-p nucleus. So a
row's text depends on its seed and not on its batch, and where the SLM drafts and the LLM checks a
position both draw with the same noise: when their distributions are close they pick the same token
(the check agrees) and the LLM's token keeps exactly the LLM's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import CiterError
from pipeline.decoding.policies import uniform


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling: temperature 0 is greedy (top_p and seed then do nothing)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise CiterError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise CiterError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def sample(logits: torch.Tensor, sampling: Sampling, position: int) -> int:
    """The token at `position` from one position's logits (over the valid ids)."""
    if sampling.greedy:
        return int(logits.argmax())
    scores = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        order = torch.argsort(scores, descending=True)
        probs = torch.softmax(scores[order], dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= sampling.top_p  # the nucleus keeps at least one id
        scores = scores.clone()
        scores[order[outside]] = float("-inf")
    seed = int(uniform(sampling.seed, position, 0x5EED) * 2**53)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    u = torch.rand(scores.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0 - 1e-7)
    return int(torch.argmax(scores - torch.log(-torch.log(u))))
