"""One writer per run directory: a lease in RUN/run.lock, renewed by a heartbeat.

`citer train`, `citer collect` and `citer fit-router` hold the lease while they write a run. A
second start on a run whose lease is live is refused, naming the holder (host, pid, since when).
A holder that dies stops renewing: once the lease expires (`CITER_LEASE_SECONDS`, default 120 s)
a new start takes it over; `--force` takes it at once (for a holder known to be dead).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline import CiterError
from pipeline.atomic import atomic_write_json
from pipeline.storage import StoragePath, run_path

log = logging.getLogger(__name__)

LOCK = "run.lock"
DEFAULT_LEASE_SECONDS = 120.0


def lease_seconds() -> float:
    return float(os.environ.get("CITER_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


def read_lock(run: str | StoragePath) -> dict[str, Any] | None:
    """The lease of a run, or None when nobody holds one (a file that does not read counts as none)."""
    try:
        return json.loads((run_path(run) / LOCK).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class RunLock:
    """Hold a run directory's lease for the duration of a `with` block."""

    def __init__(self, run: str | StoragePath, *, force: bool = False, command: str = "citer"):
        self.run, self.force, self.command = run_path(run), force, command
        self.lease = lease_seconds()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"holder": self.id, "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "since": getattr(self, "_since", now), "renewed": now, "expires": now + self.lease}

    def acquire(self) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        held = read_lock(self.run)
        if held and held.get("holder") != self.id and held.get("expires", 0) > time.time() and not self.force:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
            left = held["expires"] - time.time()
            raise CiterError(
                f"{self.run} is in use by {held.get('command', 'citer')} on {held.get('host')} (pid {held.get('pid')}, "
                f"since {since}); its lease ends in {left:.0f} s unless renewed. If that process is dead, wait "
                f"for the lease to expire or start again with --force"
            )
        if held and held.get("holder") != self.id:
            log.info("taking over the lease of %s from %s (pid %s)%s", self.run, held.get("host"), held.get("pid"),
                     " (--force)" if held.get("expires", 0) > time.time() else ": it expired")
        self._since = time.time()
        atomic_write_json(self.run / LOCK, self._record())
        time.sleep(0.05)  # two starters that both saw a free lease: the last rename wins, the other backs off
        if (read_lock(self.run) or {}).get("holder") != self.id:
            raise CiterError(f"{self.run} was taken by another start at the same moment; try again")
        self._thread = threading.Thread(target=self._heartbeat, name="citer-run-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            held = read_lock(self.run)
            if held and held.get("holder") != self.id:
                log.warning("the lease of %s was taken by %s (pid %s); this process no longer holds it",
                            self.run, held.get("host"), held.get("pid"))
                return
            atomic_write_json(self.run / LOCK, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (read_lock(self.run) or {}).get("holder") == self.id:
            (self.run / LOCK).unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
