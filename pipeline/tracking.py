"""Tracking: each iteration's record in the run's metrics.jsonl and in one W&B run per citer run.

The W&B run is created on the run's first start and resumed, by the id stored in run.json, on
every later one; it logs offline unless the config or the WANDB_* variables say otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from typing import Any

from pipeline import CiterError
from pipeline.atomic import atomic_write_text
from pipeline.config import Config
from pipeline.rundir import CONVERGENCE_PNG, METRICS, read_run_record, update_run_record
from pipeline.stages.convergence import plot_convergence
from pipeline.storage import StoragePath, local_dir, local_image

log = logging.getLogger(__name__)

def tracking_settings(cfg: Config) -> dict[str, Any]:
    """Project, entity, group and mode: the config's, else the usual WANDB_* variables; offline by default."""
    t = cfg.tracking
    return {
        "project": t.project or os.environ.get("WANDB_PROJECT") or "citer",
        "entity": t.entity or os.environ.get("WANDB_ENTITY"),
        "group": t.group or os.environ.get("WANDB_RUN_GROUP"),
        "mode": t.mode or os.environ.get("WANDB_MODE") or "offline",
    }


class Tracker:
    """Writes each iteration's record to metrics.jsonl and to the run's one W&B run (created on the
    first start, resumed by the id stored in run.json on every later one)."""

    def __init__(self, cfg: Config, run: StoragePath):
        import wandb

        self.run_dir = run
        settings = tracking_settings(cfg)
        record = read_run_record(run) or {}
        run_id = record.get("wandb", {}).get("id") or secrets.token_hex(4)
        update_run_record(run, wandb={"id": run_id, **settings})
        local = local_dir(run)  # W&B's files stay on this machine, also for a run in an object store
        (local / "wandb").mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        kwargs = dict(id=run_id, resume="allow", dir=str(local), name=cfg.name, config=cfg.to_dict(),
                      project=settings["project"], entity=settings["entity"], group=settings["group"],
                      mode=settings["mode"], settings=wandb.Settings(console="off", silent=True))
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # wandb raises its own error types
            if "is in use" not in str(e):
                raise
            # One wandb-core serves every process that inherits its WANDB_SERVICE; a start killed while
            # connected to a shared one leaves its run open there until that service stops.
            where = ("the wandb-core service WANDB_SERVICE names, probably by a killed start that shared it; "
                     "unset WANDB_SERVICE or stop that service" if os.environ.get("WANDB_SERVICE")
                     else "this process's wandb-core; stop the other writer")
            raise CiterError(f"W&B run {run_id} is still held open by {where}, then start again") from None
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")
        log.info("W&B run %s (project %s, mode %s) in %s", run_id, settings["project"], settings["mode"],
                 local / "wandb")

    def log_iteration(self, metrics: dict[str, Any], result: dict[str, Any], curve: StoragePath) -> None:
        """Record the iteration, redraw convergence.png over every finished iteration, and log both
        plots with the metrics (W&B gets no null values: "not reached" is simply absent there; nor the
        records' nested summaries, which their flat metrics repeat)."""
        records = write_metrics_record(self.run_dir, metrics)
        plot_convergence(records, self.run_dir / CONVERGENCE_PNG)
        wandb = self.wandb
        table = wandb.Table(columns=["method", "threshold", "llm_call_ratio", "accuracy"],
                            data=[[p["method"], p["threshold"], p["llm_call_ratio"], p["accuracy"]]
                                  for p in result["points"]])
        k = metrics["iteration"]
        scalars = {key: v for key, v in metrics.items() if v is not None and not isinstance(v, dict)}
        self.run.log({**scalars, f"curve/iter-{k:03d}": table,
                      "curve/plot": wandb.plot.line(table, "llm_call_ratio", "accuracy", stroke="method",
                                                    title=f"Accuracy vs LLM calls, iteration {k}"),
                      "curve/image": wandb.Image(local_image(curve)),
                      "convergence/image": wandb.Image(local_image(self.run_dir / CONVERGENCE_PNG))})

    def finish(self) -> None:
        self.run.finish()


def write_metrics_record(run: StoragePath, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Put one iteration's record in metrics.jsonl, replacing an earlier record of that iteration
    (a run killed between logging and its marker logs the iteration again)."""
    path = run / METRICS
    records = [r for r in read_metrics_records(run) if r.get("iteration") != metrics["iteration"]] + [metrics]
    records.sort(key=lambda r: r["iteration"])
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def read_metrics_records(run: StoragePath) -> list[dict[str, Any]]:
    """Every finished iteration's record in metrics.jsonl, in order (none before the first)."""
    path = run / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
