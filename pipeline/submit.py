"""`citer submit`: run `citer train` as a Ray job on a cluster, and follow its logs.

The job's entrypoint is `python jobs/entrypoint.py CONFIG [--run DIR] [overrides]`, run in a copy of
this working directory (without .git, the virtual environment, the demo world cache or local
runs) with the W&B and hub settings of the submitting shell, less its paths (LOCAL_PATH_ENV) and
API keys (SECRET_ENV, only when asked). The driver loads no model, so it needs no GPU. The run
directory lives in the cluster's storage (an object store on a multi-node cluster), so submitting
the same config again resumes the same run: a relative run directory, which would land in the
job's temporary copy of this directory, is refused.

The job's environment, lowest precedence first: Ray Train's settings (RAY_TRAIN_ENV), the
variables forwarded from this shell (`job_env`), the --runtime-env file's `env_vars`, and the API
keys with --forward-secrets. The file is the cluster's own settings and wins over whatever this
shell happens to have set; a forwarded variable that the file sets differently is named in a
warning (its value is not shown), so that nothing is overridden silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets as tokens
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import CiterError
from pipeline.config import load_config
from pipeline.raysession import RAY_TRAIN_ENV, SECRET_ENV, job_env
from pipeline.rundir import default_run_dir
from pipeline.storage import ObjectPath, is_uri, redact_uri

log = logging.getLogger(__name__)

ENTRYPOINT = "jobs/entrypoint.py"
EXCLUDES = [".git", ".venv", ".citer", "runs", "wandb", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]


def runtime_env(working_dir: Path, extra_file: str | None = None, secrets: bool = False) -> dict[str, Any]:
    """The job's runtime env: `extra_file`'s (e.g. cluster/runtime-env.yaml) with the working dir and
    the excludes; its env vars over `job_env()`'s (see the module's docstring); with `secrets`, the
    API keys too. Paths come from the file."""
    env: dict[str, Any] = {}
    if extra_file:
        try:
            env = yaml.safe_load(Path(extra_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CiterError(f"{extra_file}: cannot read the runtime env ({e})") from None
        if not isinstance(env, dict):
            raise CiterError(f"{extra_file}: a runtime env must be a mapping (working_dir, env_vars, pip, ...)")
    from_file, from_shell = {k: str(v) for k, v in (env.get("env_vars") or {}).items()}, job_env()
    overridden = sorted(k for k in from_file.keys() & from_shell.keys() if from_file[k] != from_shell[k])
    if overridden:
        log.warning("%s sets %s, which this shell sets differently: the job gets the file's value (change the "
                    "file to change it)", extra_file, ", ".join(overridden))
    env_vars = {**RAY_TRAIN_ENV, **from_shell, **from_file}
    if secrets:
        env_vars.update({k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)})
    return {**env, "working_dir": str(working_dir), "excludes": sorted({*EXCLUDES, *env.get("excludes", [])}),
            "env_vars": env_vars}


def check_job_run(run: Any, key: str) -> None:
    """Refuse a run directory that a Ray job cannot resume: a relative path (resolved in the job's
    temporary working directory, deleted with the job) or a URI with credentials in it (the
    entrypoint is kept in Ray's job table, readable from the dashboard)."""
    text = run.uri if isinstance(run, ObjectPath) else str(run)
    if is_uri(text):
        if ObjectPath.parse(text).uri != ObjectPath.parse(text).public_uri:
            raise CiterError(f"{key} {redact_uri(text)}: credentials in a storage URI would be kept in the job's "
                             "entrypoint, readable from the Ray dashboard; give the cluster its credentials through "
                             "its environment, secret store or instance role instead")
        return
    if not Path(text).is_absolute():
        raise CiterError(f"{key} {text!r} is relative: the job would write the run into its temporary copy of this "
                         "directory, deleted when the job ends, and no later submission could resume it. Use an "
                         "absolute path on storage every node shares (e.g. storage=/mnt/shared/citer-runs) or "
                         "storage=s3://BUCKET/PREFIX")


def describe(env: dict[str, Any]) -> str:
    """A runtime env for the log: variable names only, never their values."""
    shown = {k: v for k, v in env.items() if k != "env_vars"}
    return f"{shown} with env vars {sorted(env.get('env_vars', {}))}"


def submit(config: str, overrides: list[str], address: str, run: str | None = None, follow: bool = True,
           runtime_env_file: str | None = None, working_dir: str = ".", secrets: bool = False) -> int:
    """Submit the job; with `follow`, print its logs until it ends. Returns 0 when it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = load_config(config, overrides)  # a bad config fails here, not on the cluster
    check_job_run(run if run is not None else default_run_dir(cfg), "--run" if run is not None else "storage")
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
    submission_id = f"citer-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{tokens.token_hex(3)}"
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
