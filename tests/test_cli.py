"""The `citer` command line: help everywhere, clear one-paragraph errors with non-zero exits."""

import json

import pytest

from tests.conftest import DEMO_CONFIG, run_citer

SUBCOMMANDS = ["build-demo", "eval", "collect", "fit-router", "train", "status"]


def test_help_for_citer_and_every_subcommand():
    proc = run_citer("--help")
    assert proc.returncode == 0 and "usage: citer" in proc.stdout
    for name in SUBCOMMANDS:
        assert name in proc.stdout
        sub = run_citer(name, "--help")
        assert sub.returncode == 0 and f"usage: citer {name}" in sub.stdout


def test_missing_config_file():
    proc = run_citer("eval", "jobs/configs/nope.yaml")
    assert proc.returncode == 2 and "config file jobs/configs/nope.yaml does not exist" in proc.stderr


def test_missing_dataset_column_names_file_row_and_field(tmp_path, demo_world):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"question": "What is 1+2?", "solution": "#### 3"}) + "\n")
    proc = run_citer("eval", str(DEMO_CONFIG), f"task.eval_path={data}", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("citer: error:")]
    assert len(errors) == 1 and f"{data}: row 0: missing field 'answer'" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["eval.batch_size=0", "models.device=tpu", "task.format=essay"])
def test_invalid_values_are_refused(bad):
    proc = run_citer("eval", str(DEMO_CONFIG), bad)
    assert proc.returncode == 2 and bad.split("=")[0] in proc.stderr
