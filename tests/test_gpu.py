"""The GPU paths, run where a CUDA device is visible (CI has none, so there they are skipped, saying
so): decoding with CUDA graphs equals the cache-free reference in float32 under every schedule, the
graphs are really replayed, and an LLM spread over the GPU and the CPU (`models.llm_device_map`)
decodes exactly what the whole LLM on the GPU does."""

import pytest
import torch

from pipeline.config import ModelsConfig
from pipeline.decoding import (
    DRAFT,
    IMMEDIATE,
    LLMOnly,
    RouterPolicy,
    Schedule,
    Speculative,
    decode,
    llm_call_ratio,
    reference_decode,
)
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec
from tests.test_decoding import prompts_of_mixed_lengths

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible here)")]

LLM_MODULES = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
               "model.norm", "model.rotary_emb", "lm_head"]


def pair_on_gpu(world, **models):
    return load_pair(ModelsConfig(slm=str(world / "slm"), llm=str(world / "llm"), device="cuda", **models))


@pytest.fixture(scope="module")
def gpu_pair(demo_world):
    return pair_on_gpu(demo_world)


@pytest.fixture(scope="module")
def router(gpu_pair):
    torch.manual_seed(1)
    return Router(RouterSpec(input_size=gpu_pair.hidden_size)).eval().cuda()


@pytest.mark.parametrize("schedule", [DRAFT, Schedule(verify_every=2, max_pending=1), IMMEDIATE,
                                      Schedule(mode="wait", wait_fraction=0.5, max_wait=3)],
                         ids=["draft", "draft-2-or-1-pending", "immediate", "wait"])
def test_graphed_decoding_equals_the_reference_in_float32(gpu_pair, router, schedule):
    tok = gpu_pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48)
    policy = RouterPolicy(router, 0.5)
    slow = reference_decode(gpu_pair.slm, gpu_pair.llm, prompts, policy, **kw)
    done = decode(gpu_pair.slm, gpu_pair.llm, prompts, policy, pad_id=tok.pad_token_id, batch_size=4,
                  schedule=schedule, graphs=True, **kw)
    assert done.graph_replays > 0  # the steps really ran from CUDA graphs
    assert [g.tokens for g in done.generations] == [g.tokens for g in slow]
    assert [g.from_llm for g in done.generations] == [g.from_llm for g in slow]
    assert 0 < llm_call_ratio(done.generations) < 1


def test_graphed_speculative_and_llm_only_decoding_give_the_llms_tokens(gpu_pair):
    tok = gpu_pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7, seed=3)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=40)
    slow = reference_decode(gpu_pair.slm, gpu_pair.llm, prompts, LLMOnly(), **kw)
    for policy in (LLMOnly(), Speculative()):
        done = decode(gpu_pair.slm, gpu_pair.llm, prompts, policy, pad_id=tok.pad_token_id, batch_size=8,
                      graphs=True, **kw)
        assert done.graph_replays > 0
        assert [g.tokens for g in done.generations] == [g.tokens for g in slow], policy.name


def test_an_llm_spread_over_gpu_and_cpu_decodes_the_same(demo_world, gpu_pair, router):
    spread_map = {m: "cpu" if m in ("model.layers.2", "model.layers.3", "lm_head") else 0 for m in LLM_MODULES}
    spread = pair_on_gpu(demo_world, llm_device_map=spread_map)
    # accelerate keeps "cpu" modules' weights in host memory (the parameters read "meta") and runs
    # them on the GPU, each forward copying them in
    on = {p.device.type for n, p in spread.llm.named_parameters() if ".layers.3." in n}
    assert spread.llm.hf_device_map == spread_map and on == {"meta"}
    tok = gpu_pair.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48, pad_id=tok.pad_token_id, batch_size=4,
              schedule=Schedule(verify_every=3))
    policy = RouterPolicy(router, 0.5)
    whole = decode(gpu_pair.slm, gpu_pair.llm, prompts, policy, **kw).generations
    across = decode(spread.slm, spread.llm, prompts, policy, **kw).generations
    assert [g.tokens for g in across] == [g.tokens for g in whole]
    assert [g.from_llm for g in across] == [g.from_llm for g in whole]
