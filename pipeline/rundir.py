"""The run directory: its paths and markers, and its run record.

    <storage>/<name>/
      run.json           config snapshot, W&B run id, code version, progress, created/updated
      lease/             the lease of the process writing the run (pipeline.runlock)
      metrics.jsonl      one record per finished iteration (what W&B gets, readable without it)
      convergence.png    flips, router agreement, LLM calls to target and AUC per iteration
      wandb/             the W&B run's files (offline unless configured otherwise; for a run in an
                         object store, copies of the driver's, made after every iteration)
      iter-NNN/collect/  labelled shards + _DONE
      iter-NNN/train/    Ray Train / DeepSpeed checkpoints + _DONE
      iter-NNN/router/   the iteration's router
      iter-NNN/eval-parts/ each evaluation shard's decodes (eval.json is made from them)
      iter-NNN/eval.json, curve.png
      iter-NNN/audit.jsonl tokens the shortcut audit's rollouts labelled against the shortcut
      iter-NNN/_DONE     the iteration's convergence metrics, written last

`run.json` records the config on first use (credentials in a storage URI left out), and the
revisions of the models and datasets (`pipeline.revisions`); a later stage with a config that
differs in a key outside RESUMABLE_CHANGES, or whose models or datasets changed, is refused.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline import CiterError
from pipeline.atomic import atomic_write_json
from pipeline.config import Config
from pipeline.revisions import changes_allowed, input_revisions, revision_changes, updated_revisions
from pipeline.storage import StoragePath, read_json, redact_uri, run_path

log = logging.getLogger(__name__)

DONE = "_DONE"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
TRAIN_DIR = "train"
EVAL_JSON, CURVE_PNG, CONVERGENCE_PNG = "eval.json", "curve.png", "convergence.png"
EVAL_PARTS = "eval-parts"  # each evaluation shard's decodes, written as it completes
AUDIT_JSONL = "audit.jsonl"
# Keys that may change between runs over one run directory: how much to do and with what
# resources, and where to log. Any other change would mix results of two configs in one run
# (labels, routers or curves already written), so it is refused.
RESUMABLE_CHANGES = ("name", "storage", "demo", "loop.iterations", "tracking", "models.device",
                     "models.llm_device_map", "models.llm_max_memory", "models.llm_offload_folder",
                     "collect.num_actors", "collect.num_cpus_per_actor", "collect.num_gpus_per_actor",
                     "collect.batch_size", "train.num_workers", "train.cpus_per_worker", "train.gpus_per_worker",
                     "train.max_failures", "eval.batch_size", "eval.shard_size", "decode", "serve")


# ---------------------------------------------------------------------------------------------
# Paths


def default_run_dir(cfg: Config) -> StoragePath:
    return run_path(cfg.storage) / cfg.name


def iteration_dir(run: str | StoragePath, iteration: int) -> StoragePath:
    return run_path(run) / f"iter-{iteration:03d}"


def collect_dir(run: str | StoragePath, iteration: int) -> StoragePath:
    return iteration_dir(run, iteration) / "collect"


def router_dir(run: str | StoragePath, iteration: int) -> StoragePath:
    """Where an iteration's trained router is exported (the decoder's format)."""
    return iteration_dir(run, iteration) / "router"


def shard_path(directory: StoragePath, shard: int) -> StoragePath:
    return directory / f"part-{shard:05d}.parquet"


def read_eval(path: StoragePath) -> dict[str, Any]:
    """An iteration's eval.json."""
    return read_json(path, "the evaluation's result", "delete it to evaluate that iteration again (its decodes in "
                     "eval-parts/ are reused)")


def read_collect_summary(done: StoragePath) -> dict[str, Any]:
    """A collect stage's _DONE."""
    return read_json(done, "the collect stage's summary", "delete it: rerunning the stage checks the shards and "
                     "writes it again")


def read_train_summary(done: StoragePath) -> dict[str, Any]:
    """A train stage's _DONE."""
    return read_json(done, "the train stage's summary", "delete the iteration's train/ folder to train that router "
                     "again")


# ---------------------------------------------------------------------------------------------
# The run record and its config check


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty section flattens to nothing, the same as an absent one
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two config dicts, except those under `ignore`."""
    a, b = _flatten(old), _flatten(new)
    ignored = lambda k: any(k == p or k.startswith(p + ".") for p in ignore)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_run_record(run: Path) -> dict[str, Any] | None:
    """`run.json` of a run directory, or None before the first stage."""
    path = run / RUN_JSON
    if not path.is_file():
        return None
    expected = f"the run record (a JSON object with the run's 'config'); is {run} a citer run directory?"
    record = read_json(path, expected)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CiterError(f"{path}: no 'config' in it; expected {expected}")
    return record


def recorded_config(cfg: Config) -> dict[str, Any]:
    """The config as run.json and W&B keep it: a storage URI's credentials left out."""
    return {**cfg.to_dict(), "storage": redact_uri(cfg.storage)}


def update_run_record(run: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into `run.json` (atomically) and stamp `updated`."""
    record = read_run_record(run) or {}
    record.update(fields, updated=_now())
    atomic_write_json(run / RUN_JSON, record)
    return record


def check_run_config(cfg: Config, run: Path) -> None:
    """Record the config in `run.json` on first use; refuse one that differs in a key that would
    invalidate work already in the run directory (anything but RESUMABLE_CHANGES)."""
    from pipeline import __version__

    record, config, inputs = read_run_record(run), recorded_config(cfg), input_revisions(cfg)
    if record is None:
        run.mkdir(parents=True, exist_ok=True)
        update_run_record(run, config=config, revisions=inputs, created=_now(), code_version=__version__)
        return
    diff = config_differences(record["config"], config, RESUMABLE_CHANGES)
    if diff:
        a, b = _flatten(record["config"]), _flatten(config)
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise CiterError(
            f"{run} was written by a different config: {', '.join(diff)} changed ({detail}). These keys "
            f"change results already in the run; use a new run directory or restore the old values (keys "
            f"that may change on resume: {', '.join(RESUMABLE_CHANGES)})"
        )
    check_sharded_checkpoints(record["config"], cfg, run)
    revisions = updated_revisions(record.get("revisions"), inputs)
    changed = revision_changes(record.get("revisions"), revisions, cfg)
    if changed and not changes_allowed():
        raise CiterError(f"{run}: its inputs changed since the run started: {'; '.join(changed)}. Results already "
                         "in the run came from the old ones; use a new run directory, or start again with "
                         "--allow-changed-inputs to go on with the new ones")
    if changed:
        log.warning("%s goes on with changed inputs (--allow-changed-inputs): %s", run, "; ".join(changed))
    if record["config"] != config or record.get("revisions") != revisions:
        update_run_record(run, config=config, revisions=revisions)  # allowed changes: now recorded


def check_sharded_checkpoints(old: dict, cfg: Config, run: Path) -> None:
    """Refuse a new `train.num_workers` while a train stage is unfinished under ZeRO >= 1: DeepSpeed
    splits that stage's optimizer state by world size, and its checkpoints load only into as many
    workers. Between train stages the count may change (a stage starts from whole router weights)."""
    before, now = old["train"]["num_workers"], cfg.train.num_workers
    stage = old["deepspeed"]["zero_stage"]
    if before == now or stage == 0:
        return
    for train in sorted(run.glob(f"iter-*/{TRAIN_DIR}")):
        if not (train / DONE).exists() and any(train.glob("checkpoint_*")):
            raise CiterError(
                f"train.num_workers changed from {before} to {now}, but {train} holds the checkpoints of an "
                f"unfinished train stage under ZeRO stage {stage}, split over {before} workers, which load "
                f"into {before} workers only. Resume with train.num_workers={before} (change it once that stage "
                f"is done), or delete {train} to train that iteration's router again")
