"""Tracking: each iteration's record in the run's metrics.jsonl and in one W&B run per citer run.

The W&B run is created on the run's first start and resumed, by the id stored in run.json, on
every later one; it logs offline unless the config or the WANDB_* variables say otherwise. W&B
writes its files on the driver's machine; for a run in an object store they are copied into
RUN/wandb/ after every iteration and at the end (`Tracker.persist`), so that they outlive the
machine (a RayJob's cluster is deleted with its disks): `wandb sync` uploads them from a copy.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from typing import Any

from pipeline import CiterError
from pipeline.atomic import atomic_write_text, atomic_writer
from pipeline.config import Config
from pipeline.rundir import DONE, METRICS, read_run_record, update_run_record
from pipeline.runlock import guard_for
from pipeline.storage import ObjectPath, StoragePath, local_dir, local_image, read_json

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
    first start, resumed by the id stored in run.json on every later one), in an opened run: the
    W&B run's config is the one run.json records."""

    def __init__(self, cfg: Config, run: StoragePath):
        import wandb

        self.run_dir = run
        settings = tracking_settings(cfg)
        record = read_run_record(run)
        if record is None:
            raise CiterError(f"{run}: no run.json; a run is tracked once it is opened (stages.loop.open_run)")
        run_id = record.get("wandb", {}).get("id") or secrets.token_hex(4)
        update_run_record(run, wandb={"id": run_id, **settings})
        local = local_dir(run)  # W&B's files stay on this machine, also for a run in an object store
        (local / "wandb").mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        kwargs = dict(id=run_id, resume="allow", dir=str(local), name=cfg.name, config=record["config"],
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
        self._copied: dict[str, tuple[int, int]] = {}

    def log_iteration(self, metrics: dict[str, Any], result: dict[str, Any], curve: StoragePath,
                      convergence: StoragePath) -> None:
        """Log an iteration's metrics, its curve and the convergence plot (W&B gets no null values:
        "not reached" is simply absent there; nor the records' nested summaries, which their flat
        metrics repeat)."""
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
                      "convergence/image": wandb.Image(local_image(convergence))})
        self.persist()

    def persist(self) -> None:
        """For a run in an object store, copy W&B's files of this machine that changed since the last
        copy into RUN/wandb/ (each file whole; those W&B still appends to as they are now)."""
        if not isinstance(self.run_dir, ObjectPath):
            return  # a local run keeps them in RUN/wandb itself
        local = local_dir(self.run_dir) / "wandb"
        for f in sorted(local.rglob("*")):
            if not f.is_file() or f.is_symlink() or "tmp" in f.relative_to(local).parts:
                continue
            name, stat = f.relative_to(local).as_posix(), f.stat()
            if self._copied.get(name) == (stat.st_size, stat.st_mtime_ns):
                continue
            with atomic_writer(self.run_dir / "wandb" / name) as tmp:
                shutil.copyfile(f, tmp)
            self._copied[name] = (stat.st_size, stat.st_mtime_ns)

    def finish(self) -> None:
        self.run.finish()
        try:
            self.persist()
        except CiterError as e:  # the lease was lost: nothing more is written into the run
            log.warning("W&B's files were not copied into %s: %s", self.run_dir, e)


def write_metrics_record(run: StoragePath, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Put one iteration's record in metrics.jsonl with those of the other finished iterations,
    read from their markers (iter-NNN/_DONE holds the same record), so that a metrics.jsonl that
    was lost or damaged is written whole again."""
    guard = guard_for(run / METRICS)
    records = [r for r in finished_records(run) if r.get("iteration") != metrics["iteration"]]
    records.append({**metrics, "lease": guard.token} if guard is not None else metrics)
    records.sort(key=lambda r: r["iteration"])
    atomic_write_text(run / METRICS, "".join(json.dumps(r) + "\n" for r in records))
    return records


def finished_records(run: StoragePath) -> list[dict[str, Any]]:
    """The records in the finished iterations' markers (iter-NNN/_DONE), in order."""
    records = [read_json(d, "the iteration's metrics record", "delete it to finish that iteration again")
               for d in run.glob(f"iter-*/{DONE}")]
    return sorted(records, key=lambda r: r["iteration"])


def read_metrics_records(run: StoragePath) -> list[dict[str, Any]]:
    """Every finished iteration's record in metrics.jsonl, in order (none before the first; the
    iterations' markers when the file is missing); a line that is not a JSON record is named in the
    error."""
    path = run / METRICS
    if not path.is_file():
        return finished_records(run)
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["iteration"]  # noqa: B018 - must be there
        except (ValueError, TypeError, KeyError) as e:
            raise CiterError(f"{path}: line {n} is damaged, not an iteration's JSON record ({type(e).__name__}: "
                             f"{e}); delete the file: the finished iterations' _DONE markers hold the same records, "
                             "and the next iteration writes it again from them") from None
        records.append(record)
    return records
