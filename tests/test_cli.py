"""The `citer` command line: help everywhere, clear one-paragraph errors with non-zero exits."""

import argparse
import json

import pytest

from tests.conftest import DEMO_CONFIG, run_citer

SUBCOMMANDS = ["build-demo", "build-smol", "eval", "collect", "fit-router", "train", "status", "submit", "serve"]


def test_help_for_citer_and_every_subcommand():
    """Every subcommand the parser has is one the README's users know, and each answers --help."""
    from pipeline.cli import build_parser

    choices = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(choices) == sorted(SUBCOMMANDS)
    proc = run_citer("--help")
    assert proc.returncode == 0 and "usage: citer" in proc.stdout
    for name in SUBCOMMANDS:
        assert name in proc.stdout
        sub = run_citer(name, "--help")
        assert sub.returncode == 0 and f"usage: citer {name}" in sub.stdout


def test_world_builders_options_are_their_configs_fields_with_the_same_defaults():
    """build-demo and build-smol offer one option per DemoConfig / SmolConfig field, defaulting to
    the dataclass's value, and a value outside a field's range is refused by the config's check."""
    import dataclasses

    from pipeline.cli import parse_args
    from pipeline.config import DemoConfig, SmolConfig

    for command, cls in (("build-demo", DemoConfig), ("build-smol", SmolConfig)):
        args, help_text = parse_args([command]), run_citer(command, "--help").stdout
        for f in dataclasses.fields(cls):
            assert getattr(args, f.name) == f.default, (command, f.name)
            assert f"--{f.name.replace('_', '-')}" in help_text
    assert parse_args(["build-smol", "--slm-layers", "8"]).slm_layers == 8
    proc = run_citer("build-smol", "--slm-layers", "30", "--out", "/nonexistent/never-built")
    assert proc.returncode == 2 and "slm_layers" in proc.stderr and "the command line" in proc.stderr


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


# ---------------------------------------------------------------------------------------------
# Damaged files and odd paths, as a new user meets them: one line naming the file, a non-zero exit


def one_error_line(proc) -> str:
    """The one `citer: error:` line of a refused command (and no traceback)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("citer: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def recorded_run(tmp_path, demo_world):
    """A run directory as a first start leaves it: run.json with the demo config."""

    from pipeline.config import load_config
    from pipeline.rundir import check_run_config

    run = tmp_path / "run"
    check_run_config(load_config(DEMO_CONFIG), run)
    return run


def cut_short(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_status_names_each_damaged_file_it_reads(recorded_run):
    run = recorded_run
    record = {"iteration": 0, "collect/case3_share": 0.5, "eval/auc/router": 0.7}
    (run / "iter-000" / "collect").mkdir(parents=True)
    (run / "iter-000" / "collect" / "_DONE").write_text(json.dumps({"rows": 4, "cases": {"1": 2, "2": 1, "3": 1}}))
    (run / "iter-000" / "eval.json").write_text(json.dumps({"auc": {"router": 0.7}, "points": []}))
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert run_citer("status", str(run)).returncode == 0
    for damaged, expected in (("run.json", "damaged, not JSON (Unterminated string"),
                              ("iter-000/eval.json", "damaged, not JSON"),
                              ("iter-000/collect/_DONE", "damaged, not JSON"),
                              ("metrics.jsonl", "line 1 is damaged, not an iteration's JSON record")):
        whole = (run / damaged).read_bytes()
        cut_short(run / damaged)
        line = one_error_line(run_citer("status", str(run)))
        assert line.startswith(f"citer: error: {run / damaged}: {expected}"), line
        (run / damaged).write_bytes(whole)


def test_fit_router_names_a_truncated_shard(recorded_run, demo_world):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.shards import SCHEMA

    run, n, width = recorded_run, 40, 48  # the demo SLM's hidden size
    collect = run / "iter-000" / "collect"
    collect.mkdir(parents=True)
    table = pa.table({"example_id": [f"train-{i // 10:06d}" for i in range(n)], "position": list(range(n)),
                      "token_id": [1] * n, "slm_token": [1] * n, "llm_token": [1] * n,
                      "slm_hidden": [[0.5] * width] * n, "label": [1] * n, "case": [1] * n,
                      "rollout_correct": [None] * n}, schema=SCHEMA)
    pq.write_table(table, collect / "part-00000.parquet")
    (collect / "_DONE").write_text(json.dumps({"rows": n}))
    cut_short(collect / "part-00000.parquet")
    line = one_error_line(run_citer("fit-router", str(DEMO_CONFIG), "--run", str(run)))
    assert line.startswith(f"citer: error: {collect / 'part-00000.parquet'}: damaged labelled shard, not Parquet")
    assert "rerun the collect stage" in line


def test_a_run_path_that_is_a_file_or_under_one_is_named(tmp_path, demo_world):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a run")
    line = one_error_line(run_citer("train", str(DEMO_CONFIG), "--run", str(afile)))
    assert line == f"citer: error: {afile}: expected a run directory, found a file"
    line = one_error_line(run_citer("collect", str(DEMO_CONFIG), "--run", str(afile / "run")))
    assert line.startswith(f"citer: error: {afile / 'run'}") and "Not a directory" in line
    assert afile.read_text() == "not a run"
