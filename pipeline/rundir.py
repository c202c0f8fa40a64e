"""The run directory: its paths and markers, its run record, and the Ray session its stages run in.

    <storage>/<name>/
      run.json           config snapshot, W&B run id, code version, progress, created/updated
      metrics.jsonl      one record per finished iteration (what W&B gets, readable without it)
      convergence.png    flips, router agreement, LLM calls to target and AUC per iteration
      wandb/             the W&B run's local files (offline unless configured otherwise)
      iter-NNN/collect/  labelled shards + _DONE
      iter-NNN/train/    Ray Train / DeepSpeed checkpoints + _DONE
      iter-NNN/router/   the iteration's router
      iter-NNN/eval-parts/ each evaluation shard's decodes (eval.json is made from them)
      iter-NNN/eval.json, curve.png
      iter-NNN/_DONE     the iteration's convergence metrics, written last

`run.json` records the config on first use; a later stage with a config that differs in a key
outside RESUMABLE_CHANGES is refused. Every stage connects to the cluster in RAY_ADDRESS or starts
an embedded local Ray (`ensure_ray`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import CiterError
from pipeline.config import Config
from pipeline.io import atomic_write_json
from pipeline.progress import Progress
from pipeline.storage import ObjectPath, StoragePath, check_reachable, run_path

DONE = "_DONE"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
TRAIN_DIR = "train"
EVAL_JSON, CURVE_PNG, CONVERGENCE_PNG = "eval.json", "curve.png", "convergence.png"
EVAL_PARTS = "eval-parts"  # each evaluation shard's decodes, written as it completes
# Keys that may change between runs over one run directory: how much to do and with what
# resources, and where to log. Any other change would mix results of two configs in one run
# (labels, routers or curves already written), so it is refused.
RESUMABLE_CHANGES = ("name", "storage", "demo", "loop.iterations", "tracking", "models.device",
                     "models.llm_device_map", "models.llm_max_memory", "models.llm_offload_folder",
                     "collect.num_actors", "collect.num_cpus_per_actor", "collect.num_gpus_per_actor",
                     "collect.batch_size", "train.num_workers", "train.cpus_per_worker", "train.gpus_per_worker",
                     "train.max_failures", "eval.batch_size", "eval.shard_size", "decode")


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
    try:
        record = json.loads(path.read_text())
        record["config"]  # noqa: B018 - must be there
        return record
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CiterError(f"{path}: unreadable run record ({e}); is {run} a citer run directory?") from None


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

    record = read_run_record(run)
    if record is None:
        run.mkdir(parents=True, exist_ok=True)
        update_run_record(run, config=cfg.to_dict(), created=_now(), code_version=__version__)
        return
    diff = config_differences(record["config"], cfg.to_dict(), RESUMABLE_CHANGES)
    if diff:
        a, b = _flatten(record["config"]), _flatten(cfg.to_dict())
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise CiterError(
            f"{run} was written by a different config: {', '.join(diff)} changed ({detail}). These keys "
            f"change results already in the run; use a new run directory or restore the old values (keys "
            f"that may change on resume: {', '.join(RESUMABLE_CHANGES)})"
        )
    check_sharded_checkpoints(record["config"], cfg, run)
    if record["config"] != cfg.to_dict():  # allowed changes: the run now goes on with them
        update_run_record(run, config=cfg.to_dict())


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


# ---------------------------------------------------------------------------------------------
# The Ray session


# Environment for Ray's worker processes on an embedded local Ray: one thread each (the CPUs are
# shared out by Ray), and no watcher for preempted nodes (one machine; its actor's restart
# settings make Ray log an error line on every training start). Ray Train's controller polls
# often enough that a report per epoch is not a 2 s wait (stack-notes.md).
RAY_WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Passed on to an embedded local Ray's processes when set: where W&B logs and how, where models
# are cached. Ray jobs get them less the local paths (submit.LOCAL_PATH_ENV). API keys are not
# among them (see submit.SECRET_ENV).
FORWARDED_ENV = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR",
                 "HF_HOME", "HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "CITER_SHARED_STORAGE")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def quiet_ray_logs() -> None:
    """Silence, on purpose, Ray's log lines that tell a citer user nothing, in this process:
    Ray Data's start, plan and finish lines for every dataset (citer logs each stage and counts
    its own progress, `pipeline.progress`), its notice that progress bars are off (citer turns
    them off: on a terminal they fight citer's bar, in a job's log they are a ten-line block every
    10 s), and deprecation warnings for Ray's own use of Ray Data and for the one argument citer
    can pass no other way in Ray 2.60. Warnings and errors otherwise still show."""
    import logging
    import warnings

    import ray.data  # configures Ray Data's loggers on import; levels set after it stay

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions.exclude_resources. is deprecated")
    # Ray 2.60 takes an actor pool's `max_restarts` only through `ray_remote_args`, which it marks
    # deprecated for 2.64; citer pins 2.60 (collect and evaluate pass it on an embedded Ray).
    warnings.filterwarnings("ignore", message=r".ray_remote_args. is deprecated")


def quiet_embedded_worker() -> None:
    """Worker setup hook of an embedded local Ray: `quiet_ray_logs`, and Ray Train's
    placement-group cleaner silenced. The cleaner asks the state API, served by the dashboard an
    embedded Ray runs without, whether the Train controller lives, and warns every second or so
    that it cannot tell. It guards against a driver that dies while Ray lives on, which an
    embedded Ray never does (it dies with its driver)."""
    import logging

    quiet_ray_logs()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def no_gpu_deepspeed() -> None:
    """Tell DeepSpeed to use the CPU where no GPU is visible (`DS_ACCELERATOR=cpu`, unless set): left
    to find out, it warns in every process that imports it that it found no GPU."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start an embedded local Ray."""
    import ray

    for key, value in RAY_TRAIN_ENV.items():  # read by the Train controller, which runs in this process
        os.environ.setdefault(key, value)
    quiet_ray_logs()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if not address:
        no_gpu_deepspeed()
        told = {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]} if "DS_ACCELERATOR" in os.environ else {}
        # Ray warns once a node has 4x its worker start concurrency (= its CPUs) of Python workers
        # alive. A stage keeps about ten of Ray Data's and Ray Train's helper actors alive (11 measured
        # on 2 CPUs; a slower 2-CPU CI machine reached 28 with task workers), so on a small machine
        # the warning fires for a normal stage. 8, Ray's own value on an 8-CPU machine, sets it at 32.
        kwargs.update(include_dashboard=False,
                      _system_config={"worker_maximum_startup_concurrency": max(8, os.cpu_count() or 1)},
                      runtime_env={"env_vars": {**RAY_WORKER_ENV, **RAY_TRAIN_ENV, **forwarded_env(), **told},
                                   "worker_process_setup_hook": "pipeline.rundir.quiet_embedded_worker"})
        if os.environ.get("CITER_OBJECT_STORE_BYTES"):
            kwargs["object_store_memory"] = int(os.environ["CITER_OBJECT_STORE_BYTES"])
    ray.init(address=address, **kwargs)


def check_storage(run: StoragePath) -> None:
    """Before any work: a run in an object store whose store answers, or a local run directory on
    a one-node Ray (on several nodes, actors and training workers elsewhere would write to their
    own disks). CITER_SHARED_STORAGE=1 declares a local path shared (NFS, EFS mounted alike on
    every node)."""
    check_reachable(run)
    if isinstance(run, ObjectPath) or not os.environ.get("RAY_ADDRESS") or os.environ.get("CITER_SHARED_STORAGE"):
        return
    import ray

    ensure_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        raise CiterError(
            f"{run} is a local path, but the Ray cluster has {nodes} nodes: collect actors and training workers on "
            "other nodes would write its shards and checkpoints to their own disks. Put the run in shared storage: "
            "`storage: s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX` (or a filesystem mounted at the same path on every "
            "node, such as NFS or EFS, with CITER_SHARED_STORAGE=1)")


def shards_on_actors(actor: type, items: list[dict[str, Any]], constructor: dict[str, Any], cfg: Config,
                     desc: str) -> Iterator[dict[str, Any]]:
    """Run `actor` (a Ray Data callable class) over `items`, one item a task, on a pool of
    `collect.num_actors` actors with the collect stage's CPUs and GPUs each, showing progress per
    item; yield each item's output row as it completes. Used by collect and evaluate."""
    import ray.data

    ensure_ray()
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        actor,
        fn_constructor_kwargs={**constructor, "threads": max(1, int(cfg.collect.num_cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(size=min(cfg.collect.num_actors, len(items))),
        batch_size=1,
        num_cpus=cfg.collect.num_cpus_per_actor,
        num_gpus=cfg.collect.num_gpus_per_actor,
        # Ray Data restarts a dead actor unless told not to, and Ray logs an error line for that
        # setting at each start. On an embedded Ray an actor dies only of its machine's trouble
        # (memory), which a restart meets again; a rerun resumes from the finished shards.
        **({} if os.environ.get("RAY_ADDRESS") else {"max_restarts": 0}),
    )
    with Progress(len(items), desc, unit="shard") as bar:
        for row in ds.iter_rows():
            bar.update()
            yield row
