"""The cache-free reference decoder: the definition the engine must match token for token."""

from __future__ import annotations

from collections.abc import Collection

import torch

from pipeline.decoding.engine import Generation, _as_set, check_prompts
from pipeline.decoding.policies import Policy
from pipeline.decoding.sampling import GREEDY, Sampling, sample


@torch.no_grad()
def reference_decode(slm, llm, prompts: list[list[int]], policy: Policy, *, eos_ids: Collection[int],
                     max_new_tokens: int, n_ids: int | None = None,
                     sampling: Sampling = GREEDY) -> list[Generation]:
    """The simplest correct implementation: each row alone, both models re-run over the whole
    prefix at every step, no cache. At each step the SLM proposes a token, the policy decides, and
    where it routes the LLM's token is taken instead. Slow; the engine must give exactly its tokens."""
    check_prompts(prompts)
    eos_ids = _as_set(eos_ids)
    results = []
    for row, prompt in enumerate(prompts):
        g, seq = Generation(), list(prompt)
        while True:
            confidence = float("nan")
            if policy.uses_slm:
                out = slm(input_ids=torch.tensor([seq], device=slm.device), output_hidden_states=True)
                logits = out.logits[0, -1, :n_ids]
                confidence = float(torch.softmax(logits.float(), dim=-1).max())
                prob = (float(policy.router.step_prob(out.hidden_states[-1][:, -1], logits[None], logits.argmax()[None],
                                                      slm.get_input_embeddings())[0])
                        if policy.router else float("nan"))
                g.slm_passes += 1
                g.slm_tokens_processed += len(seq)
                to_llm = policy.route(prob, confidence, row, len(g.tokens))
                token = sample(logits, sampling, len(seq))
            else:
                to_llm = True
            if to_llm:
                token = sample(llm(input_ids=torch.tensor([seq], device=llm.device)).logits[0, -1, :n_ids], sampling,
                               len(seq))
                g.llm_passes += 1
                g.llm_tokens_processed += len(seq)
            g.tokens.append(token)
            g.from_llm.append(to_llm)
            g.slm_confidence.append(confidence)
            seq.append(token)
            if token in eos_ids or len(g.tokens) >= max_new_tokens:
                break
        results.append(g)
    return results
