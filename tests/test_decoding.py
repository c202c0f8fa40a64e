"""Collaborative decoding: the cached batched decoder equals the cache-free reference exactly."""

import random

import pytest
import torch

from pipeline import CiterError
from pipeline.config import ModelsConfig
from pipeline.decoding import (
    ConfidencePolicy,
    LLMOnly,
    RandomPolicy,
    RouterPolicy,
    SLMOnly,
    collaborative_decode,
    decode,
    llm_call_ratio,
    reference_decode,
)
from pipeline.demo import make_problem
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec


@pytest.fixture(scope="module")
def pair(demo_world):
    return load_pair(ModelsConfig(slm=str(demo_world / "slm"), llm=str(demo_world / "llm")))


@pytest.fixture(scope="module")
def router():
    torch.manual_seed(1)
    return Router(RouterSpec(input_size=48)).eval()


def prompts_of_mixed_lengths(tok, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [tok(make_problem(rng, 3)["question"] + "\n", add_special_tokens=False)["input_ids"] for _ in range(n)]
    prompts[1] = prompts[1][8:]  # a shorter prompt: the batch needs left padding
    prompts[2] = prompts[2][:5]  # an unfinished question: the answer is garbage, often long
    return prompts


def test_router_probabilities_spread_around_the_thresholds(pair, router):
    tok = pair.tokenizer
    ids = torch.tensor([prompts_of_mixed_lengths(tok, 4)[0]])
    h = pair.slm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    p = router.prob(h)
    assert p.min() < 0.5 < p.max()  # so threshold 0.5 really mixes the two models


@pytest.mark.parametrize("make_policy", [
    lambda r: RouterPolicy(r, 0.0), lambda r: RouterPolicy(r, 0.5), lambda r: RouterPolicy(r, 1.0),
    lambda r: RandomPolicy(0.3, seed=4), lambda r: ConfidencePolicy(0.95), lambda r: SLMOnly(), lambda r: LLMOnly(),
], ids=["router@0", "router@0.5", "router@1", "random", "confidence", "slm", "llm"])
def test_cached_batched_decoder_equals_cache_free_reference(pair, router, make_policy):
    tok = pair.tokenizer
    policy = make_policy(router)
    prompts = prompts_of_mixed_lengths(tok, 7)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48)
    fast = decode(pair.slm, pair.llm, prompts, policy, pad_id=tok.pad_token_id, batch_size=4, **kw)
    slow = reference_decode(pair.slm, pair.llm, prompts, policy, **kw)
    for f, s in zip(fast, slow, strict=True):
        assert f.tokens == s.tokens and f.from_llm == s.from_llm
        assert f.llm_forward_calls == s.llm_forward_calls == f.llm_tokens
    ratio = llm_call_ratio(fast)
    if isinstance(policy, RouterPolicy):
        assert ratio == {0.0: 0.0, 1.0: 1.0}.get(policy.threshold, ratio)
        if policy.threshold == 0.5:
            assert 0.0 < ratio < 1.0  # both models really produced tokens
    assert all(len(g.tokens) <= 48 for g in fast) and any(g.tokens[-1] == tok.eos_token_id for g in fast)


def test_rows_that_finish_stop_costing_compute(pair, router):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 6)
    gens = collaborative_decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), eos_ids=[tok.eos_token_id],
                                pad_id=tok.pad_token_id, max_new_tokens=40)
    for g in gens:
        assert g.slm_forward_calls == len(g.tokens)  # one SLM step per produced token, none after the end
        assert g.llm_forward_calls == g.llm_tokens
    assert len({len(g.tokens) for g in gens}) > 1


def test_max_new_tokens_caps_every_row(pair, router):
    tok = pair.tokenizer
    gens = decode(pair.slm, pair.llm, prompts_of_mixed_lengths(tok, 5), RouterPolicy(router, 0.5),
                  eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=5)
    assert [len(g.tokens) for g in gens] == [5] * 5


def test_random_routing_hits_its_target_ratio_on_500_rows(pair, demo_world):
    tok = pair.tokenizer
    prompts = [tok(make_problem(random.Random(i), 3)["question"] + "\n", add_special_tokens=False)["input_ids"]
               for i in range(500)]
    gens = decode(pair.slm, pair.llm, prompts, RandomPolicy(0.2, seed=0), eos_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id, max_new_tokens=16, batch_size=125)
    assert abs(llm_call_ratio(gens) - 0.2) <= 0.02


def test_bad_input_gives_clear_errors(pair, router):
    tok = pair.tokenizer
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(CiterError, match="must be in \\[0, 1\\]"):
            RouterPolicy(router, bad)
    with pytest.raises(CiterError, match="prompt list is empty"):
        decode(pair.slm, pair.llm, [], SLMOnly(), eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=4)
    with pytest.raises(CiterError, match="empty prompt"):
        decode(pair.slm, pair.llm, [[5], []], SLMOnly(), eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
               max_new_tokens=4)
    with pytest.raises(CiterError, match="needs both models"):
        collaborative_decode(pair.slm, None, [[5]], RouterPolicy(router, 0.5), eos_ids=[1], pad_id=0, max_new_tokens=2)
