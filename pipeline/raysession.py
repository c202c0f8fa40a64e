"""Ray plumbing in one place: the Ray session every stage runs in (the cluster in RAY_ADDRESS, or
an embedded local Ray), the log lines Ray prints that say nothing to a citer user, the environment
passed on to Ray's processes and to Ray jobs, the one runner for sharded actor stages (collect
and evaluate): items -> an actor pool -> one output row per item, as each completes, and the
errors of actors and training workers brought back out of Ray's wrappers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import CiterError
from pipeline.config import Config
from pipeline.progress import Progress
from pipeline.runlock import fence_env
from pipeline.storage import ObjectPath, StoragePath, check_reachable

log = logging.getLogger(__name__)


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


def no_shm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory op (deepspeed_shm_comm) when a training
    worker sets up communication: only DeepSpeed's inference all-reduce uses it, while training
    reduces through torch.distributed (gloo). The compile took 30 s on 2 cores at the first training
    start of each new venv or machine (every fresh pod) and needs a C++ compiler. DeepSpeed keeps
    its table of compatible ops for edits like this one (`deepspeed.ops.__compatible_ops__`)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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
                                   "worker_process_setup_hook": "pipeline.raysession.quiet_embedded_worker"})
        if os.environ.get("CITER_OBJECT_STORE_BYTES"):
            kwargs["object_store_memory"] = int(os.environ["CITER_OBJECT_STORE_BYTES"])
    ray.init(address=address, **kwargs)


def shared_mounts() -> list[Path]:
    """The mount points CITER_SHARED_STORAGE declares shared by every node (`:`-separated)."""
    value = os.environ.get("CITER_SHARED_STORAGE", "").strip()
    if value in ("1", "true", "yes"):
        raise CiterError(f"CITER_SHARED_STORAGE={value}: it names the mount points that every node shares "
                         "(e.g. CITER_SHARED_STORAGE=/mnt/shared), so that it covers those paths and no other")
    return [Path(p) for p in value.split(os.pathsep) if p]


def check_storage(run: StoragePath) -> None:
    """Before any work: a run in an object store whose store answers, or a local run directory on
    a one-node Ray (on several nodes, actors and training workers elsewhere would write to their
    own disks), or under a mount point that CITER_SHARED_STORAGE declares shared (NFS, EFS mounted
    alike on every node). Nodes that join later (an autoscaler) are checked where it matters: every
    actor and training worker checks, before it writes, that it sees the run's lease
    (`runlock.Fence`), which it does not on a disk of its own."""
    if isinstance(run, Path) and run.is_file():
        raise CiterError(f"{run}: expected a run directory, found a file")
    check_reachable(run)
    if isinstance(run, ObjectPath) or not os.environ.get("RAY_ADDRESS"):
        return
    if any(Path(os.path.abspath(run)).is_relative_to(mount) for mount in shared_mounts()):
        return
    import ray

    ensure_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        raise CiterError(
            f"{run} is a local path, but the Ray cluster has {nodes} nodes: collect actors and training workers on "
            "other nodes would write its shards and checkpoints to their own disks. Put the run in shared storage: "
            "`storage: s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX` (or a filesystem mounted at the same path on every "
            "node, such as NFS or EFS, named in CITER_SHARED_STORAGE)")


class Tally:
    """A count that actors add to while they work and the driver reads: progress finer than one
    item (evaluate's actors count each example decoded, not each shard done)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def read(self) -> int:
        return self.count


@contextmanager
def tallied(bar: Progress, period: float = 2.0) -> Iterator[Any]:
    """A Tally actor whose count a thread of this process copies into `bar` every `period`
    seconds, and once more at the end; the actor is gone afterwards."""
    import threading

    import ray

    tally = ray.remote(num_cpus=0)(Tally).remote()
    stop = threading.Event()

    def copy_count() -> None:
        while True:
            stopped = stop.wait(period)
            try:
                bar.update(ray.get(tally.read.remote(), timeout=30) - bar.done)
            except Exception:  # progress is never worth failing a stage for
                pass
            if stopped:
                return

    thread = threading.Thread(target=copy_count, name="citer-progress", daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join(timeout=60)
        ray.kill(tally)


def shards_on_actors(actor: type, items: list[dict[str, Any]], constructor: dict[str, Any], cfg: Config,
                     desc: str, sizes: list[int] | None = None, unit: str = "shard") -> Iterator[dict[str, Any]]:
    """Run `actor` (a Ray Data callable class) over `items`, one item a task, on a pool of
    `collect.num_actors` actors with the collect stage's CPUs and GPUs each; yield each item's
    output row as it completes. Used by collect and evaluate. Progress counts items, or, with
    `sizes` (each item's work in `unit`s), what the actors report to the `tally` they get as a
    constructor argument. The actors get the leases this process holds (`runlock.fence_env`), so
    their writes into a run are fenced like the driver's; a CiterError an actor raises comes out
    as itself."""
    import ray.data

    ensure_ray()
    fences = fence_env()
    total = sum(sizes) if sizes is not None else len(items)
    with Progress(total, desc, unit=unit) as bar, raised_as_user_errors(desc), \
            (tallied(bar) if sizes is not None else _nothing()) as tally:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            actor,
            fn_constructor_kwargs={**constructor, "threads": max(1, int(cfg.collect.num_cpus_per_actor)),
                                   **({"tally": tally} if tally is not None else {})},
            compute=ray.data.ActorPoolStrategy(size=min(cfg.collect.num_actors, len(items))),
            batch_size=1,
            num_cpus=cfg.collect.num_cpus_per_actor,
            num_gpus=cfg.collect.num_gpus_per_actor,
            # Ray Data restarts a dead actor unless told not to, and Ray logs an error line for that
            # setting at each start. On an embedded Ray an actor dies only of its machine's trouble
            # (memory), which a restart meets again; a rerun resumes from the finished shards.
            **({} if os.environ.get("RAY_ADDRESS") else {"max_restarts": 0}),
            **({"runtime_env": {"env_vars": fences}} if fences else {}),
        )
        for row in ds.iter_rows():
            if tally is None:
                bar.update()
            yield row


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def user_error(error: BaseException, what: str = "") -> CiterError | None:
    """The CiterError that an actor or a training worker raised, out of the exceptions Ray wraps it
    in (a RayTaskError, whose `cause` may be Ray Data's UserCodeException; an actor's failed
    creation; Ray Train's WorkerGroupError); an actor's death as one line of its own. None for
    anything else (a bug, whose traceback is wanted)."""
    from ray.exceptions import ActorDiedError, RayError

    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CiterError) and not isinstance(e, RayError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__,
                  *(getattr(e, "worker_failures", None) or {}).values()]
    # Ray Data and a failed actor creation keep the original only as traceback text, whose last line
    # is Python's "module.Class: message".
    found = re.findall(r"^pipeline\.CiterError: (.+)$", re.sub(r"\x1b\[[0-9;]*m", "", str(error)), re.M)
    if found:
        return CiterError(found[-1])
    if isinstance(error, ActorDiedError) and not error.actor_init_failed:
        reason = " ".join(str(error).split())
        return CiterError(f"{what + ': ' if what else ''}a Ray actor died ({reason[:400]}); run the command again "
                          "to resume from what is finished")
    return None


def one_line(error: BaseException) -> str:
    """An exception as one line: a Ray Train failure as each rank's error, else its first line."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
                         for rank, e in sorted(failures.items()))
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


@contextmanager
def raised_as_user_errors(what: str = "") -> Iterator[None]:
    """Re-raise a CiterError from inside Ray (see `user_error`) as itself: one line for the user."""
    try:
        yield
    except Exception as e:
        found = user_error(e, what)
        if found is None or found is e:
            raise
        raise found from None


# Secrets are forwarded only with --forward-secrets: Ray keeps a job's runtime env in its job
# table, where anyone with dashboard access can read it. On a cluster they belong in its secret
# store (the KubeRay manifests read them from a Secret). Values are never logged.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# Paths on the submitting machine (a laptop's ~/.cache/huggingface) that mean nothing on a cluster, so they are
# not forwarded: the cluster's own values apply (the --runtime-env file, the pods' or image's environment).
LOCAL_PATH_ENV = ("HF_HOME", "WANDB_DIR")


def job_env() -> dict[str, str]:
    """The forwarded variables of this shell (rundir.FORWARDED_ENV that are set) less LOCAL_PATH_ENV."""
    env = forwarded_env()
    skipped = sorted(k for k in env if k in LOCAL_PATH_ENV)
    if skipped:
        log.info("not forwarding %s (paths on this machine); set cluster paths in the --runtime-env file",
                 ", ".join(skipped))
    return {k: v for k, v in env.items() if k not in LOCAL_PATH_ENV}
