"""The GPU paths, run where a CUDA device is visible (CI has none, so there they are skipped, saying
so): decoding on CUDA equals the cache-free reference, and an LLM spread over the GPU and the CPU
(`models.llm_device_map`) decodes exactly what the whole LLM on the GPU does."""

import pytest
import torch

from pipeline.config import ModelsConfig
from pipeline.decoding import RouterPolicy, Schedule, decode, llm_call_ratio, reference_decode
from pipeline.models import load_pair
from pipeline.router import Router, RouterSpec
from tests.test_decoding import prompts_of_mixed_lengths

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible here)")

LLM_MODULES = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
               "model.norm", "model.rotary_emb", "lm_head"]


def pair_on_gpu(world, **models):
    return load_pair(ModelsConfig(slm=str(world / "slm"), llm=str(world / "llm"), device="cuda", **models))


def test_decoding_on_cuda_equals_the_reference_and_an_llm_spread_over_gpu_and_cpu_decodes_the_same(demo_world):
    whole = pair_on_gpu(demo_world)
    assert whole.llm.device.type == "cuda" and whole.slm.device.type == "cuda"
    spread_map = {m: "cpu" if m in ("model.layers.2", "model.layers.3", "lm_head") else 0 for m in LLM_MODULES}
    spread = pair_on_gpu(demo_world, llm_device_map=spread_map)
    # accelerate keeps "cpu" modules' weights in host memory (the parameters read "meta") and runs
    # them on the GPU, each forward copying them in
    on = {p.device.type for n, p in spread.llm.named_parameters() if ".layers.3." in n}
    assert spread.llm.hf_device_map == spread_map and on == {"meta"}

    torch.manual_seed(1)
    policy = RouterPolicy(Router(RouterSpec(input_size=whole.hidden_size)).eval().cuda(), 0.5)
    tok = whole.tokenizer
    prompts = prompts_of_mixed_lengths(tok, 7)
    kw = dict(eos_ids=[tok.eos_token_id], max_new_tokens=48)
    batched = dict(pad_id=tok.pad_token_id, batch_size=4, schedule=Schedule(verify_every=3))
    fast = decode(whole.slm, whole.llm, prompts, policy, **kw, **batched).generations
    slow = reference_decode(whole.slm, whole.llm, prompts, policy, **kw)
    assert [g.tokens for g in fast] == [g.tokens for g in slow]
    assert [g.from_llm for g in fast] == [g.from_llm for g in slow] and 0 < llm_call_ratio(fast) < 1
    across = decode(spread.slm, spread.llm, prompts, policy, **kw, **batched).generations
    assert [g.tokens for g in across] == [g.tokens for g in fast]
    assert [g.from_llm for g in across] == [g.from_llm for g in fast]
