"""One writer per run directory: a lease with a heartbeat, and a fence that every write into the
run passes while it is held.

`citer train`, `citer collect` and `citer fit-router` hold the lease of the run they write. Its
files are in RUN/lease/:

    holder.json     on a filesystem: the holder's claim, created with link(2), which fails when
                    the file exists, so the filesystem itself lets exactly one start create it
    TOKEN.json      in an object store: each claimant's claim. pyarrow cannot send a conditional
                    PUT (`If-None-Match: *`), so a claimant writes its own claim under its own key,
                    then lists the claims: it holds the run only if its own is the one there. Two
                    claimants that list each other both withdraw and retry after a random pause.
                    This needs a store whose listings show every write completed before them
                    (Amazon S3 and GCS guarantee it; SeaweedFS's filer gives it).
    TOKEN.beat      the holder's heartbeat: a counter it rewrites every lease/4 seconds

Expiry never compares two machines' clocks. A start that finds another claim watches that
claim's heartbeat with its own clock (CLOCK_BOOTTIME, which counts a suspended machine's sleep):
a heartbeat that moves means a live holder, and the start is refused; one that stays unchanged
for a whole lease period (CITER_LEASE_SECONDS, default 120 s) means a dead or stalled holder,
whose claim is removed and the run taken over. A holder on this machine is judged at once by its
process: running (refused), gone (taken over); a stopped one (SIGSTOP, Ctrl-Z) is watched like a
remote one. `--force` takes the run at once.

The holder, in turn, trusts its lease only for 3/4 of a lease period after the start of its last
renewal that succeeded, by its own clock: past that, an observer elsewhere may have seen its
heartbeat still for a whole period and taken over. Renewals that fail are retried until then;
then the lease is lost and the run is stopped. Every write into the run checks, just before it
becomes visible, that this process still holds the lease (`check_write`, called by
`pipeline.atomic` for every write): the lease is not lost or past its trusted period, and the
run's claim is still this holder's. A driver that was paused past its lease and resumed therefore
stops at its next write, with one line, instead of writing over its successor. Ray actors and
training workers get the lease as a `Fence` (`fence_env`, `RunLock.fence`) and check it the
same way before they write shards or checkpoints.

What is not guaranteed: a process paused between that check and the write it guards (a window of
one request) can still complete that one write after losing the lease. Locally that is a rename
of a file whose content is deterministic or complete; no store citer supports can refuse a write
by a token (S3 has no conditional write on another object's state), so no lease on them can close
that window.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline import CiterError
from pipeline.storage import ObjectPath, StoragePath, location_text, run_path, same_place, write_whole

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
HOLDER = "holder.json"  # the claim on a filesystem
DEFAULT_LEASE_SECONDS = 120.0
TRUSTED = 0.75  # of a lease period: how long a holder trusts its lease after its last renewal began
FENCE_ENV = "CITER_FENCES"  # the leases a driver holds, for its Ray actors (JSON; no credentials)
ATTEMPTS = 20


def lease_seconds() -> float:
    return float(os.environ.get("CITER_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


def clock() -> float:
    """Seconds on this machine's clock that runs through a suspend (never another machine's)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def machine() -> dict[str, str] | None:
    """This kernel's boot and this process's PID namespace: two processes with the same values can
    look each other up by pid. None where /proc does not say (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return {"boot": f.read().strip(), "pid_ns": os.readlink("/proc/self/ns/pid")}
    except OSError:
        return None


def process_started(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process on this machine, or None when it
    does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def describe(claim: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.get("since", 0)))
    return (f"{claim.get('command', 'citer')} on {claim.get('host', '?')} (pid {claim.get('pid', '?')}, "
            f"since {since} by its clock)")


class Claims:
    """The lease files of one run (RUN/lease/) on its store."""

    def __init__(self, run: StoragePath):
        self.run, self.dir = run, run / LEASE_DIR
        self.exclusive = not isinstance(run, ObjectPath)  # a filesystem: one holder.json, created with link(2)

    def beat_path(self, token: str) -> StoragePath:
        return self.dir / f"{token}.beat"

    def _read(self, path: StoragePath) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            claim = json.loads(raw)
            claim["token"]  # noqa: B018 - must be there
        except (ValueError, TypeError, KeyError) as e:
            # A claim is written whole and never rewritten: a damaged one is no live holder's.
            log.warning("%s: damaged lease record (%s); treating it as stale", path, e)
            claim = {"token": None, "damaged": True}
        return {**claim, "_path": path, "_raw": raw}

    def current(self) -> list[dict[str, Any]]:
        """Every claim on the run now (on a filesystem at most one)."""
        if self.exclusive:
            return [c] if (c := self._read(self.dir / HOLDER)) else []
        return [c for p in sorted(self.dir.glob("*.json")) if (c := self._read(p))]

    def create(self, claim: dict[str, Any]) -> bool:
        """Put `claim` on the run; True when it is the run's only claim (its writer holds the run)."""
        data = json.dumps(claim).encode()
        if self.exclusive:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".holder.", suffix=".tmp", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.link(tmp, self.dir / HOLDER)  # the conditional create: fails if a holder.json exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        own = self.dir / f"{claim['token']}.json"
        write_whole(own, data)
        if [c["token"] for c in self.current()] == [claim["token"]]:
            return True
        own.unlink(missing_ok=True)  # another claimant listed too: both withdraw, then retry
        return False

    def remove(self, claim: dict[str, Any]) -> bool:
        """Remove a claim judged stale, and its heartbeat. False when, on a filesystem, holder.json
        was replaced meanwhile by another start (whose claim is put back)."""
        path = claim["_path"]
        if self.exclusive:
            aside = self.dir / f".holder.{secrets.token_hex(4)}.stale"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return True
            if aside.read_bytes() != claim["_raw"]:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                aside.unlink()
                return False
            aside.unlink()
        else:
            path.unlink(missing_ok=True)
        if claim.get("token"):
            self.beat_path(claim["token"]).unlink(missing_ok=True)
        return True

    def holds(self, token: str) -> bool:
        """Whether the run's claim is `token`'s."""
        if self.exclusive:
            claim = self._read(self.dir / HOLDER)
            return claim is not None and claim["token"] == token
        return (self.dir / f"{token}.json").exists()

    def beat(self, token: str, count: int) -> None:
        write_whole(self.beat_path(token), json.dumps({"token": token, "beat": count, "at": time.time()}).encode())

    def read_beat(self, token: str | None) -> bytes | None:
        if token is None:
            return None
        try:
            return self.beat_path(token).read_bytes()
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class Fence:
    """A lease as another process (a Ray actor, a training worker) checks it before writing into
    the run: its claim must still be there. `location` carries no credentials: a write's own path
    (`check(written)`) supplies them."""

    location: str
    token: str

    @property
    def run(self) -> StoragePath:
        return run_path(self.location)

    def check(self, written: StoragePath | None = None) -> None:
        run = self.run
        if isinstance(run, ObjectPath) and isinstance(written, ObjectPath):
            run = ObjectPath(written.base, run.key)  # reach the lease with the credentials of the write's path
        claims = Claims(run)
        if claims.holds(self.token):
            return
        if claims.exclusive and not claims.dir.is_dir():
            raise CiterError(
                f"{run} is not visible on {socket.gethostname()}, where a Ray worker of this run is writing: a run "
                "directory on a local path must be on storage that every node mounts at the same path (NFS, EFS), "
                "or in an object store (storage: s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)")
        holders = [c for c in claims.current() if c.get("token")]
        raise CiterError(f"the lease of {run} was lost" + (f" to {describe(holders[0])}" if holders else "")
                         + f"; this worker on {socket.gethostname()} stopped before writing into it")


class RunLock:
    """Hold a run directory's lease for the duration of a `with` block. With `stop_main_thread`
    (the CLI), losing the lease interrupts the main thread at once, so a long stage stops too."""

    def __init__(self, run: str | StoragePath, *, force: bool = False, command: str = "citer",
                 stop_main_thread: bool = False):
        self.run, self.force, self.command = run_path(run), force, command
        self.lease = lease_seconds()
        self.token = secrets.token_hex(8)
        self.claims = Claims(self.run)
        self.stop_main_thread = stop_main_thread
        self.lost: str | None = None
        self._trusted_until = 0.0
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewal: threading.Thread | None = None
        self._renewal_started = 0.0
        self._renewal_outcome: dict[str, Any] = {}
        self._sigint: tuple[Any, bool] | None = None  # SIGINT handler, was it blocked (`_take_sigint`)

    @property
    def fence(self) -> Fence:
        public = self.run.public_uri if isinstance(self.run, ObjectPath) else location_text(self.run)
        return Fence(public, self.token)

    def _claim(self) -> dict[str, Any]:
        me = process_started(os.getpid())
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                "since": time.time(), "machine": machine(), "started": me[1] if me else None}

    # -- taking the lease

    def acquire(self) -> None:
        if self.run.is_file():
            raise CiterError(f"{self.run}: expected a run directory, found a file; give --run a directory (new or "
                             "a run's)")
        self.run.mkdir(parents=True, exist_ok=True)
        for attempt in range(ATTEMPTS):
            others = [c for c in self.claims.current() if c["token"] != self.token]
            if others:
                live = None if self.force else self._wait_out(others)
                if live is not None:
                    raise CiterError(f"{self.run} is in use by {describe(live)}, whose lease is being renewed. Wait "
                                     "for it to finish or stop it; if it is dead and cannot be waited out, start "
                                     "again with --force")
                judged = {c["token"]: c["_raw"] for c in others}
                for claim in self.claims.current():  # still there, unchanged: not a racer's new attempt
                    if judged.get(claim["token"]) == claim["_raw"] and self.claims.remove(claim):
                        log.info("took over the lease of %s from %s%s", self.run,
                                 "a damaged lease record" if claim.get("damaged") else describe(claim),
                                 " (--force)" if self.force else "")
                continue
            started = clock()
            if self.claims.create(self._claim()):
                self._trusted_until = started + TRUSTED * self.lease
                self.claims.beat(self.token, self._beats)  # a claim with a heartbeat is held, not pending
                break
            time.sleep(random.uniform(0.05, 0.3) * (1 + attempt))
        else:
            raise CiterError(f"{self.run}: other starts kept claiming the run at the same moment; try again")
        _held.append(self)
        if self.stop_main_thread and threading.current_thread() is threading.main_thread():
            self._take_sigint()
        self._thread = threading.Thread(target=self._heartbeat, name="citer-lease", daemon=True)
        self._thread.start()

    def _wait_out(self, others: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Return a claim whose holder is alive, or None once none is (each stale or gone)."""
        here, watched = machine(), []
        for claim in others:
            state = None
            if here and claim.get("machine") == here and claim.get("pid"):
                found = process_started(claim["pid"])
                state = "gone" if found is None or found[1] != claim.get("started") or found[0] in "ZX" else \
                    "stopped" if found[0] in "Tt" else "running"
            if state == "running" and self.claims.read_beat(claim["token"]) is not None:
                return claim
            if state != "gone" and not claim.get("damaged"):
                watched.append(claim)
        if not watched:
            return None
        log.info("%s is claimed by %s: waiting up to %.0f s for its heartbeat; the run is taken over if it "
                 "does not move (--force takes it now)", self.run, describe(watched[0]), self.lease)
        seen = {c["token"]: self.claims.read_beat(c["token"]) for c in watched}
        start = clock()
        while clock() - start < self.lease:
            time.sleep(min(1.0, self.lease / 10))
            present = {c["token"] for c in self.claims.current()}
            for claim in watched:
                if claim["token"] in present and self.claims.read_beat(claim["token"]) != seen[claim["token"]]:
                    return claim
            # Gone only if a second listing agrees: an object store may leave a claim out of one
            # listing (or fail one read of it) while it is being written, and its holder lives.
            if not present & seen.keys() and not {c["token"] for c in self.claims.current()} & seen.keys():
                return None
        return None

    # -- keeping it

    def _heartbeat(self) -> None:
        interval, retry = self.lease / 4, min(2.0, self.lease / 10)
        wait = interval
        while not self._stop.wait(wait):
            # Past its trusted period (a pause, a store that hung) the lease is lost even if the claim is
            # still there: an observer may be taking the run over right now.
            outcome = self._renew(timeout=self._trusted_until - clock()) if clock() < self._trusted_until else None
            if self._stop.is_set():
                return
            if outcome is True:
                self._trusted_until = self._renewal_started + TRUSTED * self.lease
                wait = interval
            elif isinstance(outcome, str):
                self._lose(outcome)
                return
            elif clock() >= self._trusted_until:
                self._lose(self._expired())
                return
            else:
                wait = retry

    def _renew(self, timeout: float) -> bool | str | None:
        """Renew in a thread of its own (a store that hangs must not hold the clock): True when
        renewed, a message when the run was taken over, None when it failed or is still pending."""
        if self._renewal is None or not self._renewal.is_alive():
            outcome: dict[str, Any] = {}
            self._renewal_outcome, self._renewal_started = outcome, clock()

            def renew() -> None:
                try:
                    if not self.claims.holds(self.token):
                        outcome["result"] = self._taken_over()
                        return
                    self._beats += 1
                    self.claims.beat(self.token, self._beats)
                    outcome["result"] = True
                except Exception as e:  # OSError and the like from the store: retried
                    log.warning("could not renew the lease of %s (%s: %s); retrying", self.run, type(e).__name__, e)

            self._renewal = threading.Thread(target=renew, name="citer-lease-renewal", daemon=True)
            self._renewal.start()
        self._renewal.join(max(0.0, timeout))
        return None if self._renewal.is_alive() else self._renewal_outcome.get("result")

    def _expired(self) -> str:
        return (f"{self.command} lost the lease of {self.run}: it was not renewed for {TRUSTED * self.lease:.0f} s "
                "(this process was paused, or the store did not answer), so another start may hold the run now; "
                "it stopped before writing anything more. Run it again to resume")

    def _taken_over(self) -> str:
        holders = [c for c in self.claims.current() if c.get("token")]
        by = f" to {describe(holders[0])}" if holders else ""
        return (f"{self.command} lost the lease of {self.run}{by}; it stopped before writing anything more")

    def _lose(self, message: str) -> None:
        if self.lost:
            return
        self.lost = message
        if self.stop_main_thread and threading.current_thread() is not threading.main_thread():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _take_sigint(self) -> None:
        """Make sure the SIGINT `_lose` sends reaches the main thread. A process may start with
        SIGINT ignored (a background job of a non-interactive shell: `citer train ... &` in a
        script) or blocked (a Ray job's entrypoint: Ray blocks it in its processes); while it holds
        the lease, such a process handles SIGINT itself (`_interrupt_if_lost`)."""
        blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        if blocked or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            self._sigint = signal.signal(signal.SIGINT, _interrupt_if_lost), blocked
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    def check(self, written: StoragePath | None = None) -> None:
        """The fence: raise unless this process still holds the lease (see the module's docstring)."""
        if not self.lost and clock() >= self._trusted_until:
            self.lost = self._expired()
        if not self.lost and not self.claims.holds(self.token):
            self.lost = self._taken_over()
        if self.lost:
            raise CiterError(self.lost)

    # -- giving it back

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self in _held:
            _held.remove(self)
        if self._sigint is not None and threading.current_thread() is threading.main_thread():
            handler, blocked = self._sigint
            if blocked:
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
            signal.signal(signal.SIGINT, handler)
            self._sigint = None
        if self.lost:
            return  # write nothing, delete nothing: the run may be another's now
        try:
            for claim in self.claims.current():
                if claim["token"] == self.token:
                    self.claims.remove(claim)
        except OSError as e:
            log.warning("could not release the lease of %s (%s); it expires by itself", self.run, e)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None and not self.lost:
            with contextlib.suppress(CiterError, OSError):
                self.check()  # an actor's fence may have told first
        self.release()
        if self.lost and exc_type is not None:
            raise CiterError(self.lost) from None  # whatever stopped the block (an interrupt sent for it, a fence)


# ---------------------------------------------------------------------------------------------
# The fence every write into a run passes (pipeline.atomic calls check_write)

_held: list[RunLock | Fence] = []
_env_loaded = False


def _interrupt_if_lost(signum: int, frame: object) -> None:
    """SIGINT's handler while a lease is held by a process that started with SIGINT ignored or
    blocked (`RunLock._take_sigint`): the SIGINT a lost lease sends stops the main thread; one from
    outside is ignored, as it was."""
    if any(isinstance(held, RunLock) and held.lost for held in _held):
        raise KeyboardInterrupt


def _load_env_fences() -> None:
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        _held.extend(Fence(**f) for f in json.loads(os.environ.get(FENCE_ENV) or "[]"))


def guard_for(path: StoragePath) -> RunLock | Fence | None:
    """The lease held in this process (or given to it) of the run that `path` is in, if any."""
    _load_env_fences()
    return next((g for g in _held if same_place(g.run, path)), None)


def check_write(path: StoragePath) -> None:
    """Raise unless the lease covering `path`, if this process works under one, is still held."""
    guard = guard_for(path)
    if guard is not None:
        guard.check(path)


def fence_env() -> dict[str, str]:
    """The environment that gives Ray actors the leases held here, so that their writes are checked."""
    fences = [g.fence.__dict__ for g in _held if isinstance(g, RunLock)]
    return {FENCE_ENV: json.dumps(fences)} if fences else {}


def fence_for(run: StoragePath) -> Fence | None:
    """The lease of `run` held here, as a Fence to hand to another process."""
    guard = guard_for(run)
    return guard.fence if isinstance(guard, RunLock) else guard


def read_lock(run: str | StoragePath) -> dict[str, Any] | None:
    """The run's holder as recorded (its claim and last heartbeat), for display; None when no one
    holds it. Whether that holder is alive only a watch tells (see the module's docstring)."""
    claims = Claims(run_path(run))
    held = [c for c in claims.current() if c.get("token") and claims.read_beat(c["token"]) is not None]
    if not held:
        return None
    beat = json.loads(claims.read_beat(held[0]["token"]) or b"{}")
    return {**{k: v for k, v in held[0].items() if not k.startswith("_")}, "beat": beat.get("beat"),
            "renewed": beat.get("at")}
