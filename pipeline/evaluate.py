"""Held-out evaluation: accuracy against the share of tokens the LLM produced, per method.

Each method gives points (llm_call_ratio, accuracy): the router at a sweep of thresholds, and the
baselines (SLM alone, LLM alone, random, confidence and query-level routing). A method's AUC is
the area under its accuracy-vs-ratio curve on [0, 1]. The curve is anchored at (0, SLM accuracy)
and (1, LLM accuracy), where every token-level method ends up at its extreme thresholds.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.decoding import (
    ConfidencePolicy,
    Generation,
    LLMOnly,
    Policy,
    RandomPolicy,
    RouterPolicy,
    Schedule,
    SLMOnly,
    decode,
    llm_call_ratio,
    speculative_decode,
)
from pipeline.io import atomic_write_json, atomic_writer
from pipeline.models import ModelPair, encode_prompts, flops_per_token, load_pair
from pipeline.router import Router, load_router
from pipeline.tasks import Example, extract_answer, load_examples

log = logging.getLogger(__name__)


def score(pair: ModelPair, task_format: str, gens: list[Generation], examples: list[Example]) -> list[bool | None]:
    """Per row: whether the generated text (special tokens dropped) gives the gold answer, or None
    when no answer can be read from it (scored wrong, and counted as `no_answer`)."""
    tok = pair.tokenizer
    answers = [extract_answer(task_format, tok.decode(g.tokens, skip_special_tokens=True), labels=ex.labels)
               for g, ex in zip(gens, examples, strict=True)]
    return [None if a is None else a == ex.answer for a, ex in zip(answers, examples, strict=True)]


def make_point(method: str, threshold: float | None, gens: list[Generation], scored: list[bool | None],
               seconds: float, counts: dict[str, int | None] | None = None) -> dict[str, Any]:
    """One eval point. `counts` are what the models really did (`Decoding.counts()`): passes and
    tokens each model read, and the FLOPs those tokens cost."""
    n_tokens = sum(len(g.tokens) for g in gens)
    return {
        "method": method,
        "threshold": threshold,
        "llm_call_ratio": llm_call_ratio(gens),
        **(counts or {}),
        "accuracy": sum(x is True for x in scored) / len(scored),
        "no_answer": sum(x is None for x in scored),
        "n": len(scored),
        "generated_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
    }


def run_policy(pair: ModelPair, policy: Policy, prompts: list[list[int]], examples: list[Example],
               cfg: Config, threshold: float | None) -> tuple[dict[str, Any], list[Generation]]:
    """Decode every prompt under `policy`, score, and time it."""
    label = policy.name if threshold is None else f"{policy.name} @ {threshold:g}"
    t0 = time.perf_counter()
    done = decode(pair.slm, pair.llm, prompts, policy, **pair.decode_kwargs, max_new_tokens=cfg.eval.max_new_tokens,
                  batch_size=cfg.eval.batch_size, schedule=Schedule.of(cfg.decode), desc=label)
    seconds = time.perf_counter() - t0
    counts = {**done.counts(), "flops": flops_per_token(pair.slm) * done.slm_tokens_processed
              + flops_per_token(pair.llm) * done.llm_tokens_processed}
    gens = done.generations
    return make_point(policy.name, threshold, gens, score(pair, cfg.task.format, gens, examples), seconds,
                      counts), gens


def query_points(slm_run: tuple[dict, list[Generation], list[bool]], llm_run: tuple[dict, list[Generation], list[bool]],
                 fractions: list[float]) -> list[dict[str, Any]]:
    """Query-level routing from the two single-model runs: score each query by the SLM's mean
    top-1 probability over its own answer (the first pass), and give the `fraction` of queries
    with the lowest scores wholly to the LLM. Time = the SLM pass + those rows' share of the LLM's.
    Tokens each model read are the rows' own; passes are not measured (they depend on how the
    chosen rows would be batched) and left None."""
    (slm_point, slm_gens, slm_ok), (llm_point, llm_gens, llm_ok) = slm_run, llm_run
    scores = [sum(g.slm_confidence) / len(g.slm_confidence) for g in slm_gens]
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    llm_tokens_total = max(1, sum(len(g.tokens) for g in llm_gens))
    points = []
    for fraction in fractions:
        to_llm = set(order[: math.ceil(fraction * len(order))])
        gens, ok = [], []
        for i in range(len(scores)):
            g = llm_gens[i] if i in to_llm else slm_gens[i]
            gens.append(Generation(tokens=g.tokens, from_llm=g.from_llm,
                                   llm_tokens_processed=g.llm_tokens_processed if i in to_llm else 0,
                                   slm_tokens_processed=slm_gens[i].slm_tokens_processed))
            ok.append(llm_ok[i] if i in to_llm else slm_ok[i])
        llm_share = sum(len(llm_gens[i].tokens) for i in to_llm) / llm_tokens_total
        seconds = slm_point["seconds"] + llm_share * llm_point["seconds"]
        counts = {"llm_passes": None, "slm_passes": None,
                  "llm_tokens_processed": sum(g.llm_tokens_processed for g in gens),
                  "slm_tokens_processed": sum(g.slm_tokens_processed for g in gens)}
        points.append(make_point("query", fraction, gens, ok, seconds, counts))
    return points


def area_under_curve(points: list[dict[str, Any]], slm_accuracy: float, llm_accuracy: float) -> float:
    """Trapezoid area under accuracy vs llm_call_ratio on [0, 1], anchored at both single models."""
    xy = sorted([(0.0, slm_accuracy), (1.0, llm_accuracy)] + [(p["llm_call_ratio"], p["accuracy"]) for p in points])
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False))


def accuracy_at_ratio(points: list[dict[str, Any]], ratio: float, slm_accuracy: float, llm_accuracy: float) -> float:
    """Accuracy of a method at a given LLM-call ratio, interpolated linearly along its curve."""
    xy = sorted([(0.0, slm_accuracy), (1.0, llm_accuracy)] + [(p["llm_call_ratio"], p["accuracy"]) for p in points])
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        if x0 <= ratio <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    return xy[-1][1]


def calls_to_reach(points: list[dict[str, Any]], target: float, slm_accuracy: float) -> float | None:
    """The smallest LLM-call ratio at which a method's measured curve (from the SLM alone at 0)
    reaches `target` accuracy, interpolated linearly between measured points; None when no
    measured point reaches it (the curve is never extended past its last point)."""
    xy = sorted([(0.0, slm_accuracy)] + [(p["llm_call_ratio"], p["accuracy"]) for p in points])
    if xy[0][1] >= target:
        return 0.0
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        if y1 >= target:
            return x1 if y1 == y0 else x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def headline(points: list[dict[str, Any]], methods: list[str], slm_accuracy: float,
             llm_accuracy: float) -> dict[str, Any]:
    """The paper's headline at equal accuracy: per method, the LLM-call ratio needed to reach the
    LLM's accuracy minus 1 point, and how many fewer LLM calls the router needs than each baseline
    there (1 - router's ratio / baseline's; None where either does not reach it)."""
    target = llm_accuracy - 0.01
    calls = {m: calls_to_reach([p for p in points if p["method"] == m], target, slm_accuracy) for m in methods}
    router = calls.get("router")
    reduction = {m: (1.0 - router / calls[m] if router is not None and calls[m] else None)
                 for m in methods if m != "router"} if "router" in calls else {}
    return {"target_accuracy": target, "llm_calls_to_target": calls, "llm_call_reduction_at_target": reduction}


BASELINES = ("random", "confidence", "query")


def run_eval(cfg: Config, out_dir: str | Path, router_dir: str | Path | None = None,
             baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the configured methods on the held-out split; write curve.png, then eval.json.

    With `baselines` (an earlier eval.json of the same config), its random/confidence/query points
    are reused instead of decoded again: they do not depend on the router."""
    examples = load_examples(cfg.task, "eval", limit=cfg.eval.n_examples)  # bad data fails before loading models
    pair = load_pair(cfg.models)
    router = load_router(router_dir, expected_input_size=pair.hidden_size, device=pair.device).router \
        if router_dir else None
    prompts = encode_prompts(pair.tokenizer, [ex.prompt for ex in examples], cfg.models.chat_template,
                             cfg.task.system_prompt)
    log.info("evaluating on %d held-out examples from %s", len(examples), cfg.task.eval_path)
    result = evaluate_methods(pair, router, prompts, examples, cfg, baselines)
    out = Path(out_dir)
    plot_curve(result, out / "curve.png")
    atomic_write_json(out / "eval.json", result)  # last: its presence marks the stage complete
    log.info("wrote %s and %s", out / "eval.json", out / "curve.png")
    return result


def evaluate_methods(pair: ModelPair, router: Router | None, prompts: list[list[int]], examples: list[Example],
                     cfg: Config, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """All configured methods' points, AUCs and summary, as written to eval.json."""
    methods = set(cfg.eval.methods)
    if router is None:
        methods.discard("router")
    reused = [p for p in (baselines or {}).get("points", []) if p["method"] in BASELINES and p["method"] in methods]
    methods -= {p["method"] for p in reused}
    singles = {}
    for policy in (SLMOnly(), LLMOnly()):  # always run: they anchor every curve
        point, gens = run_policy(pair, policy, prompts, examples, cfg, None)
        singles[policy.name] = (point, gens, score(pair, cfg.task.format, gens, examples))
    points = [singles[m][0] for m in ("slm", "llm") if m in methods]
    sweeps: list[tuple[Policy, float]] = []
    if "router" in methods:
        sweeps += [(RouterPolicy(router, t), t) for t in cfg.eval.thresholds]
    if "random" in methods:
        sweeps += [(RandomPolicy(r, cfg.eval.seed), r) for r in cfg.eval.random_ratios]
    if "confidence" in methods:
        sweeps += [(ConfidencePolicy(t), t) for t in cfg.eval.confidence_thresholds]
    for policy, threshold in sweeps:
        points.append(run_policy(pair, policy, prompts, examples, cfg, threshold)[0])
    if "query" in methods:
        points += query_points(singles["slm"], singles["llm"], cfg.eval.query_fractions)
    if "speculative" in methods:
        t0 = time.perf_counter()
        done = speculative_decode(pair.slm, pair.llm, prompts, eos_ids=pair.eos_ids, pad_id=pair.tokenizer.pad_token_id,
                                  max_new_tokens=cfg.eval.max_new_tokens, desc="speculative")
        points.append(make_point("speculative", None, done.generations,
                                 score(pair, cfg.task.format, done.generations, examples), time.perf_counter() - t0,
                                 done.counts()))
    points += reused
    slm_acc, llm_acc = singles["slm"][0]["accuracy"], singles["llm"][0]["accuracy"]
    swept = sorted({p["method"] for p in points} - {"slm", "llm", "speculative"})
    auc = {m: area_under_curve([p for p in points if p["method"] == m], slm_acc, llm_acc) for m in swept}
    at_ratio = {m: {f"{r:.1f}": accuracy_at_ratio([p for p in points if p["method"] == m], r, slm_acc, llm_acc)
                    for r in (0.1, 0.2, 0.3)} for m in swept}
    return {"n_examples": len(examples), "slm_accuracy": slm_acc, "llm_accuracy": llm_acc, "points": points,
            "auc": auc, "accuracy_at_llm_ratio": at_ratio, **headline(points, swept, slm_acc, llm_acc)}


def plot_curve(result: dict[str, Any], path: str | Path) -> None:
    """Accuracy vs LLM-call ratio, one line per method, the single models marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    slm_acc, llm_acc = result["slm_accuracy"], result["llm_accuracy"]
    styles = {"router": ("C0", "o", 2.5), "random": ("C7", "s", 1.2), "confidence": ("C2", "^", 1.2),
              "query": ("C4", "D", 1.2)}
    for method, (color, marker, width) in styles.items():
        pts = sorted((p["llm_call_ratio"], p["accuracy"]) for p in result["points"] if p["method"] == method)
        if not pts:
            continue
        xs, ys = zip(*([(0.0, slm_acc)] + pts + [(1.0, llm_acc)]), strict=True)
        auc = result["auc"].get(method)
        ax.plot(xs, ys, color=color, marker=marker, lw=width, ms=5, label=f"{method} (AUC {auc:.3f})")
    ax.scatter([0.0], [slm_acc], s=120, color="C3", zorder=5, label=f"SLM alone ({slm_acc:.1%})")
    ax.scatter([1.0], [llm_acc], s=120, color="C1", zorder=5, label=f"LLM alone ({llm_acc:.1%})")
    ax.set_xlabel("LLM call ratio (share of generated tokens produced by the LLM)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy vs LLM calls ({result['n_examples']} held-out examples)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_writer(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """The eval points as an aligned text table, then each method's AUC."""
    header = (f"{'method':<12}{'threshold':>10}{'LLM tokens':>12}{'LLM passes':>12}{'LLM read':>10}"
              f"{'accuracy':>10}{'no answer':>11}{'n':>6}{'tok/s':>9}")
    lines = [header, "-" * len(header)]
    dash = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for p in result["points"]:
        lines.append(f"{p['method']:<12}{dash(p['threshold'], 'g'):>10}{100 * p['llm_call_ratio']:>11.1f}%"
                     f"{dash(p.get('llm_passes'), ',d'):>12}{dash(p.get('llm_tokens_processed'), ',d'):>10}"
                     f"{100 * p['accuracy']:>9.1f}%{p.get('no_answer', 0):>11}{p['n']:>6}"
                     f"{dash(p.get('tokens_per_s'), '.0f'):>9}")
    if result.get("auc"):
        order = sorted(result["auc"], key=lambda m: -result["auc"][m])
        lines.append("")
        lines.append("AUC of accuracy vs LLM call ratio: " + ", ".join(f"{m} {result['auc'][m]:.3f}" for m in order))
        at = result.get("accuracy_at_llm_ratio", {})
        if at:
            cells = {m: " / ".join(f"{100 * at[m][r]:.1f}%" for r in ("0.1", "0.2", "0.3")) for m in order if m in at}
            lines.append("accuracy at 10% / 20% / 30% LLM tokens: " + "; ".join(f"{m} {c}" for m, c in cells.items()))
    if result.get("llm_calls_to_target"):
        lines.append(headline_text(result))
    return "\n".join(lines)


def headline_text(result: dict[str, Any]) -> str:
    """One line: LLM calls each method needs for the LLM's accuracy minus 1 point, and the router's
    reduction against each baseline there."""
    fmt = lambda x: "not reached" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    calls = result["llm_calls_to_target"]
    text = (f"LLM tokens needed for {100 * result['target_accuracy']:.1f}% accuracy (LLM alone - 1 point): "
            + ", ".join(f"{m} {fmt(calls[m])}" for m in sorted(calls, key=lambda m: (calls[m] is None, calls[m]))))
    reduction = {m: r for m, r in result.get("llm_call_reduction_at_target", {}).items() if r is not None}
    if reduction:
        text += "; the router needs " + ", ".join(f"{abs(100 * r):.0f}% {'fewer' if r >= 0 else 'more'} than {m}"
                                              for m, r in reduction.items())
    return text
