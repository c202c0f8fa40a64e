"""The paper's ablation on the demo world: rollout-labelled case 3 (CITER) against the myopic rule
(every case-3 token labelled "prefer the LLM", no rollout), side by side.

Both runs use jobs/configs/demo.yaml and differ only in `collect.case3_labels`. The rollout run is
`make demo`'s run directory (resumed, or run here if absent); the myopic run gets its own
directory. For each final router it prints the LLM-call ratio needed to reach the LLM's accuracy
minus 1 point (on the refined sweep) and the accuracy at 5% and 10% LLM tokens, the ratio of the
two LLM-call figures, and their paired difference with its 95% interval ("not separable" where it
holds 0).

Run: python benchmarks/ablation.py [--rollout-run runs/demo] [--myopic-run runs/demo-myopic]
     [--json out.json] [KEY.SUB=VALUE ...]    (overrides apply to both runs)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.stages.evaluate import accuracy_at_ratio
from pipeline.stages.evidence import compare_runs, comparison_text

ROOT = Path(__file__).resolve().parents[1]


def summarise(result: dict) -> dict:
    """The router's headline figures from an eval.json (intervals: 95%, paired bootstrap)."""
    points = [p for p in result["points"] if p["method"] == "router" and not p.get("refined")]
    slm, llm = result["slm_accuracy"], result["llm_accuracy"]
    return {
        "llm_calls_to_target": result["llm_calls_to_target"].get("router"),
        "target_accuracy": result["target_accuracy"],
        "accuracy_at_5pct": accuracy_at_ratio(points, 0.05, slm, llm),
        "accuracy_at_10pct": accuracy_at_ratio(points, 0.10, slm, llm),
        "llm_calls_to_target_interval": result["intervals"]["llm_calls_to_target"].get("router"),
        "auc": result["auc"].get("router"),
        "auc_interval": result["intervals"]["auc"].get("router"),
        "llm_accuracy": llm,
        "slm_accuracy": slm,
    }


def run(config: Path, run_dir: Path, overrides: list[str]) -> tuple[dict, float]:
    from pipeline.cli import load_job_config
    from pipeline.stages.loop import run_loop

    t0 = time.perf_counter()
    result = run_loop(load_job_config(str(config), overrides), run_dir)
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "demo.yaml")
    parser.add_argument("--rollout-run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--myopic-run", type=Path, default=ROOT / "runs" / "demo-myopic")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    os.chdir(ROOT)  # the demo config's paths are relative to the repository root
    iterations = load_config(args.config, args.overrides).loop.iterations
    rollout, rollout_s = run(args.config, args.rollout_run, args.overrides)
    # The myopic labels never change between iterations: one iteration trains its router.
    myopic, myopic_s = run(args.config, args.myopic_run,
                           [*args.overrides, "collect.case3_labels=llm", "loop.iterations=1"])
    a, b = summarise(rollout), summarise(myopic)
    fmt = lambda x: "not reached" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    ratio = (b["llm_calls_to_target"] / a["llm_calls_to_target"]
             if a["llm_calls_to_target"] and b["llm_calls_to_target"] else None)
    print(f"\nCase-3 labels: rollouts (CITER, after {iterations} iterations) vs myopic ('prefer the LLM')")
    print(f"LLM alone {100 * a['llm_accuracy']:.1f}%, SLM alone {100 * a['slm_accuracy']:.1f}%; "
          f"target = {100 * a['target_accuracy']:.1f}%\n")
    print(f"{'figure':<44}{'rollout':>12}{'myopic':>12}{'myopic/rollout':>16}")
    print(f"{'LLM tokens needed for the target accuracy':<44}{fmt(a['llm_calls_to_target']):>12}"
          f"{fmt(b['llm_calls_to_target']):>12}{'-' if ratio is None else f'{ratio:.2f}x':>16}")
    for key, name in (("accuracy_at_5pct", "accuracy at 5% LLM tokens"),
                      ("accuracy_at_10pct", "accuracy at 10% LLM tokens")):
        print(f"{name:<44}{fmt(a[key]):>12}{fmt(b[key]):>12}{'':>16}")
    print(f"{'AUC':<44}{a['auc']:>12.3f}{b['auc']:>12.3f}")
    cfg = load_config(args.config, args.overrides)
    compared = compare_runs(rollout, myopic, "router", cfg.eval.bootstrap_resamples, cfg.eval.seed)
    print("\n" + comparison_text("rollout vs myopic labels (paired over the same held-out problems)", compared,
                                  "the rollout router", "the myopic one"))
    print(f"\nruns: {args.rollout_run} ({rollout_s:.0f} s here), {args.myopic_run} ({myopic_s:.0f} s here)")
    if args.json:
        args.json.write_text(json.dumps({"rollout": a, "myopic": b, "myopic_over_rollout_llm_calls": ratio,
                                         "rollout_minus_myopic": compared,
                                         "iterations": iterations, "seconds": {"rollout": rollout_s,
                                                                               "myopic": myopic_s}}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
