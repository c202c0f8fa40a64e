"""The demo world: GSM8K-format task, bounds on both models' accuracy and cost, determinism, cache,
references whose harmless choices the models do not make (case 3 of the labels), builder versions."""

import json
import random
import re

import pytest
import torch

from pipeline.config import DemoConfig, TaskConfig
from pipeline.tasks import is_correct, load_examples
from pipeline.worlds import demo
from pipeline.worlds.demo import (
    BUILDER_VERSION,
    LLM_SPACE_RATE,
    REFERENCE_SPACE_RATE,
    SLM_SPACE_RATE,
    build_demo_world,
    ensure_demo_world,
    is_built,
    make_problem,
    training_rows,
)
from tests.conftest import DEMO_CONFIG, digest, run_citer

WORLD_JSON = ("world.json",)  # records build times, which differ between builds
SMALL = dict(n_train=20, n_eval=20, slm_steps=8, llm_steps=8, batch_size=8)


def operands(row: dict) -> tuple[int, int]:
    a, b = row["question"].removeprefix("What is ").removesuffix("?").split("+")
    return int(a), int(b)


def gaps(row: dict) -> list[bool]:
    """Per boundary between two steps: whether it is written with two spaces."""
    steps = row["answer"].split(" #### ")[0]
    return [len(g) == 2 for g in re.findall(r"(?<=\d)( +)(?=\d)", steps)]


def space_rate(rows: list[dict]) -> float:
    flags = [g for row in rows for g in gaps(row)]
    return sum(flags) / len(flags)


def test_problems_are_gsm8k_format_with_correct_sums():
    rng = random.Random(3)
    for _ in range(200):
        row = make_problem(rng, 3)
        a, b = operands(row)
        assert row["answer"].endswith(f"#### {a + b}")
        assert row["answer"].split(" ")[-3].split(":")[1] == str(a + b)  # last partial result is the sum
        assert gaps(row) == [False, False]  # one space between steps by default


def test_slm_blind_spot_forgets_the_carry_after_a_big_column():
    rng_a, rng_b = random.Random(11), random.Random(11)
    changed = 0
    for _ in range(300):
        true, blind = make_problem(rng_a, 3), make_problem(rng_b, 3, blind_spot=True)
        assert true["question"] == blind["question"]
        a, b = operands(true)
        big = [int(x) + int(y) >= 15 for x, y in zip(str(a)[::-1][:2], str(b)[::-1][:2], strict=True)]
        assert (true["answer"] != blind["answer"]) == any(big)
        changed += any(big)
        last = blind["answer"].split(" ")[-3].split(":")[1]
        assert blind["answer"].endswith(f"#### {int(last)}")  # the answer follows the forgetful steps
    assert 0.12 < changed / 300 < 0.27  # 10 of 100 digit pairs sum to 15+: 1 - 0.9^2 = 19% of problems


def test_double_spaces_are_valid_and_keep_the_blind_spot():
    assert [make_problem(random.Random(i), 3) for i in range(50)] == [
        make_problem(random.Random(i), 3, space=0.0) for i in range(50)]  # no double spaces: the rows of before
    rows = []
    for i in range(1000):  # a fresh generator per problem: spacing draws more numbers after the question
        plain, spaced = make_problem(random.Random(i), 3), make_problem(random.Random(i), 3, space=0.5)
        blind = make_problem(random.Random(i), 3, blind_spot=True)
        blind_spaced = make_problem(random.Random(i), 3, blind_spot=True, space=0.5)
        assert plain["question"] == spaced["question"] == blind["question"] == blind_spaced["question"]
        for one, other in ((plain, spaced), (blind, blind_spaced)):
            assert re.sub(" +", " ", other["answer"]) == one["answer"]  # the same steps and answer
            assert "   " not in other["answer"] and not other["answer"].startswith(" ")
            assert other["answer"].endswith(one["answer"].split(" ")[-1]) and " ####" in other["answer"]
            assert "  ####" not in other["answer"]  # only between steps
        rows.append(spaced)
    assert abs(space_rate(rows) - 0.5) < 0.04


def test_models_rarely_see_double_spaces_and_references_write_them_mostly(tmp_path, monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        calls.append((kwargs["space"], kwargs.get("blind_spot", False)))
        return training_rows(*args, **kwargs)

    monkeypatch.setattr(demo, "training_rows", recording)
    build_demo_world(DemoConfig(out=str(tmp_path / "w"), seed=5, **SMALL))
    assert set(calls) == {(LLM_SPACE_RATE, False), (SLM_SPACE_RATE, True)}  # the SLM's data has the blind spot
    # models: enough double spaces to read them, few enough to write one space greedily; references: mostly two
    assert 0 < SLM_SPACE_RATE <= 0.2 and 0 < LLM_SPACE_RATE <= 0.2 and REFERENCE_SPACE_RATE > 0.5
    for space in (SLM_SPACE_RATE, LLM_SPACE_RATE):
        assert abs(space_rate(training_rows(random.Random(0), 3, 2000, set(), space=space)) - space) < 0.02
    rng = random.Random(1)
    held_out = {make_problem(rng, 3)["question"] for _ in range(8000)}  # 1% of all questions
    rows = training_rows(random.Random(0), 3, 2000, held_out, space=0.1, blind_spot=True)
    assert len(rows) == 2000 and not held_out & {r["question"] for r in rows}


def test_world_files_and_recorded_bounds(demo_world):
    world = json.loads((demo_world / "world.json").read_text())
    assert world["builder_version"] == BUILDER_VERSION
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


@pytest.mark.slow
def test_citer_eval_measures_the_bounds_through_the_hub_loader_into_storage_name_eval(demo_world, tmp_path):
    proc = run_citer("eval", str(DEMO_CONFIG), f"storage={tmp_path}", "eval.methods=[slm,llm]")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "demo" / "eval" / "eval.json").read_text())  # no --out: STORAGE/NAME/eval
    points = {p["method"]: p for p in result["points"]}
    assert set(points) == {"slm", "llm"}
    assert points["slm"]["llm_call_ratio"] == 0.0 and points["llm"]["llm_call_ratio"] == 1.0
    assert points["slm"]["n"] == points["llm"]["n"] == 500
    assert 0.2 <= points["slm"]["accuracy"] <= 0.7 and points["llm"]["accuracy"] >= 0.9
    world = json.loads((demo_world / "world.json").read_text())
    assert points["slm"]["accuracy"] == world["slm"]["eval_accuracy"]  # same numbers as the build measured
    table = proc.stdout
    assert "method" in table and "slm" in table and "llm" in table and "eval.json" in table


def test_references_double_space_at_the_configured_rate_and_stay_correct(demo_world):
    world = json.loads((demo_world / "world.json").read_text())
    assert world["reference_space_rate"] == REFERENCE_SPACE_RATE
    assert (world["slm"]["space_rate"], world["llm"]["space_rate"]) == (SLM_SPACE_RATE, LLM_SPACE_RATE)
    read = lambda name: [json.loads(x) for x in (demo_world / "data" / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    train = read("train")
    assert abs(space_rate(train) - REFERENCE_SPACE_RATE) < 0.03  # 4,000 boundaries between steps
    assert all(row["answer"].endswith(f"#### {sum(operands(row))}") for row in train)


def greedy_finish(model, starts: list[list[int]], tok) -> list[list[int]]:
    """Each start continued greedily to <eos> (at most 64 tokens), batched by length so nothing is padded."""
    out: dict[int, list[int]] = {}
    for n in sorted({len(s) for s in starts}):
        rows = [k for k, s in enumerate(starts) if len(s) == n]
        ids = torch.tensor([starts[k] for k in rows])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.update(zip(rows, gen[:, n:].tolist(), strict=True))
    return [out[k] for k in range(len(starts))]


@torch.no_grad()
def test_references_give_case_3_whose_rollouts_depend_on_who_finishes(demo_world):
    """Where a reference writes a second space, neither model writes it (case 3), and a rollout
    from the SLM's digit there is mostly right when the LLM writes the rest, far less often under the
    SLM alone: the labels iteration 1 can change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_world / "slm")
    slm, llm = (AutoModelForCausalLM.from_pretrained(demo_world / name).eval() for name in ("slm", "llm"))
    rows = [json.loads(x) for x in (demo_world / "data" / "train.jsonl").read_text().splitlines()[:240]]
    prompts = [tok(r["question"] + "\n", add_special_tokens=False)["input_ids"] for r in rows]
    refs = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    n = len(prompts[0])
    assert {len(p) for p in prompts} == {n}  # 3-digit questions: one prompt length; references padded on the right
    seqs = [p + r[:-1] for p, r in zip(prompts, refs, strict=True)]
    width = max(map(len, seqs))
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in seqs])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
    slm_tok, llm_tok = (m(input_ids=ids, attention_mask=mask).logits[:, n - 1 :].argmax(-1).tolist()
                        for m in (slm, llm))
    starts, golds = [], []
    for row, prompt, ref, s, l_ in zip(rows, prompts, refs, slm_tok, llm_tok, strict=True):
        for i, y in enumerate(ref):
            if s[i] != y and l_[i] != y:
                starts.append(prompt + ref[:i] + [s[i]])
                golds.append(str(sum(operands(row))))
    assert len(starts) / sum(map(len, refs)) >= 0.025
    starts, golds = starts[:120], golds[:120]
    accuracy = {}
    for name, model in (("slm", slm), ("llm", llm)):
        ends = greedy_finish(model, starts, tok)
        accuracy[name] = sum(is_correct("gsm8k", tok.decode(s[n:] + e, skip_special_tokens=True), g)
                             for s, e, g in zip(starts, ends, golds, strict=True)) / len(starts)
    # Mostly right under the LLM (80% on one machine's world, 85% or more on another's), far less under the SLM.
    assert accuracy["llm"] >= 0.7 and accuracy["slm"] <= accuracy["llm"] - 0.25, accuracy


def test_build_is_deterministic_from_the_seed_and_cached(tmp_path):
    a = build_demo_world(DemoConfig(out=str(tmp_path / "a"), seed=5, **SMALL))
    b = build_demo_world(DemoConfig(out=str(tmp_path / "b"), seed=5, **SMALL))
    c = build_demo_world(DemoConfig(out=str(tmp_path / "c"), seed=6, **SMALL))
    assert digest(tmp_path / "a", "*", WORLD_JSON) == digest(tmp_path / "b", "*", WORLD_JSON)
    assert a["slm"]["eval_accuracy"] == b["slm"]["eval_accuracy"]
    assert digest(tmp_path / "a", "*", WORLD_JSON) != digest(tmp_path / "c", "*", WORLD_JSON) and c["seed"] == 6
    marker = tmp_path / "a" / "world.json"
    before = marker.stat().st_mtime_ns
    assert ensure_demo_world(DemoConfig(out=str(tmp_path / "a"), seed=5, **SMALL)) == a
    assert marker.stat().st_mtime_ns == before  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary build left behind


def test_a_world_from_another_builder_version_is_rebuilt(tmp_path, monkeypatch):
    cfg = DemoConfig(out=str(tmp_path / "w"), seed=5, **SMALL)
    world = build_demo_world(cfg)
    marker = tmp_path / "w" / "world.json"
    files = digest(tmp_path / "w", "*", WORLD_JSON)
    old = {k: v for k, v in world.items() if k != "builder_version"}  # a world from before versions
    marker.write_text(json.dumps(old))
    assert not is_built(cfg.out)
    assert ensure_demo_world(cfg)["builder_version"] == BUILDER_VERSION
    assert json.loads(marker.read_text())["builder_version"] == BUILDER_VERSION  # rebuilt, the same files
    assert digest(tmp_path / "w", "*", WORLD_JSON) == files
    monkeypatch.setattr(demo, "BUILDER_VERSION", BUILDER_VERSION + 1)  # newer code
    before = marker.stat().st_mtime_ns
    assert not is_built(cfg.out)
    assert ensure_demo_world(cfg)["builder_version"] == BUILDER_VERSION + 1
    assert marker.stat().st_mtime_ns != before and is_built(cfg.out)
    assert ensure_demo_world(cfg)["builder_version"] == BUILDER_VERSION + 1  # and now reused
