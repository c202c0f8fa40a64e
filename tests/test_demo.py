"""The demo world: GSM8K-format task, bounds on both models' accuracy and cost, determinism, cache."""

import json

from pipeline.config import DemoConfig, TaskConfig
from pipeline.demo import build_demo_world, ensure_demo_world, make_problem
from pipeline.tasks import load_examples
from tests.conftest import DEMO_CONFIG, digest, run_citer

WORLD_JSON = ("world.json",)  # records build times, which differ between builds


def test_problems_are_gsm8k_format_with_correct_sums():
    import random

    rng = random.Random(3)
    for _ in range(200):
        row = make_problem(rng, 3)
        a, b = map(int, row["question"].removeprefix("What is ").removesuffix("?").split("+"))
        assert row["answer"].endswith(f"#### {a + b}")
        assert row["answer"].split(" ")[-3].split(":")[1] == str(a + b)  # last partial result is the sum


def test_slm_blind_spot_forgets_the_carry_after_a_big_column():
    import random

    rng_a, rng_b = random.Random(11), random.Random(11)
    changed = 0
    for _ in range(300):
        true, blind = make_problem(rng_a, 3), make_problem(rng_b, 3, blind_spot=True)
        assert true["question"] == blind["question"]
        a, b = map(int, true["question"].removeprefix("What is ").removesuffix("?").split("+"))
        big = [int(x) + int(y) >= 15 for x, y in zip(str(a)[::-1][:2], str(b)[::-1][:2], strict=True)]
        assert (true["answer"] != blind["answer"]) == any(big)
        changed += any(big)
        last = blind["answer"].split(" ")[-3].split(":")[1]
        assert blind["answer"].endswith(f"#### {int(last)}")  # the answer follows the forgetful steps
    assert 0.12 < changed / 300 < 0.27  # 10 of 100 digit pairs sum to 15+: 1 - 0.9^2 = 19% of problems


def test_world_files_and_recorded_bounds(demo_world):
    world = json.loads((demo_world / "world.json").read_text())
    assert 0.2 <= world["slm"]["eval_accuracy"] <= 0.7
    assert world["llm"]["eval_accuracy"] >= 0.9
    assert world["llm_slm_flops_ratio"] >= 10
    for name in ("slm", "llm"):
        files = {p.name for p in (demo_world / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    task = TaskConfig(format="gsm8k", train_path=str(demo_world / "data" / "train.jsonl"),
                      eval_path=str(demo_world / "data" / "eval.jsonl"))
    train, held_out = load_examples(task, "train"), load_examples(task, "eval")
    assert len(held_out) == 500 and len(train) == 2000
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}


def test_citer_eval_measures_the_bounds_through_the_hub_loader(demo_world, tmp_path):
    proc = run_citer("eval", str(DEMO_CONFIG), "--out", str(tmp_path), "eval.methods=[slm,llm]")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    points = {p["method"]: p for p in result["points"]}
    assert set(points) == {"slm", "llm"}
    assert points["slm"]["llm_call_ratio"] == 0.0 and points["llm"]["llm_call_ratio"] == 1.0
    assert points["slm"]["n"] == points["llm"]["n"] == 500
    assert 0.2 <= points["slm"]["accuracy"] <= 0.7 and points["llm"]["accuracy"] >= 0.9
    world = json.loads((demo_world / "world.json").read_text())
    assert points["slm"]["accuracy"] == world["slm"]["eval_accuracy"]  # same numbers as the build measured
    table = proc.stdout
    assert "method" in table and "slm" in table and "llm" in table and "eval.json" in table


def test_build_is_deterministic_from_the_seed_and_cached(tmp_path):
    small = dict(n_train=20, n_eval=20, slm_steps=8, llm_steps=8, batch_size=8)
    a = build_demo_world(DemoConfig(out=str(tmp_path / "a"), seed=5, **small))
    b = build_demo_world(DemoConfig(out=str(tmp_path / "b"), seed=5, **small))
    c = build_demo_world(DemoConfig(out=str(tmp_path / "c"), seed=6, **small))
    assert digest(tmp_path / "a", "*", WORLD_JSON) == digest(tmp_path / "b", "*", WORLD_JSON)
    assert a["slm"]["eval_accuracy"] == b["slm"]["eval_accuracy"]
    assert digest(tmp_path / "a", "*", WORLD_JSON) != digest(tmp_path / "c", "*", WORLD_JSON) and c["seed"] == 6
    marker = tmp_path / "a" / "world.json"
    before = marker.stat().st_mtime_ns
    assert ensure_demo_world(DemoConfig(out=str(tmp_path / "a"), seed=5, **small)) == a
    assert marker.stat().st_mtime_ns == before  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary build left behind
