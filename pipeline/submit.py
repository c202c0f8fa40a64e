"""`citer submit`: run `citer train` as a Ray job on a cluster, and follow its logs.

The job's entrypoint is `python jobs/entrypoint.py CONFIG [--run DIR] [overrides]`, run in a copy of
this working directory (without .git, the virtual environment, the demo world cache or local
runs) with the W&B and hub settings of the submitting shell, less its paths (LOCAL_PATH_ENV) and
API keys (SECRET_ENV, only when asked). The driver loads no model, so it needs no GPU. The run
directory lives in the cluster's storage (an object store on a multi-node cluster), so submitting
the same config again resumes the same run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import CiterError
from pipeline.config import load_config
from pipeline.raysession import RAY_TRAIN_ENV, SECRET_ENV, job_env

log = logging.getLogger(__name__)

ENTRYPOINT = "jobs/entrypoint.py"
EXCLUDES = [".git", ".venv", ".citer", "runs", "wandb", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]


def runtime_env(working_dir: Path, extra_file: str | None = None, secrets: bool = False) -> dict[str, Any]:
    """The job's runtime env: `extra_file`'s (e.g. cluster/runtime-env.yaml), then the working dir,
    the excludes and `job_env()` (with `secrets`, the API keys too) on top. Paths come from the file."""
    env: dict[str, Any] = {}
    if extra_file:
        try:
            env = yaml.safe_load(Path(extra_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CiterError(f"{extra_file}: cannot read the runtime env ({e})") from None
        if not isinstance(env, dict):
            raise CiterError(f"{extra_file}: a runtime env must be a mapping (working_dir, env_vars, pip, ...)")
    env_vars = {**RAY_TRAIN_ENV, **(env.get("env_vars") or {}), **job_env()}
    if secrets:
        env_vars.update({k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)})
    return {**env, "working_dir": str(working_dir), "excludes": sorted({*EXCLUDES, *env.get("excludes", [])}),
            "env_vars": env_vars}


def describe(env: dict[str, Any]) -> str:
    """A runtime env for the log: variable names only, never their values."""
    shown = {k: v for k, v in env.items() if k != "env_vars"}
    return f"{shown} with env vars {sorted(env.get('env_vars', {}))}"


def submit(config: str, overrides: list[str], address: str, run: str | None = None, follow: bool = True,
           runtime_env_file: str | None = None, working_dir: str = ".", secrets: bool = False) -> int:
    """Submit the job; with `follow`, print its logs until it ends. Returns 0 when it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = load_config(config, overrides)  # a bad config fails here, not on the cluster
    wd = Path(working_dir).resolve()
    try:
        rel_config = Path(config).resolve().relative_to(wd)
    except ValueError:
        raise CiterError(f"{config}: the config must be inside the working directory {wd}, which is what the "
                         "job receives") from None
    args = [str(rel_config), *(["--run", run] if run else []), *overrides]
    entrypoint = f"python {ENTRYPOINT} {shlex.join(args)}"
    env = runtime_env(wd, runtime_env_file, secrets)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection refused, wrong scheme, no dashboard
        raise CiterError(f"cannot reach the Ray cluster at {address} ({type(e).__name__}: {e}); is the head's "
                         "dashboard running and reachable?") from None
    submission_id = f"citer-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # The driver loads no model (evaluation runs on actors): it needs no GPU and may run on a CPU head.
    log.info("submitting %s to %s: %s; runtime env %s", submission_id, address, entrypoint, describe(env))
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                               metadata={"citer_run": cfg.name})
    print(f"submitted job {job_id} to {address}")
    print(f"  logs:   ray job logs --address {address} --follow {job_id}")
    print(f"  status: ray job status --address {address} {job_id}")
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0 if info.status == JobStatus.SUCCEEDED else 1
