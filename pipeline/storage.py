"""Where a run lives: a local directory, or a prefix in an object store.

`run_path("runs/demo")` is a `pathlib.Path`; `run_path("s3://bucket/runs/demo")` (or `gs://…`,
or any URI `pyarrow.fs.FileSystem.from_uri` knows, with its query options such as
`?endpoint_override=…`) is an `ObjectPath`: the part of `pathlib.Path` citer uses, over a pyarrow
filesystem. The stages use either through the same calls, and the helpers below (reading bytes,
Parquet and safetensors; writing whole objects) for what `Path` alone cannot do.

A write never leaves part of a file under its name (`write_whole`). Locally: a temporary name
beside the target, then a rename. In an object store: the object is uploaded under a temporary key
beside its name (`.NAME.HEX.tmp`), then copied into place server-side and the temporary deleted.
pyarrow has no way to abort an upload from Python: closing its output stream, which its `with`
block and its garbage collector both do even after an exception, completes the upload with what
was written so far. So an interrupted upload may complete a truncated object, but only under the
temporary key, which is then deleted; the object under its real name appears whole or not at all.

S3 credentials and endpoint come from the usual AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`) or the URI's query options.
Credentials written into a URI (`s3://KEY:SECRET@bucket/...`) work, but are never shown:
`str(path)` and `redact_uri` leave them out; only `location_text`, which hands a path to another
citer process, carries them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline import CiterError

os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")  # see `filesystem`


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


@functools.cache
def filesystem(base: str, bucket: str) -> Any:
    """The pyarrow filesystem of `scheme://[user:secret@]bucket[?query]` (one per process). Without
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required (set above, unless the user set it), the AWS SDK
    of recent pyarrow sends aws-chunked uploads that some S3-compatible stores save verbatim."""
    import pyarrow.fs

    scheme, _, rest = base.partition("://")
    userinfo, _, query = rest.rpartition("@") if "@" in rest else ("", "", rest)
    try:
        fs, _ = pyarrow.fs.FileSystem.from_uri(f"{scheme}://{userinfo + '@' if userinfo else ''}{bucket}{query}")
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise CiterError(f"storage {scheme}://{bucket}: not a filesystem pyarrow can open "
                         f"({redact_uri(str(e))})") from None
    return fs


READ_ATTEMPTS = 3  # an object's read that breaks off is tried this many times in all
JSON_READ_ATTEMPTS = 6  # an object that reads as not JSON is read this many times in all (0.1 s, 0.2 s, ... apart)
# Query options of a storage URI whose values are secrets (pyarrow's S3 and GCS options).
SECRET_OPTION = re.compile(r"(secret|token|password|access_key|credential)", re.IGNORECASE)


def redact_uri(text: str) -> str:
    """`text` with the credentials of any URI in it replaced by `***` (user:secret@ and secret query
    options), for everything citer shows or stores: logs, run.json, W&B's config, `citer status`."""
    text = re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^@\s?#]*@", r"\1***@", text)
    return re.sub(r"([?&])([^=&\s]+)=[^&\s]*", lambda m: f"{m[1]}{m[2]}=***" if SECRET_OPTION.search(m[2])
                  else m[0], text)


class ObjectPath:
    """A key prefix in an object store, with the subset of `pathlib.Path` that citer uses."""

    def __init__(self, base: str, key: str):
        self.base, self.key = base, key.strip("/")  # base: "s3://" plus any "user:secret@" and "?query"

    @classmethod
    def parse(cls, uri: str) -> ObjectPath:
        scheme, _, rest = uri.partition("://")
        rest, question, query = rest.partition("?")
        # Credentials end at the last "@" (an AWS secret may hold "/", which urlsplit would cut at).
        userinfo, _, location = rest.rpartition("@") if "@" in rest else ("", "", rest)
        if not location.split("/")[0]:
            raise CiterError(f"storage {redact_uri(uri)!r}: expected scheme://bucket/prefix")
        return cls(f"{scheme}://{userinfo + '@' if userinfo else ''}{question}{query}", location)

    @property
    def fs(self) -> Any:
        return filesystem(self.base, self.key.split("/")[0])

    @property
    def uri(self) -> str:
        """The URI that `run_path` reads back into this path (with the query options and any
        credentials: for other citer processes only, never to show)."""
        scheme, _, rest = self.base.partition("://")
        userinfo, _, query = rest.rpartition("@") if "@" in rest else ("", "", rest)
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{self.key}{query}"

    @property
    def public_uri(self) -> str:
        """`uri` without credentials: no user:secret@, no secret query option (the endpoint kept)."""
        scheme, _, rest = self.base.partition("://")
        options = [o for o in rest.partition("?")[2].split("&") if o and not SECRET_OPTION.search(o.split("=")[0])]
        return f"{scheme}://{self.key}{'?' + '&'.join(options) if options else ''}"

    def __str__(self) -> str:
        return f"{self.base.partition('://')[0]}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({redact_uri(self.uri)!r})"

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
        """The object's bytes. A read that breaks off (S3 servers drop the stream of an object
        deleted while it is read) is retried; if the object is gone by then, it reads as missing."""
        attempt = 1
        while True:
            try:
                with self.fs.open_input_stream(self.key) as f:
                    return f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"{self}: no such object") from None
            except OSError:
                if not self.exists():
                    raise FileNotFoundError(f"{self}: no such object (deleted while read)") from None
                if attempt >= READ_ATTEMPTS:
                    raise
            time.sleep(0.05 * attempt)
            attempt += 1

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def _put(self, write: Callable[[Any], None]) -> None:
        """Write this object whole: `write(stream)` fills a temporary object beside it, which is then
        copied into place (server-side) and deleted. An interrupted `write` completes at most the
        temporary object (pyarrow's close does), which is deleted: never this one."""
        tmp = self.parent / f".{self.name}.{secrets.token_hex(4)}.tmp"
        try:
            with self.fs.open_output_stream(tmp.key) as out:
                write(out)
            self.fs.copy_file(tmp.key, self.key)
        finally:
            with contextlib.suppress(Exception):  # a killed process leaves it: a dot-name no reader lists
                self.fs.delete_file(tmp.key)

    def write_bytes(self, data: bytes) -> None:
        self._put(lambda out: out.write(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local: Path) -> None:
        def copy(out: Any) -> None:
            with local.open("rb") as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)

        self._put(copy)

    def upload_raw(self, local: Path) -> None:
        """Upload straight to this key: for objects under a temporary prefix only (an interrupted
        upload may complete a truncated object here; see `_put`)."""
        with local.open("rb") as src, self.fs.open_output_stream(self.key) as out:
            while chunk := src.read(1 << 24):
                out.write(chunk)

    def move_to(self, target: ObjectPath) -> None:
        """Copy this object over `target` server-side (it appears whole), then delete this one."""
        self.fs.copy_file(self.key, target.key)
        self.fs.delete_file(self.key)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete this prefix and everything under it, as shutil.rmtree does a directory."""
        try:
            self.fs.delete_dir(self.key)
        except FileNotFoundError:
            pass


StoragePath = Path | ObjectPath


def write_whole(path: StoragePath, data: bytes) -> None:
    """Put `data` at `path` so that the file or object appears whole or not at all (see above)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_json(path: StoragePath, expected: str, remedy: str = "") -> Any:
    """A JSON file that citer wrote, or a CiterError naming it, what it should hold and what to do
    (a file cut short by a bad copy or a full disk, or one edited by hand, reads as damaged).

    An object that another process is replacing (`run.json` while `citer status` reads it) can read
    torn on S3-compatible stores that do not isolate a read from an overwrite (SeaweedFS returns
    one version's length with another's bytes): an object that is not JSON is read again, over
    about 3 seconds, before it is called damaged."""
    attempt = 1
    while True:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            raise CiterError(f"{path}: missing; expected {expected}{'; ' + remedy if remedy else ''}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if isinstance(path, ObjectPath) and attempt < JSON_READ_ATTEMPTS:
                time.sleep(0.1 * 2 ** (attempt - 1))
                attempt += 1
                continue
            raise CiterError(f"{path}: damaged, not JSON ({e}); expected {expected}"
                             f"{'; ' + remedy if remedy else ''}") from None


def run_path(location: str | os.PathLike | ObjectPath) -> StoragePath:
    """A run directory (or anything under one) from a local path or an object-store URI."""
    if isinstance(location, (Path, ObjectPath)):
        return location
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return ObjectPath.parse(text) if is_uri(text) else Path(text)


def location_text(path: StoragePath) -> str:
    """What to pass to another citer process so that `run_path` gives back `path` there (with any
    credentials of its URI: never to show or store). A local path is made absolute: the other process
    (a Ray worker) may run in another directory."""
    return path.uri if isinstance(path, ObjectPath) else str(path.absolute())


def same_place(run: StoragePath, path: StoragePath) -> bool:
    """Whether `path` is `run` or lies under it (an object path by scheme, bucket and key: the same
    place whatever credentials or endpoint option reach it)."""
    if isinstance(run, ObjectPath) and isinstance(path, ObjectPath):
        scheme = lambda p: p.base.partition("://")[0]  # noqa: E731
        return scheme(run) == scheme(path) and (path.key == run.key or path.key.startswith(run.key + "/"))
    if isinstance(run, Path) and isinstance(path, Path):
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(run))
    return False


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
