"""The driver: `citer train` killed in each stage resumes to the same result; config changes; status."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import CiterError
from pipeline.config import load_config
from pipeline.rundir import DONE, check_run_config, collect_dir, iteration_dir
from pipeline.shards import read_labels
from pipeline.stages.collect import run_collect
from pipeline.status import run_status
from pipeline.storage import ObjectPath, local_dir, read_json, run_path
from tests.conftest import BUCKET, DEMO_CONFIG, ROOT, citer_env, digest, kill_session, run_citer

SMALL = ["collect.n_examples=96", "collect.shard_size=8", "collect.num_actors=1", "train.epochs=4",
         "train.batch_size_per_worker=64", "train.patience=10", "eval.n_examples=30", "eval.thresholds=[0.5,0.9]",
         "eval.random_ratios=[0.2]", "eval.confidence_thresholds=[0.9]", "eval.query_fractions=[0.2]",
         "eval.refine_steps=0", "loop.iterations=1"]
SECRET = "0123456789abcdef0123456789abcdef01234567"  # a fake W&B API key that must never be written
NOISE = ("PlacementGroupCleaner", "Setting accelerator to CPU", "max_restarts > 0", "Progress bars disabled",
         "DeprecationWarning", "Running Dataset", "Execution plan of Dataset", "WARNING", "ERROR", "Traceback",
         "Loading weights")
KEPT = "Token authentication is enabled"  # Ray's one line at start that its security default is on


def start(run: ObjectPath, tmp: Path) -> subprocess.Popen:
    """Start `citer train` on `run` in its own session, its output kept in a log in `tmp`."""
    env = citer_env(CITER_OBJECT_STORE_BYTES=str(300 * 2**20), WANDB_API_KEY=SECRET, WANDB_MODE="offline")
    log = tmp / f"start-{len(list(tmp.glob('start-*.log')))}.log"
    with log.open("w") as out:
        # --force: the test killed the previous holder of the run's lease itself.
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(DEMO_CONFIG), "--run", str(run),
                                 "--force", *SMALL], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 300
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if proc.poll() is not None:
        tail = proc.log.read_text()[-4000:]  # type: ignore[attr-defined]
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it was {what}:\n{tail}")
    kill_session(proc.pid)
    proc.wait()


def progress(run: ObjectPath) -> dict:
    try:
        return read_json(run / "run.json", "the run record").get("progress", {})
    except (CiterError, OSError):  # not written yet, or a read that kept breaking off
        return {}


@pytest.mark.slow
def test_driver_killed_in_each_stage_resumes_into_s3_with_the_same_labels_and_one_wandb_run(local_ray, demo_world, s3,
                                                                                             tmp_path, monkeypatch):
    """`citer train` into `s3://` (a real S3-compatible server on 127.0.0.1), SIGKILLed while
    collecting, while training and while evaluating, then run to the end."""
    monkeypatch.setenv("CITER_CACHE", str(tmp_path / "cache"))  # where the starts keep their W&B files
    reference = tmp_path / "uninterrupted"
    run_collect(load_config(DEMO_CONFIG, SMALL), reference, 0)
    # Each `citer train` below starts its own Ray, as on a user's machine: alone, so that Ray's
    # helpers that look for "the" local instance (Train's placement-group cleaner) find one.
    local_ray.shutdown()

    run = run_path(f"s3://{BUCKET}/runs/{tmp_path.name}")
    it = iteration_dir(run, 0)
    shards = lambda: collect_dir(run, 0).glob("part-*.parquet")  # noqa: E731
    kill_when(start(run, tmp_path), lambda: len(shards()) >= 2, "collecting")
    assert 2 <= len(shards()) < 12 and not (collect_dir(run, 0) / DONE).exists()

    kill_when(start(run, tmp_path), lambda: len((it / "train").glob("checkpoint_*")) >= 2, "training")
    stopped_after = len((it / "train").glob("checkpoint_*"))
    assert 2 <= stopped_after < 4 and not (it / "train" / DONE).exists()

    proc = start(run, tmp_path)
    kill_when(proc, lambda: progress(run).get("stage") == "eval" and time.sleep(1.0) is None, "evaluating")
    assert (it / "router" / "config.json").is_file() and not (it / "eval.json").exists()

    env = citer_env(WANDB_API_KEY=SECRET, WANDB_MODE="offline")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(DEMO_CONFIG), "--run", str(run),
                           "--force", *SMALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "final curve" in done.stdout and str(it / "curve.png") in done.stdout

    # Labels: the shards byte for byte those of an uninterrupted local run, none duplicated or
    # missing, no temporary object left by the killed writers, and nothing written to a local folder
    # named after the URI.
    stored = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards()}
    assert stored == digest(collect_dir(reference, 0)) and len(stored) == 12
    assert not collect_dir(run, 0).glob(".part-*")
    assert not any(p.name.startswith("s3:") for d in (ROOT, tmp_path) for p in d.iterdir())
    assert read_labels(run, 0).equals(read_labels(reference, 0))
    keys = read_labels(run, 0, columns=[]).to_pylist()
    assert len({(k["example_id"], k["position"]) for k in keys}) == len(keys)
    train = json.loads((it / "train" / DONE).read_text())
    # The train stage continued after its last recorded epoch, not from zero (a checkpoint's folder
    # appears just before Ray records it, so the newest one seen may not count yet).
    assert train["epochs_run"] == 4 and [m["epoch"] for m in train["history"]] == [1, 2, 3, 4]
    assert len(train["resumed_from"]) == 1 and 1 <= stopped_after - 1 <= train["resumed_from"][0] <= stopped_after
    assert (it / DONE).is_file() and json.loads((it / "eval.json").read_text())["auc"]["router"] > 0

    # One W&B run across four starts, its files on this machine; one metrics record per iteration.
    record = json.loads((run / "run.json").read_text())
    run_id = record["wandb"]["id"]
    offline = sorted((local_dir(run) / "wandb").glob("offline-run-*"))
    assert local_dir(run).is_relative_to(tmp_path / "cache")
    assert len(offline) == 4 and all(p.name.endswith(run_id) for p in offline)
    assert all((p / f"run-{run_id}.wandb").is_file() for p in offline)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0]
    assert record["progress"] == {"iteration": 1, "stage": "done"}

    # The API key is in no object of the run, no local file and no output.
    assert SECRET not in done.stdout + done.stderr
    assert all(SECRET not in log.read_text() for log in tmp_path.glob("start-*.log"))
    written = [*run.rglob("*"), *(p for p in local_dir(run).rglob("*") if p.is_file())]
    assert len(written) > 20
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path

    status = run_status(run)
    assert "finished" in status and "iter-000 (complete)" in status and f"W&B run {run_id}" in status

    # The starts' logs (collecting, training, evaluating) hold none of Ray's, DeepSpeed's or W&B's
    # recurring noise, and nothing else at ERROR or WARNING level.
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("start-*.log"))) + done.stdout + done.stderr
    logs = "\n".join(line for line in logs.splitlines() if KEPT not in line)
    for noise in NOISE:
        assert noise not in logs, noise
    assert "epoch" in logs and "collect iteration 0" in logs  # the logs were read, and are citer's


def test_config_changes_that_invalidate_work_are_refused_others_allowed(tmp_path, demo_world):
    cfg = load_config(DEMO_CONFIG, SMALL)
    run = tmp_path / "run"
    check_run_config(cfg, run)
    changed = load_config(DEMO_CONFIG, [*SMALL, "train.lr=0.01", "models.llm=.citer/demo-world/slm"])
    with pytest.raises(CiterError, match=r"different config: models.llm, train.lr changed \(models.llm: "):
        check_run_config(changed, run)
    allowed = load_config(DEMO_CONFIG, [*SMALL, "loop.iterations=3", "tracking.group=ablation",
                                        "train.num_workers=1"])
    check_run_config(allowed, run)
    recorded = json.loads((run / "run.json").read_text())["config"]
    assert recorded == allowed.to_dict() and recorded["loop"]["iterations"] == 3

    proc = run_citer("train", str(DEMO_CONFIG), "--run", str(run), *SMALL, "eval.max_new_tokens=12")
    assert proc.returncode == 2 and "eval.max_new_tokens changed" in proc.stderr
    assert json.loads((run / "run.json").read_text())["config"] == recorded  # nothing overwritten


def test_status_of_a_missing_run_is_a_clear_error(tmp_path):
    proc = run_citer("status", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "not a citer run directory (no run.json)" in proc.stderr


def test_convergence_evidence_counts_flips_and_router_agreement(tmp_path):
    """Two iterations' shards written by hand: the flips and the agreement are what was planted."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.router import Router, RouterSpec, save_router
    from pipeline.rundir import shard_path
    from pipeline.shards import SCHEMA, is_validation
    from pipeline.stages.convergence import label_flips, router_agreement

    rng = np.random.default_rng(0)
    n, width = 400, 8
    ids = [f"train-{i // 10:06d}" for i in range(n)]
    hidden = rng.standard_normal((n, width)).astype(np.float16)
    cases = np.where(np.arange(n) % 4 == 0, 3, 1).astype(np.int8)
    before = np.where(cases == 3, 0, 1).astype(np.int8)
    after = before.copy()
    after[np.flatnonzero(cases == 3)[:25]] = 1  # 25 of the 100 rollout labels flip

    def table(labels):
        return pa.table({"example_id": ids, "position": pa.array(np.arange(n) % 10, type=pa.int32()),
                         "token_id": pa.array(np.zeros(n, np.int32)), "slm_token": pa.array(np.zeros(n, np.int32)),
                         "llm_token": pa.array(np.zeros(n, np.int32)),
                         "slm_hidden": [h for h in hidden], "label": pa.array(labels), "case": pa.array(cases),
                         "rollout_correct": pa.array(np.where(cases == 3, labels == 1, None).tolist(),
                                                     type=pa.bool_())}, schema=SCHEMA)

    run = tmp_path / "run"
    for k, labels in ((0, before), (1, after)):
        collect_dir(run, k).mkdir(parents=True)
        pq.write_table(table(labels), shard_path(collect_dir(run, k), 0))
    assert label_flips(run, 1) == {"case3_flips": 25, "case3_flip_share": 0.25}

    # The same router twice agrees everywhere; one that always keeps the SLM agrees where router 0 keeps it.
    torch.manual_seed(0)
    r0 = Router(RouterSpec(input_size=width)).eval()
    with torch.no_grad():  # centre its logits so that it keeps the SLM on about half of the tokens
        r0.net[-1].bias -= r0(torch.from_numpy(hidden.astype(np.float32))).median()
    r1 = Router(RouterSpec(input_size=width)).eval()
    r1.load_state_dict(r0.state_dict())
    save_router(r0, iteration_dir(run, 0) / "router")
    save_router(r0, iteration_dir(run, 1) / "router")
    cfg = load_config(DEMO_CONFIG)
    assert router_agreement(cfg, run, 1) == 1.0
    with torch.no_grad():
        r1.net[-1].bias += 100.0  # now keeps the SLM everywhere
    save_router(r1, iteration_dir(run, 1) / "router")
    val = np.array([is_validation(i, cfg.seed, cfg.train.val_fraction) for i in ids])
    keep0 = r0.prob(torch.from_numpy(hidden[val].astype(np.float32))).numpy() >= 0.5
    assert router_agreement(cfg, run, 1) == pytest.approx(keep0.mean()) and 0 < keep0.mean() < 1


def test_a_run_left_open_in_a_shared_wandb_service_is_a_clear_error(tmp_path):
    """A start killed while it shared a wandb-core service (WANDB_SERVICE) leaves its run open there;
    the next start through that service is told so, instead of wandb's bare "run ID is in use"."""
    import wandb

    from pipeline.tracking import Tracker

    cfg = load_config(DEMO_CONFIG)
    run = tmp_path / "run"
    run.mkdir()
    own = wandb.init(dir=str(tmp_path), mode="offline", settings=wandb.Settings(console="off", silent=True))
    own.finish()  # this process now has a wandb-core service and names it in WANDB_SERVICE
    assert os.environ.get("WANDB_SERVICE")
    start_and_die = (f"import os, pathlib; from pipeline.config import load_config; "
                     f"from pipeline.rundir import check_run_config; from pipeline.tracking import Tracker; "
                     f"cfg, run = load_config({str(DEMO_CONFIG)!r}), pathlib.Path({str(run)!r}); "
                     f"check_run_config(cfg, run); Tracker(cfg, run); os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", start_and_die], cwd=ROOT, env=dict(os.environ, WANDB_MODE="offline"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(CiterError, match="still held open by the wandb-core service WANDB_SERVICE names"):
        Tracker(cfg, run)


@pytest.mark.parametrize("zero_stage, finished, refused", [(1, False, True), (1, True, False), (0, False, False)])
def test_worker_count_changes_only_where_sharded_checkpoints_allow(tmp_path, demo_world, zero_stage, finished, refused):
    """ZeRO >= 1 splits a train stage's checkpoints by world size: a new worker count is refused while
    such a stage is unfinished, and allowed once it is done or without ZeRO sharding."""
    run = tmp_path / "run"
    check_run_config(load_config(DEMO_CONFIG, [*SMALL, f"deepspeed.zero_stage={zero_stage}"]), run)
    train = iteration_dir(run, 0) / "train"
    (train / "checkpoint_2026-11-26_00-00-00.000001").mkdir(parents=True)
    if finished:
        (train / DONE).write_text("{}")
    more = load_config(DEMO_CONFIG, [*SMALL, f"deepspeed.zero_stage={zero_stage}", "train.num_workers=4"])
    if refused:
        with pytest.raises(CiterError, match=r"train.num_workers changed from 2 to 4, but .*iter-000/train holds .* "
                                             r"ZeRO stage 1, split over 2 workers"):
            check_run_config(more, run)
        assert json.loads((run / "run.json").read_text())["config"]["train"]["num_workers"] == 2  # unchanged
    else:
        check_run_config(more, run)
        assert json.loads((run / "run.json").read_text())["config"]["train"]["num_workers"] == 4
