"""The driver: collect -> train -> evaluate, `loop.iterations` times, in one resumable run directory.

Every stage is skipped when its marker exists, so running the same command again resumes: a
collect stage skips its complete shards, a train stage continues from its last checkpoint, and an
evaluation starts over. Iteration 0's baselines (random, confidence, query routing) are reused by
later iterations: they do not depend on the router. The run directory's layout is in pipeline.rundir.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from pipeline import CiterError
from pipeline.collect import read_rows, run_collect
from pipeline.config import Config
from pipeline.convergence import convergence_table
from pipeline.io import atomic_write_json
from pipeline.rundir import (
    CURVE_PNG,
    DONE,
    EVAL_JSON,
    TRAIN_DIR,
    check_run_config,
    collect_dir,
    default_run_dir,
    iteration_dir,
    read_run_record,
    router_dir,
    update_run_record,
)
from pipeline.runlock import read_lock
from pipeline.storage import StoragePath, run_path
from pipeline.tracking import Tracker, read_metrics_records

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Convergence evidence


def label_flips(run: StoragePath, iteration: int) -> dict[str, Any]:
    """Case-3 (rollout) labels that changed since the previous iteration, over the same tokens."""
    now = read_rows(run, iteration, columns=["case", "label"])
    before = read_rows(run, iteration - 1, columns=["case", "label"])
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
    from pipeline.train import to_arrays

    held_out = to_arrays(read_rows(run, iteration, columns=["slm_hidden", "label"]), cfg.seed,
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


# ---------------------------------------------------------------------------------------------
# The loop


def evaluate_iteration(cfg: Config, run: StoragePath, iteration: int) -> tuple[dict[str, Any], float]:
    """The iteration's eval.json (decoded now unless already there) and the seconds it took."""
    from pipeline.evaluate import run_eval

    it = iteration_dir(run, iteration)
    if (it / EVAL_JSON).is_file():
        log.info("evaluation of iteration %d is complete (%s); skipping", iteration, it / EVAL_JSON)
        return json.loads((it / EVAL_JSON).read_text()), 0.0
    baselines = None
    if iteration > 0 and (iteration_dir(run, 0) / EVAL_JSON).is_file():
        baselines = json.loads((iteration_dir(run, 0) / EVAL_JSON).read_text())
    t0 = time.perf_counter()
    result = run_eval(cfg, it, router_dir=router_dir(run, iteration), baselines=baselines)
    return result, time.perf_counter() - t0


def run_loop(cfg: Config, run: str | StoragePath | None = None) -> dict[str, Any]:
    """Run (or resume) every iteration; return the last iteration's eval result."""
    from pipeline.train import fit_router

    run = run_path(run) if run is not None else default_run_dir(cfg)
    check_run_config(cfg, run)
    tracker = Tracker(cfg, run)
    result: dict[str, Any] = {}
    try:
        for k in range(cfg.loop.iterations):
            it = iteration_dir(run, k)
            if (it / DONE).is_file():
                log.info("iteration %d is complete; skipping", k)
                result = json.loads((it / EVAL_JSON).read_text())
                continue
            log.info("iteration %d of %d: collect", k, cfg.loop.iterations)
            update_run_record(run, progress={"iteration": k, "stage": "collect"})
            collect = run_collect(cfg, run, k)
            log.info("iteration %d of %d: train", k, cfg.loop.iterations)
            update_run_record(run, progress={"iteration": k, "stage": "train"})
            train = fit_router(cfg, run, k)
            log.info("iteration %d of %d: evaluate", k, cfg.loop.iterations)
            update_run_record(run, progress={"iteration": k, "stage": "eval"})
            result, eval_seconds = evaluate_iteration(cfg, run, k)
            metrics = iteration_metrics(cfg, run, k, collect, train, result, eval_seconds)
            tracker.log_iteration(metrics, result, it / CURVE_PNG)
            atomic_write_json(it / DONE, metrics)
            log.info("iteration %d done: router AUC %.3f", k, result["auc"].get("router", float("nan")))
        update_run_record(run, progress={"iteration": cfg.loop.iterations, "stage": "done"})
    finally:
        tracker.finish()
    return result


# ---------------------------------------------------------------------------------------------
# Status


def run_status(run: str | StoragePath) -> str:
    """Where a run stands, stage by stage, as text."""
    run = run_path(run)
    record = read_run_record(run)
    if record is None:
        raise CiterError(f"{run}: not a citer run directory (no run.json)")
    cfg = record["config"]
    iterations = cfg["loop"]["iterations"]
    progress = record.get("progress", {})
    wb = record.get("wandb", {})
    lines = [f"run {run} ({cfg['name']}): {iterations} iterations, created {record.get('created', '?')}, "
             f"updated {record.get('updated', '?')}"]
    if wb:
        lines.append(f"  W&B run {wb.get('id')} (project {wb.get('project')}, mode {wb.get('mode')})")
    if progress.get("stage") == "done":
        lines.append("  finished")
    elif progress:
        lines.append(f"  last started: iteration {progress['iteration']}, {progress['stage']}")
    lease = read_lock(run)
    if lease and lease.get("expires", 0) > time.time():
        lines.append(f"  running now: {lease.get('command')} on {lease.get('host')} (pid {lease.get('pid')}), lease "
                     f"renewed {time.time() - lease.get('renewed', 0):.0f} s ago")
    started = progress.get("iteration", 0) + (progress.get("stage") != "done")
    for k in range(max(iterations, started)):
        it = iteration_dir(run, k)
        if not it.exists():
            lines.append(f"  iter-{k:03d}: not started")
            continue
        cdir = collect_dir(run, k)
        if (cdir / DONE).is_file():
            c = json.loads((cdir / DONE).read_text())
            rows = max(1, c["rows"])
            collect = (f"done, {c['rows']} tokens (case 1 {c['cases']['1'] / rows:.1%}, case 2 "
                       f"{c['cases']['2'] / rows:.1%}, case 3 {c['cases']['3'] / rows:.1%}; "
                       f"{c.get('rollouts_unfinished', 0)} rollouts unfinished)")
        else:
            collect = f"{len(list(cdir.glob('part-*.parquet')))} shards written, not complete"
        tdir = it / TRAIN_DIR
        if (tdir / DONE).is_file():
            t = json.loads((tdir / DONE).read_text())
            train = (f"done, best epoch {t['best_epoch']} of {t['epochs_run']}, val accuracy "
                     f"{t['best']['val_accuracy']:.2%}")
        elif tdir.exists():
            train = f"{len(list(tdir.glob('checkpoint_*')))} epoch checkpoints, not complete"
        else:
            train = "not started"
        if (it / EVAL_JSON).is_file():
            e = json.loads((it / EVAL_JSON).read_text())
            evaluation = "done, AUC " + ", ".join(f"{m} {a:.3f}" for m, a in sorted(e["auc"].items(),
                                                                                   key=lambda kv: -kv[1]))
        else:
            evaluation = "not complete" if router_dir(run, k).exists() else "not started"
        state = "complete" if (it / DONE).is_file() else "in progress"
        lines += [f"  iter-{k:03d} ({state})", f"    collect: {collect}", f"    train:   {train}",
                  f"    eval:    {evaluation}"]
    records = read_metrics_records(run)
    if records:
        lines += ["", "convergence (finished iterations):", convergence_table(records)]
    return "\n".join(lines)
