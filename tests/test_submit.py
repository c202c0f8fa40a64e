"""`citer submit`: what it sends (a fake client, fast), and a real run against a Ray head started with
`ray start --head` on loopback (slow)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import CiterError
from pipeline.raysession import LOCAL_PATH_ENV
from pipeline.submit import runtime_env, submit
from tests.conftest import DEMO_CONFIG, ROOT, citer_env, free_ports, run_citer

BIN = Path(sys.executable).parent


class FakeClient:
    """Stands in for ray.job_submission.JobSubmissionClient: records what would be submitted."""

    submitted: list[dict[str, Any]] = []

    def __init__(self, address: str) -> None:
        self.address = address

    def submit_job(self, **kwargs: Any) -> str:
        FakeClient.submitted.append(kwargs)
        return kwargs["submission_id"]


@pytest.fixture
def fake_client(monkeypatch) -> list[dict[str, Any]]:
    import ray.job_submission

    FakeClient.submitted = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    return FakeClient.submitted


def test_paths_of_this_machine_are_not_forwarded_and_the_runtime_env_files_win(monkeypatch):
    laptop = {"HF_HOME": "/Users/me/.cache/huggingface", "WANDB_DIR": "/Users/me/wandb"}
    for key, value in laptop.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_PROJECT", "citer-test")
    assert set(laptop) == set(LOCAL_PATH_ENV)
    plain = runtime_env(ROOT)["env_vars"]
    assert not set(laptop) & set(plain) and plain["WANDB_PROJECT"] == "citer-test"
    cluster_file = ROOT / "cluster" / "runtime-env.yaml"
    with_file = runtime_env(ROOT, str(cluster_file))["env_vars"]
    assert with_file["HF_HOME"] == yaml.safe_load(cluster_file.read_text())["env_vars"]["HF_HOME"]
    assert "WANDB_DIR" not in with_file


def test_the_driver_of_a_gpu_config_reserves_no_gpu(fake_client, monkeypatch):
    """Evaluation runs on actors, so the job's driver loads no model: it may run on a CPU-only head."""
    monkeypatch.setenv("HF_HOME", "/Users/me/.cache/huggingface")
    assert submit("jobs/configs/gsm8k-qwen2.yaml", ["collect.num_gpus_per_actor=2"], "http://127.0.0.1:1",
                  follow=False, runtime_env_file="cluster/runtime-env.yaml") == 0
    assert submit(str(DEMO_CONFIG.relative_to(ROOT)), ["storage=/mnt/shared/citer-runs"], "http://127.0.0.1:1",
                  follow=False) == 0
    gpu, demo = fake_client
    assert gpu.get("entrypoint_num_gpus") is None and demo.get("entrypoint_num_gpus") is None
    assert gpu["entrypoint"].startswith("python jobs/entrypoint.py jobs/configs/gsm8k-qwen2.yaml")
    assert gpu["runtime_env"]["env_vars"]["HF_HOME"] == "/mnt/shared/hf-cache"


def test_a_run_that_a_job_could_not_resume_or_whose_uri_shows_credentials_is_refused(fake_client, monkeypatch):
    demo = str(DEMO_CONFIG.relative_to(ROOT))
    for overrides, run, message in (
            ([], None, "storage 'runs/demo' is relative: the job would write the run into its temporary copy"),
            ([], "runs/demo-2", "--run 'runs/demo-2' is relative"),
            (["storage=s3://AKIAKEY:se/cret@bucket/runs"], None,
             r"storage s3://\*\*\*@bucket/runs/demo: credentials in a storage URI would be kept in the job's "
             "entrypoint")):
        with pytest.raises(CiterError, match=message) as refused:
            submit(demo, overrides, "http://127.0.0.1:1", run=run, follow=False)
        assert "se/cret" not in str(refused.value)
    assert fake_client == []  # nothing was submitted


def test_two_submissions_in_one_second_get_distinct_ids(fake_client, monkeypatch):
    for _ in range(2):
        submit(str(DEMO_CONFIG.relative_to(ROOT)), ["storage=s3://bucket/runs"], "http://127.0.0.1:1", follow=False)
    first, second = (job["submission_id"] for job in fake_client)
    assert first != second and first.startswith("citer-demo-") and second[:-7] == first[:-7]


def test_the_runtime_env_file_wins_over_this_shell_and_names_what_it_overrides(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-my-shell")
    cluster_file = tmp_path / "runtime-env.yaml"
    cluster_file.write_text("env_vars:\n  WANDB_MODE: online\n  HF_HOME: /mnt/shared/hf-cache\n")
    with caplog.at_level(logging.WARNING):
        env = runtime_env(ROOT, str(cluster_file))["env_vars"]
    assert env["WANDB_MODE"] == "online" and env["WANDB_PROJECT"] == "from-my-shell"
    assert f"{cluster_file} sets WANDB_MODE, which this shell sets differently" in caplog.text
    assert "offline" not in caplog.text  # names, never values


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 whose jobs find this environment's `python` first on PATH."""
    port, dashboard = free_ports(2)
    env = citer_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            f"--object-store-memory={300 * 2**20}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_submit_runs_the_demo_job_to_completion_and_resubmitting_resumes(ray_head, demo_world, tmp_path):
    world = ROOT / ".citer" / "demo-world"  # the job's copy of the repository has no .citer: point at this one
    run = tmp_path / "run"
    overrides = [f"demo.out={world}", f"models.slm={world}/slm", f"models.llm={world}/llm",
                 f"task.train_path={world}/data/train.jsonl", f"task.eval_path={world}/data/eval.jsonl",
                 "collect.n_examples=32", "collect.shard_size=16", "collect.num_actors=1", "train.epochs=1",
                 "train.num_workers=1", "eval.n_examples=20", "eval.thresholds=[0.9]", "eval.random_ratios=[0.2]",
                 "eval.confidence_thresholds=[0.9]", "eval.query_fractions=[0.2]", "eval.refine_steps=0",
                 "loop.iterations=1"]
    args = ["submit", str(DEMO_CONFIG.relative_to(ROOT)), "--address", ray_head, "--run", str(run), *overrides]
    first = run_citer(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "SUCCEEDED" in first.stdout and "final curve" in first.stdout
    done = json.loads((run / "iter-000" / "_DONE").read_text())
    assert done["iteration"] == 0 and "eval/auc/router" in done
    wandb_id = json.loads((run / "run.json").read_text())["wandb"]["id"]

    again = run_citer(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "iteration 0 is complete; skipping" in again.stdout + again.stderr
    assert json.loads((run / "run.json").read_text())["wandb"]["id"] == wandb_id
