"""Where a run lives: a local directory, or a prefix in an object store.

`run_path("runs/demo")` is a `pathlib.Path`; `run_path("s3://bucket/runs/demo")` (or `gs://…`,
or any URI `pyarrow.fs.FileSystem.from_uri` knows, with its query options such as
`?endpoint_override=…`) is an `ObjectPath`: the part of `pathlib.Path` citer uses, over a pyarrow
filesystem. The stages use either through the same calls, and the helpers below (reading bytes,
Parquet and safetensors; writing whole objects) for what `Path` alone cannot do.

On an object store a write is one whole object (a PUT appears complete or not at all), so there is
no temporary name to rename; the order of writes (markers last) is what marks work complete.
S3 credentials and endpoint come from the usual AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`) or the URI's query options.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pipeline import CiterError

os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")  # see `filesystem`


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


@functools.cache
def filesystem(base: str, bucket: str) -> Any:
    """The pyarrow filesystem of `scheme://bucket[?query]` (one per process). Without
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required (set above, unless the user set it), the AWS SDK
    of recent pyarrow sends aws-chunked uploads that some S3-compatible stores save verbatim."""
    import pyarrow.fs

    scheme, _, query = base.partition("://")
    try:
        fs, _ = pyarrow.fs.FileSystem.from_uri(f"{scheme}://{bucket}{query}")
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise CiterError(f"storage {scheme}://{bucket}: not a filesystem pyarrow can open ({e})") from None
    return fs


class ObjectPath:
    """A key prefix in an object store, with the subset of `pathlib.Path` that citer uses."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key.strip("/")  # base: "s3://" plus any "?query"

    @classmethod
    def parse(cls, uri: str) -> ObjectPath:
        parts = urlsplit(uri)
        if not parts.netloc:
            raise CiterError(f"storage {uri!r}: expected scheme://bucket/prefix")
        query = f"?{parts.query}" if parts.query else ""
        return cls(f"{parts.scheme}://{query}", f"{parts.netloc}{parts.path}")

    @property
    def fs(self) -> Any:
        return filesystem(self.base, self.key.split("/")[0])

    @property
    def uri(self) -> str:
        """The URI that `run_path` reads back into this path (with the query options)."""
        scheme, _, query = self.base.partition("://")
        return f"{scheme}://{self.key}{query}"

    def __str__(self) -> str:
        return f"{self.base.partition('://')[0]}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.base, self.key) == (other.base, other.key)

    def __hash__(self) -> int:
        return hash((self.base, self.key))

    def __lt__(self, other: ObjectPath) -> bool:
        return self.key < other.key

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.base, f"{self.key}/{name}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.base, str(PurePosixPath(self.key).parent))

    def resolve(self) -> ObjectPath:
        return self

    def _info(self) -> Any:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.Directory

    def iterdir(self) -> list[ObjectPath]:
        import pyarrow.fs

        try:
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.key, allow_not_found=True))
        except FileNotFoundError:
            return []
        return [ObjectPath(self.base, info.path) for info in infos]

    def glob(self, pattern: str) -> list[ObjectPath]:
        """Matches of `pattern`, one `/`-separated part per level ("iter-*/train" works)."""
        found = [self]
        for part in pattern.split("/"):
            found = [child for d in found for child in d.iterdir() if fnmatch.fnmatchcase(child.name, part)]
        return found

    def rglob(self, pattern: str) -> list[ObjectPath]:
        """Every object under this prefix whose name matches `pattern`."""
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.key, allow_not_found=True, recursive=True))
        return [ObjectPath(self.base, i.path) for i in infos
                if i.type == pyarrow.fs.FileType.File and fnmatch.fnmatchcase(PurePosixPath(i.path).name, pattern)]

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no directories, only keys."""

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.key) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self}: no such object") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local: Path) -> None:
        with local.open("rb") as src, self.fs.open_output_stream(self.key) as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        self.fs.delete_dir_contents(self.key, missing_dir_ok=True)


StoragePath = Path | ObjectPath


def run_path(location: str | os.PathLike | ObjectPath) -> StoragePath:
    """A run directory (or anything under one) from a local path or an object-store URI."""
    if isinstance(location, (Path, ObjectPath)):
        return location
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return ObjectPath.parse(text) if is_uri(text) else Path(text)


def location_text(path: StoragePath) -> str:
    """What to pass to another process so that `run_path` gives back `path` there."""
    return path.uri if isinstance(path, ObjectPath) else str(path)


def check_reachable(path: StoragePath) -> None:
    """Before any work: a URI's store answers and its bucket exists (a clear error otherwise)."""
    if not isinstance(path, ObjectPath):
        return
    bucket = ObjectPath(path.base, path.key.split("/")[0])
    try:
        found = bucket.exists()
    except CiterError:
        raise
    except Exception as e:  # OSError with the SDK's message: no endpoint, refused, denied
        raise CiterError(f"storage {path}: the object store does not answer ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    if not found:
        raise CiterError(f"storage {path}: bucket {bucket.key!r} does not exist; create it first")


def local_dir(path: StoragePath) -> Path:
    """Where a run keeps files that stay on this machine (W&B's): the run directory itself when
    it is local, else `$CITER_CACHE/runs/NAME-HASH` (default ~/.cache/citer) for a run in an
    object store."""
    if isinstance(path, Path):
        return path
    digest = hashlib.sha256(path.uri.encode()).hexdigest()[:12]
    root = Path(os.environ.get("CITER_CACHE", Path.home() / ".cache" / "citer"))
    return root / "runs" / f"{path.name}-{digest}"


def local_image(path: StoragePath) -> Any:
    """An image file as something W&B logs: its local path, or the image read from the store."""
    if isinstance(path, Path):
        return str(path)
    import io

    from PIL import Image

    return Image.open(io.BytesIO(path.read_bytes()))


def arrow_paths(paths: list[StoragePath]) -> tuple[list[str], Any]:
    """(paths, filesystem) for pyarrow's readers, `ray.data.read_parquet` and Ray Train's `storage_path`."""
    if paths and isinstance(paths[0], ObjectPath):
        return [p.key for p in paths], paths[0].fs
    return [str(p) for p in paths], None
