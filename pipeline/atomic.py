"""Crash-safe writes. Locally: write to a temporary name beside the target, then rename. In an
object store (`pipeline.storage.ObjectPath`): build the file locally, then upload it as one whole
object, which appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.storage import ObjectPath, StoragePath, run_path


def _scratch_dir(path: StoragePath) -> Path | None:
    """Where to build `path` before it is put in place: beside it locally (so the rename stays on
    one filesystem), the system's temporary folder for an object (uploaded from there)."""
    if isinstance(path, ObjectPath):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


@contextmanager
def atomic_writer(path: str | StoragePath) -> Iterator[Path]:
    """Yield a temporary local path; put it at `path` only if the block succeeds."""
    path = run_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_scratch_dir(path))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if isinstance(path, ObjectPath):
            path.upload(tmp_path)
        else:
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | StoragePath, text: str) -> None:
    path = run_path(path)
    if isinstance(path, ObjectPath):
        path.write_text(text)
        return
    with atomic_writer(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | StoragePath, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | StoragePath, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build a directory under a temporary local name, then move it into place as a whole. In an
    object store, where a directory is many objects, the files named in `last` (those whose
    presence marks the directory complete) are uploaded after the others."""
    path = run_path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=_scratch_dir(path)))
    try:
        yield tmp
        if isinstance(path, ObjectPath):
            path.rmtree()
            for f in sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: (f.name in last, str(f))):
                (path / f.relative_to(tmp).as_posix()).upload(f)
        else:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
