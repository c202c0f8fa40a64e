"""Greedy decoding. Single-model baselines (SLM only, LLM only) for now."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pipeline import CiterError


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int = 64,
    desc: str | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt by one model, batched with left padding.

    Returns only the new tokens of each row, cut after the first end-of-sequence token
    (which is not included).
    """
    if not prompt_ids:
        raise CiterError("no prompts to decode: the prompt list is empty")
    if any(len(p) == 0 for p in prompt_ids):
        raise CiterError("cannot decode an empty prompt (0 tokens)")
    out: list[list[int]] = []
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # less padding
    results: dict[int, list[int]] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        rows = [prompt_ids[i] for i in batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id, eos_token_id=eos_id,
        )[:, width:]
        for i, row in zip(batch, gen.tolist(), strict=True):
            results[i] = row[: row.index(eos_id)] if eos_id in row else row
    out = [results[i] for i in range(len(prompt_ids))]
    return out
