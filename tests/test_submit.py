"""`citer submit` against a real Ray head started with `ray start --head` on loopback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_CONFIG, ROOT, run_citer

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 whose jobs find this environment's `python` first on PATH."""
    port, dashboard = free_port(), free_port()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            f"--object-store-memory={300 * 2**20}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_runs_the_demo_job_to_completion_and_resubmitting_resumes(ray_head, demo_world, tmp_path):
    world = ROOT / ".citer" / "demo-world"  # the job's copy of the repository has no .citer: point at this one
    run = tmp_path / "run"
    overrides = [f"demo.out={world}", f"models.slm={world}/slm", f"models.llm={world}/llm",
                 f"task.train_path={world}/data/train.jsonl", f"task.eval_path={world}/data/eval.jsonl",
                 "collect.n_examples=32", "collect.shard_size=16", "collect.num_actors=1", "train.epochs=1",
                 "train.num_workers=1", "eval.n_examples=20", "eval.thresholds=[0.9]", "eval.random_ratios=[0.2]",
                 "eval.confidence_thresholds=[0.9]", "eval.query_fractions=[0.2]", "loop.iterations=1"]
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
