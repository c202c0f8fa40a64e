"""The serving loop without HTTP: a replica's `Service` taking many requests at once through its
`EngineLoop` (continuous batching, clients that go away mid-request), on the CPU and, where one is
visible, on a CUDA GPU with CUDA graphs. Expected texts come from the cache-free reference."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pipeline.config import load_config
from pipeline.decoding import LLMOnly, RouterPolicy, SLMOnly, reference_decode
from pipeline.router import Router, RouterSpec, save_router
from pipeline.rundir import router_dir
from pipeline.serving.protocol import parse_request
from pipeline.serving.service import Service
from tests.conftest import DEMO_CONFIG
from tests.test_serve import one_torch_thread, questions  # noqa: F401 - the autouse fixture applies here too

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU (none is visible here)"))]


@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_requests_equal_the_reference_while_others_are_abandoned(demo_world, tmp_path, device):
    torch.manual_seed(1)
    save_router(Router(RouterSpec(input_size=48)).eval(), router_dir(tmp_path, 0))
    cfg = load_config(DEMO_CONFIG, [f"models.slm={demo_world / 'slm'}", f"models.llm={demo_world / 'llm'}",
                                    f"models.device={device}", "serve.max_batch=8", "serve.threshold=0.5",
                                    "serve.max_tokens=32"])
    service = Service(cfg, router_dir(tmp_path, 0))
    routings = [{}, {"routing": "llm"}, {"routing": "slm"}, {"threshold": 0.8}]
    asks = [(q, routings[i % 4], i % 5 == 4) for i, q in enumerate(questions(30, seed=9))]  # every 5th abandoned

    async def ask(question: str, routing: dict, abandon: bool) -> str | None:
        request = parse_request({"model": "demo", "messages": [{"role": "user", "content": question}],
                                 "temperature": 0, "citer": routing}, chat=True, served_model="demo")
        pieces = service.generate(request)
        text = []
        async for piece in pieces:
            text.append(piece.text)
            if abandon:
                await pieces.aclose()  # what a client's disconnect does to its request
                return None
        return "".join(text)

    async def run_all() -> list[str | None]:
        return await asyncio.gather(*(ask(*a) for a in asks))

    try:
        texts = asyncio.run(run_all())
        stats = service.loop.stats
    finally:
        service.close()
    pair, router, tok = service.pair, service.router, service.pair.tokenizer
    policies = {None: RouterPolicy(router, 0.5), "llm": LLMOnly(), "slm": SLMOnly()}
    tokens = 0
    for (question, routing, abandon), text in zip(asks, texts, strict=True):
        if abandon:
            assert text is None
            continue
        policy = policies[routing.get("routing")]
        if "threshold" in routing:
            policy = RouterPolicy(router, routing["threshold"])
        ids = tok(question + "\n", add_special_tokens=False)["input_ids"]
        g = reference_decode(pair.slm, pair.llm, [ids], policy, eos_ids=pair.eos_ids, n_ids=pair.n_ids,
                             max_new_tokens=cfg.serve.max_tokens)[0]
        assert text == tok.decode([t for t in g.tokens if t not in pair.eos_ids], skip_special_tokens=True), question
        tokens += len(g.tokens)
    abandoned = sum(a for _, _, a in asks)
    assert stats.admitted == len(asks) and stats.cancelled == abandoned and stats.finished == len(asks) - abandoned
    assert stats.running == stats.waiting == 0
    assert stats.steps < tokens / 3  # rows shared steps (30 requests, 8 slots)
