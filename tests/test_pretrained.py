"""A real pretrained pair (SmolLM2-135M-Instruct and a cut of it): BPE tokenizer, chat template,
several end ids, a padded embedding. citer's decoder and labels against transformers' own."""

import json
import random

import pytest
import torch

from pipeline import CiterError
from pipeline.config import ModelsConfig
from pipeline.decoding import DRAFT, IMMEDIATE, LLMOnly, RouterPolicy, Schedule, SLMOnly, decode, reference_decode
from pipeline.labelling import NEEDS_ROLLOUT, teacher_forced
from pipeline.models import encode_prompts, load_pair
from pipeline.router import Router, RouterSpec
from pipeline.tasks import Example
from tests.conftest import GSM8K_DIR, ROOT, run_citer

SMOL_CONFIG = ROOT / "jobs" / "configs" / "smol-gsm8k.yaml"
INSTRUCTION = "\nSolve step by step and end with '#### <number>'."


def gsm8k_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (GSM8K_DIR / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return random.Random(seed).sample(rows, n)


@pytest.fixture(scope="module")
def pair(smol_world):
    torch.set_num_threads(2)
    return load_pair(ModelsConfig(slm=str(smol_world / "slm"), llm=str(smol_world / "llm"), chat_template=True))


@pytest.fixture(scope="module")
def prompts(pair):
    """Three of the shortest GSM8K questions, of mixed lengths, through the chat template: the
    batch needs left padding."""
    rows = [json.loads(line) for line in (GSM8K_DIR / "test.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: len(r["question"]))[0:121:60]
    encoded = encode_prompts(pair.tokenizer, [r["question"] + INSTRUCTION for r in rows], chat_template=True)
    assert len({len(p) for p in encoded}) == 3
    return encoded


def hf_greedy(model, prompt: list[int], eos_ids, max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate`, one unpadded row: the tokens it adds."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=list(eos_ids), pad_token_id=eos_ids[0])
    return out[0, len(prompt):].tolist()


def test_pair_facts_from_the_real_tokenizer(pair):
    tok = pair.tokenizer
    assert tok.eos_token == "<|im_end|>" and pair.end_of_turn_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert pair.end_of_turn_id in pair.eos_ids
    assert pair.n_ids == len(tok.get_vocab()) <= pair.llm.get_output_embeddings().weight.shape[0]
    text = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = encode_prompts(tok, ["How many?"], chat_template=True, system_prompt="Be brief.")[0]
    rendered = tok.decode(prompt)
    assert rendered.index("Be brief.") < rendered.index("How many?")
    assert rendered.endswith("<|im_start|>assistant\n")  # the model answers next
    with pytest.raises(CiterError, match="system_prompt needs models.chat_template"):
        encode_prompts(tok, ["How many?"], chat_template=False, system_prompt="Be brief.")


@pytest.mark.parametrize("which", ["slm", "llm"])
def test_decoder_equals_transformers_generate_on_a_padded_chat_batch(pair, prompts, which):
    model = getattr(pair, which)
    policy = SLMOnly() if which == "slm" else LLMOnly()
    ours = decode(pair.slm, pair.llm, prompts, policy, **pair.decode_kwargs, max_new_tokens=24, batch_size=3)
    for prompt, gen in zip(prompts, ours.generations, strict=True):
        assert gen.tokens == hf_greedy(model, prompt, pair.eos_ids, 24)


def test_collaborative_decoding_equals_the_cache_free_reference(pair, prompts):
    torch.manual_seed(0)
    router = Router(RouterSpec(input_size=pair.hidden_size)).eval()
    # Thresholds at quantiles of this router's own outputs on these prompts, so routing really mixes.
    hidden = pair.slm(input_ids=torch.tensor([prompts[0]]), output_hidden_states=True).hidden_states[-1][0]
    probs = router.prob(hidden).detach()
    mixed = 0
    for q in (0.3, 0.6):
        policy = RouterPolicy(router, float(probs.quantile(q)))
        slow = reference_decode(pair.slm, pair.llm, prompts[:3], policy, eos_ids=pair.eos_ids, n_ids=pair.n_ids,
                                max_new_tokens=8)
        for schedule in (DRAFT, Schedule(verify_every=2, max_pending=1), IMMEDIATE,
                         Schedule(mode="wait", wait_fraction=0.5, max_wait=2)):
            fast = decode(pair.slm, pair.llm, prompts[:3], policy, **pair.decode_kwargs, max_new_tokens=8,
                          batch_size=2, schedule=schedule).generations  # 3 rows through 2 slots
            assert [g.tokens for g in fast] == [g.tokens for g in slow], schedule
            assert [g.from_llm for g in fast] == [g.from_llm for g in slow], schedule
        calls = [x for g in slow for x in g.from_llm]
        mixed += any(calls) and not all(calls)
    assert mixed  # both models wrote tokens of one batch


def test_teacher_forced_labels_equal_one_generate_step_per_position(pair):
    rows = gsm8k_rows("train", 2, seed=1)
    examples = [Example(id=f"ex{i}", prompt=r["question"] + INSTRUCTION, reference=r["answer"], answer="0")
                for i, r in enumerate(rows)]
    tf = teacher_forced(pair, examples, chat_template=True, batch_size=2)
    rng = random.Random(0)
    for t in tf:
        assert t.reference_ids[-1] == pair.end_of_turn_id  # the reference ends the assistant turn
        for i in rng.sample(range(len(t.reference_ids)), 5) + [len(t.reference_ids) - 1]:
            prefix = t.prompt_ids + t.reference_ids[:i]
            assert hf_greedy(pair.slm, prefix, pair.eos_ids, 1)[0] == t.slm_tokens[i]
            assert hf_greedy(pair.llm, prefix, pair.eos_ids, 1)[0] == t.llm_tokens[i]
    assert any((t.cases == NEEDS_ROLLOUT).any() for t in tf)  # real text has tokens both models miss


def padded_copy(source, target, extra_rows: int):
    """The model at `source` with `extra_rows` more embedding rows (as Qwen2-72B pads its vocabulary),
    those rows made to win every argmax if they were ever considered."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    rows = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + extra_rows, mean_resizing=False)
    with torch.no_grad():
        out = model.get_output_embeddings().weight
        out[rows:] = 50.0 * out[:rows].abs().max(dim=0).values.sign()
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias[rows:] = 1e4
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return rows


def test_a_padded_llm_pairs_with_the_unpadded_slm_and_decodes_the_same(pair, smol_world, prompts, tmp_path):
    rows = padded_copy(smol_world / "llm", tmp_path / "llm", extra_rows=128)
    padded = load_pair(ModelsConfig(slm=str(smol_world / "slm"), llm=str(tmp_path / "llm"), chat_template=True))
    assert padded.llm.config.vocab_size == rows + 128 and padded.slm.config.vocab_size == rows
    logits = padded.llm(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert logits.argmax() >= rows  # without the mask a padding row would be chosen
    ours = decode(padded.slm, padded.llm, prompts[:2], LLMOnly(), **padded.decode_kwargs, max_new_tokens=12).generations
    unpadded = decode(pair.slm, pair.llm, prompts[:2], LLMOnly(), **pair.decode_kwargs, max_new_tokens=12).generations
    assert [g.tokens for g in ours] == [g.tokens for g in unpadded]


def test_a_real_tokenizer_mismatch_is_still_refused(smol_world, demo_world):
    with pytest.raises(CiterError, match="do not share a tokenizer"):
        load_pair(ModelsConfig(slm=str(smol_world / "slm"), llm=str(demo_world / "llm")))


def test_a_mistyped_model_path_is_named_as_such(tmp_path):
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(CiterError, match="no directory .*no/such-model; not a hub id either"):
        load_pair(ModelsConfig(slm=missing, llm=missing))


def test_citer_train_one_iteration_on_real_gsm8k(smol_world, tmp_path):
    run = tmp_path / "run"
    overrides = ["collect.n_examples=6", "collect.max_rollouts_per_example=1", "collect.max_new_tokens=32",
                 "eval.n_examples=2", "eval.max_new_tokens=32", "eval.methods=[slm,llm,router]",
                 "eval.thresholds=[0.5]", "eval.refine_steps=0", "train.epochs=1", "train.num_workers=1"]
    proc = run_citer("train", str(SMOL_CONFIG), "--run", str(run), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((run / "iter-000" / "collect" / "_DONE").read_text())
    assert done["examples"] == 6 and done["cases"]["3"] > 0
    assert done["rollouts_unfinished"] <= done["cases"]["3"]
    result = json.loads((run / "iter-000" / "eval.json").read_text())
    assert {p["method"] for p in result["points"]} == {"slm", "llm", "router"}
    status = run_citer("status", str(run))
    assert status.returncode == 0 and "iter-000 (complete)" in status.stdout and "case 3" in status.stdout
