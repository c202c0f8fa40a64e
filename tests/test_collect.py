"""The collect stage: shortcut labels in one forward pass, batched rollouts, Parquet shards on Ray Data."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline import CiterError
from pipeline.audit import audit_summary
from pipeline.config import load_config
from pipeline.decoding import RouterPolicy, SLMOnly, decode
from pipeline.labelling import (
    LLM_NEEDED,
    NEEDS_ROLLOUT,
    SLM_ENOUGH,
    Rollout,
    encode_reference,
    label_examples,
    run_rollouts,
    teacher_forced,
)
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec, save_router
from pipeline.rundir import DONE, collect_dir, iteration_dir
from pipeline.shards import read_labels, shard_schema
from pipeline.stages.collect import run_collect
from pipeline.stages.loop import open_run
from pipeline.tasks import load_examples
from tests.conftest import DEMO_CONFIG, digest

# With the SLM standing in for the LLM, every SLM error is case 3: rollouts get real work.
ROLLOUT_HEAVY = ["models.llm=.citer/demo-world/slm"]


def config(*overrides: str):
    return load_config(DEMO_CONFIG, ["collect.n_examples=32", "collect.shard_size=8", "collect.batch_size=16",
                                     *overrides])


@pytest.mark.slow
def test_teacher_forced_labels_equal_one_generate_step_per_position(demo_world):
    cfg = config()
    pair = load_pair(cfg.models)
    examples = load_examples(cfg.task, "train", limit=50)
    tf = teacher_forced(pair, examples, batch_size=25)
    tok = pair.tokenizer
    checked = 0
    for t in tf:
        for i in range(len(t.reference_ids)):
            ids = torch.tensor([t.prompt_ids + t.reference_ids[:i]])
            step = {name: int(m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                         do_sample=False, pad_token_id=tok.pad_token_id)[0, -1])
                    for name, m in (("slm", pair.slm), ("llm", pair.llm))}
            assert (step["slm"], step["llm"]) == (t.slm_tokens[i], t.llm_tokens[i])
            checked += 1
    cases = np.concatenate([t.cases for t in tf])
    assert checked == len(cases) > 2000 and (cases == SLM_ENOUGH).any() and (cases == LLM_NEEDED).any()


@pytest.mark.parametrize("overrides", [pytest.param([], id="demo-pair"),
                                       pytest.param(ROLLOUT_HEAVY, id="slm-as-llm", marks=pytest.mark.slow)])
def test_collect_shards_match_the_labelling_core(local_ray, demo_world, tmp_path, overrides):
    cfg = config(*overrides)
    summary = run_collect(cfg, tmp_path / "run", 0)
    table = read_labels(tmp_path / "run", 0)
    assert table.schema.remove_metadata() == shard_schema(audit=cfg.collect.audit_rate > 0)
    files = sorted(p.name for p in collect_dir(tmp_path / "run", 0).iterdir())
    assert files == [DONE] + [f"part-{k:05d}.parquet" for k in range(4)]

    pair = load_pair(cfg.models)
    examples = sorted(load_examples(cfg.task, "train", limit=32), key=lambda e: e.id)
    tf = teacher_forced(pair, examples, batch_size=16)
    labels, counts = label_examples(pair, examples, tf, task_format="gsm8k", policy=SLMOnly(), max_rollouts=32,
                                    max_new_tokens=cfg.collect.max_new_tokens, batch_size=16)
    rows = table.to_pylist()
    assert len(rows) == len(labels) == summary["rows"]
    assert counts["case3_dropped"] == summary["case3_dropped_by_cap"] == 0
    assert counts["rollouts_unfinished"] == summary["rollouts_unfinished"]
    for row, lab in zip(rows, labels, strict=True):
        assert (row["example_id"], row["position"], row["token_id"]) == (lab.example_id, lab.position, lab.token_id)
        assert (row["case"], row["label"], row["rollout_correct"]) == (lab.case, lab.label, lab.rollout_correct)
        assert np.array_equal(np.asarray(row["slm_hidden"], dtype=np.float16), lab.slm_hidden)
    cases = np.array([r["case"] for r in rows])
    assert summary["cases"] == {str(c): int((cases == c).sum()) for c in (1, 2, 3)}
    if overrides:
        assert (cases == NEEDS_ROLLOUT).sum() > 5 and (cases == LLM_NEEDED).sum() == 0
        rolled = [r for r in rows if r["case"] == NEEDS_ROLLOUT]
        assert all(r["rollout_correct"] is not None and r["label"] == int(r["rollout_correct"]) for r in rolled)
    else:
        assert (cases == LLM_NEEDED).sum() > 0
    assert all(r["rollout_correct"] is None for r in rows if r["case"] != NEEDS_ROLLOUT)


def test_rollout_cap_drops_and_counts_deterministically(demo_world):
    cfg = config(*ROLLOUT_HEAVY)
    pair = load_pair(cfg.models)
    examples = load_examples(cfg.task, "train", limit=32)
    tf = teacher_forced(pair, examples, batch_size=16)
    kw = dict(task_format="gsm8k", policy=SLMOnly(), max_new_tokens=64, batch_size=16)
    full, _ = label_examples(pair, examples, tf, max_rollouts=100, **kw)
    capped, counts = label_examples(pair, examples, tf, max_rollouts=0, **kw)
    dropped = counts["case3_dropped"]
    assert dropped == sum(x.case == NEEDS_ROLLOUT for x in full) > 0 and counts["rollouts_unfinished"] == 0
    assert len(capped) == len(full) - dropped and all(x.case != NEEDS_ROLLOUT for x in capped)
    again, _ = label_examples(pair, examples, tf, max_rollouts=1, **kw)
    once, _ = label_examples(pair, examples, tf, max_rollouts=1, **kw)
    assert [(x.example_id, x.position) for x in again] == [(x.example_id, x.position) for x in once]


@pytest.mark.slow
def test_iteration_one_keeps_shortcut_rows_and_redoes_rollouts_under_the_router(local_ray, demo_world, tmp_path):
    cfg = config(*ROLLOUT_HEAVY, "collect.audit_rate=0.05")
    run = tmp_path / "run"
    run_collect(cfg, run, 0)
    with pytest.raises(CiterError, match="router of iteration 0"):
        run_collect(cfg, run, 1)
    torch.manual_seed(0)
    router = Router(RouterSpec(input_size=48)).eval()
    save_router(router, iteration_dir(run, 0) / "router")
    run_collect(cfg, run, 1)
    first, second = read_labels(run, 0).to_pylist(), read_labels(run, 1).to_pylist()
    assert len(first) == len(second)
    redo = [k for k, r in enumerate(first) if r["case"] == NEEDS_ROLLOUT]
    audit = ("audit_slm_correct", "audit_llm_correct")
    for a, b in zip(first, second, strict=True):
        if a["case"] != NEEDS_ROLLOUT:
            assert {k: v for k, v in a.items() if k not in audit} == {k: v for k, v in b.items() if k not in audit}
        assert (a["audit_slm_correct"] is None) == (b["audit_slm_correct"] is None)  # the same tokens audited
    pair = load_pair(cfg.models)
    examples = {e.id: e for e in load_examples(cfg.task, "train", limit=32)}
    tok = pair.tokenizer
    rollouts = []
    for k in redo:  # the rollout start built by hand: prompt + reference prefix + the SLM's token
        ex = examples[first[k]["example_id"]]
        prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        ref = tok(ex.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rollouts.append(Rollout(prompt, ref, first[k]["position"], first[k]["slm_token"], ex.answer))
        assert rollouts[-1].start == prompt + ref[: first[k]["position"]] + [first[k]["slm_token"]]
    policy = RouterPolicy(router, cfg.collect.threshold)
    heard: list[int] = []  # what progress hears: each batch's examples as their rollouts finish
    expected, _ = run_rollouts(pair, rollouts, task_format="gsm8k", policy=policy, max_new_tokens=128, batch_size=16,
                               on_examples=heard.append)
    assert [second[k]["rollout_correct"] for k in redo] == expected
    rolled = len({first[k]["example_id"] for k in redo if first[k]["slm_token"] != tok.eos_token_id})
    assert sum(heard) == rolled and len(heard) == -(-rolled // 16) and rolled > 16
    # The audit is redone under the router too: the rollouts from the SLM's token, by hand (with
    # the SLM standing in for the LLM, both models' tokens are one token).
    audited = [k for k, r in enumerate(second) if r["audit_slm_correct"] is not None]
    assert audited and all(second[k]["slm_token"] == second[k]["llm_token"] for k in audited)
    by_hand = [Rollout(*encode_reference(tok, examples[second[k]["example_id"]], chat_template=False,
                                         end_id=tok.eos_token_id), second[k]["position"], second[k]["slm_token"],
                       examples[second[k]["example_id"]].answer) for k in audited]
    expected, _ = run_rollouts(pair, by_hand, task_format="gsm8k", policy=policy, max_new_tokens=128, batch_size=16)
    assert [second[k]["audit_slm_correct"] for k in audited] == expected
    assert [second[k]["audit_llm_correct"] for k in audited] == expected
    summary = json.loads((collect_dir(run, 1) / DONE).read_text())["audit"]
    assert summary["all"]["audited"] == len(audited) and summary["2"]["audited"] == 0
    assert summary["1"]["decided"] == sum(expected)  # one continuation: decided where it is right, and then agrees
    assert summary["1"]["agree"] == sum(expected)


def test_router_features_are_stored_as_the_decoder_computes_them_and_the_audit_is_reported(local_ray, demo_world,
                                                                                           tmp_path):
    """With `router.features` = all three, the shards hold each token's top-k probabilities and
    greedy-token embedding beside its hidden state; a decode of the same prefix computes, inside
    its SLM step, the same feature vector (up to the shards' float16). The collect stage's audit
    figures equal those recomputed from the shards, and audit.jsonl shows disagreements as text."""
    cfg = config("router.features=[hidden, topk, token_embedding]", "router.top_k=8", "collect.n_examples=16",
                 "collect.audit_rate=0.2")
    run = tmp_path / "run"
    summary = run_collect(cfg, run, 0)
    table = read_labels(run, 0)
    assert table.schema.remove_metadata() == shard_schema(("topk", "token_embedding"), audit=True)
    assert summary["audit"] == audit_summary(table) and summary["audit"]["all"]["audited"] > 20
    for line in (iteration_dir(run, 0) / "audit.jsonl").read_text().splitlines():
        e = json.loads(line)
        assert {"prefix", "reference_token", "slm_token", "llm_token", "shortcut_label", "rollout_label"} <= set(e)
        assert e["shortcut_label"] != e["rollout_label"]
    pair = load_pair(cfg.models)
    spec = RouterSpec(input_size=48, features=("hidden", "topk", "token_embedding"), top_k=8, embedding_size=48)
    router = Router(spec).eval()
    seen = []
    step_features = router.step_features
    router.step_features = lambda *a: seen.append(step_features(*a).numpy()) or step_features(*a)
    tok = pair.tokenizer
    examples = {e.id: e for e in load_examples(cfg.task, "train", limit=16)}
    rows = table.to_pylist()
    for row in rows[:: max(1, len(rows) // 12)]:
        prompt, reference = encode_reference(tok, examples[row["example_id"]], chat_template=False,
                                             end_id=tok.eos_token_id)
        seen.clear()
        decode(pair.slm, pair.llm, [prompt + reference[: row["position"]]], RouterPolicy(router, 0.5),
               **pair.decode_kwargs, max_new_tokens=1)
        stored = np.concatenate([row["slm_hidden"], row["slm_topk"], row["slm_token_embedding"]]).astype(np.float32)
        at_decode = seen[0][0]
        assert at_decode.shape == stored.shape == (104,)
        # float16 storage: each value within one float16 step of the decoder's own
        step = np.spacing(np.abs(stored).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(at_decode - stored) <= step + 1e-6)


@pytest.mark.slow
def test_a_damaged_shard_is_named_and_relabelled_on_resume(local_ray, demo_world, tmp_path):
    cfg = config()
    run = tmp_path / "run"
    run_collect(cfg, run, 0)
    before = digest(collect_dir(run, 0))
    shard = sorted(collect_dir(run, 0).glob("part-*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated copy
    with pytest.raises(CiterError, match=f"{shard}: damaged labelled shard"):
        read_labels(run, 0)
    run_collect(cfg, run, 0)  # though the stage was complete, the damaged shard is labelled again, identically
    assert digest(collect_dir(run, 0)) == before


def test_bad_input_is_refused_and_nothing_written_is_damaged(local_ray, demo_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What is 1+2?", "answer": ""}) + "\n")
    with pytest.raises(CiterError, match=r"bad\.jsonl: row 0: field 'answer' has no '#### <number>'"):
        run_collect(config(f"task.train_path={bad}"), tmp_path / "r0", 0)

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "What is 1+2?", "answer": "1+2+0=3:3 " * 40 + "#### 3"}) + "\n")
    with pytest.raises(CiterError, match="train-000000: prompt \\+ reference is .* longer than the models' context"):
        run_collect(config(f"task.train_path={long}"), tmp_path / "r1", 0)

    cfg = config()
    run = tmp_path / "run"
    run_collect(cfg, open_run(cfg, run), 0)
    before = digest(collect_dir(run, 0))
    changed = dataclasses.replace(cfg, collect=dataclasses.replace(cfg.collect, max_new_tokens=7))
    with pytest.raises(CiterError, match="different config: collect.max_new_tokens changed"):
        (collect_dir(run, 0) / DONE).unlink()
        run_collect(changed, open_run(changed, run), 0)
    assert digest(collect_dir(run, 0)) == before


def test_myopic_ablation_labels_case3_prefer_llm_without_any_rollout(demo_world):
    cfg = config(*ROLLOUT_HEAVY)
    pair = load_pair(cfg.models)
    examples = load_examples(cfg.task, "train", limit=32)
    tf = teacher_forced(pair, examples, batch_size=16)
    forwards = []
    hooks = [m.register_forward_hook(lambda *_: forwards.append(1)) for m in (pair.slm, pair.llm)]
    kw = dict(task_format="gsm8k", policy=SLMOnly(), max_rollouts=32, max_new_tokens=64, batch_size=16)
    try:
        myopic, counts = label_examples(pair, examples, tf, case3_labels="llm", **kw)
        assert forwards == [] and counts["rollouts_unfinished"] == 0  # not one model call: no rollout ran
        rolled, _ = label_examples(pair, examples, tf, **kw)
        assert forwards  # the rollout rule does call the models
    finally:
        for h in hooks:
            h.remove()
    case3 = [x for x in myopic if x.case == NEEDS_ROLLOUT]
    assert len(case3) > 5 and all(x.label == 0 and x.rollout_correct is None for x in case3)
    assert any(x.label == 1 for x in rolled if x.case == NEEDS_ROLLOUT)  # rollouts do find tokens the SLM may keep
    same = [(a.example_id, a.position, a.case, a.label) for a in myopic if a.case != NEEDS_ROLLOUT]
    assert same == [(b.example_id, b.position, b.case, b.label) for b in rolled if b.case != NEEDS_ROLLOUT]
