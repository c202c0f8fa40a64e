"""One writer per run: the lease on a local filesystem and on S3 (SeaweedFS on 127.0.0.1), taken by
racing starts, waited out by this machine's clock, lost by a paused holder and by a holder whose
store stops answering, and the fence that keeps a holder that lost it from writing."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import CiterError
from pipeline.atomic import atomic_write_json
from pipeline.runlock import HOLDER, LEASE_DIR, RunLock, machine, read_lock
from pipeline.storage import ObjectPath, run_path
from tests.conftest import BUCKET, DEMO_CONFIG, ROOT, citer_env, kill_session

# A start as a separate process: waits until START_AT (a barrier), takes the lease, says so, holds
# it for HOLD seconds (or until killed), gives it back.
START = """
import sys, time
from pipeline import CiterError
from pipeline.runlock import RunLock
run, start_at, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
while time.time() < start_at:
    time.sleep(0.001)
lock = RunLock(run, command="citer train", stop_main_thread=True)
try:
    with lock:
        print("won", lock.token, flush=True)
        time.sleep(hold)
except CiterError as e:
    print(f"citer: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
"""


# How a start may find SIGINT: ignored (a background job of a non-interactive shell) or blocked (a
# Ray job's entrypoint).
SIGINT_AT_START = {"ignored": lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                   "blocked": lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])}


def start(run: str, start_at: float = 0.0, hold: float = 3600.0, lease: float = 4.0,
          sigint: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", START, run, str(start_at), str(hold)], cwd=ROOT,
                            env=citer_env(CITER_LEASE_SECONDS=str(lease)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=SIGINT_AT_START.get(sigint))


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {prefix!r} line (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def test_a_second_start_is_refused_at_once_while_the_holder_runs_and_the_lease_is_given_back(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, command="citer train") as first:
        held = read_lock(run)
        assert held["token"] == first.token and held["pid"] == os.getpid() and held["machine"] == machine()
        t0 = time.monotonic()
        with pytest.raises(CiterError, match=rf"{run} is in use by citer train on .* \(pid {os.getpid()}, since"):
            RunLock(run).acquire()
        assert time.monotonic() - t0 < 2  # a running process on this machine: no need to watch its heartbeat
    assert read_lock(run) is None and not (run / LEASE_DIR / HOLDER).exists()
    with RunLock(run):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_racing_starts_exactly_one_takes_the_run(store, tmp_path, request):
    """Four processes start at the same instant (a barrier on the clock), twice: each time exactly one
    holds the run, and the others are refused naming it."""
    for round_ in range(2):
        if store == "s3":
            request.getfixturevalue("s3")
            run = f"s3://{BUCKET}/race/{tmp_path.name}-{round_}"
        else:
            run = str(tmp_path / f"run-{round_}")
        at = time.time() + 3.0  # after every process has started and imported
        procs = [start(run, at, hold=2.0) for _ in range(4)]
        try:
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                kill_session(p.pid)
        winners = [p for p, (out, _) in zip(procs, outs, strict=True) if out.startswith("won")]
        assert len(winners) == 1, outs
        for p, (_, err) in zip(procs, outs, strict=True):
            if p is not winners[0]:
                assert p.returncode == 2, err
                assert "is in use by citer train on" in err and f"(pid {winners[0].pid}," in err, err
                assert "Traceback" not in err


def test_a_claim_from_another_machine_is_judged_by_its_heartbeat_on_this_machines_clock(tmp_path, monkeypatch):
    """A claim written on another machine, whose clock runs an hour ahead: its times say nothing here.
    While its heartbeat moves the run is refused; once it stays still for a lease period it is taken."""
    monkeypatch.setenv("CITER_LEASE_SECONDS", "1.5")
    run = tmp_path / "run"
    lease = run / LEASE_DIR
    lease.mkdir(parents=True)
    ahead = time.time() + 3600
    claim = {"token": "elsewhere0000000", "host": "gpu-node-7", "pid": 4242, "command": "citer train",
             "since": ahead, "machine": {"boot": "another-boot", "pid_ns": "pid:[1]"}, "started": 1}
    (lease / HOLDER).write_text(json.dumps(claim))
    beat = lease / "elsewhere0000000.beat"
    beat.write_text(json.dumps({"token": "elsewhere0000000", "beat": 0, "at": ahead}))

    # A live holder elsewhere renews its heartbeat: refused after it is seen to move.
    import threading

    stop = threading.Event()

    def renew() -> None:
        n = 0
        while not stop.wait(0.3):
            n += 1
            beat.write_text(json.dumps({"token": "elsewhere0000000", "beat": n, "at": ahead}))

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(CiterError, match=r"in use by citer train on gpu-node-7 \(pid 4242"):
            RunLock(run).acquire()
    finally:
        stop.set()
        renewer.join()

    # The same holder, dead: its heartbeat stays still. Taken over after a lease period watched here.
    t0 = time.monotonic()
    with RunLock(run) as lock:
        waited = time.monotonic() - t0
        assert read_lock(run)["token"] == lock.token
    assert 1.5 <= waited < 6
    assert not beat.exists()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once_and_force_takes_a_live_one(tmp_path):
    run = str(tmp_path / "run")
    holder = start(run, lease=30)
    wait_for_line(holder, "won")
    try:
        t0 = time.monotonic()
        with RunLock(run, force=True) as forced:  # a live holder: only --force takes it
            assert read_lock(run)["token"] == forced.token and time.monotonic() - t0 < 2
        # The forced-out holder finds out at its next renewal (every lease/4 = 7.5 s) and stops with one line.
        _, err = holder.communicate(timeout=30)
        assert holder.returncode == 2 and "citer train lost the lease of" in err and "Traceback" not in err
    finally:
        kill_session(holder.pid)
    dead = start(run, lease=30)
    wait_for_line(dead, "won")
    kill_session(dead.pid)  # SIGKILL: its claim stays behind
    dead.wait()
    assert read_lock(run)["pid"] == dead.pid
    t0 = time.monotonic()
    with RunLock(run) as lock:
        assert read_lock(run)["token"] == lock.token and time.monotonic() - t0 < 2


@pytest.mark.parametrize("sigint", ["ignored", "blocked"])
def test_a_start_whose_sigint_is_ignored_or_blocked_still_stops_when_its_lease_is_taken(tmp_path, sigint):
    """`citer train ... &` in a script starts citer with SIGINT ignored, and a Ray job's entrypoint
    with it blocked; SIGINT is what the lease uses to stop the main thread: while the lease is
    held, a SIGINT from outside is still ignored and the lease's own stops it."""
    run = str(tmp_path / "run")
    holder = start(run, lease=8, sigint=sigint)
    try:
        wait_for_line(holder, "won")
        os.kill(holder.pid, signal.SIGINT)  # a Ctrl-C meant for the script that started it
        time.sleep(1)
        assert holder.poll() is None and read_lock(run)["pid"] == holder.pid
        with RunLock(run, force=True):
            t0 = time.monotonic()
            _, err = holder.communicate(timeout=30)
        # Its next renewal (every lease/4 = 2 s) finds the lease taken; the fence would stop it only at a write.
        assert holder.returncode == 2 and "citer train lost the lease of" in err and "Traceback" not in err
        assert time.monotonic() - t0 < 10
    finally:
        kill_session(holder.pid)


@pytest.mark.parametrize("sigint", ["ignored", "blocked"])
def test_sigint_is_as_it_was_once_the_lease_is_given_back(tmp_path, sigint):
    before = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    SIGINT_AT_START[sigint]()
    at_start = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        with RunLock(tmp_path / "run", stop_main_thread=True):
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler)
            assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])) == at_start
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before[1])
        signal.signal(signal.SIGINT, before[0])


def test_a_writer_that_lost_the_lease_writes_nothing_and_records_carry_the_token(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, command="citer collect") as lock:
        atomic_write_json(run / "iter-000" / "collect" / "_DONE", {"rows": 3})
        assert json.loads((run / "iter-000" / "collect" / "_DONE").read_text()) == {"rows": 3, "lease": lock.token}
        subprocess.run([sys.executable, "-c", "import sys; from pipeline.runlock import RunLock; "
                        "RunLock(sys.argv[1], force=True, command='citer train').acquire()", str(run)],
                       cwd=ROOT, env=citer_env(CITER_LEASE_SECONDS="30"), check=True, timeout=60)
        with pytest.raises(CiterError, match=r"citer collect lost the lease of .* to citer train on"):
            atomic_write_json(run / "iter-000" / "_DONE", {"iteration": 0})
        assert not (run / "iter-000" / "_DONE").exists()


def snapshot(run: ObjectPath) -> dict[str, str]:
    """Every object under `run`, by key, with the SHA-256 of its content."""
    return {p.key: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")}


# Long enough that a driver on a loaded 2-core machine keeps renewing it (Ray's start holds the GIL for
# seconds at a time); the test waits out every second of it.
STOPPED_LEASE = 12


@pytest.mark.slow
def test_a_driver_stopped_past_its_lease_then_resumed_writes_nothing(s3, demo_world, tmp_path):
    """`citer collect` into S3, its driver stopped with SIGSTOP (its Ray and actors go on), a second
    start takes the run after the lease, the first is resumed with SIGCONT: it stops with one line,
    and not one object of the run changes from the moment the second holds it."""
    run = run_path(f"s3://{BUCKET}/stopped/{tmp_path.name}")
    env = citer_env(CITER_LEASE_SECONDS=str(STOPPED_LEASE), CITER_OBJECT_STORE_BYTES=str(300 * 2**20),
                    WANDB_MODE="offline")
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "collect", str(DEMO_CONFIG), "--run", str(run),
                                  "collect.n_examples=96", "collect.shard_size=4", "collect.num_actors=1"],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    second = None
    try:
        deadline = time.time() + 240
        while not run.glob("iter-000/collect/part-*.parquet") and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, log.read_text()[-3000:]
        os.kill(first.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        second = start(str(run), lease=STOPPED_LEASE)
        second_token = wait_for_line(second, "won", timeout=60).split()[1]
        assert time.monotonic() - stopped_at >= STOPPED_LEASE  # it waited out a whole lease, watching
        time.sleep(3)  # the first's actors, not stopped, meet the fence on their next shard
        before = snapshot(run)
        os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=120)
        after = snapshot(run)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        kill_session(first.pid)
        if second is not None:
            kill_session(second.pid)
    output = log.read_text()
    errors = [line for line in output.splitlines() if line.startswith("citer: error:")]
    assert first.returncode == 2 and len(errors) == 1, output[-3000:]
    assert "citer collect lost the lease of" in errors[0] and "Traceback" not in output, errors
    leases = f"{run.key}/{LEASE_DIR}/{second_token}"  # the second holder's claim and heartbeat
    assert {k: v for k, v in after.items() if not k.startswith(leases)} == \
        {k: v for k, v in before.items() if not k.startswith(leases)}
    assert [k for k in after if k.startswith(f"{run.key}/{LEASE_DIR}/")] == [f"{leases}.beat", f"{leases}.json"]
    assert any(k.startswith(f"{run.key}/iter-000/collect/part-") for k in before)


def test_a_holder_whose_store_stops_answering_stops_its_run(s3_server, tmp_path):
    """The S3 server stopped (SIGSTOP): renewals hang, are retried, and once the lease's trusted
    period has passed the holder stops its run with one line, whatever its main thread was doing."""
    env, server = s3_server
    run = f"s3://{BUCKET}/stalled/{tmp_path.name}"
    holder = start(run, lease=3)
    try:
        wait_for_line(holder, "won")
        os.kill(server.pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        try:
            line = ""
            while not line and time.monotonic() - stalled_at < 20:
                line = holder.stderr.readline()
            stopped_after = time.monotonic() - stalled_at
        finally:
            os.kill(server.pid, signal.SIGCONT)
        holder.wait(timeout=60)
    finally:
        kill_session(holder.pid)
    assert line.startswith(f"citer: error: citer train lost the lease of {run}: it was not renewed for 2 s")
    assert 1.5 <= stopped_after < 8 and holder.returncode == 2


@pytest.mark.slow
def test_the_cli_refuses_a_second_citer_train_and_takes_over_from_a_killed_one(tmp_path, demo_world):
    """Two real drivers on one run: the second exits with the holder named; the first goes on. Killed,
    the first's lease is taken at once by the next start on this machine (no --force needed)."""
    run = tmp_path / "run"
    env = citer_env(CITER_OBJECT_STORE_BYTES=str(300 * 2**20), WANDB_MODE="offline", CITER_LEASE_SECONDS="20")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", str(DEMO_CONFIG), "--run", str(run),
           "collect.n_examples=32", "loop.iterations=1"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while read_lock(run) is None and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        held = read_lock(run)
        assert held is not None and held["pid"] == first.pid
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by citer train on {held['host']} (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None and read_lock(run)["pid"] == first.pid  # the first run goes on, still holding
    finally:
        kill_session(first.pid)
        first.wait()
    assert read_lock(run)["pid"] == first.pid  # killed: its claim is left behind
    after = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while (read_lock(run) or {}).get("pid") != after.pid and time.time() < deadline and after.poll() is None:
            time.sleep(0.1)
        assert read_lock(run)["pid"] == after.pid
    finally:
        kill_session(after.pid)
        after.wait()


def test_status_shows_the_holder_without_judging_it_by_the_clock(tmp_path, demo_world):
    from pipeline.config import load_config
    from pipeline.rundir import check_run_config
    from pipeline.status import run_status

    run = tmp_path / "run"
    check_run_config(load_config(DEMO_CONFIG), run)
    with RunLock(run, command="citer train"):
        assert f"lease held by citer train on {socket.gethostname()} (pid {os.getpid()}): heartbeat 0" in \
            run_status(run)
    assert "lease held" not in run_status(run)
    assert Path(run / LEASE_DIR).is_dir()


def test_a_worker_on_a_node_that_does_not_share_a_local_run_directory_writes_nothing(tmp_path):
    """What a Ray actor on another node finds when the driver's run directory is a local path that is
    not shared: no lease there. Its write is refused, saying so, before anything is written."""
    from pipeline.runlock import FENCE_ENV, Fence

    elsewhere = tmp_path / "the-drivers-disk" / "run"  # absent here, as on a node of its own
    fence = Fence(str(elsewhere), "0123456789abcdef")
    with pytest.raises(CiterError, match=rf"{elsewhere} is not visible on {socket.gethostname()}, where a Ray worker "
                                         "of this run is writing: a run directory on a local path must be on storage "
                                         "that every node mounts"):
        fence.check(elsewhere / "iter-000" / "collect" / "part-00000.parquet")
    # The same check through the environment an actor gets, on a write through pipeline.atomic.
    probe = ("import sys; from pipeline.atomic import atomic_write_json; "
             "atomic_write_json(sys.argv[1], {'rows': 1})")
    target = elsewhere / "iter-000" / "collect" / "_DONE"
    env = citer_env(**{FENCE_ENV: json.dumps([fence.__dict__])})
    refused = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "is not visible on" in refused.stderr and not target.exists()


def test_a_lease_on_a_relative_run_directory_holds_for_workers_in_another_directory(tmp_path):
    """`citer train runs/demo`: Ray's workers do not run in the driver's directory, yet the fence
    they get must find the lease, and their writes into the run must go through."""
    from pipeline.runlock import fence_env

    run = tmp_path / "runs" / "demo"
    relative = Path(os.path.relpath(run, Path.cwd()))
    assert not relative.is_absolute()
    probe = ("import json, os, sys; from pipeline.atomic import atomic_write_json; from pipeline.runlock import "
             "FENCE_ENV, Fence\nfor f in json.loads(os.environ[FENCE_ENV]): Fence(**f).check()\n"
             "atomic_write_json(sys.argv[1], {'rows': 1})")
    target = run / "iter-000" / "collect" / "_DONE"
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    with RunLock(relative):
        env = citer_env(**fence_env())
        done = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(target.read_text())["rows"] == 1
