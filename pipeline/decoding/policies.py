"""Routing policies: which model writes each token.

At every SLM step the engine computes, for every row, the SLM's greedy token, its top-1
probability ("confidence") and, when a policy holds a router, the router's probability that the
SLM's token is good enough. A policy turns those into one decision per row on the host: True when
the LLM writes the token. Decisions depend on the row's own state only (never on the batch), so
they are the same in any batch and under any schedule, and the cache-free reference makes them
with the same `route` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline import CiterError
from pipeline.router import Router


class Policy:
    """Decides, per token, whether the LLM writes it. `uses_slm`/`uses_llm` let the engine skip a
    model the policy never needs (the single-model baselines); `router`, when set, is run on the
    SLM's state at every step and its probability passed to `route`."""

    name = "policy"
    uses_slm = True
    uses_llm = True
    router: Router | None = None

    def route(self, prob: float, confidence: float, row: int, step: int) -> bool:
        """True where the LLM writes token `step` (0 = the first generated) of row `row`. `prob` is
        the router's P(the SLM's token is good enough) (nan without a router), `confidence` the
        SLM's top-1 probability there."""
        raise NotImplementedError


class SLMOnly(Policy):
    name, uses_llm = "slm", False

    def route(self, prob, confidence, row, step):
        return False


class LLMOnly(Policy):
    """The LLM alone: it writes every token, and the SLM never runs."""

    name, uses_slm = "llm", False

    def route(self, prob, confidence, row, step):
        return True


class Speculative(Policy):
    """Every token is the LLM's, but the SLM drafts them: under the draft schedule this is
    speculative decoding (the output is exactly the LLM's greedy output)."""

    name = "speculative"

    def route(self, prob, confidence, row, step):
        return True


@dataclass
class RouterPolicy(Policy):
    """The LLM writes the token where the router's P(the SLM is good enough) < threshold."""

    router: Router = field()  # no default: the base class's None is not one
    threshold: float = field()
    name = "router"

    def __post_init__(self):
        check_threshold(self.threshold)

    def route(self, prob, confidence, row, step):
        return prob < self.threshold


@dataclass
class ConfidencePolicy(Policy):
    """The LLM writes the token where the SLM's top-1 probability < threshold."""

    threshold: float
    name = "confidence"

    def __post_init__(self):
        check_threshold(self.threshold)

    def route(self, prob, confidence, row, step):
        return confidence < self.threshold


@dataclass
class RandomPolicy(Policy):
    """Each token goes to the LLM with probability `ratio`, drawn from (seed, row, step), so the
    choice depends neither on batching nor on sharding (`first_row` numbers the rows of a shard of
    a larger set). With `router` set, the router still runs every step, for its cost (benchmarks
    on untrained pairs, whose routers make degenerate choices)."""

    ratio: float
    seed: int = 0
    first_row: int = 0
    router: Router | None = None
    name = "random"

    def __post_init__(self):
        check_threshold(self.ratio, "random routing ratio")

    def route(self, prob, confidence, row, step):
        return uniform(self.seed, self.first_row + row, step) < self.ratio


def uniform(seed: int, row: int, step: int) -> float:
    """A uniform number in [0, 1) from a splitmix64 hash of (seed, row, step)."""
    x = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + 1) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return ((x ^ (x >> 31)) >> 11) / float(2**53)


def check_threshold(value: float, what: str = "threshold") -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0) or math.isnan(value):
        raise CiterError(f"{what} must be in [0, 1], got {value!r}")
