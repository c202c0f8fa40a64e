"""Crash-safe writes into a run. A file appears whole or not at all (`storage.write_whole`:
locally a temporary name and a rename; in an object store a temporary object copied into place).
A directory is switched to its new version file by file, the marker files last, after the whole
new version was written beside the old one (`atomic_directory`).

Every write checks, just before it becomes visible, that the lease of the run it goes into is
still held, when this process works under one (`runlock.check_write`: the driver's own lease, or
the one its Ray actors were given); a JSON record written under a lease carries its token under
"lease", so that a record says which holder wrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.runlock import check_write, guard_for
from pipeline.storage import ObjectPath, StoragePath, run_path, write_whole


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
        check_write(path)
        if isinstance(path, ObjectPath):
            path.upload(tmp_path)
        else:
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | StoragePath, text: str) -> None:
    path = run_path(path)
    check_write(path)
    write_whole(path, text.encode())


def atomic_write_json(path: str | StoragePath, data: Any) -> None:
    path = run_path(path)
    guard = guard_for(path)
    if guard is not None and isinstance(data, dict):
        data = {**data, "lease": guard.token}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | StoragePath, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build a directory under a temporary local name, then put it at `path` so that a crash at
    any moment leaves a usable version there. A new directory is renamed into place whole
    (locally). Over an existing one, the new version is first written whole beside it (locally the
    temporary directory; in an object store a temporary prefix `.NAME.HEX.tmp/`), then each file is
    switched into place (a rename, or a server-side copy), those named in `last` (the files whose
    presence marks the directory complete) after the others; files the new version lacks are
    deleted only after that. Between the first switch and the last, `path` holds whole files of
    both versions (for a router of one run, whose shapes never change, a loadable router)."""
    path = run_path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=_scratch_dir(path)))
    try:
        yield tmp
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's (one writer per run: the lease)
            if isinstance(stale, ObjectPath):
                stale.rmtree()
            elif stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        files = sorted((f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()),
                       key=lambda name: (PurePosixPath(name).name in last, name))
        if isinstance(path, ObjectPath):
            _switch_objects(tmp, files, path)
        elif not path.exists():
            check_write(path)
            os.replace(tmp, path)
        else:
            old = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()}
            for name in files:
                check_write(path)
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, path / name)
            for name in sorted(old - set(files)):
                (path / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _switch_objects(tmp: Path, files: list[str], path: ObjectPath) -> None:
    """`atomic_directory` in an object store: upload beside, then copy into place."""
    staging = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        for name in files:  # the slow part; an upload interrupted here touches only the staging prefix
            (staging / name).upload_raw(tmp / name)
        old = {p.key[len(path.key) + 1:] for p in path.rglob("*")}
        for name in files:
            check_write(path)
            (staging / name).move_to(path / name)
        for name in sorted(old - set(files)):
            (path / name).unlink(missing_ok=True)
    finally:
        with contextlib.suppress(Exception):  # a killed process leaves it: a dot-name no reader lists
            staging.rmtree()
