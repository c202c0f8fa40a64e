"""Revisions of a run's models and datasets: recorded in run.json on the first start, a change
refused on resume naming what changed, accepted only when asked."""

import json
import shutil

import pytest

from pipeline import CiterError
from pipeline.config import load_config
from pipeline.revisions import ALLOW_ENV, content_hash, hub_commit
from pipeline.rundir import check_run_config
from tests.conftest import DEMO_CONFIG


@pytest.fixture
def world_copy(demo_world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(demo_world, copy)
    return copy


def config_on(world):
    return load_config(DEMO_CONFIG, [f"demo.out={world}", f"models.slm={world}/slm", f"models.llm={world}/llm",
                                     f"task.train_path={world}/data/train.jsonl",
                                     f"task.eval_path={world}/data/eval.jsonl"])


def test_a_changed_model_or_dataset_is_refused_on_resume_unless_allowed(world_copy, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    cfg, run = config_on(world_copy), tmp_path / "run"
    check_run_config(cfg, run)
    recorded = json.loads((run / "run.json").read_text())["revisions"]
    assert recorded["models.llm"] == {"sha256": content_hash(world_copy / "llm")}
    assert recorded["task.train_path"] == {"sha256": content_hash(world_copy / "data" / "train.jsonl")}
    check_run_config(cfg, run)  # unchanged: resumes

    weights = world_copy / "llm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the LLM's weights
    weights.write_bytes(bytes(data))
    with open(world_copy / "data" / "train.jsonl", "a") as f:
        f.write(json.dumps({"question": "1+1", "answer": "#### 2"}) + "\n")
    with pytest.raises(CiterError, match=rf"{run}: its inputs changed since the run started: models.llm "
                                         rf"\({world_copy}/llm: sha256 [0-9a-f]{{12}} -> [0-9a-f]{{12}}\); "
                                         rf"task.train_path \({world_copy}/data/train.jsonl: .*--allow-changed-inputs"):
        check_run_config(cfg, run)
    assert json.loads((run / "run.json").read_text())["revisions"] == recorded  # nothing recorded

    monkeypatch.setenv(ALLOW_ENV, "1")
    check_run_config(cfg, run)
    now = json.loads((run / "run.json").read_text())["revisions"]
    assert now["models.llm"] == {"sha256": content_hash(world_copy / "llm")} != recorded["models.llm"]
    monkeypatch.delenv(ALLOW_ENV)
    check_run_config(cfg, run)  # the new inputs are the run's now


def test_a_content_hash_reads_small_files_whole_and_samples_large_ones(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1000))
    before = content_hash(small)
    small.write_bytes(bytes(999) + b"\x01")
    assert content_hash(small) != before
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(65 * 2**20))
    before = content_hash(big)
    with big.open("r+b") as f:
        f.seek(0)  # the first block is always sampled
        f.write(b"\x01")
    assert content_hash(big) != before


def test_a_hub_name_is_recorded_by_the_commit_its_cache_resolved_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    ref = cache / "models--org--model" / "refs"
    ref.mkdir(parents=True)
    (ref / "main").write_text("0123456789abcdef0123456789abcdef01234567\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_commit.cache_clear()
    assert hub_commit("org/model", "model") == "0123456789abcdef0123456789abcdef01234567"
    assert hub_commit("org/other", "model") is None
