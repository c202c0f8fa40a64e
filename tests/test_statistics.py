"""The paired bootstrap and the Wilson interval, against independent computations: the exact
bootstrap distribution by enumerating every resample of a tiny data set, closed-form variances,
and a textbook Wilson value."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from pipeline.statistics import Resamples, calls_to_reach, curve_area, difference, interval, roc_auc, wilson


def exact_bootstrap_means(values: list[float]) -> dict[float, float]:
    """Every ordered resample of n values (n^n, equally likely) -> the distribution of its mean."""
    n = len(values)
    counts = Counter(round(sum(values[i] for i in draw) / n, 12) for draw in itertools.product(range(n), repeat=n))
    return {mean: c / n**n for mean, c in sorted(counts.items())}


def exact_quantile(pmf: dict[float, float], q: float) -> float:
    """The smallest value whose cumulative probability reaches q (the inverted CDF)."""
    total = 0.0
    for value, p in pmf.items():
        total += p
        if total >= q - 1e-12:
            return value
    return max(pmf)


def test_resampled_means_follow_the_exact_bootstrap_distribution_and_its_percentile_interval():
    values = [0.0, 0.0, 1.0, 4.0, 6.0]  # 5^5 = 3125 resamples
    pmf = exact_bootstrap_means(values)
    boot = Resamples(len(values), resamples=200_000, seed=1)
    means = np.round(boot.mean(values), 12)
    seen = Counter(means.tolist())
    assert set(seen) <= set(pmf)
    assert max(abs(seen[m] / len(means) - p) for m, p in pmf.items()) < 0.005  # >= 4 sd for 200k draws
    cdf = np.cumsum(list(pmf.values()))
    # The 2.5% and 97.5% points fall well inside steps of the exact CDF, so a Monte Carlo quantile
    # lands on the same value.
    assert np.abs(cdf - 0.025).min() > 0.004 and np.abs(cdf - 0.975).min() > 0.004
    assert interval(means) == [exact_quantile(pmf, 0.025), exact_quantile(pmf, 0.975)]


def test_paired_difference_has_the_closed_form_variance_and_beats_unpaired():
    rng = np.random.default_rng(0)
    hard = rng.random(300) < 0.4  # problems hard for both methods
    a = (~hard | (rng.random(300) < 0.2)).astype(float)
    b = (~hard | (rng.random(300) < 0.1)).astype(float)
    boot = Resamples(300, resamples=50_000, seed=3)
    d = boot.mean(a) - boot.mean(b)
    # The bootstrap variance of a mean is the population variance over n (divisor n, not n - 1).
    assert d.var() == pytest.approx(np.var(a - b) / 300, rel=0.03)
    assert boot.mean(a).var() == pytest.approx(np.var(a) / 300, rel=0.03)
    unpaired = np.var(a) / 300 + np.var(b) / 300
    assert d.var() < 0.7 * unpaired  # pairing removes the shared difficulty
    result = difference(boot.mean(a), boot.mean(b), float(a.mean() - b.mean()))
    lo, hi = result["interval"]
    sd = math.sqrt(np.var(a - b) / 300)
    assert lo == pytest.approx(a.mean() - b.mean() - 1.96 * sd, abs=0.25 * sd)
    assert hi == pytest.approx(a.mean() - b.mean() + 1.96 * sd, abs=0.25 * sd)
    assert result["separable"] == (lo > 0 or hi < 0)


def test_difference_with_unreached_sides_and_not_separable():
    same = difference(np.array([0.1, 0.2, 0.3] * 50), np.array([0.2, 0.1, 0.3] * 50), 0.0)
    assert same["interval"] == [-0.1, 0.1] and not same["separable"]
    # a reaches the target everywhere, b in none of the resamples: a needs infinitely fewer calls
    only_a = difference(np.full(100, 0.3), np.full(100, np.inf), None)
    assert only_a["interval"] == ["-inf", "-inf"] and only_a["separable"] and only_a["reached"] == [1.0, 0.0]
    neither = difference(np.full(10, np.inf), np.full(10, np.inf), None)
    assert neither["interval"] == [None, None] and not neither["separable"]


def test_wilson_interval_matches_the_textbook_value():
    # 45 of 50: Wilson 95% interval (0.7864, 0.9565) (Newcombe 1998's formula)
    assert wilson(45, 50) == pytest.approx([0.78640, 0.95652], abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == [None, None]


def reference_calls(xs, ys, slm, target):
    """Scalar reference: walk the points sorted by (ratio, accuracy) from (0, slm)."""
    pts = sorted([(0.0, slm), *zip(xs, ys, strict=True)])
    if pts[0][1] >= target:
        return 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if y1 >= target:
            return x1 if y1 == y0 else x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return math.inf


def test_curve_figures_per_resample_equal_a_scalar_walk_per_row():
    rng = np.random.default_rng(5)
    x = rng.choice([0.0, 0.1, 0.25, 0.5], size=(400, 4)) + rng.random((400, 4)) * 0.05
    y = np.round(rng.random((400, 4)), 1)
    slm, llm, target = rng.random(400) * 0.5, 0.9 + rng.random(400) * 0.1, rng.random(400)
    calls = calls_to_reach(x, y, slm, target)
    areas = curve_area(x, y, slm, llm)
    for b in range(400):
        assert calls[b] == pytest.approx(reference_calls(x[b], y[b], slm[b], target[b]))
        pts = sorted([(0.0, slm[b]), (1.0, llm[b]), *zip(x[b], y[b], strict=True)])
        trapezoids = [(x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts)]
        assert areas[b] == pytest.approx(sum(trapezoids))
    assert np.isinf(calls).any() and (calls == 0).any()  # both edge cases met


def test_roc_auc_counts_pairs_with_ties_and_weights():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 6, 40) / 5  # many ties
    labels = rng.random(40) < 0.6
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, la in zip(scores, labels, strict=True) if la
             for b, lb in zip(scores, labels, strict=True) if not lb]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    counts = rng.integers(0, 3, size=(5, 40))  # a weight is how often an item is drawn: repeat it
    for row, auc in zip(counts, roc_auc(scores, labels, counts), strict=True):
        keep = np.repeat(np.arange(40), row)
        assert auc == pytest.approx(roc_auc(scores[keep], labels[keep]))
