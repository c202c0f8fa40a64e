"""Collaborative decoding: the cached batched decoder equals the cache-free reference exactly."""

import random

import pytest
import torch

from pipeline import CiterError
from pipeline.config import ModelsConfig
from pipeline.decoding import (
    IMMEDIATE,
    ConfidencePolicy,
    LLMOnly,
    Prefix,
    RandomPolicy,
    RouterPolicy,
    Schedule,
    SLMOnly,
    decode,
    llm_call_ratio,
    reference_decode,
    speculative_decode,
)
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec
from pipeline.worlds.demo import make_problem


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


SCHEDULES = {"immediate": IMMEDIATE, "half-or-3-steps": Schedule(wait_fraction=0.5, max_wait=3),
             "all-waiting": Schedule(wait_fraction=1.0, max_wait=10_000)}


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("make_policy", [
    lambda r: RouterPolicy(r, 0.0), lambda r: RouterPolicy(r, 0.5), lambda r: RouterPolicy(r, 1.0),
    lambda r: RandomPolicy(0.3, seed=4), lambda r: ConfidencePolicy(0.95), lambda r: SLMOnly(), lambda r: LLMOnly(),
], ids=["router@0", "router@0.5", "router@1", "random", "confidence", "slm", "llm"])
def test_cached_batched_decoder_equals_cache_free_reference(pair, router, make_policy, schedule):
    """7 prompts through 4 slots: rows end at different steps and hand their slots on."""
    tok = pair.tokenizer
    policy = make_policy(router)
    prompts = prompts_of_mixed_lengths(tok, 7)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48)
    fast = decode(pair.slm, pair.llm, prompts, policy, pad_id=tok.pad_token_id, batch_size=4, schedule=schedule,
                  **kw).generations
    slow = reference_decode(pair.slm, pair.llm, prompts, policy, **kw)
    for f, s in zip(fast, slow, strict=True):
        assert f.tokens == s.tokens and f.from_llm == s.from_llm
        assert f.slm_passes == s.slm_passes  # one SLM pass per token the SLM decided on, none after the end
    ratio = llm_call_ratio(fast)
    if isinstance(policy, RouterPolicy):
        assert ratio == {0.0: 0.0, 1.0: 1.0}.get(policy.threshold, ratio)
        if policy.threshold == 0.5:
            assert 0.0 < ratio < 1.0  # both models really produced tokens
    assert all(len(g.tokens) <= 48 for g in fast) and any(g.tokens[-1] == tok.eos_token_id for g in fast)


def test_one_row_counts_every_token_each_model_reads(pair, router):
    """Alone in its batch and with the LLM called at once, a row's LLM reads the prompt and every
    token before its last LLM-written one, once; the SLM reads all but the final token."""
    tok = pair.tokenizer
    for prompt in prompts_of_mixed_lengths(tok, 4):
        done = decode(pair.slm, pair.llm, [prompt], RouterPolicy(router, 0.5), eos_ids=[tok.eos_token_id],
                      pad_id=tok.pad_token_id, max_new_tokens=40, schedule=IMMEDIATE)
        g = done.generations[0]
        last_llm = max((i for i, x in enumerate(g.from_llm) if x), default=None)
        expected_llm = 0 if last_llm is None else len(prompt) + last_llm
        assert g.llm_tokens_processed == expected_llm and g.llm_passes == g.llm_tokens == done.llm_passes
        assert g.slm_tokens_processed == len(prompt) + len(g.tokens) - 1 and g.slm_passes == len(g.tokens)
        assert done.llm_positions == expected_llm  # one row: no masked holes


def test_batching_llm_calls_across_steps_cuts_llm_passes(pair, router):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 8, seed=3)
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=40, batch_size=8)
    at_once = decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), schedule=IMMEDIATE, **kw)
    batched = decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), schedule=Schedule(1.0, 10_000), **kw)
    assert [g.tokens for g in at_once.generations] == [g.tokens for g in batched.generations]
    # At once: at most a pass at every step where some row wants the LLM (none when the LLM has read
    # that row to the end at an earlier pass); batched: a pass serves all the rows waiting.
    steps_with_llm = {k for g in at_once.generations for k, x in enumerate(g.from_llm) if x}
    assert len(steps_with_llm) >= 5 and at_once.llm_passes <= len(steps_with_llm)
    assert batched.llm_passes < at_once.llm_passes
    assert batched.llm_passes <= sum(g.llm_tokens for g in batched.generations)


def test_a_reused_prefix_gives_the_same_tokens_without_reading_it_again(pair, router):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 5, seed=5)
    prefixes = []
    for p in prompts:
        n = len(p) - 2  # states for all but the last two tokens, from one plain forward of each model
        ids = torch.tensor([p[:n]])
        kv = {name: [(layer.keys, layer.values) for layer in m(input_ids=ids, use_cache=True).cache.layers]
              for name, m in (("slm", pair.slm), ("llm", pair.llm))}
        prefixes.append(Prefix(length=n, slm=kv["slm"], llm=kv["llm"]))
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=30, batch_size=3)
    plain = decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), **kw)
    reused = decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), prefixes=prefixes, **kw)
    assert [g.tokens for g in reused.generations] == [g.tokens for g in plain.generations]
    assert reused.reused_prefix_tokens == sum(len(p) - 2 for p in prompts)
    assert plain.slm_tokens_processed - reused.slm_tokens_processed == reused.reused_prefix_tokens


def test_max_new_tokens_caps_every_row(pair, router):
    tok = pair.tokenizer
    gens = decode(pair.slm, pair.llm, prompts_of_mixed_lengths(tok, 5), RouterPolicy(router, 0.5),
                  eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=5).generations
    assert [len(g.tokens) for g in gens] == [5] * 5


def test_random_routing_hits_its_target_ratio_on_500_rows(pair, demo_world):
    tok = pair.tokenizer
    prompts = [tok(make_problem(random.Random(i), 3)["question"] + "\n", add_special_tokens=False)["input_ids"]
               for i in range(500)]
    gens = decode(pair.slm, pair.llm, prompts, RandomPolicy(0.2, seed=0), eos_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id, max_new_tokens=16, batch_size=125).generations
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
        decode(pair.slm, None, [[5]], RouterPolicy(router, 0.5), eos_ids=[1], pad_id=0, max_new_tokens=2)
    with pytest.raises(CiterError, match="llm_wait_fraction must be in"):
        Schedule(wait_fraction=1.5)


def test_speculative_decoding_gives_the_llms_tokens_in_at_most_one_llm_pass_per_token(pair):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 6, seed=7)
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=40)
    spec = speculative_decode(pair.slm, pair.llm, prompts, **kw)
    llm = reference_decode(pair.slm, pair.llm, prompts, LLMOnly(), eos_ids=[tok.eos_token_id], max_new_tokens=40)
    assert [g.tokens for g in spec.generations] == [g.tokens for g in llm]
    n = sum(len(g.tokens) for g in llm)
    # Each LLM pass checks the SLM's draft and keeps at least one token: never more passes than tokens.
    assert len(prompts) <= spec.llm_passes <= n and spec.slm_passes > 0
    assert spec.llm_passes == sum(g.llm_passes for g in spec.generations)


def test_an_llm_spread_over_devices_decodes_the_same_tokens(pair, router, demo_world, tmp_path):
    """`models.llm_device_map`: the LLM's last two layers kept on disk and streamed in by accelerate's
    hooks (on a GPU machine, a map over GPUs and the CPU) decodes exactly what the whole LLM does,
    its cache reused, compacted and reordered across the split."""
    modules = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
               "model.norm", "model.rotary_emb", "lm_head"]
    device_map = {m: "disk" if m in ("model.layers.2", "model.layers.3") else "cpu" for m in modules}
    split = load_pair(ModelsConfig(slm=str(demo_world / "slm"), llm=str(demo_world / "llm"),
                                   llm_device_map=device_map, llm_offload_folder=str(tmp_path / "offload")))
    assert split.llm.hf_device_map == device_map
    on = {name: p.device.type for name, p in split.llm.named_parameters()}
    assert {on[n] for n in on if ".layers.2." in n or ".layers.3." in n} == {"meta"}  # not in memory: on disk
    assert {on[n] for n in on if ".layers.0." in n} == {"cpu"}
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48, pad_id=tok.pad_token_id, batch_size=4,
              schedule=Schedule(wait_fraction=0.5, max_wait=3))
    policy = RouterPolicy(router, 0.5)
    whole = decode(pair.slm, pair.llm, prompts, policy, **kw).generations
    spread = decode(split.slm, split.llm, prompts, policy, **kw).generations
    assert [g.tokens for g in spread] == [g.tokens for g in whole]
    assert [g.from_llm for g in spread] == [g.from_llm for g in whole] and 0 < llm_call_ratio(whole) < 1


@pytest.mark.parametrize("device_map, message", [
    ("everywhere", "models.llm_device_map: 'everywhere' is not one of auto"),
    ({"model": 7}, "models.llm_device_map.model: GPU 7 is not visible"),
    ({"model": "tpu"}, "models.llm_device_map.model: 'tpu' is not a GPU index, 'cpu' or 'disk'"),
    ({"model": "disk"}, "set models.llm_offload_folder"),
])
def test_a_bad_llm_device_map_is_named(demo_world, device_map, message):
    with pytest.raises(CiterError, match=message):
        load_pair(ModelsConfig(slm=str(demo_world / "slm"), llm=str(demo_world / "llm"), llm_device_map=device_map))
