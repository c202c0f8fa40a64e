"""One writer per run: a second `citer train` on a running run is refused; a dead holder's lease expires."""

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import CiterError
from pipeline.runlock import LOCK, RunLock, read_lock
from tests.conftest import DEMO_CONFIG, ROOT, citer_env, kill_session


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path, monkeypatch):
    monkeypatch.setenv("CITER_LEASE_SECONDS", "30")
    run = tmp_path / "run"
    with RunLock(run, command="citer train") as first:
        held = read_lock(run)
        assert held["holder"] == first.id and held["pid"] == os.getpid() and held["expires"] > time.time() + 20
        with pytest.raises(CiterError, match=rf"{run} is in use by citer train on .* \(pid {os.getpid()}"):
            RunLock(run).acquire()
    assert not (run / LOCK).exists()  # released
    with RunLock(run):
        pass


def test_an_expired_lease_is_taken_over_and_force_takes_a_live_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    stale = {"holder": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "command": "citer train",
             "since": time.time() - 600, "renewed": time.time() - 300, "expires": time.time() - 1}
    (run / LOCK).write_text(json.dumps(stale))
    with RunLock(run) as lock:
        assert read_lock(run)["holder"] == lock.id
    (run / LOCK).write_text(json.dumps({**stale, "expires": time.time() + 3600}))
    with pytest.raises(CiterError, match="elsewhere"):
        RunLock(run).acquire()
    with RunLock(run, force=True) as lock:
        assert read_lock(run)["holder"] == lock.id


def test_the_heartbeat_renews_the_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("CITER_LEASE_SECONDS", "0.8")
    run = tmp_path / "run"
    with RunLock(run):
        first = read_lock(run)["expires"]
        time.sleep(1.2)  # longer than the lease: only renewal keeps it live
        assert read_lock(run)["expires"] > first and read_lock(run)["expires"] > time.time()


def test_two_concurrent_citer_train_starts_one_is_refused(tmp_path, demo_world):
    """Two real drivers on one run: the second exits with the holder named; the first goes on."""
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
        assert second.returncode != 0
        assert f"is in use by citer train on {held['host']} (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None and read_lock(run)["pid"] == first.pid  # the first run goes on, still holding
    finally:
        kill_session(first.pid)
        first.wait()
    # Killed: its lease is left behind and still live; --force takes it at once.
    assert read_lock(run)["pid"] == first.pid
    forced = subprocess.Popen([*cmd, "--force"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while (read_lock(run) or {}).get("pid") != forced.pid and time.time() < deadline and forced.poll() is None:
            time.sleep(0.1)
        assert read_lock(run)["pid"] == forced.pid
    finally:
        kill_session(forced.pid)
        forced.wait()
