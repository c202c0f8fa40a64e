"""The shortcut audit on references where the shortcut is wrong by construction.

In the demo world the SLM forgets carries the LLM gets right (case 2 tokens). A reference that
writes the SLM's wrong digit there instead of the right one turns that position into case 1: the
SLM's token equals the reference's, so the shortcut labels it "the SLM suffices". But the answer
that follows from the SLM's digit is wrong and the one from the LLM's (the right digit) is right:
the LLM was needed. The audit must find exactly that, and agree with rollouts computed
independently by the cache-free reference decoder."""

import dataclasses

import numpy as np
import pytest

from pipeline.audit import audit_examples, audit_summary, audit_text
from pipeline.config import load_config
from pipeline.decoding import LLMOnly, reference_decode
from pipeline.labelling import LLM_NEEDED, SLM_ENOUGH, audit_positions, label_examples, teacher_forced
from pipeline.models import load_pair
from pipeline.shards import labels_table
from pipeline.tasks import extract_answer, load_examples
from tests.conftest import DEMO_CONFIG


@pytest.fixture(scope="module")
def crafted(demo_world):
    """Three training examples whose reference takes the SLM's wrong digit at its first case-2
    position, among those where the reference decoder's rollouts show that digit losing the answer
    and the LLM's keeping it (on most; which ones depends on the machine that built the world);
    (pair, examples, {example id: that position})."""
    cfg = load_config(DEMO_CONFIG)
    pair = load_pair(cfg.models)
    tok = pair.tokenizer
    examples, where = [], {}
    for ex, t in zip(load_examples(cfg.task, "train", limit=40), teacher_forced(pair, load_examples(
            cfg.task, "train", limit=40)), strict=True):
        wrong = [int(i) for i in np.flatnonzero(t.cases == LLM_NEEDED) if t.slm_tokens[i] not in pair.eos_ids]
        if not wrong or len(examples) == 3:
            continue
        rollouts = tuple(independent_rollout(pair, t.prompt_ids, t.reference_ids, wrong[0], int(token), ex.answer)
                         for token in (t.slm_tokens[wrong[0]], t.llm_tokens[wrong[0]]))
        if rollouts != (False, True):
            continue
        ids = t.reference_ids[:-1].copy()  # without the end id, which encoding appends again
        ids[wrong[0]] = int(t.slm_tokens[wrong[0]])
        text = tok.decode(ids)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids  # the demo tokenizer round-trips
        examples.append(dataclasses.replace(ex, reference=text))
        where[ex.id] = wrong[0]
    assert len(examples) == 3
    return pair, examples, where


def independent_rollout(pair, prompt_ids, reference_ids, position, token, answer) -> bool:
    """A rollout by the cache-free reference decoder, scored on the whole response's text."""
    start = prompt_ids + reference_ids[:position] + [token]
    (gen,) = reference_decode(pair.slm, pair.llm, [start], LLMOnly(), eos_ids=pair.eos_ids, max_new_tokens=64,
                              n_ids=pair.n_ids)
    response = pair.tokenizer.decode(reference_ids[:position] + [token] + gen.tokens, skip_special_tokens=True)
    return gen.tokens[-1] in pair.eos_ids and extract_answer("gsm8k", response) == answer


def test_the_audit_finds_where_the_shortcut_is_wrong(crafted):
    pair, examples, where = crafted
    tf = teacher_forced(pair, examples)
    for t in tf:  # the crafted position is case 1 now, and the LLM disagrees there
        i = where[t.example_id]
        assert t.cases[i] == SLM_ENOUGH and t.llm_tokens[i] != t.reference_ids[i]
    labels, counts = label_examples(pair, examples, tf, task_format="gsm8k", policy=LLMOnly(), max_rollouts=0,
                                    max_new_tokens=64, batch_size=32, audit_rate=1.0)
    assert counts["audit_rollouts_unfinished"] == 0
    by = {(x.example_id, x.position): x for x in labels}
    audited = [x for x in labels if x.audit_slm_correct is not None]
    assert {(x.example_id, x.position) for x in audited} == {(x.example_id, x.position) for x in labels
                                                             if x.case in (1, 2)}  # rate 1: every case-1/2 token
    for t, ex in zip(tf, examples, strict=True):
        i = where[t.example_id]
        row = by[t.example_id, i]
        expected = tuple(independent_rollout(pair, t.prompt_ids, t.reference_ids, i, int(tok), ex.answer)
                         for tok in (t.slm_tokens[i], t.llm_tokens[i]))
        assert expected == (False, True)  # the SLM's digit loses the answer, the LLM's keeps it
        assert (row.audit_slm_correct, row.audit_llm_correct) == expected
    for x in audited:  # where both models write the same token, one continuation serves both
        if x.slm_token == x.llm_token:
            assert x.audit_slm_correct == x.audit_llm_correct
    table = labels_table(labels, audit=True)
    summary = audit_summary(table)
    case1 = [x for x in audited if x.case == 1]
    wrong = [x for x in case1 if not x.audit_slm_correct and x.audit_llm_correct]
    decided = [x for x in case1 if x.audit_slm_correct or x.audit_llm_correct]
    assert len(wrong) >= 3 and summary["1"]["decided"] == len(decided)
    assert summary["1"]["agree"] == len(decided) - len(wrong) and summary["1"]["agreement"] < 1.0
    lo, hi = summary["1"]["interval"]
    assert lo < summary["1"]["agreement"] < hi
    shown = audit_examples(table, {t.example_id: t.reference_ids for t in tf}, pair.tokenizer)
    assert {(e["example_id"], e["position"]) for e in shown} >= set(where.items())
    e = next(e for e in shown if (e["example_id"], e["position"]) in where.items())
    assert e["case"] == 1 and e["shortcut_label"] == 1 and e["rollout_label"] == 0 and e["slm_token"] != e["llm_token"]
    assert "case 1 (SLM suffices)" in audit_text(summary)


def test_the_audit_sample_is_seeded_and_only_shortcut_tokens():
    cases = np.array([1, 2, 3] * 400)
    chosen = audit_positions("train-000007", cases, 0.1, seed=0)
    assert chosen == audit_positions("train-000007", cases, 0.1, seed=0)
    assert chosen != audit_positions("train-000007", cases, 0.1, seed=1)
    assert all(cases[i] in (1, 2) for i in chosen) and 40 < len(chosen) < 130  # ~10% of 800
    assert audit_positions("train-000007", cases, 0.0, seed=0) == []
