"""Collaborative decoding: the engine equals the cache-free reference exactly, under every schedule,
batch size and stop condition, and counts what each model really did."""

import random

import pytest
import torch

from pipeline import CiterError
from pipeline.config import ModelsConfig
from pipeline.decoding import (
    DRAFT,
    IMMEDIATE,
    ConfidencePolicy,
    Engine,
    LLMOnly,
    Prefix,
    RandomPolicy,
    Request,
    RouterPolicy,
    Sampling,
    Schedule,
    SLMOnly,
    Speculative,
    decode,
    llm_call_ratio,
    reference_decode,
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
    prompts[1] = prompts[1][8:]  # a shorter prompt
    prompts[2] = prompts[2][:5]  # an unfinished question: the answer is garbage, often long
    return prompts


def test_router_probabilities_spread_around_the_thresholds(pair, router):
    tok = pair.tokenizer
    ids = torch.tensor([prompts_of_mixed_lengths(tok, 4)[0]])
    h = pair.slm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    p = router.prob(h)
    assert p.min() < 0.5 < p.max()  # so threshold 0.5 really mixes the two models


SCHEDULES = {"draft-every-4": DRAFT, "draft-every-step": Schedule(verify_every=1),
             "draft-every-8-or-2-pending": Schedule(verify_every=8, max_pending=2), "immediate": IMMEDIATE,
             "wait-half-or-3-steps": Schedule(mode="wait", wait_fraction=0.5, max_wait=3),
             "wait-all": Schedule(mode="wait", wait_fraction=1.0, max_wait=10_000)}
POLICIES = {"router@0": lambda r: RouterPolicy(r, 0.0), "router@0.5": lambda r: RouterPolicy(r, 0.5),
            "router@1": lambda r: RouterPolicy(r, 1.0), "random": lambda r: RandomPolicy(0.3, seed=4),
            "confidence": lambda r: ConfidencePolicy(0.95), "slm": lambda r: SLMOnly(), "llm": lambda r: LLMOnly(),
            "speculative": lambda r: Speculative()}
MAX_NEW = 48


@pytest.fixture(scope="module")
def references(pair, router):
    """The reference decode of 7 prompts of mixed lengths under each policy, computed once."""
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7)
    return prompts, {name: reference_decode(pair.slm, pair.llm, prompts, make(router), eos_ids=[tok.eos_token_id],
                                            max_new_tokens=MAX_NEW) for name, make in POLICIES.items()}


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("policy_name", POLICIES)
def test_the_engine_equals_the_cache_free_reference(pair, router, references, policy_name, schedule):
    """7 prompts through 4 slots: rows end at different steps and hand their slots on."""
    tok = pair.tokenizer
    prompts, slow = references[0], references[1][policy_name]
    policy = POLICIES[policy_name](router)
    done = decode(pair.slm, pair.llm, prompts, policy, eos_ids=[tok.eos_token_id], max_new_tokens=MAX_NEW,
                  pad_id=tok.pad_token_id, batch_size=4, schedule=schedule)
    for fast, ref in zip(done.generations, slow, strict=True):
        assert fast.tokens == ref.tokens and fast.from_llm == ref.from_llm
        # SLM passes: the prompt's prefill, then a step per token it decided on (the reference's count),
        # plus one per drafted token a rollback threw away (a rollback's own token reuses its step)
        if policy.uses_slm:
            assert fast.slm_passes == 1 + ref.slm_passes + fast.discarded_tokens - fast.rollbacks
    if schedule.waits:
        assert done.rollbacks == 0 and done.discarded_tokens == 0
    if not policy.uses_llm or policy_name == "router@0":
        assert done.rollbacks == 0
    ratio = llm_call_ratio(done.generations)
    if isinstance(policy, RouterPolicy):
        assert ratio == {0.0: 0.0, 1.0: 1.0}.get(policy.threshold, ratio)
        if policy.threshold == 0.5:
            assert 0.0 < ratio < 1.0  # both models really wrote tokens
    assert all(len(g.tokens) <= MAX_NEW for g in done.generations)
    assert any(g.tokens[-1] == tok.eos_token_id for g in done.generations)


@pytest.mark.parametrize("batch_size", [1, 2, 7])
@pytest.mark.parametrize("max_new_tokens", [3, 17])
def test_draft_decoding_is_exact_at_any_batch_size_and_limit(pair, router, batch_size, max_new_tokens):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7, seed=2)
    policy = RouterPolicy(router, 0.5)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=max_new_tokens)
    slow = reference_decode(pair.slm, pair.llm, prompts, policy, **kw)
    fast = decode(pair.slm, pair.llm, prompts, policy, pad_id=tok.pad_token_id, batch_size=batch_size,
                  schedule=Schedule(verify_every=5), **kw).generations
    assert [g.tokens for g in fast] == [g.tokens for g in slow]
    assert [g.from_llm for g in fast] == [g.from_llm for g in slow]


def test_one_row_counts_every_token_each_model_reads(pair, router):
    """Alone in its batch with the LLM called at once: each model reads the prompt but its last
    token when the row is admitted; then the SLM reads one token a step, and the LLM, at each call,
    every token up to the one it writes. So the LLM reads the prompt and every token before its
    last one once, and the SLM everything but the final token."""
    tok = pair.tokenizer
    for prompt in prompts_of_mixed_lengths(tok, 4):
        done = decode(pair.slm, pair.llm, [prompt], RouterPolicy(router, 0.5), eos_ids=[tok.eos_token_id],
                      pad_id=tok.pad_token_id, max_new_tokens=40, schedule=IMMEDIATE)
        g = done.generations[0]
        last_llm = max((i for i, x in enumerate(g.from_llm) if x), default=None)
        expected_llm = len(prompt) - 1 if last_llm is None else len(prompt) + last_llm
        assert g.llm_tokens_processed == expected_llm and done.llm_positions == expected_llm  # one row: no padding
        assert g.slm_tokens_processed == len(prompt) + len(g.tokens) - 1 and g.slm_passes == len(g.tokens) + 1
        assert g.llm_passes == g.llm_tokens + 1 == done.llm_passes  # the prefill, then one call per LLM token


def test_drafting_cuts_llm_passes_and_counts_what_it_throws_away(pair, router):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 8, seed=3)
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=40, batch_size=8)
    at_once = decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), schedule=IMMEDIATE, **kw)
    drafted = decode(pair.slm, pair.llm, prompts, RouterPolicy(router, 0.5), schedule=Schedule(verify_every=4), **kw)
    assert [g.tokens for g in at_once.generations] == [g.tokens for g in drafted.generations]
    steps_with_llm = {k for g in at_once.generations for k, x in enumerate(g.from_llm) if x}
    assert len(steps_with_llm) >= 5 and at_once.llm_passes <= len(steps_with_llm) + 1  # + the prompts' prefill
    assert drafted.llm_passes < at_once.llm_passes  # about half on the demo pair; how much depends on its world
    # every rollback threw away the token it replaced at least; the SLM read all it drafted
    assert 0 < drafted.rollbacks <= drafted.discarded_tokens
    slm_tokens = sum(len(p) - 1 + len(g.tokens) for p, g in zip(prompts, drafted.generations, strict=True))
    assert drafted.slm_tokens_processed - slm_tokens == drafted.discarded_tokens - drafted.rollbacks


def test_speculative_decoding_gives_the_llms_tokens_in_fewer_llm_passes(pair):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 6, seed=7)
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=40, batch_size=3)
    llm = decode(pair.slm, pair.llm, prompts, LLMOnly(), **kw)
    spec = decode(pair.slm, pair.llm, prompts, Speculative(), schedule=Schedule(verify_every=4), **kw)
    assert [g.tokens for g in spec.generations] == [g.tokens for g in llm.generations]
    assert spec.llm_passes < llm.llm_passes / 2 and llm.slm_passes == 0


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


def test_random_routing_hits_its_target_ratio_on_500_rows(pair):
    tok = pair.tokenizer
    prompts = [tok(make_problem(random.Random(i), 3)["question"] + "\n", add_special_tokens=False)["input_ids"]
               for i in range(500)]
    gens = decode(pair.slm, pair.llm, prompts, RandomPolicy(0.2, seed=0), eos_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id, max_new_tokens=16, batch_size=125).generations
    assert abs(llm_call_ratio(gens) - 0.2) <= 0.02


def test_sampling_is_reproducible_for_a_seed_in_any_batch_and_keeps_the_reference_rule(pair, router):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 4, seed=9)
    policy = RouterPolicy(router, 0.5)

    def sampled(seed: int, slots: int, schedule: Schedule) -> list[list[int]]:
        engine = Engine(pair.slm, pair.llm, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, n_ids=pair.n_ids,
                        n_slots=slots, capacity=120, schedule=schedule, router=router)
        requests = [Request(p, policy, 30, index=i, sampling=Sampling(temperature=1.3, top_p=0.95, seed=seed + i))
                    for i, p in enumerate(prompts)]
        queue, tokens = list(requests), {id(r): [] for r in requests}
        while queue or engine.rows:
            if queue and engine.free_slots:
                engine.admit([queue.pop(0) for _ in range(min(engine.free_slots, len(queue)))])
            for update in engine.step():
                tokens[id(update.request)] += update.tokens
        return [tokens[id(r)] for r in requests]

    one = sampled(11, 4, DRAFT)
    assert sampled(11, 1, IMMEDIATE) == one  # another batch and schedule: the same text
    assert sampled(12, 4, DRAFT) != one
    greedy = decode(pair.slm, pair.llm, prompts, policy, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                    max_new_tokens=30).generations
    assert [g.tokens for g in greedy] != one
    for i, prompt in enumerate(prompts):
        (ref,) = reference_decode(pair.slm, pair.llm, [prompt], policy, eos_ids=[tok.eos_token_id], max_new_tokens=30,
                                  sampling=Sampling(temperature=1.3, top_p=0.95, seed=11 + i))
        assert ref.tokens == one[i]


def test_streamed_updates_are_final_and_a_cancelled_row_frees_its_slot(pair, router):
    tok = pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 3, seed=4)
    policy = RouterPolicy(router, 0.5)
    engine = Engine(pair.slm, pair.llm, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, n_ids=pair.n_ids,
                    n_slots=2, capacity=120, schedule=Schedule(verify_every=6), router=router)
    first, doomed = Request(prompts[0], policy, 40, index=0), Request(prompts[1], policy, 40, index=1)
    engine.admit([first, doomed])
    streamed: list[int] = []
    for _ in range(5):
        streamed += [t for u in engine.step() if u.request is first for t in u.tokens]
    engine.cancel(doomed)
    assert engine.free_slots == 1 and [r.request for r in engine.rows] == [first]
    late = Request(prompts[2], policy, 40, index=2)
    engine.admit([late])
    late_tokens: list[int] = []
    while engine.rows:
        for u in engine.step():
            streamed += u.tokens if u.request is first else []
            late_tokens += u.tokens if u.request is late else []
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=40)
    assert streamed == reference_decode(pair.slm, pair.llm, [prompts[0]], policy, **kw)[0].tokens
    assert late_tokens == reference_decode(pair.slm, pair.llm, [prompts[2]], policy, **kw)[0].tokens


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
        Schedule(mode="wait", wait_fraction=1.5)
    with pytest.raises(CiterError, match="decode.schedule must be one of draft, immediate, wait"):
        Schedule(mode="eager")
    with pytest.raises(CiterError, match="verify_every must be an integer >= 1"):
        Schedule(verify_every=0)
    with pytest.raises(CiterError, match="top_p must be in"):
        Sampling(temperature=1.0, top_p=0.0)
    engine = Engine(pair.slm, pair.llm, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, n_ids=pair.n_ids,
                    n_slots=1, capacity=20)
    with pytest.raises(CiterError, match="do not fit the engine's 20 tokens a row"):
        engine.admit([Request([5] * 10, SLMOnly(), 11)])
    with pytest.raises(CiterError, match="policy's router is not the one this engine runs"):
        engine.admit([Request([5], RouterPolicy(router, 0.5), 4)])
    with pytest.raises(CiterError, match="2 requests for 1 free slots"):
        engine.admit([Request([5], SLMOnly(), 4), Request([6], SLMOnly(), 4)])


def test_an_llm_spread_over_devices_decodes_the_same_tokens(pair, router, demo_world, tmp_path):
    """`models.llm_device_map`: the LLM's last two layers kept on disk and streamed in by accelerate's
    hooks (on a GPU machine, a map over GPUs and the CPU) decodes exactly what the whole LLM does."""
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
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48, pad_id=tok.pad_token_id, batch_size=4)
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
