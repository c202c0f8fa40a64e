"""Convergence evidence across iterations, from the run's metrics.jsonl records: a table for
`citer status` and the log, and `convergence.png`.

Per iteration: the share of case-3 (rollout) labels that flipped since the previous iteration,
the router's agreement with the previous router on held-out SLM states, the LLM-call ratio each
method needs to reach the LLM's accuracy minus 1 point, and each method's AUC. A loop that has
converged shows flips falling to 0, agreement rising to 1, and the router's figures settling.
"""

from __future__ import annotations

from typing import Any

from pipeline.io import atomic_writer
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
