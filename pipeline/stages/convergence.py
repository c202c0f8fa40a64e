"""Convergence evidence across iterations, from the run's metrics.jsonl records: a table for
`citer status` and the log, and `convergence.png`.

Per iteration: the share of case-3 (rollout) labels that flipped since the previous iteration,
the router's agreement with the previous router on held-out SLM states, the LLM-call ratio each
method needs to reach the LLM's accuracy minus 1 point, and each method's AUC. A loop that has
converged shows flips falling to 0, agreement rising to 1, and the router's figures settling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import CiterError
from pipeline.atomic import atomic_writer
from pipeline.config import Config
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
    from pipeline.shards import to_arrays

    held_out = to_arrays(read_labels(run, iteration, columns=["slm_hidden", "label"]), cfg.seed,
                         cfg.train.val_fraction, validation=True)
    x = torch.from_numpy(held_out["x"].astype(np.float32))
    keep = [load_router(router_dir(run, k)).router.prob(x).numpy() >= 0.5 for k in (iteration - 1, iteration)]
    return float((keep[0] == keep[1]).mean())


def iteration_metrics(cfg: Config, run: StoragePath, iteration: int, collect: dict, train: dict, result: dict,
                      eval_seconds: float) -> dict[str, Any]:
    """The flat per-iteration record for metrics.jsonl and W&B."""
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
    return m
