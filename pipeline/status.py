"""`citer status`: where a run stands, stage by stage, read from its run directory alone."""

from __future__ import annotations

import time

from pipeline import CiterError
from pipeline.audit import audit_text
from pipeline.rundir import (
    DONE,
    EVAL_JSON,
    TRAIN_DIR,
    collect_dir,
    iteration_dir,
    read_collect_summary,
    read_eval,
    read_run_record,
    read_train_summary,
    router_dir,
)
from pipeline.runlock import read_lock
from pipeline.stages.convergence import convergence_table, evidence_summary
from pipeline.storage import StoragePath, run_path
from pipeline.tracking import read_metrics_records


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
    if lease:
        renewed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("renewed") or 0))
        lines.append(f"  lease held by {lease.get('command')} on {lease.get('host')} (pid {lease.get('pid')}): "
                     f"heartbeat {lease.get('beat')}, last at {renewed} by its clock")
    started = progress.get("iteration", 0) + (progress.get("stage") != "done")
    for k in range(max(iterations, started)):
        it = iteration_dir(run, k)
        if not it.exists():
            lines.append(f"  iter-{k:03d}: not started")
            continue
        cdir = collect_dir(run, k)
        if (cdir / DONE).is_file():
            c = read_collect_summary(cdir / DONE)
            rows = max(1, c["rows"])
            collect = (f"done, {c['rows']} tokens (case 1 {c['cases']['1'] / rows:.1%}, case 2 "
                       f"{c['cases']['2'] / rows:.1%}, case 3 {c['cases']['3'] / rows:.1%}; "
                       f"{c.get('rollouts_unfinished', 0)} rollouts unfinished)")
            if c.get("audit"):
                collect += f"\n             {audit_text(c['audit'])}"
        else:
            collect = f"{len(list(cdir.glob('part-*.parquet')))} shards written, not complete"
        tdir = it / TRAIN_DIR
        if (tdir / DONE).is_file():
            t = read_train_summary(tdir / DONE)
            train = (f"done, best epoch {t['best_epoch']} of {t['epochs_run']}, val accuracy "
                     f"{t['best']['val_accuracy']:.2%}")
        elif tdir.exists():
            train = f"{len(list(tdir.glob('checkpoint_*')))} epoch checkpoints, not complete"
        else:
            train = "not started"
        if (it / EVAL_JSON).is_file():
            e = read_eval(it / EVAL_JSON)
            evaluation = "done, AUC " + ", ".join(f"{m} {a:.3f}" for m, a in sorted(e["auc"].items(),
                                                                                   key=lambda kv: -kv[1]))
        else:
            evaluation = "not complete" if router_dir(run, k).exists() else "not started"
        state = "complete" if (it / DONE).is_file() else "in progress"
        lines += [f"  iter-{k:03d} ({state})", f"    collect: {collect}", f"    train:   {train}",
                  f"    eval:    {evaluation}"]
    records = read_metrics_records(run)
    if records:
        lines += ["", "convergence (finished iterations):", convergence_table(records),
                  *evidence_summary(records, audit=False)]  # each iteration's collect line shows its audit
    return "\n".join(lines)
