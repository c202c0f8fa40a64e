"""What exactly a run's models and datasets were: the hub commit of a hub name, or a content hash
of a local file or directory. `rundir.check_run_config` records them in run.json on a run's first
start and compares them on every later one: a model or dataset that changed under a run (a hub
repository updated, a local checkpoint overwritten) would mix results of two inputs in one run, so
a change is refused, naming it, unless CITER_ALLOW_CHANGED_INPUTS=1 (`--allow-changed-inputs`)
says to go on with the new inputs, which are then recorded.

A content hash reads a file whole up to 64 MiB; a larger one (model weights) by its size and 256
blocks of 64 KiB spread over it, so that a start does not read a 140 GB model: a change confined
to bytes between those blocks is not seen.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from pipeline.config import Config

WHOLE_BYTES = 64 * 2**20
SAMPLES, SAMPLE_BYTES = 256, 64 * 2**10
ALLOW_ENV = "CITER_ALLOW_CHANGED_INPUTS"


def changes_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").lower() in ("1", "true", "yes")


def content_hash(path: Path) -> str:
    """SHA-256 over a file, or over a directory's files (relative names, sizes, contents), skipping
    dot-files (caches); large files sampled as the module says."""
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path).as_posix() if f != path else ''}\0{size}\0".encode())
        with f.open("rb") as data:
            if size <= WHOLE_BYTES:
                while block := data.read(1 << 20):
                    digest.update(block)
                continue
            for k in range(SAMPLES):
                data.seek(k * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(data.read(SAMPLE_BYTES))
    return digest.hexdigest()


@functools.cache
def hub_commit(repo: str, repo_type: str) -> str | None:
    """The commit a hub repository's main branch is at: asked of the hub (once per process), else
    the one this machine's cache resolved last (offline); None when neither knows."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo, repo_type=repo_type, timeout=10).sha
        except Exception:  # no network, no access: fall back to the cache
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def revision(name: str, repo_type: str) -> dict[str, Any]:
    """{"sha256": ...} for a local file or directory, {"hub_commit": ...} for a hub name."""
    path = Path(name).expanduser()
    if path.exists():
        return {"sha256": content_hash(path)}
    return {"hub_commit": hub_commit(name, repo_type)}


def input_revisions(cfg: Config) -> dict[str, dict[str, Any]]:
    """The revision of each model and dataset the config names, by its config key."""
    return {"models.slm": revision(cfg.models.slm, "model"), "models.llm": revision(cfg.models.llm, "model"),
            "task.train_path": revision(cfg.task.train_path, "dataset"),
            "task.eval_path": revision(cfg.task.eval_path, "dataset")}


def revision_changes(before: dict[str, Any] | None, now: dict[str, Any], cfg: Config) -> list[str]:
    """"key (name: old -> new)" for each input whose known revision changed."""
    names = {"models.slm": cfg.models.slm, "models.llm": cfg.models.llm, "task.train_path": cfg.task.train_path,
             "task.eval_path": cfg.task.eval_path}
    out = []
    for key, new in now.items():
        old = (before or {}).get(key)
        if old and new != old and None not in (*old.values(), *new.values()):
            kind = next(iter(new))
            out.append(f"{key} ({names[key]}: {kind.replace('_', ' ')} {str(old.get(kind))[:12]} -> "
                       f"{str(new[kind])[:12]})")
    return out


def updated_revisions(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """`now`, where a revision is unknown now (offline, no cache) keeping the one recorded before."""
    return {key: rev if None not in rev.values() else (before or {}).get(key, rev) for key, rev in now.items()}
