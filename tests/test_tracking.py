"""Tracking for a run in an object store (SeaweedFS on 127.0.0.1): W&B's files, written on the
driver's machine, are copied into the run, where they outlive that machine; a storage URI's
credentials reach neither run.json, nor W&B, nor `citer status`, nor the log."""

import logging

from pipeline.config import load_config
from pipeline.rundir import check_run_config
from pipeline.status import run_status
from pipeline.storage import local_dir, run_path
from pipeline.tracking import Tracker
from tests.conftest import BUCKET, DEMO_CONFIG

SECRET = "uri-secret-0123456789abcdef"  # SeaweedFS without identities accepts any key


def test_wandb_files_are_copied_into_an_object_store_run_and_uri_credentials_are_never_kept(
        s3, demo_world, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CITER_CACHE", str(tmp_path / "cache"))
    endpoint = s3["AWS_ENDPOINT_URL"]
    storage = f"s3://URIKEY:{SECRET}@{BUCKET}/tracked?endpoint_override={endpoint}"
    cfg = load_config(DEMO_CONFIG, [f"storage={storage}", f"name={tmp_path.name}"])
    run = run_path(storage) / cfg.name
    assert SECRET in run.uri and SECRET not in str(run) + repr(run)
    caplog.set_level(logging.INFO)
    check_run_config(cfg, run)
    tracker = Tracker(cfg, run)
    tracker.finish()

    local = local_dir(run) / "wandb"
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
             if p.is_file() and not p.is_symlink() and "tmp" not in p.relative_to(local).parts}
    run_id = [p for p in files if p.endswith(".wandb")]
    assert len(run_id) == 1
    assert {name: (run / "wandb" / name).read_bytes() for name in files} == files  # whole copies in the run

    stored = [p.read_bytes() for p in run.rglob("*")]
    written = [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(stored) > 3 and all(SECRET.encode() not in data for data in stored + written)
    assert "URIKEY" in storage and all(b"URIKEY" not in data for data in stored + written)
    status = run_status(run)
    assert f"run s3://{BUCKET}/tracked/{tmp_path.name}" in status and SECRET not in status
    assert SECRET not in caplog.text
