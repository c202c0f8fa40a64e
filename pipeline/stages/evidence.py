"""What an evaluation's figures are worth: paired bootstrap intervals and comparisons, the length
breakdown and the time per generated token, from eval.json's per-problem records.

Every point of eval.json keeps, per held-out problem, whether the answer was right and how many
tokens were generated and written by the LLM (`per_problem`). From those, `pipeline.statistics`
recomputes each figure on the same resamples of the problems:
- each point's accuracy;
- each method's AUC (its configured points, as `auc`) and the LLM-call ratio it needs to reach
  the LLM's accuracy minus 1 point (every point, refined ones included), the target moving with
  the LLM's resampled accuracy;
- differences between two methods, or between two evaluations of the same problems (another
  iteration, other labels): "not separable" where the interval contains 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.statistics import LEVEL, Resamples, calls_to_reach, curve_area, difference, interval

TARGET_GAP = 0.01  # the target accuracy is the LLM's minus 1 point
COMPARED = ("confidence", "random", "query")  # the router is compared with each


def resamples(result: dict[str, Any], count: int, seed: int) -> Resamples:
    return Resamples(result["n_examples"], count, seed)


def _single(result: dict[str, Any], method: str) -> dict[str, Any]:
    return next(p for p in result["points"] if p["method"] == method)


def method_samples(result: dict[str, Any], method: str, boot: Resamples) -> dict[str, np.ndarray]:
    """A method's AUC and LLM-call ratio to the target, per resample ((B,) each)."""
    slm = boot.mean(_single(result, "slm")["per_problem"]["correct"])
    llm = boot.mean(_single(result, "llm")["per_problem"]["correct"])
    points = [p for p in result["points"] if p["method"] == method]
    x = np.stack([boot.ratio(p["per_problem"]["llm_tokens"], p["per_problem"]["tokens"]) for p in points], axis=1)
    y = np.stack([boot.mean(p["per_problem"]["correct"]) for p in points], axis=1)
    configured = np.array([not p.get("refined") for p in points])
    return {"auc": curve_area(x[:, configured], y[:, configured], slm, llm),
            "llm_calls_to_target": calls_to_reach(x, y, slm, llm - TARGET_GAP)}


def add_intervals(result: dict[str, Any], boot: Resamples) -> None:
    """Intervals in place: each point's `accuracy_interval`; `intervals` with the single models'
    accuracies and each swept method's AUC and LLM-call ratio to the target."""
    for p in result["points"]:
        p["accuracy_interval"] = interval(boot.mean(p["per_problem"]["correct"]))
    swept = sorted(result["auc"])
    samples = {m: method_samples(result, m, boot) for m in swept}
    result["intervals"] = {
        "level": LEVEL, "resamples": boot.resamples, "kind": "paired percentile bootstrap over held-out problems",
        "slm_accuracy": _single(result, "slm")["accuracy_interval"],
        "llm_accuracy": _single(result, "llm")["accuracy_interval"],
        "auc": {m: interval(samples[m]["auc"]) for m in swept},
        "llm_calls_to_target": {m: interval(samples[m]["llm_calls_to_target"]) for m in swept},
    }
    result["comparisons"] = {f"router - {m}": compare_samples(result, samples, "router", result, samples, m)
                             for m in COMPARED if "router" in samples and m in samples}


def compare_samples(a: dict, a_samples: dict, a_method: str, b: dict, b_samples: dict,
                    b_method: str) -> dict[str, Any]:
    """The paired difference a - b of AUC and of LLM-call ratio to the target."""
    out = {}
    for figure, estimates in (("auc", "auc"), ("llm_calls_to_target", "llm_calls_to_target")):
        ea, eb = a[estimates].get(a_method), b[estimates].get(b_method)
        estimate = ea - eb if ea is not None and eb is not None else None
        out[figure] = difference(a_samples[a_method][figure], b_samples[b_method][figure], estimate)
    return out


def compare_runs(a: dict[str, Any], b: dict[str, Any], method: str, count: int, seed: int) -> dict[str, Any]:
    """`method` in evaluation `a` against the same method in evaluation `b` of the same held-out
    problems (another iteration, another run), paired by problem."""
    if a["n_examples"] != b["n_examples"] or (_single(a, "slm")["per_problem"]["prompt_tokens"]
                                              != _single(b, "slm")["per_problem"]["prompt_tokens"]):
        raise ValueError("the two evaluations are not of the same held-out problems")
    boot = resamples(a, count, seed)
    return compare_samples(a, {method: method_samples(a, method, boot)}, method,
                           b, {method: method_samples(b, method, boot)}, method)


# ---------------------------------------------------------------------------------------------
# Lengths and time


def headline_point(result: dict[str, Any], method: str) -> dict[str, Any] | None:
    """The method's first point (by LLM-call ratio) that reaches the target accuracy, or None."""
    reached = [p for p in result["points"] if p["method"] == method and p["accuracy"] >= result["target_accuracy"]]
    return min(reached, key=lambda p: (p["llm_call_ratio"], p["accuracy"]), default=None)


def quantile_buckets(lengths: np.ndarray, buckets: int) -> list[np.ndarray]:
    """Masks of `buckets` quantile buckets of `lengths`: [edge k, edge k+1), the last one closed,
    edges at observed lengths (fewer buckets where lengths tie across edges; none empty)."""
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1), method="inverted_cdf"))
    index = np.searchsorted(edges[1:-1], lengths, side="right")
    return [index == k for k in range(max(1, len(edges) - 1))]


def length_breakdown(result: dict[str, Any], buckets: int) -> dict[str, list[dict[str, Any]]]:
    """Accuracy and LLM share per quantile bucket of prompt length and of generation length (the
    LLM alone's, so every method is split over the same problems), for the single models and the
    router's and confidence routing's headline points."""
    llm = _single(result, "llm")["per_problem"]
    shown = {"slm": _single(result, "slm"), "llm": _single(result, "llm")}
    shown.update({m: p for m in ("router", "confidence") if (p := headline_point(result, m)) is not None})
    out = {}
    for name, lengths in (("prompt", llm["prompt_tokens"]), ("generation", llm["tokens"])):
        lengths = np.asarray(lengths)
        rows = []
        for mask in quantile_buckets(lengths, buckets):
            row = {"min": int(lengths[mask].min()), "max": int(lengths[mask].max()), "n": int(mask.sum())}
            for m, p in shown.items():
                pp = {k: np.asarray(v)[mask] for k, v in p["per_problem"].items()}
                row[m] = {"threshold": p["threshold"], "accuracy": float(pp["correct"].mean()),
                          "llm_share": float(pp["llm_tokens"].sum() / max(1, pp["tokens"].sum()))}
            rows.append(row)
        out[name] = rows
    return out


def time_per_token(result: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Seconds per generated token of the LLM alone and of router decoding at its headline point,
    both measured by this evaluation at the same batch size (one evaluation actor's seconds)."""
    llm, router = _single(result, "llm"), headline_point(result, "router")
    per = lambda p: p["seconds"] / p["generated_tokens"] if p and p["generated_tokens"] else None  # noqa: E731
    return {"batch_size": batch_size, "llm": per(llm), "router": per(router),
            "router_threshold": router["threshold"] if router else None}


# ---------------------------------------------------------------------------------------------
# Text


def pct(x: float | None, digits: int = 1) -> str:
    return "not reached" if x is None else f"{100 * x:.{digits}f}%"


def span(bounds: list, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """An interval as "[lo, hi]": a None end reads "not reached", an infinite one (a difference
    with a side never reached) "-inf" or "inf"."""
    fmt = f"{'+' if signed else ''}.{digits}f"
    text = lambda b: "not reached" if b is None else b if isinstance(b, str) else format(scale * b, fmt)  # noqa: E731
    return "[" + ", ".join(text(b) for b in bounds) + "]"


def _direction(d: dict[str, Any]) -> int:
    """+1 or -1 where a paired difference is separable from 0 (its sign), else 0."""
    if not d["separable"]:
        return 0
    lo = d["interval"][0]
    return 1 if lo == "inf" or not isinstance(lo, str) and lo > 0 else -1


def comparison_text(name: str, comparison: dict[str, Any], a: str, b: str) -> str:
    """One line: a paired difference of LLM tokens at the target and of AUC, with intervals and verdicts."""
    calls, auc = comparison["llm_calls_to_target"], comparison["auc"]
    reached = calls["reached"]
    if calls["difference"] is not None:
        verdict = {0: "not separable", -1: f"{a} needs fewer", 1: f"{a} needs more"}[_direction(calls)]
        text = (f"LLM tokens at the target {100 * calls['difference']:+.1f} points "
                f"{span(calls['interval'], signed=True)}: {verdict}")
    else:
        text = (f"LLM tokens at the target: {a} {'reaches it' if reached[0] >= 0.5 else 'does not reach it'} "
                f"({pct(reached[0], 0)} of resamples), {b} {'does' if reached[1] >= 0.5 else 'does not'} "
                f"({pct(reached[1], 0)})")
    verdict = {0: "not separable", 1: f"{a} higher", -1: f"{a} lower"}[_direction(auc)]
    return f"{name}: {text}; AUC {auc['difference']:+.3f} {span(auc['interval'], 1.0, 3, True)}: {verdict}"


def evidence_lines(result: dict[str, Any]) -> list[str]:
    """Intervals, comparisons, the length breakdown and the time per token, as text lines."""
    iv = result["intervals"]
    lines = [f"95% intervals ({iv['kind']}, {result['n_examples']} problems, {iv['resamples']} resamples): "
             f"SLM alone {pct(result['slm_accuracy'])} {span(iv['slm_accuracy'])}, LLM alone "
             f"{pct(result['llm_accuracy'])} {span(iv['llm_accuracy'])}"]
    calls = result["llm_calls_to_target"]
    lines.append(f"  LLM tokens for {pct(result['target_accuracy'])}: " + ", ".join(
        f"{m} {pct(calls[m])} {span(iv['llm_calls_to_target'][m])}" for m in sorted(calls)))
    lines.append("  AUC: " + ", ".join(f"{m} {result['auc'][m]:.3f} {span(iv['auc'][m], 1.0, 3)}"
                                       for m in sorted(result["auc"])))
    for name, comparison in result.get("comparisons", {}).items():
        a, b = name.split(" - ")
        lines.append(comparison_text(f"{a} vs {b}", comparison, a, b))
    lines += length_lines(result.get("by_length", {}))
    t = result.get("time_per_token") or {}
    if t.get("llm"):
        router = (f"router at threshold {t['router_threshold']:g} {1000 * t['router']:.2f} ms"
                  if t.get("router") else "router: target not reached")
        lines.append(f"time per generated token at batch {t['batch_size']} (one evaluation actor): LLM alone "
                     f"{1000 * t['llm']:.2f} ms, {router}")
    return lines


def length_lines(by_length: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The length breakdown as two small tables: accuracy / LLM share per bucket and method."""
    lines = []
    for name, rows in by_length.items():
        methods = [m for m in ("slm", "llm", "router", "confidence") if rows and m in rows[0]]
        what = "prompt length" if name == "prompt" else "generation length (the LLM alone's, for every method)"
        lines.append(f"accuracy / LLM share by {what}, in quantile buckets of tokens:")
        lines.append(f"  {'tokens':>12}{'n':>6}" + "".join(f"{m:>20}" for m in methods))
        for r in rows:
            cells = "".join(f"{pct(r[m]['accuracy']) + ' / ' + pct(r[m]['llm_share']):>20}" for m in methods)
            lines.append(f"  {str(r['min']) + '-' + str(r['max']):>12}{r['n']:>6}{cells}")
    return lines
