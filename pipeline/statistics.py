"""Uncertainty of figures measured on samples: a paired bootstrap over held-out problems, and
Wilson intervals for proportions.

Paired bootstrap: every figure of one evaluation (each method's accuracy, LLM-call ratio, AUC,
LLM tokens needed to reach a target accuracy) is recomputed on the same B resamples of the
held-out problems, drawn with replacement. A difference between two figures is taken per
resample, so its interval keeps the pairing: a problem that is hard for both methods moves both
figures together and not their difference. Intervals are percentile intervals (the 2.5th and
97.5th percentiles of the B values, as actual resampled values: `inverted_cdf`). A figure a
resample cannot reach (a curve that never gets to the target) is +inf there.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

LEVEL = 0.95


class Resamples:
    """B bootstrap resamples of n problems as counts: `counts[b, i]` is how often problem i is drawn
    in resample b (a multinomial draw of n, the same as drawing n indices with replacement).
    Seeded, so two evaluations of the same n problems get the same resamples (a paired comparison
    across runs)."""

    def __init__(self, n: int, resamples: int = 2000, seed: int = 0):
        if n < 1 or resamples < 1:
            raise ValueError(f"a bootstrap needs problems and resamples, got n={n}, resamples={resamples}")
        rng = np.random.default_rng(seed)
        self.n = n
        self.counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)

    @property
    def resamples(self) -> int:
        return self.counts.shape[0]

    def mean(self, values: np.ndarray) -> np.ndarray:
        """Per resample, the mean of per-problem `values` (n,) -> (B,)."""
        return self.counts @ np.asarray(values, dtype=np.float64) / self.n

    def ratio(self, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        """Per resample, sum(numerator) / sum(denominator) over the drawn problems (0 where the
        denominator sums to 0)."""
        num = self.counts @ np.asarray(numerator, dtype=np.float64)
        den = self.counts @ np.asarray(denominator, dtype=np.float64)
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float | None]:
    """The percentile interval of bootstrap values; an end at +inf (not reached) is None."""
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2],
                         method="inverted_cdf")
    return [_finite(lo), _finite(hi)]


def difference(a: np.ndarray, b: np.ndarray, estimate: float | None, level: float = LEVEL) -> dict[str, Any]:
    """A paired comparison: the difference a - b (its point `estimate`) with its percentile
    interval, whether that interval excludes 0 (`separable`), and the share of resamples where
    each side is finite (`reached`). Where one side is never reached (+inf) the difference is
    infinite, and an infinite end of the interval reads "inf" or "-inf"; resamples where neither
    side is reached say nothing and are left out."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: neither side reached
        d = a - b
    d = d[~np.isnan(d)]
    reached = [float(np.isfinite(a).mean()), float(np.isfinite(b).mean())]
    if not len(d):
        return {"difference": estimate, "interval": [None, None], "separable": False, "reached": reached}
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    end = lambda x: float(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")  # noqa: E731
    return {"difference": estimate, "interval": [end(lo), end(hi)], "separable": bool(lo > 0 or hi < 0),
            "reached": reached}


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else float(x)


def wilson(successes: int, trials: int, level: float = LEVEL) -> list[float | None]:
    """Wilson score interval of a proportion (better than the normal one near 0 and 1 and for few
    trials); [None, None] without trials."""
    if trials <= 0:
        return [None, None]
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def roc_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """Area under the ROC curve of `scores` for `labels` (1 = positive): the probability that a
    positive scores above a negative, ties counting half (Mann-Whitney). With `weights` (B, n),
    per-row weights on the items (bootstrap counts), one AUC per row."""
    order = np.argsort(scores, kind="stable")
    s, y = np.asarray(scores)[order], np.asarray(labels, dtype=np.float64)[order]
    w = np.ones((1, len(s))) if weights is None else np.asarray(weights, dtype=np.float64)[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    pos, neg = np.add.reduceat(w * y, starts, axis=1), np.add.reduceat(w * (1 - y), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))
    return float(auc[0]) if weights is None else auc


# ---------------------------------------------------------------------------------------------
# Curves of accuracy against LLM-call ratio, per resample


def _anchored(x: np.ndarray, y: np.ndarray, left: np.ndarray, right: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Each row's points with (0, left) first (and (1, right) last when given), sorted by (x, y)."""
    b = x.shape[0]
    xs = [np.zeros((b, 1)), x] + ([np.ones((b, 1))] if right is not None else [])
    ys = [left[:, None], y] + ([right[:, None]] if right is not None else [])
    X, Y = np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)
    order = np.lexsort((Y, X), axis=-1)
    return np.take_along_axis(X, order, axis=1), np.take_along_axis(Y, order, axis=1)


def curve_area(x: np.ndarray, y: np.ndarray, slm: np.ndarray, llm: np.ndarray) -> np.ndarray:
    """Trapezoid area under accuracy `y` against LLM-call ratio `x` (each (B, P)) on [0, 1],
    anchored at (0, SLM accuracy) and (1, LLM accuracy) (each (B,)) -> (B,)."""
    X, Y = _anchored(np.asarray(x, float), np.asarray(y, float), np.asarray(slm, float), np.asarray(llm, float))
    return ((X[:, 1:] - X[:, :-1]) * (Y[:, 1:] + Y[:, :-1]) / 2).sum(axis=1)


def calls_to_reach(x: np.ndarray, y: np.ndarray, slm: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row, the smallest LLM-call ratio at which the curve (from (0, SLM accuracy)) reaches
    `target`, linear between measured points; +inf where no measured point reaches it (a curve is
    never extended past its last point)."""
    X, Y = _anchored(np.asarray(x, float), np.asarray(y, float), np.asarray(slm, float), None)
    target = np.asarray(target, float)
    reached = Y >= target[:, None]
    j = reached.argmax(axis=1)
    out = np.full(len(X), np.inf)
    rows = np.flatnonzero(reached.any(axis=1))
    first = rows[j[rows] == 0]
    out[first] = 0.0
    rows = rows[j[rows] > 0]
    jr = j[rows]
    x0, x1, y0, y1 = X[rows, jr - 1], X[rows, jr], Y[rows, jr - 1], Y[rows, jr]
    flat = y1 == y0
    out[rows] = np.where(flat, x1, x0 + (x1 - x0) * (target[rows] - y0) / np.where(flat, 1.0, y1 - y0))
    return out
