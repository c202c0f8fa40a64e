"""Convergence evidence across iterations, from the run's metrics.jsonl records: a table for
`citer status` and the log, and `convergence.png`.

Per iteration: the share of case-3 (rollout) labels that flipped since the previous iteration,
the router's agreement with the previous router on held-out SLM states, the LLM-call ratio each
method needs to reach the LLM's accuracy minus 1 point, and each method's AUC. A loop that has
converged shows flips falling to 0, agreement rising to 1, and the router's figures settling.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline import CiterError
from pipeline.atomic import atomic_writer
from pipeline.config import Config
from pipeline.cost import break_even, cost_metrics
from pipeline.rundir import router_dir
from pipeline.shards import read_labels
from pipeline.storage import StoragePath

METHODS = ("router", "confidence", "random", "query")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def convergence_table(records: list[dict[str, Any]]) -> str:
    """One row per finished iteration: flips, agreement, LLM calls to the target, AUC."""
    methods = [m for m in METHODS if any(f"eval/auc/{m}" in r for r in records)]
    header = (f"{'iter':>4}  {'case 3':>7}  {'flipped':>8}  {'agreement':>9}  "
              + "  ".join(f"{'calls ' + m:>17}" for m in methods) + "  "
              + "  ".join(f"{'AUC ' + m:>15}" for m in methods))
    lines = [header, "-" * len(header)]
    for r in sorted(records, key=lambda r: r["iteration"]):
        calls = "  ".join(f"{_calls(r.get(f'eval/llm_calls_to_target/{m}'), f'eval/auc/{m}' in r):>17}"
                          for m in methods)
        aucs = "  ".join(f"{r[f'eval/auc/{m}']:>15.3f}" if f"eval/auc/{m}" in r else f"{'-':>15}" for m in methods)
        flips, agree = r.get("collect/case3_flip_share"), r.get("router/agreement_with_previous")
        lines.append(f"{r['iteration']:>4}  {_pct(r.get('collect/case3_share')):>7}  {_pct(flips):>8}  "
                     f"{_pct(agree):>9}  {calls}  {aucs}")
    if records and "eval/target_accuracy" in records[-1]:
        target = 100 * records[-1]["eval/target_accuracy"]
        lines.append(f"calls = share of tokens from the LLM needed for {target:.1f}% accuracy (the LLM's minus 1 "
                     "point); flipped = case-3 labels changed since the previous iteration; agreement = held-out "
                     "states where this router and the previous one decide alike")
    return "\n".join(lines)


def evidence_summary(records: list[dict[str, Any]], audit: bool = True) -> list[str]:
    """Lines after the convergence table: each iteration's router against the previous one's, the
    shortcut audit per iteration (unless `audit` is off), the run's cost so far and the break-even."""
    from pipeline.audit import audit_text
    from pipeline.cost import STAGES, break_even_text
    from pipeline.stages.evidence import comparison_text

    records = sorted(records, key=lambda r: r["iteration"])
    lines = [comparison_text(f"iteration {r['iteration']} vs {r['iteration'] - 1} (router, same problems)",
                             r["router/vs_previous"], f"iteration {r['iteration']}", "the previous")
             for r in records if r.get("router/vs_previous")]
    lines += [f"iteration {r['iteration']} {audit_text(r['collect/audit'])}" for r in records
              if audit and r.get("collect/audit")]
    if records and "cost/total/wall_seconds" in records[-1]:
        last = records[-1]
        walls = ", ".join(f"{stage} {sum(r.get(f'cost/{stage}/wall_seconds', 0.0) for r in records):,.0f} s"
                          for stage in STAGES)
        lines.append(f"cost of {len(records)} iterations: {walls} wall-clock; {last['cost/total/cpu_seconds']:,.0f} "
                     f"CPU-seconds, {last['cost/total/gpu_seconds']:,.0f} GPU-seconds held")
        if last.get("breakeven"):
            lines.append(break_even_text(last["breakeven"]))
    return lines


def _calls(value: float | None, evaluated: bool) -> str:
    if not evaluated:
        return "-"
    return "not reached" if value is None else f"{100 * value:.1f}%"


def plot_convergence(records: list[dict[str, Any]], path: str | StoragePath) -> None:
    """Three panels against the iteration: label flips and router agreement; LLM calls needed to
    reach the LLM's accuracy minus 1 point; AUC. Baselines do not depend on the router: they are
    drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["iteration"])
    its = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=100)
    ax = axes[0]
    for key, label, color in (("collect/case3_flip_share", "case-3 labels flipped", "C3"),
                              ("router/agreement_with_previous", "agreement with previous router", "C0")):
        pts = [(i, r[key]) for i, r in zip(its, records, strict=True) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Labels and router between iterations")
    styles = {"router": ("C0", "-", 2.5), "confidence": ("C2", "--", 1.2), "random": ("C7", "--", 1.2),
              "query": ("C4", "--", 1.2)}
    for ax, prefix, title in ((axes[1], "eval/llm_calls_to_target/", "LLM tokens needed for LLM accuracy - 1 pt"),
                              (axes[2], "eval/auc/", "AUC of accuracy vs LLM-call ratio")):
        for m, (color, style, width) in styles.items():
            pts = [(i, r[prefix + m]) for i, r in zip(its, records, strict=True) if r.get(prefix + m) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=color, ls=style, lw=width, label=m)
        ax.set_title(title)
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_writer(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def label_flips(run: StoragePath, iteration: int) -> dict[str, Any]:
    """Case-3 (rollout) labels that changed since the previous iteration, over the same tokens."""
    now = read_labels(run, iteration, columns=["case", "label"])
    before = read_labels(run, iteration - 1, columns=["case", "label"])
    if not now.select(["example_id", "position"]).equals(before.select(["example_id", "position"])):
        raise CiterError(f"{run}: iterations {iteration - 1} and {iteration} labelled different tokens")
    case3 = np.asarray(now.column("case")) == 3
    flipped = (np.asarray(now.column("label")) != np.asarray(before.column("label"))) & case3
    return {"case3_flips": int(flipped.sum()), "case3_flip_share": float(flipped.sum() / max(1, case3.sum()))}


def router_agreement(cfg: Config, run: StoragePath, iteration: int) -> float:
    """Share of the held-out (validation) tokens' SLM states on which this iteration's router and
    the previous one make the same call (P(SLM is enough) >= 0.5)."""
    import torch

    from pipeline.router import load_router
    from pipeline.shards import feature_columns, to_arrays

    features = cfg.router.features
    held_out = to_arrays(read_labels(run, iteration, columns=[*feature_columns(features), "label"]), cfg.seed,
                         cfg.train.val_fraction, validation=True, features=features)
    x = torch.from_numpy(held_out["x"].astype(np.float32))
    keep = [load_router(router_dir(run, k)).router.prob(x).numpy() >= 0.5 for k in (iteration - 1, iteration)]
    return float((keep[0] == keep[1]).mean())


def _number(x: Any) -> float | None:
    """An interval end as a metric: infinite ends ("inf", "-inf") and None are None."""
    return None if x is None or isinstance(x, str) else float(x)


def audit_metrics(audit: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The shortcut audit per case: agreement, its interval, and counts."""
    m: dict[str, Any] = {"collect/audit": audit} if audit else {}
    for key, a in (audit or {}).items():
        prefix = f"collect/audit/{'case' + key if key != 'all' else 'all'}"
        m.update({f"{prefix}/agreement": a["agreement"], f"{prefix}/agreement_low": a["interval"][0],
                  f"{prefix}/agreement_high": a["interval"][1], f"{prefix}/audited": a["audited"],
                  f"{prefix}/decided": a["decided"], f"{prefix}/neither": a["neither"]})
    return m


def comparison_metrics(prefix: str, comparison: dict[str, Any]) -> dict[str, Any]:
    """A paired comparison (`evidence.compare_samples`) as metrics: difference, interval, separable."""
    m: dict[str, Any] = {}
    for figure, d in comparison.items():
        lo, hi = (_number(x) for x in d["interval"])
        m.update({f"{prefix}/{figure}_difference": d["difference"], f"{prefix}/{figure}_separable": d["separable"],
                  f"{prefix}/{figure}_low": lo, f"{prefix}/{figure}_high": hi})
    return m


def evidence_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's intervals and comparisons as metrics."""
    iv = result.get("intervals")
    if not iv:
        return {}
    m: dict[str, Any] = {}
    for model in ("slm", "llm"):
        m[f"eval/{model}_accuracy_low"], m[f"eval/{model}_accuracy_high"] = iv[f"{model}_accuracy"]
    for figure in ("auc", "llm_calls_to_target"):
        for method, (lo, hi) in iv[figure].items():
            m[f"eval/{figure}_low/{method}"], m[f"eval/{figure}_high/{method}"] = lo, hi
    for name, comparison in result.get("comparisons", {}).items():
        m.update(comparison_metrics(f"eval/compare/{name.replace(' - ', '_vs_')}", comparison))
    return m


def previous_comparison(cfg: Config, run: StoragePath, iteration: int, result: dict[str, Any]) -> dict[str, Any]:
    """This iteration's router against the previous one's, paired over the same held-out problems."""
    from pipeline.rundir import EVAL_JSON, iteration_dir
    from pipeline.stages.evidence import compare_runs

    before = iteration_dir(run, iteration - 1) / EVAL_JSON
    if "router" not in result["auc"] or not before.is_file():
        return {}
    previous = json.loads(before.read_text())
    if "intervals" not in previous or "router" not in previous["auc"]:
        return {}
    comparison = compare_runs(result, previous, "router", cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return {"router/vs_previous": comparison, **comparison_metrics("router/vs_previous", comparison)}


def iteration_metrics(cfg: Config, run: StoragePath, iteration: int, collect: dict, train: dict, result: dict,
                      eval_seconds: float, earlier: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The flat per-iteration record for metrics.jsonl and W&B (`earlier`: the previous
    iterations' records, for the run's cost so far)."""
    rows = max(1, collect["rows"])
    best = train["best"]
    m: dict[str, Any] = {
        "iteration": iteration,
        "collect/rows": collect["rows"],
        **{f"collect/case{c}_share": collect["cases"][str(c)] / rows for c in (1, 2, 3)},
        "collect/label_1_share": collect["label_1_share"],
        "collect/case3_dropped_by_cap": collect["case3_dropped_by_cap"],
        "collect/rollouts_unfinished": collect.get("rollouts_unfinished", 0),
        "collect/seconds": collect["seconds"],
        "collect/rows_per_s": collect["rows_per_s"],
        "train/train_loss": best["train_loss"],
        "train/val_loss": best["val_loss"],
        "train/val_accuracy": best["val_accuracy"],
        "train/val_majority_rate": best["val_majority_rate"],
        "train/val_precision_llm": best["val_precision_llm"],
        "train/val_recall_llm": best["val_recall_llm"],
        "train/best_epoch": train["best_epoch"],
        "train/epochs_run": train["epochs_run"],
        "train/seconds": train["fit_seconds"],
        "train/rows_per_s": float(np.median([m["train_rows_per_s"] for m in train["history"]])),
        "eval/seconds": eval_seconds,
        "eval/slm_accuracy": result["slm_accuracy"],
        "eval/llm_accuracy": result["llm_accuracy"],
        **{f"eval/auc/{method}": auc for method, auc in result["auc"].items()},
        **{f"eval/accuracy_at_{int(100 * float(r))}pct_llm/{method}": acc
           for method, by_ratio in result["accuracy_at_llm_ratio"].items() for r, acc in by_ratio.items()},
        "eval/target_accuracy": result["target_accuracy"],
        **{f"eval/llm_calls_to_target/{method}": calls for method, calls in result["llm_calls_to_target"].items()},
        **{f"eval/llm_call_reduction/{method}": r for method, r in result["llm_call_reduction_at_target"].items()},
    }
    router_points = [p for p in result["points"] if p["method"] == "router"]
    if router_points:
        m["eval/router_tokens_per_s"] = float(np.mean([p["tokens_per_s"] or 0.0 for p in router_points]))
    if iteration > 0:
        flips = label_flips(run, iteration)
        m["collect/case3_flips"], m["collect/case3_flip_share"] = flips["case3_flips"], flips["case3_flip_share"]
        m["router/agreement_with_previous"] = router_agreement(cfg, run, iteration)
        m.update(previous_comparison(cfg, run, iteration, result))
    m.update(audit_metrics(collect.get("audit")))
    m.update(evidence_metrics(result))
    m.update(cost_and_break_even(cfg, collect, train, result, eval_seconds, list(earlier)))
    return m


def cost_and_break_even(cfg: Config, collect: dict, train: dict, result: dict, eval_seconds: float,
                        earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """Each stage's cost, the run's so far, the time per generated token and the break-even."""
    walls = {"collect": collect.get("wall_seconds", collect["seconds"]),
             "train": train.get("wall_seconds", train["fit_seconds"]),
             "evaluate": result.get("wall_seconds", eval_seconds)}
    m: dict[str, Any] = cost_metrics(cfg, walls, earlier)
    per_token = result.get("time_per_token") or {}
    m["eval/seconds_per_token/llm"], m["eval/seconds_per_token/router"] = per_token.get("llm"), per_token.get("router")
    b = break_even(cfg, {"cpu_seconds": m["cost/total/cpu_seconds"], "gpu_seconds": m["cost/total/gpu_seconds"]},
                   per_token)
    m.update({"breakeven": b, "breakeven/tokens": b["tokens"], "breakeven/never": b["never"],
              "breakeven/saving_per_token": b["saving_per_token"]})
    return m
